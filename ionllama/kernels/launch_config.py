"""Launch configurations of the Triton kernels: one dict per kernel module, changed by benchmarks' sweeps."""
from __future__ import annotations

import contextlib


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
                  "scan": ("scan_triton", "set_scan_config"),
                  "embed": ("embed_step_triton", "set_embed_step_config")}


OFF_KEYS = ("head_block_n",)  # block keys where 0 means "not this kernel"


def _value_problem(kind: str, key: str, val: int) -> str | None:
    """Why val cannot be the value of config key `key` of `kind`, or None. Block shapes and warps are powers of two;
    the decode-step kernels' blocks at least 16 (tl.dot's minimum); nothing negative."""
    if val < 0:
        return "the value must be >= 0"
    if key == "enabled" and val > 2:
        return "enabled is 0 (off), 1 (on where the model allows it) or 2 (required)"
    if "warps" in key and (val < 1 or val > 32 or val & (val - 1)):
        return "warps are a power of two from 1 to 32"
    if "block" in key:
        if val == 0 and key in OFF_KEYS:
            return None
        low = 1 if kind == "scan" else 16
        if val < low or val & (val - 1):
            off = "0 (off) or " if key in OFF_KEYS else ""
            return f"a block size is {off}a power of two{f' >= {low}' if low > 1 else ''}"
    return None


def parse_kernel_config(items) -> list[tuple[str, str, int]]:
    """KIND:KEY=VALUE items (e.g. lnn:head_block_n=32) as (kind, key, int value); a UserError naming the first bad
    item. Checked without importing triton: whether the key exists is checked when applied."""
    from ..errors import UserError

    out = []
    for item in items:
        kind, colon, rest = item.partition(":")
        key, eq, val = rest.partition("=")
        if not colon or not eq or kind not in KERNEL_CONFIGS or not key:
            raise UserError(f"--kernel_config '{item}': give KIND:KEY=VALUE with KIND one of "
                            f"{', '.join(KERNEL_CONFIGS)} (e.g. lnn:head_block_n=32)")
        try:
            value = int(val)
        except ValueError:
            raise UserError(f"--kernel_config '{item}': the value must be an integer") from None
        problem = _value_problem(kind, key, value)
        if problem:
            raise UserError(f"--kernel_config {item}: {problem}")
        out.append((kind, key, value))
    return out


def apply_kernel_config(items) -> dict:
    """Set parse_kernel_config(items) on the kernel modules (importing them: triton needed); returns
    {kind: the previous configuration} for the kinds set (restore_kernel_config puts them back). All or nothing:
    an unknown key is a UserError with every item before it undone."""
    import importlib

    from ..errors import UserError

    old = {}
    try:
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
    except UserError:
        restore_kernel_config(old)
        raise
    return old


def restore_kernel_config(old: dict) -> None:
    """Put back what apply_kernel_config returned."""
    import importlib

    for kind, prev in old.items():
        module, setter = KERNEL_CONFIGS[kind]
        getattr(importlib.import_module(f"ionllama.kernels.{module}"), setter)(**prev)


@contextlib.contextmanager
def kernel_config_applied(items):
    """apply_kernel_config(items) for the block, restored after it (a benchmark's main(argv), called in-process as
    the tests do, leaves the kernels' settings as they were). A bad item: one UserError before the block runs."""
    old = apply_kernel_config(items)
    try:
        yield
    finally:
        restore_kernel_config(old)
