"""Model registry: `--model NAME` on the CLI and `create_model(size, model=NAME)` in Python.

Every registered model is an nn.Module with
  * ``config`` (ModelConfig)
  * ``forward(x, targets=None) -> dict`` with ``logits`` (B, T, V), ``loss`` (mean nats per target,
    None without targets), ``bpb`` (bits per *byte*), ``n_patches`` (B,) long
  * ``count_parameters() -> dict[str, int]`` by component, with a ``total`` key
  * ``generate(prompt_bytes, max_new_bytes=..., temperature=..., top_k=..., top_p=...)``
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .config import ModelConfig, check_config, make_config
from .errors import UserError

_REGISTRY: dict[str, Callable[[ModelConfig], nn.Module]] = {}
_READS: dict[str, frozenset[str]] = {}  # the config options a model is built from (absent: all of them)


def register(name: str, reads: tuple[str, ...] | None = None):
    """reads: the ModelConfig options this model uses. An option outside them given to make_config is refused:
    `--model dense --patching fixed` trained a plain dense model, and the user believed it patched."""
    def deco(builder):
        _REGISTRY[name] = builder
        if reads is not None:
            _READS[name] = frozenset(reads)
        return builder

    return deco


def options_read(model: str) -> frozenset[str] | None:
    """The options `model` is built from, or None when it takes them all (ionllama, unlisted models)."""
    _ensure_loaded()
    return _READS.get(model)


def unused_options(model: str, keys) -> list[str]:
    """Those of `keys` (config option names) that `model` is not built from, in their order; `model` and `size`
    are not options."""
    reads = options_read(model)
    return [] if reads is None else [k for k in keys if k not in reads and k not in ("model", "size")]


def _ensure_loaded() -> None:
    # importing the model package registers every built-in model
    from . import model  # noqa: F401


def model_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def build_model(config: ModelConfig) -> nn.Module:
    # checked here too, not only in create_model: a config read from a checkpoint (or built by hand) with n_heads 3
    # at d_model 32 failed deep in a module's assert, named by no option
    check_config(config)
    _ensure_loaded()
    if config.model not in _REGISTRY:
        raise UserError(f"unknown model '{config.model}'; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[config.model](config)


def model_config(size: str = "small", model: str = "ionllama", **overrides) -> ModelConfig:
    """The config create_model would build, without building it (a UserError for an unknown model, size or option):
    scripts check every requested model this way before spending minutes on the first."""
    _ensure_loaded()
    if model not in _REGISTRY:
        raise UserError(f"unknown model '{model}'; choose one of {', '.join(sorted(_REGISTRY))}")
    return make_config(size, model, **overrides)


def create_model(size: str = "small", model: str = "ionllama", **overrides) -> nn.Module:
    """`create_model('small')` -> the ionLlama model; `create_model('tiny', model='dense')` -> baseline."""
    return build_model(model_config(size, model, **overrides))
