"""Training on several processes under torchrun: process group, DDP / FSDP2, gradient-sync control,
rank-0 helpers, and sharded checkpoints (torch.distributed.checkpoint) that resume on any number of
processes.

`setup()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pins cuda:LOCAL_RANK and starts the process
group (NCCL on CUDA, gloo on CPU). A plain `python train_cloud.py` run gets a disabled DistContext and
`Parallel(mode='none')`, which changes nothing. The trainer asks `Parallel` for the module a phase trains
(`train_module`), for gradient-sync control during accumulation (`grad_sync`) and for checkpoint I/O.

Checkpoints of a distributed run are folders `<name>.dcp/` (DCP shards + `.metadata` + `train_state.pt`,
the step / phase / RNG / args written by rank 0). They load on any number of processes, in DDP, FSDP or
a plain single-process run, and `load_model('<run>/best.dcp')` rebuilds the full model on one process."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import shutil
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import PeerLostError, RelayedError, UserError, first_line

# NVLink multicast (NVLS) stays off in every process: set before the process group starts.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PARALLEL_CHOICES = ("auto", "ddp", "fsdp")
FSDP_AUTO_SIZES = ("base", "large", "xl")  # --parallel auto shards these; tiny / small are replicated (DDP)
DCP_SUFFIX = ".dcp"
TRAIN_STATE_FILE = "train_state.pt"


# ---------------------------------------------------------------------------------------- process group

@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (SUM / world: gloo has no AVG)."""
        if not self.enabled or self.world_size == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world_size

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (exact for integer counts in float64)."""
        if not self.enabled or self.world_size == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (collective)."""
        if not self.enabled or self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on any (collective: call at the same steps on all ranks)."""
        if not self.enabled or self.world_size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def on_main(self, fn):
        """Run fn on rank 0 and give its result to every rank; a UserError raised there is raised
        everywhere (so no rank waits forever for a broadcast that never comes)."""
        if not self.enabled:
            return fn()
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except UserError as e:
                box[0] = ("error", str(e))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            if self.is_main:
                raise UserError(value)
            raise RelayedError(value)
        return value

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. builds the data cache), the others after it finished. If rank 0 fails
        there, the others stop with its error (they used to die in the barrier with a connection traceback)."""
        if not self.enabled:
            yield
            return
        if not self.is_main:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None:
                raise RelayedError(box[0])
            yield
            return
        try:
            yield
        except BaseException as e:
            why = str(e) if isinstance(e, UserError) else f"rank 0 failed ({type(e).__name__}); see its output"
            dist.broadcast_object_list([why], src=0)
            raise
        dist.broadcast_object_list([None], src=0)


_CONTEXT = DistContext()


def context() -> DistContext:
    return _CONTEXT


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun (or any launcher setting its variables)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError("RANK / WORLD_SIZE / LOCAL_RANK are not integers; launch with torchrun") from None
    return rank, world, local


def setup(device: str = "auto", timeout_min: float = 30.0) -> DistContext:
    """Start the process group when launched by torchrun; a no-op otherwise."""
    global _CONTEXT
    env = torchrun_env()
    if env is None:
        _CONTEXT = DistContext()
        return _CONTEXT
    for k, v in MULTICAST_OFF.items():
        os.environ.setdefault(k, v)
    rank, world, local = env
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device} under torchrun: each process uses cuda:LOCAL_RANK (or the CPU); "
                        "pass --device cuda, cpu or auto")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; lower "
                            "--nproc_per_node")
        torch.cuda.set_device(local)  # torch.device('cuda') now means cuda:LOCAL_RANK in this process
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        kw = {"device_id": torch.device("cuda", local)} if use_cuda else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min), **kw)
    _CONTEXT = DistContext(rank, world, local, backend)
    if rank != 0 and not os.environ.get("IONLLAMA_LOG_ALL_RANKS"):
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the run; errors still reach stderr
    return _CONTEXT


