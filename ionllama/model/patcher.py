"""Dynamic patching: where does a new patch start?

A patch starts at byte t when (entropy mode) the entropy of predicting byte t, computed at
position t-1, exceeds a global threshold, or (monotonic mode) exceeds the previous position's
entropy by the threshold; `fixed` starts every k bytes; `space` after every byte that is not an
ASCII letter/digit or a non-ASCII (UTF-8) byte (SpaceByte); `byte` at every byte. Byte 0 always
starts a patch and no patch grows beyond `max_patch_size`.

Every rule uses only bytes < t, so boundaries are causal and generation can decide them on the fly.
The cap is computed without a loop: after the last rule-start s, forced starts fall at s + k*max.
"""
from __future__ import annotations

import torch

from .common import upcast


def _is_word_byte(x: torch.Tensor) -> torch.Tensor:
    return ((x >= 48) & (x <= 57)) | ((x >= 65) & (x <= 90)) | ((x >= 97) & (x <= 122)) | (x >= 128)


def rule_starts(x: torch.Tensor, entropy: torch.Tensor | None, mode: str, threshold: float | torch.Tensor,
                threshold_mode: str = "global", fixed_size: int = 4) -> torch.Tensor:
    """(B, T) bool: patch starts from the rule alone (before the max-size cap)."""
    B, T = x.shape
    t = torch.arange(T, device=x.device)
    first = torch.ones(B, 1, dtype=torch.bool, device=x.device)
    if mode == "byte":
        return torch.ones(B, T, dtype=torch.bool, device=x.device)
    if mode == "fixed":
        return (t % fixed_size == 0).expand(B, T)
    if mode == "space":
        return torch.cat([first, ~_is_word_byte(x[:, :-1])], dim=1)
    if mode == "entropy":
        h_prev = upcast(entropy[:, :-1])  # entropy at t-1 = uncertainty about byte t
        if threshold_mode == "global":
            cond = h_prev > threshold
        elif threshold_mode == "monotonic":
            before = torch.cat([h_prev[:, :1], h_prev[:, :-1]], dim=1)
            cond = (h_prev - before) > threshold
        else:
            raise ValueError(f"unknown threshold_mode {threshold_mode!r}")
        return torch.cat([first, cond], dim=1)
    raise ValueError(f"unknown patching mode {mode!r}")


def cap_patches(starts: torch.Tensor, max_patch_size: int) -> torch.Tensor:
    """Add forced starts so that no patch is longer than max_patch_size."""
    T = starts.shape[1]
    t = torch.arange(T, device=starts.device)
    last = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # last rule-start <= t
    return starts | ((t - last) % max_patch_size == 0)


def patch_ids(starts: torch.Tensor):
    """byte_to_patch (B, T) long and n_patches (B,) long from patch starts."""
    b2p = starts.long().cumsum(1) - 1
    return b2p, b2p[:, -1] + 1


def compute_patches(x, entropy, mode, threshold, threshold_mode="global", max_patch_size=8, fixed_size=4,
                    with_next: bool = False):
    """-> starts (B, T) bool, byte_to_patch, n_patches; with_next also next_start (B,) bool: does byte T,
    the first byte after the window, start a patch? Every rule reads only bytes < T, so it is decided
    here by the same rules one position on (x and entropy padded by one unread value)."""
    if with_next:
        T = x.shape[1]
        x = torch.nn.functional.pad(x, (0, 1))
        entropy = torch.nn.functional.pad(entropy, (0, 1)) if entropy is not None else None
    starts = rule_starts(x, entropy, mode, threshold, threshold_mode, fixed_size)
    # byte and fixed (k <= max) starts never leave a gap the cap would fill: skip its cummax, a scan kernel in every
    # compiled forward (and the kind of multi-output code a compiled sort got wrong on CUDA, forty-ninth session)
    if not (mode == "byte" or (mode == "fixed" and fixed_size <= max_patch_size)):
        starts = cap_patches(starts, max_patch_size)
    if not with_next:
        return starts, *patch_ids(starts)
    return starts[:, :T], *patch_ids(starts[:, :T]), starts[:, T]


def calibrate_threshold(x: torch.Tensor, entropy: torch.Tensor, target: float, threshold_mode: str = "global",
                        max_patch_size: int = 8, iters: int = 40) -> tuple[float, float]:
    """Bisection on the threshold so that held-out bytes average `target` bytes per patch.
    Returns (threshold, achieved bytes/patch). Higher threshold -> fewer starts -> longer patches."""
    def as_stored(th: float) -> float:  # the model keeps its threshold in an fp32 buffer: measure that value (a
        # float64 model's entropies compared with the unrounded double cut other bytes than its forward did)
        return float(torch.tensor(th, dtype=torch.float32))

    def bpp(th: float) -> float:
        _, _, n = compute_patches(x, entropy, "entropy", as_stored(th), threshold_mode, max_patch_size)
        return x.numel() / n.sum().item()

    h = upcast(entropy[:, :-1])
    span = (h - torch.cat([h[:, :1], h[:, :-1]], 1)) if threshold_mode == "monotonic" else h
    lo, hi = span.min().item() - 1e-3, span.max().item() + 1e-3
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if bpp(mid) < target:
            lo = mid
        else:
            hi = mid
    th = as_stored(hi if abs(bpp(hi) - target) <= abs(bpp(lo) - target) else lo)
    return th, bpp(th)
