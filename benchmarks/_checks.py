"""Bad-input checks shared by the benchmark scripts: every bad flag is one line, exit 2, before any work (a size of
0 was a ZeroDivisionError, --device cuda without a GPU a traceback from the first CUDA call). They lived in
bench_attention.py, which bench_scan.py and bench_conv_gate.py import for its timing helpers; a script that only
checks flags should not need the attention benchmark."""
from __future__ import annotations

import argparse

from ionllama.errors import UserError, check_ranges
from ionllama.train.trainer import resolve_device


def int_list(flag: str, text: str, form: str = "N", allow_empty: bool = False) -> list:
    """'1024,4096' (form N) or '16x256,8x1024' (form BxD) -> ints, each at least 1; else one line naming --flag."""
    try:
        vals = [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]
    except ValueError:
        vals = None
    if vals is None or not (vals or allow_empty) or any(len(t) != form.count("x") + 1 or min(t) < 1 for t in vals):
        raise UserError(f"--{flag} '{text}': give comma-separated {form}, every number at least 1")
    return [t[0] for t in vals] if "x" not in form else vals


def check_choices(flag: str, text: str, choices) -> None:
    """A comma list whose items must come from choices (e.g. --dtypes bf16,fp32): the first other one, as one line."""
    bad = [c for c in text.split(",") if c not in choices]
    if bad:
        raise UserError(f"--{flag}: unknown value '{bad[0]}'; give a comma list of {', '.join(choices)}")


def check_flags(a, at_least: dict, device: str) -> None:
    """Bad flags as one line before any work (a size of 0 was a ZeroDivisionError, --device cuda without a GPU a
    traceback from the first CUDA call). at_least is keyed by the flags' own spelling (--head-dim, not head_dim)."""
    check_ranges(argparse.Namespace(**{k: getattr(a, k.replace("-", "_")) for k in at_least}), at_least)
    resolve_device(device)  # the trainer's check: a visible CUDA device for --device cuda


class KernelRoute:
    """The "triton" rows of a kernel benchmark must time the kernel. On CPU (the dry run under TRITON_INTERPRET=1)
    the dispatchers pick the reference (they check `.is_cuda`), so the routing is forced there; on CUDA it is the
    dispatcher's own. Either way the launcher's calls are counted, and a row where it never ran is refused: the dry
    runs had timed the reference under the name "triton" (an audit)."""

    def __init__(self, device: str, module, launcher: str):
        self.device, self.module, self.launcher, self.calls = device, module, launcher, 0

    def __enter__(self):
        import ionllama.kernels as K

        self._routing = K.forced_routing(True) if self.device == "cpu" else None
        if self._routing is not None:
            self._routing.__enter__()
        self._real = real = getattr(self.module, self.launcher)

        def counted(*args, **kw):
            self.calls += 1
            return real(*args, **kw)

        setattr(self.module, self.launcher, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.launcher, self._real)
        if self._routing is not None:
            self._routing.__exit__(*exc)
        return False

    def check(self, row: dict) -> dict:
        """The row, with its launcher count; refused if it was timed (status ok) without the kernel running."""
        if row.get("status") == "ok" and self.calls == 0:
            raise UserError(f"the Triton kernel ({self.launcher}) never ran: the dispatcher took the reference for "
                            "these inputs; check --device and the shapes the kernel takes")
        return {**row, "kernel_calls": self.calls}
