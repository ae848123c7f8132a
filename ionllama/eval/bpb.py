"""Byte-exact evaluation: bits per byte over a whole byte array, every byte scored exactly once.

The array is cut into non-overlapping windows of seq_len + 1 bytes that share one boundary byte:
window i feeds bytes [iT, iT + T) and scores bytes [iT + 1, iT + T + 1), each conditioned only on the
earlier bytes of its own window. The last window is shorter when the length is not a multiple of T.
Byte 0 has no context and is never a target, so `bytes` = len(data) - 1 (or max_bytes).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from ..errors import UserError
from ..model.common import eval_mode

LN2 = math.log(2.0)


class _Totals:
    def __init__(self):
        self.nats = 0.0
        self.bits = 0.0
        self.targets = 0
        self.inputs = 0
        self.patches = 0

    def add(self, model, x: torch.Tensor, y: torch.Tensor, device, amp_dtype) -> None:
        x, y = x.to(device), y.to(device)
        ctx = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            out = model(x, y)
        n = int((y != -100).sum())
        if n == 0:
            return
        loss = float(out["loss"].float())
        bpb = out.get("bpb")
        n_bytes = out.get("n_bytes")
        if n_bytes is not None:  # a token model: loss per token, bpb per byte of its targets; sums go by bytes
            n = int(n_bytes)
            self.bits += float(bpb) * n
            self.nats += float(bpb) * LN2 * n
        else:
            self.nats += loss * n
            self.bits += (float(bpb) if bpb is not None else loss / LN2) * n
        self.targets += n
        # a token model's input is tokens (its n_patches): its out['input_bytes'] gives bytes per token, as
        # evaluate_bpb reports for it (x.numel() / tokens was 1.0 for any tokenizer)
        input_bytes = out.get("input_bytes")
        self.inputs += int(input_bytes) if input_bytes is not None else x.numel()
        n_patches = out.get("n_patches")
        self.patches += int(n_patches.sum()) if n_patches is not None else x.numel()

    def result(self) -> dict:
        if self.targets == 0:
            raise UserError("nothing to evaluate (no scored bytes); give a longer val split")
        loss = self.nats / self.targets
        return {"loss": loss, "bpb": self.bits / self.targets, "ppl": math.exp(min(loss, 50.0)),
                "bytes": self.targets, "bytes_per_patch": self.inputs / max(self.patches, 1)}


@contextlib.contextmanager
def _eval_mode(model):
    with eval_mode(model), torch.no_grad():
        yield


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _as_byte_array(data) -> np.ndarray:
    """A numpy array of byte values (memmaps stay memmaps: no copy of a large val.bin)."""
    if isinstance(data, np.ndarray):
        arr = data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    elif isinstance(data, torch.Tensor):
        arr = data.detach().cpu().numpy()
    elif isinstance(data, (list, tuple)):
        arr = np.asarray(data)
    else:
        raise UserError(f"evaluate_bpb: data must be bytes, a numpy array or a list of byte values (got "
                        f"{type(data).__name__})")
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise UserError(f"evaluate_bpb: data must be one flat sequence of byte values (got shape {arr.shape}, "
                        f"{arr.dtype})")
    problem = byte_value_problem(arr) if arr.size else None  # (empty: the length check below says so)
    if problem:
        raise UserError(f"evaluate_bpb: data {problem}; pass bytes")
    return arr


def byte_value_problem(arr: np.ndarray) -> str | None:
    """Why `arr` cannot be read as bytes as it is, or None. Why: a cast to uint8 would score bytes that are not in
    the data (int16 300 -> 44, float 65.5 -> 65), so evaluate_bpb and the eval-data reader refuse instead."""
    if arr.dtype == np.uint8:
        return None
    if not np.issubdtype(arr.dtype, np.integer):
        return f"holds {arr.dtype} values, not bytes"
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        return f"({arr.dtype}) holds values outside 0..255"
    return None


def evaluate_bpb(model, data: np.ndarray, seq_len: int, batch_size: int, device, max_bytes: int | None = None,
                 amp_dtype: torch.dtype | None = None) -> dict:
    """-> dict(loss (nats/byte), bpb, ppl (per byte), bytes (scored), bytes_per_patch). `data`: a uint8 array or
    memmap (val.bin), bytes, or a list / tensor of byte values."""
    device = _device(device)
    data = _as_byte_array(data)
    # checked before the token branch too: a BPE model got a ZeroDivisionError for seq_len 0 and scored 1 byte for
    # max_bytes -5
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise UserError(f"evaluate_bpb: {name} must be a whole number >= 1 (got {v!r})")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer))
                                  or max_bytes < 1):
        raise UserError(f"evaluate_bpb: max_bytes must be a whole number >= 1, or None for all (got {max_bytes!r})")
    if getattr(model, "token_level", False):  # the BPE baseline
        # bytes fed as token ids scored a silently wrong number: the token path encodes them first
        from .lm import evaluate_bpb as any_model_bpb

        return any_model_bpb(model, data, seq_len, batch_size, device, max_bytes, amp_dtype)[0]
    n = len(data)
    if n < 2:
        raise UserError(f"evaluation data has {n} byte(s); it needs at least 2")
    scored = n - 1 if max_bytes is None else max(1, min(n - 1, int(max_bytes)))
    n_full = scored // seq_len
    tail = scored - n_full * seq_len
    totals = _Totals()
    with _eval_mode(model):
        for i in range(0, n_full, batch_size):
            starts = np.arange(i, min(i + batch_size, n_full)) * seq_len
            idx = starts[:, None] + np.arange(seq_len + 1)
            w = torch.from_numpy(np.asarray(data[idx], dtype=np.int64))
            totals.add(model, w[:, :-1], w[:, 1:], device, amp_dtype)
        if tail:
            s = n_full * seq_len
            w = torch.from_numpy(np.asarray(data[s:s + tail + 1], dtype=np.int64))[None]
            totals.add(model, w[:, :-1], w[:, 1:], device, amp_dtype)
    return totals.result()


def evaluate_batches(model, batches, device, amp_dtype: torch.dtype | None = None) -> dict:
    """The same numbers over given (x, y) batches; targets of -100 are not scored (task data)."""
    device = _device(device)
    totals = _Totals()
    with _eval_mode(model):
        for x, y in batches:
            totals.add(model, x, y, device, amp_dtype)
    return totals.result()
