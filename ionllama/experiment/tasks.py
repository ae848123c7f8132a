"""The task stage: identical task examples and steps for every task arm, scored on held-out tasks."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import UserError
from ._common import _autocast


def task_examples(seed: int, step: int, n: int) -> list:
    """The task examples of fine-tuning step `step`: the same for every arm (a pure function of seed, step)."""
    from ..data import tasks as T

    rng = np.random.default_rng([seed, step, 0x7A5D])
    return [T.sample_example(rng, T.TASKS[int(rng.integers(len(T.TASKS)))], "train") for _ in range(n)]


def longest_task_example(seed: int, steps: int, n: int) -> int:
    """Bytes of the longest fine-tuning example of the stage (prompt, answer and its newline): known before any
    arm pretrains, since the examples are a pure function of (seed, step)."""
    return max(len(e.prompt) + len(e.answer) + 1 for step in range(steps) for e in task_examples(seed, step, n))


def check_task_row_len(row_len: int, longest: int, token_arms: list[str], flag: str = "--task_seq_len") -> None:
    """A row holds `sep example sep`: refused before pretraining, not when the task stage packs its first batch
    after every arm has trained. A token arm's rows hold row_len // 2 tokens; a byte-level BPE never makes more
    tokens than bytes, so an example fits when its bytes do (it may also fit with fewer; not knowable before the
    tokenizer exists)."""
    need = longest + 1
    if row_len < need:
        raise UserError(f"{flag} {row_len} is shorter than the longest task example ({longest} bytes "
                        f"and a separator); pass {flag} {need} or more")
    if token_arms and max(16, row_len // 2) < need:
        raise UserError(f"{flag} {row_len} gives {', '.join(token_arms)} rows of {max(16, row_len // 2)} "
                        f"tokens, and the longest task example can take {need} (a token per byte at worst); pass "
                        f"{flag} {2 * need} or more")


def pack_examples(pieces: list[tuple[list[int], list[int]]], sep: int, row_len: int,
                  tail: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[(prompt ids, answer ids incl. newline)] -> rows `sep p a sep p a ...` padded with `tail` (default sep);
    targets only on answers. Examples are never cut; as many rows as needed."""
    rows, masks, cur, cm = [], [], [sep], [False]
    for p, ans in pieces:
        if len(p) + len(ans) + 2 > row_len + 1:
            raise UserError(f"a task example needs rows of {len(p) + len(ans) + 1} positions, these hold {row_len}; "
                            "raise the row length (--task_seq_len; in probe_tasks.py --row_len)")
        if len(cur) + len(p) + len(ans) + 1 > row_len + 1:
            rows.append(cur)
            masks.append(cm)
            cur, cm = [sep], [False]
        cur += p + ans + [sep]
        cm += [False] * len(p) + [True] * len(ans) + [False]
    rows.append(cur)
    masks.append(cm)
    L = row_len + 1
    toks = torch.full((len(rows), L), sep if tail is None else tail, dtype=torch.long)
    tmask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        toks[i, :len(r)] = torch.tensor(r)
        tmask[i, :len(m)] = torch.tensor(m)
    y = torch.where(tmask[:, 1:], toks[:, 1:], torch.full_like(toks[:, 1:], -100))
    return toks[:, :-1], y


# A row's tail after its last separator: no targets, and causal, so nothing real reads it. A word byte, not the
# separator: under space patching every separator starts a patch, so a separator tail made the latent as long as
# the row (256 patches for 256 bytes; ~116 without the tail), while a run of word bytes is one patch per
# max_patch_size. The targets and the real bytes' outputs are the same either way (tests/test_tasks.py).
TAIL_BYTE = ord("a")


