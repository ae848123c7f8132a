"""Document sources. Each yields ``(doc_id, bytes)``: the id decides the hash train/val split, the
bytes are the document exactly as stored (never decoded, so invalid UTF-8 passes through).

* hub datasets (tinystories, fineweb, openwebtext) through ``datasets.load_dataset`` (streaming);
  an unreachable hub fails fast with a one-line UserError instead of hanging;
* local files: text, directories, globs, jsonl (plain / .gz / .xz / .bz2), parquet, .json (JSON Lines or an array of
  records); a suffix decides the format whatever its case (NOTES.TXT.GZ is gzip);
* ``builtin``: the running Python installation's own standard library sources (offline, everywhere).
"""
from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import sys
import sysconfig
import threading
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator
from urllib.parse import urlparse

from ..errors import UserError

Doc = tuple[str, bytes]

# what a corrupt or mislabelled compressed file raises (gzip's bad deflate data is a zlib.error, not an OSError)
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".jsonl.xz", ".jsonl.bz2", ".ndjson.gz", ".ndjson.xz",
                  ".ndjson.bz2")
# compressed or archive formats this reader cannot open: read as text they became documents of binary noise
UNSUPPORTED_SUFFIXES = (".zst", ".zstd", ".lz4", ".br", ".7z", ".zip", ".rar", ".tar", ".tgz", ".bz2", ".gz", ".xz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".c", ".h", ".js", ".html", ".tex", ".csv", ".json",
                 ".txt.gz", ".txt.xz", ".txt.bz2")
LOCAL_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
# packaged `datasets` builders: they read local files and never touch the hub
PACKAGED_BUILDERS = ("json", "parquet", "text", "csv", "arrow")

HUB_OFFLINE_HINT = "use --data_path FILE (local text/jsonl/parquet) or --dataset builtin"


@dataclass(frozen=True)
class HubDataset:
    path: str
    name: str | None
    # our split -> hub split; without a 'val' entry the train stream is split by document hash
    splits: dict = field(default_factory=dict)
    text_field: str = "text"


HUB_DATASETS = {
    "tinystories": HubDataset("roneneldan/TinyStories", None, {"train": "train", "val": "validation"}),
    "fineweb": HubDataset("HuggingFaceFW/fineweb-edu", "sample-10BT", {"train": "train"}),
    "openwebtext": HubDataset("Skylion007/openwebtext", None, {"train": "train"}),
}


@dataclass
class Source:
    """What to read. ``given_splits``: iter_docs('train') / iter_docs('val') are separate sources;
    otherwise iter_docs('all') is one stream split by document hash."""
    description: str
    key: dict  # everything the cache key depends on
    iter_docs: Callable[[str], Iterator[Doc]]
    given_splits: bool = False


# ---------------------------------------------------------------- helpers

def _text_field_fix(text_columns: list[str], columns: list[str]) -> str:
    """The fix for a --text_field that names no text column: the text columns there are, else all of them."""
    if text_columns:
        return f"pass --text_field with a text column: {', '.join(text_columns[:8])}"
    return f"its columns ({', '.join(columns[:8])}) hold no text; store the text as strings in one of them"


def no_text_field(label: str, field: str, text_columns: list[str], columns: list[str]) -> UserError:
    return UserError(f"{label} has no column '{field}'; {_text_field_fix(text_columns, columns)}")


