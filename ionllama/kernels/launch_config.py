"""Launch configurations of the Triton kernels: one dict per kernel module, changed by benchmarks' sweeps."""
from __future__ import annotations


def update_config(config: dict, kind: str, kw: dict, cast=None) -> dict:
    """Set keys of `config` (each must exist; `cast` converts values); returns the previous configuration."""
    old = dict(config)
    for key, val in kw.items():
        if key not in config:
            raise KeyError(f"unknown {kind} config key {key!r}")
        config[key] = cast(val) if cast else val
    return old
