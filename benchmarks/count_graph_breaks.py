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

import argparse
import json
import os
import platform
import subprocess

import torch

import ionllama.kernels as K
from ionllama import create_model


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--patching", default=None, help="override the size's patching (fixed and byte need no host sync)")
    ap.add_argument("--routings", default="eager_reference,custom_ops")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on CPU the custom-op routing runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = create_model(a.size, **({"patching": a.patching} if a.patching else {})).to(a.device)
    model.freeze_entropy(True)  # the main phase: entropy model frozen, as in most of training
    x = torch.randint(0, 256, (a.batch_size, a.seq_len + 1), device=a.device)
    rows = [count(model, x[:, :-1], x[:, 1:], r) for r in a.routings.split(",")]
    assert all(abs(r["loss"] - rows[0]["loss"]) < 1e-4 for r in rows), rows  # same model, same numbers either way
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"size": a.size, "patching": model.config.patching, "seq_len": a.seq_len, "batch_size": a.batch_size, "device": a.device,
            "torch": torch.__version__, "python": platform.python_version(), "commit": sha, "rows": rows}
    print(json.dumps(meta, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
