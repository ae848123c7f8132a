"""Read a small device value on the host without draining the GPU's queue first.

`int(t)` on a CUDA tensor waits for every kernel queued before it and then for the host to queue the
next ones, so the GPU idles while the host launches what follows. ionLlama's forward needs the patch
count on the host (the latent length), but only after the embedding and encoder, which do not depend on
it. `start_read` queues an asynchronous copy into pinned host memory and an event; the caller then
queues the encoder; `finish_read` waits only for that event, so the GPU runs the encoder meanwhile.
Both are opaque to torch.compile (each is one graph break, where `int(t)` was one too).
"""
from __future__ import annotations

import torch


class PendingRead:
    __slots__ = ("value", "buf", "event")

    def __init__(self, value=None, buf=None, event=None):
        self.value, self.buf, self.event = value, buf, event


@torch.compiler.disable
def start_read(t: torch.Tensor) -> PendingRead:
    """Begin reading the one-element tensor `t` (an integer count) on the host."""
    t = t.detach().reshape(())
    if not t.is_cuda:
        return PendingRead(value=int(t))
    buf = torch.empty((), dtype=t.dtype, pin_memory=True)  # the host allocator caches pinned blocks
    buf.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PendingRead(buf=buf, event=event)


@torch.compiler.disable
def finish_read(p: PendingRead) -> int:
    """The value; waits only for the copy queued by start_read, not for work queued after it."""
    if p.value is None:
        p.event.synchronize()
        p.value = int(p.buf)
    return p.value
