"""The training loop: phases (entropy model -> calibration -> main model -> joint fine-tuning), AdamW
with warmup + cosine, gradient accumulation, clipping, bf16 / fp16 + GradScaler / fp32, optional
torch.compile, byte-exact evaluation, metrics, atomic checkpoints, exact resume, SIGINT/SIGTERM.

Models opt into the phases through a small protocol (see ionllama/model/ionllama_model.py):
``needs_entropy_phase``, ``entropy_model(x, y) -> dict(loss, bpb, logits)``,
``calibrate_threshold(x) -> dict(threshold, bytes_per_patch)``, ``freeze_entropy(bool)``, and an
optional ``aux_loss`` in the forward output. Models without it (dense, ...) only run phase 'main'."""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import math
import os
import random
import shutil
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import ModelConfig, make_config
from ..data import DOC_SEP, DOC_SEP_BYTES
from ..data.bpe import TokenTraining, configure as token_configure, is_token_model
from ..devices import resolve_device  # (the benchmarks import it from here too)
from ..errors import UserError, check_not_blank, check_ranges, check_seed, first_line
from ..fsutil import probe_writable, process_gone, remove_if_empty
from ..model.common import eval_mode
from ..eval.bpb import LN2, evaluate_batches, evaluate_bpb
from ..registry import build_model, model_names, unused_options
from . import checkpoint as ckpt_io
from . import distributed
from .cli import MODEL_OVERRIDES
from .metrics import MetricsLogger
from .optim import add_params, make_adamw, no_decay_ids
from .schedule import DEFAULT_MIN_LR_RATIO, PhasePlan
from .step_graph import capture_problem, make_step_graph, stage_a_for, step_graph_problem

# an entropy model scoring above this on val has not learned even byte frequencies (uniform: 8 bits/byte; English
# byte unigrams: ~4.5)
UNTRAINED_ENTROPY_BPB = 7.5
DEFAULT_LR = {"tiny": 1e-3, "small": 6e-4, "base": 3e-4, "large": 2e-4, "xl": 1.5e-4}
# flags that describe this invocation, not the run: a resumed run takes them from the command line
_PER_INVOCATION = {"resume", "stop_at", "max_train_time", "device", "run_name", "save_dir", "wandb", "compile", "step_graph",
                   "compile_stage_a", "benchmark_after", "sample_bytes", "sample_prompt", "data_dir",
                   "eval_batch_size", "parallel"}


def _same_file(a, b) -> bool:
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:  # either is gone: only equal strings are the same
        return False


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def resolve_amp(mixed_precision: str | None, device: torch.device) -> torch.dtype | None:
    if mixed_precision is None:  # auto
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mixed_precision]


def default_run_name(args, cap: int | None = 64) -> str:
    """cap: the data file stem's characters kept (a 250-byte file name made a run folder name no filesystem takes);
    None: uncut, the name runs got before the cap (--resume auto looks there too)."""
    if args.data_path:
        tag = Path(args.data_path.replace("{split}", "")).name.split(".")[0] or "data"
        tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag).strip("_-")[:cap] or "data"
    else:
        tag = args.dataset
    return f"{args.model}-{args.size}-{tag}"


def _reads_same_data(ck: Path, args) -> bool:
    """Was the checkpoint's run started on the data this command names (--data_path or --dataset, --text_field)?
    Its train arguments only (an mmap'd load reads no weights); True when they cannot be read: the choice then
    falls back to the newest, whose load says what is wrong with it."""
    state = distributed.checkpoint_header(ck)
    if state is None:
        return True
    saved = state.get("train_args") or {}
    if saved.get("text_field", "text") != getattr(args, "text_field", "text"):
        return False
    if args.data_path or saved.get("data_path"):
        a, b = args.data_path or "", saved.get("data_path") or ""
        return a == b or (bool(a) and bool(b) and os.path.abspath(a) == os.path.abspath(b))
    return saved.get("dataset") == args.dataset


def _has_checkpoints(d: Path) -> bool:
    return distributed.has_checkpoints(d)  # *.pt files or sharded *.dcp folders


def resolve_run(args) -> tuple[Path, Path | None]:
    """-> (run folder, checkpoint to resume or None). Never picks a folder whose checkpoints a fresh run
    would overwrite."""
    base = Path(args.save_dir)
    if args.run_name is not None and (Path(args.run_name).name != args.run_name or args.run_name in ("", ".", "..")):
        raise UserError(f"--run_name {args.run_name!r} must be a plain folder name (no '/', '.' or '..'); the "
                        "parent folder is --save_dir")
    if args.resume and args.resume != "auto":
        ck = Path(args.resume)
        if ck.is_dir() and not distributed.is_sharded_checkpoint(ck):  # a run folder: its latest checkpoint
            ck = distributed.latest_checkpoint(ck) or ck / "latest.pt"
        if not (ck.is_file() or distributed.is_sharded_checkpoint(ck)):
            given = Path(args.resume)
            if given.is_dir() and (given.suffix == distributed.DCP_SUFFIX or (given / ".metadata").is_file()):
                # a sharded checkpoint missing a part: it was taken for a run folder, "X.dcp/latest.pt" named
                missing = [n for n in (".metadata", distributed.TRAIN_STATE_FILE) if not (given / n).is_file()]
                raise UserError(f"--resume {given}: this sharded checkpoint has no {' / '.join(missing)} (damaged "
                                "or not fully copied); resume from another checkpoint of the run (an older "
                                "step_N.dcp) or use --resume auto")
            raise UserError(f"--resume {ck}: no such checkpoint; check the path or use --resume auto")
        rd = base / args.run_name if args.run_name else ck.parent
        if rd.resolve() != ck.parent.resolve() and _has_checkpoints(rd):
            # another run's folder: its latest.pt / best.pt / step_N.pt were overwritten by this branch's saves and its
            # metrics cut back to the resumed step, with no copy kept
            raise UserError(f"--run_name {args.run_name}: the run folder {rd} already holds checkpoints of another "
                            f"run; resume {ck} into a new --run_name, or continue that run with --resume auto")
        return rd, ck
    name = args.run_name or default_run_name(args)
    candidates = [base / name]
    if not args.run_name and base.is_dir():
        candidates += sorted((d for d in base.glob(f"{name}-*") if d.name[len(name) + 1:].isdigit()),
                             key=lambda d: int(d.name[len(name) + 1:]))
        uncut = default_run_name(args, cap=None)
        if uncut != name and len(uncut.encode()) <= 255:  # a run started before the cap, under its full stem
            candidates.append(base / uncut)
    if args.resume == "auto":
        found = [(ck, d) for d in candidates if (ck := distributed.latest_checkpoint(d)) is not None]
        if len(found) > 1:
            # name, name-2, ...: runs on other data can share a default name (en/train.txt and de/train.txt are
            # both "...-train"); the newest one was resumed on this data, and this run's folder was left
            found = [f for f in found if _reads_same_data(f[0], args)] or found
        if found:
            ck, rd = max(found, key=lambda f: distributed.checkpoint_mtime(f[0]))
            return rd, ck
        _say(f"--resume auto: no latest.pt or latest.dcp under {base / name}; starting a new run")
    if args.run_name:
        if _has_checkpoints(base / name):
            raise UserError(f"run folder {base / name} already holds checkpoints; pass --resume auto to continue it "
                            "or choose another --run_name")
        return base / name, None
    i = 1
    while True:
        rd = base / (name if i == 1 else f"{name}-{i}")
        if not _has_checkpoints(rd):
            return rd, None
        i += 1


def model_config_from_args(args) -> ModelConfig:
    """The model config the trainer's flags describe, or a one-line UserError; no data or model is touched (the
    experiment runner checks every arm's flags with it before the first arm trains)."""
    overrides = {k: getattr(args, k) for k in MODEL_OVERRIDES if getattr(args, k, None) is not None}
    if is_token_model(args.model) and overrides.get("vocab_size", 257) <= 256:  # was replaced by 4,096 silently
        raise UserError(f"--vocab_size {overrides['vocab_size']}: a byte-level BPE needs more than the 256 bytes "
                        "it starts from; e.g. --vocab_size 4096")
    if is_token_model(args.model) and overrides.get("vocab_size", 0) > 65536:  # refused only after the tokenizer
        raise UserError(f"--vocab_size {overrides['vocab_size']} must be at most 65536 (uint16 token shards); "
                        "e.g. --vocab_size 4096")
    return token_configure(make_config(args.size, args.model, **overrides))  # BPE: default vocabulary


def ensure_writable(run_dir: Path, save_dir: str) -> None:
    try:
        probe_writable(run_dir)
    except OSError as e:
        if Path(save_dir).is_dir() and run_dir.exists() and not run_dir.is_dir():  # the folder is fine, the name not
            raise UserError(f"the run folder {run_dir} is a file, not a folder; pass another --run_name or move "
                            f"that file away") from None
        if e.errno == errno.ENOSPC:  # the folder is fine: "choose a writable folder" misled
            raise UserError(f"no space left on the disk of --save_dir {save_dir}; free some, then run again (a "
                            "stopped run: the same command with --resume auto)") from None
        if run_dir.is_dir() and os.access(save_dir, os.W_OK):  # --save_dir is fine: the run folder itself is not
            raise UserError(f"cannot write to the run folder {run_dir} ({e.strerror or e}); make it writable, or pass "
                            "another --run_name") from None
        raise UserError(f"cannot write to --save_dir {save_dir} ({e.strerror or e}); choose a writable folder") from None
    for tmp in run_dir.glob(".*.tmp-*"):  # a save killed mid-write (SIGKILL) left its temp file: GBs for big models
        if tmp.is_file() and process_gone(tmp.name.rsplit("-", 1)[-1]):
            tmp.unlink(missing_ok=True)


