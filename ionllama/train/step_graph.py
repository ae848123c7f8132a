"""The whole training step (forward, backward, gradient clipping, AdamW) captured once as a CUDA graph.

Why: ionLlama's compiled step launches about 1,150 kernels. In the Phase-1 runner the host spent 48.6 ms
per step launching them while the GPU waited (docs/results/phase1-7min.md). A graph replay is one launch.
torch.compile's own CUDA graphs (``--compile_mode reduce-overhead``) refused ionLlama's step in the fifth
session ("tensor(s) in the cudagraph pool not tracked as outputs"); in the sixth they replayed fixed
patching as fast as this (docs/results/train-profile.md). A capture of the whole step also takes in the
clipping and the optimizer, which reduce-overhead leaves outside, and works with the two-stage step below.

What a captured step needs (``step_graph_problem`` says which one is missing):
  * CUDA, one process (no DDP/FSDP collectives inside the graph);
  * one micro-batch per step, no fp16 loss scaling (bf16 or fp32);
  * an optimizer built for capture (``make_adamw(..., capturable=True)``); the learning rate becomes one
    device tensor, set in place each step;
  * a phase whose step can be captured (``capture_problem``, the one rule for the trainer and the
    experiment runner): not the joint phase, which trains the entropy model, so the boundaries it draws
    change inside the step (the trainer runs that phase uncaptured and says so once).

Shapes. A graph replays fixed shapes. Fixed and byte patching (and the baselines) know the patch count
from T: one graph. Entropy and space patching size the latent sequence by the batch's largest patch
count, which the host must read. Their step runs in two stages:
  A. without gradients: the patch boundaries (``IonLlama.patch_boundaries``: the frozen entropy model's
     entropy or the space rule, then the patcher, as the forward does) and the largest count; the host
     reads that count once and rounds it up to a bucket (``latent_bucket``). Its shapes are fixed, so after
     its warm-up calls it is a CUDA graph of its own too (one launch instead of the eager entropy model and
     patcher's ops: 303 top-level aten ops for `small`, counted on a CPU; its own memory pool, its results
     written into static tensors);
  B. the rest of the step, one CUDA graph per bucket: the forward given those boundaries and the
     bucket's latent length (no host read, and the frozen entropy model is not run again), backward,
     clipping, AdamW. The padding patches sit after every real one, and the latent attention is causal,
     so they change no real output (tests/test_step_graph.py). All graphs share one memory pool; at most
     ``MAX_GRAPHS`` are made, a batch of a further bucket pads to the smallest captured bucket that holds it,
     or, beyond the largest, runs the step eagerly (one warning).
The read stalls the host until the GPU has finished the previous step and stage A; the GPU then waits only
for the host to pick the graph and launch it.

The first ``warmup`` calls of each graph run the step eagerly on a side stream: they are real training
steps, and compilation (torch.compile sees a new latent length) and the optimizer's state happen there.
The next call records the step (recording runs nothing) and replays it. Every call copies the batch into
the static inputs first. The returned values are copies, so they survive the next replay.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from ..devices import reusable_stream
from ..model.ionllama_model import PATCH_PAD, static_patch_count

MAX_GRAPHS = 8  # captured graphs (latent-length buckets) per StepGraph; further buckets run eagerly


def bucket_width(T: int) -> int:
    """Width of a latent-length bucket for windows of T bytes: T/32 rounded up to PATCH_PAD, at least PATCH_PAD.

    Why this width: each bucket costs a graph capture after its own eager warm-up steps, and, until the
    compiled forward treats the latent length as dynamic, a torch.compile specialisation; so buckets must
    be coarse. A row has at most T patches, so with width ~T/32 there are at most 32 (+1) buckets for any
    data, and with a calibrated threshold (or the space rule on one kind of text) the batch's largest
    count stays near T / bytes-per-patch, so steps mostly fall into a few neighbouring buckets, which
    MAX_GRAPHS covers. The price is padding: up to width - 1 latent positions per row beyond the largest
    count (the ordinary forward pads to PATCH_PAD). At 4 bytes per patch a full bucket's padding is 1/8 of
    the real patch count; the byte-level encoder and decoder do not depend on it. For short windows
    (T <= 32 * PATCH_PAD) the width is PATCH_PAD: the same latent length as the ordinary forward."""
    return max(PATCH_PAD, -(-(T // 32) // PATCH_PAD) * PATCH_PAD)


def latent_bucket(n_max: int, T: int) -> int:
    """The latent length the two-stage step uses when the batch's largest patch count is n_max."""
    w = bucket_width(T)
    return max(w, -(-int(n_max) // w) * w)


def static_step_shapes(cfg, seq_len: int) -> bool:
    """Is the patch count known from the sequence length alone (one graph, no stage A)? True for the
    baselines and for fixed or byte patching; entropy and space patching need the two-stage step."""
    return cfg.model != "ionllama" or static_patch_count(cfg, seq_len) is not None


def capture_problem(cfg, phase: str = "main") -> str | None:
    """Why no training step of `phase` can be captured for this model config, or None if it can: the one rule
    that the trainer (per phase) and the experiment runner (main phase, before passing --step_graph) ask.

    The entropy phase trains the entropy model alone: static shapes, one graph. The main phase: one graph,
    or the two-stage step for entropy and space patching. The joint phase trains the entropy model
    alongside, so the boundaries it draws and their count come from weights that change inside the step:
    not captured."""
    if phase == "joint":
        return "the joint phase trains the entropy model, whose patch boundaries then change inside the step"
    return None


def step_graph_problem(model, args, device: torch.device, world_size: int, amp_dtype) -> str | None:
    """Why the training step cannot be captured as a CUDA graph, or None if it can (main phase; the trainer
    runs a phase that ``capture_problem`` refuses without the graph)."""
    cfg = model.config
    if device.type != "cuda":
        return "--step_graph needs a CUDA device (it captures CUDA graphs); drop --step_graph on CPU"
    if world_size > 1:
        return "--step_graph needs one process (not torchrun with several ranks)"
    if args.grad_accum != 1:
        return "--step_graph needs --grad_accum 1"
    if amp_dtype == torch.float16:
        return "--step_graph does not support fp16 loss scaling; use --mixed_precision bf16 or none"
    problem = capture_problem(cfg, "main")
    if problem:
        return f"--step_graph: {problem}"
    if not static_step_shapes(cfg, args.seq_len) and not hasattr(model, "patch_boundaries"):
        return f"--step_graph: model {cfg.model} reads its sequence length on the host and has no patch_boundaries"
    if getattr(args, "compile_mode", "default") == "reduce-overhead":
        return "--step_graph and --compile_mode reduce-overhead both make CUDA graphs; pick one"
    return None


def stage_a_for(model, seq_len: int, phase: str = "main", compiled: bool = False) -> Callable | None:
    """Stage A of `phase`'s step: x -> (patch_starts, n_patches), or None where the shapes are fixed (one graph).
    compiled: torch.compile it (before it is captured). Why: the compiled forward does not include stage A, so it
    would run as eager ops; the entropy model's chunked SSD makes large fp32 intermediates (decay and score
    tensors of L x L per chunk and head) that inductor fuses. Its boundaries may differ from the eager ones only
    where an entropy sits on the threshold (kernel arithmetic); the step then uses its own boundaries
    consistently. Measured (H200, ionLlama-small, `docs/results/train-profile.md`, fourteenth session): the
    captured step 29.5 -> 27.6 ms at seq 1024 x 64 and 30.5 -> 28.3 ms at 8192 x 8. The trainer compiles it
    with --compile (--compile_stage_a auto)."""
    if phase == "entropy" or static_step_shapes(model.config, seq_len):
        return None
    return torch.compile(model.patch_boundaries, dynamic=False) if compiled else model.patch_boundaries


def make_step_graph(model, fwd, optimizer: torch.optim.Optimizer, grad_clip: float, autocast, seq_len: int,
                    phase: str = "main", compile_stage_a: bool = False, stage_a: Callable | None = None,
                    **kw) -> "StepGraph":
    """The StepGraph for `phase` of `model` (the plain module; `fwd` is what the step calls: the compiled
    model, or the entropy model in the entropy phase): two-stage where the patch count depends on the bytes.
    compile_stage_a: stage A through torch.compile (stage_a_for). stage_a: a stage A already made by
    stage_a_for (the trainer's, which its compile warm-up has called), used instead."""
    if stage_a is None:
        stage_a = stage_a_for(model, seq_len, phase, compile_stage_a)
    return StepGraph(fwd, optimizer, grad_clip, autocast, boundaries=stage_a, **kw)


class _Slot:
    """One latent length's graph: calls so far (the first `warmup` run eagerly), the graph and its outputs."""

    def __init__(self):
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict | None = None


class StepGraph:
    def __init__(self, fwd, optimizer: torch.optim.Optimizer, grad_clip: float, autocast, warmup: int = 3,
                 graphs: bool = True, boundaries: Callable | None = None, max_graphs: int = MAX_GRAPHS):
        """fwd(x, y) -> dict with 'loss' (and 'bpb', 'n_patches', 'aux_loss' where the model has them); with
        `boundaries`, fwd(x, y, patch_starts=..., latent_len=...). optimizer: built for capture
        (make_adamw(..., capturable=True)). autocast: a callable returning the autocast context. The region
        opens and closes inside the captured step, so autocast's weight-cast cache does not outlive it (it is
        cleared at exit; the casts are recorded). graphs=False runs every step eagerly (the same code, the
        same bucket bookkeeping; for tests on a CPU).
        boundaries: stage A of the two-stage step, x -> (patch_starts, n_patches) (IonLlama.patch_boundaries),
        or None when the shapes are fixed (one graph). max_graphs: graphs (buckets) at most."""
        self.fwd, self.opt, self.grad_clip, self.autocast = fwd, optimizer, grad_clip, autocast
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # the graph reads the learning rate from this tensor: set in place each step, shared by every group
        # (also after a checkpoint's load_state_dict put a number back)
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=self.params[0].device)
        for g in optimizer.param_groups:
            g["lr"] = self.lr
        self.warmup, self.graphs = warmup, graphs
        self.boundaries, self.max_graphs = boundaries, max_graphs
        self.calls = 0
        self.static_x = self.static_y = self.static_starts = None
        self.slots: dict[int | None, _Slot] = {}  # latent length (None: fixed shapes) -> its graph
        self.uncaptured: set[int] = set()  # latent lengths beyond max_graphs: their steps run eagerly
        self.latent_len: int | None = None  # this step's (two-stage step)
        self.pool = None  # one memory pool for all graphs (torch.cuda.graph_pool_handle)
        self.static_nmax = None  # stage A's largest patch count (0-d, read by the host)
        self.a_slot = _Slot()  # stage A's graph (its outputs are static_starts and static_nmax)
        self.graph_stage_a = True  # False: stage A always eager on the current stream (for A/B timing)

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The first captured graph (the only one when the shapes are fixed), or None."""
        return next((s.graph for s in self.slots.values() if s.graph is not None), None)

    def _body(self) -> dict:
        """One training step on the static inputs; returns tensors the graph writes every replay."""
        # the backward makes fresh gradients: during capture they come from the graph's pool; they are
        # dropped again at the end, like the trainer's plain step does, so nothing but the returned values
        # lives from one replay to the next (what lets the buckets' graphs share one pool in any order)
        self.opt.zero_grad(set_to_none=True)
        kw = {} if self.boundaries is None else {"patch_starts": self.static_starts, "latent_len": self.latent_len}
        with self.autocast():
            out = self.fwd(self.static_x, self.static_y, **kw)
            total = out["loss"]
            if out.get("aux_loss") is not None:
                total = total + out["aux_loss"]
        total.backward()
        loss = out["loss"].detach().float()
        res = {"loss": loss, "bpb": out["bpb"].detach().float() if out.get("bpb") is not None else loss / math.log(2),
               "patches": out["n_patches"].detach().sum() if out.get("n_patches") is not None
               else torch.full((), self.static_x.numel(), device=loss.device, dtype=torch.long)}
        if self.grad_clip > 0:  # foreach norm and scale: no host sync
            res["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return res

    def _stage_a_body(self) -> None:
        """Patch boundaries of the static batch into static_starts, the largest count into static_nmax."""
        with torch.no_grad(), self.autocast():  # the forward's entropy runs under the same autocast
            starts, n_patches = self.boundaries(self.static_x)
            if self.static_starts is None:  # the first call (eager): the static outputs get their shapes
                self.static_starts = torch.empty_like(starts)
                self.static_nmax = torch.empty((), dtype=n_patches.dtype, device=n_patches.device)
            self.static_starts.copy_(starts)
            self.static_nmax.copy_(n_patches.max())

    def _stage_a(self) -> int:
        """Stage A (eager for its first `warmup` calls, on a side stream as capture wants; then recorded once
        and replayed); -> the bucketed latent length (the host read of the step)."""
        slot = self.a_slot
        slot.calls += 1
        if not (self.graphs and self.graph_stage_a):
            self._stage_a_body()
        elif slot.calls <= self.warmup:
            side = reusable_stream(self.lr.device, "warm_up_stage_a")  # kept: see reusable_stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._stage_a_body()
            torch.cuda.current_stream().wait_stream(side)
        else:
            if slot.graph is None:
                slot.graph = torch.cuda.CUDAGraph()
                # a pool of its own: its temporaries never share memory with the step graphs'
                with torch.cuda.graph(slot.graph, pool=torch.cuda.graph_pool_handle(), stream=self._capture_stream(),
                                      capture_error_mode="thread_local"):
                    self._stage_a_body()
            slot.graph.replay()
        return latent_bucket(int(self.static_nmax), self.static_x.shape[1])

    def _capture_stream(self):
        # not torch.cuda.graph's default: one stream per process, made on whichever device was current at its first
        # capture; on another device's stream the step's kernels run eagerly and the graph is empty
        return reusable_stream(self.lr.device, "step_capture")

    def _route(self, key: int | None) -> int | None:
        """The latent length this step runs at: its own bucket, or, once the graph cap is reached, the smallest
        bucket with a graph that holds it (the forward pads the latent sequence to that length; padded patches
        come after every real one, so the causal latent layers give the real patches the same outputs)."""
        if key is None or key in self.slots or len(self.slots) < self.max_graphs:
            return key
        bigger = [k for k in self.slots if k is not None and k >= key]
        return min(bigger) if bigger else key

    def _slot(self, key: int | None) -> _Slot | None:
        """The graph slot of this latent length, made if the cap allows; None: run this step eagerly."""
        slot = self.slots.get(key)
        if slot is None and key not in self.uncaptured:
            if len(self.slots) < self.max_graphs:
                slot = self.slots[key] = _Slot()
            else:
                if not self.uncaptured:
                    warnings.warn(f"--step_graph: a batch needs {key} latent positions, more than the largest of "
                                  f"the {self.max_graphs} buckets with graphs ({sorted(self.slots)}); steps of such "
                                  "buckets run eagerly, not captured (smaller ones pad to a captured bucket)",
                                  stacklevel=3)
                self.uncaptured.add(key)
        return slot

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict:
        if not self.graphs:
            return self._step(x, y, lr)
        # on the model's GPU, which need not be the current device (train --device cuda:1 sets none): the side
        # streams' waits and the captures are then that device's, where the batch is copied in and the step runs
        with torch.cuda.device(self.lr.device):
            return self._step(x, y, lr)

    def _step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict:
        if self.static_x is None:
            self.static_x = torch.empty_like(x, device=self.lr.device)
            self.static_y = torch.empty_like(y, device=self.lr.device)
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        self.calls += 1
        self.latent_len = self._route(self._stage_a()) if self.boundaries is not None else None
        slot = self._slot(self.latent_len)
        if slot is None:  # past the graph cap: the same step, uncaptured
            return self._body()
        slot.calls += 1
        if not self.graphs:
            return self._body()
        if slot.calls <= self.warmup:  # real steps on a side stream, as capture wants (lazy state, compile)
            side = reusable_stream(self.lr.device, "warm_up")  # kept: see reusable_stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                res = self._body()
            torch.cuda.current_stream().wait_stream(side)
            return {k: v.clone() for k, v in res.items()}
        if slot.graph is None:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            slot.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls (a data loader pinning memory) do not void the capture
            with torch.cuda.graph(slot.graph, pool=self.pool, stream=self._capture_stream(),
                                  capture_error_mode="thread_local"):
                slot.outputs = self._body()
        slot.graph.replay()
        return {k: v.clone() for k, v in slot.outputs.items()}
