"""Building blocks shared by every model: RMSNorm, SwiGLU, rotary embeddings, a pre-norm
transformer block whose attention function is pluggable (dense SDPA, dilated, local window)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """model.eval() inside the block, then each submodule's own mode again: `model.train(was_training)` put a part
    the caller keeps in eval mode (dropout off while fine-tuning) back into train mode."""
    # (anything with train()/eval() is taken too: the task scorer is given stand-in models)
    parts = model.modules() if isinstance(model, nn.Module) else [model]
    modes = [(m, m.training) for m in parts]
    model.eval()
    try:
        yield model
    finally:
        model.train(modes[0][1])  # first the root's own train(): a wrapper that overrides it reaches what it holds
        for m, training in modes:  # outside the module tree (distributed._EntropyView); then each part's own
            m.training = training


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms, softmaxes and sums run in: fp32 for fp32 and half precision, float64 for a float64 model
    (gradcheck, reference runs), which .float() used to cut to fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(upcast_dtype(x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def checked_input(x, targets=None, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The models' input and targets as int64 ids, or a ValueError naming the problem and the fix: a float, 1-D or empty
    input, or ids past the vocabulary, ended in torch's IndexError / ZeroDivisionError / unpack errors, or was
    cast silently (floats). The range is checked on CPU only, and not under torch.compile: on a GPU it would be
    a host sync every step (there the embedding's device assert still fires)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"the model's input must be a tensor of byte ids (got {type(x).__name__}); pass "
                         "torch.tensor([list(data)], dtype=torch.long), or use model.generate(prompt_bytes)")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"the model's input must hold integer ids (got {x.dtype}); pass a torch.long tensor")
    if x.dim() != 2 or x.shape[1] == 0 or x.shape[0] == 0:
        fix = "add a batch dimension with x[None]" if x.dim() == 1 else "pass a (batch, seq_len) tensor"
        raise ValueError(f"the model's input must be (batch, seq_len) with batch and seq_len >= 1 (got shape "
                         f"{tuple(x.shape)});"
                         f" {fix}")
    if targets is not None and (not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(x.shape)
                                or targets.dtype.is_floating_point or targets.dtype.is_complex
                                or targets.dtype == torch.bool):  # bools were scored as bytes 0 and 1
        got = f"shape {tuple(targets.shape)}, {targets.dtype}" if isinstance(targets, torch.Tensor) else type(targets)
        raise ValueError(f"targets must be integer ids of the input's shape {tuple(x.shape)} (got {got}); pass "
                         "the input shifted by one position")
    # int64 first: torch's min/max have no kernel for uint16/32/64 (a NotImplementedError traceback for the uint16
    # token shards ionllama.data.bpe writes); a uint64 id past 2**63 wraps negative and is refused below
    x = x.long()
    targets = None if targets is None else targets.long()
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(x.min()) < 0 or int(x.max()) >= vocab:
            raise ValueError(f"the model's input holds ids outside 0..{vocab - 1} (min {int(x.min())}, max "
                             f"{int(x.max())}); pass bytes (0-255) or the tokenizer's ids")
        if targets is not None:
            t = targets[targets != -100]  # -100: a position left out of the loss
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
                raise ValueError(f"targets hold ids outside 0..{vocab - 1} (min {int(t.min())}, max {int(t.max())})"
                                 "; pass the next bytes (or -100 for a position left out of the loss)")
    return x, targets


def scored_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) over the targets that are not -100. A batch with no scored target gives
    0 with a zero gradient, not the NaN of ``F.cross_entropy``'s mean (0 / 0), which would poison the
    weights through the optimizer. No host sync: the count stays on the device."""
    flat = targets.reshape(-1)
    total = F.cross_entropy(upcast(logits).reshape(-1, logits.shape[-1]), flat, ignore_index=-100, reduction="sum")
    return total / (flat != -100).sum().clamp(min=1)


def swiglu_hidden(dim: int, mult: float = 8 / 3, multiple_of: int = 32) -> int:
    h = int(dim * mult)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)  # gate and value in one matmul
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, v = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(g) * v)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """positions: (N,) or (B, N) ints -> cos, sin of shape (..., N, head_dim/2) in fp32, for a float64 model too:
    the table is part of the model's definition, shared by the forward, the decoders and the fused kernels."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[..., None] * inv
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, Dh); cos/sin: (N, Dh/2) or (B, N, Dh/2). Rotates pairs (x[2i], x[2i+1])."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    xf = upcast(x).unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    """Multi-head self-attention with RoPE; `attn_fn(q, k, v)` decides the pattern."""

    def __init__(self, dim: int, n_heads: int, attn_fn: AttentionFn = sdpa_causal, rope_base: float = 10000.0):
        super().__init__()
        assert dim % n_heads == 0, "dim must be divisible by n_heads"
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.attn_fn = attn_fn
        self.rope_base = rope_base

    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor, rope=None):
        """rope: (cos, sin) for these positions when the caller shares one table across layers."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope if rope is not None else rope_cos_sin(positions, self.head_dim, self.rope_base)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        B, N, D = x.shape
        if positions is None:
            positions = torch.arange(N, device=x.device)
        q, k, v = self.project_qkv(x, positions, rope)
        y = self.attn_fn(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class ResidualDropout(nn.Module):
    """Dropout on a residual branch's output. p == 0 adds no op at all (the compiled step stays as it was);
    in eval mode, and so in generation, it is the identity."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            from ..errors import UserError
            raise UserError(f"dropout must be in [0, 1), got {p}; e.g. --dropout 0.1")
        self.p = float(p)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.dropout(y, self.p, training=True) if self.p > 0 and self.training else y

    def extra_repr(self) -> str:
        return f"p={self.p}"


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn_hidden: int, attn_fn: AttentionFn = sdpa_causal,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, n_heads, attn_fn)
        self.norm2 = RMSNorm(dim)
        self.ffn = SwiGLU(dim, ffn_hidden)
        self.drop = ResidualDropout(dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), positions, rope))
        return x + self.drop(self.ffn(self.norm2(x)))


# the residual branches' last projections (attention, IntegralLNN state mix, FFN); not in_proj, which
# init_weights' "proj.weight" also matches: zeroing both ends of a branch would leave it without gradient
RESIDUAL_OUT = ("attn.proj.weight", "w_out.weight", "out_proj.weight")


def zero_residual_branches(module: nn.Module) -> None:
    """Zero every residual branch's last projection, so each pre-norm block starts as the identity. Gradients
    still reach them (their input is not zero), so the branches grow from zero as training needs them."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(RESIDUAL_OUT):
                p.zero_()


def init_weights(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 style init: normal(0.02) everywhere, output projections scaled by 1/sqrt(2 * layers)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        if name.endswith(("proj.weight", "w_out.weight", "out_proj.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * max(n_layers, 1)))
        else:
            nn.init.normal_(p, 0.0, std)