class _EntropyLM(nn.Module):
    """The entropy model seen as an LM, so evaluate_bpb scores it during phase 1."""

    def __init__(self, entropy_model: nn.Module):
        super().__init__()
        self.entropy_model = entropy_model

    def forward(self, x, targets=None):
        out = self.entropy_model(x, targets)
        return {"loss": out["loss"], "bpb": out.get("bpb"), "n_patches": None}


class _StopSignal:
    """First SIGINT/SIGTERM: finish the current step, save latest.pt, exit. Second: stop at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        _say(f"\n{signal.Signals(signum).name}: finishing this step and saving latest.pt/.dcp (again to stop at once)")

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def sample_bytes(model: nn.Module, prompt: bytes, n: int, seq_len: int, device: torch.device, temperature: float = 0.8,
                 top_k: int = 40, seed: int = 0) -> bytes:
    """Generated continuation of `prompt` (stops at DOC_SEP). Uses the model's own generate when the
    generation module is installed, else a plain full-forward sampling loop."""
    if importlib.util.find_spec("ionllama.generation") is not None and hasattr(model, "generate"):
        try:
            torch.manual_seed(seed)
            out = model.generate(prompt, max_new_bytes=n, temperature=temperature, top_k=top_k)
            out = bytes(out.tolist() if torch.is_tensor(out) else out)
            if out.startswith(prompt) and len(out) > len(prompt):
                out = out[len(prompt):]
            cut = out.find(DOC_SEP_BYTES)
            return out if cut < 0 else out[:cut]
        except Exception as e:  # generation is another module's job: fall back rather than lose the run
            warnings.warn(f"model.generate failed ({type(e).__name__}: {e}); using the plain sampling loop", stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    ctx = list(prompt) or [DOC_SEP]
    out = []
    with eval_mode(model), torch.no_grad():  # each part's own mode back after, not only the top module's
        for _ in range(n):
            x = torch.tensor([ctx[-seq_len:]], dtype=torch.long, device=device)
            logits = model(x)["logits"][0, -1].float().cpu() / max(temperature, 1e-5)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            b = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            if b == DOC_SEP:
                break
            ctx.append(b)
            out.append(b)
    return bytes(out)


# the smallest value each numeric flag takes (None = not given, so the default rule applies): a negative step count
# or learning rate used to train something else without a word (e.g. --entropy_steps -1), or fail deep in torch
AT_LEAST = {"seq_len": 2, "batch_size": 1, "grad_accum": 1, "max_steps": 1, "eval_interval": 1, "log_interval": 1,
            "eval_bytes": 1, "eval_batch_size": 1, "save_interval": 1, "warmup_steps": 0, "entropy_steps": 0,
            "joint_steps": 0, "stop_at": 0, "sample_bytes": 0, "weight_decay": 0, "grad_clip": 0}
ABOVE_ZERO = ("lr", "entropy_lr", "max_train_time")
AT_MOST = dict.fromkeys(("seq_len", "batch_size", "grad_accum", "eval_batch_size"), 2 ** 31 - 1)  # array dims


class Trainer:
    refuse_spent_time = True  # a resume whose --max_train_time is spent: an error (False: return at once, no save)
    phases_by_step = True  # a resumed step must not fall back a phase under these step counts (False: the phases
    # follow something else, as the experiment's time budget, and the checkpoint's phase stands)

    def __init__(self, args: argparse.Namespace, explicit: set[str] | None = None, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        explicit = set(vars(args)) if explicit is None else explicit
        if args.model not in model_names():
            raise UserError(f"unknown model '{args.model}'; choose one of {', '.join(model_names())}")
        if getattr(args, "compile_mode", "default") != "default" and (not args.compile or world_size > 1):
            raise UserError(f"--compile_mode {args.compile_mode} needs --compile and one process (CUDA graphs are "
                            "not combined with DDP/FSDP here); add --compile, or drop --compile_mode under torchrun")
        if getattr(args, "compile_stage_a", "auto") == "on" and not getattr(args, "step_graph", False):
            raise UserError("--compile_stage_a on needs --step_graph (stage A is the captured step's first stage); "
                            "add --step_graph, or drop --compile_stage_a")
        check_ranges(args, AT_LEAST, ABOVE_ZERO, AT_MOST)
        if isinstance(args.data_path, str) and not args.data_path.strip() and "dataset" in explicit:
            # --data_path '' beside a given --dataset: no file (the way to drop a resumed run's data path); alone it
            # is an unset "$DATA" and is refused below (it trained on --dataset builtin without a word)
            args.data_path = None
        check_not_blank(args, ("save_dir", "data_dir", "data_path"))
        check_seed(getattr(args, "seed", None))

        # ---- run folder and the checkpoint to resume
        self.dist = distributed.context()
        self.run_dir, ck_path = self.dist.on_main(lambda: resolve_run(args))  # one answer for all ranks
        self.ck = None
        self._resume_notes: list[str] = []
        if ck_path is not None:
            self.ck = ckpt_io.load_checkpoint(ck_path, map_location="cpu")
            args = self._merge_resume_args(args, self.ck.get("train_args", {}), explicit)
            distributed.keep_global_batch(args, self.ck, world_size, explicit, _say)
        self.args = args
        # rank 0 alone: every rank made the folder and its probe file, and a refused run's clean-up (rank 0's) raced
        # another rank's mkdir, leaving an empty run folder behind
        self.dist.on_main(lambda: ensure_writable(self.run_dir, args.save_dir))

        # ---- model config (validated before any data work)
        if self.ck is not None:  # before the config: its refusal of a flag the model lacks hid the real mistake
            self._check_same_kind(ck_path, args.model, args.size)
        self.config = model_config_from_args(args)
        if self.ck is not None:
            self._check_config_matches(ck_path)
        self._check_entropy_checkpoint()
        for note in self._resume_notes:
            _say(note)

        # ---- device, precision, seeds
        self.device = resolve_device(args.device)
        self.amp_dtype = resolve_amp(args.mixed_precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)

        self.par = distributed.Parallel(self.dist, distributed.resolve_parallel(
            getattr(args, "parallel", "auto"), args.size, self.dist), self.device, self.amp_dtype)

        # ---- data
        with self.dist.main_first():  # rank 0 builds the shard cache, the others then reuse it
            self._setup_data()

        # ---- model
        self.model = build_model(self.config).to(self.device)
        if self.tokens is not None:
            self.tokens.attach(self.model)  # the tokenizer travels in the token model's state dict
        if self.ck is not None and self.ck["model"] is not None:  # sharded checkpoints load in _restore
            ckpt_io.load_model_state(self.model, self.ck["model"], str(ck_path))
        elif self.ck is None and getattr(args, "entropy_checkpoint", None):  # (a resume has them in its weights)
            self._load_entropy_model(args.entropy_checkpoint)
        self.model = self.par.shard(self.model)  # FSDP2: in place, before the optimizer exists
        if self.rank != 0:  # weights are rank 0's (DDP / FSDP broadcast them); dropout masks are each rank's own:
            torch.manual_seed(rank_seed(args.seed, self.rank))  # seeded alike, N ranks drew one mask for N shards
        mode = getattr(args, "compile_mode", "default")
        if mode == "reduce-overhead" and not getattr(self.model, "cuda_graph_training_ok", True):
            # measured on an H200 (docs/results/train-profile.md): CUDA-graph replay of the training step fails
            # ("tensor(s) in the cudagraph pool not tracked as outputs"), with or without the patch-count sync
            raise UserError(f"--compile_mode reduce-overhead does not work with --model {args.model}: CUDA-graph "
                            "replay of its training step fails; use --compile alone")
        self.cuda_graphs = bool(args.compile) and mode == "reduce-overhead"
        self.fwd = torch.compile(self.model, mode=None if mode == "default" else mode) if args.compile else self.model
        self.par.attach(self.model, self.fwd)
        self.step_graph = None  # the captured training step (step_graph.py), made at a phase's first step
        csa = getattr(args, "compile_stage_a", "auto")
        self.compile_stage_a = csa == "on" or (csa == "auto" and bool(args.compile))
        self._compiled_stage_a = None  # made once (stage_a), shared by the compile warm-up and every phase's step
        self.graph_problem = None  # why this phase's step is not captured (capture_problem), with --step_graph
        if getattr(args, "step_graph", False):
            problem = step_graph_problem(self.model, args, self.device, world_size, self.amp_dtype)
            if problem:
                raise UserError(problem)
        has_entropy = bool(getattr(self.model, "needs_entropy_phase", False))
        self._keep_resumed_plan(args, explicit or set())
        unused = [f"--{k}" for k in ("entropy_steps", "joint_steps", "entropy_lr") if k in explicit
                  and getattr(args, k, None) not in (None, 0) and not has_entropy and self.ck is None]
        if unused and self.is_main:  # taken without a word before: a user believed the run had a joint phase
            what = f"--model {args.model}" + (f" with --patching {self.config.patching}"
                                              if args.model == "ionllama" else "")
            _say(f"note: {' and '.join(unused)} have no effect: {what} has no entropy model to train, so it trains the "
                 "main phase only")
        default_e = 0 if getattr(args, "entropy_checkpoint", None) else args.max_steps // 3
        E = (args.entropy_steps if args.entropy_steps is not None else default_e) if has_entropy else 0
        J = (args.joint_steps if args.joint_steps is not None else args.max_steps // 10) if has_entropy else 0
        if has_entropy and E == 0 and self.ck is None and not getattr(args, "entropy_checkpoint", None) \
                and self.is_main:  # (ran without a word: calibration on random weights still gives a healthy ratio)
            _say("note: --entropy_steps 0 without --entropy_checkpoint: the entropy model that places the patch "
                 f"boundaries is untrained{' until the joint phase' if J else ''}, so patches follow noise and the "
                 "--max_patch_size cap; train it (--entropy_steps N) or load one (--entropy_checkpoint PATH)")
        if J >= args.max_steps:  # the joint phase is the end of --max_steps: nothing would be left for the main phase
            raise UserError(f"--joint_steps {J} leaves none of --max_steps {args.max_steps} to the main phase; "
                            f"lower --joint_steps below {args.max_steps}")
        warmup = args.warmup_steps if args.warmup_steps is not None else max(1, min(1000, args.max_steps // 10))
        min_lr_ratio = getattr(args, "min_lr_ratio", DEFAULT_MIN_LR_RATIO)  # (runs saved before the flag: its value)
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise UserError(f"--min_lr_ratio {min_lr_ratio} is not in [0, 1]: the cosine ends at lr x this ratio")
        self.plan = PhasePlan(entropy_steps=E, max_steps=args.max_steps, joint_steps=J,
                              lr=args.lr if args.lr is not None else DEFAULT_LR[args.size],
                              entropy_lr=args.entropy_lr, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)
        self.save_interval = args.save_interval or max(1, self.plan.total // 2)
        if args.eval_interval is None:  # about 4 evaluations per run, at least every 500 steps
            args.eval_interval = max(1, min(500, self.plan.total // 4))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.optimizer: torch.optim.Optimizer | None = None
        self.phase: str | None = None
        self.step = 0
        self.bytes_seen = 0
        self.train_time = 0.0
        self.host_s = 0.0  # host seconds inside train_step since the last log point
        # seconds a subclass took off the training time inside the current window (the experiment's curve
        # evaluations): the window's bytes/s leaves them out too, as train_time does
        self.window_excluded_s = 0.0
        # a plain run stopped early does not recalibrate, so that its resume replays a straight run; the
        # experiment's arms (experiment/budget.py) end by a stop, and their last save is what they are scored on
        self.recalibrate_at_stop = False
        self.best_val_bpb = math.inf
        self.saved_step: int | None = None  # the step latest.pt holds (None: nothing written by or for this run)
        self.stop_reason: str | None = None  # request_stop(): ends the run after the current step, saving latest.pt
        self.metrics = MetricsLogger(self.run_dir, use_wandb=args.wandb and self.is_main, run_name=self.run_dir.name,
                                     config={**vars(args), "model_config": self.config.to_dict()}) \
            if self.is_main else None
        # a fresh run, or a checkpoint resumed into another folder (resolve_run allows one without checkpoints): the
        # points already there are not this run's, nor to delete (the resume cut them back to its step)
        foreign = self.ck is None or Path(ck_path).parent.resolve() != self.run_dir.resolve()
        if self.metrics is not None and foreign:
            moved = self.metrics.set_aside()
            if moved is not None:
                _say(f"note: {self.run_dir} held the metrics of an earlier run that wrote no checkpoint; moved to "
                     f"{moved.name}")
        if self.ck is not None:
            self._restore(self.ck, ck_path)
            self.ck = None  # free the CPU copy

    # ------------------------------------------------------------------ set-up helpers
    def _resume_hint(self) -> str:
        """The flags that find this run again: --save_dir when the run folder is not under the default (the hint
        without it started a new default run elsewhere; a run resumed from --resume PATH lives next to PATH), the
        run's name, and --data_dir when not the default (it is per invocation: without it the data was prepared
        again into data_cache/); the other settings come back from the checkpoint."""
        hint = "--resume auto"
        if self.run_dir.parent != Path("checkpoints"):
            hint += f" --save_dir {shlex.quote(str(self.run_dir.parent))}"
        hint += f" --run_name {shlex.quote(self.run_dir.name)}"  # the default name depends on other flags
        if getattr(self.args, "data_dir", "data_cache") != "data_cache" and self.data_meta.get("path"):
            hint += f" --data_dir {shlex.quote(str(self.args.data_dir))}"
        if self.par.mode == "fsdp" and getattr(self.args, "parallel", "auto") == "fsdp":
            # per invocation, so not restored: without it a torchrun resume of a small model went back to DDP
            hint += " --parallel fsdp"
        return hint

    def _note_other_data(self) -> None:
        """A resumed run whose shards differ from the checkpoint's (edited files, another --data_path) goes on,
        as fine-tuning on new text may be meant, but says so: silently it would mix two corpora in one curve."""
        old = ((self.ck or {}).get("data_position") or {})
        changed = [s for s in ("train", "val") if old.get(f"{s}_sha256") not in (None, self.data_meta[f"{s}_sha256"])]
        if changed and self.is_main:
            _say(f"note: resuming on other data than the checkpoint's ({' and '.join(changed)} split changed: "
                 f"{old.get('train_bytes', 0):,} / {old.get('val_bytes', 0):,} train / val bytes then, "
                 f"{self.data_meta['train_bytes']:,} / {self.data_meta['val_bytes']:,} now); pass the same "
                 "--data_path to continue the same run")

    def _merge_resume_args(self, args, saved: dict, explicit: set[str]):
        merged = argparse.Namespace(**vars(args))
        ignored = set(unused_options(saved.get("model") or args.model, MODEL_OVERRIDES))
        saved = dict(saved)
        cfg = (self.ck or {}).get("model_config") or {}
        for k in MODEL_OVERRIDES:  # a tuple flag saved before train_args kept it (given, so not None): the model's
            if k not in saved and isinstance(cfg.get(k), list):
                saved[k] = cfg[k]
        for k, v in saved.items():
            if isinstance(v, list):  # (saved from a tuple: --ngram_sizes)
                v = tuple(v)
            if k in _PER_INVOCATION or not hasattr(merged, k):
                continue
            if k in ignored and k not in explicit:
                # a baseline run saved before such options were refused (--model dense --patching fixed): it never
                # shaped the model, and carried back it would refuse the resume with no flag to clear it
                continue
            if k in explicit:
                # a flag left out saved None (the size's default); the model's config holds what that meant
                ck = self.ck or {}
                used = v if v is not None else ck.get("model_config", {}).get(k, (ck.get("scheduler") or {}).get(k))
                if getattr(merged, k) != used:  # said after the config check: a refused resume is one line
                    self._resume_notes.append(f"note: resuming with --{k} {getattr(merged, k)} (the checkpoint "
                                              f"used {used})")
            else:
                setattr(merged, k, v)
        return merged

    def _keep_resumed_plan(self, args, explicit: set[str]) -> None:
        """A resume with a larger --max_steps derived the entropy phase and warmup from it again (6 entropy steps
        trained, 13 planned: the main phase's schedule shifted by 7 steps and its lr jumped). What the run already
        trained stays: the checkpoint's resolved entropy_steps and warmup_steps, unless given on this command."""
        sched = (self.ck or {}).get("scheduler") or {}
        for k in ("entropy_steps", "warmup_steps"):
            if getattr(args, k, None) is None and k not in explicit and sched.get(k) is not None:
                setattr(args, k, int(sched[k]))

    def _check_same_kind(self, ck_path, model: str, size: str) -> None:
        saved = self.ck["model_config"]
        if saved.get("model") != model or saved.get("size") != size:
            # said first and alone: the other keys differ only because of it (a new user was told to drop flags
            # they never passed)
            raise UserError(f"{ck_path} is a --model {saved.get('model')} --size {saved.get('size')} checkpoint, not "
                            f"--model {model} --size {size}; pass --model {saved.get('model')} --size "
                            f"{saved.get('size')} to resume it, or start a new --run_name")

    def _check_config_matches(self, ck_path) -> None:
        saved = self.ck["model_config"]
        ModelConfig.from_checkpoint(saved, ck_path)  # a key this version lacks was dropped without a word
        now = self.config.to_dict()
        ignored = set(unused_options(now["model"], now))  # (an option the model is not built from: not its weights)
        diff = [f"{k}={now[k]!r} (checkpoint {saved[k]!r})" for k in saved if k in now and now[k] != saved[k]
                and k not in ignored]
        if diff:
            raise UserError(f"{ck_path} was trained with a different model: {', '.join(diff[:4])}; drop those flags "
                            "to resume, or start a new --run_name")

    def _setup_data(self) -> None:
        from ..data.loader import TaskSampler, WindowSampler, task_val_batches

        a = self.args
        self.val = self.val_bytes = None
        self.val_batches = None
        self.tokens = None  # token shards and evaluator of a token model (BPE baseline)
        self.data_meta = {"dataset": "tasks"}
        eval_bs = a.eval_batch_size or a.batch_size
        if a.dataset == "tasks" and not a.data_path:
            if is_token_model(a.model):
                raise UserError(f"--model {a.model} trains its tokenizer on text data; use --data_path/--dataset "
                                "(task fine-tuning of it: `ionllama experiment --stage tasks`)")
            self.sampler = TaskSampler(a.seq_len, a.batch_size, a.grad_accum, a.seed, self.rank, self.world_size)
            self.val_batches = task_val_batches(a.seq_len, eval_bs)
            return
        from ..data.shards import open_shards, prepare
        from .cli import data_args_from

        path = prepare(data_args_from(a), log=_say if self.is_main else (lambda m: None))
        shards = open_shards(path)
        # absolute: the benchmark reads val.bin from here, and may run from another folder than the trainer did
        self.data_meta = {"path": str(Path(path).resolve()), "source": shards.meta.get("source"),
                          "train_bytes": len(shards.train), "val_bytes": len(shards.val),
                          **{f"{s}_sha256": shards.meta["splits"][s]["sha256"] for s in ("train", "val")}}
        self._note_other_data()
        if len(shards.val) < a.seq_len + 1:
            raise UserError(f"the val split has {len(shards.val):,} bytes, fewer than --seq_len {a.seq_len} + 1; lower "
                            "--seq_len, add data or raise --val_fraction")
        self.val = self.val_bytes = shards.val  # a token model's self.val becomes token ids below
        if is_token_model(a.model):  # token shards of the same documents; --seq_len counts tokens
            self.tokens = TokenTraining.for_trainer(self, path, log=_say if self.is_main else (lambda m: None))
            self.val, self.sampler = self.tokens.val, self.tokens.sampler
            return
        self.sampler = WindowSampler(shards.train, a.seq_len, a.batch_size, a.grad_accum, a.seed, self.rank,
                                     self.world_size, task_mix=a.task_mix)

    def _restore(self, ck: dict, path) -> None:
        order = ("entropy", "main", "joint")
        needs = ("step", "phase", "rng") + (() if ck.get("sharded_path") else ("optimizer",))
        missing = [k for k in needs if k not in ck]
        if missing:  # a weights-only file (model + model_config) was a KeyError traceback
            raise UserError(f"{path} holds no training state (no {', '.join(missing)}): it can be evaluated or "
                            "generated from, not resumed; resume from a trainer checkpoint (latest.pt, step_N.pt), or "
                            "start a new run")
        if ck["phase"] not in order:
            raise UserError(f"{path} has an unknown phase '{ck['phase']}' (not {', '.join(order)}): not a checkpoint "
                            "this trainer wrote; resume from latest.pt or step_N.pt of the run")
        step, now = int(ck["step"]), self.plan.phase_of(int(ck["step"]))
        if self.phases_by_step and order.index(now) < order.index(ck["phase"]):
            # e.g. a finished run given a larger --max_steps: its joint-phase step fell back into the main phase,
            # which recalibrated the patcher and ran the joint phase a second time
            extra = (f", or pass --joint_steps {self.plan.entropy_steps + self.plan.max_steps - step} so the added "
                     "steps are joint" if ck["phase"] == "joint" else "")
            raise UserError(f"{path} is at step {step} in the {ck['phase']} phase, but with these step counts step "
                            f"{step} is in the {now} phase: the run would go back a phase; keep the checkpoint's "
                            f"--max_steps / --entropy_steps / --joint_steps{extra}")
        self.step = self.saved_step = step
        self.bytes_seen = int(ck.get("bytes_seen", 0))
        self.train_time = float(ck.get("train_time_s", 0.0))
        self.best_val_bpb = float(ck.get("best_val_bpb", math.inf))
        self._enter_phase(ck["phase"], resumed=True)
        try:
            self.par.load(ck, self.optimizer)  # .pt: the optimizer; .dcp: model + optimizer, any world size
        except UserError:
            raise  # already names the problem (a ValueError too: not to be wrapped again below)
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: optimizer state does not match ({e}); resume with the same model and phases") from None
        # the checkpoint's param groups came back with its weight decay: a --weight_decay of this command was said
        # ("resuming with --weight_decay 0.5") and recorded, but not used
        no_decay = no_decay_ids(self.model)
        for g in self.optimizer.param_groups:
            if any(id(p) not in no_decay for p in g["params"]):
                g["weight_decay"] = self.args.weight_decay
        if ck.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck["scaler"])
        try:
            ckpt_io.restore_rng_state(ck["rng"])
            per_rank = ck.get("rank_rng")
            if self.rank != 0:  # its own stream: saved by a run of this world size, else a fresh one of its own
                if isinstance(per_rank, list) and len(per_rank) == self.world_size:
                    ckpt_io.restore_rng_state(per_rank[self.rank])
                else:
                    torch.manual_seed(rank_seed(self.args.seed, self.rank, self.step))
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:  # edited or foreign
            raise UserError(f"{path}: its random-number state is not readable ({type(e).__name__}: "
                            f"{first_line(e, 80)}); resume from another checkpoint of the run (best.pt, an older "
                            "step_N.pt)") from None
        # a run refused for nothing to train (--stop_at, --max_steps, --max_train_time) is refused here, before its
        # metrics are cut back and a later branch moved aside: a mistyped flag took final.pt and best.pt away
        if self.phases_by_step:  # (the experiment's arms get their time-budget plan after this: their nominal step
            self._nothing_to_train(say=False)  # count is no last step, and a long arm passed it)
        # from latest.pt / latest.dcp the dropped points are logged again; from an older checkpoint they are a branch
        # abandoned, kept aside so that nothing written is lost
        older = Path(path).name not in ("latest.pt", "latest" + distributed.DCP_SUFFIX)
        label = self._aside_label() if older and self.is_main else None
        if self.metrics is not None:
            aside = self.metrics.path.with_name(f"metrics.{label}.jsonl") if older else None
            last = self.metrics.truncate_after(self.step, self.phase, keep_dropped=aside)
            if older and last is not None and last > self.step:
                _say(f"note: {path} is at step {self.step}; this run folder's metrics went on to step {last}: those "
                     f"points are moved to {aside.name}; to keep the whole branch, "
                     f"resume into another folder with --run_name NEW")
        if older:
            with self.dist.main_first():  # under torchrun rank 0 moves them; the others wait, so no one writes first
                if self.is_main:
                    self._set_branch_aside(Path(path), label)
            if not any((self.run_dir / n).exists() for n in ("best.pt", "best" + distributed.DCP_SUFFIX)):
                # its best went aside with the abandoned branch: the score restored from step N had no weights left
                # behind it, so no later evaluation beat it and the run ended without a best.pt
                self.best_val_bpb = math.inf
        _say(f"resumed {path} at step {self.step} (phase {self.phase})")

    def _aside_label(self) -> str:
        """before-resume-stepN, or -2, -3, ... when an earlier resume to the same step set its branch aside under that
        name already (a second resume from step_N.pt moved the second branch over the first: the first was lost)."""
        base, k = f"before-resume-step{self.step}", 1
        label = base
        while (self.run_dir / label).exists() or (self.run_dir / f"metrics.{label}.jsonl").exists():
            k += 1
            label = f"{base}-{k}"
        return label

    def _set_branch_aside(self, resumed_from: Path, label: str) -> None:
        """Resuming from an older step_N.pt / step_N.dcp abandons the branch that went on from it: its later
        checkpoints (step_M with M > N, best past N, final, final.safetensors, sample.txt, and a link to its latest;
        .pt files and a torchrun run's .dcp folders alike) move to before-resume-stepN/, as its metrics do. They used
        to be overwritten as the new branch saved (a new user's report: best.pt replaced by a worse model, final.pt
        by another run's). Rank 0 only."""

        dcp = distributed.DCP_SUFFIX

        def is_checkpoint(f: Path) -> bool:
            return distributed.is_sharded_checkpoint(f) if f.suffix == dcp else f.is_file()

        def step_of(f: Path) -> int | None:  # unreadable: None, so the file is kept where it is, as before
            step = (distributed.checkpoint_header(f) or {}).get("step")
            return int(step) if step is not None else None

        def past(f: Path) -> bool:  # a checkpoint of the abandoned branch (not the one resumed)
            return is_checkpoint(f) and f.resolve() != resumed_from.resolve() and (step_of(f) or 0) > self.step

        later = []
        for ext in (".pt", dcp):
            for f in sorted(self.run_dir.glob(f"step_*{ext}")):
                n = f.name[len("step_"):-len(ext)]
                if n.isdigit() and int(n) > self.step and f.resolve() != resumed_from.resolve() and is_checkpoint(f):
                    later.append(f)
        finals = [f for f in (self.run_dir / "final.pt", self.run_dir / f"final{dcp}") if past(f)]
        if finals:
            later += finals + [f for f in (self.run_dir / "final.safetensors", self.run_dir / "sample.txt")
                               if f.is_file()]
        later += [f for f in (self.run_dir / "best.pt", self.run_dir / f"best{dcp}") if past(f)]
        latest = [f for f in (self.run_dir / "latest.pt", self.run_dir / f"latest{dcp}") if past(f)]
        # a latest in the format this run does not write (a torchrun .dcp resumed in one process, or the reverse)
        # is never replaced by its saves: moved, not linked (it stayed, and a crash before the first save had
        # --resume auto take the abandoned branch)
        own = f"latest{dcp}" if self.par.distributed else "latest.pt"
        later += [f for f in latest if f.name != own]
        latest = [f for f in latest if f.name == own]
        if not later and not latest:
            return
        aside = self.run_dir / label
        aside.mkdir(exist_ok=True)
        for f in later:
            if (aside / f.name).is_dir():  # from an earlier resume to this step: os.replace keeps no full folder
                shutil.rmtree(aside / f.name)
            f.replace(aside / f.name)
        for f in latest:  # replaced atomically by the next save, so hard links keep this one
            dst = aside / f.name
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            if f.is_dir():
                distributed._link_tree(f, dst)
            else:
                try:
                    os.link(f, dst)
                except OSError:
                    shutil.copy2(f, dst)
        names = [f.name for f in later] + [f"{f.name} (a copy: the next save replaces it here)" for f in latest]
        _say(f"note: resuming from step {self.step} abandons the branch that went on from it: {', '.join(names)} "
             f"moved to {aside}")

    # ------------------------------------------------------------------ phases
    def _check_entropy_checkpoint(self) -> None:
        """--entropy_checkpoint before any data work: this run must have an entropy model, the file must exist."""
        path = getattr(self.args, "entropy_checkpoint", None)
        if path and self.ck is not None:
            was = (self.ck.get("train_args") or {}).get("entropy_checkpoint")
            # the resumed weights hold the entropy model: another file would be named, not loaded. The same file
            # written another way (relative, absolute) is the same run: it was refused as another
            if path != was and not _same_file(path, was):
                raise UserError(f"--entropy_checkpoint {path} on a resume: the entropy model's weights come from "
                                f"the checkpoint (it used {was}); drop the flag, or start a new run to load it")
        if not path or self.ck is not None:
            return
        if self.config.model != "ionllama" or self.config.patching != "entropy":
            raise UserError(f"--entropy_checkpoint is for --model ionllama with entropy patching, not --model "
                            f"{self.config.model}" + (f" --patching {self.config.patching}"
                                                      if self.config.model == "ionllama" else "") + "; drop it")
        if not Path(path).exists():
            raise UserError(f"--entropy_checkpoint {path} not found; pass a .pt, .safetensors or .dcp checkpoint of "
                            "an entropy-patching ionllama run")

    def _load_entropy_model(self, path: str) -> None:
        """The entropy model's weights from another run (users could not train it on their own data and reuse it:
        the only way was resuming that run, which refused any other model or patching setting)."""
        src = ckpt_io.load_model(path)
        theirs = getattr(src, "entropy_model", None)
        if theirs is None or getattr(src.config, "patching", None) != "entropy":
            raise UserError(f"--entropy_checkpoint {path} holds a --model {src.config.model} model without an entropy "
                            "model; pass a checkpoint of an ionllama run with entropy patching")
        keys = ("d_entropy", "n_entropy_layers", "entropy_state", "entropy_headdim")
        differ = [k for k in keys if getattr(src.config, k) != getattr(self.config, k)]
        if differ:
            # the flags, not only --size: that changed the main model too (a tiny entropy model under a small one)
            raise UserError(f"--entropy_checkpoint {path} has another entropy model: "
                            + ", ".join(f"{k} {getattr(src.config, k)} (this run: {getattr(self.config, k)})"
                                        for k in differ)
                            + "; pass " + " ".join(f"--{k} {getattr(src.config, k)}" for k in differ)
                            + " to build this run's entropy model like it")
        try:
            self.model.entropy_model.load_state_dict(theirs.state_dict())
        except RuntimeError as e:
            raise UserError(f"--entropy_checkpoint {path}: its entropy model does not fit this one "
                            f"({first_line(e)})") from None
        if self.is_main:
            what = "fine-tunes them" if self.args.entropy_steps else "skipped"
            # scored on this run's val: an untrained one (a run with --entropy_steps 0) was taken without a word, and
            # calibration still hit the target ratio, so patches followed noise in a healthy-looking run
            x = self._calibration_batch()[:16]
            with eval_mode(self.model.entropy_model), torch.no_grad():
                bpb = float(self.model.entropy_model(x[:, :-1], x[:, 1:])["bpb"])
            _say(f"entropy model: weights from {path} (phase 1 {what}), {bpb:.2f} bits/byte on this run's val; the "
                 "threshold is calibrated on this run's val split")
            if bpb > UNTRAINED_ENTROPY_BPB:
                _say(f"note: {bpb:.2f} bits/byte is near the 8 of an untrained one: patches follow noise and the "
                     "--max_patch_size cap; pass a trained entropy model or train this one (--entropy_steps N)")

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        return make_adamw(self.model, params, self.plan.lr, self.args.weight_decay, self.device,
                          capturable=bool(getattr(self.args, "step_graph", False)))

    def _enter_phase(self, phase: str, resumed: bool = False) -> None:
        m, prev = self.model, self.phase
        if phase == "entropy":
            self.optimizer = make_adamw(m, m.entropy_model.parameters(), self.plan.entropy_lr, self.args.weight_decay,
                                        self.device, capturable=bool(getattr(self.args, "step_graph", False)))
        elif phase == "main":
            if getattr(m, "needs_entropy_phase", False):
                if not resumed:
                    self._calibrate()
                m.freeze_entropy(True)
            self.optimizer = self._make_optimizer(self._trainable())
        elif phase == "joint":
            if prev != "main":  # resumed in phase 3: rebuild the phase-2 optimizer first, as it was
                if prev == "entropy" and not resumed:
                    self._calibrate()
                m.freeze_entropy(True)
                self.optimizer = self._make_optimizer(self._trainable())
            m.freeze_entropy(False)
            add_params(self.optimizer, m, self._trainable(), self.args.weight_decay)
        else:
            raise UserError(f"checkpoint has unknown phase '{phase}'")
        self.phase = phase
        if not resumed and self.is_main:
            n = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
            until = f" (or until --max_train_time {self.args.max_train_time:g} s)" \
                if getattr(self.args, "max_train_time", None) is not None else ""
            if getattr(self.plan, "budget_s", None):  # a time-bounded plan (the experiment's arms) has no last step
                _say(f"phase {phase}: from step {self.step} until --max_train_time {self.args.max_train_time:g} s, "
                     f"optimizing {n:,} parameters")
            else:
                _say(f"phase {phase}: steps {self.step}..{self._phase_end(phase)}{until}, optimizing {n:,} parameters")
        self.step_graph = None  # a new phase trains other parameters (or the same with another step): a new capture
        self.graph_problem = capture_problem(self.config, phase) if getattr(self.args, "step_graph", False) else None
        if self.graph_problem and self.is_main:
            _say(f"--step_graph: {self.graph_problem}; phase {phase} runs without the graph")

    def _phase_end(self, phase: str) -> int:
        p = self.plan
        return {"entropy": p.entropy_steps, "main": p.entropy_steps + p.main_steps, "joint": p.total}[phase]

    def _calibration_batch(self) -> torch.Tensor:
        T = self.args.seq_len
        if self.val is None:
            return torch.cat([x for x, _ in self.val_batches]).to(self.device)  # all of them, whatever the batch
        n = max(1, min(64, (len(self.val) - 1) // T))
        # windows spread evenly over the whole val split: a prefix can be one unrepresentative document
        starts = np.linspace(0, len(self.val) - 1 - T, n).astype(np.int64)
        idx = starts[:, None] + np.arange(T)
        return torch.from_numpy(np.asarray(self.val[idx], dtype=np.int64)).to(self.device)

    def _recalibrate_joint(self) -> None:
        """The entropy model trains in the joint phase, so its entropies drift and the threshold set after phase 1
        no longer gives --target_patch_size (a new user's run: 4.0 -> 5.98 bytes/patch by the end): set it again
        before every evaluation, the final one included."""
        if self.phase == "joint" and getattr(self.model, "needs_entropy_phase", False):
            self._calibrate()

    def _calibrate(self) -> None:
        x = self._calibration_batch()
        with eval_mode(self.model), torch.no_grad():
            res = self.model.calibrate_threshold(x)
        self.par.reshard()  # FSDP: a no-grad forward leaves the root's parameters gathered
        self.par.broadcast_buffers()  # every rank patches with rank 0's threshold
        res = {k: (float(v) if torch.is_tensor(v) or isinstance(v, (int, float)) else v) for k, v in dict(res).items()}
        if self.is_main:
            # the evaluation scores the first --eval_bytes of val; calibration looks at windows spread over all of it
            where = "spread over the val split" if self.val is not None else "of the first val batch"
            _say(f"calibrated entropy threshold on {x.shape[0]} windows of {x.shape[1]} bytes {where}: "
                 f"{json.dumps(res)}")
            self.metrics.log({"step": self.step, "phase": "calibrate", "bytes_seen": self.bytes_seen,
                              "train_time_s": round(self.train_time, 3), **res})

    # ------------------------------------------------------------------ one optimizer step
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def mark_step(self) -> None:
        """With CUDA graphs, a new forward may overwrite the last one's outputs: say when that is fine (every
        value kept from a step is copied into other tensors before its next forward)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def request_stop(self, reason: str) -> None:
        """End the run after the current step as the trainer's own stop rules do (latest.pt saved, a
        "stopped at step" line naming the reason); for wrappers such as the experiment runner's deadline."""
        self.stop_reason = reason

    def train_step(self, step: int) -> dict:
        t_host = time.perf_counter()
        try:
            return self._train_step(step)
        finally:
            self.host_s += time.perf_counter() - t_host

    def stage_a(self, phase: str):
        """Stage A of `phase`'s two-stage captured step (step_graph.stage_a_for), or None where the shapes are
        fixed. Compiled (--compile_stage_a) it is made once, so the experiment's compile warm-up and the step
        call the same compiled function and nothing compiles inside a timed budget."""
        fn = stage_a_for(self.model, self.args.seq_len, phase)
        if fn is None or not self.compile_stage_a:
            return fn
        if self._compiled_stage_a is None:
            self._compiled_stage_a = stage_a_for(self.model, self.args.seq_len, phase, compiled=True)
        return self._compiled_stage_a

    def _graphed_train_step(self, step: int) -> dict:
        """--step_graph: the whole step replayed as one CUDA graph (step_graph.py)."""
        if self.step_graph is None or self.step_graph.opt is not self.optimizer:
            # the trainer's own autocast: the same global state as the experiment's compile warm-up, so
            # torch.compile's guards hold and nothing recompiles inside the timed budget. Entropy and space
            # patching: the two-stage step (boundaries eagerly, then one graph per latent-length bucket)
            self.step_graph = make_step_graph(self.model, self.par.train_module(self.phase), self.optimizer,
                                              self.args.grad_clip, self._autocast, self.args.seq_len, self.phase,
                                              stage_a=self.stage_a(self.phase))
        self.fwd.train()
        x, y = self.sampler.get(step, 0)
        if self.device.type == "cuda" and not x.is_cuda:  # a copy from pageable memory blocks the host
            x, y = x.pin_memory(), y.pin_memory()
        lr = self.plan.lr_at(step)
        out = self.step_graph(x, y, lr)
        return {**out, "grad_norm": out.get("grad_norm"), "lr": lr}

    def _may_mask_targets(self) -> bool:
        """Can this run's batches hold unscored (-100) targets: task rows (--dataset tasks, --task_mix)?"""
        return getattr(self.sampler, "n_task_rows", None) != 0  # TaskSampler: every row (no attribute)

    def _train_step(self, step: int) -> dict:
        if getattr(self.args, "step_graph", False) and not self.graph_problem:
            return self._graphed_train_step(step)
        a = self.args
        self.fwd.train()
        loss_sum = torch.zeros((), device=self.device)
        bpb_sum = torch.zeros((), device=self.device)
        patches = torch.zeros((), device=self.device, dtype=torch.long)
        # a token model's bpb is bits over the bytes its targets cover, which differ between micro-batches: the mean of
        # their ratios changed with the split of one global batch (8 rows, 2 x 4, 2 processes x 2 x 2); summed here
        nats_sum = torch.zeros((), device=self.device)
        target_bytes = torch.zeros((), device=self.device)
        fwd = self.par.train_module(self.phase)  # entropy model or full model; DDP / FSDP when distributed
        batches = [self.sampler.get(step, micro) for micro in range(a.grad_accum)]
        # each micro-batch's loss is a mean over its own scored targets: weighted by its share of the step's, so
        # that masked targets (task rows) give the gradient of the whole batch's mean, as grad_accum 1 does.
        # Unmasked windows: every weight is exactly 1.0 (bit-identical to before)
        counts = [int((y != -100).sum()) for _, y in batches]
        if self.par.distributed and self._may_mask_targets():
            # every rank's gradient is averaged with the others': the share is of the whole global batch's scored
            # targets (2 processes then give 1 process x grad_accum 2's gradient, as they do for plain windows). A
            # device tensor, summed without a host sync; exact in float64 (1.0 where no target is masked)
            n_all = self.dist.all_sum(torch.tensor(float(sum(counts)), dtype=torch.float64, device=self.device))
            scale = a.grad_accum * self.world_size / n_all.clamp_min(1)
            weights = [(c * scale).float() for c in counts]
        else:
            n_scored = sum(counts)  # (under torchrun only plain windows get here: equal counts, every weight 1.0)
            weights = [c * a.grad_accum / n_scored if n_scored else 1.0 for c in counts]
        for micro, (x, y) in enumerate(batches):
            self.mark_step()
            w = weights[micro]
            weighted = isinstance(w, torch.Tensor) or w != 1.0  # (1.0: the unweighted sums, bit for bit)
            if self.device.type == "cuda" and not x.is_cuda:  # a copy from pageable memory blocks the host
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.par.grad_sync(fwd, micro == a.grad_accum - 1):  # gradients cross ranks once per step
                with self._autocast():
                    out = fwd(x, y)
                    total = out["loss"]
                    if self.phase != "entropy" and out.get("aux_loss") is not None:
                        total = total + out["aux_loss"]
                if weighted:
                    total = total * w
                self.scaler.scale(total / a.grad_accum).backward()
            loss = out["loss"].detach().float()
            bpb = out["bpb"].detach().float() if out.get("bpb") is not None else loss / LN2
            loss_sum += loss * w if weighted else loss
            bpb_sum += bpb * w if weighted else bpb
            if out.get("n_bytes") is not None:
                nats_sum += loss * counts[micro]
                target_bytes += out["n_bytes"].detach().float()
            if self.phase != "entropy" and out.get("n_patches") is not None:
                patches += out["n_patches"].detach().sum()
            else:
                patches += x.numel()
        self.par.after_backward()
        lr = self.plan.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = None
        if a.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # logged: the mean over ranks. Under torchrun a signal rides along: > 0 when any rank got one, so the ranks
        # agree to stop at the next step (agreeing at log points only left torchrun's 30-s kill to save nothing)
        signalled = None
        if self.par.distributed:
            got = getattr(self, "_stop", None) is not None and self._stop.signum is not None
            loss_sum, bpb_sum, signalled, nats_sum, target_bytes = self.par.mean(torch.stack([
                loss_sum, bpb_sum, torch.full((), float(got), device=self.device), nats_sum, target_bytes]))
        bpb = bpb_sum / a.grad_accum
        if out.get("n_bytes") is not None:  # (means over ranks: their ratio is the global batch's)
            bpb = nats_sum / LN2 / target_bytes.clamp_min(1e-6)
        return {"loss": loss_sum / a.grad_accum, "bpb": bpb, "patches": patches,
                "grad_norm": self.par.local(grad_norm) if grad_norm is not None else None, "lr": lr,
                "signalled": signalled}

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self, phase_label: str) -> dict:
        a = self.args
        model = _EntropyLM(self.par.entropy_module()) if self.phase == "entropy" else self.model
        eval_bs = a.eval_batch_size or a.batch_size
        if self.val is None:
            res = evaluate_batches(model, self.val_batches, self.device, self.amp_dtype)
        elif self.tokens is not None:  # exact: bits over the bytes the scored tokens cover
            res = self.tokens.evaluate(model, a.seq_len, eval_bs, self.device, a.eval_bytes, self.amp_dtype)
        else:
            res = evaluate_bpb(model, self.val, a.seq_len, eval_bs, self.device, max_bytes=a.eval_bytes,
                               amp_dtype=self.amp_dtype)
        self.par.reshard()  # FSDP: a no-grad forward leaves the root's parameters gathered
        if self.par.distributed:
            # rank 0's score on every rank: each rank scored the val set itself, and a last-bit difference (kernel
            # choice, rounding) made ranks disagree on best.pt, so they saved into different .dcp folders
            res = self.dist.on_main(lambda: res)
        if self.phase == "entropy":
            res.pop("bytes_per_patch")  # the entropy model is byte-level; patching is not in use yet
        rec = {"step": self.step, "phase": phase_label, "bytes_seen": self.bytes_seen,
               "train_time_s": round(self.train_time, 3), **{f"val_{k}": v for k, v in res.items()}}
        if not self.is_main:  # every rank evaluates (FSDP needs them all), rank 0 reports
            return res
        self.metrics.log(rec)
        bpp = f", {res['bytes_per_patch']:.2f} bytes/patch" if "bytes_per_patch" in res else ""
        what = "entropy model " if self.phase == "entropy" else ""
        _say(f"step {self.step} [{phase_label}] {what}val: loss {res['loss']:.4f}, bpb {res['bpb']:.4f}, "
             f"ppl {res['ppl']:.3f}{bpp} ({res['bytes']:,} bytes)")
        return res

    def state(self, weights: bool = True) -> dict:
        """weights=False: everything but model / optimizer (sharded checkpoints store those as DCP shards). Under
        torchrun every rank calls it (its RNG state is gathered)."""
        rng = ckpt_io.capture_rng_state()
        return {
            "format": ckpt_io.CHECKPOINT_FORMAT,
            **({"model": ckpt_io.model_state(self.model), "optimizer": self.optimizer.state_dict()} if weights else {}),
            "scheduler": self.plan.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "phase": self.phase,
            "rng": rng,
            "rank_rng": self.dist.all_gather_object(rng) if self.par.distributed else None,
            "data_position": {"step": self.step, "seed": self.args.seed, "global_batch": self.sampler.global_batch,
                              "world_size": self.world_size, **{k: v for k, v in self.data_meta.items()
                                                                if isinstance(v, (str, int))}},
            "bytes_seen": self.bytes_seen,
            "train_time_s": self.train_time,
            "best_val_bpb": self.best_val_bpb,
            "model_config": self.config.to_dict(),
            # a tuple (--ngram_sizes) as a list: left out, a resume built the default sizes and was refused
            "train_args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self.args).items()
                           if isinstance(v, (str, int, float, bool, type(None))) or _plain_tuple(v)},
        }

    def save(self, *names: str) -> None:
        """Serialise once, copy to the other names (each atomic), latest.pt last: it records best_val_bpb, so written
        first, a kill before the copy to best.pt left a latest.pt that counted the new best while best.pt held the old
        weights, and the resumed run then wrote over the only copy (a new user's report)."""
        self._check_weights_finite()
        if self.par.distributed:  # every rank writes its shards into <name>.dcp
            self.par.save(self.run_dir, names, self.optimizer, self.state(weights=False))
            self.saved_step = self.step
            return
        if not self.is_main:
            self.saved_step = self.step
            return
        try:
            order = [n for n in dict.fromkeys(names) if n != "latest.pt"] + ["latest.pt"]
            first = ckpt_io.save_checkpoint(self.state(), self.run_dir / order[0])
            for n in order[1:]:
                ckpt_io.copy_checkpoint(first, self.run_dir / n)
        except OSError as e:
            raise UserError(f"could not write a checkpoint in {self.run_dir} ({e.strerror or e}); free disk space "
                            "and resume with --resume auto (earlier checkpoints are intact)") from None
        self.saved_step = self.step

    def _check_finite(self, last_loss: float) -> None:
        """Stop a diverged run before it saves: with a NaN / inf loss the weights are (or soon are) NaN, and
        every later save would overwrite the last good latest.pt / best.pt with them. Checked at the log points,
        where the host reads the losses anyway. The last step's loss, not the window's mean: an fp16 step that
        GradScaler skipped leaves the weights intact, and the next step's loss is finite again."""
        if not math.isfinite(last_loss):
            raise self._diverged(f"the training loss became {last_loss}")

    def _check_weights_finite(self) -> None:
        """Before a save: a step's loss is taken before its update, so the step that made the weights NaN (a NaN / inf
        gradient behind a finite loss) logged a finite loss and its NaN weights were saved over the last good
        latest.pt, which the next step's loss check then named as the one to resume from. Every rank calls it."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]  # (FSDP: shards)
        bad = bool(local) and not bool(torch.stack([torch.isfinite(t.detach()).all() for t in local]).all())
        if self.par.distributed:
            bad = self.dist.any_rank(bad, self.device)
        if bad:
            raise self._diverged("the weights became NaN or infinite")

    def _diverged(self, what: str) -> UserError:
        flag, lr = ("--entropy_lr", self.plan.entropy_lr) if self.phase == "entropy" else ("--lr", self.plan.lr)
        if self.saved_step is None:
            kept = f"no checkpoint had been written yet; start again with a lower {flag} (this run: {lr:g})"
        else:
            name = "latest.dcp" if self.par.distributed else "latest.pt"
            kept = (f"{self.run_dir / name} holds step {self.saved_step} and was not overwritten; resume from it "
                    f"with a lower learning rate: {self._resume_hint()} {flag} {lr / 2:g}")
        return UserError(f"{what} by step {self.step} ({self.phase} phase): the run diverged and stopped; {kept}")

    def _final_name(self) -> str | None:
        """final.pt or final.dcp, whichever the run wrote last (None: neither: it stopped at its last step,
        unfinished)."""
        found = distributed.newest_checkpoint(self.run_dir, "final.pt")
        return found.name if found is not None else None

    def _finished_before(self) -> bool:
        return self._final_name() is not None

    # ------------------------------------------------------------------ the loop
    def _nothing_to_train(self, say: bool = True) -> dict | None:
        """Refuse (UserError) a run with no step left to train before any file is rewritten with its settings; an
        experiment arm already trained to its budget gets its result dict (it goes on to its evaluation). say=False:
        the refusals only (checked again, with its note, when the run starts)."""
        a, plan = self.args, self.plan
        if self.step > plan.total:  # before config.json or a checkpoint is rewritten with these settings
            raise UserError(f"the checkpoint is at step {self.step}, past this run's last step {plan.total} "
                            f"(--max_steps {a.max_steps} with its phases); nothing to train: raise --max_steps, or "
                            f"start a new run with another --run_name")
        if self.step == plan.total and self.step > 0 and self._finished_before():
            # it used to run no step and still rewrite config.json, final.pt and the sample under the new flags
            raise UserError(f"the run in {self.run_dir} finished at step {self.step} ({self._final_name()}); nothing "
                            "to train: "
                            f"raise --max_steps to continue it, or start a new run with another --run_name")
        if a.max_train_time is not None and self.train_time >= a.max_train_time:  # it trained a step, then stopped
            if not self.refuse_spent_time:  # the experiment's arm: trained to its budget, so on to its evaluation
                if say:
                    _say(f"the run has trained {self.train_time:.1f} s of --max_train_time {a.max_train_time:g} "
                         "already; nothing to train")
                return {"run_dir": str(self.run_dir), "step": self.step, "stopped": True}
            raise UserError(f"--max_train_time {a.max_train_time:g} counts the whole run, which has trained "
                            f"{self.train_time:.1f} s already: nothing to train; pass a --max_train_time above "
                            f"{self.train_time:.1f}")
        if a.stop_at is not None and self.step >= a.stop_at:  # it trained one step and rewrote latest.pt
            raise UserError(f"--stop_at {a.stop_at} is not past the run's step {self.step}: nothing to train; pass a "
                            f"--stop_at above {self.step}")
        return None

    def _announce(self) -> None:
        """The run's first lines (model, batch, phases) and its config.json (main process only)."""
        a, plan = self.args, self.plan
        if self.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            gb = self.sampler.global_batch
            # the weights stay fp32 under --mixed_precision: "(float16)" read as if they were cast
            amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None
            _say(f"model {a.model}/{a.size}: {n_params:,} parameters on {self.device}"
                 f"{f' (fp32 weights, {amp} autocast)' if amp else ' (fp32)'}; "
                 f"run folder {self.run_dir}")
            unit = "tokens" if is_token_model(a.model) else "bytes"  # a token model's windows hold tokens
            _say(f"global batch: {a.batch_size} x {a.grad_accum} accum x {self.world_size} procs = {gb} windows x "
                 f"{a.seq_len} {unit} = {gb * a.seq_len:,} {unit}/step; steps: {plan.entropy_steps} entropy + "
                 f"{plan.main_steps} main + {plan.joint_steps} joint"
                 + (f" (nominal: the schedule follows the {plan.budget_s:g} s budget)"
                    if getattr(plan, "budget_s", None) else ""))
            if getattr(self.sampler, "task_note", None):  # --task_mix rounds to whole rows of each rank's batch
                _say(self.sampler.task_note)
            if self.par.distributed:
                _say(f"parallel: {self.par.describe()}")
            (self.run_dir / "config.json").write_text(json.dumps(
                {"train_args": vars(a), "model_config": self.config.to_dict(), "global_batch": gb,
                 "data": self.data_meta, "plan": plan.state_dict()}, indent=1, default=str))

    def run(self) -> dict:
        a, plan = self.args, self.plan
        done = self._nothing_to_train()
        if done is not None:
            return done
        self._announce()
        stop = self._stop = _StopSignal()
        stop.install()
        from tqdm import tqdm

        # a plan bounded by time (the experiment's arms) has no last step: its loop bound 10**9 means "never"
        budget_s = getattr(plan, "budget_s", None)
        bar = tqdm(total=None if budget_s else plan.total, initial=self.step,
                   disable=not (self.is_main and sys.stderr.isatty()), dynamic_ncols=True, mininterval=1.0)
        result = {}
        try:
            if self.step == 0:
                self.evaluate("init")  # the untrained model: bpb ~8, bytes/patch before any calibration
            win = {"t0": time.perf_counter(), "bytes": 0, "loss": [], "bpb": [], "patches": 0}
            signalled = None  # the last step's "any rank got a signal" flag (torchrun)
            sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
            step_bytes = self.sampler.global_batch * a.seq_len
            if self.tokens is not None:  # bytes of text (mean bytes/token of the train split)
                step_bytes = int(round(step_bytes * self.tokens.bytes_per_token))
            while self.step < plan.total:
                phase = plan.phase_of(self.step)
                if phase != self.phase:
                    prev = self.phase
                    self._enter_phase(phase)
                    if prev == "entropy":
                        self.evaluate(phase)  # the full model right after calibration: bytes/patch at target
                    win["t0"], self.host_s = time.perf_counter(), 0.0
                out = self.train_step(self.step)
                self.step += 1
                self.bytes_seen += step_bytes
                win["bytes"] += step_bytes
                win["loss"].append(out["loss"])
                win["bpb"].append(out["bpb"])
                win["patches"] = win["patches"] + out["patches"]
                bar.update(1)
                at_save = self.step % self.save_interval == 0
                phase_done = self.step == self._phase_end(self.phase)
                # the entropy model's last score is the one its patching and calibration go by: taken where phase 1
                # ends too (its last steps went unscored unless --eval_interval divided --entropy_steps)
                at_eval = self.step % a.eval_interval == 0 or self.step == plan.total or \
                    (phase_done and self.phase == "entropy")
                stopping = stop.signum is not None or (a.stop_at is not None and self.step >= a.stop_at) or \
                    self.stop_reason is not None
                time_up = a.max_train_time is not None and \
                    self.train_time + time.perf_counter() - win["t0"] >= a.max_train_time
                stopping = stopping or time_up
                if self.par.distributed:  # ranks stop together: agree at the steps where all of them log
                    boundary = self.step % a.log_interval == 0 or at_eval or at_save or phase_done or \
                        (a.stop_at is not None and self.step >= a.stop_at)
                    # a signal on any rank: every rank reads the previous step's flag (done by now: no wait on
                    # this step's work), so all stop at the same step
                    prev, signalled = signalled, out.get("signalled")
                    stopping = (boundary and self.dist.any_rank(stopping, self.device)) or (
                        prev is not None and bool(prev > 0))
                if self.step % a.log_interval == 0 or at_eval or at_save or phase_done or stopping:
                    self._log_window(win, out, bar, sync)
                    win = {"t0": None, "bytes": 0, "loss": [], "bpb": [], "patches": 0}
                    stopping = self._evaluate_and_save(at_eval, at_save, stopping)
                    win["t0"] = time.perf_counter()
                if stopping and self.step < plan.total:
                    why = signal.Signals(stop.signum).name if stop.signum else self.stop_reason or \
                        (f"--stop_at {a.stop_at}" if a.stop_at is not None and self.step >= a.stop_at else
                         f"--max_train_time {a.max_train_time:g} s reached" if time_up else "another rank stopped")
                    latest = self.run_dir / ("latest.dcp" if self.par.distributed else "latest.pt")
                    _say(f"stopped at step {self.step} ({why}); saved {latest}; "
                         f"continue with {self._resume_hint()}")
                    done = {"run_dir": str(self.run_dir), "step": self.step, "stopped": True}
                    if stop.signum and self.par.distributed:
                        # exit after the process group's closing barrier (train() raises it): leaving here
                        # skipped it, and the other ranks, stopped at the same step, failed in theirs with a
                        # gloo/NCCL traceback waiting for this one
                        return {**done, "exit_code": 128 + stop.signum}
                    if stop.signum:
                        raise SystemExit(128 + stop.signum)
                    return done
            bar.close()
            result = self._finish()
        finally:
            bar.close()
            stop.restore()
            if self.metrics is not None:
                self.metrics.close()
        return result

    def _log_window(self, win: dict, out: dict, bar, sync) -> None:
        """One metrics record (and the progress line) for the steps since the last one: `win` holds their bytes,
        losses and patch counts, `out` the last step's output. Adds the window's time to train_time."""
        budget_s = getattr(self.plan, "budget_s", None)
        t_sync = time.perf_counter()
        loss = float(torch.stack(win["loss"]).mean())
        self._check_finite(float(win["loss"][-1]))
        sync()
        dt = time.perf_counter() - win["t0"]
        # where the window's time went: host_ms_per_step is the host inside train_step (data,
        # launching work); gpu_wait_ms is how long the host then waited for the device to finish
        # it. A wait near 0 means the host is the bottleneck; a large one, the GPU.
        n_win = len(win["loss"])
        timing = {"host_ms_per_step": round(1e3 * self.host_s / max(n_win, 1), 3),
                  "gpu_wait_ms": round(1e3 * (time.perf_counter() - t_sync), 3)}
        self.host_s = 0.0
        self.train_time += dt
        dt_train, self.window_excluded_s = dt - self.window_excluded_s, 0.0
        patches = win["patches"]  # this rank's; the logged bytes/patch is over every rank's bytes
        if self.par.distributed and self.phase != "entropy":
            patches = self.par.mean(torch.as_tensor(patches, dtype=torch.float32, device=self.device))
        rec = {"step": self.step, "phase": self.phase, "bytes_seen": self.bytes_seen,
               "train_time_s": round(self.train_time, 3), "loss": loss,
               "bpb": float(torch.stack(win["bpb"]).mean()), "lr": out["lr"],
               "bytes_per_s": win["bytes"] / max(dt_train, 1e-9),
               "bytes_per_patch": (win["bytes"] / self.world_size) / max(float(patches), 1.0)
               if self.phase != "entropy" else None,
               "grad_norm": float(out["grad_norm"]) if out["grad_norm"] is not None else None,
               "global_batch": self.sampler.global_batch, **timing}
        if self.tokens is not None:  # its train loss is per token, its val_loss (and every bpb) per byte
            rec["loss_unit"] = "nats/token"
        if self.is_main:
            self.metrics.log(rec)
            post = {"loss": f"{loss:.3f}", "bpb": f"{rec['bpb']:.3f}",
                    "B/s": f"{rec['bytes_per_s']:,.0f}", "lr": f"{out['lr']:.2e}"}
            if rec["bytes_per_patch"] is not None:
                post["B/patch"] = f"{rec['bytes_per_patch']:.2f}"
            bar.set_postfix(post, refresh=False)
            if bar.disable:
                at = (f"{self.step} (time-bounded: {self.train_time:.0f}/{budget_s:g} s)" if budget_s
                      else f"{self.step}/{self.plan.total}")
                _say(f"step {at} [{self.phase}] " + " ".join(f"{k} {v}" for k, v in post.items()))

    def _evaluate_and_save(self, at_eval: bool, at_save: bool, stopping: bool) -> bool:
        """Where a logging window ends: evaluate (at_eval) and save latest.pt, best.pt and step_N.pt as due. Returns
        `stopping`, set when a stop signal came during the evaluation."""
        if at_eval:
            self._recalibrate_joint()
            res = self.evaluate(self.phase)
            names = ["latest.pt"]
            if self.phase != "entropy" and res["bpb"] < self.best_val_bpb:
                self.best_val_bpb = res["bpb"]
                names.append("best.pt")
            if at_save:
                names.append(f"step_{self.step}.pt")
            self.save(*names)
            if self._stop.signum is not None and not stopping and not self.par.distributed:
                stopping = True  # it came during the evaluation: this step is saved; a step more cost a save (and
                # an evaluation) of its own out of a preemption's grace period
        elif at_save or stopping:
            if stopping and self.recalibrate_at_stop:
                self._recalibrate_joint()
            self.save("latest.pt", *([f"step_{self.step}.pt"] if at_save else []))
        return stopping

    def _finish(self) -> dict:
        a = self.args
        self.save("latest.pt", "final.pt")
        # the whole model on rank 0 (FSDP: gathered from the shards, a collective); None on other ranks
        model = self.par.plain_model(self.device) if self.par.distributed else self.model
        if not self.is_main:
            return {"run_dir": str(self.run_dir), "step": self.step}
        try:
            ckpt_io.export_safetensors(model, self.run_dir / "final.safetensors")
        except OSError as e:  # final.pt is saved, and a resume now says "finished": name the export's own command
            raise UserError(f"could not write {self.run_dir / 'final.safetensors'} ({e.strerror or e}); final.pt is "
                            "saved: free disk space, then python -c \"from ionllama.train.checkpoint import "
                            f"load_model, export_safetensors as x; x(load_model('{self.run_dir / 'final.pt'}'), "
                            f"'{self.run_dir / 'final.safetensors'}')\"") from None
        _say(f"done: {self.step} steps, {self.bytes_seen:,} bytes in {self.train_time:.1f} s of training; best val bpb "
             f"{self.best_val_bpb:.4f}; checkpoints in {self.run_dir}")
        # everything is saved: Ctrl-C now stops the sample or the benchmark at once (the training handler said
        # "finishing this step and saving" and let them run on); one received during the final save ends here
        got = getattr(self, "_stop", None)
        if got is not None:
            got.restore()
            if got.signum is not None:
                _say(f"stopped after the final checkpoint ({signal.Signals(got.signum).name}); sample and benchmark "
                     "skipped")
                if self.par.distributed:  # exit after the closing barrier, as a stop mid-run does (train() raises)
                    return {"run_dir": str(self.run_dir), "step": self.step, "exit_code": 128 + got.signum}
                raise SystemExit(128 + got.signum)
        if a.sample_bytes > 0:
            prompt = self._sample_prompt()
            text = sample_bytes(model, prompt, a.sample_bytes, a.seq_len, self.device, seed=a.seed)
            shown = prompt.lstrip(DOC_SEP_BYTES).decode("utf-8", "replace")
            # decoded together: the prompt (cut at 48 bytes) may end inside a character that the continuation
            # completes; decoded apart, each half showed as U+FFFD
            sample = (prompt.lstrip(DOC_SEP_BYTES) + text).decode("utf-8", "replace")
            (self.run_dir / "sample.txt").write_text(sample, encoding="utf-8")
            _say(f"--- sample (prompt: {shown!r}) ---\n{sample}\n--- end of sample ---")
        if a.benchmark_after:
            self._benchmark()
        return {"run_dir": str(self.run_dir), "step": self.step, "best_val_bpb": self.best_val_bpb,
                "train_time_s": self.train_time}

    def _sample_prompt(self) -> bytes:
        if self.args.sample_prompt is not None:
            return DOC_SEP_BYTES + self.args.sample_prompt.encode("utf-8", "surrogateescape")
        if self.val is None:
            from ..data import tasks

            return DOC_SEP_BYTES + tasks.make_examples("add", "val", 1, seed=0)[0][0]
        val = self.val_bytes  # the text: a BPE run's self.val holds token ids (its prompt was '')
        head = bytes(val[: min(len(val), 4096)])
        doc = head[1:].split(DOC_SEP_BYTES)[0]
        line_end = doc.find(b"\n", 16)
        cut = min(48, line_end + 1 if 0 < line_end < 48 else 48)
        return DOC_SEP_BYTES + doc[:cut]

    def _benchmark(self) -> None:
        if importlib.util.find_spec("ionllama.eval.benchmark") is None:
            warnings.warn("--benchmark_after: ionllama.eval.benchmark is not available in this version; skipped",
                          stacklevel=2)
            return
        from ..eval import benchmark

        # the newer of best.pt / best.dcp: a run continued in one process after torchrun (or the reverse) with no new
        # best benchmarked the older format's, an older model
        best = distributed.newest_checkpoint(self.run_dir, "best.pt") or self.run_dir / "best.pt"
        if self.par.distributed:
            # the benchmark reads a .dcp (its training args name the val data; a .safetensors export has none)
            warnings.warn(f"--benchmark_after is not run under torchrun; run `ionllama bench --checkpoint "
                          f"{self.run_dir / 'best.dcp'}` in one process (skipped)", stacklevel=2)
            return
        out = self.run_dir / "benchmark" / "results.json"
        _say(f"benchmark on {best} -> {out}")
        benchmark.main(["--checkpoint", str(best), "--output", str(out)])


