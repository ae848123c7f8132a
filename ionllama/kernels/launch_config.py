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


# --kernel_config KIND:KEY=VALUE (benchmarks): which module and setter each KIND names
KERNEL_CONFIGS = {"lnn": ("lnn_step_triton", "set_lnn_step_config"),
                  "latent": ("latent_step_triton", "set_latent_step_config"),
                  "ssm": ("ssm_step_triton", "set_ssm_step_config"),
                  "scan": ("scan_triton", "set_scan_config")}


def parse_kernel_config(items) -> list[tuple[str, str, int]]:
    """KIND:KEY=VALUE items (e.g. lnn:head_block_n=32) as (kind, key, int value); a UserError naming the first bad
    item. Checked without importing triton: the keys are checked when applied."""
    from ..errors import UserError

    out = []
    for item in items:
        kind, colon, rest = item.partition(":")
        key, eq, val = rest.partition("=")
        if not colon or not eq or kind not in KERNEL_CONFIGS or not key:
            raise UserError(f"--kernel_config '{item}': give KIND:KEY=VALUE with KIND one of "
                            f"{', '.join(KERNEL_CONFIGS)} (e.g. lnn:head_block_n=32)")
        try:
            out.append((kind, key, int(val)))
        except ValueError:
            raise UserError(f"--kernel_config '{item}': the value must be an integer") from None
    return out


def apply_kernel_config(items) -> dict:
    """Set parse_kernel_config(items) on the kernel modules (importing them: triton needed); returns
    {kind: the previous configuration} for the kinds set. An unknown key is a UserError."""
    import importlib

    from ..errors import UserError

    old = {}
    for kind, key, val in parse_kernel_config(items):
        module, setter = KERNEL_CONFIGS[kind]
        try:
            mod = importlib.import_module(f"ionllama.kernels.{module}")
        except ImportError as e:
            raise UserError(f"--kernel_config {kind}:...: needs triton ({e})") from None
        try:
            prev = getattr(mod, setter)(**{key: val})
        except (KeyError, ValueError) as e:
            raise UserError(f"--kernel_config {kind}:{key}={val}: {e.args[0] if e.args else e}") from None
        old.setdefault(kind, prev)
    return old
