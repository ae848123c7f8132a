"""Training FLOPs per byte, counted from the model's own shapes (for MFU and equal-FLOPs comparisons).

Convention (Kaplan/Chinchilla): a matmul weight used once per position costs 2 FLOPs per parameter
forward and 4 backward, so 6 per parameter per position in training; attention adds 12 * d * (keys
per query) per layer per position (QK^T and PV, forward + backward). Embedding lookups, norms and
elementwise ops are not counted. A frozen module (the entropy model in phase 2) costs 2 per parameter.
Per byte: byte-level parts run at every byte, latent parts once per patch (divide by bytes/patch).
"""
from __future__ import annotations

import torch.nn as nn


def _matmul_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def flops_per_byte(model: nn.Module, seq_len: int, bytes_per_patch: float = 1.0, train: bool = True) -> float:
    mult = 6 if train else 2
    cfg = model.config
    if cfg.model == "ionllama":
        dl, dm = cfg.d_local, cfg.d_model
        local = mult * (_matmul_params(model.encoder) + _matmul_params(model.decoder) + _matmul_params(model.head))
        if cfg.local_layers == "transformer":
            # keys per query, averaged over the window's positions: min(i + 1, w). (w + 1) / 2 held only where the
            # sequence is no longer than the window, and charged these layers half their attention at T >> w
            w = min(cfg.local_window, seq_len)
            local += (mult * 2) * dl * (w - w * (w - 1) / (2 * seq_len)) * (cfg.n_enc_layers + cfg.n_dec_layers)
        frozen_entropy = cfg.patching == "entropy"
        ent = (2 if frozen_entropy else 0) * _matmul_params(model.entropy_model)
        patches = seq_len / bytes_per_patch
        if cfg.attention == "dense":
            keys = (patches + 1) / 2
        else:
            from .dilated_attention import dilated_offsets

            # the mean over patches of the offsets each can use (o <= i), not all of them: patch 0 sees itself only
            n = max(1, int(patches))
            keys = sum(n - o for o in dilated_offsets(n, cfg.local_width) if o < n) / n
        latent = mult * (_matmul_params(model.latent) + _matmul_params(model.to_latent)
                         + _matmul_params(model.from_latent)) + (mult * 2) * dm * keys * cfg.n_layers
        return local + ent + latent / bytes_per_patch
    n = _matmul_params(model)
    attn = 0.0
    if cfg.model in ("dense", "bpe"):
        attn = (mult * 2) * cfg.d_model * (seq_len + 1) / 2 * cfg.n_layers
    return mult * n + attn  # per position; token models divide by bytes/token themselves