def teardown(finished: bool = False) -> None:
    """End the process group. finished=True (every rank got through): wait for all ranks first, so
    none tears down while another still talks to it; after an error the others may be gone, so no wait."""
    global _CONTEXT
    if _CONTEXT.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
    if _CONTEXT.enabled and _CONTEXT.rank != 0 and sys.stdout is not sys.__stdout__:
        sys.stdout.close()
        sys.stdout = sys.__stdout__
    _CONTEXT = DistContext()


# what a collective raises when another process of the job is gone (gloo: its socket closed; NCCL: it exited)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def peer_lost(e: BaseException) -> PeerLostError | None:
    """The one-line error for a collective that failed because another process stopped (it says why itself), or None
    for any other failure. Every other rank died with gloo's "Connection closed by peer" traceback when one rank alone
    was refused mid-run (its data, its memory)."""
    if not isinstance(e, RuntimeError):  # (torch's DistBackendError / DistNetworkError are RuntimeErrors)
        return None
    text = str(e)
    why = next((s for s in _PEER_GONE if s in text), None)
    if why is None or not (isinstance(e, getattr(dist, "DistError", ())) or "gloo" in text or "NCCL" in text):
        return None  # (a closed connection of something else, e.g. a download: not another rank's failure)
    return PeerLostError(f"another process of this torchrun job stopped ({why}), so this one stopped too; its own "
                         "output says why (torchrun's report names its rank)")


def resolve_parallel(choice: str, size: str, ctx: DistContext) -> str:
    """-> 'none' (plain run), 'ddp' or 'fsdp'."""
    if choice not in PARALLEL_CHOICES:
        raise UserError(f"unknown --parallel '{choice}'; choose one of {', '.join(PARALLEL_CHOICES)}")
    if not ctx.enabled:
        if choice != "auto":
            raise UserError(f"--parallel {choice} needs several processes; launch with "
                            "`torchrun --nproc_per_node N train_cloud.py ...` (or drop --parallel)")
        return "none"
    if choice == "auto":
        return "fsdp" if size in FSDP_AUTO_SIZES else "ddp"
    return choice


# ---------------------------------------------------------------------------------------- wrapping