def column_text(text, label: str, field: str, text_columns: list[str] | None = None) -> bytes:
    """A table cell (parquet / hub row) as bytes: str or raw bytes; anything else means --text_field names a column
    that is not text (str() of it would train on reprs like "['a', 'b']" or "123")."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    if not isinstance(text, str):
        fix = _text_field_fix(text_columns, [field]) if text_columns else "pass --text_field NAME of a text column"
        raise UserError(f"{label}: field '{field}' holds {type(text).__name__} values, not text; {fix}")
    return encode_text(text)


def _surrogate_bytes(e: UnicodeEncodeError) -> tuple[bytes, int]:
    """Each lone surrogate on its own: U+DC80..U+DCFF (an undecodable byte read with surrogateescape) -> that byte,
    any other (a JSON escape such as \\ud800) -> its 3-byte surrogatepass form. One rule for the whole string put a
    document holding both kinds through surrogatepass, which turned its raw bytes into 3 bytes each."""
    out = bytearray()
    for ch in e.object[e.start:e.end]:
        cp = ord(ch)
        out += bytes([cp - 0xDC00]) if 0xDC80 <= cp <= 0xDCFF else ch.encode("utf-8", "surrogatepass")
    return bytes(out), e.end


codecs.register_error("ionllama.surrogate_bytes", _surrogate_bytes)


def encode_text(text: str) -> bytes:
    """str -> bytes without ever raising: lone surrogates (from invalid UTF-8 read with surrogateescape
    or from JSON escapes) are kept as bytes, not dropped (_surrogate_bytes says how)."""
    return text.encode("utf-8", "ionllama.surrogate_bytes")


def _open_binary(path: str):
    low = path.lower()  # NOTES.TXT.GZ was read as its raw gzip bytes: the other suffix tests are case-blind too
    if low.endswith(".gz"):
        return gzip.open(path, "rb")
    if low.endswith(".xz"):
        return lzma.open(path, "rb")
    if low.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def _read_error(path: str, e: Exception) -> UserError:
    return UserError(f"cannot read {path} ({type(e).__name__}: {e}); check that the file is complete and readable")


# ---------------------------------------------------------------- local files

def _literal_prefix(pattern: str) -> str:
    """The folder a glob starts from: its leading components without wildcards."""
    parts = pattern.split(os.sep)
    lead = []
    for part in parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        lead.append(part)
    return os.sep.join(lead) or (os.sep if pattern.startswith(os.sep) else ".")


def _is_own_output(d: str) -> bool:
    """A folder ionLlama wrote: a prepared shard cache (meta.json + train.bin), a token cache, or a training run
    (config.json + metrics.jsonl or a checkpoint)."""
    try:
        names = set(os.listdir(d))
    except OSError:
        return False
    if "meta.json" in names and ("train.bin" in names or "val.bin" in names):
        return True
    return "config.json" in names and bool(names & {"metrics.jsonl", "metrics.jsonl.gz", "latest.pt", "final.pt"})


SPLIT_WORD = re.compile(r"(?:^|[-_.])(train|valid|validation|val|dev|test)(?:[-_.]|$)", re.IGNORECASE)


def _warn_split_names(files: list[str], pattern: str) -> None:
    """Files named as splits (x-train / x-val / x-test) pooled into one hash split put most test documents in
    train: said, with the fix, since only a '{split}' pattern keeps them apart."""
    words = {}
    for f in files:
        m = SPLIT_WORD.search(os.path.basename(f))
        if m:
            words.setdefault(m.group(1).lower(), os.path.basename(f))
    if len(words) >= 2:
        named = ", ".join(sorted(words.values())[:3])
        warnings.warn(f"--data_path '{pattern}': files named as splits ({named}) are pooled and hash-split, so their "
                      "held-out documents mostly land in train; to keep them apart pass a pattern with '{split}', "
                      "e.g. 'folder/name-{split}.jsonl'", stacklevel=3)


def _symlink_loop(root: str) -> str | None:
    """A linked folder under `root` that leads back to a folder already on the way (glob's '**' follows links
    and, through two such loops, walks paths without end; a new user's run hung), or None."""
    seen = set()  # folders walked already: a second link to one is walked once (no loop, but no blow-up either)
    for top, dirs, _ in os.walk(root, followlinks=True):
        here = os.path.realpath(top)
        keep = []
        for d in dirs:
            full = os.path.join(top, d)
            target = os.path.realpath(full)
            if os.path.islink(full) and (here == target or here.startswith(target.rstrip(os.sep) + os.sep)):
                return full  # it points at this folder or one above it
            try:
                st = os.stat(full)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                keep.append(d)
        dirs[:] = keep
    return None


def _readable_text_files(paths: list[str], pattern: str) -> list[str]:
    """The text files among `paths` (a folder's walk or a glob's matches: the same rule for both); the rest is said
    once. A FIFO hung the read, a dangling link was a traceback, and a glob took .png / .bin files in as documents."""
    keep, other, odd, packed = [], [], [], []
    for f in paths:
        if not os.path.isfile(f):  # a dangling link, a FIFO, a socket, a device
            odd.append(f)
        elif f.lower().endswith(LOCAL_SUFFIXES):
            keep.append(f)
        elif f.lower().endswith(UNSUPPORTED_SUFFIXES):  # b.jsonl.zst was said to have "no jsonl suffix"
            packed.append(f)
        else:
            other.append(f)
    for what, group in (("not regular files (dangling links, pipes, ...)", odd),
                        ("compressed in a way not read (text / jsonl under .gz, .xz, .bz2 is): decompress them",
                         packed),
                        ("without a text / jsonl / parquet suffix", other)):
        if group:
            shown = ", ".join(os.path.relpath(f) for f in group[:5])
            shown += f" and {len(group) - 5} more" if len(group) > 5 else ""
            warnings.warn(f"--data_path '{pattern}': skipped {len(group)} file(s) {what}: {shown}", stacklevel=3)
    return keep


def _one_copy_each(files: list[str]) -> list[str]:
    """The first of the paths that lead to the same file: a file seen twice ('**' through a folder link, a link to a
    file in the same folder) put one copy's documents in val and the other's in train."""
    out, seen = [], set()
    for f in files:
        real = os.path.realpath(f)
        if real not in seen:
            seen.add(real)
            out.append(f)
    return out


def _outside_own_output(files: list[str], root: str, pattern: str) -> list[str]:
    """The files not under one of ionLlama's own caches or run folders below `root`, as a folder walk leaves them out:
    through a glob such as 'texts/**/*' each run read the last run's cache as data (its shards never reused,
    growing each run), and '**/*.jsonl' read a run's metrics.jsonl."""
    root = os.path.abspath(root or ".")
    own: dict[str, bool] = {}

    def under_own(d: str) -> bool:
        d = os.path.abspath(d)
        if d not in own:
            parent = os.path.dirname(d)
            inside = d != root and d.startswith(root.rstrip(os.sep) + os.sep)
            own[d] = inside and (_is_own_output(d) or (parent != d and under_own(parent)))
        return own[d]

    keep, left = [], set()
    for f in files:
        if under_own(os.path.dirname(f)):
            left.add(os.path.relpath(os.path.dirname(f)))
        else:
            keep.append(f)
    left = sorted(left)
    if left:
        warnings.warn(f"--data_path '{pattern}': files in ionLlama's own data cache / run folder(s) left out: "
                      f"{', '.join(left[:5])}", stacklevel=3)
    return keep


class SavedDatasetFolder(UserError):
    """A save_to_disk folder where files were looked for (not swallowed by the '{split}' look-up)."""


def _refuse_saved_datasets(files: list[str], pattern: str) -> None:
    """A `datasets` save_to_disk folder among a folder's / glob's / '{split}' pattern's files: read as files, its JSON
    metadata became the documents and its Arrow rows were skipped with a warning (the non-'{split}' path already reads
    such a folder as its rows)."""
    for d in sorted({os.path.dirname(os.path.abspath(f)) for f in files}):
        if saved_dataset_kind(d):
            raise SavedDatasetFolder(f"--data_path '{pattern}': {os.path.relpath(d)} is a `datasets` save_to_disk "
                                     "folder, whose rows are not read as files; pass that folder itself as --data_path "
                                     "(for given splits, save a DatasetDict with train and validation splits and pass "
                                     "its folder)")


def resolve_local_files(pattern: str) -> tuple[list[str], str]:
    """--data_path -> (sorted files, base dir used for stable relative doc ids)."""
    p = os.path.expanduser(pattern)
    # a path that exists is that path, though its name holds [, ? or * ('corpus [v2]' matched no files as a glob)
    if any(ch in p for ch in "*?[") and not os.path.lexists(p):
        if "**" in p and (loop := _symlink_loop(_literal_prefix(p))):
            raise UserError(f"--data_path '{pattern}': '**' would follow the symlink loop at {loop} without end; "
                            "remove the link, or give the folder itself as --data_path (a folder path does not "
                            "follow links)")
        matched = sorted(f for f in glob.glob(p, recursive=True) if not os.path.isdir(f))
        matched = _outside_own_output(matched, _literal_prefix(p), pattern)
        _refuse_saved_datasets(matched, pattern)
        files = _one_copy_each(_readable_text_files(matched, pattern))
        if not files:
            raise UserError(f"--data_path '{pattern}' matches no {'text ' if matched else ''}files; check the pattern")
        _warn_split_names(files, pattern)
        # ids below the pattern's literal folder, as the README says: below the matched files' common folder, one
        # file added elsewhere moved that folder, renamed every document and re-split train and val
        return files, os.path.abspath(_literal_prefix(p))
    if os.path.isdir(p):
        found, links = [], []
        own = []  # ionLlama's shard caches and run folders inside the data folder: read as data, they grew each run
        for root, dirs, names in os.walk(p):
            own += [os.path.join(root, d) for d in dirs if _is_own_output(os.path.join(root, d))]
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(root, d) not in own)
            links += [os.path.join(root, d) for d in dirs if os.path.islink(os.path.join(root, d))]
            found += [os.path.join(root, n) for n in names if not n.startswith(".")]
        if links:  # os.walk lists them and does not enter them: their files were left out without a word
            warnings.warn(f"--data_path '{pattern}': linked folder(s) not followed: "
                          f"{', '.join(os.path.relpath(d) for d in links[:5])}; give them as --data_path of their own "
                          "or use a glob", stacklevel=2)
        if own:
            warnings.warn(f"--data_path '{pattern}': ionLlama's own data cache / run folder(s) left out: "
                          f"{', '.join(os.path.relpath(d) for d in own[:5])}", stacklevel=2)
        _refuse_saved_datasets(found, pattern)  # before the skipped .arrow files are said
        files = _one_copy_each(_readable_text_files(sorted(found), pattern))
        if files:
            _warn_split_names(files, pattern)
        if not files:
            raise UserError(f"--data_path directory '{pattern}' holds no text files "
                            f"(*.txt, *.md, *.jsonl[.gz|.xz], *.parquet, ...); point it at your data")
        return files, os.path.abspath(p)
    if os.path.isfile(p):
        low = p.lower()
        if low.endswith(UNSUPPORTED_SUFFIXES) and not low.endswith(LOCAL_SUFFIXES):
            raise UserError(f"--data_path {pattern}: a {os.path.splitext(low)[1]} file is not read (it would be "
                            "stored as compressed bytes); decompress it, or use .jsonl / .txt, optionally .gz, .xz "
                            "or .bz2")
        return [p], os.path.dirname(os.path.abspath(p))
    if os.path.exists(p):  # a pipe or a device: os.path.isfile is False, and "does not exist" misled
        raise UserError(f"--data_path '{pattern}' is not a regular file (a pipe or a device); write the data to a file "
                        "and pass that")
    raise UserError(f"--data_path '{pattern}' does not exist; give a text/jsonl/parquet file, a directory or a glob")


