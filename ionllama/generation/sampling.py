"""Next-byte sampling: temperature, top-k, top-p, greedy, with counter-based seeded noise.

Reproducibility rule: the random noise for batch row r at decode step t is a pure function of
(seed_r, t, byte value), computed with integer hashing on the device. So a row's sample never
depends on which other rows share the batch, the global torch RNG is never touched, the sampler
is a fixed sequence of tensor ops (CUDA-graph capturable), and the same seed draws the same
noise on CPU and GPU. Sampling is Gumbel-max: argmax(logits / T + Gumbel noise) is an exact
draw from softmax(logits / T) restricted to the top-k / top-p set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError, is_whole

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer avalanche hash (Wellons' lowbias32) on int64 tensors holding uint32s."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Per-row 32-bit keys from the (B,) int64 seeds (both halves used); constant for a run."""
    seeds = seeds.long()
    key = _mix32((seeds & _MASK32) ^ 0x9E3779B9)
    return _mix32(key ^ ((seeds >> 32) & _MASK32))


def index_hash(vocab: int, device) -> torch.Tensor:
    """(vocab,) hashes of the byte values; constant for a run."""
    return _mix32(torch.arange(vocab, device=device, dtype=torch.long) + 0x632BE5AB)


def noise_from_keys(keys: torch.Tensor, idx_hash: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
    """uniform_noise with the step-independent parts precomputed (the decode loop reuses them every byte)."""
    step = torch.as_tensor(step, dtype=torch.long, device=keys.device)
    key = _mix32(keys ^ (step & _MASK32))
    h = _mix32(key[:, None] ^ idx_hash[None, :])
    # below 1: the top hash, (2**24 - 0.5) / 2**24, rounds to 1.0 in float32, and -log(-log(1)) = +inf picked that
    # byte whatever the model said (top_k=1 too), once in ~65,536 bytes
    return (((h >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp_max(1.0 - 2.0**-24)


def uniform_noise(seeds: torch.Tensor, step: torch.Tensor | int, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise of shape (B, vocab) as a pure function of (seed per row, step, index).

    seeds: (B,) int64 (any value; both 32-bit halves are used); step: int or 0-d int64 tensor."""
    return noise_from_keys(row_keys(seeds), index_hash(vocab, seeds.device), step)


class NoiseSource:
    """The step-independent part of the noise, computed once per run: the eager per-byte sampler then
    runs 2 of its 6 integer hashes (~40 ops instead of ~130). Same values as uniform_noise."""

    def __init__(self, seeds: torch.Tensor, vocab: int = 256):
        self.keys, self.idx_hash = row_keys(seeds), index_hash(vocab, seeds.device)

    def __call__(self, step: torch.Tensor | int) -> torch.Tensor:
        return noise_from_keys(self.keys, self.idx_hash, step)


def _is_real(v) -> bool:
    """numpy floats and ints, 0-d tensors: anything float() takes that is not a string."""
    if isinstance(v, (str, bytes)):
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def is_flag(v) -> bool:
    """True / False (numpy's bools too), not a string or a number that happens to be truthy."""
    return isinstance(v, bool) or type(v).__name__ in ("bool_", "bool")  # numpy >= 2 names it "bool"


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False

    def __post_init__(self):
        if not is_flag(self.greedy):  # greedy="yes" meant greedy, greedy="no" too
            raise UserError(f"greedy must be True or False, got {self.greedy!r}")
        for name in ("temperature", "top_p"):  # a string here used to end in a TypeError from the comparison below
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not _is_real(v)):
                raise UserError(f"{name} must be a number, got {v!r}; pass e.g. {name}=0.9")
        if self.temperature is None or not self.temperature >= 0:  # `not >=`: NaN is refused too
            raise UserError(f"temperature must be >= 0, got {self.temperature}; use 0 for argmax (greedy=True; --greedy on the command line)")
        # logits / inf = uniform noise, not a model's sample; so is a float past float32's range (the logits are
        # float32: / 1e39 made them all 0, and top_k=1 returned byte 0, the document separator)
        if math.isinf(self.temperature) or self.temperature > torch.finfo(torch.float32).max:
            raise UserError(f"temperature must be finite (at most 3.4e38), got {self.temperature}; use e.g. 1.0, or 0 "
                            "for argmax")
        if self.top_k is not None and (not is_whole(self.top_k) or self.top_k < 1):
            raise UserError(f"top_k must be a whole number >= 1, got {self.top_k!r}; omit it to disable top-k")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}; omit it to disable nucleus sampling")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


_FILTER_ROWS = 256  # rows filtered at once: at most 64 MB of compares for top_p


def _ranked_above(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (..., V, V) bool: [i, j] is True where byte j comes before byte i in a stable descending sort
    (a higher logit, or an equal one at a lower byte, as argmax breaks ties). Why not a sort: torch.compile turned
    sort + scatter into a kernel that indexed out of range on an H100 (torch 2.11: a device-side assert in every
    compiled decode with top_k, the forty-ninth session). V * V compares per row (65,536 at V=256) fuse into one
    elementwise kernel and a reduction, with no index taken from data."""
    V = logits.shape[-1]
    i, j = logits.unsqueeze(-1), logits.unsqueeze(-2)
    idx = torch.arange(V, device=logits.device)
    lower = idx.unsqueeze(0) < idx.unsqueeze(1)  # [i, j]: j < i
    return (j > i) | ((j == i) & lower)


# widest vocabulary the compare filter takes: (B, V, V) per call is 64 KiB a row at 256 bytes, but 4 GiB of bools a
# row for a BPE model's 65,536 tokens (and 0.3 s a token at 4,096 on a CPU). Wider: the stable sort, the same order
COMPARE_MAX_V = 256


def _filter_sorted(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """filter_logits by a stable sort + scatter (token vocabularies: not compiled, the BPE decoder has no --compile)."""
    if top_k is not None and top_k < logits.shape[-1]:
        order = logits.sort(dim=-1, descending=True, stable=True).indices[..., int(top_k):]
        logits = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, True),
                                    float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False  # a top_p below float32's range (1e-46) is 0 there: 0 >= 0 dropped every byte
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf (the best byte always stays)."""
    V = logits.shape[-1]
    if V > COMPARE_MAX_V:
        return _filter_sorted(logits, top_k, top_p)
    use_k, use_p = top_k is not None and top_k < V, top_p is not None and top_p < 1.0
    if not (use_k or use_p):
        return logits
    rows = logits.reshape(-1, V)
    if rows.shape[0] > _FILTER_ROWS:
        # the compares take V * V per row (top_p: floats, 256 KB a row at V=256): a large batch in slices of rows
        return torch.cat([filter_logits(c, top_k, top_p) for c in rows.split(_FILTER_ROWS)]).reshape(logits.shape)
    # one order for both filters: the bytes top_k drops rank below every byte it keeps, so the kept bytes' order
    # (and the mass above them, the dropped ones' probability being 0) is the same before and after it
    above = _ranked_above(logits)
    if use_k:
        # exactly k bytes, ties broken toward the lower byte as argmax does (the stable order): a threshold at the
        # k-th value kept every byte tied with it, so top_k=1 drew among equal maxima and was not greedy (bf16)
        logits = logits.masked_fill(above.sum(dim=-1) >= int(top_k), float("-inf"))
    if use_p:
        # the same stable order: equal logits keep the lower byte first (an unstable sort kept byte 176 of an
        # all-equal row, so a top_p that keeps one byte was not greedy, and tied bytes entered the nucleus by whim)
        probs = logits.softmax(dim=-1)
        mass_before = (above * probs.unsqueeze(-2)).sum(dim=-1)  # keep a byte while the mass above it is < top_p
        # the best byte always stays: a top_p below float32's range (1e-46) is 0 there, and 0 >= 0 dropped it
        drop = (mass_before >= top_p) & above.any(dim=-1)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# below this temperature the row max is subtracted before dividing; above it logits / T cannot overflow for any
# finite logits a model gives (it would need |logit| > 3e32), and the bytes of a seed stay those of earlier versions
_SHIFT_BELOW = 1e-6


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature for float32 (B, V) logits, never +inf or NaN for a finite temperature > 0: a tiny one
    (1e-40) overflowed every positive logit to +inf, and the ties at inf drew an arbitrary byte instead of the
    argmax. Below _SHIFT_BELOW the row max is taken off first, so the best byte scores 0 and the others tend to
    -inf (greedy in the limit; equal maxima are still broken by the noise); the divisor is at least float32's
    smallest normal, which a flush-to-zero device does not turn into 0. A fixed sequence of ops either way."""
    if temperature >= _SHIFT_BELOW:
        return logits / temperature
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # an all -inf row stays -inf, not NaN
    return (logits - top) / max(temperature, torch.finfo(torch.float32).smallest_normal)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, seeds: torch.Tensor,
                step: torch.Tensor | int, noise: NoiseSource | None = None) -> torch.Tensor:
    """logits: (B, V) -> next bytes (B,) int64. noise: a NoiseSource for these seeds (optional, faster)."""
    logits = logits.float()
    if cfg.is_greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(scale_logits(logits, cfg.temperature), cfg.top_k, cfg.top_p)
    u = noise(step) if noise is not None else uniform_noise(seeds, step, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (logits + gumbel).argmax(dim=-1)