def _fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:
        raise UserError(f"--parallel fsdp needs torch >= 2.6 (FSDP2 fully_shard); this is torch "
                        f"{torch.__version__}; upgrade torch or use --parallel ddp") from None
    return fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units: every element of every nn.ModuleList (the blocks of each stack), top-down, not
    descending into a unit; the root keeps the rest (embeddings, head, norms)."""
    units: list[nn.Module] = []

    def visit(mod: nn.Module) -> None:
        for child in mod.children():
            if isinstance(child, nn.ModuleList):
                for block in child:
                    if any(True for _ in block.parameters()):
                        units.append(block)
            else:
                visit(child)

    visit(model)
    return units


class _EntropyView(nn.Module):
    """The entropy model called through the FSDP root (so the root's pre-forward gathers what it needs);
    train()/eval() reach the entropy model. Holds the model outside the module tree."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)

    def forward(self, x, targets=None):
        return self._model.entropy_forward(x, targets)

    def train(self, mode: bool = True):
        super().train(mode)
        self._model.entropy_model.train(mode)
        return self


def _entropy_forward(self, x, targets=None):
    return self.entropy_model(x, targets)


class Parallel:
    """How this process trains: mode 'none' (plain), 'ddp' (replicated) or 'fsdp' (sharded)."""

    def __init__(self, ctx: DistContext, mode: str, device: torch.device, amp_dtype: torch.dtype | None):
        if mode == "fsdp" and amp_dtype == torch.float16:
            raise UserError("--parallel fsdp with fp16 is not supported (GradScaler would need cross-rank inf "
                            "checks); use --mixed_precision bf16 or none")
        self.ctx, self.mode, self.device, self.amp_dtype = ctx, mode, device, amp_dtype
        self.model: nn.Module | None = None
        self.fwd: nn.Module | None = None
        self._ddp: nn.Module | None = None
        self._ddp_phase: str | None = None
        self._probe: dict | None = None
        self._find_unused = False

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    def describe(self) -> str:
        if self.mode == "none":
            return "1 process"
        extra = ""
        if self.mode == "fsdp":
            dt = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"
            extra = f", params/reduce in {dt}, fp32 master weights"
        return f"{self.mode} over {self.ctx.world_size} processes ({self.ctx.backend}{extra})"

    # -------------------------------------------------------------- model
    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: fully_shard every block, then the root (in place; parameter names do not change).
        Other modes: the model as it is. Call after loading weights, before making the optimizer."""
        self.model = model
        if self.mode != "fsdp":
            return model
        fully_shard, MixedPrecisionPolicy, register_method = _fsdp_api()
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.ctx.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=self.amp_dtype) if self.amp_dtype \
            else MixedPrecisionPolicy()  # params stay fp32 in the optimizer: the sharded fp32 copy is the master
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        # methods that run sub-modules without model.forward must still pass through the root's hooks
        if hasattr(model, "entropy_model"):
            model.entropy_forward = _entropy_forward.__get__(model, type(model))
            register_method(model, "entropy_forward")
        for name in ("calibrate_threshold",):
            if hasattr(model, name):
                register_method(model, name)
        return model

    def attach(self, model: nn.Module, fwd: nn.Module) -> None:
        """fwd: what the main phases call (the model, or its torch.compile wrapper)."""
        self.model, self.fwd = model, fwd

    def entropy_module(self) -> nn.Module:
        """The entropy model as this process may call it outside training (evaluation)."""
        if self.mode == "fsdp":
            return _EntropyView(self.model)
        return self.model.entropy_model

    def train_module(self, phase: str) -> nn.Module:
        """What a training step of `phase` calls: x, y -> output dict."""
        target = self.model.entropy_model if phase == "entropy" else self.fwd
        if self.mode == "none":
            return target
        if self.mode == "fsdp":
            return _EntropyView(self.model) if phase == "entropy" else target
        if self._ddp_phase != phase:  # a new phase trains other parameters: a new DDP wrapper
            self._drop_ddp()
            self._ddp_phase = phase
            self._start_probe(target)
        if self._probe is not None:
            return target  # the phase's first step: plain module, gradients averaged in after_backward
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            kw = {"device_ids": [self.device.index if self.device.index is not None
                                 else torch.cuda.current_device()]} if self.device.type == "cuda" else {}
            self._ddp = DDP(target, find_unused_parameters=self._find_unused, **kw)
        return self._ddp

    def _start_probe(self, target: nn.Module) -> None:
        """DDP needs find_unused_parameters=True (a graph search every step) only if some trainable
        parameter gets no gradient (e.g. an entropy model that a fixed-patching model never runs).
        The phase's first step finds out: it runs without DDP and records which parameters got one."""
        if self.ctx.world_size > 1:  # start from rank 0's weights, as DDP would
            for t in list(target.parameters()) + list(target.buffers()):
                dist.broadcast(t.data, src=0)
        params = [p for p in target.parameters() if p.requires_grad]
        used: set[int] = set()
        hooks = [p.register_post_accumulate_grad_hook(lambda p, used=used: used.add(id(p))) for p in params]
        self._probe = {"params": params, "used": used, "hooks": hooks}

    def _drop_ddp(self) -> None:
        if self._ddp is not None and hasattr(self._ddp, "_remove_autograd_hooks"):
            self._ddp._remove_autograd_hooks()  # else its reducer would still see the next wrapper's grads
        self._ddp = None
        if self._probe is not None:
            for h in self._probe["hooks"]:
                h.remove()
            self._probe = None

    def after_backward(self) -> None:
        """End of a step's backward passes, before the optimizer step. After a probing step: average
        the gradients across ranks by hand (what DDP would have done) and choose the DDP flags."""
        pr = self._probe
        if pr is None:
            return
        params = pr["params"]
        used = torch.tensor([1.0 if id(p) in pr["used"] else 0.0 for p in params], device=self.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
            for p, u in zip(params, used.tolist()):
                if u:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad.div_(self.ctx.world_size)
        self._find_unused = bool((used == 0).any())
        for h in pr["hooks"]:
            h.remove()
        self._probe = None  # the next train_module() call builds the DDP wrapper

    def grad_sync(self, module: nn.Module, enabled: bool):
        """Context for one micro-step: no gradient all-reduce / reduce-scatter unless `enabled` (the last
        micro-step of an accumulation)."""
        if self.mode == "ddp" and not enabled and hasattr(module, "no_sync"):  # (not during a probing step)
            return module.no_sync()
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a per-rank statistic (the logged loss equals one process's at the same
        global batch)."""
        return self.ctx.all_mean(t) if self.distributed else t

    @staticmethod
    def local(t):
        """A DTensor (FSDP grad norm) as a plain tensor."""
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def reshard(self) -> None:
        """FSDP: free the gathered parameters a no-grad forward (evaluation, calibration) leaves on the
        root, so model.parameters() are the sharded ones again (the optimizer must hold those)."""
        if self.mode == "fsdp":
            for m in self.model.modules():
                if hasattr(m, "reshard") and hasattr(m, "_get_fsdp_state"):
                    m.reshard()

    def broadcast_buffers(self) -> None:
        """Rank 0's buffers (e.g. a calibrated entropy threshold) on every rank."""
        if self.distributed and self.ctx.world_size > 1:
            for b in self.model.buffers():
                dist.broadcast(b.data, src=0)

    # -------------------------------------------------------------- checkpoints
    def full_state_dict(self) -> dict | None:
        """The whole model's weights on CPU on rank 0 (None elsewhere); collective under FSDP."""
        if self.mode != "fsdp":
            from .checkpoint import model_state

            return {k: v.detach().cpu() for k, v in model_state(self.model).items()} if self.ctx.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.reshard()
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.ctx.is_main else None

    def plain_model(self, device: torch.device | str = "cpu") -> nn.Module | None:
        """Rank 0: an unsharded copy of the model (for export, sampling); None elsewhere. Collective."""
        sd = self.full_state_dict()
        if not self.ctx.is_main:
            return None
        if self.mode != "fsdp":
            return self.model
        from ..registry import build_model

        plain = build_model(self.model.config)
        plain.load_state_dict(sd, strict=True)
        return plain.to(device).eval()

    def export_safetensors(self, path: Path, metadata: dict | None = None) -> Path | None:
        """Single-file safetensors of the full model (rank 0 writes; collective under FSDP)."""
        from .checkpoint import export_safetensors

        plain = self.plain_model("cpu")
        if plain is None:
            return None
        return export_safetensors(plain, path, metadata)

    def save(self, run_dir: Path, names: tuple[str, ...], optimizer, train_state: dict) -> list[Path]:
        """Sharded checkpoint `<name>.dcp` for each of `names` (written once, hard-linked to the
        others). Collective: every rank calls it."""
        self.reshard()
        return save_sharded(self.ctx, run_dir, names, self.model, optimizer, train_state)

    def load(self, ck: dict, optimizer) -> None:
        """Restore the model (sharded checkpoints) and the optimizer of `ck` into this process's model."""
        if ck.get("sharded_path"):
            load_sharded(ck["sharded_path"], self.model, optimizer)
        elif self.mode == "fsdp":
            load_plain_optimizer_into_fsdp(self.model, optimizer, ck["optimizer"])
        else:
            optimizer.load_state_dict(ck["optimizer"])


# ---------------------------------------------------------------------------------------- checkpoint files

def dcp_name(name: str) -> str:
    """'latest.pt' -> 'latest.dcp'."""
    return (name[:-3] if name.endswith(".pt") else name) + DCP_SUFFIX


def is_sharded_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file() and (p / TRAIN_STATE_FILE).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newer of <run>/latest.pt and <run>/latest.dcp, or None."""
    recover_interrupted_swaps(run_dir)
    return newest_checkpoint(run_dir, "latest.pt")


def newest_checkpoint(run_dir: Path, name: str) -> Path | None:
    """The newer of <run>/<name>.pt and <run>/<name>.dcp, or None: a run continued in the other mode (torchrun or
    one process) leaves the first mode's best / final behind, older."""
    found = []
    if (run_dir / name).is_file():
        found.append((checkpoint_mtime(run_dir / name), run_dir / name))
    found_dcp = run_dir / dcp_name(name)
    if is_sharded_checkpoint(found_dcp):
        found.append((checkpoint_mtime(found_dcp), found_dcp))
    return max(found)[1] if found else None


def checkpoint_mtime(path: Path) -> float:
    return (path / TRAIN_STATE_FILE).stat().st_mtime if path.is_dir() else path.stat().st_mtime


def has_checkpoints(run_dir: Path) -> bool:
    # (an interrupted swap's `.X.dcp.old` is put back first: a fresh run took the folder for empty and its first
    # save deleted the only checkpoint)
    return run_dir.is_dir() and (recover_interrupted_swaps(run_dir) or any(run_dir.glob("*.pt"))
                                 or any(run_dir.glob("*" + DCP_SUFFIX)))


def recover_interrupted_swaps(run_dir: Path) -> list[Path]:
    """A kill between _swap_dir's two renames left `.X.dcp.old` and no `X.dcp`: --resume auto then saw no
    checkpoint and started over (deleting the old one at its first save). Put each such folder back; -> those."""
    back = []
    if not run_dir.is_dir():
        return back
    for old in run_dir.glob(f".*{DCP_SUFFIX}.old"):
        dst = run_dir / old.name[1:-len(".old")]
        if not dst.exists() and is_sharded_checkpoint(old):
            os.replace(old, dst)
            back.append(dst)
    return back


def _swap_dir(tmp: Path, dst: Path) -> None:
    """Put folder tmp at dst; the old dst is renamed away first, then removed (recover_interrupted_swaps puts it
    back after a kill between the two renames)."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    def link(s, d):
        try:
            os.link(s, d)  # shards are never rewritten in place, so a hard link is a safe copy
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _dcp_errors() -> tuple[type[BaseException], ...]:
    """What dcp.load raises for a checkpoint it cannot read or fit. Its CheckpointException (the failure of any
    rank, raised on every rank) derives from BaseException, so `except Exception` let it through as a traceback;
    BaseException in general is not caught (KeyboardInterrupt must still stop)."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # a torch without it: its errors are plain exceptions
        return (Exception,)
    return (Exception, CheckpointException)


def _dcp_causes(e: BaseException) -> list[BaseException]:
    """The per-rank exceptions a CheckpointException wraps ({rank: (exception, traceback)}), or [e]."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return [e]
    return [f[0] if isinstance(f, tuple) else f for f in failures.values() if f is not None] or [e]


def _dcp_failure(e: BaseException) -> tuple[bool, str]:
    """A failed dcp.load -> (mismatch, detail). The planner's missing key / other shape is a checkpoint of another
    model or phase (mismatch); anything else (a truncated or missing shard, an unreadable .metadata) a damaged one."""
    causes = _dcp_causes(e)
    detail = "; ".join(dict.fromkeys(f"{type(c).__name__}: {first_line(c, 100)}" if str(c).strip()
                                     else type(c).__name__ for c in causes))
    return all("Missing key" in str(c) or "mismatch" in str(c).lower() for c in causes), detail


def damaged_sharded(path, detail: str) -> UserError:
    """The one-line error for a .dcp folder that cannot be read, as unreadable_checkpoint is for a .pt."""
    return UserError(f"{path} is damaged ({detail}); use another checkpoint of the run (best.dcp, an older "
                     "step_N.dcp) or resume from it with --resume PATH")


class _QuietDcpLog:
    """DCP logs a failed .metadata read as a warning with its traceback, on the root logger; the load's own error
    (one line) says it."""

    def filter(self, record) -> bool:
        where = record.pathname.replace(os.sep, "/")
        return not (record.levelno <= logging.WARNING and "torch/distributed/checkpoint/" in where)


# What a DCP .metadata file holds. torch reads it with plain pickle.load, which calls whatever a crafted file names
# (an audit's os.system ran on `generate --checkpoint evil.dcp`): ionllama unpickles it first with only these
_DCP_META_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_META_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
_PATH_CLASSES = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_META_GLOBALS or (module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        if module in _DCP_META_MODULES:  # only the dataclasses and enums defined there (filesystem: _StorageInfo)
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module and (
                    module.endswith(".metadata") or name.startswith("_Storage")):
                return obj
        # checked before anything is imported: importing a module a file names can run code too
        raise pickle.UnpicklingError(f"its .metadata names {module}.{name}, which no checkpoint metadata holds; "
                                     "not loaded")


def check_dcp_metadata(path) -> None:
    """Unpickle each .metadata file of a .dcp folder with the classes DCP writes only, so that dcp.load's own
    pickle.load never meets anything else. Raises pickle.UnpicklingError naming what it refused."""
    for f in sorted(p for p in Path(path).iterdir() if p.name.endswith(".metadata")):
        with open(f, "rb") as fh:
            _DcpMetadataUnpickler(fh).load()


SHARD_SUMS = "shard_crc32"  # train state key: {shard file name: CRC-32}, as a .pt's zip records carry theirs


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def shard_sums(folder: Path) -> dict[str, int]:
    return {p.name: _crc32(p) for p in sorted(Path(folder).glob("*.distcp"))}


def check_shard_sums(path) -> None:
    """A flipped bit in a shard loaded as a wrong weight without a word (a .pt's CRCs are checked on load).
    Checkpoints written before the sums were recorded are not checked."""
    from .checkpoint import DamagedCheckpoint, load_weights_only

    try:
        sums = load_weights_only(Path(path) / TRAIN_STATE_FILE, map_location="cpu", mmap=True).get(SHARD_SUMS)
    except Exception:  # noqa: BLE001 - its own load says what is wrong with the train state
        return
    for name, want in (sums or {}).items():
        f = Path(path) / name
        if not f.is_file():
            raise DamagedCheckpoint(f"its shard {name} is missing")
        if _crc32(f) != want:
            raise DamagedCheckpoint(f"its shard {name} fails its checksum")


def _safe_load_planner():
    """DCP's default planner unpickles each non-tensor item of a shard with no restriction: a .metadata of allowed
    classes only could still point an item at a pickle that runs code (a review's reproduction). Each item
    is loaded weights-only first (what DCP stores there, floats, tuples, lists of names, passes); a refusal is an
    UnpicklingError, reported as a damaged checkpoint."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            torch.load(value, weights_only=True)
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeLoadPlanner()


def _dcp_load(sd: dict, path, no_dist: bool) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    check_dcp_metadata(path)
    check_shard_sums(path)
    quiet = _QuietDcpLog()
    logging.getLogger().addFilter(quiet)
    try:
        with warnings.catch_warnings():  # DCP warns on every single-process load, even when asked for one
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(sd, checkpoint_id=str(path), no_dist=no_dist, planner=_safe_load_planner())
    finally:
        logging.getLogger().removeFilter(quiet)


def _state_dicts(model: nn.Module, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def save_sharded(ctx: DistContext, run_dir: Path, names: tuple[str, ...], model: nn.Module, optimizer,
                 train_state: dict) -> list[Path]:
    import torch.distributed.checkpoint as dcp

    from .checkpoint import save_checkpoint

    run_dir = Path(run_dir)
    # latest last, as the .pt path: it records best_val_bpb, so a kill after it and before best.dcp's link left
    # best.dcp an older model for good (the resumed run counted the new best as saved)
    names = tuple(n for n in dict.fromkeys(names) if dcp_name(n) != dcp_name("latest.pt")) + tuple(
        n for n in dict.fromkeys(names) if dcp_name(n) == dcp_name("latest.pt"))[:1]
    first = dcp_name(names[0])
    tmp = run_dir / f".{first}.tmp"
    try:
        if ctx.is_main and tmp.exists():
            shutil.rmtree(tmp)
        ctx.barrier()
        sd = _state_dicts(model, optimizer)
        try:
            dcp.save(sd, checkpoint_id=str(tmp), no_dist=not ctx.enabled)
        except (RuntimeError, *_dcp_errors()[1:]) as e:  # a full disk comes wrapped in DCP's CheckpointException
            raise OSError(_dcp_failure(e)[1]) from None  # (a BaseException): it was a traceback on every rank
        written = []
        if ctx.is_main:  # dcp.save returns once every rank's shard is written
            save_checkpoint({**train_state, SHARD_SUMS: shard_sums(tmp)}, tmp / TRAIN_STATE_FILE)
            _swap_dir(tmp, run_dir / first)
            written.append(run_dir / first)
            for n in names[1:]:
                dst = run_dir / dcp_name(n)
                if dst == written[0]:
                    continue
                t2 = run_dir / f".{dst.name}.tmp"
                if t2.exists():
                    shutil.rmtree(t2)
                _link_tree(written[0], t2)
                _swap_dir(t2, dst)
                written.append(dst)
        ctx.barrier()
        return written
    except OSError as e:
        if ctx.is_main:  # the half-written temp folder, under a name that may never be saved again, stayed for good
            shutil.rmtree(tmp, ignore_errors=True)
        err = UserError(f"could not write a checkpoint in {run_dir} ({e.strerror or e}); free disk space and "
                        "resume with --resume auto (earlier checkpoints are intact)")
        if ctx.enabled and not ctx.is_main:
            raise RelayedError(str(err)) from None
        raise err from None


def load_train_state(path: str | Path) -> dict:
    """The non-tensor part of a sharded checkpoint, shaped like a .pt checkpoint (model / optimizer are
    None; `sharded_path` says where they are)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        found = latest_checkpoint(path) if path.is_dir() else None
        hint = f"; for this run folder's latest, pass {found}" if found else ""  # a run folder given for its file
        raise UserError(f"{path} is not a sharded checkpoint (no .metadata / {TRAIN_STATE_FILE}); pass a "
                        f"<name>.dcp folder written by a torchrun run, or a .pt file{hint}")
    from .checkpoint import DamagedCheckpoint, load_weights_only

    try:
        meta = load_weights_only(path / TRAIN_STATE_FILE, map_location="cpu")
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError) as e:  # what checkpoint.load_checkpoint catches for a .pt
        why = str(e) if isinstance(e, DamagedCheckpoint) else type(e).__name__  # torch's text helps no one
        raise damaged_sharded(path, f"{TRAIN_STATE_FILE}: {why}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise UserError(f"{path / TRAIN_STATE_FILE} is not an ionllama train state; use another checkpoint")
    return {**meta, "model": None, "optimizer": None, "sharded_path": str(path)}


def load_sharded(path: str | Path, model: nn.Module, optimizer) -> None:
    """Model + optimizer from a sharded checkpoint, resharded to this process group (or to one process
    when none is running)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    sd = _state_dicts(model, optimizer)  # the layout wanted here (also creates the optimizer state)
    _drop_state_not_saved(sd["optimizer"], path)
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        _dcp_load(sd, path, no_dist)
    except _dcp_errors() as e:  # a CheckpointException is raised on every rank: rank 0 says it
        mismatch, detail = _dcp_failure(e)
        err = UserError(f"{path} does not match this model / phase ({detail}); resume with the same model, size "
                        "and phases") if mismatch else damaged_sharded(path, detail)
        if not no_dist and dist.get_rank() != 0:
            raise RelayedError(str(err)) from None
        raise err from None
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, sd["optimizer"], options=StateDictOptions(strict=False))  # (as a
    # .pt's optimizer.load_state_dict: a parameter with no saved state has none after the load either)


def _drop_state_not_saved(osd: dict, path) -> None:
    """AdamW keeps no state for a trainable parameter that never got a gradient (the entropy model that space / fixed
    patching never runs), so a run's .dcp holds none for it, but get_state_dict asks for every one: the run's own
    checkpoint was refused as "does not match this model". Such parameters are left out of the load."""
    try:
        with open(Path(path) / ".metadata", "rb") as fh:  # only the classes DCP writes (an unreadable one: the load
            saved = _DcpMetadataUnpickler(fh).load().state_dict_metadata  # below says what is wrong with it)
    except Exception:  # noqa: BLE001
        return
    for fqn, st in list(osd.get("state", {}).items()):
        if not any(f"optimizer.state.{fqn}.{k}" in saved for k in st):  # part of it saved: a mismatch, said by the load
            del osd["state"][fqn]


def load_plain_optimizer_into_fsdp(model: nn.Module, optimizer, plain_osd: dict) -> None:
    """A single-process optimizer state (parameters keyed by index) into an FSDP-sharded optimizer:
    indices -> parameter names (same group order), then set_optimizer_state_dict shards it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    groups = plain_osd["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(h["params"]) for g, h in zip(groups, optimizer.param_groups)):
        raise UserError("the checkpoint's optimizer has other parameter groups than this phase; resume with the "
                        "same model and phases")
    state, new_groups = {}, []
    for g, h in zip(groups, optimizer.param_groups):
        fqns = [names[id(p)] for p in h["params"]]
        for idx, fqn in zip(g["params"], fqns):
            if idx in plain_osd["state"]:
                state[fqn] = plain_osd["state"][idx]
        new_groups.append({**g, "params": fqns})
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": new_groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))  # like load_state_dict:
    # parameters that never got a gradient have no state on either side


def checkpoint_header(path: str | Path) -> dict | None:
    """A checkpoint's train state (step, phase, train_args, ...) without reading its weights: the train state of a
    .dcp folder, an mmap'd load of a .pt. None when it cannot be read (its full load says why, in its own line)."""
    from .checkpoint import load_weights_only

    path = Path(path)
    try:
        state = load_train_state(path) if path.is_dir() else load_weights_only(path, map_location="cpu", mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file: not this function's to report
        return None
    return state if isinstance(state, dict) else None


def load_model_from_sharded(path: str | Path, meta: dict | None = None) -> nn.Module:
    """Rebuild the full model on this one process from a sharded checkpoint (no process group used,
    so rank 0 of a running job may call it alone). meta: its load_train_state, if the caller read it already."""
    from ..config import ModelConfig
    from ..registry import build_model

    meta = meta if meta is not None else load_train_state(path)
    model = build_model(ModelConfig.from_checkpoint(meta["model_config"], path))
    sd = {"model": model.state_dict()}
    try:
        _dcp_load(sd, path, no_dist=True)
    except _dcp_errors() as e:
        mismatch, detail = _dcp_failure(e)
        if mismatch:  # the model its own train state describes: shards of another model, or another version's
            raise UserError(f"{path}: its weights do not fit its own model config ({detail}); use another "
                            "checkpoint") from None
        raise damaged_sharded(path, detail) from None
    model.load_state_dict(sd["model"], strict=True)
    return model


def keep_global_batch(args, ck: dict, world_size: int, explicit: set[str], say) -> None:
    """Resuming on another number of processes: change grad_accum so the global batch (and so the data
    stream, drawn per global batch) stays the checkpoint's, unless --grad_accum was given."""
    pos = ck.get("data_position") or {}
    saved_world, saved_global = pos.get("world_size"), pos.get("global_batch")
    if not saved_world or not saved_global or saved_world == world_size or "grad_accum" in explicit:
        return
    per_step = args.batch_size * world_size
    if saved_global % per_step == 0:
        if args.grad_accum != saved_global // per_step:
            say(f"note: the checkpoint ran with world size {saved_world}, this run with {world_size}: --grad_accum "
                f"{args.grad_accum} -> {saved_global // per_step} keeps the global batch at {saved_global}")
        args.grad_accum = saved_global // per_step
    else:  # the nearest whole grad_accum (the checkpoint's own was kept: 4 windows became 12 in an audit's run)
        accum = max(1, round(saved_global / per_step))
        say(f"note: global batch {saved_global} of the checkpoint is not a multiple of --batch_size {args.batch_size}"
            f" x {world_size} processes; --grad_accum {accum} makes it {accum * per_step}, the nearest, and the data "
            f"stream changes")
        args.grad_accum = accum
