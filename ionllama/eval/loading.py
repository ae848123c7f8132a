"""Loading what the benchmark measures: a checkpoint of any registered model, and eval bytes from
local files (text, jsonl[.gz|.xz], directories) or the prepared val split of the training data."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import ModelConfig
from ..data.sources import JSONL_SUFFIXES, READ_ERRORS, iter_local_file, saved_dataset_kind
from ..data.tasks import DOC_SEP
from ..errors import UserError, first_line
from ..registry import build_model
from .bpb import byte_value_problem

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".py", ".c", ".h", ".js", ".json", ".csv", ".tsv", ".html", ".xml"}


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    config: ModelConfig
    path: Path | None
    train_args: dict = field(default_factory=dict)
    step: int | None = None
    data_meta: dict = field(default_factory=dict)  # the trainer's data_position: shard folder, sizes
    phase: str | None = None  # the trainer's phase when it was written: entropy | main | joint

    @property
    def untrained_main_model(self) -> bool:
        """Written in phase 1 (only the entropy model trained so far): the main model is at its initialisation."""
        return self.phase == "entropy"

    @property
    def run_dir(self) -> Path | None:
        return self.path.parent if self.path is not None else None

    @property
    def trained_on_tasks(self) -> bool:
        """Task rows were in its batches: --dataset tasks alone (with --data_path it trains on that file), or a
        --task_mix that gave whole rows of each rank's batch (0.1 of 4 rows rounded to none)."""
        from ..data.loader import task_rows

        a = self.train_args
        if a.get("dataset") == "tasks" and not a.get("data_path"):
            return True
        try:
            mix = float(a.get("task_mix") or 0)
        except (TypeError, ValueError):
            mix = 0.0
        try:
            batch = int(a["batch_size"])
        except (KeyError, TypeError, ValueError):  # not recorded: the share alone says
            return mix > 0
        return mix > 0 and task_rows(mix, batch) > 0


def _strip_prefixes(state: dict) -> dict:
    """State dicts saved from torch.compile / DDP wrappers carry '_orig_mod.' / 'module.' prefixes."""
    out = {}
    for k, v in state.items():
        for pre in ("_orig_mod.", "module."):
            while k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def _split_config(cfg) -> tuple[dict, dict]:
    """-> (model config dict, train args found inside the config, if the config is nested)."""
    if isinstance(cfg, ModelConfig):
        return cfg.to_dict(), {}
    if not isinstance(cfg, dict):
        raise UserError("checkpoint 'config' is neither a dict nor a ModelConfig; is this an ionllama checkpoint?")
    if isinstance(cfg.get("model"), dict):  # nested {'model': {...}, 'train': {...}}
        return cfg["model"], dict(cfg.get("train") or cfg.get("args") or {})
    return cfg, {}


