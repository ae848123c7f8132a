"""Dense byte-level transformer: the baseline every experiment compares with.

Pre-norm, RoPE, SwiGLU, SDPA causal attention over every byte (O(T^2) attention)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..registry import register
from .common import RMSNorm, TransformerBlock, checked_input, init_weights, scored_cross_entropy, swiglu_hidden

LN2 = math.log(2.0)


def lm_outputs(logits: torch.Tensor, targets: torch.Tensor | None, n_patches: torch.Tensor,
               bytes_per_target: float = 1.0) -> dict:
    """HF-style output dict shared by all models. loss = mean nats per target (-100 is not scored);
    bpb = bits per byte (a token model passes bytes_per_target = bytes/token of the batch)."""
    out = {"logits": logits, "loss": None, "bpb": None, "n_patches": n_patches}
    if targets is not None:
        loss = scored_cross_entropy(logits, targets)
        out["loss"] = loss
        out["bpb"] = loss.detach() / LN2 / bytes_per_target
    return out


class ParamCountMixin:
    def count_parameters(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, p in self.named_parameters():
            top = name.split(".")[0]
            counts[top] = counts.get(top, 0) + p.numel()
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


class GenerateMixin:
    @torch.no_grad()
    def generate(self, prompt_bytes, max_new_bytes: int = 256, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, **kwargs):
        from ..generation import generate  # lazy: generation depends on the models, not vice versa

        return generate(self, prompt_bytes, max_new_bytes=max_new_bytes, temperature=temperature, top_k=top_k,
                        top_p=top_p, **kwargs)


def build_transformer_lm(module: nn.Module, config: ModelConfig) -> None:
    """embed -> pre-norm transformer blocks -> norm -> head, GPT-2 init (dense and BPE models)."""
    module.config = config
    d = config.d_model
    module.embed = nn.Embedding(config.vocab_size, d)
    hidden = swiglu_hidden(d, config.ffn_mult)
    module.blocks = nn.ModuleList([TransformerBlock(d, config.n_heads, hidden, dropout=config.dropout)
                                   for _ in range(config.n_layers)])
    module.norm = RMSNorm(d)
    module.head = nn.Linear(d, config.vocab_size, bias=False)
    init_weights(module, config.n_layers)


def transformer_lm_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a build_transformer_lm module: (B, T) ids -> (B, T, vocab) logits."""
    h = module.embed(x.long())
    pos = torch.arange(x.shape[1], device=x.device)
    for blk in module.blocks:
        h = blk(h, pos)
    return module.head(module.norm(h))


@register("dense", reads=("d_model", "n_layers", "n_heads", "ffn_mult", "dropout", "vocab_size"))
class DenseByteTransformer(ParamCountMixin, GenerateMixin, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        build_transformer_lm(self, config)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        x, targets = checked_input(x, targets)
        B, T = x.shape
        logits = transformer_lm_logits(self, x)
        return lm_outputs(logits, targets, torch.full((B,), T, device=x.device, dtype=torch.long))