def _record_docs(path: str, records: Iterator[tuple[int, object, str]], text_field: str, prefix: str,
                 unit: str) -> Iterator[Doc]:
    """Documents of JSON records, given as (number, object, parse error or ""): the lines of a JSON Lines file or the
    items of a JSON array (`unit` says which, for the messages). Records that are not JSON objects, or whose text is
    not a string, are skipped and warned about with their count and the first one's number and reason (a download
    cut mid-line should not stop a prepare; a warning without a line number left the user to search for it); a
    record without the text field is an error naming --text_field."""
    bad, first_bad = 0, ""
    not_text = {}  # type name ("null" for None) -> [first record number, count]
    for n, obj, error in records:
        if error:
            bad += 1
            first_bad = first_bad or f"{unit} {n}: {error}"
            continue
        if not isinstance(obj, dict):
            bad += 1
            kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(obj), "a number")
            first_bad = first_bad or f"{unit} {n} is {'null' if obj is None else kind}"
            continue
        if text_field not in obj:
            raise UserError(f"{path} {unit} {n} has no field '{text_field}' (fields: "
                            f"{', '.join(sorted(map(str, obj))[:8])}); pass --text_field NAME")
        text = obj[text_field]
        if not isinstance(text, str):  # str() would train on a Python repr like "['a', 'b']"; null: no text
            not_text.setdefault("null" if text is None else type(text).__name__, [n, 0])[1] += 1
            continue
        yield f"{prefix}:{n}", encode_text(text)
    if bad:
        warnings.warn(f"{path}: skipped {bad} {unit}(s) that are not JSON objects (first: {first_bad})", stacklevel=2)
    if not_text:  # counted, nulls included (they were skipped without a word)
        kinds = ", ".join(f"{k} x{c:,} (first at {unit} {n})" for k, (n, c) in not_text.items())
        fix = "; pass --text_field NAME of a text field" if set(not_text) != {"null"} else ""
        warnings.warn(f"{path}: skipped {sum(c for _, c in not_text.values()):,} {unit}(s) whose '{text_field}' is "
                      f"not a string: {kinds}{fix}", stacklevel=2)