def read_checkpoint_file(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():  # a folder that is no sharded checkpoint: the loader's message names what to pass instead
        from ..train.distributed import load_train_state

        load_train_state(p)
    if not p.is_file():
        raise UserError(f"checkpoint '{p}' not found; pass --checkpoint PATH to a .pt written by the trainer")
    from ..train.checkpoint import load_weights_only

    try:
        ckpt = load_weights_only(p, map_location="cpu")
    except Exception as e:  # corrupted, truncated, or not a weights-only checkpoint: as the trainer says it
        from ..train.checkpoint import unreadable_checkpoint

        raise unreadable_checkpoint(p, e) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not (
            "model_config" in ckpt or "config" in ckpt):
        raise UserError(f"'{p}' has no 'model'/'model_config' entries; pass a checkpoint written by `ionllama train`")
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """A trainer checkpoint (.pt: model + model_config [+ train_args, data_position, step]), a torchrun run's
    sharded .dcp folder (the same, in shards), or a .safetensors export (weights + config only: no train args,
    so no default eval data)."""
    if str(path).endswith(".safetensors"):
        from ..train.checkpoint import load_model

        model = load_model(path, device=device)
        return LoadedCheckpoint(model, model.config, Path(path))
    from ..train import distributed

    if distributed.is_sharded_checkpoint(path):  # written under torchrun (DCP shards + train state)
        meta = distributed.load_train_state(path)
        model = distributed.load_model_from_sharded(path, meta).to(device).eval()
        step = meta.get("step")
        return LoadedCheckpoint(model, model.config, Path(path), dict(meta.get("train_args") or {}),
                                int(step) if isinstance(step, int) else None, dict(meta.get("data_position") or {}),
                                _phase(meta))
    ckpt = read_checkpoint_file(path)
    cfg_dict, nested_args = _split_config(ckpt.get("model_config", ckpt.get("config")))
    config = ModelConfig.from_checkpoint(cfg_dict, path)
    model = build_model(config)
    try:
        missing, unexpected = model.load_state_dict(_strip_prefixes(ckpt["model"]), strict=False)
    except RuntimeError as e:  # shapes that differ (strict=False lets only absent or extra keys through)
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), first_line(e, 200))[:200]
        from ..train.checkpoint import CONFIG_WEIGHTS_HINT

        raise UserError(f"checkpoint '{path}' does not match its model config ({detail}); {CONFIG_WEIGHTS_HINT}") \
            from None
    # every key: non-persistent buffers are never listed as missing, and a persistent one absent (an entropy model's
    # threshold) loaded as its init value (0: a patch at every byte) where generate refused the same file
    if missing or unexpected:
        raise UserError(f"checkpoint '{path}' does not match model '{config.model}' (missing {missing[:3]}, "
                        f"unexpected {list(unexpected)[:3]}); was it written by a different ionllama version?")
    train_args = {}
    for key in ("args", "train_args", "train_config"):
        if isinstance(ckpt.get(key), dict):
            train_args = dict(ckpt[key])
            break
    train_args = train_args or nested_args
    step = ckpt.get("step")
    data_meta = ckpt.get("data_position") if isinstance(ckpt.get("data_position"), dict) else {}
    model.to(device).eval()
    return LoadedCheckpoint(model, config, Path(path), train_args, int(step) if isinstance(step, int) else None,
                            dict(data_meta), _phase(ckpt))


def _phase(ck: dict) -> str | None:
    return ck.get("phase") if isinstance(ck.get("phase"), str) else None


# ---------------------------------------------------------------- eval bytes


def _is_jsonl(p: Path) -> bool:
    return p.name.lower().endswith(JSONL_SUFFIXES)


def _files_under(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p for p in files if _is_jsonl(p) or p.suffix.lower() in TEXT_SUFFIXES
            or p.name.lower().endswith((".txt.gz", ".txt.xz"))]


