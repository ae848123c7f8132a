"""The RoPE cos/sin table as one opaque op, so torch.compile stores it once per forward.

Why: Inductor inlines a pointwise node that reads no tensor into every consumer (on CUDA it realizes a
reused node only for many reads or a large body), so under whole-model compile each latent layer's q/k
rotation recomputed pow, cos and sin for every element, in the forward and again in the backward (the
`..._arange_cos_..._pow_reciprocal_...` kernels in docs/results/train-profile/custom-ops/profile_whole.txt,
slower than their bytes alone would explain: presumably the per-element transcendentals). A
custom op's output is a buffer: computed once, read by every layer, saved (not recomputed) for the
backward. The values are ``ionllama.model.common.rope_cos_sin``'s, which is also the reference.
"""
from __future__ import annotations

import torch

from ..model.common import rope_cos_sin


@torch.library.custom_op("ionllama::rope_cos_sin", mutates_args=())
def rope_cos_sin_op(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rope_cos_sin(positions, head_dim, base)
    return cos, sin


@rope_cos_sin_op.register_fake
def _(positions, head_dim, base):
    shape = (*positions.shape, (head_dim + 1) // 2)
    return (positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32))
