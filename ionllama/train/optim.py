"""AdamW with weight decay only on matrices: no decay on norms, biases and embeddings."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def no_decay_ids(model: nn.Module) -> set[int]:
    ids = set()
    for mod in model.modules():
        is_embedding = isinstance(mod, nn.Embedding)
        is_norm = isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(mod).__name__.lower()
        for name, p in mod.named_parameters(recurse=False):
            if is_embedding or is_norm or p.dim() < 2 or name.endswith("bias"):
                ids.add(id(p))
    return ids


def param_groups(model: nn.Module, params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    nd = no_decay_ids(model)
    params = list(params)
    decay = [p for p in params if id(p) not in nd]
    no_decay = [p for p in params if id(p) in nd]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_adamw(model: nn.Module, params: Iterable[nn.Parameter], lr: float, weight_decay: float,
               device: torch.device, betas=(0.9, 0.95), capturable: bool = False) -> torch.optim.AdamW:
    """capturable: for a step recorded as a CUDA graph (train/step_graph.py, which also turns the learning
    rate into a device tensor): on CUDA the step counters live on the device; on a CPU (tests) the
    single-tensor path, which takes a tensor learning rate."""
    groups = param_groups(model, params, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    fused = device.type == "cuda"  # fused kernel: one launch for all parameters
    if capturable:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused or None,
                                 foreach=None if fused else False, capturable=fused)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)


def add_params(opt: torch.optim.Optimizer, model: nn.Module, params: Iterable[nn.Parameter], weight_decay: float) -> None:
    present = {id(p) for g in opt.param_groups for p in g["params"]}
    new = [p for p in params if id(p) not in present]
    for g in param_groups(model, new, weight_decay):
        opt.add_param_group(g)
