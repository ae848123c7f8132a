"""Small helpers shared by the experiment's modules: logging, JSON files, device sync, autocast."""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
from pathlib import Path

import torch


def _log(msg: str) -> None:
    print(f"[experiment] {msg}", flush=True)


def _now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_json(path: Path, obj) -> None:
    from ..eval.benchmark import _clean

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1) + "\n")
    tmp.replace(path)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp_dtype):
    return torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def _split_path(pattern: str, split: str) -> str | None:
    """--data_path with '{split}' -> the file of another split (e.g. test), if it exists."""
    if "{split}" not in pattern:
        return None
    p = pattern.replace("{split}", split)
    return p if Path(p).exists() else None