def read_eval_bytes(path: str | Path, max_bytes: int | None = None, text_field: str = "text") -> np.ndarray:
    """Documents of a file or directory, UTF-8 encoded, each preceded by DOC_SEP, as uint8 (stops at max_bytes)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"eval data '{p}' not found; pass --eval_data PATH (text, jsonl[.gz|.xz] or a directory)")
    if saved_dataset_kind(str(p)):  # its JSON metadata was scored as the text (479 bytes), its Arrow rows skipped
        raise UserError(f"eval data '{p}' is a `datasets` save_to_disk folder, which is not read here; export the "
                        f"split to score, e.g. load_from_disk('{p}')['validation'].to_json('val.jsonl'), and pass "
                        f"that file")
    files = _files_under(p) if p.is_dir() else [p]
    if not files:
        raise UserError(f"no text or jsonl files under '{p}'; pass --eval_data with .txt or .jsonl files")
    # a file only: a folder named x.bin is a folder of documents (it was an IsADirectoryError traceback)
    if p.is_file() and p.suffix in (".bin", ".u8", ".npy"):
        return _read_shard(p, max_bytes)
    try:
        parts = _read_documents(files, max_bytes, text_field)
    except (*READ_ERRORS, UnicodeDecodeError) as e:  # corrupt / mislabelled file: one line
        raise UserError(f"cannot read eval data '{p}': {e}; pass UTF-8 text or jsonl (plain, .gz or .xz)") from None
    # each document preceded by DOC_SEP, as in the trainer's shards, so BPB here matches its val_bpb layout
    data = b"".join(bytes([DOC_SEP]) + d for d in parts)
    if max_bytes is not None:
        data = data[:max_bytes]
    if len(data) < 2:
        raise UserError(f"eval data '{p}' holds fewer than 2 bytes of text; pass a larger --eval_data")
    return np.frombuffer(data, dtype=np.uint8).copy()


def _read_documents(files: list[Path], max_bytes: int | None, text_field: str) -> list[bytes]:
    """The documents' raw bytes, read by the training data's own readers: a text file is never decoded (it was read
    with errors="replace", so invalid UTF-8 was scored as U+FFFD bytes that are not in the file), and a jsonl
    record's text is the bytes the trainer's shards would hold."""
    parts: list[bytes] = []
    total = 0
    for f in files:
        for _, doc in iter_local_file(str(f), str(f.parent), text_field):
            b = doc.replace(bytes([DOC_SEP]), b"")  # the separator byte must stay unambiguous
            if not b:
                continue
            parts.append(b)
            total += len(b) + 1
            if max_bytes is not None and total >= max_bytes:
                break
        if max_bytes is not None and total >= max_bytes:
            break
    return parts


def _read_shard(p: Path, max_bytes: int | None) -> np.ndarray:
    fix = "pass a uint8 .npy, a raw byte .bin (as `ionllama prepare` writes) or text/jsonl"
    try:
        arr = np.load(p, mmap_mode="r") if p.suffix == ".npy" else np.memmap(p, dtype=np.uint8, mode="r")
    except (OSError, ValueError, EOFError) as e:  # empty file, corrupt or pickled (object) .npy: one line
        why = first_line(e).split(". ")[0]  # numpy's pickle note goes on about allow_pickle, no flag of ours
        raise UserError(f"cannot read eval data '{p}' ({why}); {fix}") from None
    # DOC_SEP first, as before a text file's bytes (a prepared val.bin starts with it): without it a byte model left
    # the first byte unscored and a BPE model its whole first token, so their rows scored different bytes
    sep = bool(arr.size) and arr.ndim == 1 and arr[0] != DOC_SEP
    if max_bytes is not None:
        arr = arr[:max_bytes - sep]
    problem = byte_value_problem(arr)
    if problem:
        raise UserError(f"eval data '{p}' {problem}; {fix}")
    arr = np.asarray(arr, dtype=np.uint8)
    return np.concatenate([np.array([DOC_SEP], dtype=np.uint8), arr]) if sep else arr


def default_eval_path(ck: LoadedCheckpoint | None) -> Path:
    """The val split (val.bin) of the checkpoint's training data, if its prepared shards are on this machine."""
    fix = "pass --eval_data PATH (any local text/jsonl/dir)"
    if ck is None:
        raise UserError(f"no --checkpoint and no --eval_data; {fix}")
    a = ck.train_args
    if not a and not ck.data_meta:  # said it was "not on this machine", as if it could be found elsewhere
        raise UserError(f"{ck.path} records no training data (a .safetensors export holds weights and config only); "
                        f"{fix}")
    if a.get("dataset") == "tasks" and not a.get("data_path"):
        raise UserError(f"the checkpoint was trained on generated task data only (no val shards); {fix}")
    candidates: list[Path] = []
    if ck.data_meta.get("path"):  # the shard folder the trainer read
        candidates.append(Path(ck.data_meta["path"]) / "val.bin")
    for c in candidates:
        if c.is_file():
            return c
    where = ", ".join(str(c) for c in candidates) or "the checkpoint records no shard folder"
    # prepare prints the shard folder it makes (its name depends on the path as written, so it may differ)
    hint = (f" or re-create them with `ionllama prepare --data_path {a['data_path']}` and pass the val.bin in the "
            "folder it prints as --eval_data" if a.get("data_path") else
            f" or re-create them with `ionllama prepare --dataset {a['dataset']}` and pass the val.bin in the folder "
            "it prints as --eval_data" if a.get("dataset") else "")
    if a.get("data_path") and not Path(a["data_path"]).is_absolute():
        hint += f" (the checkpoint's --data_path {a['data_path']} is relative to the folder it was trained in)"
    raise UserError(f"the val split of the checkpoint's training data is not on this machine ({where}); {fix}{hint}")