def task_batch(model, examples, row_len_bytes: int):
    from ..data import DOC_SEP

    if getattr(model, "token_level", False):
        bpe = model.bpe
        pieces = []
        for e in examples:
            p, a = bpe.encode_docs([e.prompt, e.answer + b"\n"])
            pieces.append((p.tolist(), a.tolist()))
        return pack_examples(pieces, bpe.sep_id, max(16, row_len_bytes // 2))
    return pack_examples([(list(e.prompt), list(e.answer + b"\n")) for e in examples], DOC_SEP, row_len_bytes,
                         tail=TAIL_BYTE)


def pad_rows(x: torch.Tensor, y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A task batch padded to `rows` rows with copies of its first row that have no targets: the loss (a mean
    over target positions) and its gradients are the unpadded batch's, and a copy has no more patches than a real
    row. Why: packed examples give 10-13 rows per step, and under torch.compile the first new row count compiles
    the whole model again (122 s against 40 s for a 400-step stage on the H200, thirty-ninth session)."""
    if x.shape[0] >= rows:
        return x, y
    pad = rows - x.shape[0]
    return (torch.cat([x, x[:1].expand(pad, x.shape[1])]),
            torch.cat([y, torch.full((pad, y.shape[1]), -100, dtype=y.dtype)]))


def stage_latent_len(model, batches) -> int | None:
    """For a compiled stage: one latent length for every batch of the stage, when the patch count depends on the
    bytes only (space patching); None where the model needs none (fixed or byte patching: known from the row
    length) or it cannot be known before the step (entropy patching: the entropy model's output; BPE). Why: the
    forward otherwise reads each batch's largest count on the host, which breaks the compiled graph and compiles
    varying lengths (space patching's stage compiled ~150 s against fixed patches' ~85 s, 41.6 against 29.9 ms a
    step). The same rule as the forward's, on the CPU, over the very batches the stage will train on."""
    from ..model.ionllama_model import PATCH_PAD, IonLlama

    # (a dense or mamba arm can hold patching=space too, from --override: its forward takes no latent length)
    if not isinstance(model, IonLlama) or model.config.patching != "space":
        return None
    cfg = model.config
    from ..model.patcher import compute_patches

    most = max(int(compute_patches(x, None, "space", torch.zeros(()), cfg.threshold_mode, cfg.max_patch_size,
                                   cfg.fixed_patch_size)[2].max()) for x, _ in batches)
    return -(-most // PATCH_PAD) * PATCH_PAD


def compiled_stage(model, batches):
    """-> (batches padded to one row count, the torch.compile'd forward(x, y), {"padded_rows", "latent_len"}):
    every step of the stage has one shape, so the model compiles once (pad_rows, stage_latent_len)."""
    rows = max(x.shape[0] for x, _ in batches)
    batches = [pad_rows(x, y, rows) for x, y in batches]
    shapes = {"padded_rows": rows, "latent_len": stage_latent_len(model, batches)}
    compiled = torch.compile(model)
    if shapes["latent_len"] is None:
        return batches, compiled, shapes
    return batches, lambda x, y: compiled(x, y, latent_len=shapes["latent_len"]), shapes


def captured_stage_problem(model, shapes: dict, row_len: int, device: torch.device, amp=None) -> str | None:
    """Why this model's compiled task stage cannot be one captured CUDA graph, or None: it must run on a GPU, and
    the forward must not read a patch count on the host, i.e. the count must follow from the row length (fixed or byte patching, and every
    baseline) or be given for the stage (space patching's latent_len). Entropy patching draws boundaries from the
    entropy model's output, which only the trainer's two-stage step handles. amp: fp16 needs loss scaling, which the
    captured step has not (the trainer's step_graph_problem refuses it too)."""
    from ..model.ionllama_model import IonLlama, static_patch_count

    if amp == torch.float16:
        return "it has no fp16 loss scaling"
    if (isinstance(model, IonLlama) and shapes.get("latent_len") is None
            and static_patch_count(model.config, row_len) is None):
        return f"{model.config.patching} patching reads its patch count on the host each step"
    if torch.device(device).type != "cuda":  # (StepGraph would run the same step eagerly: no graph)
        return f"it captures CUDA graphs, and this stage runs on {torch.device(device).type}"
    return None


class TaskStageCut(Exception):
    """The task stage stopped before its last step: at its pace it would pass the wall-clock deadline."""

    def __init__(self, step: int, steps: int, seconds: float, ms_per_step: float):
        self.step, self.steps, self.seconds, self.ms_per_step = step, steps, seconds, ms_per_step
        # what the whole stage would need at the pace of its steps after the first window (which holds the compiling)
        self.need_s = seconds + (steps - step - 1) * ms_per_step / 1e3
        super().__init__(f"stopped after step {step + 1} of {steps} ({seconds:.0f} s; {ms_per_step:.1f} ms per step "
                         f"since compiling: the stage needs ~{self.need_s:.0f} s)")


def train_on_tasks(model, device, amp, steps: int, lr: float, batch_of_step, log_every: int = 50,
                   on_log=None, forward=None, deadline: float | None = None,
                   step_graph: bool = False, replay: bool = True) -> tuple[list[dict], float]:
    """The task fine-tuning loop of every task arm: AdamW (wd 0.1), warmup 5 % then cosine to 10 %, clip 1.0 (fp16:
    loss scaling, as the trainer);
    batch_of_step(step) -> (x, y). Returns ([{step, loss, bpb}] every log_every steps and at the last, seconds); bpb
    is per target byte, also for a token model (whose loss is per token). forward: what computes model(x, y) (e.g.
    torch.compile(model)); the model's own forward by default. deadline (a time.perf_counter() value): at each log
    point from the third on, raise TaskStageCut when the steps left, at the pace of the steps since the second log
    point, would end past it. Why: a stage killed by the call's time limit leaves nothing, not even how far it got
    (a space-patching row compiling twice as long as fixed patches' did exactly that); a partial stage is no row, so
    the stage stops as soon as it cannot finish.
    step_graph: the whole step (forward, backward, clipping, AdamW) through the trainer's StepGraph, replayed as one
    CUDA graph on a GPU (eagerly elsewhere); every batch must have one shape (compiled_stage's) and the forward no
    host read (captured_stage_problem). Why: at 12-13 rows of 256 bytes the step waits on kernel launches (the
    local layers' many small kernels: 202-232 s for 6,000 steps with them, 50-52 s without; fortieth session).
    replay=False (with step_graph): StepGraph's step code and capturable optimizer, run eagerly also on a GPU (the
    benchmark that splits the optimizer's part in a loss difference from the capture's)."""
    forward = model if forward is None else forward  # (not `or`: a compiled module has no truth value)
    from ..train.optim import make_adamw
    from ..train.schedule import warmup_cosine

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw(model, params, lr, 0.1, device, capturable=step_graph)
    # fp16 scales the loss as the trainer does: unscaled, a model that fits its answers loses small gradients to
    # underflow (a no-op for bf16 and fp32)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    graph = None
    if step_graph:
        if scaler.is_enabled():
            raise UserError("the captured task step has no fp16 loss scaling; run it without step_graph "
                            "(captured_stage_problem says so)")
        from ..train.step_graph import StepGraph

        graph = StepGraph(forward, opt, 1.0, lambda: _autocast(device, amp), graphs=replay and device.type == "cuda")
    # gradients left on the model by its caller are not the first step's (StepGraph drops them before its backward;
    # the plain loop added them in)
    opt.zero_grad(set_to_none=True)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        x, y = batch_of_step(step)
        lr_now = lr * warmup_cosine(step, steps, max(1, steps // 20))
        if graph is not None:
            out = graph(x.to(device), y.to(device), lr_now)
        else:
            for g in opt.param_groups:
                g["lr"] = lr_now
            with _autocast(device, amp):
                out = forward(x.to(device), y.to(device))
            # the entropy model's own loss where it learns, as StepGraph and the trainer add it (run_task_stage
            # freezes it first, so the stage itself has none; a direct caller got two different trainings)
            aux = out.get("aux_loss")
            scaler.scale(out["loss"] if aux is None else out["loss"] + aux).backward()
            scaler.unscale_(opt)  # clipping sees the true gradients
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            losses.append({"step": step, "loss": float(out["loss"].detach()), "bpb": float(out["bpb"].detach())})
            if on_log:
                on_log(losses[-1])
            now = time.perf_counter()
            if len(losses) == 2:  # the pace is taken from here on: the first window holds the compiling
                t_paced, step_paced = now, step
            elif deadline is not None and len(losses) >= 3 and step < steps - 1:
                # over every step since, not the latest window alone: one slow window (a recompile for a new
                # shape) must not cut a stage that would finish
                ms = (now - t_paced) * 1e3 / (step - step_paced)
                if now + (steps - step - 1) * ms / 1e3 > deadline:
                    raise TaskStageCut(step, steps, now - t0, ms)
    return losses, time.perf_counter() - t0


def run_task_stage(model, device, amp, a, deadline: float | None = None, log=None) -> dict:
    """Fine-tune on identical task examples for --task_steps steps, then held-out test accuracy. log(line): progress
    about every tenth of the stage (step, loss, seconds); deadline: as train_on_tasks (raises TaskStageCut).
    The result's ["results"]["outputs"] holds every scored example (task_eval.output_row) for the caller to write."""
    from ..eval.task_eval import run_tasks

    eval_s = float(getattr(a, "task_eval_s", 0.0) or 0.0)
    train_deadline = None if deadline is None else deadline - eval_s  # the scoring after training needs its time

    if hasattr(model, "freeze_entropy"):
        model.freeze_entropy(True)  # patch boundaries as in pretraining
    # dropout's masks from --seed, not from whatever ran before in this process (the pretraining, an earlier arm, a
    # fresh process's random seed): the same checkpoint and flags gave different fine-tuned weights each run
    torch.manual_seed(a.seed)
    compiled = bool(getattr(a, "task_compile", False))
    t0, every = time.perf_counter(), max(50, a.task_steps // 10 // 50 * 50)

    def progress(row):
        if log is not None and row["step"] % every == 0:
            log(f"task stage step {row['step']} of {a.task_steps}: loss {row['loss']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")

    def batch_of_step(step):
        return task_batch(model, task_examples(a.seed, step, a.task_batch), a.task_seq_len)

    forward, shapes, captured = None, {}, False
    if compiled:  # one shape for the whole stage, so torch.compile compiles the model once
        batches, forward, shapes = compiled_stage(model, [batch_of_step(step) for step in range(a.task_steps)])
        batch_of_step = batches.__getitem__
        if getattr(a, "task_step_graph", False):
            problem = captured_stage_problem(model, shapes, a.task_seq_len, device, amp)
            captured = problem is None
            if problem and log is not None:
                log(f"--task_step_graph: {problem}; this arm's task stage runs without the graph")
    losses, train_s = train_on_tasks(model, device, amp, a.task_steps, a.task_lr, batch_of_step,
                                     forward=forward, on_log=progress, deadline=train_deadline, step_graph=captured)
    model.eval()
    t_score = time.perf_counter()
    results = run_tasks(model, device, n=a.task_n, max_digits=4, seed=1234, shots=0, trained_on_tasks=True,
                        split="test", batch_size=32, amp_dtype=amp, keep_outputs=True)
    score_s = time.perf_counter() - t_score
    if log is not None:
        log(f"task scoring took {score_s:.0f} s (--task_eval_s keeps {eval_s:.0f} s for it under --deadline_s)")
    return {"fine_tuning": {"steps": a.task_steps, "examples_per_step": a.task_batch, "lr": a.task_lr,
                            "schedule": "AdamW, warmup 5% then cosine to 10%, grad clip 1.0",
                            "row_len": a.task_seq_len, "seed": a.seed, "seconds": train_s, "compiled": compiled,
                            "step_graph": captured, **shapes, "losses": losses,
                            "data": "ionllama.data.tasks train split, identical examples per step for every arm"},
            "scoring_seconds": score_s,
            "results": results}
