"""Checkpoints: atomic writes, safe loading (weights_only=True), RNG capture, safetensors export, and
`load_model(path)` that rebuilds a model from a .pt checkpoint or a .safetensors export.

A checkpoint is a dict of plain containers and tensors only, so weights_only loading accepts it:
format, model, optimizer, scheduler, scaler, step, phase, rng, data_position, model_config,
train_args, best_val_bpb."""
from __future__ import annotations

import json
import lzma
import os
import pickle
import random
import shutil
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import UserError, first_line
from ..fsutil import fsync_replace, temp_path

CHECKPOINT_FORMAT = "ionllama-checkpoint-1"
SAFETENSORS_CONFIG_KEY = "ionllama_config"


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:  # a file object, not the path: a full disk is then the OSError (ENOSPC) of
            torch.save(state, f)    # its write, not only torch's "[enforce fail at inline_container.cc]" RuntimeError
        fsync_replace(tmp, path)
    except RuntimeError as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e.__context__, OSError):  # torch's zip writer fails again while closing: the cause is the write
            raise e.__context__ from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Atomic copy (cheaper than serialising the same state twice)."""
    dst = Path(dst)
    tmp = temp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        fsync_replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst



class DamagedCheckpoint(zipfile.BadZipFile):
    """A .pt whose bytes no longer match the CRC-32 its zip records: torch.load does not check them, so flipped
    bytes loaded as silently wrong weights."""


def unreadable_checkpoint(path, e: BaseException) -> UserError:
    """The one-line error for a file torch.load cannot read, the same from the trainer, generate and the
    benchmark: torch's own text (a pickle or zip detail, or the weights_only essay) helps no one, the type says
    enough."""
    if isinstance(e, DamagedCheckpoint):
        return UserError(f"{path} is damaged ({e}); use another checkpoint of the run (best.pt, an older step_N.pt) "
                         "or resume from it with --resume PATH")
    return UserError(f"{path} is not a readable checkpoint (corrupt, truncated, or another kind of file; "
                     f"torch.load: {type(e).__name__}); pass a .pt written by `ionllama train` (latest.pt, "
                     "final.pt or an older step_N.pt of the run)")


def load_weights_only(path: str | Path, **kw):
    """torch.load that never runs code from the file (weights_only) and keeps torch's note about a foreign pickle
    protocol off the console: such a file fails to load anyway, and its one error line should stand alone."""
    # mmap'd loads read a step or a phase, not the weights: not worth reading the whole file for
    if not kw.get("mmap") and isinstance(path, (str, Path)) and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:  # reads the file once (~2 GB/s) to check every record's CRC-32
                bad = z.testzip()
        except (zlib.error, lzma.LZMAError):  # a record header's compression method flipped: types no caller caught
            raise DamagedCheckpoint("a record's header no longer reads as stored data") from None
        if bad is not None:
            raise DamagedCheckpoint(f"its record {bad} fails its checksum")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, weights_only=True, **kw)


def _safetensors_not_resumable(path: Path) -> UserError:
    return UserError(f"{path} is a safetensors export (weights only): it loads for generate / bench, not for "
                     "--resume; resume from the run's latest.pt, step_N.pt or final.pt")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():  # a sharded <name>.dcp folder of a torchrun run: its train state (tensors load later)
        from .distributed import load_train_state

        return load_train_state(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; check the path (or use --resume auto)")
    if path.suffix == ".safetensors":  # said before reading: torch.load hands a damaged one to safetensors, whose
        raise _safetensors_not_resumable(path)  # error type none of the handlers below knew (a traceback)
    try:
        ck = load_weights_only(path, map_location=map_location)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError) as e:
        # torch's own text (a pickle or zip detail, or the weights_only essay) helps no one here: the type says enough
        raise unreadable_checkpoint(path, e) from None
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or not isinstance(ck.get("model_config"),
                                                                                           dict):
        raise UserError(f"{path} is not an ionllama checkpoint (no model / model_config); pass a file written by "
                        "`ionllama train`")
    return ck


# ---------------------------------------------------------------- RNG

def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- weights only

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile / DDP wrappers."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr):
            model = getattr(model, attr)
    return model


def model_state(model: torch.nn.Module) -> dict:
    """state_dict of the underlying module (unwraps torch.compile / DDP wrappers)."""
    return unwrap_model(model).state_dict()


# what to do when a file's weights do not fit the model built from its own config (no flag of the caller's mends it)
CONFIG_WEIGHTS_HINT = "its stored model config and weights disagree; load the checkpoint its run wrote, not an " \
                      "edited or mixed one"


def load_model_state(model: torch.nn.Module, state: dict, source: str,
                     hint: str = "use the model/size it was trained with") -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        want, have = set(model.state_dict()), set(state)
        if want != have:  # name the keys: torch's first line ("Error(s) in loading state_dict for X:") names none
            first = "; ".join([f"missing {k}" for k in sorted(want - have)[:3]]
                              + [f"unexpected {k}" for k in sorted(have - want)[:3]])
        else:
            first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), first_line(e, 200))[:200]
        raise UserError(f"{source} does not match the model ({first}); {hint}") from None


def export_safetensors(model: torch.nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Weights + the model config (JSON in the safetensors metadata), written atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    path = Path(path)
    model = unwrap_model(model)  # a compiled model's keys were written as '_orig_mod.<name>': no load took them
    meta = {SAFETENSORS_CONFIG_KEY: json.dumps(model.config.to_dict())}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tmp = temp_path(path)
    try:
        save_model(model, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; make it as readable as torch.save's files
        fsync_replace(tmp, path)
    except SafetensorError as e:  # its I/O errors (a full disk) are no OSError: the callers' handlers missed them
        tmp.unlink(missing_ok=True)
        raise OSError(f"safetensors could not write {path} ({first_line(e)})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def checkpoint_phase(path: str | Path) -> str | None:
    """The trainer's phase when the checkpoint was written (entropy | main | joint), None when it does not say
    (a safetensors export) or cannot be read. Memory-mapped: the weights are not read again."""
    path = Path(path)
    try:
        if path.is_dir():
            from .distributed import load_train_state

            ck = load_train_state(path)
        elif path.suffix == ".safetensors":
            return None
        else:
            ck = load_weights_only(path, map_location="cpu", mmap=True)
    except Exception:  # the model loaded already; a phase we cannot read is no reason to fail
        return None
    phase = ck.get("phase") if isinstance(ck, dict) else None
    return phase if isinstance(phase, str) else None


def load_model(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Rebuild a model (eval mode) from a training checkpoint (.pt) or a safetensors export."""
    from ..registry import build_model

    path = Path(path)
    if path.is_dir():  # sharded <name>.dcp checkpoint: gathered into one process
        from .distributed import load_model_from_sharded

        model = load_model_from_sharded(path)
    elif not path.is_file():
        raise UserError(f"model file {path} not found; give a .pt checkpoint or a .safetensors export")
    elif path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_model as st_load_model

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            cfg = json.loads(meta[SAFETENSORS_CONFIG_KEY])
        except KeyError:
            raise UserError(f"{path} has no ionllama config in its metadata; export it with export_safetensors") from None
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}); re-export it") from None
        model = build_model(ModelConfig.from_checkpoint(cfg, path))
        try:
            st_load_model(model, str(path), strict=True)
        except RuntimeError as e:  # torch's first line names no key: name them
            with safe_open(str(path), framework="pt") as f:
                want, have = set(model.state_dict()), set(f.keys())
            keys = "; ".join([f"missing {k}" for k in sorted(want - have)[:3]]
                             + [f"unexpected {k}" for k in sorted(have - want)[:3]]) or first_line(e, 200)
            raise UserError(f"{path} does not match its model config ({keys}); re-export it") from None
    else:
        ck = load_checkpoint(path)
        model = build_model(ModelConfig.from_checkpoint(ck["model_config"], path))
        load_model_state(model, ck["model"], str(path), hint=CONFIG_WEIGHTS_HINT)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