def _json_problem(e: Exception, line: bool = False) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at {f'line {e.lineno} ' if line else ''}column {e.colno}"
    return f"{type(e).__name__}: {str(e)[:100]}"


def _json_text(raw: bytes) -> str:
    """JSON bytes as text for json.loads: UTF-8, each invalid byte kept as a surrogate escape (encode_text writes it
    back), a leading BOM dropped. json.loads of the bytes themselves decodes them with surrogatepass: the 3 bytes of a
    lone surrogate in the file (ed b2 80, as WTF-8 / CESU-8 write U+DC80) became U+DC80, which encode_text wrote as the
    one byte 0x80, while the same bytes in a line holding another invalid byte were kept. UTF-16 / UTF-32 JSON (told
    from UTF-8 by its NUL bytes, as json.loads tells it) is decoded as json.loads decoded it, as before."""
    enc = json.detect_encoding(raw)
    if not enc.startswith("utf-8"):
        return raw.decode(enc, "surrogatepass")
    return raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")


def _json_lines(f) -> Iterator[tuple[int, object, str]]:
    for lineno, raw in enumerate(f, 1):
        raw = raw.strip()
        if not raw:
            continue
        try:  # invalid UTF-8 included: its bytes are kept (_json_text)
            obj = json.loads(_json_text(raw))
        except (ValueError, RecursionError) as e:  # (an integer of 4,300+ digits, nesting past the stack:
            yield lineno, None, _json_problem(e)  # a traceback, where a bad line is skipped and counted)
            continue
        yield lineno, obj, ""


