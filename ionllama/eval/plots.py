"""PNG plots for the benchmark (matplotlib, Agg backend: works without a display).

* ``plot_runs([...], out)`` - training curves (BPB vs bytes seen) of one or several runs from metrics.jsonl
* ``plot_language_bpb(multilingual, out)`` - BPB per language file
* ``plot_patch_histogram(compression, out)`` - patch-size histogram
* ``plot_entropy_sample(text, entropy, byte_to_patch, out)`` - per-byte entropy with patch boundaries
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError

X_KEYS = ("bytes_seen", "train_bytes", "bytes", "tokens_seen", "step")  # first one present is the x axis
VAL_KEYS = ("val_bpb", "eval_bpb")
TRAIN_KEYS = ("train_bpb", "bpb")
NOT_MAIN_PHASES = ("entropy", "calibrate")
LOG_X = ("bytes_seen", "train_bytes", "bytes", "tokens_seen")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a run's metrics.jsonl (a run directory or the file itself, or its .gz copy)."""
    from ..train.metrics import metrics_file, read_metrics as read

    if metrics_file(path) is None:
        raise UserError(f"no metrics.jsonl at '{path}'; pass a run directory written by `ionllama train`")
    return read(path)


def _is_val(r: dict) -> bool:
    return str(r.get("split", r.get("kind", r.get("phase", "")))).lower() in ("val", "eval", "validation")


def curves(records: list[dict]) -> dict:
    """-> {'x_key', 'train': [(x, bpb)], 'val': [(x, bpb)]} from metrics records of any of the usual shapes."""
    x_key = next((k for k in X_KEYS if any(k in r for r in records)), None)
    out = {"x_key": x_key or "index", "train": [], "val": []}
    last_x = 0.0
    for i, r in enumerate(records):
        x = r.get(x_key, last_x) if x_key else i
        if not isinstance(x, (int, float)):
            continue
        last_x = x
        if str(r.get("phase", "")).lower() in NOT_MAIN_PHASES:
            # the entropy model's own loss and val scores, not the LM's (its val BPB sat on the run's val line)
            continue
        v = next((r[k] for k in VAL_KEYS if isinstance(r.get(k), (int, float))), None)
        if v is None and _is_val(r) and isinstance(r.get("bpb"), (int, float)):
            v = r["bpb"]
        if v is not None:
            out["val"].append((x, float(v)))
            continue
        t = next((r[k] for k in TRAIN_KEYS if isinstance(r.get(k), (int, float))), None)
        if t is not None and math.isfinite(t):
            out["train"].append((x, float(t)))
    return out


def plot_runs(runs, out: str | Path, title: str = "Training curves") -> Path:
    """runs: run dirs / metrics.jsonl paths, or (label, path) pairs. Val BPB solid, train BPB faint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x_label = "step"
    plotted = 0
    for run in runs:
        label, path = run if isinstance(run, tuple) else (Path(run).name if Path(run).is_dir() else Path(run).parent.name, run)
        c = curves(read_metrics(path))
        x_label = c["x_key"]
        if x_label in LOG_X:  # the evaluation before training sits at 0 bytes: not on a log axis
            c["train"] = [p for p in c["train"] if p[0] > 0]
            c["val"] = [p for p in c["val"] if p[0] > 0]
        line = None
        if c["train"]:
            xs, ys = zip(*c["train"])
            (line,) = ax.plot(xs, ys, alpha=0.35, lw=1, label=f"{label} train")
            plotted += 1
        if c["val"]:
            xs, ys = zip(*c["val"])
            ax.plot(xs, ys, marker="o", ms=3, lw=1.8, color=line.get_color() if line else None, label=f"{label} val")
            plotted += 1
    if not plotted:
        plt.close(fig)
        raise UserError(f"no BPB values in the metrics of {runs}; expected keys like val_bpb / bpb")
    ax.set_xlabel(x_label.replace("_", " "))
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    if x_label in LOG_X:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_language_bpb(multilingual: dict, out: str | Path) -> Path:
    plt = _plt()
    groups = multilingual["groups"]
    several = len(groups) > 1  # the same language can appear in two folders: name the folder too
    rows = [((f"{Path(g['dir']).name}/" if several else "") + name, rec["bpb"], rec.get("bytes_per_patch"), gi)
            for gi, g in enumerate(groups) for name, rec in g["languages"].items()]
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(rows) + 2), 4))
    names = [r[0] for r in rows]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:gray"]
    ax.bar(range(len(rows)), [r[1] for r in rows], color=[colors[r[3] % len(colors)] for r in rows])
    for i, (_, bpb, bpp, _g) in enumerate(rows):
        ax.text(i, bpb, f"{bpb:.2f}" + (f"\n{bpp:.1f} B/p" if bpp else ""), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
    ax.set_ylabel("bits per byte")
    ax.set_title("BPB per language file (label: BPB, bytes/patch)")
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_patch_histogram(compression: dict, out: str | Path) -> Path:
    plt = _plt()
    hist = {int(k): v for k, v in compression["histogram"].items()}
    total = sum(hist.values()) or 1
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar(list(hist), [v / total for v in hist.values()], color="tab:green")
    ax.set_xlabel("patch size (bytes)")
    ax.set_ylabel("fraction of patches")
    ax.set_title(f"Patch sizes: mean {compression['bytes_per_patch']:.2f} bytes/patch ({compression['source']})")
    ax.set_xticks(list(hist))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def _label(b: int) -> str:
    if b == 10:
        return "\\n"
    if b == 32:
        return "\u2423"  # open box: a visible space
    if b == 0:
        return "\u2400"
    return chr(b) if 32 < b < 127 else f"{b:02x}"


def plot_entropy_sample(text: bytes, entropy, byte_to_patch, out: str | Path, per_row: int = 64,
                        threshold: float | None = None, entropy_is_next: bool = True) -> Path:
    """Bar at byte t: the entropy (bits) of the distribution that predicted byte t; red lines: patch starts.
    entropy_is_next: entropy[t] is H(x_{t+1} | x_<=t) (the ionllama convention), so it is shifted by one."""
    plt = _plt()
    ent = [float(e) for e in entropy][: len(text)]
    if entropy_is_next:
        ent = [0.0] + ent[:-1]  # byte 0 has no prediction: it always starts a patch
    b2p = [int(p) for p in byte_to_patch][: len(text)]
    n_rows = math.ceil(len(ent) / per_row)
    fig, axes = plt.subplots(n_rows, 1, figsize=(14, 2.2 * n_rows), squeeze=False)
    top = max(ent + [1.0]) * 1.1
    for r in range(n_rows):
        ax = axes[r][0]
        lo, hi = r * per_row, min((r + 1) * per_row, len(ent))
        ax.bar(range(hi - lo), ent[lo:hi], color="tab:blue", width=0.8)
        for i in range(lo, hi):
            if i == 0 or b2p[i] != b2p[i - 1]:
                ax.axvline(i - lo - 0.5, color="tab:red", lw=1)
        if threshold is not None:
            ax.axhline(threshold, color="gray", ls="--", lw=0.8)
        ax.set_xticks(range(hi - lo), [_label(b) for b in text[lo:hi]], fontsize=7, family="monospace")
        ax.set_xlim(-0.7, per_row - 0.3)
        ax.set_ylim(0, top)
        ax.set_ylabel("bits")
    axes[0][0].set_title("Entropy of predicting each byte (bars, bits), patch starts (red lines)" + (", threshold (dashed)" if threshold is not None else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
