"""The one check of a --device name, shared by train, generate, bench and the benchmarks: a bad name is one line
before any work, not a failure later blamed on a checkpoint or a traceback from the first CUDA call."""
from __future__ import annotations

import threading

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    # torch parses meta, xpu, ipu, ... too: they failed later, blamed on a checkpoint or in a traceback
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise UserError("--device mps but MPS is not available on this machine; use --device cpu")
    return dev


_STREAMS: dict = {}


def reusable_stream(device, role: str, priority: int = 0) -> torch.cuda.Stream:
    """One CUDA stream per (device, role, priority, thread), made on first use and kept. Why: torch keeps a cuBLAS
    workspace (32 MiB on Hopper) for every stream a matmul has run on and never frees it, so a fresh stream per
    generate() call (its warm-up and capture streams) grew allocated memory by 64 MiB a call on an H100
    (tests/test_decode_fast.py -k repeated, forty-sixth session). Per thread, so one thread's entries are its own;
    torch.cuda.Stream() draws round robin from a pool of 32 streams per device and priority, so two entries may
    still be one CUDA stream (as fresh streams could be before): safe, since every user orders its stream with
    wait_stream / synchronize rather than assuming it idle."""
    dev = torch.device(device)
    if dev.type != "cuda":  # only tests that fake torch.cuda on CPU tensors get here: nothing to keep
        return torch.cuda.Stream()
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    key = (index, role, priority, threading.get_ident())
    s = _STREAMS.get(key)
    if s is None:
        s = _STREAMS[key] = torch.cuda.Stream(torch.device("cuda", index), priority=priority)
    return s