def iter_jsonl(path: str, text_field: str = "text", doc_prefix: str | None = None) -> Iterator[Doc]:
    """One document per JSON line (see _record_docs for the lines that are skipped)."""
    prefix = doc_prefix if doc_prefix is not None else os.path.basename(path)
    try:
        with _open_binary(path) as f:
            yield from _record_docs(path, _json_lines(f), text_field, prefix, "line")
    except READ_ERRORS as e:
        raise _read_error(path, e) from None


def _is_json_array(path: str) -> bool:
    """Does this .json file start (after a BOM and blanks) with '[': one JSON array, e.g. of records?"""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["


def iter_json_array(path: str, text_field: str = "text", doc_prefix: str | None = None) -> Iterator[Doc]:
    """One document per item of a JSON array of records (`json.dump(list_of_dicts, f)`, pandas
    `to_json(orient="records")`), each item handled as iter_jsonl handles a line. Read as text, its brackets, keys
    and escapes became the training data without a word. The array is one JSON value, so it is parsed whole."""
    prefix = doc_prefix if doc_prefix is not None else os.path.basename(path)
    try:
        with _open_binary(path) as f:
            raw = f.read().removeprefix(codecs.BOM_UTF8)
    except READ_ERRORS as e:
        raise _read_error(path, e) from None
    try:  # invalid UTF-8 included: its bytes are kept (_json_text)
        items = json.loads(_json_text(raw))
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} starts as a JSON array but is not valid JSON ({_json_problem(e, line=True)}); "
                        "complete the file, or convert it to JSON Lines (one object a line)") from None
    yield from _record_docs(path, ((i, obj, "") for i, obj in enumerate(items, 1)), text_field, prefix, "record")


_READ_CHUNK = 1 << 26


def read_at_most(f, limit: int | None) -> bytes:
    """f.read(limit) in chunks: read(n) sets n bytes aside first, so a cap far above the file (--max_bytes 3e10 on
    a 1 KB file) was a MemoryError, and one past 2**63 an OverflowError traceback."""
    if limit is None:
        return f.read()
    parts, left = [], limit
    while left > 0:
        part = f.read(min(left, _READ_CHUNK))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def iter_text_file(path: str, doc_id: str, read_limit: int | None = None) -> Iterator[Doc]:
    """The file as one document; only its first read_limit bytes (decompressed) when given: a --max_bytes cap below
    a huge file's size cuts it anyway (shards._Cap), so the rest is not read."""
    try:
        with _open_binary(path) as f:
            data = read_at_most(f, read_limit)
    except READ_ERRORS as e:
        raise _read_error(path, e) from None
    yield doc_id, data


def iter_parquet(path: str, text_field: str, doc_prefix: str) -> Iterator[Doc]:
    """Parquet goes through the same `datasets` code as the hub sources (builder 'parquet')."""
    try:
        import datasets
    except ImportError:  # fall back to pyarrow when `datasets` is not installed
        yield from _iter_parquet_pyarrow(path, text_field, doc_prefix)
        return
    try:  # `datasets` fails on a valid file of no rows (ArrowInvalid: BatchSize must be greater than 0)
        import pyarrow.parquet as pq

        empty = pq.ParquetFile(path).metadata.num_rows == 0
    except Exception:  # pyarrow's own error types: `datasets` says what is wrong with the file
        empty = False
    if empty:  # pyarrow's reader checks the text field and yields nothing
        yield from _iter_parquet_pyarrow(path, text_field, doc_prefix)
        return
    try:  # a column `datasets` has no type for (a map) refused the whole valid file as "not a complete parquet file"
        datasets.Features.from_arrow_schema(pq.ParquetFile(path).schema_arrow)
    except ValueError as e:
        if "datasets dtype" in str(e):  # pyarrow reads the text column alone, with the same doc ids
            yield from _iter_parquet_pyarrow(path, text_field, doc_prefix)
            return
    except Exception:  # the file's own errors: `datasets` says what is wrong with it
        pass
    # data_files are glob patterns: 'x[ab].parquet' read xa.parquet (an audit's), so the name is escaped
    yield from iter_hf_documents("parquet", "train", data_files=[glob.escape(path)], text_field=text_field,
                                 doc_prefix=doc_prefix)


