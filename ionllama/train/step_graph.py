"""The whole training step (forward, backward, gradient clipping, AdamW) captured once as a CUDA graph.

Why: ionLlama's compiled step launches about 1,150 kernels. In the Phase-1 runner the host spent 48.6 ms
per step launching them while the GPU waited (docs/results/phase1-7min.md). A graph replay is one launch.
torch.compile's own CUDA graphs (``--compile_mode reduce-overhead``) refuse ionLlama's step ("tensor(s)
in the cudagraph pool not tracked as outputs"). A capture of the whole step has no such check, and it also
takes in the optimizer, which reduce-overhead leaves outside.

What a captured step needs (``step_graph_problem`` says which one is missing):
  * CUDA, one process (no DDP/FSDP collectives inside the graph);
  * the same shapes every step: a model whose patch count is known from T alone (fixed or byte patching,
    or a baseline). Entropy and space patching read the patch count on the host, which a graph cannot;
  * one micro-batch per step, no fp16 loss scaling (bf16 or fp32);
  * an optimizer built for capture (``make_adamw(..., capturable=True)``); the learning rate becomes one
    device tensor, set in place each step.

The first ``warmup`` calls run the step eagerly on a side stream: they are real training steps, and
compilation and the optimizer's state happen there. The next call records the step (recording runs
nothing) and replays it. Every call copies the batch into the static inputs first. The returned values
are copies, so they survive the next replay.
"""
from __future__ import annotations

import math

import torch

from ..model.ionllama_model import static_patch_count


def static_step_shapes(cfg, seq_len: int) -> bool:
    """Does every training step of this model config have the same shapes (no host read of a patch count)?"""
    return cfg.model != "ionllama" or static_patch_count(cfg, seq_len) is not None


def step_graph_problem(model, args, device: torch.device, world_size: int, amp_dtype) -> str | None:
    """Why the training step cannot be captured as a CUDA graph, or None if it can."""
    cfg = model.config
    if device.type != "cuda":
        return "--step_graph needs a CUDA device"
    if world_size > 1:
        return "--step_graph needs one process (not torchrun with several ranks)"
    if args.grad_accum != 1:
        return "--step_graph needs --grad_accum 1"
    if amp_dtype == torch.float16:
        return "--step_graph does not support fp16 loss scaling; use --mixed_precision bf16 or none"
    if not static_step_shapes(cfg, args.seq_len):
        return (f"--step_graph needs a patch count known from the sequence length (--patching fixed or byte); "
                f"--patching {cfg.patching} reads it on the host every step")
    if getattr(args, "compile_mode", "default") == "reduce-overhead":
        return "--step_graph and --compile_mode reduce-overhead both make CUDA graphs; pick one"
    return None


class StepGraph:
    def __init__(self, fwd, optimizer: torch.optim.Optimizer, grad_clip: float, autocast, warmup: int = 3,
                 graphs: bool = True):
        """fwd(x, y) -> dict with 'loss' (and 'bpb', 'n_patches', 'aux_loss' where the model has them).
        optimizer: built for capture (make_adamw(..., capturable=True)). autocast: a
        callable returning the autocast context. The region opens and closes inside the captured step, so
        autocast's weight-cast cache does not outlive it (it is cleared at exit; the casts are recorded).
        graphs=False runs every step eagerly (the same code; for tests on a CPU)."""
        self.fwd, self.opt, self.grad_clip, self.autocast = fwd, optimizer, grad_clip, autocast
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # the graph reads the learning rate from this tensor: set in place each step, shared by every group
        # (also after a checkpoint's load_state_dict put a number back)
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=self.params[0].device)
        for g in optimizer.param_groups:
            g["lr"] = self.lr
        self.warmup, self.graphs = warmup, graphs
        self.calls = 0
        self.static_x = self.static_y = None
        self.graph = self.outputs = None

    def _body(self) -> dict:
        """One training step on the static inputs; returns tensors the graph writes every replay."""
        # the backward makes fresh gradients: during capture they come from the graph's pool and stay the
        # parameters' .grad, which every replay rewrites (the pattern of PyTorch's whole-network capture)
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.fwd(self.static_x, self.static_y)
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
        return res

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict:
        if self.static_x is None:
            self.static_x = torch.empty_like(x, device=self.lr.device)
            self.static_y = torch.empty_like(y, device=self.lr.device)
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        self.calls += 1
        if not self.graphs:
            return self._body()
        if self.calls <= self.warmup:  # real steps on a side stream, as capture wants (lazy state, compile)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                res = self._body()
            torch.cuda.current_stream().wait_stream(side)
            return {k: v.clone() for k, v in res.items()}
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls (a data loader pinning memory) do not void the capture
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self._body()
        self.graph.replay()
        return {k: v.clone() for k, v in self.outputs.items()}

