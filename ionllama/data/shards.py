"""Prepare byte shards: a source's documents -> ``train.bin`` / ``val.bin`` (uint8, each document
preceded by DOC_SEP) + ``meta.json`` in a cache folder keyed by the source and the arguments, so
preparing twice with the same arguments reuses the shards.

Split: the source's own split files when it has them, else by a hash of each document's id and the
split seed (~val_fraction of the documents, at least one). A source of a single document is split
at a line boundary near its end instead.

--max_bytes caps the bytes taken from the source (document bytes as read, before NUL removal, without separators):
train and val together for a split by hash or tail (a single file: its first max_bytes bytes, then split), the
train files for given split files (their val files: max(1 MB, val_fraction x max_bytes)). The document that crosses
the cap is cut at it."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError, check_not_blank
from ..fsutil import process_gone, remove_if_empty
from . import DOC_SEP_BYTES

# 2: --max_bytes cuts the document crossing it (it went in whole), .json arrays are read as records and upper-case
# .GZ/.XZ/.BZ2 are decompressed (they were read as text): shards of format 1 from such sources are not reused
# 3: parquet rows numbered from 0 without `datasets`, the single document's cut on its text, a .json file's long
# first record read as JSON Lines, a glob's documents named below its literal folder, ionLlama's own cache and run
# folders left out of a --data_path folder: each changed the bytes of some source's shards, and format 2 was kept
# 4: a JSON string's raw bytes of a lone surrogate (ed b2 80) are kept (they became the one byte 0x80), and JSON
# Lines named .json whose first record holds invalid UTF-8 are read as JSON Lines (they were read as text)
SHARD_FORMAT = 4
DATASETS = ("tinystories", "fineweb", "openwebtext", "builtin", "tasks")


@dataclass
class DataArgs:
    dataset: str = "builtin"
    data_path: str | None = None  # overrides dataset
    data_dir: str = "data_cache"
    text_field: str = "text"
    val_fraction: float = 0.01
    split_seed: int = 0
    max_bytes: int | None = None  # cap on bytes read (see the module doc; fineweb defaults to fineweb_bytes)
    builtin_bytes: int = 8_000_000
    fineweb_bytes: int = 2_000_000_000


@dataclass
class Shards:
    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray


def _split_unit(doc_id: str, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


class _SplitWriter:
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.bytes = 0
        self.docs = 0
        self.last_start = 0
        self.nul_removed = 0
        self.last_raw, self.last_nul = b"", 0  # the last document as given, and the NULs removed from it

    def add(self, raw: bytes) -> bool:
        """Write a document; False when nothing is left of it (empty, or NULs only) and nothing was written."""
        doc = raw.replace(DOC_SEP_BYTES, b"")  # the separator must stay unambiguous
        self.nul_removed += len(raw) - len(doc)
        if not doc:
            return False
        self.last_raw, self.last_nul = raw, len(raw) - len(doc)
        self.last_start = self.bytes
        self.f.write(DOC_SEP_BYTES)
        self.f.write(doc)
        self.bytes += 1 + len(doc)
        self.docs += 1
        return True

    def pop_last(self) -> bytes:
        """Remove the last document; returns it as given, NULs included, and takes its NULs off this split's count
        (they were counted here while the document went to the other split or was cut in two)."""
        self.f.flush()
        self.f.seek(self.last_start)
        self.f.truncate()
        self.bytes = self.last_start
        self.docs -= 1
        self.nul_removed -= self.last_nul
        raw, self.last_raw, self.last_nul = self.last_raw, b"", 0
        return raw

    def close(self) -> None:
        self.f.close()


def _after_kth_text_byte(raw: bytes, k: int) -> int:
    """The position in `raw` just after its k-th (k >= 1) byte that is not the separator NUL; in 1 MiB chunks, so a
    large document costs no index array of its size."""
    if DOC_SEP_BYTES not in raw:
        return k
    seen, chunk = 0, 1 << 20
    for pos in range(0, len(raw), chunk):
        piece = raw[pos:pos + chunk]
        n = len(piece) - piece.count(DOC_SEP_BYTES)
        if seen + n >= k:
            return pos + int(np.flatnonzero(np.frombuffer(piece, np.uint8) != DOC_SEP_BYTES[0])[k - seen - 1]) + 1
        seen += n
    return len(raw)


class _Cap:
    """The bytes taken from a source against a cap (None: none). The document that crosses the cap is cut at it
    (it went in whole: a single 500 kB file under --max_bytes 20000 gave 500 kB of shards); the cut may fall
    mid-line or mid-UTF-8 character, which is kept simple on purpose: a byte model takes any bytes, and at most
    3 odd bytes end the last document."""

    def __init__(self, limit: int | None):
        self.limit, self.taken = limit, 0

    def take(self, doc: bytes) -> bytes:
        if self.limit is not None:
            doc = doc[:self.limit - self.taken]
            self.taken += len(doc)
        return doc

    @property
    def full(self) -> bool:
        return self.limit is not None and self.taken >= self.limit


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def make_source(args: DataArgs):
    from . import sources

    if args.data_path:
        budget = _byte_budget(args)  # a huge text file is read no further than the largest cap of a split
        limit = None if budget is None else max(budget, _val_budget(args, budget))
        return sources.local_source(args.data_path, args.text_field, read_limit=limit)
    if args.dataset == "builtin":
        return sources.builtin_source(args.builtin_bytes)
    if args.dataset in sources.HUB_DATASETS:
        return sources.hub_source(args.dataset, args.text_field if args.text_field != "text" else None)
    if args.dataset == "tasks":
        raise UserError("--dataset tasks is generated while training and has no shards; nothing to prepare (train "
                        "with --dataset tasks directly)")
    raise UserError(f"unknown dataset '{args.dataset}'; choose one of {', '.join(DATASETS)} or pass --data_path")


def _byte_budget(args: DataArgs) -> int | None:
    if args.max_bytes is not None:
        return int(args.max_bytes)
    if not args.data_path and args.dataset == "fineweb":
        return int(args.fineweb_bytes)
    return None


def _val_budget(args: DataArgs, budget: int | None) -> int | None:
    """The cap on given val files: enough for a steady val BPB even under a small --max_bytes."""
    return None if budget is None else max(1_000_000, int(budget * args.val_fraction))


SMALL_VAL_BYTES = 4096  # below this a val BPB is mostly noise


def cache_dir_for(args: DataArgs, source) -> tuple[Path, dict]:
    key = {"format": SHARD_FORMAT, "source": source.key, "val_fraction": args.val_fraction,
           "split_seed": args.split_seed, "max_bytes": _byte_budget(args)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.description.split(":", 1)[-1])
    slug = slug.strip("_.")[-40:] or "data"
    return Path(args.data_dir) / f"{source.key['kind']}-{slug}-{digest}", key


def prepare(args: DataArgs, log: Callable[[str], None] = print) -> Path:
    """Build (or reuse) the shards for `args`; returns their folder."""
    if not 0.0 < args.val_fraction < 0.5:
        raise UserError(f"--val_fraction {args.val_fraction} must be in (0, 0.5): the share of documents held out "
                        "for val, e.g. 0.01 (the default)")
    check_not_blank(args, ("data_dir", "data_path"))  # --data_path '' trained on --dataset builtin
    if args.max_bytes is not None and args.max_bytes < 1:  # read as "no text" and blamed on --data_path before
        raise UserError(f"--max_bytes {args.max_bytes} must be at least 1; leave it out to read everything")
    for flag, dataset in (("builtin_bytes", "builtin"), ("fineweb_bytes", "fineweb")):
        if (not args.data_path and args.dataset == dataset and getattr(args, flag) < 1
                and (dataset == "builtin" or args.max_bytes is None)):  # was "contains no text;
            # check --data_path / --text_field", naming flags the run never had
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least 1 (the bytes of --dataset {dataset} "
                            "to prepare)")
    source = make_source(args)
    out, key = cache_dir_for(args, source)
    if _reusable(out, key, log):
        return out
    with cache_lock(Path(args.data_dir), out.name, "--data_dir"):
        if _reusable(out, key, lambda m: None if "preparing it again" in m else log(m)):  # another process built it
            # while this one waited (its "preparing it again" was said by the first look)
            return out
        log(f"data: preparing {source.description} -> {out}")
        t0 = time.time()
        with staged_dir(out, Path(args.data_dir), "--data_dir") as tmp:
            meta = _write_shards(source, args, tmp, log)
            meta["key"] = key
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    s = meta["splits"]
    log(f"data: {s['train']['documents']:,} train docs / {s['train']['bytes']:,} bytes, {s['val']['documents']:,} val "
        f"docs / {s['val']['bytes']:,} bytes ({meta['split_method']} split) in {time.time() - t0:.1f} s")
    removed = sum(s[k].get("nul_bytes_removed", 0) for k in ("train", "val"))
    if removed:  # said once, when the shards are made: the text the model sees is not quite the file's
        log(f"data: note: removed {removed:,} NUL (0x00) bytes from the documents; 0x00 is the document separator")
    if s["val"]["bytes"] < SMALL_VAL_BYTES:  # e.g. a hash split that drew one short document into val
        log(f"data: warning: the val split holds only {s['val']['bytes']:,} bytes, too few for a steady val BPB; "
            + ("give a larger val file" if meta.get("split_method") == "given" else
               "raise --val_fraction (at most 0.49) or give more data"))
    old = earlier_versions(out, key)
    if old:  # said, not deleted: a user's folder is theirs to remove (an earlier run may still be reading it)
        size = sum(f.stat().st_size for d in old for f in d.rglob("*") if f.is_file())
        log(f"data: note: {len(old)} cache folder(s) of earlier versions of these files remain ({size / 1e6:,.1f} MB), "
            f"unused from now on; remove them with: rm -r {' '.join(shlex.quote(str(d)) for d in old)}")
    return out


def earlier_versions(out: Path, key: dict) -> list[Path]:
    """Cache folders of the same source (path, text field, ...) made from other versions of its files, or by an
    earlier SHARD_FORMAT: a source that changed gets a new folder (a new key) and the old one was never used
    again, nor said."""
    same = {k: v for k, v in key["source"].items() if k != "files"}
    found = []
    for d in sorted(out.parent.glob(out.name[:-12] + "?" * 12)):
        try:
            old_key = json.loads((d / "meta.json").read_text())["key"]
            old = old_key["source"]
            stale = old != key["source"] or old_key.get("format") != key["format"]
            if d != out and stale and {k: v for k, v in old.items() if k != "files"} == same:
                found.append(d)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not a cache folder of this format: not ours to name
    return found


def _remove_stale_tmp(parent: Path, name: str) -> None:
    """Temporary folders of earlier runs of this cache folder whose process is gone (SIGTERM or SIGKILL skips the
    clean-up below; the pid in the name kept them from ever being reused)."""
    for d in parent.glob(f".tmp-{name}-*"):
        if process_gone(d.name.rsplit("-", 1)[-1]):
            shutil.rmtree(d, ignore_errors=True)


def _reusable(out: Path, key: dict, log) -> bool:
    """Whether `out` holds whole shards made under `key` (said in the log either way it matters)."""
    meta_path = out / "meta.json"
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        sizes_ok = all((out / f"{sp}.bin").is_file() and (out / f"{sp}.bin").stat().st_size ==
                       meta["splits"][sp]["bytes"] for sp in ("train", "val"))
    except (ValueError, KeyError, OSError):
        return False  # unreadable cache: rebuild it
    if meta.get("key") == key and not sizes_ok:  # a truncated shard was reused (and trained on) silently
        log(f"data: {out} has a shard whose size is not the one meta.json records; preparing it again")
        return False
    if meta.get("key") == key:
        log(f"data: reusing {out} ({meta['splits']['train']['bytes']:,} train / "
            f"{meta['splits']['val']['bytes']:,} val bytes)")
        return True
    return False


@contextmanager
def cache_lock(parent: Path, name: str, flag: str):
    """One process at a time builds cache folder `name` in `parent`; the others wait, then find it made. Without it
    two runs on the same data both rebuilt it, and the one finishing second deleted the folder the first had just
    installed (and might be reading), or failed with "cannot replace the old cache folder" (an audit). POSIX only
    (fcntl); elsewhere the builds race as before."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    made = not parent.exists()
    lock = parent / f".lock-{name}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "a")
    except OSError as e:
        raise UserError(f"cannot write to {flag} {parent} ({e.strerror or e}); choose a writable folder") from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): build unlocked, as before
            pass
        yield
    except BaseException:
        if made:  # a refused first run leaves no data_cache/ behind (its lock file either)
            lock.unlink(missing_ok=True)
            remove_if_empty(parent)
        raise
    finally:
        fh.close()  # (closing releases the lock)


