"""Pieces of a faked torch.cuda for CPU tests of CUDA-only paths (which device is current, which stream waits)."""
from __future__ import annotations

import contextlib

import torch


def device_switch(cur: list):
    """A stand-in for torch.cuda.device: within the block cur[0] names the given device ("cuda:0", "cpu", ...)."""
    @contextlib.contextmanager
    def device(d):
        prev, cur[0] = cur[0], str(torch.device(d))
        try:
            yield
        finally:
            cur[0] = prev
    return device