def _plain_tuple(v) -> bool:
    return isinstance(v, tuple) and all(isinstance(e, (str, int, float, bool)) for e in v)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The torch seed of rank > 0 of a torchrun job (rank 0 keeps --seed: a 1-process run's stream)."""
    return (seed + 1_000_003 * rank + 7_919 * step) % 2 ** 63


def train(args: argparse.Namespace, explicit: set[str] | None = None) -> dict:
    ctx = distributed.setup(getattr(args, "device", "auto"))  # under torchrun: the process group; else nothing
    finished = False
    save = Path(args.save_dir)
    before = {d.name for d in save.iterdir()} if save.is_dir() else None
    try:
        try:
            result = Trainer(args, explicit, rank=ctx.rank, world_size=ctx.world_size).run()
            finished = True
        except BaseException:
            if ctx.rank == 0:
                _drop_new_empty_folders(save, before)
            raise
        finally:
            distributed.teardown(finished)
    except RuntimeError as e:  # another rank stopped (its own output says why): one line here, not gloo's traceback
        lost = distributed.peer_lost(e) if ctx.enabled and ctx.world_size > 1 else None
        if lost is None:
            raise
        raise lost from None
    code = result.pop("exit_code", None) if isinstance(result, dict) else None
    if code is not None:  # a signalled rank of a torchrun job: its exit status, after every rank's barrier
        raise SystemExit(code)
    return result


def _drop_new_empty_folders(save: Path, before: set[str] | None) -> None:
    """A run refused before it wrote anything (bad data, a flag out of range) leaves no empty run folder (nor an
    empty --save_dir it made) behind; a folder that existed before, or holds anything, is kept."""
    try:
        new = [d for d in save.iterdir() if d.name not in (before or set())] if save.is_dir() else []
    except OSError:
        return  # best effort: the error being raised is the one to show
    for d in new:
        remove_if_empty(d)
    if before is None:
        remove_if_empty(save)
