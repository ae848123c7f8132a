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

    from ..fsutil import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(_clean(obj), indent=1) + "\n")


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


# trainer flags that say where or how fast an arm ran, not what it learned: a finished arm may be re-run with
# other values of these (another machine, data copied elsewhere) and still be skipped
WHERE_FLAGS = {"data_path", "dataset", "data_dir", "save_dir", "device", "log_interval", "compile", "compile_mode",
               "step_graph", "eval_batch_size", "resume"}


def flag_values(argv: list[str]) -> dict[str, object]:
    """['--seed', '1', '--compile', ...] -> {'seed': '1', 'compile': True, ...}. A flag given more than once
    (--override, --eval_data) holds its values joined by spaces: the last alone hid the others from the report's
    comparison (--override d_model=32 / 64 first and the same --override n_layers=1 last read as one setting)."""
    out, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            key, value = argv[i][2:], argv[i + 1] if has_value else True
            before = out.get(key)
            out[key] = f"{before} {value}" if isinstance(before, str) and isinstance(value, str) else value
            i += 2 if has_value else 1
        else:
            i += 1
    return out
