"""Language-modelling metrics: byte-exact BPB over a byte array, and patch statistics (compression)."""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..model.common import eval_mode

LN2 = math.log(2.0)


def autocast_ctx(device: torch.device | str, amp_dtype: torch.dtype | None):
    device = torch.device(device)
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _windows(n_bytes: int, seq_len: int) -> list[tuple[int, int]]:
    """Input windows [s, e) such that the targets s+1..e cover bytes 1..n-1 exactly once."""
    return [(s, min(s + seq_len, n_bytes - 1)) for s in range(0, n_bytes - 1, seq_len)]


@torch.no_grad()
def fallback_evaluate_bpb(model, data: np.ndarray, seq_len: int, batch_size: int, device, max_bytes=None,
                          amp_dtype=None) -> dict:
    """Every byte after the first is scored exactly once, in non-overlapping windows of seq_len
    (each window starts without earlier context). Used only until ionllama.eval.bpb exists."""
    if max_bytes is not None:
        data = data[:max_bytes]
    data_t = torch.from_numpy(np.array(data, dtype=np.int64))
    wins = _windows(len(data_t), seq_len)
    total_nats, total_bytes, total_patches = 0.0, 0, 0
    model.eval()
    # group windows of equal length so every batch is rectangular (only the last window is shorter)
    by_len: dict[int, list[int]] = {}
    for s, e in wins:
        by_len.setdefault(e - s, []).append(s)
    for length, starts in by_len.items():
        for i in range(0, len(starts), batch_size):
            idx = torch.tensor(starts[i:i + batch_size])[:, None] + torch.arange(length + 1)[None]
            chunk = data_t[idx].to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            with autocast_ctx(device, amp_dtype):
                out = model(x)
            logits = out["logits"].float()
            total_nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            total_bytes += y.numel()
            n_p = out.get("n_patches")
            total_patches += int(n_p.sum()) if n_p is not None else y.numel()
    loss = total_nats / max(total_bytes, 1)
    return {"loss": loss, "bpb": loss / LN2, "ppl": math.exp(loss), "bytes": total_bytes,
            "bytes_per_patch": total_bytes / max(total_patches, 1)}


# bytes read past a token model's N + 1 scored bytes, so the tokens that end within them are those of the whole text
# (a byte-level BPE's tokens change only within the pre-token a cut falls in)
TOKEN_CUT_MARGIN = 1 << 16


def is_token_model(model) -> bool:
    """Token-level models (the BPE baseline) take token ids; their `seq_len` counts tokens."""
    return bool(getattr(model, "token_level", False))


def encode_tokens(model, data: np.ndarray) -> np.ndarray:
    return model.bpe.encode(np.asarray(data, dtype=np.uint8))


def evaluate_bpb(model, data: np.ndarray, seq_len: int, batch_size: int, device, max_bytes=None, amp_dtype=None):
    """Bits per byte of any registered model over a byte array. Byte models: the harness's evaluator
    (ionllama.eval.bpb) when present, else the fallback above; token models: their tokens of the same
    bytes through ionllama.data.bpe.evaluate_token_bpb (bits / bytes covered). -> (result, method)."""
    if is_token_model(model):
        from ..data.bpe import evaluate_token_bpb, token_prefix_for_bytes

        # N scored bytes: the whole tokens within the first N + 1 bytes, as the trainer's --eval_bytes N takes them
        # from its tokens of the whole split (cutting the bytes first and encoding them split the last token, and
        # the numbers differed). `data` should run on past N + 1 (TOKEN_CUT_MARGIN) for its tokens there to be the
        # whole split's.
        tokens = token_prefix_for_bytes(encode_tokens(model, data), model.bpe.token_nbytes, max_bytes)
        r = evaluate_token_bpb(model, tokens, seq_len, batch_size, device, amp_dtype=amp_dtype)
        r = dict(r, bytes_per_patch=r["bytes_per_token"])
        return r, "ionllama.data.bpe.evaluate_token_bpb (seq_len in tokens)"
    try:
        from .bpb import evaluate_bpb as harness_eval
    except ImportError:
        return fallback_evaluate_bpb(model, data, seq_len, batch_size, device, max_bytes, amp_dtype), "fallback"
    r = harness_eval(model, data, seq_len, batch_size, device, max_bytes=max_bytes, amp_dtype=amp_dtype)
    return dict(r), "ionllama.eval.bpb"


