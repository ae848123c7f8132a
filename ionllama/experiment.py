"""`ionllama experiment`: the Phase-1 matrix - every arm trained under the same wall-clock budget on the
same data, evaluated on the same val bytes, with a table, plots and resumable per-arm results.

    ionllama experiment --matrix phase1 --budget_s 420 \\
        --data_path '../shared/data/gutenberg/gutenberg-{split}.jsonl.xz' --out docs/results/phase1 [--arms a,b]

Per arm (``ARMS`` below holds each arm's hyper-parameters in one table):
  * training goes through the harness trainer (ionllama.train.trainer) with a *time-based* schedule:
    warmup, phases (entropy model -> main -> joint) and the cosine decay follow the fraction of the
    budget spent, so every arm ends its schedule exactly when its budget is spent (``TimeBudgetPlan``);
    training time excludes evaluation and checkpointing (the trainer's own accounting);
  * val BPB is measured at ``--curve_points`` times on the first ``--curve_eval_bytes`` val bytes (for
    the curves), then once on the full val split (or the first ``--eval_bytes``: the same bytes for
    every arm, byte models and the BPE model alike, see ionllama/data/bpe.py);
  * <out>/<arm>/metrics.jsonl (the trainer's records + cumulative training FLOPs), config.json and
    final.json (val/test/out-of-domain BPB, params, bytes/s, bytes/patch, FLOPs, time, command,
    device, date, git commit). An arm with final.json is skipped; an interrupted arm resumes from
    <ckpt_dir>/<arm>/latest.pt (checkpoints stay out of git).
Then <out>.md's table section, <out>.json and the plots (val BPB vs training time and vs FLOPs).

Training FLOPs (second view; ionllama/model/flops.py): 6 x matmul parameters per position (forward +
backward), + attention 12 x d x keys-per-query per layer, per position; per byte = per position /
(bytes per position): 1 for byte models, bytes/token for BPE, and for ionLlama the byte-level parts
count per byte and the latent parts per patch (the measured bytes/patch of each logged window). The
frozen entropy model counts 2 per parameter, the entropy phase 6 x its parameters. MambaByte adds the
chunked scan's matmuls (``ssd_flops_per_position``). Embedding lookups, norms and elementwise ops are
not counted.

``--stage tasks`` fine-tunes the task arms (best ionLlama arm, dense, bpe) on identical task examples
for identical steps (ionllama/data/tasks.py; prompt and answer encoded separately for BPE) and scores
the held-out test split with the benchmark's task evaluation (exact match, 95 % Wilson CIs).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import format_ngram_sizes, parse_ngram_sizes
from .errors import UserError, cli_entry

# ---------------------------------------------------------------------------------- the matrix

# One row per arm: trainer flags (model, size, size overrides, lr) and experiment keys:
#   token_seq_div - a token model's window = --seq_len // token_seq_div tokens (1024 bytes -> 256 tokens)
#   entropy_frac  - share of the budget spent training the entropy model (entropy patching only)
def _matrix(dense: dict, mamba: dict, ion: dict) -> dict[str, dict]:
    """The nine arms: three baselines and ionLlama with its five ablations, from base settings."""
    return {
        "dense": {"model": "dense", **dense},
        "bpe": {"model": "bpe", **dense, "vocab_size": 4096, "token_seq_div": 4},
        "mamba": {"model": "mamba", **mamba},
        "ionllama": dict(ion),
        "ionllama_dense_attn": {**ion, "attention": "dense"},
        "ionllama_tf_local": {**ion, "local_layers": "transformer"},
        "ionllama_fixed": {**ion, "patching": "fixed"},
        "ionllama_space": {**ion, "patching": "space"},
        "ionllama_byte": {**ion, "patching": "byte"},
    }


MATRICES: dict[str, dict[str, dict]] = {
    "phase1": _matrix(dense={"size": "tiny", "d_model": 384, "n_layers": 8, "n_heads": 6, "lr": 1e-3},
                      mamba={"size": "tiny", "d_model": 384, "n_layers": 16, "lr": 1e-3},
                      ion={"model": "ionllama", "size": "small", "lr": 1e-3, "entropy_frac": 0.06}),
    # every arm at the registry's `tiny` size (~5M parameters each, equal within 10 % but for BPE's
    # embeddings), for a CPU-scale run of the matrix: a quick, clearly smaller-scale look at the questions
    "cpu_tiny": _matrix(dense={"size": "tiny", "lr": 2e-3}, mamba={"size": "tiny", "lr": 2e-3, "n_layers": 12},
                        ion={"model": "ionllama", "size": "tiny", "lr": 2e-3, "entropy_frac": 0.06}),
}
ARMS = MATRICES["phase1"]
TASK_ARMS = ("ionllama", "dense", "bpe")
# --sweep: per arm, the base setting and these variants, each under --sweep_budget_s. Width (d_model) and
# depth (n_layers: the main stack; ionLlama's latent transformer) both ways: at a short budget a smaller
# model can win (more steps), at a long one a larger
SWEEP_VARIANTS = {"lr0.5x": {"lr_mult": 0.5}, "lr2x": {"lr_mult": 2.0}, "wide": {"width_mult": 4 / 3},
                  "narrow": {"width_mult": 3 / 4}, "deep": {"depth_mult": 4 / 3}, "shallow": {"depth_mult": 2 / 3}}
# ionLlama also has a byte-level part (local encoder / decoder) that the latent width and depth leave alone: at
# equal steps its arms trail dense bytes (phase1-7min.md), so the sweep also tries a wider and a deeper byte level
ION_SWEEP_VARIANTS = {"local_wide": {"local_width_mult": 1.5}, "local_deep": {"dec_layers_add": 2}}
MODEL_KEYS = ("d_model", "n_layers", "n_heads", "d_local", "n_enc_layers", "n_dec_layers", "attention",
              "local_layers", "patching", "threshold_mode", "max_patch_size", "target_patch_size", "ngram", "pooling",
              "vocab_size", "latent_shift", "dropout", "local_dropout", "fixed_patch_size", "entropy_chunk",
              "ngram_buckets", "ngram_sizes")


def sweep_variants(spec: dict) -> tuple[str, ...]:
    """The variants the sweep trains for an arm, base first."""
    extra = tuple(ION_SWEEP_VARIANTS) if spec["model"] == "ionllama" else ()
    return ("base", *SWEEP_VARIANTS, *extra)
NOMINAL_STEPS = 100_000  # schedule resolution of the time-based plan (steps never reach it)
WARMUP_FRAC = 0.02
JOINT_FRAC = 0.1
NEVER = 10 ** 9


def variant_parts(variant: str) -> list[str]:
    """'shallow+lr2x' -> ['shallow', 'lr2x']: a composed variant (the sweep's winners combined), each part a
    known variant and no two turning the same knob; a UserError names the problem."""
    known = {**SWEEP_VARIANTS, **ION_SWEEP_VARIANTS}
    parts = variant.split("+")
    bad = [p for p in parts if p not in known]
    if bad:
        raise UserError(f"unknown sweep variant(s) {bad} in '{variant}'; choose from base, {', '.join(known)} "
                        f"(combine with '+', e.g. shallow+lr2x)")
    knobs = [k for p in parts for k in known[p]]
    if len(parts) > 1 and len(set(knobs)) < len(knobs):
        raise UserError(f"sweep variant '{variant}' turns one knob twice; combine variants of different knobs")
    return parts


def variant_spec(spec: dict, variant: str) -> dict:
    if "+" in variant:  # applied one after the other: each part sees the previous parts' model
        for part in variant_parts(variant):
            spec = variant_spec(spec, part)
        return spec
    v = {**SWEEP_VARIANTS, **ION_SWEEP_VARIANTS}[variant]
    out = dict(spec)
    out["lr"] = spec["lr"] * v.get("lr_mult", 1.0)
    if v.keys() - {"lr_mult"}:
        from .config import make_config

        base = make_config(spec["size"], spec["model"], **{k: spec[k] for k in MODEL_KEYS if k in spec})
    if "width_mult" in v:
        d = max(64, int(math.floor(base.d_model * v["width_mult"] / 64 + 0.5)) * 64)  # multiples of 64 heads
        out["d_model"], out["n_heads"] = d, max(1, d // 64)
    if "depth_mult" in v:
        out["n_layers"] = max(1, int(math.floor(base.n_layers * v["depth_mult"] + 0.5)))
    if "local_width_mult" in v:
        out["d_local"] = max(64, int(math.floor(base.d_local * v["local_width_mult"] / 64 + 0.5)) * 64)
    if "dec_layers_add" in v:
        out["n_dec_layers"] = base.n_dec_layers + v["dec_layers_add"]
    return out


# ---------------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(f"[experiment] {msg}", flush=True)


def _now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_json(path: Path, obj) -> None:
    from .eval.benchmark import _clean

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1) + "\n")
    tmp.replace(path)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp_dtype):
    return torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def _split_path(pattern: str, split: str) -> str | None:
    """--data_path with '{split}' -> the file of another split (e.g. test), if it exists."""
    if "{split}" not in pattern:
        return None
    p = pattern.replace("{split}", split)
    return p if Path(p).exists() else None


# ---------------------------------------------------------------------------------- FLOPs


def _matmul_params(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def ssd_flops_per_position(model, chunk: int) -> float:
    """Training FLOPs of MambaByte's chunked scan per position: C.B scores (L x N), the masked score x input
    product (L x d_inner), chunk states and their read-out (2 x N x d_inner), per layer, x 6."""
    total = 0.0
    for blk in model.blocks:
        mx = blk.mixer
        total += 6 * (chunk * mx.d_state + chunk * mx.d_inner + 2 * mx.d_state * mx.d_inner)
    return total


def train_flops_per_byte(model, phase: str, seq_len: int, bytes_per_patch: float | None,
                         bytes_per_token: float | None) -> float:
    from .model.flops import flops_per_byte

    cfg = model.config
    if phase == "entropy":
        return 6.0 * _matmul_params(model.entropy_model)
    if cfg.model == "bpe":
        return flops_per_byte(model, seq_len) / float(bytes_per_token or 1.0)
    if cfg.model == "mamba":
        return flops_per_byte(model, seq_len) + ssd_flops_per_position(model, min(cfg.scan_chunk, seq_len))
    if cfg.model == "ionllama":
        f = flops_per_byte(model, seq_len, bytes_per_patch=float(bytes_per_patch or 1.0))
        if phase == "joint" and cfg.patching == "entropy":
            f += 4.0 * _matmul_params(model.entropy_model)  # trained again: 6 instead of 2
        return f
    return flops_per_byte(model, seq_len)


def add_flops(records: list[dict], model, seq_len: int, bytes_per_token: float | None) -> list[dict]:
    """Cumulative training FLOPs on every record (train records: bytes since the last one x FLOPs/byte of
    that window's phase and measured bytes/patch)."""
    out, cum, prev_bytes, last_bpp = [], 0.0, 0, None
    for r in records:
        r = dict(r)
        b = r.get("bytes_seen")
        if "loss" in r and isinstance(b, (int, float)) and r.get("phase") not in ("calibrate", "init"):
            bpp = r.get("bytes_per_patch") or last_bpp
            if r.get("phase") != "entropy" and r.get("bytes_per_patch"):
                last_bpp = r["bytes_per_patch"]
            cum += max(0, b - prev_bytes) * train_flops_per_byte(model, r.get("phase", "main"), seq_len, bpp,
                                                                 bytes_per_token)
            prev_bytes = b
        elif isinstance(b, (int, float)) and b < prev_bytes:  # a record from before a resume point
            prev_bytes = b
        r["train_flops"] = cum
        out.append(r)
    return out


# ---------------------------------------------------------------------------------- the time-based plan


class TimeBudgetPlan:
    """Wraps the trainer's PhasePlan: phase and learning rate at any step are those of the step
    ``total x spent / budget`` of the nominal plan, so the schedule follows training time. Training
    ends through the trainer's --max_train_time stop rule (set to the budget)."""

    def __init__(self, base, budget_s: float, clock):
        self.base, self.budget_s, self.clock = base, float(budget_s), clock
        self.total = NEVER  # the loop bound; time ends the run

    def __getattr__(self, name):  # lr, entropy_lr, warmup_steps, entropy_steps, main_steps, ...
        return getattr(self.base, name)

    def virtual_step(self) -> int:
        frac = max(0.0, self.clock()) / self.budget_s
        return min(self.base.total - 1, int(self.base.total * frac))

    def phase_of(self, step: int) -> str:
        return self.base.phase_of(self.virtual_step())

    def lr_at(self, step: int) -> float:
        return self.base.lr_at(self.virtual_step())

    def state_dict(self) -> dict:
        return {**self.base.state_dict(), "time_budget_s": self.budget_s}


def warm_up(tr) -> float:
    """One-time costs before the clock starts: CUDA/cuBLAS initialisation and torch.compile of the training
    graphs, so they do not eat into an arm's budget (compile time differs a lot between arms). Forward +
    backward on real batches in each configuration the run will use (ionLlama: entropy model frozen with a
    temporarily calibrated threshold - two batches with different patch counts, so the latent stack compiles
    for a dynamic length - and the joint configuration); no optimizer step, gradients dropped, threshold and
    freezing restored. Before this ran two batches of one padded patch count, the first main-phase step
    recompiled inside the measured time (19 s of a 75 s budget on an H200). With --step_graph, entropy and
    space patching run the frozen configuration as the two-stage step calls it (boundaries given, two
    bucketed latent lengths); the graph captures themselves (each after its warm-up steps) stay in the
    measured time, as for every arm with --step_graph."""
    m, dev = tr.model, tr.device
    t0 = time.perf_counter()
    configs = [None]
    saved = None
    if getattr(m, "needs_entropy_phase", False):
        saved = (m.entropy_threshold.detach().clone(), getattr(m, "_entropy_frozen", False))
        with torch.no_grad():
            m.calibrate_threshold(tr.sampler.get(0)[0].to(dev))
        configs = [True, False]
    from .train.step_graph import latent_bucket, static_step_shapes

    # the baselines share ModelConfig (and its default patching): only ionLlama's own patching counts here
    dynamic_patches = not static_step_shapes(m.config, tr.sampler.get(0)[0].shape[1])
    # --step_graph: the frozen-entropy (main-phase) step calls the forward with the boundaries and a bucketed
    # latent length (train/step_graph.py), a call torch.compile traces separately: warm that one up instead
    two_stage = dynamic_patches and bool(getattr(tr.args, "step_graph", False))
    try:
        for frozen in configs:
            if frozen is not None:
                m.freeze_entropy(frozen)
            for k in range(2 if frozen is not False else 1):
                x, y = tr.sampler.get(k)
                if k == 1 and dynamic_patches:
                    # a second, different patch count, so the latent stack compiles for a dynamic length
                    # now and not at the first new count in training (two real batches often round to one)
                    x = torch.full_like(x, ord(" "))  # space patching: a patch per byte
                    if saved is not None:
                        m.entropy_threshold.fill_(float("-inf"))  # entropy patching: a patch per byte
                tr.mark_step()
                x, y = x.to(dev), y.to(dev)
                with _autocast(dev, tr.amp_dtype):
                    kw = {}
                    if two_stage and frozen is not False:  # the step's stage A (as the step calls it), then its forward
                        with torch.no_grad():
                            starts, n = tr.stage_a("main")(x)
                        kw = {"patch_starts": starts, "latent_len": latent_bucket(int(n.max()), x.shape[1])}
                    out = tr.fwd(x, y, **kw)
                    loss = out["loss"] + (out["aux_loss"] if out.get("aux_loss") is not None else 0.0)
                loss.backward()
                if saved is not None and k == 1:
                    with torch.no_grad():
                        m.calibrate_threshold(tr.sampler.get(0)[0].to(dev))
    finally:
        for p in m.parameters():
            p.grad = None
        if saved is not None:
            m.entropy_threshold.copy_(saved[0])
            m.freeze_entropy(saved[1])
    _sync(dev)
    secs = time.perf_counter() - t0
    _log(f"warm-up (initialisation{' + torch.compile' if tr.args.compile else ''}, not training time): {secs:.1f} s")
    return secs


def make_budget_trainer(train_args, explicit: set[str], budget_s: float, curve_points: int, warmup: bool = True,
                        checkpoint_every_s: float | None = None):
    """The harness Trainer with the time-based plan and evaluations every budget / curve_points seconds of
    training (at the first log point after each mark, so the logged train_time_s is exact), and latest.pt
    saved at the first evaluation after every `checkpoint_every_s` training seconds (the trainer also saves
    it when stopped or signalled). Their time is removed from the training time. `warm_up` runs first."""
    from .train.trainer import Trainer

    class BudgetTrainer(Trainer):
        def __init__(self):
            super().__init__(train_args, explicit)
            self._seen, self._mark = self.train_time, None  # the clock starts with the first step
            self._tt_at_last_step = self.train_time
            self._boundary = False
            self.plan = TimeBudgetPlan(self.plan, budget_s, self._clock)
            self.eval_every = budget_s / max(1, curve_points)
            self.next_eval = (math.floor(self.train_time / self.eval_every + 1e-9) + 1) * self.eval_every
            self.next_save = self.train_time + (checkpoint_every_s or math.inf)

        def run(self):
            self.warmup_s = warm_up(self) if warmup else 0.0
            return super().run()

        def _clock(self) -> float:
            """Training seconds so far: the trainer's total (exact at its log points) + time since then."""
            if self.train_time != self._seen:  # the trainer just added a window at a log point
                self._seen, self._mark = self.train_time, time.perf_counter()
            if self._mark is None:
                return self.train_time
            return self.train_time + (time.perf_counter() - self._mark)

        def _shift(self, seconds: float) -> None:
            # time the trainer itself excludes (phase set-up, its evaluations) is not on the clock either
            if getattr(self, "_mark", None) is not None:
                self._mark += seconds

        def _enter_phase(self, phase: str, resumed: bool = False) -> None:
            t0 = time.perf_counter()
            super()._enter_phase(phase, resumed)
            self._shift(time.perf_counter() - t0)
            self._boundary = False

        def evaluate(self, phase_label: str) -> dict:
            t0 = time.perf_counter()
            res = super().evaluate(phase_label)
            self._shift(time.perf_counter() - t0)
            return res

        def _phase_end(self, phase: str) -> int:
            # a phase ends when the clock says so: the trainer then closes its time window with a log point
            return self.step if getattr(self, "_boundary", False) else NEVER

        def train_step(self, step: int):
            if self._mark is None:
                self._mark = time.perf_counter()
            self._clock()
            just_logged = self.train_time != self._tt_at_last_step
            if just_logged and self.phase != "entropy" and self.train_time >= self.next_eval:
                _sync(self.device)
                t0 = time.perf_counter()
                Trainer.evaluate(self, self.phase)  # the curve point (the clock is corrected below)
                if self.train_time >= self.next_save:
                    self.save("latest.pt")
                    self.next_save = self.train_time + checkpoint_every_s
                _sync(self.device)
                # the next mark is set from the clock at this point: advancing it after the correction
                # below re-armed it at once, so evaluations ran at two or three log points in a row
                while self.next_eval <= self.train_time + 1e-9:
                    self.next_eval += self.eval_every
                # evaluation is not training time: the trainer's current window includes it, so it is
                # taken off here and the window's end restores the true clock
                self.train_time -= time.perf_counter() - t0
                self._seen = self.train_time
            self._tt_at_last_step = self.train_time
            out = super().train_step(step)
            # after this step, does the clock put the run in the next phase? (checked as step + 1 == end)
            self._boundary = self.plan.base.phase_of(self.plan.virtual_step()) != self.phase
            return out

    return BudgetTrainer()


# ---------------------------------------------------------------------------------- arms


class Runner:
    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.a = args
        self.argv = argv
        self.out = Path(args.out)
        self.ckpt_dir = Path(args.ckpt_dir)
        self.t_start = time.perf_counter()
        self.command = "ionllama experiment " + " ".join(shlex.quote(x) for x in argv)
        if args.matrix not in MATRICES:
            raise UserError(f"unknown --matrix '{args.matrix}'; choose one of {', '.join(MATRICES)}")
        self.matrix = MATRICES[args.matrix]
        self.overrides = parse_overrides(args.override)
        # the sweep's runs: --from_sweep may read another results folder's sweep (a new setting on top of the
        # picks, e.g. --override dropout=0.1, written to its own --out so the picks' rows stay)
        self.sweep_dir = Path(args.sweep_dir) if getattr(args, "sweep_dir", None) else self.out / "sweep"

    # ------------------------------------------------------------------ arm list
    def arm_names(self) -> list[str]:
        if not self.a.arms:
            return list(self.matrix)
        names = [s.strip() for s in self.a.arms.split(",") if s.strip()]
        bad = [n for n in names if n not in self.matrix]
        if bad:
            raise UserError(f"unknown arm(s) {bad}; choose from {', '.join(self.matrix)}")
        return names

    def spec_of(self, arm: str, variant: str | None = None) -> dict:
        spec = dict(self.matrix[arm])
        if self.a.from_sweep and variant is None:
            best = self.best_sweep_variant(arm)
            if best:
                spec = variant_spec(spec, best) if best != "base" else spec
        if variant and variant != "base":
            spec = variant_spec(spec, variant)
        spec.update(self.overrides)
        return spec

    def sweep_subset(self) -> list[str]:
        """--sweep_variants: which variants this process trains (e.g. an arm's sweep split over two GPUs), and
        composed ones ('shallow+lr2x': the winners of single knobs combined)."""
        only = list(dict.fromkeys(s.strip() for s in (self.a.sweep_variants or "").split(",") if s.strip()))
        for v in only:
            if v != "base":
                try:
                    variant_parts(v)
                except UserError as e:
                    raise UserError(f"--sweep_variants: {e}") from None
        return only

    def trained_variants(self, arm: str) -> list[str]:
        """The arm's sweep variants, then any composed ones that have results in the sweep folder."""
        names = list(sweep_variants(self.matrix[arm]))
        for f in sorted(self.sweep_dir.glob(f"{arm}~*+*/final.json")):
            names.append(f.parent.name.split("~", 1)[1])
        return names

    def best_sweep_variant(self, arm: str) -> str | None:
        best = None
        for v in self.trained_variants(arm):
            f = _read_json(self.sweep_dir / f"{arm}~{v}" / "final.json")
            if f and f.get("val", {}).get("bpb") is not None and (best is None or f["val"]["bpb"] < best[1]):
                best = (v, f["val"]["bpb"])
        return best[0] if best else None

    def time_left(self) -> float:
        if self.a.deadline_s is None:
            return math.inf
        return self.a.deadline_s - (time.perf_counter() - self.t_start)

    # ------------------------------------------------------------------ trainer flags
    def seq_len_of(self, spec: dict) -> int:
        return max(8, self.a.seq_len // spec.get("token_seq_div", 1))

    @staticmethod
    def _capturable(spec: dict) -> bool:
        """Can this arm's main-phase step be captured (the trainer's own rule, train/step_graph.py)?"""
        from .config import make_config
        from .train.step_graph import capture_problem

        cfg = make_config(spec["size"], spec["model"], **{k: spec[k] for k in MODEL_KEYS if k in spec})
        return capture_problem(cfg, "main") is None

    def trainer_argv(self, run_name: str, spec: dict, budget_s: float) -> list[str]:
        a = self.a
        argv = ["--model", spec["model"], "--size", spec["size"]]
        for k in MODEL_KEYS:
            if k in spec and k != "vocab_size":
                argv += [f"--{k}", format_ngram_sizes(spec[k]) if k == "ngram_sizes" else str(spec[k])]
        if spec["model"] == "bpe" and "vocab_size" in spec:
            argv += ["--vocab_size", str(spec["vocab_size"])]
        argv += ["--data_path", a.data_path] if a.data_path else ["--dataset", a.dataset]
        seq = self.seq_len_of(spec)
        n_entropy = 0
        if spec["model"] == "ionllama" and spec.get("patching", "entropy") == "entropy":
            f = float(spec.get("entropy_frac", 0.06))
            n_entropy = max(1, int(round(NOMINAL_STEPS * f / (1 - f))))
        argv += ["--data_dir", a.data_dir, "--seq_len", str(seq), "--batch_size", str(a.batch_size),
                 "--grad_accum", str(a.grad_accum), "--lr", str(spec["lr"]), "--max_steps", str(NOMINAL_STEPS),
                 "--warmup_steps", str(int(NOMINAL_STEPS * WARMUP_FRAC)), "--entropy_steps", str(n_entropy),
                 "--joint_steps", str(int(NOMINAL_STEPS * JOINT_FRAC)) if n_entropy else "0",
                 "--max_train_time", str(budget_s), "--eval_interval", str(NEVER), "--save_interval", str(NEVER),
                 "--log_interval", str(a.log_interval), "--save_dir", str(self.ckpt_dir), "--run_name", run_name,
                 "--resume", "auto", "--sample_bytes", "0", "--seed", str(a.seed), "--device", a.device]
        if a.curve_eval_bytes:
            argv += ["--eval_bytes", str(a.curve_eval_bytes)]
        if a.eval_batch_size:
            argv += ["--eval_batch_size", str(a.eval_batch_size)]
        if a.mixed_precision:
            argv += ["--mixed_precision", a.mixed_precision]
        if a.compile:
            argv += ["--compile", "--compile_mode", a.compile_mode]
        if a.step_graph and self._capturable(spec):
            # entropy and space patching: the two-stage step in the main phase; the joint phase (entropy
            # model trained) runs without the graph, the trainer says so
            argv += ["--step_graph"]
        return argv

    # ------------------------------------------------------------------ one arm
    def run_arm(self, arm: str, out_dir: Path, spec: dict, budget_s: float, run_name: str) -> dict | None:
        final_path = out_dir / "final.json"
        if final_path.exists():
            _log(f"{run_name}: done already ({final_path}); skipped")
            return _read_json(final_path)
        need = budget_s + self.a.arm_overhead_s
        if self.time_left() < need:
            _log(f"{run_name}: not started ({self.time_left():.0f} s left before --deadline_s, an arm needs ~{need:.0f} s); "
                 "run the same command again to continue")
            return None
        from .train.cli import build_train_parser, explicit_args

        targv = self.trainer_argv(run_name, spec, budget_s)
        parser = build_train_parser()
        try:
            targs = parser.parse_args(targv)
        except SystemExit:
            raise UserError(f"arm {run_name}: the trainer rejected flags {targv}; a flag of this arm is not "
                            "supported by this version of the trainer") from None
        run_dir = self.ckpt_dir / run_name
        marker = run_dir / "experiment.json"
        state = _read_json(marker) or {}
        if state.get("trained") and (state.get("spec") != spec or state.get("budget_s") != budget_s):
            raise UserError(f"{run_dir} holds {run_name} trained with other settings ({state.get('spec')}, budget "
                            f"{state.get('budget_s')} s); delete {run_dir} to train it again with these")
        _log(f"{run_name}: {'evaluating (trained already)' if state.get('trained') else 'training'} "
             f"- ionllama train {' '.join(shlex.quote(x) for x in targv)}")
        if not state.get("trained"):
            tr = make_budget_trainer(targs, explicit_args(parser, targv), budget_s, self.a.curve_points,
                                     warmup=self.a.warmup, checkpoint_every_s=self.a.checkpoint_every_s)
            result = tr.run()
            if not result:
                raise UserError(f"{run_name}: the trainer returned no result; see its log above")
            model, device, amp = tr.model, tr.device, tr.amp_dtype
            state = {"trained": True, "spec": spec, "budget_s": budget_s, "step": tr.step,
                     "train_time_s": tr.train_time,
                     "warmup_s": getattr(tr, "warmup_s", None),
                     "bytes_seen": tr.bytes_seen, "train_bytes": tr.data_meta.get("train_bytes"),
                     "data": tr.data_meta}
            _write_json(marker, state)
            del tr
        else:
            from .train.checkpoint import load_model
            from .train.trainer import resolve_amp, resolve_device

            device = resolve_device(self.a.device)
            amp = resolve_amp(self.a.mixed_precision, device)
            model = load_model(run_dir / "latest.pt", device=device)
        final = self.evaluate_arm(arm, run_name, spec, model, device, amp, state, targv, run_dir, budget_s)
        self.write_arm_outputs(out_dir, run_dir, model, spec, final)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return final

    # ------------------------------------------------------------------ evaluation of one arm
    def eval_sets(self) -> list[tuple[str, str | None]]:
        """(name, path) of the extra evaluation sets: test (with --final_test) and --eval_data."""
        sets = []
        if self.a.final_test:
            p = _split_path(self.a.data_path or "", "test")
            if p is None:
                raise UserError("--final_test needs a --data_path with '{split}' and a test file next to train/val")
            sets.append(("test", p))
        for p in self.a.eval_data or []:
            if not Path(p).exists():
                raise UserError(f"--eval_data {p} does not exist; give a text/jsonl(.xz) file or a directory")
            sets.append((Path(p).name.split(".")[0], p))
        return sets

    def _byte_set(self, name: str, path: str | None, val: np.ndarray | None) -> np.ndarray:
        """The bytes of an evaluation set, starting with DOC_SEP (so byte and token models score the same
        bytes: all but the first), capped at --eval_bytes scored bytes."""
        from .data import DOC_SEP

        if path is None:
            data = val
        else:
            from .eval.loading import read_eval_bytes

            data = read_eval_bytes(path)
            if data[0] != DOC_SEP:
                data = np.concatenate([np.array([DOC_SEP], dtype=np.uint8), data])
        if self.a.eval_bytes is not None:
            data = data[: self.a.eval_bytes + 1]
        return data

    def _bpb(self, model, data: np.ndarray, seq_len: int, device, amp, shard_tokens=None) -> dict:
        t0 = time.perf_counter()
        if getattr(model, "token_level", False):
            from .data.bpe import evaluate_token_bpb

            toks = shard_tokens if shard_tokens is not None else model.bpe.encode(data)
            r = evaluate_token_bpb(model, toks, seq_len, self.a.eval_batch_size or self.a.batch_size, device, amp)
            r["bytes_per_patch"] = r.pop("bytes_per_token")
        else:
            from .eval.bpb import evaluate_bpb

            r = dict(evaluate_bpb(model, data, seq_len, self.a.eval_batch_size or self.a.batch_size, device,
                                  amp_dtype=amp))
        r["seconds"] = time.perf_counter() - t0
        return r

    def evaluate_arm(self, arm, run_name, spec, model, device, amp, state, targv, run_dir, budget_s) -> dict:
        from .data.shards import open_shards
        from .eval.benchmark import device_info, git_commit

        data_dir = Path(state["data"]["path"]) if state.get("data", {}).get("path") else None
        if data_dir is None:
            raise UserError(f"{run_name}: the trained run records no data folder; delete {run_dir} and run again")
        shards = open_shards(data_dir)
        seq = self.seq_len_of(spec)
        val = self._byte_set("val", None, np.asarray(shards.val))
        shard_tokens = None
        if getattr(model, "token_level", False) and self.a.eval_bytes is None:
            tok_dir = state["data"].get("token_dir")
            if tok_dir:
                from .data.bpe import open_token_shards

                ts = open_token_shards(tok_dir)
                if ts.bpe.to_str() == model.bpe.to_str():
                    shard_tokens = ts.val
        model.eval()
        _log(f"{run_name}: final evaluation on {len(val) - 1:,} val bytes")
        res = {"val": self._bpb(model, val, seq, device, amp, shard_tokens)}
        for name, path in self.eval_sets():
            data = self._byte_set(name, path, None)
            _log(f"{run_name}: evaluating {name} ({len(data) - 1:,} bytes of {path})")
            res[name] = self._bpb(model, data, seq, device, amp)
            res[name]["path"] = path
        params = model.count_parameters()
        emb = sum(v for k, v in params.items() if k in ("embed",))
        bpt = state["data"].get("bytes_per_token")
        train_bytes = state["data"].get("train_bytes") or len(shards.train)
        records = self._trainer_records(run_dir)
        flops = add_flops(records, model, seq, bpt)[-1]["train_flops"] if records else None
        bytes_seen = state["bytes_seen"]
        cfg = model.config.to_dict()
        return {
            "arm": arm, "run": run_name, "model": spec["model"], "spec": spec, "model_config": cfg,
            "params": params["total"], "params_non_embedding": params["total"] - emb, "params_by_part": params,
            **res,
            "bytes_per_patch": res["val"].get("bytes_per_patch"),
            "train": {"budget_s": budget_s, "train_time_s": state["train_time_s"], "steps": state["step"],
                      "warmup_s_excluded": state.get("warmup_s"), "compile": bool(self.a.compile),
                      "step_graph": "--step_graph" in targv,
                      "bytes_seen": bytes_seen, "bytes_per_s": bytes_seen / max(state["train_time_s"], 1e-9),
                      "epochs": bytes_seen / max(train_bytes, 1), "train_flops": flops,
                      "seq_len": seq, "batch_size": self.a.batch_size * self.a.grad_accum,
                      "seq_len_unit": "tokens" if spec["model"] == "bpe" else "bytes", "bytes_per_token": bpt,
                      "schedule": f"time-based: warmup {WARMUP_FRAC:.0%}, cosine to 10% over the budget"
                                  + (f", entropy model first {spec.get('entropy_frac', 0.06):.0%}, joint last "
                                     f"{JOINT_FRAC:.0%}" if spec["model"] == "ionllama" and
                                     spec.get("patching", "entropy") == "entropy" else "")},
            "data": {"path": self.a.data_path or self.a.dataset, "shards": str(data_dir),
                     "train_bytes": train_bytes, "val_bytes": len(shards.val),
                     "eval_bytes_cap": self.a.eval_bytes},
            "command": self.command,
            "trainer_command": "ionllama train " + " ".join(shlex.quote(x) for x in targv),
            "device": device_info(device), "date": _now_iso(), "git": git_commit(),
        }

    def _trainer_records(self, run_dir: Path) -> list[dict]:
        from .train.metrics import metrics_file, read_metrics

        return read_metrics(run_dir) if metrics_file(run_dir) else []

    def write_arm_outputs(self, out_dir: Path, run_dir: Path, model, spec: dict, final: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        recs = add_flops(self._trainer_records(run_dir), model, final["train"]["seq_len"],
                         final["train"]["bytes_per_token"])
        last_flops = recs[-1]["train_flops"] if recs else None
        recs.append({"step": final["train"]["steps"], "phase": "final", "bytes_seen": final["train"]["bytes_seen"],
                     "train_time_s": final["train"]["train_time_s"], "train_flops": last_flops,
                     **{f"val_{k}": v for k, v in final["val"].items() if isinstance(v, (int, float))}})
        with open(out_dir / "metrics.jsonl.tmp", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        (out_dir / "metrics.jsonl.tmp").replace(out_dir / "metrics.jsonl")
        cfg = _read_json(run_dir / "config.json")
        if cfg is not None:
            _write_json(out_dir / "config.json", cfg)
        _write_json(out_dir / "final.json", final)
        t = final["train"]
        _log(f"{final['run']}: val bpb {final['val']['bpb']:.4f} over {final['val']['bytes']:,} bytes; "
             f"{t['steps']} steps in {t['train_time_s']:.0f} s ({t['bytes_per_s'] / 1e6:.2f} MB/s); "
             f"-> {out_dir / 'final.json'}")

    # ------------------------------------------------------------------ stages
    def prepare(self, eval_sets: bool = True) -> None:
        """Byte shards, the token shards of the token arms and the extra evaluation sets, without training
        (the first call on a fresh machine; later arms then start training at once)."""
        from .data.shards import DataArgs, prepare

        t0 = time.perf_counter()
        byte_dir = prepare(DataArgs(dataset=self.a.dataset, data_path=self.a.data_path, data_dir=self.a.data_dir),
                           log=_log)
        for arm in self.arm_names():
            spec = self.spec_of(arm)
            if spec["model"] == "bpe":
                from .data.bpe import DEFAULT_VOCAB, prepare_tokens

                prepare_tokens(byte_dir, int(spec.get("vocab_size", DEFAULT_VOCAB)), log=_log)
        for name, path in (self.eval_sets() if eval_sets else []):
            _log(f"eval set {name}: {len(self._byte_set(name, path, None)) - 1:,} bytes from {path}")
        _log(f"data ready in {time.perf_counter() - t0:.0f} s")

    def pretrain(self) -> None:
        for arm in self.arm_names():
            spec = self.spec_of(arm)
            self.run_arm(arm, self.out / arm, spec, self.a.budget_s, arm)

    def sweep(self) -> None:
        budget = self.a.sweep_budget_s or self.a.budget_s
        only = self.sweep_subset()
        composed = [v for v in only if "+" in v]
        for arm in self.arm_names():
            for v in (*sweep_variants(self.matrix[arm]), *composed):
                if only and v not in only:
                    continue
                if any(p not in sweep_variants(self.matrix[arm]) for p in v.split("+")):
                    _log(f"{arm}~{v}: not a variant of this arm (its model has no such knob); skipped")
                    continue
                name = f"{arm}~{v}"
                self.run_arm(arm, self.sweep_dir / name, self.spec_of(arm, v), budget, name)

    def tasks(self) -> None:
        arms = [s.strip() for s in (self.a.task_arms or ",".join(TASK_ARMS)).split(",") if s.strip()]
        for arm in arms:
            if arm not in self.matrix:
                raise UserError(f"--task_arms: unknown arm '{arm}'; choose from {', '.join(self.matrix)}")
            out = self.out / arm / "tasks.json"
            if out.exists():
                _log(f"{arm}: task results exist ({out}); skipped")
                continue
            if self.time_left() < self.a.task_time_s:
                _log(f"{arm}: task stage not started (too little time before --deadline_s); run again to continue")
                return
            ck = self.ckpt_dir / arm / "latest.pt"
            if not ck.is_file():
                _log(f"{arm}: no checkpoint {ck} (train the arm first on this machine); task stage skipped")
                continue
            from .train.checkpoint import load_model
            from .train.trainer import resolve_amp, resolve_device

            device = resolve_device(self.a.device)
            amp = resolve_amp(self.a.mixed_precision, device)
            model = load_model(ck, device=device)
            res = run_task_stage(model, device, amp, self.a)
            res.update({"arm": arm, "checkpoint": str(ck), "command": self.command, "date": _now_iso(),
                        "device": _device_info(device), "git": _git()})
            _write_json(out, res)
            acc = ", ".join(f"{t} {_fmt(r['accuracy'], 2)}" for t, r in res["results"]["per_task"].items())
            _log(f"{arm}: task accuracy (test split) {acc} -> {out}")


def _device_info(device):
    from .eval.benchmark import device_info

    return device_info(device)


def _git():
    from .eval.benchmark import git_commit

    return git_commit()


def parse_overrides(items: list[str] | None) -> dict:
    """--override d_model=64 --override lr=3e-3 -> typed values for every arm (tests, quick checks)."""
    out = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            if "=" not in part:
                raise UserError(f"--override '{part}' is not KEY=VALUE; e.g. --override d_model=64")
            k, v = part.split("=", 1)
            if k not in MODEL_KEYS + ("lr", "size", "entropy_frac", "token_seq_div"):
                raise UserError(f"--override: unknown key '{k}'; valid: {', '.join(MODEL_KEYS)}, lr, size, entropy_frac")
            if k == "ngram_sizes":  # "3-8" or "2+3+5" -> a tuple
                out[k] = parse_ngram_sizes(v)
                continue
            for cast in (int, float):
                try:
                    v = cast(v)
                    break
                except ValueError:
                    continue
            out[k] = v
    return out


# ---------------------------------------------------------------------------------- task stage


def task_examples(seed: int, step: int, n: int) -> list:
    """The task examples of fine-tuning step `step`: the same for every arm (a pure function of seed, step)."""
    from .data import tasks as T

    rng = np.random.default_rng([seed, step, 0x7A5D])
    return [T.sample_example(rng, T.TASKS[int(rng.integers(len(T.TASKS)))], "train") for _ in range(n)]


def pack_examples(pieces: list[tuple[list[int], list[int]]], sep: int, row_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[(prompt ids, answer ids incl. newline)] -> rows `sep p a sep p a ...` padded with sep; targets only
    on answers. Examples are never cut; as many rows as needed."""
    rows, masks, cur, cm = [], [], [sep], [False]
    for p, ans in pieces:
        if len(p) + len(ans) + 2 > row_len + 1:
            raise UserError(f"a task example needs {len(p) + len(ans) + 2} positions; raise --task_seq_len")
        if len(cur) + len(p) + len(ans) + 1 > row_len + 1:
            rows.append(cur)
            masks.append(cm)
            cur, cm = [sep], [False]
        cur += p + ans + [sep]
        cm += [False] * len(p) + [True] * len(ans) + [False]
    rows.append(cur)
    masks.append(cm)
    L = row_len + 1
    toks = torch.full((len(rows), L), sep, dtype=torch.long)
    tmask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        toks[i, :len(r)] = torch.tensor(r)
        tmask[i, :len(m)] = torch.tensor(m)
    y = torch.where(tmask[:, 1:], toks[:, 1:], torch.full_like(toks[:, 1:], -100))
    return toks[:, :-1], y


def task_batch(model, examples, row_len_bytes: int):
    from .data import DOC_SEP

    if getattr(model, "token_level", False):
        bpe = model.bpe
        pieces = []
        for e in examples:
            p, a = bpe.encode_docs([e.prompt, e.answer + b"\n"])
            pieces.append((p.tolist(), a.tolist()))
        return pack_examples(pieces, bpe.sep_id, max(16, row_len_bytes // 2))
    return pack_examples([(list(e.prompt), list(e.answer + b"\n")) for e in examples], DOC_SEP, row_len_bytes)


def run_task_stage(model, device, amp, a) -> dict:
    """Fine-tune on identical task examples for --task_steps steps, then held-out test accuracy."""
    from .eval.task_eval import run_tasks
    from .train.optim import make_adamw
    from .train.schedule import warmup_cosine

    if hasattr(model, "freeze_entropy"):
        model.freeze_entropy(True)  # patch boundaries as in pretraining
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw(model, params, a.task_lr, 0.1, device)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(a.task_steps):
        x, y = task_batch(model, task_examples(a.seed, step, a.task_batch), a.task_seq_len)
        lr = a.task_lr * warmup_cosine(step, a.task_steps, max(1, a.task_steps // 20))
        for g in opt.param_groups:
            g["lr"] = lr
        with _autocast(device, amp):
            out = model(x.to(device), y.to(device))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == a.task_steps - 1:
            losses.append({"step": step, "loss": float(out["loss"].detach())})
    train_s = time.perf_counter() - t0
    model.eval()
    results = run_tasks(model, device, n=a.task_n, max_digits=4, seed=1234, shots=0, trained_on_tasks=True,
                        split="test", batch_size=32, amp_dtype=amp)
    return {"fine_tuning": {"steps": a.task_steps, "examples_per_step": a.task_batch, "lr": a.task_lr,
                            "schedule": "AdamW, warmup 5% then cosine to 10%, grad clip 1.0",
                            "row_len": a.task_seq_len, "seed": a.seed, "seconds": train_s, "losses": losses,
                            "data": "ionllama.data.tasks train split, identical examples per step for every arm"},
            "results": results}


# ---------------------------------------------------------------------------------- report


def collect(out: Path, names: list[str]) -> dict:
    arms = {}
    for n in names:
        f = _read_json(out / n / "final.json")
        if f:
            t = _read_json(out / n / "tasks.json")
            if t:
                f["tasks"] = t
            arms[n] = f
    return arms


def _fmt(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def table_markdown(arms: dict, extra_sets: list[str]) -> str:
    slow = all(f["train"]["bytes_per_s"] < 1e5 for f in arms.values())  # CPU runs: KB/s, not 0.00 MB/s
    unit, div = ("KB/s", 1e3) if slow else ("MB/s", 1e6)
    head = ["arm", "params", "val BPB", *[f"{s} BPB" for s in extra_sets], "train s", "steps", unit,
            "bytes/patch", "epochs", "train FLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, f in sorted(arms.items(), key=lambda kv: kv[1]["val"]["bpb"]):
        t = f["train"]
        row = [n, f"{f['params'] / 1e6:.1f}M", _fmt(f["val"]["bpb"], 4),
               *[_fmt(f.get(s, {}).get("bpb"), 4) for s in extra_sets],
               f"{t['train_time_s']:.0f}", str(t["steps"]), f"{t['bytes_per_s'] / div:.2f}",
               _fmt(f.get("bytes_per_patch"), 2), f"{t['epochs']:.2f}", _fmt(t.get("train_flops"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def tasks_markdown(arms: dict) -> str:
    from .data import tasks as T

    have = {n: f["tasks"] for n, f in arms.items() if f.get("tasks")}
    if not have:
        return ""
    lines = ["| arm | " + " | ".join(T.TASKS) + " |", "|---|" + "---|" * len(T.TASKS)]
    for n, t in have.items():
        cells = []
        for task in T.TASKS:
            r = t["results"]["per_task"].get(task)
            if r is None or r.get("accuracy") is None:
                cells.append("—")
            else:
                lo, hi = r.get("ci95", (None, None))
                cells.append(f"{r['accuracy']:.3f} [{_fmt(lo)}, {_fmt(hi)}] (n={r['n']})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bpb_at(records: list[dict], key: str, x: float) -> float | None:
    """Val BPB at `key` (train_flops / train_time_s / step) = x, linear between the curve points around x
    (None when the run never got as far, or has no curve point before x)."""
    pts = sorted((r[key], r["val_bpb"]) for r in records
                 if isinstance(r.get("val_bpb"), (int, float)) and isinstance(r.get(key), (int, float))
                 and r.get("phase") != "entropy")
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


EQUAL_VIEWS = {  # summary key -> (metrics.jsonl field, final.json train field, what the column means)
    "equal_flops": ("train_flops", "train_flops", "training FLOPs"),
    "equal_steps": ("step", "steps", "optimizer steps"),
}


def equal_at(arms: dict, records_of, view: str) -> dict:
    """Every arm's val BPB at the total (FLOPs or steps) of the arm that used the least: the equal-compute
    and equal-steps views, read off each arm's curve."""
    key, train_key, _ = EQUAL_VIEWS[view]
    totals = {n: f["train"].get(train_key) for n, f in arms.items() if f["train"].get(train_key)}
    if len(totals) < 2:
        return {}
    x_star = min(totals.values())
    return {key: x_star, "arm": min(totals, key=totals.get),
            "val_bpb": {n: bpb_at(records_of(n), key, x_star) for n in totals}}


def equal_at_markdown(eq: dict, view: str) -> str:
    if not eq:
        return ""
    key, _, what = EQUAL_VIEWS[view]
    rows = sorted(eq["val_bpb"].items(), key=lambda kv: (kv[1] is None, kv[1] or 0.0))
    return "\n".join([f"Val BPB at equal {what} ({eq[key]:.3g}, the whole run of `{eq['arm']}`), "
                      "interpolated linearly between each arm's curve points (each scores the first "
                      "`--curve_eval_bytes` val bytes):", "", f"| arm | val BPB at equal {what} |", "|---|---|",
                      *[f"| {n} | {_fmt(v, 3)} |" for n, v in rows]])


def plot_curves(arms: dict, out: Path, records_of) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for x_key, fname, xlabel in (("train_time_s", "bpb_vs_time.png", "training time (s, evaluation excluded)"),
                                 ("train_flops", "bpb_vs_flops.png", "training FLOPs (estimate)")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        n = 0
        for name in arms:
            pts = [(r[x_key], r["val_bpb"]) for r in records_of(name)
                   if isinstance(r.get("val_bpb"), (int, float)) and r.get("phase") not in ("init", "entropy")
                   and isinstance(r.get(x_key), (int, float)) and r[x_key] > 0]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", ms=3, lw=1.5, label=name)
                n += 1
        if not n:
            plt.close(fig)
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val bits per byte")
        if x_key == "train_flops":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Phase 1: val BPB, one line per arm")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        made.append(out / fname)
    return made


BEGIN, END = "<!-- experiment-table:begin -->", "<!-- experiment-table:end -->"


def write_report(out: Path, names: list[str], command: str, label: str = "phase1") -> dict:
    from .train.metrics import metrics_file, read_metrics

    arms = collect(out, names)
    extra = sorted({k for f in arms.values() for k in f if isinstance(f.get(k), dict) and "bpb" in f[k]} - {"val"})
    summary = {"matrix": label, "arms": {n: {k: f.get(k) for k in ("params", "val", "train", "bytes_per_patch",
                                                                   "device", "date", "git", "command", "spec", *extra)}
                                         for n, f in arms.items()},
               "tasks": {n: f["tasks"]["results"]["per_task"] for n, f in arms.items() if f.get("tasks")},
               "missing": [n for n in names if n not in arms]}

    records = {n: read_metrics(out / n) if metrics_file(out / n) else []
               for n in arms}  # read once: the equal-FLOPs/-steps views and the plots all use them
    records_of = records.__getitem__

    views = {v: equal_at(arms, records_of, v) for v in EQUAL_VIEWS}
    summary.update({v: eq for v, eq in views.items() if eq})
    _write_json(out.parent / f"{out.name}.json", summary)
    if not arms:
        return summary
    plots = plot_curves(arms, out, records_of)
    devices = sorted({f["device"].get("name", "?") for f in arms.values()})
    dates = sorted({f["date"][:10] for f in arms.values()})
    commits = sorted({f["git"].get("sha", "?")[:10] for f in arms.values()})
    body = [BEGIN, "", f"Generated by `{command}` from {out}/*/final.json "
            f"(device: {', '.join(devices)}; dates: {', '.join(dates)}; commits: {', '.join(commits)}).", "",
            table_markdown(arms, extra), ""]
    for v, eq in views.items():
        if eq:
            body += [equal_at_markdown(eq, v), ""]
    t = tasks_markdown(arms)
    if t:
        body += ["Task accuracy after identical task fine-tuning (held-out test split, exact match, 95% Wilson CI):",
                 "", t, ""]
    body += [f"![{'val BPB vs training FLOPs' if 'flops' in p.name else 'val BPB vs training time'}]({out.name}/{p.name})"
             for p in plots]
    if summary["missing"]:
        body += ["", f"Not yet run: {', '.join(summary['missing'])}."]
    body += ["", END]
    md = out.parent / f"{out.name}.md"
    text = md.read_text() if md.exists() else f"# {label}\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + "\n".join(body) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(body) + "\n"
    md.write_text(text)
    (out / "table.md").write_text(body[2] + "\n\n" + table_markdown(arms, extra) + "\n"
                                  + (("\n" + t + "\n") if t else ""))  # body[2]: command, device, dates
    _log(f"report: {md} (table section), {out.parent / (out.name + '.json')}, plots {[p.name for p in plots]}")
    return summary


# ---------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from .train.cli import OneLineParser

    p = OneLineParser(prog="ionllama experiment", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", default="phase1", choices=sorted(MATRICES),
                   help="which arm table: phase1 (GPU sizes) or cpu_tiny (every arm at the tiny size)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the matrix's arms (default: all)")
    p.add_argument("--stage", default="pretrain",
                   help="comma list of prepare | pretrain | sweep | tasks | report (the report is rebuilt after "
                        "every invocation)")
    p.add_argument("--budget_s", type=float, default=420.0, help="training seconds per arm (evaluation excluded)")
    p.add_argument("--sweep", action="store_true", help="same as adding 'sweep' to --stage")
    p.add_argument("--sweep_budget_s", type=float, default=None, help="budget of each sweep run (default --budget_s)")
    p.add_argument("--sweep_variants", default=None,
                   help="comma-separated subset of the sweep's variants to train here (default: all); e.g. half an "
                        "arm's sweep on each of two GPUs. 'a+b' composes variants of different knobs (shallow+lr2x)")
    p.add_argument("--from_sweep", action="store_true", help="train each arm with its best sweep variant (val BPB)")
    p.add_argument("--sweep_dir", default=None,
                   help="the sweep's folder (default: <out>/sweep); e.g. --from_sweep with another --out reads the "
                        "picks of docs/results/phase1-sweep/sweep")
    p.add_argument("--out", default="docs/results/phase1", help="results folder (committed)")
    p.add_argument("--ckpt_dir", default="checkpoints/phase1", help="checkpoints (git-ignored)")
    p.add_argument("--deadline_s", type=float, default=None,
                   help="wall-clock seconds this invocation may use: no arm is started that would not finish")
    p.add_argument("--checkpoint_every_s", type=float, default=120.0,
                   help="save latest.pt at the first curve point after this many training seconds (0: only when "
                        "stopped or signalled)")
    p.add_argument("--arm_overhead_s", type=float, default=120.0,
                   help="expected seconds per arm beyond the budget (data, compile, evaluation) for --deadline_s")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data_path", default=None, help="e.g. '../shared/data/gutenberg/gutenberg-{split}.jsonl.xz'")
    g.add_argument("--dataset", default="builtin", help="used without --data_path")
    g.add_argument("--data_dir", default="data_cache")
    g.add_argument("--eval_bytes", type=int, default=None, help="cap on scored bytes per final evaluation (all arms)")
    g.add_argument("--curve_eval_bytes", type=int, default=2_000_000, help="val bytes per curve point")
    g.add_argument("--curve_points", type=int, default=8, help="val evaluations during training")
    g.add_argument("--final_test", action="store_true", help="also evaluate the test split ({split} = test)")
    g.add_argument("--eval_data", action="append", default=None,
                   help="extra evaluation data (e.g. ../shared/data/wikipedia/wikipedia-val.jsonl.xz); repeatable")
    g.add_argument("--eval_batch_size", type=int, default=None)
    g = p.add_argument_group("training (same for every arm)")
    g.add_argument("--seq_len", type=int, default=1024, help="bytes per window (token arms: / token_seq_div)")
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--grad_accum", type=int, default=1)
    g.add_argument("--mixed_precision", choices=("bf16", "fp16", "none"), default=None)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: on with CUDA)")
    g.add_argument("--compile_mode", choices=("default", "reduce-overhead"), default="default",
                   help="with --compile: reduce-overhead adds CUDA graphs (see ionllama train --help)")
    g.add_argument("--step_graph", action="store_true",
                   help="replay each arm's training step as one CUDA graph (ionllama train --step_graph), for the "
                        "arms that allow it (all: entropy and space patching as the two-stage step; their joint "
                        "phase runs uncaptured)")
    g.add_argument("--device", default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log_interval", type=int, default=10)
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile / initialise on real batches before the clock starts (default on)")
    g.add_argument("--override", action="append", default=None,
                   help="KEY=VALUE applied to every arm (e.g. d_model=64 n_layers=2 for a smoke test)")
    g = p.add_argument_group("task stage")
    g.add_argument("--task_arms", default=None, help=f"default: {','.join(TASK_ARMS)}")
    g.add_argument("--task_steps", type=int, default=600)
    g.add_argument("--task_batch", type=int, default=64, help="task examples per step")
    g.add_argument("--task_lr", type=float, default=3e-4)
    g.add_argument("--task_seq_len", type=int, default=256, help="bytes per packed row (tokens: half)")
    g.add_argument("--task_n", type=int, default=100, help="test examples per task (and per digit count)")
    g.add_argument("--task_time_s", type=float, default=240.0, help="expected seconds per task arm (--deadline_s)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.compile is None:
        a.compile = torch.cuda.is_available() and a.device in ("auto", "cuda") or a.device.startswith("cuda")
    if a.budget_s <= 0:
        raise UserError(f"--budget_s must be positive, got {a.budget_s}")
    stages = [s.strip() for s in a.stage.split(",") if s.strip()]
    if a.sweep and "sweep" not in stages:
        stages.insert(0, "sweep")
    bad = [s for s in stages if s not in ("prepare", "pretrain", "sweep", "tasks", "report")]
    if bad:
        raise UserError(f"unknown --stage {bad}; use prepare, pretrain, sweep, tasks, report")
    runner = Runner(a, argv)
    runner.eval_sets()  # validate paths before any training
    names = runner.arm_names()
    for s in stages:
        if s == "prepare":
            runner.prepare()
        elif s == "sweep" or (s == "report" and runner.sweep_dir.is_dir()):
            # --stage report rebuilds the sweep table too: one process per GPU each writes it for its own arms
            if s == "sweep":
                runner.sweep()
            write_report(runner.sweep_dir, [f"{n}~{v}" for n in names for v in runner.trained_variants(n)],
                         runner.command, label=f"{a.matrix} sweep")
        elif s == "pretrain":
            if "prepare" not in stages:
                runner.prepare(eval_sets=False)  # data first, so --deadline_s sees the arms' own time only
            runner.pretrain()
        elif s == "tasks":
            runner.tasks()
    write_report(runner.out, list(runner.matrix), runner.command, label=a.matrix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
