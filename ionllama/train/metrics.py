"""Metrics: every logged point is one JSON line in <run>/metrics.jsonl, and optionally a wandb point.

Fields: step, phase, bytes_seen, train_time_s (evaluation and checkpointing excluded), loss, bpb, lr,
bytes_per_s, bytes_per_patch, and val_loss / val_bpb / val_ppl / val_bytes / val_bytes_per_patch on
evaluation points. Phases: init (evaluation before training), entropy, calibrate, main, joint."""
from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    def __init__(self, run_dir: Path, use_wandb: bool = False, run_name: str = "", config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if use_wandb:
            try:
                import wandb  # lazy: optional dependency
            except ImportError:
                warnings.warn("--wandb given but wandb is not installed (pip install wandb); logging to "
                              "metrics.jsonl only", stacklevel=2)
            else:
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ionllama"), name=run_name,
                                        config=config or {}, dir=str(run_dir), resume="allow")

    def truncate_after(self, step: int, phase: str | None = None, keep_dropped: Path | None = None) -> int | None:
        """On resume: drop points logged after the checkpoint (they will be logged again): later steps, and
        at its own step the points of a later phase (calibration and the evaluation after it). Returns the last
        step dropped (None if nothing was). keep_dropped: a file the dropped lines are written to first (a resume
        from an older checkpoint abandons a branch that will not be logged again)."""
        if not self.path.exists():
            return None
        keep, dropped, last = [], [], None
        # bytes, not text: a stray non-UTF-8 byte (an edit, a damaged tail) was a UnicodeDecodeError traceback
        for line in self.path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            s = rec.get("step", 0) if isinstance(rec, dict) else None
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                continue  # not a point of ours (a list, a number, a step that is no number): an AttributeError before
            # a joint-phase checkpoint is saved after that step's calibration: its point stays (not logged again)
            same_step_kept = rec.get("phase") in (phase, "init") or \
                (phase == "joint" and rec.get("phase") == "calibrate")
            if s < step or (s == step and (phase is None or same_step_kept)):
                keep.append(line)
            else:
                dropped.append(line)
                last = s if last is None else max(last, s)
        if keep_dropped is not None and dropped:
            tmp = Path(keep_dropped).with_name(Path(keep_dropped).name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in dropped))
            os.replace(tmp, keep_dropped)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)
        return last

    def set_aside(self) -> Path | None:
        """A fresh run in a folder that holds an earlier run's metrics.jsonl (one that stopped before its first
        checkpoint: diverged, killed, out of memory) moves them to metrics.before-new-run[-N].jsonl: they were
        deleted without a word, and they were that run's only record."""
        try:
            if not self.path.is_file() or self.path.stat().st_size == 0:
                return None
        except OSError:
            return None
        k, dst = 1, self.path.with_name("metrics.before-new-run.jsonl")
        while dst.exists():
            k += 1
            dst = self.path.with_name(f"metrics.before-new-run-{k}.jsonl")
        os.replace(self.path, dst)
        return dst

    def log(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items() if v is not None}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def metrics_file(path: str | Path) -> Path | None:
    """A run's metrics: <dir>/metrics.jsonl (or the file given), else its gzip copy `metrics.jsonl.gz`. Results
    committed under docs/results keep theirs gzipped (scripts/pack_results.sh): every device call carries the
    whole tree within 64 MiB, next to the Gutenberg data."""
    from ..errors import UserError

    p = Path(path)
    try:  # a folder it may not search: a PermissionError traceback (bench --runs, train_val_gap.py)
        if p.is_dir():
            p = p / "metrics.jsonl"
        for c in (p, p.with_name(p.name + ".gz")):
            if c.is_file():
                return c
    except OSError as e:
        raise UserError(f"cannot read the metrics at {path} ({e.strerror or e}); check its permissions") from None
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl (a run directory, the file, or a missing file with a .gz copy); lines that
    do not parse (one cut by a crash mid-write) and non-objects are skipped."""
    p = metrics_file(path)
    if p is None:
        raise FileNotFoundError(f"no metrics.jsonl(.gz) at '{path}'")
    try:
        if p.suffix == ".gz":
            import gzip

            with gzip.open(p, "rt", encoding="utf-8", errors="replace") as f:
                text = f.read()
        else:
            text = p.read_text(encoding="utf-8", errors="replace")
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a damaged .gz: a traceback after bench's evaluation
        from ..errors import UserError

        raise UserError(f"cannot read {p} ({getattr(e, 'strerror', None) or e}); check the file") from None
    out = []
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            out.append(r)
    return out
