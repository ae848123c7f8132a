"""How many graphs does torch.compile make of one ionLlama training step? (issue #8)

Every graph break ends an Inductor region (no fusion across it) and adds Python work per step; it also
stands in the way of capturing the step as a CUDA graph. This script compiles `torch.compile(model)`
(what the trainer does) and runs one forward + backward, then reports dynamo's graph-break count, the
distinct break reasons and the number of graphs, for two kernel routings:

- `custom_ops`: the Triton scan and dilated attention as torch.library custom ops (the CUDA path since
  aba9144). On CPU the kernels run under the Triton interpreter, so set TRITON_INTERPRET=1.
- `eager_reference`: the PyTorch references behind torch.compiler.disable, i.e. what the CUDA path did
  before aba9144 (and what CPU still does).

Backend aot_eager: it traces and partitions exactly as Inductor would, without compiling kernels.

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/count_graph_breaks.py --size tiny --out graph_breaks.json
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

import ionllama.kernels as K
from ionllama import create_model
from ionllama.fsutil import atomic_write
from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry
from ionllama.registry import model_config
from ionllama.train.trainer import resolve_device

ROUTINGS = ("eager_reference", "custom_ops")


def count(model, x, y, routing: str) -> dict:
    from torch._dynamo.utils import counters

    try:
        with K.forced_routing(routing == "custom_ops"):  # on CPU the custom ops run interpreted kernels
            torch._dynamo.reset()
            counters.clear()
            out = torch.compile(model, backend="aot_eager")(x, y)
            out["loss"].backward()
        breaks = counters["graph_break"]
        reasons = sorted({r.split("\n")[0][:160] for r in breaks})
        return {"routing": routing, "graph_breaks": int(breaks.total()), "break_reasons": reasons,
                "graphs": int(counters["stats"]["unique_graphs"]), "loss": out["loss"].item()}
    finally:
        torch._dynamo.reset()


@cli_entry
def main(argv=None) -> None:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--patching", default=None, help="override the size's patching (fixed and byte need no host sync)")
    ap.add_argument("--routings", default="eager_reference,custom_ops")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    # bad input is one line, exit 2, before the model is built (it was an exit 1, or a traceback mid-run)
    check_ranges(a, {"seq_len": 2, "batch_size": 1})
    routings = a.routings.split(",")
    for r in routings:
        if r not in ROUTINGS:  # an unknown one ran as eager_reference under its own name
            raise UserError(f"--routings: unknown routing '{r}'; give a comma list of {', '.join(ROUTINGS)}")
    model_config(a.size, **({"patching": a.patching} if a.patching else {}))  # unknown size / patching
    device = resolve_device(a.device)
    if a.out and not Path(a.out).resolve().parent.is_dir():
        raise UserError(f"--out {a.out}: its folder does not exist; create it or give another path")
    if a.out and Path(a.out).is_dir():  # --out . was an IsADirectoryError after all the work (an audit)
        raise UserError(f"--out {a.out} is a folder; give a file path, e.g. {Path(a.out) / 'counts.json'}")
    if device.type == "cpu" and "custom_ops" in routings and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("on CPU the custom-op routing runs the Triton kernels in the interpreter: "
                        "set TRITON_INTERPRET=1 (or give --routings eager_reference)")
    torch.manual_seed(0)
    model = create_model(a.size, **({"patching": a.patching} if a.patching else {})).to(device)
    model.freeze_entropy(True)  # the main phase: entropy model frozen, as in most of training
    x = torch.randint(0, 256, (a.batch_size, a.seq_len + 1), device=device)
    rows = [count(model, x[:, :-1], x[:, 1:], r) for r in routings]
    assert all(abs(r["loss"] - rows[0]["loss"]) < 1e-4 for r in rows), rows  # same model, same numbers either way
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"size": a.size, "patching": model.config.patching, "seq_len": a.seq_len, "batch_size": a.batch_size, "device": a.device,
            "torch": torch.__version__, "python": platform.python_version(), "commit": sha, "rows": rows}
    print(json.dumps(meta, indent=1))
    if a.out:
        atomic_write(a.out, json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