def _iter_parquet_pyarrow(path: str, text_field: str, doc_prefix: str) -> Iterator[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading the parquet file {path} needs the pyarrow package, which is not installed; "
                        "pip install pyarrow (or pip install 'ionllama[data]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types
        raise _read_error(path, e) from None
    schema = pf.schema_arrow
    text_columns = [f.name for f in schema if str(f.type) in ("string", "large_string", "binary", "large_binary")]
    if text_field not in schema.names:
        raise no_text_field(path, text_field, text_columns, schema.names)
    i = 0  # rows numbered from 0, as iter_hf_documents does: a doc id (and so the split) must not depend on
    # whether `datasets` is installed (this fallback counted from 1: the val rows were their neighbours)
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{doc_prefix}:{i}", column_text(text, path, text_field, text_columns)
            i += 1


FIRST_RECORD_MAX = 1 << 28  # bytes of a .json file's first line read to tell JSON Lines (a one-line array can be big)


def _is_json_lines(path: str, text_field: str) -> bool:
    """Is this .json file JSON Lines (many hub dumps are, under .json), its first line an object with the text field?
    Read as text, its braces, key names and escapes became the documents."""
    def next_record(f):
        line = b""
        while not line.strip():
            line = f.readline(FIRST_RECORD_MAX)
            if not line:
                break
        return json.loads(_json_text(line))  # an invalid byte in the first record read the whole file as text

    try:
        with open(path, "rb") as f:  # the whole first record: a long one (a book) cut at 64 KiB failed to parse
            obj = next_record(f)
            if not isinstance(obj, dict):
                return False
            if text_field in obj:
                return True
            # records with other fields (a wrong --text_field) were read as text, braces and keys as the documents,
            # where a .jsonl or a .json array names the field: two object lines are JSON Lines, a one-line object text
            return isinstance(next_record(f), dict)
    except (OSError, ValueError, RecursionError):
        return False


def iter_local_file(path: str, base: str, text_field: str, read_limit: int | None = None) -> Iterator[Doc]:
    rel = os.path.relpath(os.path.abspath(path), base)
    low = path.lower()
    if low.endswith(".json") and _is_json_array(path):  # a single object or other text stays text, as before
        yield from iter_json_array(path, text_field, rel)
    elif low.endswith(".json") and _is_json_lines(path, text_field):
        warnings.warn(f"{path}: read as JSON Lines (its lines are JSON objects), not as text",
                      stacklevel=2)
        yield from iter_jsonl(path, text_field, rel)
    elif low.endswith(JSONL_SUFFIXES):
        yield from iter_jsonl(path, text_field, rel)
    elif low.endswith(PARQUET_SUFFIXES):
        yield from iter_parquet(path, text_field, rel)
    else:
        yield from iter_text_file(path, rel, read_limit)


def _file_stats(files: list[str]) -> list:
    """What keys the shard cache per source file. ctime too: an edit that keeps size and mtime (`cp -p` over it,
    `touch -r`, `rsync -t`) changes it, and no tool sets it back, so such an edit is not served stale shards; a
    chmod or rename changes it as well, which costs a rebuild, not a wrong result."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _iter_unchanged(files: list[str], stats: list, base: str, text_field: str,
                    read_limit: int | None = None) -> Iterator[Doc]:
    """The files' documents, refusing a file whose stat after reading is not the one the cache key holds: shards
    read from a file being rewritten mix its versions under the key of one of them."""
    for f, before in zip(files, stats):
        yield from iter_local_file(f, base, text_field, read_limit)
        try:
            after = _file_stats([f])[0]
        except OSError:
            after = None
        if after != before:
            raise UserError(f"{f} changed while it was being prepared (its size or times moved during the read); "
                            "prepare again once it stops changing")


def local_source(data_path: str, text_field: str = "text", read_limit: int | None = None) -> Source:
    """A file/dir/glob, or a pattern with '{split}' naming given split files (e.g. books-{split}.jsonl.xz).
    read_limit: read at most this many bytes of a text file (the largest --max_bytes cap of a split; not in the key,
    as the shards are the same without it, only made faster)."""
    if "{split}" in data_path:
        resolved = {}
        for split, names in (("train", ("train",)), ("val", ("val", "validation", "valid"))):
            found = {}
            for name in names:
                try:
                    found[name] = resolve_local_files(data_path.replace("{split}", name))
                except SavedDatasetFolder:
                    raise
                except UserError:
                    continue
            if found:
                used = next(iter(found))
                resolved[split] = found[used]
                if len(found) > 1:  # x-val and x-validation both there: one was used without a word
                    warnings.warn(f"--data_path '{data_path}': {split} files exist for '{{split}}' = "
                                  f"{' and '.join(found)}; using '{used}' only", stacklevel=2)
            if split not in resolved:
                raise UserError(f"--data_path '{data_path}': no {split} files for '{{split}}' = {'/'.join(names)}; "
                                "check the pattern") from None

        key = {"kind": "local-splits", "pattern": data_path, "text_field": text_field,
               "files": {s: _file_stats(f) for s, (f, _) in resolved.items()}}

        def iter_docs(split: str) -> Iterator[Doc]:
            files, base = resolved[split]
            yield from _iter_unchanged(files, key["files"][split], base, text_field, read_limit)

        return Source(f"local:{data_path}", key, iter_docs, given_splits=True)

    saved = saved_dataset_kind(data_path)
    if saved:
        return saved_dataset_source(data_path, text_field, saved)
    if data_path.lower().endswith(".arrow") and os.path.isfile(data_path):
        raise UserError(f"--data_path {data_path} is one shard of a `datasets` folder; pass the folder that "
                        "save_to_disk wrote (it holds dataset_info.json / state.json)")
    files, base = resolve_local_files(data_path)
    key = {"kind": "local", "path": data_path, "text_field": text_field, "files": _file_stats(files)}

    def iter_all(split: str = "all") -> Iterator[Doc]:
        yield from _iter_unchanged(files, key["files"], base, text_field, read_limit)

    return Source(f"local:{data_path}", key, iter_all)


# ---------------------------------------------------------------- a `datasets` save_to_disk folder

# a "test" split is not taken as val: selecting on it would leave no held-out data (the train split is hash-split)
SAVED_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid")}


def saved_dataset_kind(path: str) -> str | None:
    """'dict' / 'dataset' for a folder written by `datasets`' save_to_disk, else None. Read as plain files, its
    JSON metadata became the documents and its Arrow rows were skipped (a new user's report)."""
    p = os.path.expanduser(path)
    if not os.path.isdir(p):
        return None
    if os.path.isfile(os.path.join(p, "dataset_dict.json")):
        return "dict"
    if os.path.isfile(os.path.join(p, "state.json")) and os.path.isfile(os.path.join(p, "dataset_info.json")):
        return "dataset"
    return None


def saved_dataset_source(path: str, text_field: str, kind: str) -> Source:
    """Rows of a save_to_disk folder: a DatasetDict with a train split and a val/validation/test split gives the
    splits as they are; one Dataset is split by document hash like any local source."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"--data_path {path} is a `datasets` folder; reading it needs `datasets`: pip install "
                        "'ionllama[data]'") from None
    p = os.path.expanduser(path)
    try:
        loaded = datasets.load_from_disk(p)
    except Exception as e:  # datasets raises its own error types for damaged folders
        raise UserError(f"--data_path {path}: `datasets` cannot load this save_to_disk folder ({type(e).__name__}: "
                        f"{str(e)[:120]}); save it again") from None
    files = sorted(os.path.join(r, n) for r, _, names in os.walk(p) for n in names)
    # ids from the folder's name: basename('one/') was '', so a trailing slash changed the split under the same key
    # ("ids" keeps caches written with those ids apart)
    name = os.path.basename(os.path.normpath(os.path.abspath(p)))
    key = {"kind": "saved-dataset", "path": os.path.abspath(p), "text_field": text_field, "files": _file_stats(files),
           "ids": "folder-name"}

    def rows(ds, label: str) -> Iterator[Doc]:
        if text_field not in ds.column_names:
            text_columns = [c for c, f in ds.features.items() if getattr(f, "dtype", "") in ("string", "large_string")]
            raise no_text_field(f"{path}{label}", text_field, text_columns, ds.column_names)
        for i, row in enumerate(ds.select_columns([text_field])):
            if row[text_field] is not None:
                yield f"{name}{label}:{i}", column_text(row[text_field], f"{path}{label}", text_field)

    if kind == "dict":
        names = {}
        for split, options in SAVED_SPLIT_NAMES.items():
            names[split] = next((n for n in options if n in loaded), None)
        if names["train"] is None:
            raise UserError(f"--data_path {path}: the saved DatasetDict has no 'train' split (splits: "
                            f"{', '.join(loaded)}); save one named train")
        if names["val"] is not None:
            return Source(f"saved-dataset:{path}", key, lambda split: rows(loaded[names[split]], f"[{names[split]}]"),
                          given_splits=True)
        return Source(f"saved-dataset:{path}", key, lambda split="all": rows(loaded["train"], "[train]"))
    return Source(f"saved-dataset:{path}", key, lambda split="all": rows(loaded, ""))


# ---------------------------------------------------------------- hub (datasets)

def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be used right now, or None. Never blocks longer than ~timeout
    (DNS resolution has no timeout of its own, so the probe runs in a daemon thread)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    u = urlparse(endpoint)
    host, port = u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80)
    # through a proxy (HTTPS_PROXY), as huggingface_hub goes: the hub's own host may not resolve here at all
    proxy = urllib.request.getproxies().get(u.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        pu = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if pu.hostname:
            host, port = pu.hostname, pu.port or (443 if pu.scheme == "https" else 80)
    result: list = []

    def probe():
        import socket

        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot reach {host}:{port} ({e.__class__.__name__}: {e})")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    if not result:
        return f"cannot reach {host}:{port} (no answer within {timeout:.0f} s)"
    return result[0]


def _row_text_columns(row: dict) -> list[str]:
    return [k for k, v in row.items() if isinstance(v, (str, bytes))]


def iter_hf_documents(path: str, split: str, name: str | None = None, data_files=None, text_field: str = "text",
                      doc_prefix: str | None = None, streaming: bool = True) -> Iterator[Doc]:
    """Documents of a `datasets` split: a hub dataset (checked for reachability first) or a packaged
    builder ('json', 'parquet', ...) over local data_files - the same code either way."""
    remote = path not in PACKAGED_BUILDERS
    label = path if remote else ", ".join(map(str, data_files))
    if remote:
        reason = hub_unreachable_reason()
        if reason:
            raise UserError(f"dataset {path} needs the Hugging Face hub, which is not reachable ({reason}); "
                            f"{HUB_OFFLINE_HINT}")
        # short network timeouts so a flaky connection fails instead of hanging
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "20")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "60")
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {label} needs the `datasets` package; pip install 'ionllama[data]' "
                        f"or {HUB_OFFLINE_HINT}") from None
    prefix = doc_prefix if doc_prefix is not None else f"{path}/{split}"
    verbosity = datasets.logging.get_verbosity()
    if not remote:  # its own log line for a bad local file came before our one-line error: one line is the rule
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=data_files, streaming=streaming)
        for i, row in enumerate(ds):
            if text_field not in row:
                raise no_text_field(label, text_field, _row_text_columns(row), list(row))
            text = row[text_field]
            if text is not None:  # the text columns are looked for only when needed: once per row of a big hub set
                yield f"{prefix}:{i}", column_text(text, label, text_field,
                                                   None if isinstance(text, (str, bytes)) else _row_text_columns(row))
    except UserError:
        raise
    except Exception as e:  # network / hub / format errors from datasets, fsspec, requests, httpx, pyarrow
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"could not read {label} ({type(e).__name__}: {msg}); "
                        + (HUB_OFFLINE_HINT if remote else f"check that it is a complete {path} file")) from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def hub_source(dataset: str, text_field: str | None = None) -> Source:
    spec = HUB_DATASETS[dataset]
    field_name = text_field or spec.text_field
    given = "val" in spec.splits

    def iter_docs(split: str) -> Iterator[Doc]:
        hub_split = spec.splits["train" if split == "all" else split]
        yield from iter_hf_documents(spec.path, hub_split, name=spec.name, text_field=field_name)

    key = {"kind": "hub", "path": spec.path, "name": spec.name, "splits": spec.splits, "text_field": field_name}
    return Source(f"hub:{spec.path}" + (f"/{spec.name}" if spec.name else ""), key, iter_docs, given_splits=given)


# ---------------------------------------------------------------- builtin

BUILTIN_SUFFIXES = (".py", ".txt", ".rst", ".md")
_BUILTIN_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def builtin_files() -> list[tuple[str, str]]:
    """(relative path, absolute path) of the stdlib's sources and docs text, in a fixed pseudo-random
    order (hash of the relative path) so a byte cap samples all of the library, not just a..c."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _BUILTIN_SKIP_DIRS and not x.startswith(("config-", "."))]
        for n in names:
            if n.endswith(BUILTIN_SUFFIXES):
                full = os.path.join(d, n)
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    found.sort(key=lambda rf: hashlib.blake2b(rf[0].encode(), digest_size=8).digest())
    return found


def builtin_source(max_bytes: int = 8_000_000) -> Source:
    files = builtin_files()
    if not files:
        raise UserError("no Python standard library sources found for --dataset builtin; use --data_path FILE")

    def iter_docs(split: str = "all") -> Iterator[Doc]:
        total = 0
        for rel, full in files:
            if total >= max_bytes:
                return
            try:
                with open(full, "rb") as f:
                    data = read_at_most(f, max_bytes - total)
            except OSError:
                continue  # unreadable stdlib file: skip, the corpus stays deterministic per installation
            total += len(data)
            yield rel, data

    key = {"kind": "builtin", "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
           "files": len(files), "max_bytes": max_bytes}
    return Source(f"builtin:python{sys.version_info[0]}.{sys.version_info[1]}-stdlib", key, iter_docs)