def run_lm(model, data: np.ndarray, seq_len: int, batch_size: int, device, max_bytes=None, amp_dtype=None) -> dict:
    t0 = time.perf_counter()
    r, method = evaluate_bpb(model, data, seq_len, batch_size, device, max_bytes, amp_dtype)
    r = {k: (float(v) if isinstance(v, (float, np.floating, torch.Tensor)) else v) for k, v in r.items()}
    r["seconds"] = time.perf_counter() - t0
    r["method"] = method
    r["seq_len"] = seq_len
    if "tokens" not in method and int(r.get("bytes", seq_len)) < seq_len:
        # fewer bytes than one window: they were scored as one shorter window, which is what the table must say
        r["seq_len"], r["seq_len_requested"] = int(r["bytes"]), seq_len
    return r


@torch.no_grad()
def patch_statistics(model, data: np.ndarray, seq_len: int, batch_size: int, device, max_bytes: int = 65536,
                     amp_dtype=None, max_hist: int = 64) -> dict:
    """Mean bytes per patch and the histogram of patch sizes over windows of the data.
    Uses out['byte_to_patch'] when the model returns it, else out['n_patches'] (uniform patches),
    and 1 byte per patch for models that return neither. The last patch of a window is cut by
    the window edge, so windows much longer than a patch keep that bias small."""
    if is_token_model(model):  # a token is the BPE model's patch
        nb = model.bpe.token_nbytes[encode_tokens(model, data[:max_bytes])]
        hist = np.bincount(np.minimum(nb, max_hist), minlength=2)
        return {"bytes": int(nb.sum()), "patches": int(len(nb)), "bytes_per_patch": float(nb.sum() / max(len(nb), 1)),
                "histogram": {str(k): int(hist[k]) for k in range(1, len(hist))}, "source": "BPE tokens",
                "window": None}
    data = np.ascontiguousarray(data[:max_bytes], dtype=np.uint8)
    n_win = max(1, len(data) // seq_len)
    L = min(seq_len, len(data))
    rows = torch.from_numpy(data[: n_win * L].reshape(n_win, L).astype(np.int64))
    hist = np.zeros(max_hist + 1, dtype=np.int64)
    total_bytes = total_patches = 0
    source = "byte_to_patch"
    with eval_mode(model):  # once for the loop, and the mode it had after
        for i in range(0, n_win, batch_size):
            x = rows[i:i + batch_size].to(device)
            with autocast_ctx(device, amp_dtype):
                out = model(x)
            b2p = out.get("byte_to_patch")
            if b2p is not None:
                for r in b2p.long().cpu():
                    _, counts = torch.unique_consecutive(r, return_counts=True)
                    np.add.at(hist, np.minimum(counts.numpy(), max_hist), 1)
                    total_patches += len(counts)
            else:
                n_p = out.get("n_patches")
                source = "n_patches" if n_p is not None else "one byte per position"
                for n in (n_p.cpu().tolist() if n_p is not None else [x.shape[1]] * x.shape[0]):
                    size = x.shape[1] / max(int(n), 1)
                    hist[min(int(round(size)), max_hist)] += int(n)
                    total_patches += int(n)
            total_bytes += x.numel()
    last = int(np.nonzero(hist)[0].max()) if hist.any() else 1
    return {"bytes": total_bytes, "patches": total_patches, "bytes_per_patch": total_bytes / max(total_patches, 1),
            "histogram": {str(k): int(hist[k]) for k in range(1, last + 1)}, "source": source, "window": L}
