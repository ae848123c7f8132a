"""Training FLOPs per byte of each arm (the second view of the Phase-1 results)."""
from __future__ import annotations

import torch


def _matmul_params(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def ssd_flops_per_position(model, chunk: int) -> float:
    """Training FLOPs of MambaByte's chunked scan per position: C.B scores (L x N), the masked score x input
    product (L x d_inner), chunk states and their read-out (2 x N x d_inner), per layer, x 6."""
    total = 0.0
    for blk in model.blocks:
        mx = blk.mixer
        total += 6 * (chunk * mx.d_state + chunk * mx.d_inner + 2 * mx.d_state * mx.d_inner)
    return total


def train_flops_per_byte(model, phase: str, seq_len: int, bytes_per_patch: float | None,
                         bytes_per_token: float | None) -> float:
    from ..model.flops import flops_per_byte

    cfg = model.config
    if phase == "entropy":
        return 6.0 * _matmul_params(model.entropy_model)
    if cfg.model == "bpe":
        return flops_per_byte(model, seq_len) / float(bytes_per_token or 1.0)
    if cfg.model == "mamba":
        return flops_per_byte(model, seq_len) + ssd_flops_per_position(model, min(cfg.scan_chunk, seq_len))
    if cfg.model == "ionllama":
        f = flops_per_byte(model, seq_len, bytes_per_patch=float(bytes_per_patch or 1.0))
        if phase == "joint" and cfg.patching == "entropy":
            f += 4.0 * _matmul_params(model.entropy_model)  # trained again: 6 instead of 2
        return f
    return flops_per_byte(model, seq_len)


def add_flops(records: list[dict], model, seq_len: int, bytes_per_token: float | None) -> list[dict]:
    """Cumulative training FLOPs on every record (train records: bytes since the last one x FLOPs/byte of
    that window's phase and measured bytes/patch)."""
    out, cum, prev_bytes, last_bpp = [], 0.0, 0, None
    for r in records:
        r = dict(r)
        b = r.get("bytes_seen")
        if "loss" in r and isinstance(b, (int, float)) and r.get("phase") not in ("calibrate", "init"):
            bpp = r.get("bytes_per_patch") or last_bpp
            if r.get("phase") != "entropy" and r.get("bytes_per_patch"):
                last_bpp = r["bytes_per_patch"]
            cum += max(0, b - prev_bytes) * train_flops_per_byte(model, r.get("phase", "main"), seq_len, bpp,
                                                                 bytes_per_token)
            prev_bytes = b
        elif isinstance(b, (int, float)) and b < prev_bytes:  # a record from before a resume point
            prev_bytes = b
        r["train_flops"] = cum
        out.append(r)
    return out
