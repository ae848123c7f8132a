"""Programmatic dependent launch (PDL, compute capability >= 9) for the decode kernels.

Why: a batch-1 decode step is a chain of GEMV-sized kernels that each take 2.6-4.8 µs for a few hundred ns of
weight traffic (docs/results/generation.md, ninth session): the rest is launch latency and the first round
trip to memory. Launched with PDL, a kernel may start while the previous kernel in the stream is still
running. It then loads what no kernel of the step writes (its weight tiles, norm weights), waits
(`griddepcontrol.wait`: the previous kernel has finished and its writes are visible), and only then reads
activations or state and writes anything. Right after its wait it lets the next kernel launch
(`griddepcontrol.launch_dependents`), so at most one kernel runs ahead, holding its prefetched weights.

The rule every kernel using `gdc_wait` / `gdc_launch` keeps: before `gdc_wait`, load only parameters (never a
tensor that any kernel of the step writes: activations, caches, positions, derived tables such as the decay)
and store nothing. CUDA graphs keep the programmatic edges of a captured stream (CUDA >= 12.3).

Off under the Triton CPU interpreter (inline PTX) and before Hopper; `set_pdl(False)` turns it off for A/B
runs (benchmarks/profile_decode_step.py --sweep_lnn --grid pdl=0,1).
"""
from __future__ import annotations

import functools
import os

import torch

try:  # set_pdl / pdl_enabled work without Triton (benchmarks import them on any machine)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_STATE = {"on": True}


def set_pdl(on: bool) -> bool:
    """Turn PDL on or off for later launches; returns the previous setting."""
    old, _STATE["on"] = _STATE["on"], bool(on)
    return old


@functools.lru_cache(maxsize=None)
def _triton_has_pdl() -> bool:
    if triton is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: on, CUDA, not interpreted, sm_90+, a Triton that has it."""
    if not _STATE["on"] or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and _triton_has_pdl()


def pdl_kwargs(device: torch.device) -> dict:
    """Launch keywords: the kernel's GDC constexpr and, when on, Triton's launch_pdl option."""
    on = pdl_enabled(device)
    return {"GDC": on, "launch_pdl": True} if on else {"GDC": False}


if triton is not None:
    @triton.jit
    def gdc_wait(GDC: tl.constexpr):
        """Wait for the previous kernel of the stream (a no-op when GDC is off)."""
        if GDC:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def gdc_launch(GDC: tl.constexpr):
        """Let the next kernel of the stream launch (a no-op when GDC is off)."""
        if GDC:
            tl.extra.cuda.gdc_launch_dependents()