@contextmanager
def staged_dir(out: Path, parent: Path, flag: str):
    """A fresh temporary folder in `parent` that replaces `out` when the block succeeds and is removed when it
    fails (or is interrupted): a cache folder is either whole or absent, never half-written. `flag` names the
    option that chose `parent`, for the one-line error when it cannot be written."""
    tmp = parent / f".tmp-{out.name}-{os.getpid()}"
    made = not parent.exists()  # a cache folder this call makes is removed again if it stays empty
    try:
        parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write to {flag} {parent} ({e.strerror or e}); choose a writable folder") from None
    _remove_stale_tmp(parent, out.name)
    try:
        yield tmp
        if out.exists():
            try:
                shutil.rmtree(out)
            except OSError as e:  # was a PermissionError traceback after the whole rebuild
                raise UserError(f"cannot replace the old cache folder {out} ({e.strerror or e}); remove it by hand, "
                                f"or choose another {flag}") from None
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made:
            remove_if_empty(parent)  # a refused first run leaves no empty data_cache/ behind
        raise


def _write_shards(source, args: DataArgs, tmp: Path, log) -> dict:
    budget = _byte_budget(args)
    train, val = _SplitWriter(tmp / "train.bin"), _SplitWriter(tmp / "val.bin")
    copies = 0  # distinct documents found in both splits (hash split only)
    # per split (False: train, True: val): whether its last document has a copy in that split too; the "at least
    # one document" move below takes that document to the other split, where the copy left behind makes a pair
    last_has_copy = [False, False]
    next_report = 100_000_000
    try:
        cap = _Cap(budget)  # train and val together, or the train files alone for given split files
        if source.given_splits:
            for writer, split, split_cap in ((train, "train", cap), (val, "val", _Cap(_val_budget(args, budget)))):
                for _, doc in source.iter_docs(split):
                    writer.add(split_cap.take(doc))
                    if split_cap.full:
                        break
            method = "given"
            if train.docs and not val.docs:
                raise UserError(f"the val split of {source.description} is empty; check the val files")
            if val.docs and not train.docs:  # the fallbacks below moved held-out val documents into train
                raise UserError(f"the train split of {source.description} is empty; check the train files")
        else:
            # the split goes by document id, so an exact copy of a train document can land in val: counted, said
            digests: dict[bytes, bool | None] = {}
            for doc_id, doc in source.iter_docs("all"):
                is_val = _split_unit(doc_id, args.split_seed) < args.val_fraction
                taken = cap.take(doc)
                # an empty document (or NULs only) is written nowhere: it is no copy in both splits
                if (val if is_val else train).add(taken):
                    d = hashlib.blake2b(taken, digest_size=12).digest()
                    seen = d in digests
                    first = digests.setdefault(d, is_val)
                    last_has_copy[is_val] = seen and first in (is_val, None)
                    if first is not None and first != is_val:
                        digests[d] = None  # in both splits: counted once
                        copies += 1
                if train.bytes + val.bytes >= next_report:
                    log(f"data: {(train.bytes + val.bytes) / 1e6:,.0f} MB ...")
                    next_report += 100_000_000
                if cap.full:
                    break
            method = "hash"
        if cap.full:  # was silent: the shards' size was the only hint that the source was not read to its end
            log(f"data: note: stopped at the byte cap ({budget:,} bytes of the source; the last document taken is "
                "cut there)")
        if train.docs + val.docs == 0:
            raise UserError(f"{source.description} contains no text (empty dataset); check --data_path / --text_field")
        if train.docs + val.docs == 1:
            raw = (train if train.docs else val).pop_last()
            only = raw.replace(DOC_SEP_BYTES, b"")  # the cut is chosen on the text the shards hold
            cut = len(only) - max(1, int(len(only) * args.val_fraction))
            nl = only.rfind(b"\n", 0, cut)
            if nl + 1 > len(only) // 2:  # prefer a line boundary when one is near
                cut = nl + 1
            if cut <= 0 or cut >= len(only):
                raise UserError(f"{source.description} is too small to split into train and val "
                                f"({len(only)} bytes); " + ("raise --max_bytes" if cap.full else "give more data"))
            # split the document as given at the same place, so each half's removed NULs are counted with it
            at = _after_kth_text_byte(raw, cut)
            train.add(raw[:at])
            val.add(raw[at:])
            method = "tail"
        elif not val.docs:
            val.add(train.pop_last())  # at least one val document
            copies += last_has_copy[False]  # val was empty: the moved document was in no pair yet
        elif not train.docs:
            train.add(val.pop_last())
            copies += last_has_copy[True]
        if copies:  # said after the moves above (it came before them, and missed a pair they made)
            warnings.warn(f"data: {copies} distinct document(s) of {source.description} stand in both train and "
                          "val as exact copies (the hash split goes by document id): val is not all held out; "
                          "deduplicate the source", stacklevel=2)
    finally:
        train.close()
        val.close()
    return {
        "format": SHARD_FORMAT,
        "source": source.description,
        "doc_sep": DOC_SEP_BYTES[0],
        "split_method": method,
        "documents_in_both_splits": copies,
        "val_fraction": args.val_fraction,
        "split_seed": args.split_seed,
        "splits": {name: {"bytes": w.bytes, "documents": w.docs, "sha256": file_sha256(w.path),
                          "nul_bytes_removed": w.nul_removed}
                   for name, w in (("train", train), ("val", val))},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": sys.version.split()[0],
        "args": asdict(args),
    }


def open_shards(path: str | Path) -> Shards:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        train = np.memmap(path / "train.bin", dtype=np.uint8, mode="r")
        val = np.memmap(path / "val.bin", dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"data cache {path} is incomplete ({e}); delete it and run again") from None
    return Shards(path, meta, train, val)


def verify_shards(shards: Shards) -> None:
    """Recompute the checksums of meta.json (slow for big shards; used by tests and `prepare --verify`)."""
    for name in ("train", "val"):
        if file_sha256(shards.path / f"{name}.bin") != shards.meta["splits"][name]["sha256"]:
            raise UserError(f"{shards.path}/{name}.bin does not match its checksum; delete the folder and prepare "
                            "again")
