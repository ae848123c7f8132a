"""`python -m ionllama.params`: a Markdown table of the real parameter counts (count_parameters(), by
component) of every size of every registered model. Models are built on the meta device, so even
xl costs no memory."""
from __future__ import annotations

import sys

import torch

from .config import SIZES, make_config
from .errors import UserError, cli_entry
from .registry import build_model, model_names


def _config(size: str, model: str):
    from .data.bpe import configure

    # token models (the BPE baseline) get their default vocabulary, as the trainer gives them
    return configure(make_config(size, model))


def count_table(model: str) -> tuple[list[str], list[tuple[str, dict]]]:
    rows = []
    for size in SIZES.get(model, SIZES["dense"]):
        with torch.device("meta"):
            counts = build_model(_config(size, model)).count_parameters()
        rows.append((size, counts))
    components = []
    for _, counts in rows:
        components += [k for k in counts if k != "total" and k not in components]
    return components, rows


def _m(n: int) -> str:
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1e3:.1f}K"
    return f"{n / 1e6:.2f}M"


def markdown(models: list[str] | None = None) -> str:
    out = []
    for model in models or model_names():
        components, rows = count_table(model)
        out.append(f"### {model}\n")
        out.append("| size | " + " | ".join(components) + " | total |")
        out.append("|---|" + "---:|" * (len(components) + 1))
        for size, counts in rows:
            cells = [_m(counts[c]) if c in counts else "-" for c in components]
            out.append(f"| {size} | " + " | ".join(cells) + f" | {counts['total']:,} ({_m(counts['total'])}) |")
        out.append("")
    return "\n".join(out)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: python -m ionllama.params [MODEL ...]   (models: {', '.join(model_names())}; default: all)")
        return 0
    unknown = [a for a in argv if a not in model_names()]
    if unknown:
        raise UserError(f"unknown model '{unknown[0]}'; choose any of {', '.join(model_names())} (or none for all)")
    print(markdown(argv or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
