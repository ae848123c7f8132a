"""Byte data pipeline: sources -> shards (split, separators, checksums, cache), window sampling."""
import gzip
import json
import lzma
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ionllama.data import DOC_SEP, DOC_SEP_BYTES, sources
from ionllama.data.loader import TaskSampler, WindowSampler
from ionllama.data.shards import DataArgs, open_shards, prepare, staged_dir, verify_shards
from ionllama.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def quiet(msg):
    pass


def prep(tmp_path, **kw):
    return open_shards(prepare(DataArgs(data_dir=str(tmp_path / "cache"), **kw), log=quiet))


def docs_of(arr) -> list[bytes]:
    raw = bytes(arr)
    assert raw[:1] == DOC_SEP_BYTES, "every shard starts with a document separator"
    return raw[1:].split(DOC_SEP_BYTES)


def make_docs(n=60):
    return [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}.\n".encode() * (1 + i % 3)
            for i in range(n)]


def write_jsonl(path, docs, field="text"):
    opener = gzip.open if str(path).endswith(".gz") else lzma.open if str(path).endswith(".xz") else open
    with opener(path, "wb") as f:
        for d in docs:
            f.write(json.dumps({field: d.decode("utf-8", "surrogateescape"), "id": 1}).encode("utf-8", "surrogateescape") + b"\n")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.xz"])
def test_jsonl_every_document_lands_in_exactly_one_split(tmp_path, suffix):
    docs = make_docs()
    path = tmp_path / f"docs{suffix}"
    write_jsonl(path, docs)
    sh = prep(tmp_path, data_path=str(path), val_fraction=0.1)
    train, val = docs_of(sh.train), docs_of(sh.val)
    assert sorted(train + val) == sorted(docs)
    assert len(val) >= 1 and len(train) >= 1
    meta = sh.meta["splits"]
    assert meta["train"]["documents"] == len(train) and meta["val"]["documents"] == len(val)
    assert meta["train"]["bytes"] == len(sh.train) and meta["val"]["bytes"] == len(sh.val)
    assert sh.meta["split_method"] == "hash"
    verify_shards(sh)


def test_split_is_deterministic_and_seeded(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, make_docs(200))
    a = prepare(DataArgs(data_path=str(path), data_dir=str(tmp_path / "a"), val_fraction=0.1), log=quiet)
    b = prepare(DataArgs(data_path=str(path), data_dir=str(tmp_path / "b"), val_fraction=0.1), log=quiet)
    c = prepare(DataArgs(data_path=str(path), data_dir=str(tmp_path / "c"), val_fraction=0.1, split_seed=1), log=quiet)
    ma, mb, mc = (open_shards(p).meta["splits"] for p in (a, b, c))
    assert ma == mb
    assert ma["val"]["sha256"] != mc["val"]["sha256"]
    # ~10 % of 200 documents
    assert 8 <= ma["val"]["documents"] <= 35


def test_a_single_document_split_near_its_end_counts_its_nuls_in_the_split_that_holds_them(tmp_path):
    """One file, split near its end: meta.json put every NUL removed in the split the document was first written to
    (train 0, val 15 for a new user's file whose NULs were spread through it)."""
    raw = b"".join(b"line %d \x00 with a NUL\n" % i for i in range(200))  # NULs all through
    (tmp_path / "one.txt").write_bytes(raw)
    sh = prep(tmp_path, data_path=str(tmp_path / "one.txt"), val_fraction=0.1)
    assert sh.meta["split_method"] == "tail"
    (train,), (val,) = docs_of(sh.train), docs_of(sh.val)
    cut = next(c for c in range(len(raw)) if raw[:c].replace(b"\x00", b"") == train
               and raw[c:].replace(b"\x00", b"") == val)
    s = sh.meta["splits"]
    assert s["train"]["nul_bytes_removed"] == raw[:cut].count(0) > 150
    assert s["val"]["nul_bytes_removed"] == raw[cut:].count(0) > 10
    # a file that ends (or starts) in a run of NULs, e.g. a preallocated log: the cut is chosen on the text, so both
    # splits hold text and the shards are those of the same file without its NULs (a cut on the raw bytes left val,
    # or train, empty: every training run then failed)
    text = b"".join(b"log line %d\n" % i for i in range(300))
    for i, padded in enumerate((text + b"\x00" * 800, b"\x00" * 6000 + text)):
        (tmp_path / f"p{i}.txt").write_bytes(padded)
        (tmp_path / f"c{i}.txt").write_bytes(text)
        a = prep(tmp_path, data_path=str(tmp_path / f"p{i}.txt"), val_fraction=0.1)
        b = prep(tmp_path, data_path=str(tmp_path / f"c{i}.txt"), val_fraction=0.1)
        assert bytes(a.train) == bytes(b.train) and bytes(a.val) == bytes(b.val) and len(b.val) > 100
        s = a.meta["splits"]
        assert s["train"]["nul_bytes_removed"] + s["val"]["nul_bytes_removed"] == padded.count(0)


def test_invalid_utf8_and_nul_bytes_never_crash(tmp_path):
    raw = b"valid start \xff\xfe\xc3 broken \xe2\x82 end \x00 inside"  # invalid UTF-8 and a NUL
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(raw)
    (tmp_path / "d" / "b.txt").write_bytes(b"second file " * 50)
    with open(tmp_path / "d" / "c.jsonl", "wb") as f:  # raw invalid bytes inside a JSON string
        f.write(b'{"text": "json \xff\xfe bytes"}\n{"text": "escaped \\ud800 surrogate"}\nnot json at all\n')
    with pytest.warns(UserWarning, match="not JSON"):
        sh = prep(tmp_path, data_path=str(tmp_path / "d"), val_fraction=0.3)
    all_docs = docs_of(sh.train) + docs_of(sh.val)
    assert raw.replace(b"\x00", b"") in all_docs  # bytes kept exactly, only the separator byte removed
    assert b"json \xff\xfe bytes" in all_docs
    assert len(all_docs) == 4
    assert all(DOC_SEP not in d for d in all_docs)
    # the removal is counted and said once (it was silent: a new user's file lost 600 bytes without a word)
    s = sh.meta["splits"]
    assert s["train"]["nul_bytes_removed"] + s["val"]["nul_bytes_removed"] == 1
    said = []
    prepare(DataArgs(data_dir=str(tmp_path / "cache2"), data_path=str(tmp_path / "d"), val_fraction=0.3),
            log=said.append)
    assert any("removed 1 NUL (0x00) bytes" in m for m in said), said


def test_a_json_strings_raw_bytes_of_a_lone_surrogate_are_kept(tmp_path):
    """The bytes ed b2 80 (U+DC80 as WTF-8 / CESU-8 write a lone surrogate) inside a JSON string: json.loads of the
    line's bytes read them with surrogatepass as U+DC80, which was written as the one byte 0x80; in a line that also
    held an invalid byte they were kept. A text file keeps them too: bytes are never decoded."""
    lone, high = b"low \xed\xb2\x80 end", b"high \xed\xa0\x80 end"
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "a.jsonl", "wb") as f:
        f.write(b'{"text": "' + lone + b'"}\n{"text": "' + high + b'"}\n{"text": "bad \xff and ' + lone + b'"}\n')
    (tmp_path / "d" / "b.json").write_bytes(b'[{"text": "array ' + lone + b'"}, {"text": "plain record"}]')
    sh = prep(tmp_path, data_path=str(tmp_path / "d"), val_fraction=0.3)
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(
        [lone, high, b"bad \xff and " + lone, b"array " + lone, b"plain record"])


def test_a_json_array_in_utf16_or_utf32_is_still_read_as_its_records(tmp_path):
    """json.loads of the file's bytes read UTF-16 / UTF-32 JSON (RFC 8259's detection, no BOM); decoding every JSON
    text as UTF-8 for the surrogate fix turned such an array, read before, into "not valid JSON"."""
    (tmp_path / "d").mkdir()
    text = '[{"text": "caf\u00e9 one"}, {"text": "second record"}]'
    for enc in ("utf-16-le", "utf-32-le"):
        (tmp_path / "d" / f"{enc}.json").write_bytes(text.encode(enc))
    sh = prep(tmp_path, data_path=str(tmp_path / "d"), val_fraction=0.3)
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(["café one".encode(), b"second record"] * 2)


def test_json_lines_named_json_with_an_invalid_byte_in_the_first_record_are_read_as_json_lines(tmp_path):
    """The look at a .json file's first record parsed its bytes as strict UTF-8: one invalid byte there (which a
    .jsonl keeps) read the whole file as text, its braces and key names as the training data."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.json").write_bytes(b'{"text": "first \xff record"}\n{"text": "second record"}\n')
    with pytest.warns(UserWarning, match="read as JSON Lines"):
        sh = prep(tmp_path, data_path=str(tmp_path / "d" / "x.json"), val_fraction=0.3)
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == [b"first \xff record", b"second record"]


def test_a_document_with_raw_bytes_and_an_escaped_surrogate_keeps_each_as_it_was():
    """A JSON line holding a raw invalid byte (read as a surrogate escape) and an escaped \\ud800 went through
    surrogatepass as a whole: the raw 0xff came out as the 3 bytes ed b3 bf."""
    from ionllama.data.sources import encode_text

    text = b'json \xff and \xfe'.decode("utf-8", "surrogateescape") + " escaped \ud800 end"
    assert encode_text(text) == b"json \xff and \xfe escaped \xed\xa0\x80 end"
    assert encode_text(b"only \xff\xc3".decode("utf-8", "surrogateescape")) == b"only \xff\xc3"
    assert encode_text("lone \udbff") == "lone \udbff".encode("utf-8", "surrogatepass")
    assert encode_text("plain \u00e9") == "plain \u00e9".encode()


def test_non_string_text_values_are_skipped_not_stringified(tmp_path):
    """{"text": ["a", "b"]} used to land in train.bin as the Python repr "['a', 'b']" (a new user's report); now such
    lines are skipped with one warning naming their types, as the eval reader refuses them."""
    with open(tmp_path / "m.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": f"plain document number {i} " * 5}) + "\n")
        f.write(json.dumps({"text": ["a", "b"]}) + "\n" + json.dumps({"text": 123}) + "\n")
        f.write(json.dumps({"text": None}) + "\n" + json.dumps({"text": 7}) + "\n")  # nulls were skipped unsaid
    with pytest.warns(UserWarning, match=r"skipped 4 line\(s\) whose 'text' is not a string: list x1 \(first at line "
                                         r"13\), int x2 \(first at line 14\), null x1 \(first at line 15\); pass "
                                         r"--text_field"):
        sh = prep(tmp_path, data_path=str(tmp_path / "m.jsonl"), val_fraction=0.2)
    all_docs = docs_of(sh.train) + docs_of(sh.val)
    assert len(all_docs) == 12 and all(d.startswith(b"plain document") for d in all_docs)


def test_directory_and_glob(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha " * 100)
    (d / "sub" / "b.md").write_text("beta " * 100)
    (d / "sub" / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n" + json.dumps({"text": "delta"}) + "\n")
    (d / "skip.bin").write_bytes(b"\x01\x02")
    (d / ".hidden.txt").write_text("hidden")
    sh = prep(tmp_path, data_path=str(d))
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted([b"alpha " * 100, b"beta " * 100, b"gamma", b"delta"])
    g = prep(tmp_path, data_path=str(d / "**" / "*.md"))
    assert bytes(g.train[1:]) + bytes(g.val[1:]) == b"beta " * 100  # one document: split near its end
    assert g.meta["split_method"] == "tail"


def test_odd_files_in_folders_and_globs_are_skipped_and_said(tmp_path):
    """A new user's audit: a FIFO hung the read, a dangling link was a traceback, a glob took a .png in as a document
    (a folder path skipped it), '**' through a folder link read a file twice, a .zst file was stored compressed, and
    .ndjson.bz2 was read as text."""
    d = tmp_path / "mix"
    d.mkdir()
    (d / "a.txt").write_text("alpha " * 50)
    (d / "b.txt").write_text("beta " * 50)
    (d / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (d / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    os.mkfifo(d / "pipe.txt")
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "x.txt").write_text("external " * 30)
    (d / "linked").symlink_to(ext)
    want = [b"alpha " * 50, b"beta " * 50]
    for path, extra in ((d, []), (d / "*", []), (d / "**" / "*.txt", [b"external " * 30])):
        with pytest.warns(UserWarning) as said:
            sh = prep(tmp_path, data_path=str(path))
        assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(want + extra), path
        text = " ".join(str(w.message) for w in said)
        if path == d:
            assert "not regular files" in text and "linked folder(s) not followed" in text and "img.png" in text
    import bz2
    nd = tmp_path / "n.ndjson.bz2"
    lines = json.dumps({"text": "one " * 20}) + "\n" + json.dumps({"text": "two " * 20})
    nd.write_bytes(bz2.compress(lines.encode()))
    sh = prep(tmp_path, data_path=str(nd))
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == [b"one " * 20, b"two " * 20]
    (tmp_path / "data.jsonl.zst").write_bytes(b"(\xb5/\xfd" + bytes(64))
    with pytest.raises(UserError, match="a .zst file is not read"):
        prep(tmp_path, data_path=str(tmp_path / "data.jsonl.zst"))


def test_json_lines_under_a_json_name_are_read_as_json_lines(tmp_path):
    """Hub dumps are often JSON Lines named .json: read as text, braces and key names became the documents."""
    p = tmp_path / "dump.json"
    p.write_text(json.dumps({"text": "first doc \u00e9 " * 10}) + "\n" + json.dumps({"text": "second " * 10}) + "\n")
    with pytest.warns(UserWarning, match="read as JSON Lines"):
        sh = prep(tmp_path, data_path=str(p))
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted([("first doc \u00e9 " * 10).encode(), b"second " * 10])
    q = tmp_path / "config.json"  # a pretty-printed JSON file stays text
    q.write_text(json.dumps({"text": "x", "n": 1}, indent=2) * 20)
    sh = prep(tmp_path, data_path=str(q))
    assert b'"text": "x"' in bytes(sh.train) + bytes(sh.val)


def test_a_truncated_shard_is_prepared_again_not_reused(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, make_docs())
    a = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=quiet)
    full = (a / "train.bin").read_bytes()
    with open(a / "train.bin", "r+b") as f:
        f.truncate(50)
    logs = []
    b = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=logs.append)
    assert b == a and (b / "train.bin").read_bytes() == full
    assert any("preparing it again" in m for m in logs) and not any("reusing" in m for m in logs)
    assert sum("preparing it again" in m for m in logs) == 1, logs  # it was said twice (the look under the lock)


def test_parquet_goes_through_datasets_loader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = [f"row {i} text".encode() for i in range(30)]
    pq.write_table(pa.table({"content": [d.decode() for d in docs]}), tmp_path / "t.parquet")
    sh = prep(tmp_path, data_path=str(tmp_path / "t.parquet"), text_field="content", val_fraction=0.2)
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(docs)
    # a valid file of no rows beside it: `datasets` failed on it (ArrowInvalid: BatchSize must be greater than 0)
    (tmp_path / "two").mkdir()
    pq.write_table(pa.table({"content": pa.array([], pa.string())}), tmp_path / "two" / "empty.parquet")
    pq.write_table(pa.table({"content": [d.decode() for d in docs]}), tmp_path / "two" / "t.parquet")
    sh = prep(tmp_path / "two", data_path=str(tmp_path / "two"), text_field="content", val_fraction=0.2)
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(docs)
    with pytest.raises(UserError, match="--text_field"):
        prep(tmp_path, data_path=str(tmp_path / "t.parquet"))
    # a column that is not text is refused by name, not trained on as "0", "1", ... (through both readers)
    pq.write_table(pa.table({"content": [d.decode() for d in docs], "n": list(range(30))}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match="field 'n' holds int values, not text; pass --text_field"):
        prep(tmp_path, data_path=str(tmp_path / "n.parquet"), text_field="n")
    from ionllama.data.sources import _iter_parquet_pyarrow

    with pytest.raises(UserError, match="field 'n' holds int values"):
        list(_iter_parquet_pyarrow(str(tmp_path / "n.parquet"), "n", "n"))


def test_a_parquet_name_with_glob_characters_is_read_as_that_file(tmp_path):
    """`datasets` takes data_files as glob patterns: 'x[ab].parquet' read xa.parquet's rows instead of its own."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    from ionllama.data.sources import iter_parquet

    pq.write_table(pa.table({"text": [f"real doc {i}" for i in range(3)]}), tmp_path / "x[ab].parquet")
    pq.write_table(pa.table({"text": [f"imposter {i}" for i in range(3)]}), tmp_path / "xa.parquet")
    pq.write_table(pa.table({"text": ["year doc"]}), tmp_path / "d[2023].parquet")
    assert [d for _, d in iter_parquet(str(tmp_path / "x[ab].parquet"), "text", "x")] == [
        f"real doc {i}".encode() for i in range(3)]
    assert [d for _, d in iter_parquet(str(tmp_path / "d[2023].parquet"), "text", "d")] == [b"year doc"]


def test_a_folders_files_in_an_unread_compression_are_named_as_such(tmp_path):
    """In a folder, b.jsonl.zst was skipped as a file "without a text / jsonl / parquet suffix"."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("some text to train on\n" * 50)
    (tmp_path / "d" / "b.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    (tmp_path / "d" / "c.png").write_bytes(b"\x89PNG")
    with pytest.warns(UserWarning) as w:
        prep(tmp_path, data_path=str(tmp_path / "d"))
    said = [str(x.message) for x in w]
    assert any("compressed in a way not read" in m and "b.jsonl.zst" in m and "c.png" not in m for m in said), said
    assert any("without a text / jsonl / parquet suffix" in m and "c.png" in m and "zst" not in m for m in said), said


def test_corrupt_parquet_is_one_error_line(tmp_path, capfd):
    """`datasets` logged its own "Failed to read schema ..." line before the one-line error (a new user's report);
    its verbosity comes back afterwards."""
    datasets = pytest.importorskip("datasets")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1garbage")
    before = datasets.logging.get_verbosity()
    with pytest.raises(UserError, match=r"could not read \S*bad.parquet .*complete parquet file"):
        prep(tmp_path, data_path=str(tmp_path / "bad.parquet"))
    out, err = capfd.readouterr()
    assert "Failed to read schema" not in out + err, err
    assert datasets.logging.get_verbosity() == before


def test_hub_loader_code_reads_local_files_in_hub_format(tmp_path):
    """The function the hub sources use, over a local jsonl in TinyStories' row format."""
    pytest.importorskip("datasets")
    path = tmp_path / "stories.jsonl"
    write_jsonl(path, [b"Once upon a time.", b"The end."])
    got = list(sources.iter_hf_documents("json", "train", data_files=[str(path)]))
    assert [d for _, d in got] == [b"Once upon a time.", b"The end."]
    assert got[0][0] != got[1][0]


def test_hub_sources_fail_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(UserError, match="--data_path"):
        prep(tmp_path, dataset="tinystories")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(UserError, match="not reachable"):
        prep(tmp_path, dataset="fineweb")
    assert time.time() - t < 15
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # no half-written cache left behind


def test_the_hub_probe_goes_through_the_proxy_as_huggingface_hub_does(monkeypatch):
    """It opened a direct socket to the hub: behind HTTPS_PROXY (where the hub's name may not resolve at all) every
    --dataset was refused as unreachable, though huggingface_hub itself goes through the proxy."""
    import socket

    from ionllama.data.sources import hub_unreachable_reason

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves
    assert "hub.invalid" in hub_unreachable_reason(timeout=2)
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert hub_unreachable_reason(timeout=2) is None
        monkeypatch.setenv("NO_PROXY", "hub.invalid")  # bypassed: the hub itself again
        assert "hub.invalid" in hub_unreachable_reason(timeout=2)


def test_given_split_files_with_placeholder(tmp_path):
    train, val = make_docs(20), [b"held out one", b"held out two"]
    write_jsonl(tmp_path / "c-train.jsonl", train)
    write_jsonl(tmp_path / "c-validation.jsonl", val)  # 'val' or 'validation' both work
    sh = prep(tmp_path, data_path=str(tmp_path / "c-{split}.jsonl"))
    assert sh.meta["split_method"] == "given"
    assert docs_of(sh.train) == train and docs_of(sh.val) == val
    # so small a val split is used, but said: its BPB would be noise (not said for a val split of normal size)
    logs = []
    prepare(DataArgs(data_path=str(tmp_path / "c-{split}.jsonl"), data_dir=str(tmp_path / "c2")), log=logs.append)
    # given split files: --val_fraction plays no part, so the fix named is a larger val file
    assert any("val split holds only 26 bytes" in m and "give a larger val file" in m for m in logs), logs
    write_jsonl(tmp_path / "c-validation.jsonl", make_docs(3) * 20)
    logs.clear()
    prepare(DataArgs(data_path=str(tmp_path / "c-{split}.jsonl"), data_dir=str(tmp_path / "c3")), log=logs.append)
    assert not any("warning" in m for m in logs), logs
    (tmp_path / "t-train.txt").write_text("only a train file")
    with pytest.raises(UserError, match="no val files"):
        prep(tmp_path, data_path=str(tmp_path / "t-{split}.txt"))
    for n in (1, 3):  # an empty train file: its held-out val documents went into train.bin, exit 0
        (tmp_path / "e-train.jsonl").write_text("")
        write_jsonl(tmp_path / "e-val.jsonl", make_docs(n))
        with pytest.raises(UserError, match="the train split of .* is empty; check the train files"):
            prep(tmp_path, data_path=str(tmp_path / "e-{split}.jsonl"))
    write_jsonl(tmp_path / "c-val.jsonl", val)  # now both c-val and c-validation: the one used is said
    with pytest.warns(UserWarning, match="val files exist for '.split.' = val and validation; using 'val' only"):
        sh = prep(tmp_path, data_path=str(tmp_path / "c-{split}.jsonl"))
    assert docs_of(sh.val) == val


def test_small_sources_still_get_a_val_split(tmp_path):
    for n in (2, 3):
        p = tmp_path / f"few{n}.jsonl"
        write_jsonl(p, [f"doc {i} ".encode() * 20 for i in range(n)])
        sh = prep(tmp_path, data_path=str(p))
        assert sh.meta["splits"]["val"]["documents"] >= 1 and sh.meta["splits"]["train"]["documents"] >= 1
    (tmp_path / "one.txt").write_bytes(b"line of text\n" * 500)
    sh = prep(tmp_path, data_path=str(tmp_path / "one.txt"))
    assert bytes(sh.train[1:]) + bytes(sh.val[1:]) == b"line of text\n" * 500
    assert bytes(sh.val[1:]).startswith(b"line")  # cut at a line boundary


def test_recursive_glob_refuses_a_symlink_loop(tmp_path):
    """'**' follows links: two loops made glob walk paths without end (a new user's run hung). Now one error line;
    a link to a folder elsewhere (no loop) still works, and a folder path ignores links as before."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text(json.dumps({"text": "alpha " * 50}) + "\n")
    (d / "sub" / "b.jsonl").write_text(json.dumps({"text": "beta " * 50}) + "\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.jsonl").write_text(json.dumps({"text": "gamma " * 50}) + "\n")
    (d / "linked").symlink_to(tmp_path / "elsewhere")
    sh = prep(tmp_path, data_path=str(d / "**" / "*.jsonl"))
    assert len(docs_of(sh.train) + docs_of(sh.val)) == 3
    (d / "sub" / "up").symlink_to(d)
    (d / "sub" / "self").symlink_to(d / "sub")
    with pytest.raises(UserError, match="would follow the symlink loop at"):
        prep(tmp_path, data_path=str(d / "**" / "*.jsonl"))
    assert len(docs_of(prep(tmp_path, data_path=str(d)).train)) >= 1  # the folder itself: links not followed


def test_cache_is_reused_and_keyed_by_arguments(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, make_docs())
    logs = []
    a = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=logs.append)
    mtime = (a / "train.bin").stat().st_mtime_ns
    b = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=logs.append)
    assert a == b and (b / "train.bin").stat().st_mtime_ns == mtime
    assert any("reusing" in m for m in logs)
    c = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c"), val_fraction=0.2), log=quiet)
    assert c != a
    os.utime(p, ns=(mtime + 10**9, mtime + 10**9))  # the source changed -> new shards
    assert prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=quiet) != a
    # an edit that keeps size and mtime (cp -p, touch -r) is a new source too: the ctime moved
    d = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=quiet)
    st = p.stat()
    p.write_bytes(p.read_bytes().replace(b"quick", b"quack"))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    e = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=quiet)
    assert e != d and b"quack" in bytes(open_shards(e).train) + bytes(open_shards(e).val)


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prep(tmp_path, data_path=str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="matches no files"):
        prep(tmp_path, data_path=str(tmp_path / "*.nothing"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty dataset"):
        prep(tmp_path, data_path=str(tmp_path / "empty.jsonl"))
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="--text_field"):
        prep(tmp_path, data_path=str(tmp_path / "nofield.jsonl"))
    assert not (tmp_path / "cache").exists()  # the refused first run leaves no empty cache folder behind
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(UserError, match="cannot read"):
        prep(tmp_path, data_path=str(tmp_path / "broken.jsonl.gz"))
    (tmp_path / "deflate.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbagegarbage")  # zlib.error, not OSError
    with pytest.raises(UserError, match="cannot read"):
        prep(tmp_path, data_path=str(tmp_path / "deflate.jsonl.gz"))


def test_builtin_corpus_is_offline_capped_and_deterministic(tmp_path):
    a = prep(tmp_path, dataset="builtin", builtin_bytes=300_000)
    b = prepare(DataArgs(dataset="builtin", builtin_bytes=300_000, data_dir=str(tmp_path / "other")), log=quiet)
    total = a.meta["splits"]["train"]["bytes"] + a.meta["splits"]["val"]["bytes"]
    docs = a.meta["splits"]["train"]["documents"] + a.meta["splits"]["val"]["documents"]
    assert total - docs <= 300_000  # separators aside, the cap holds
    assert total > 250_000
    assert open_shards(b).meta["splits"] == a.meta["splits"]
    assert b"def " in bytes(a.train) and b"import " in bytes(a.train)


@pytest.mark.skipif(not (SHARED / "english" / "english-mix.jsonl.gz").is_file(), reason="shared data not present")
def test_real_corpora_slices(tmp_path):
    sh = prep(tmp_path, data_path=str(SHARED / "english" / "english-mix.jsonl.gz"), max_bytes=400_000)
    s = sh.meta["splits"]
    assert 400_000 <= s["train"]["bytes"] + s["val"]["bytes"] < 500_000
    assert s["train"]["documents"] > 10
    g = prep(tmp_path, data_path=str(SHARED / "gutenberg" / "gutenberg-{split}.jsonl.xz"), max_bytes=200_000)
    assert g.meta["split_method"] == "given"
    assert g.meta["splits"]["train"]["documents"] >= 1 and g.meta["splits"]["val"]["documents"] >= 1
    assert len(g.val) >= 1_000_000  # own val split capped at max(1 MB, val_fraction x budget)
    t = prep(tmp_path, data_path=str(SHARED / "tinystories" / "tinystories-sample.txt"))
    assert b"Lily" in bytes(t.train)


# ---------------------------------------------------------------- sampling

def test_window_sampler_is_a_function_of_seed_and_step():
    data = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)
    s = WindowSampler(data, seq_len=16, batch_size=4, seed=3)
    x1, y1 = s.get(5)
    x2, y2 = WindowSampler(data, 16, 4, seed=3).get(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.long and x1.shape == (4, 16)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and torch.equal((x1[:, 0] + 1) % 256, y1[:, 0])
    assert not torch.equal(s.get(6)[0], x1)
    assert not torch.equal(WindowSampler(data, 16, 4, seed=4).get(5)[0], x1)


def test_ranks_and_micro_steps_split_the_global_batch():
    data = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    one = WindowSampler(data, 8, batch_size=8, seed=1).get(2)[0]
    ranks = [WindowSampler(data, 8, batch_size=4, seed=1, rank=r, world_size=2).get(2)[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), one)
    acc = WindowSampler(data, 8, batch_size=2, grad_accum=2, seed=1, rank=1, world_size=2)
    assert torch.equal(torch.cat([acc.get(2, 0)[0], acc.get(2, 1)[0]]), torch.cat([one[2:4], one[6:8]]))


def test_task_mix_replaces_rows():
    data = np.frombuffer(b"abcdefgh" * 500, dtype=np.uint8)
    s = WindowSampler(data, 66, batch_size=8, seed=0, task_mix=0.25)
    x, y = s.get(0)
    assert (y[:6] != -100).all()  # text rows: every byte a target
    assert (y[6:] == -100).any() and (y[6:] != -100).any()  # task rows: answers only
    assert bytes(x[6].tolist()).count(b"Q: ") >= 1
    xt, yt = TaskSampler(66, 4, seed=0).get(3)
    assert xt.shape == (4, 66) and (yt == -100).any()
    # a --seq_len too short for the longest example: said at once, not at the step that first draws one (an audit's
    # run failed at step 20 of 40 at --seq_len 62)
    for make in (lambda: TaskSampler(65, 4), lambda: WindowSampler(data, 65, 8, task_mix=0.25)):
        with pytest.raises(UserError, match="--seq_len 65 is too short for the longest task example .67 bytes"):
            make()


def test_missing_task_module_is_a_user_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ionllama.data.tasks", None)
    data = np.frombuffer(b"abcdefgh" * 100, dtype=np.uint8)
    with pytest.raises(UserError, match="ionllama.data.tasks"):
        WindowSampler(data, 16, 4, task_mix=0.5)


def test_sampler_rejects_short_data():
    with pytest.raises(UserError, match="--seq_len"):
        WindowSampler(np.zeros(10, dtype=np.uint8), seq_len=16, batch_size=2)


def test_staged_dir_replaces_whole_or_keeps_the_old(tmp_path):
    """A cache folder is published only when its block succeeds; a failure keeps the previous folder as it was and
    leaves no temporary folder; an unwritable parent is a one-line UserError naming the flag."""
    out = tmp_path / "cache" / "shards"
    with staged_dir(out, tmp_path / "cache", "--data_dir") as tmp:
        (tmp / "a.bin").write_bytes(b"old")
    assert (out / "a.bin").read_bytes() == b"old"
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_dir(out, tmp_path / "cache", "--data_dir") as tmp:
            (tmp / "a.bin").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert (out / "a.bin").read_bytes() == b"old" and sorted(p.name for p in out.iterdir()) == ["a.bin"]
    with pytest.raises(RuntimeError, match="no text"):  # a parent it made is removed when left empty, not one given
        with staged_dir(tmp_path / "new" / "shards", tmp_path / "new", "--data_dir"):
            raise RuntimeError("no text")
    assert not (tmp_path / "new").exists() and (tmp_path / "cache").is_dir()
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    with staged_dir(out, tmp_path / "cache", "--data_dir") as tmp:
        (tmp / "b.bin").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == ["b.bin"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="cannot write to --data_dir"):
        with staged_dir(out, tmp_path / "a_file" / "sub", "--data_dir"):
            pass
    # a run killed by SIGTERM / SIGKILL leaves its temporary folder: the next run removes it (its pid is gone)
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process
    stale = tmp_path / "cache" / f".tmp-shards-{dead.pid}"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"half")
    with staged_dir(out, tmp_path / "cache", "--data_dir") as tmp:
        (tmp / "c.bin").write_bytes(b"c")
    assert not stale.exists() and not list((tmp_path / "cache").glob(".tmp-*"))
    # an old cache folder that cannot be removed: one line after the rebuild, not a traceback
    import shutil as sh

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied")

    orig = sh.rmtree
    try:
        sh.rmtree = lambda path, *a, **k: refuse(path) if Path(path) == out and not k.get("ignore_errors") else \
            orig(path, *a, **k)
        with pytest.raises(UserError, match="cannot replace the old cache folder .*denied.*remove it by hand"):
            with staged_dir(out, tmp_path / "cache", "--data_dir") as tmp:
                (tmp / "d.bin").write_bytes(b"d")
    finally:
        sh.rmtree = orig
    assert (out / "c.bin").is_file() and not list((tmp_path / "cache").glob(".tmp-*"))


def test_a_datasets_save_to_disk_folder_is_read_as_its_rows(tmp_path):
    """A save_to_disk folder was scanned as plain files: its JSON metadata became the documents and the Arrow rows
    were skipped, with exit 0 (a new user's report). Now its rows are the documents; a DatasetDict's own splits are
    used; one of its .arrow shards, or a missing column, is one line."""
    datasets = pytest.importorskip("datasets")
    rows = [f"row {i} says " + "abc " * (5 + i % 7) for i in range(40)]
    datasets.Dataset.from_dict({"content": rows, "n": list(range(40))}).save_to_disk(str(tmp_path / "one"))
    sh = prep(tmp_path, data_path=str(tmp_path / "one"), text_field="content", val_fraction=0.2)
    got = docs_of(sh.train) + docs_of(sh.val)
    assert sorted(got) == sorted(r.encode() for r in rows) and sh.meta["split_method"] != "given"

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": rows[:30]}),
                               "validation": datasets.Dataset.from_dict({"content": rows[30:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    sh = prep(tmp_path, data_path=str(tmp_path / "dd"), text_field="content")
    assert docs_of(sh.train) == [r.encode() for r in rows[:30]] and docs_of(sh.val) == [r.encode() for r in rows[30:]]

    # a trailing slash is the same folder: the same split (its doc ids were '[...]:i' instead of 'one:i')
    plain = prep(tmp_path / "plain", data_path=str(tmp_path / "one"), text_field="content", val_fraction=0.2)
    sh2 = prep(tmp_path / "slash", data_path=str(tmp_path / "one") + "/", text_field="content", val_fraction=0.2)
    assert docs_of(sh2.val) == docs_of(plain.val) and docs_of(sh2.train) == docs_of(plain.train)
    with pytest.raises(UserError, match="has no column 'text'"):
        prep(tmp_path, data_path=str(tmp_path / "one"))
    arrow = next((tmp_path / "one").glob("*.arrow"))
    with pytest.raises(UserError, match="one shard of a `datasets` folder"):
        prep(tmp_path, data_path=str(arrow))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.xz"])
def test_a_broken_json_line_names_its_file_and_line(tmp_path, suffix):
    """Broken lines are skipped (a download cut mid-line must not stop a prepare) with one warning that now names
    their count and the first one's 1-based line and reason (blank lines counted, compressed or not); it named
    neither, leaving the user to search the file."""
    path = tmp_path / f"b{suffix}"
    opener = gzip.open if suffix.endswith(".gz") else lzma.open if suffix.endswith(".xz") else open
    with opener(path, "wb") as f:
        f.write(b'{"text": "one"}\n\n{"text": "three\n["a list"]\n{"text": "five"}\n')
    from ionllama.data.sources import iter_jsonl

    with pytest.warns(UserWarning) as w:
        docs = [d for _, d in iter_jsonl(str(path))]
    assert docs == [b"one", b"five"]
    assert [str(x.message) for x in w] == [f"{path}: skipped 2 line(s) that are not JSON objects (first: line 3: "
                                           "Unterminated string starting at at column 10)"]
    with opener(path, "wb") as f:
        f.write(b'{"text": "one"}\nnull\n')
    with pytest.warns(UserWarning, match=r"skipped 1 line\(s\) that are not JSON objects \(first: line 2 is null\)"):
        list(iter_jsonl(str(path)))


def test_parquet_errors_name_the_fix(tmp_path, monkeypatch):
    """The parquet messages read "parquet files ['x.parquet'] has no field ..." and ended in "pass --text_field NAME"
    without saying which names are text; now they name the file and the text columns to pass."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"n": [1, 2, 3], "body": ["a", "b", "c"]}), path)
    from ionllama.data.sources import _iter_parquet_pyarrow

    for read in (lambda f: prep(tmp_path, data_path=str(path), text_field=f),
                 lambda f: list(_iter_parquet_pyarrow(str(path), f, "t"))):
        with pytest.raises(UserError) as e:
            read("text")
        assert str(e.value) == f"{path} has no column 'text'; pass --text_field with a text column: body"
        with pytest.raises(UserError) as e:
            read("n")
        assert str(e.value) == (f"{path}: field 'n' holds int values, not text; pass --text_field with a text column: "
                                "body")
    pq.write_table(pa.table({"n": [1, 2, 3]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"has no column 'text'; its columns \(n\) hold no text; store the text as"):
        list(_iter_parquet_pyarrow(str(tmp_path / "n.parquet"), "text", "n"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # neither reader installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"t.parquet needs the pyarrow package, which is not installed; pip install "
                       "pyarrow"):
        prep(tmp_path, data_path=str(path), text_field="body")


@pytest.mark.parametrize("name", ["d.jsonl", "d-{split}.jsonl"])
def test_a_file_that_changes_while_prepared_is_refused(tmp_path, monkeypatch, name):
    """A file written to during the read made shards that mix its versions under the key of one of them; now it is
    refused by name and nothing is left in the cache."""
    for split in ("train", "val"):
        write_jsonl(tmp_path / name.replace("{split}", split), make_docs(20))
    read = sources.iter_local_file

    def appended_while_read(path, base, text_field, *rest):
        yield from read(path, base, text_field, *rest)
        with open(path, "a") as f:  # a writer still adding to it
            f.write(json.dumps({"text": "late line"}) + "\n")

    monkeypatch.setattr(sources, "iter_local_file", appended_while_read)
    with pytest.raises(UserError, match=r"d(-train)?\.jsonl changed while it was being prepared .*prepare again once "
                       "it stops changing"):
        prep(tmp_path, data_path=str(tmp_path / name))
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(sources, "iter_local_file", read)
    prep(tmp_path, data_path=str(tmp_path / name))  # once it is still, it prepares


def test_caches_of_earlier_versions_are_named_not_deleted(tmp_path):
    """A changed source got a new cache folder and the old one stayed, unused and unsaid, forever. Now the folders
    of its earlier versions (other split arguments too, not other text fields) are named with their size and the
    command that removes them; none is deleted."""
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i} " * 30, "body": f"b {i} " * 30}) + "\n" for i in range(30)))
    a = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=quiet)
    b = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c"), val_fraction=0.2), log=quiet)
    other_field = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c"), text_field="body"), log=quiet)
    said = []
    assert prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=said.append) == a
    assert not any("earlier versions" in m for m in said)  # reused: nothing is stale
    with open(p, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    said = []
    new = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=said.append)
    notes = [m for m in said if "earlier versions" in m]
    assert len(notes) == 1, said
    size = sum(f.stat().st_size for d in (a, b) for f in d.iterdir())
    assert f"2 cache folder(s) of earlier versions of these files remain ({size / 1e6:,.1f} MB)" in notes[0]
    assert notes[0].endswith(f"remove them with: rm -r {a} {b}" if a < b else f"remove them with: rm -r {b} {a}")
    assert str(other_field) not in notes[0] and str(new) not in notes[0]
    assert all(d.is_dir() for d in (a, b, other_field, new))


def test_readme_says_which_datasets_prepare_refuses():
    """The README listed `--dataset tasks` among the sources and said `ionllama prepare` builds their shards; prepare
    refuses it. Every listed dataset is one the CLI takes, and those prepare refuses are named where it is."""
    import re

    from ionllama.data.shards import DATASETS, make_source

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = re.findall(r"^\| `--dataset (\w+)`", readme, re.M)
    assert sorted(listed) == sorted(DATASETS)
    refused = []
    for name in listed:
        try:
            make_source(DataArgs(dataset=name, builtin_bytes=1000))
        except UserError as e:
            assert "nothing to prepare" in str(e)
            refused.append(name)
    assert refused == ["tasks"]
    where = readme[readme.index("`ionllama prepare ...` builds them"):][:300]
    assert all(f"`--dataset {name}`" in where and "nothing to prepare" in where for name in refused), where


@pytest.mark.parametrize("name", ["NOTES.TXT.GZ", "Notes.Txt.Xz", "NOTES.TXT.BZ2", "B.JSONL.GZ"])
def test_upper_case_compressed_suffixes_are_decompressed(tmp_path, name):
    """NOTES.TXT.GZ was stored as its raw gzip bytes (B.JSONL.GZ: "skipped 1 line(s) that are not JSON objects"): the
    file was taken in case-blind, but opened by a case-sensitive suffix test."""
    import bz2

    text = b"plain english text, line after line.\n" * 40
    if "JSONL" in name:
        text = b"".join(json.dumps({"text": f"doc {i} " * 9}).encode() + b"\n" for i in range(9))
    opener = {".GZ": gzip.compress, ".XZ": lzma.compress, ".BZ2": bz2.compress}[os.path.splitext(name)[1].upper()]
    (tmp_path / name).write_bytes(opener(text))
    sh = prep(tmp_path, data_path=str(tmp_path / name))
    if "JSONL" in name:
        assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(f"doc {i} ".encode() * 9 for i in range(9))
    else:
        assert bytes(sh.train[1:]) + bytes(sh.val[1:]) == text


def test_a_json_array_of_records_is_read_as_its_records(tmp_path):
    """json.dump([{"text": ...}, ...]) / pandas to_json(orient="records") was trained on as raw JSON text (brackets,
    keys, escapes) without a word; now each record is a document, with the JSON Lines reader's rules."""
    docs = [f'record {i} says "hi" \u00e9\n'.encode() * 3 for i in range(6)]
    records = [{"text": d.decode(), "id": i} for i, d in enumerate(docs)]
    p = tmp_path / "recs.json"
    with open(p, "w") as f:
        json.dump(records[:2] + ["not a record", {"text": None}] + records[2:], f, indent=1)
    with pytest.warns(UserWarning, match=r"skipped 1 record\(s\) that are not JSON objects \(first: record 3 is a "):
        sh = prep(tmp_path, data_path=str(p))
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(docs)
    p.write_text(json.dumps([{"body": d.decode()} for d in docs]))  # one line, as pandas writes it; --text_field
    sh = prep(tmp_path, data_path=str(p), text_field="body")
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(docs)
    with pytest.raises(UserError, match=r"recs.json record 1 has no field 'text' \(fields: body\); pass --text_field"):
        prep(tmp_path, data_path=str(p))
    p.write_text(json.dumps(records)[:-30])  # cut short: refused, not read as text
    with pytest.raises(UserError, match="starts as a JSON array but is not valid JSON .*convert it to JSON Lines"):
        prep(tmp_path, data_path=str(p))


def test_max_bytes_caps_the_source_and_cuts_the_crossing_document(tmp_path):
    """The cap was checked only before a document, so the first one went in whole: a single 500 kB file under
    --max_bytes 20000 gave 500 kB of shards. Now the source bytes taken are exactly the cap, the file's first ones,
    and a single file still gets its val tail."""
    text = "".join(f"line {i}: caf\u00e9 and more text\n" for i in range(3000)).encode()
    (tmp_path / "one.txt").write_bytes(text)
    logs = []
    sh = open_shards(prepare(DataArgs(data_path=str(tmp_path / "one.txt"), data_dir=str(tmp_path / "c"),
                                      max_bytes=2000), log=logs.append))
    assert bytes(sh.train[1:]) + bytes(sh.val[1:]) == text[:2000]
    assert sh.meta["split_method"] == "tail" and len(sh.val) > 1
    assert any("stopped at the byte cap (2,000 bytes" in m for m in logs), logs
    assert [d for _, d in sources.iter_text_file(str(tmp_path / "one.txt"), "one", 10)] == [text[:10]]
    path = tmp_path / "d.jsonl"  # many documents: the one crossing the cap is cut at it
    write_jsonl(path, make_docs())
    sh = prep(tmp_path, data_path=str(path), max_bytes=1000, val_fraction=0.3)
    got = docs_of(sh.train) + docs_of(sh.val)
    assert sum(map(len, got)) == 1000 and len(got) > 3 and len(sh.val) > 1
    assert sum(d not in make_docs() for d in got) == 1  # the cut one
    write_jsonl(tmp_path / "s-train.jsonl", make_docs())  # given split files: the train files are capped
    write_jsonl(tmp_path / "s-val.jsonl", make_docs(3))
    sh = prep(tmp_path, data_path=str(tmp_path / "s-{split}.jsonl"), max_bytes=500)
    assert sum(map(len, docs_of(sh.train))) == 500 and docs_of(sh.val) == make_docs(3)
    with pytest.raises(UserError, match="too small to split into train and val .1 bytes.; raise --max_bytes"):
        prep(tmp_path, data_path=str(tmp_path / "one.txt"), max_bytes=1)


@pytest.mark.parametrize("cap", [30_000_000_000, 10**23])
def test_a_byte_cap_far_above_the_data_reads_it_all(tmp_path, cap):
    """read(n) sets n bytes aside first: --max_bytes 3e10 over a few small files was a MemoryError traceback, 1e23
    an OverflowError (and --builtin_bytes the same); a cap above the data means the whole data."""
    from ionllama.data.sources import builtin_source

    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"{i}.txt").write_bytes(f"document {i} ".encode() * 20)
    sh = prep(tmp_path, data_path=str(tmp_path / "d"), max_bytes=cap, val_fraction=0.34)
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == [f"document {i} ".encode() * 20 for i in range(3)]
    rel, first = next(builtin_source(cap).iter_docs())
    assert first and len(first) < 10**8, rel


def test_a_glob_leaves_out_ionllamas_own_caches_and_runs_and_a_real_path_with_brackets_is_that_path(tmp_path):
    """Only the folder walk left ionLlama's own folders out: 'texts/**/*' read the previous run's cache as data (a new
    cache each run, growing), '**/*.jsonl' read a run's metrics.jsonl; and a folder named 'corpus [v2]' was taken as a
    glob that matched nothing."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"{i}.txt").write_bytes(f"text {i} ".encode() * 30)
    run = texts / "runs" / "full"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    write_jsonl(run / "metrics.jsonl", [b"not data"])
    args = dict(data_path=str(texts / "**" / "*"), data_dir=str(texts / "cache"), val_fraction=0.34)
    firsts = []
    for _ in range(2):  # the second run finds the first run's cache below the pattern
        with pytest.warns(UserWarning, match="own data cache / run folder.s. left out"):
            out = prepare(DataArgs(**args), log=quiet)
        firsts.append(out)
        sh = open_shards(out)
        assert sorted(docs_of(sh.train) + docs_of(sh.val)) == [f"text {i} ".encode() * 30 for i in range(3)]
    assert firsts[0] == firsts[1]  # the same source: the cache is reused
    odd = tmp_path / "corpus [v2]"
    odd.mkdir()
    write_jsonl(odd / "a.jsonl", make_docs(10))
    sh = prep(tmp_path, data_path=str(odd), val_fraction=0.3)
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(make_docs(10))


def test_a_json_line_with_a_huge_integer_or_deep_nesting_is_skipped_not_a_traceback(tmp_path):
    """json.loads raises ValueError past 4,300 integer digits and RecursionError on deep nesting, neither a
    JSONDecodeError: a traceback (exit 1) where a bad line is skipped and counted; in a JSON array, one line."""
    from ionllama.data.sources import iter_json_array, iter_jsonl

    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "x", "n": ' + "9" * 5000 + "}\n" + "[" * 200_000 + '\n{"text": "fine"}\n')
    with pytest.warns(UserWarning, match="skipped 2 line.s.*line 2: ValueError: Exceeds the limit"):
        assert [d for _, d in iter_jsonl(str(p))] == [b"ok", b"fine"]
    q = tmp_path / "b.json"
    q.write_text('[{"text": "a", "n": ' + "9" * 5000 + "}]")
    with pytest.raises(UserError, match="starts as a JSON array but is not valid JSON .ValueError: Exceeds"):
        list(iter_json_array(str(q)))


def test_caches_of_an_earlier_shard_format_are_named_too(tmp_path, monkeypatch):
    """A new SHARD_FORMAT makes a new cache folder for unchanged files; the folder of the old format was not named
    (only changed files counted), so it stayed on disk unsaid."""
    from ionllama.data import shards

    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i} " * 30}) + "\n" for i in range(30)))
    old = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=quiet)
    monkeypatch.setattr(shards, "SHARD_FORMAT", shards.SHARD_FORMAT + 1)
    said = []
    new = prepare(DataArgs(data_path=str(p), data_dir=str(tmp_path / "c")), log=said.append)
    notes = [m for m in said if "earlier versions" in m]
    assert new != old and len(notes) == 1 and notes[0].endswith(f"remove them with: rm -r {old}"), said


def test_a_parquet_files_doc_ids_are_the_same_with_or_without_datasets(tmp_path):
    """The doc ids decide the split: the pyarrow fallback (no `datasets` installed) numbered rows from 1 and the
    `datasets` reader from 0, so the same file split differently by environment (an audit). Rows with no text are
    skipped by both but keep their numbers."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    from ionllama.data.sources import _iter_parquet_pyarrow, iter_parquet

    pq.write_table(pa.table({"text": ["a", None, "b", "c"]}), tmp_path / "t.parquet")
    path = str(tmp_path / "t.parquet")
    via_datasets = list(iter_parquet(path, "text", "t.parquet"))
    assert [d[0] for d in via_datasets] == ["t.parquet:0", "t.parquet:2", "t.parquet:3"]
    assert list(_iter_parquet_pyarrow(path, "text", "t.parquet")) == via_datasets


def test_a_file_reached_twice_through_a_folder_is_read_once(tmp_path):
    """A folder --data_path with a link to one of its own files read that file twice, and the split put one copy's
    documents in val and the other's in train (32 of 34 val documents were in train in an audit's run); a glob
    already kept one copy. Both routes now read each file once."""
    from ionllama.data.sources import resolve_local_files

    d = tmp_path / "d"
    d.mkdir()
    for i in range(3):
        (d / f"f{i}.txt").write_text(f"document {i}\n")
    (d / "link0.txt").symlink_to(d / "f0.txt")
    files, _ = resolve_local_files(str(d))
    assert sorted(os.path.basename(f) for f in files) == ["f0.txt", "f1.txt", "f2.txt"]
    globbed, _ = resolve_local_files(str(d / "*.txt"))
    assert len(globbed) == 3


def test_two_runs_preparing_the_same_cache_build_it_once(tmp_path, monkeypatch):
    """Two runs preparing the same data at once both rebuilt the cache, and the one finishing second deleted the
    folder the first had installed or failed with "cannot replace the old cache folder" (an audit: 1-2 of 6 failed
    in every round). A lock now lets one build while the other waits and then reuses it. (Two threads here: the
    lock is an flock on a file, taken per open file, so it holds between threads as between processes.)"""
    import threading

    import ionllama.data.shards as S

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " + "text " * 50}) + "\n" for i in range(100)))
    real = S._write_shards

    def slow(*a, **k):  # the first build is still running when the second run looks for the cache
        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(S, "_write_shards", slow)
    said, errors = [], []

    def run():
        try:
            prepare(DataArgs(data_path=str(src), data_dir=str(tmp_path / "c")), log=said.append)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(m.startswith("data: preparing") for m in said) == 1, said
    assert sum(m.startswith("data: reusing") for m in said) == 1, said
    (cache,) = [d for d in (tmp_path / "c").iterdir() if d.is_dir()]
    assert (cache / "meta.json").is_file()


def test_a_file_system_without_locks_still_prepares(tmp_path, monkeypatch):
    """flock fails on some network mounts (ENOLCK): the cache is then built unlocked, as before the lock, not
    refused with a traceback."""
    import errno
    import fcntl

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " + "text " * 20}) + "\n" for i in range(50)))
    out = prepare(DataArgs(data_path=str(src), data_dir=str(tmp_path / "c")), log=quiet)
    assert (out / "meta.json").is_file()


def test_a_json_lines_file_with_a_long_first_record_is_read_as_json_lines(tmp_path):
    """Only the first 64 KiB were parsed to tell JSON Lines: a first record longer than that (a book) failed to parse
    and the whole file became one text document of braces, keys and escapes, without a word (an audit)."""
    book = "a long book line. " * 5000  # ~90 KB
    p = tmp_path / "books.json"
    p.write_text(json.dumps({"text": book}) + "\n" + json.dumps({"text": "a short one " * 10}) + "\n")
    with pytest.warns(UserWarning, match="read as JSON Lines"):
        sh = prep(tmp_path, data_path=str(p))
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted([book.encode(), b"a short one " * 10])


def test_ionllamas_own_cache_and_run_folders_in_a_data_folder_are_not_data(tmp_path, monkeypatch):
    """With --data_path . the default data_cache/ and checkpoints/ sit inside the data folder: each run read the last
    one's meta.json as a document (50, 51, 52 documents: the cache never reused) and a run's metrics.jsonl failed the
    next prepare ("has no field 'text'"). They are left out, and said."""
    d = tmp_path / "work"
    d.mkdir()
    for i, doc in enumerate(make_docs(30)):
        (d / f"doc{i}.txt").write_bytes(doc)
    monkeypatch.chdir(d)
    args = DataArgs(data_path=".", data_dir="data_cache")
    first = prepare(args, log=quiet)
    run = d / "checkpoints" / "run1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.warns(UserWarning, match="data cache / run folder"):
        again = prepare(args, log=quiet)
    assert again == first  # the same cache folder: nothing new was read
    sh = open_shards(again)
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(make_docs(30))


def test_a_glob_names_documents_below_its_literal_folder_so_a_new_file_keeps_the_split(tmp_path):
    """Document ids were paths below the matched files' common folder: with 'data/*/*.txt', one file added in a second
    subfolder moved that folder, renamed every document and re-split train and val (25 of 28 val documents went to
    train), so a resumed run was scored on text it had trained on. Ids are below the pattern's literal folder now."""
    a = tmp_path / "data" / "a"
    a.mkdir(parents=True)
    docs = make_docs(40)
    for i, doc in enumerate(docs):
        (a / f"d{i:02}.txt").write_bytes(doc)
    pattern = str(tmp_path / "data" / "*" / "*.txt")
    before = prep(tmp_path, data_path=pattern, val_fraction=0.25)
    (tmp_path / "data" / "b").mkdir()
    new = b"a new document in another folder\n"
    (tmp_path / "data" / "b" / "new.txt").write_bytes(new)
    after = prep(tmp_path, data_path=pattern, val_fraction=0.25)
    assert set(docs_of(before.val)) == set(docs_of(after.val)) - {new} and len(docs_of(before.val)) >= 4
    assert set(docs_of(before.train)) == set(docs_of(after.train)) - {new}


def test_split_named_files_pooled_into_a_hash_split_are_said(tmp_path):
    """A folder of x-train / x-val / x-test files was pooled and hash-split without a word: 49 of 50 test documents
    landed in train. Only a '{split}' pattern keeps them apart; the warning says so."""
    d = tmp_path / "ds"
    d.mkdir()
    for split in ("train", "val", "test"):
        (d / f"x-{split}.jsonl").write_text("".join(json.dumps({"text": f"{split} {i} " * 5}) + "\n" for i in range(5)))
    for path in (d, d / "*.jsonl"):
        with pytest.warns(UserWarning, match=r"files named as splits .*'\{split\}'"):
            prep(tmp_path, data_path=str(path))
    import warnings

    with warnings.catch_warnings(record=True) as said:  # a {split} pattern: nothing said about split names
        warnings.simplefilter("always")
        prep(tmp_path, data_path=str(d / "x-{split}.jsonl"))
    assert not any("named as splits" in str(w.message) for w in said)


def test_exact_copies_in_both_splits_are_counted_and_said(tmp_path):
    """The hash split goes by document id, so copies of one document land in train and val alike (6 of 24 val
    documents also in train, an audit). Not removed (the source is the user's), but counted in meta.json and said."""
    docs = make_docs(30) + [b"the same boilerplate licence text\n"] * 40
    p = tmp_path / "dups.jsonl"
    p.write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in docs))
    with pytest.warns(UserWarning, match=r"1 distinct document\(s\) .* both train and val as exact copies"):
        sh = prep(tmp_path, data_path=str(p), val_fraction=0.2)
    assert sh.meta["documents_in_both_splits"] == 1
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in make_docs(30)))
    assert prep(tmp_path, data_path=str(clean), val_fraction=0.2).meta["documents_in_both_splits"] == 0


def test_a_named_pipe_as_data_path_is_named_as_such(tmp_path):
    """A FIFO given as --data_path was reported as missing ("does not exist"): it exists, and is not a file."""
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is not a regular file"):
        prep(tmp_path, data_path=str(fifo))


def test_empty_documents_are_no_copies_in_both_splits(tmp_path):
    """Empty texts (and NUL-only ones) are written to neither split, but their one digest was counted as a document
    in both: a source of distinct documents was said to have copies in val."""
    import warnings as w

    with open(tmp_path / "e.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps({"text": "" if i % 2 else f"distinct document {i} " * 5}) + "\n")
    with w.catch_warnings():
        w.simplefilter("error")  # no "stand in both train and val" warning
        sh = prep(tmp_path, data_path=str(tmp_path / "e.jsonl"), val_fraction=0.1)
    assert sh.meta["documents_in_both_splits"] == 0
    assert len(docs_of(sh.train)) + len(docs_of(sh.val)) == 200


def test_a_blank_data_path_is_refused_not_read_as_the_builtin_dataset(tmp_path):
    """--data_path '' (an unset "$DATA") prepared and trained on the Python standard library without a word."""
    with pytest.raises(UserError, match=r"--data_path is blank"):
        prep(tmp_path, data_path="")


def test_save_to_disk_folders_under_a_split_pattern_or_a_folder_are_refused(tmp_path):
    """tiny-{split} over two save_to_disk folders (or a folder holding one) trained on their JSON metadata
    (dataset_info.json, state.json) and skipped the Arrow rows with a warning."""
    datasets = pytest.importorskip("datasets")
    for split in ("train", "val"):
        datasets.Dataset.from_dict({"text": [f"{split} story {i} " * 10 for i in range(20)]}).save_to_disk(
            str(tmp_path / f"tiny-{split}"))
    (tmp_path / "corp").mkdir()
    (tmp_path / "corp" / "notes.txt").write_text("some notes " * 20)
    datasets.Dataset.from_dict({"text": ["row " * 20] * 5}).save_to_disk(str(tmp_path / "corp" / "rows"))
    for path in (tmp_path / "tiny-{split}", tmp_path / "corp", tmp_path / "corp" / "*" / "*"):
        with pytest.raises(UserError, match="is a `datasets` save_to_disk folder"):
            prep(tmp_path, data_path=str(path))


def test_json_lines_named_json_with_another_field_name_the_field_not_read_as_text(tmp_path):
    """A .json of JSON Lines whose records lack --text_field was read as one text document (braces and keys trained
    on); a .jsonl or a .json array of the same records names the field."""
    p = tmp_path / "recs.json"
    p.write_text("".join(json.dumps({"content": f"record {i} " * 10}) + "\n" for i in range(20)))
    with pytest.raises(UserError, match=r"line 1 has no field 'text' \(fields: content\); pass --text_field"):
        with pytest.warns(UserWarning, match="read as JSON Lines"):
            prep(tmp_path, data_path=str(p))
    with pytest.warns(UserWarning, match="read as JSON Lines"):
        sh = prep(tmp_path, data_path=str(p), text_field="content")
    assert len(docs_of(sh.train)) + len(docs_of(sh.val)) == 20
    q = tmp_path / "one.json"  # a one-line object without the field stays text
    q.write_text(json.dumps({"name": "x", "n": 1}) + "\n")
    sh = prep(tmp_path, data_path=str(q))
    assert b'"name": "x"' in bytes(sh.train) + bytes(sh.val)


def test_a_parquet_file_with_a_column_datasets_cannot_type_is_read(tmp_path):
    """A valid file with a map column beside its text was refused as "check that it is a complete parquet file"
    (`datasets` has no type for maps); its text column is read, with the same doc ids."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    docs = [f"row {i} text " * 5 for i in range(30)]
    pq.write_table(pa.table({"text": docs, "meta": pa.array([[("k", i)] for i in range(30)],
                                                              type=pa.map_(pa.string(), pa.int32()))}),
                   tmp_path / "m.parquet")
    sh = prep(tmp_path, data_path=str(tmp_path / "m.parquet"), val_fraction=0.2)
    assert sorted(docs_of(sh.train) + docs_of(sh.val)) == sorted(d.encode() for d in docs)


@pytest.mark.parametrize("flag,dataset", [("builtin_bytes", "builtin"), ("fineweb_bytes", "fineweb")])
def test_a_size_cap_below_one_byte_names_its_flag(tmp_path, flag, dataset):
    """--builtin_bytes 0 said "contains no text (empty dataset); check --data_path / --text_field"."""
    with pytest.raises(UserError, match=rf"--{flag} 0 must be at least 1"):
        prep(tmp_path, dataset=dataset, **{flag: 0})


def test_a_data_path_of_non_utf8_bytes_is_prepared_under_a_strict_stdout(tmp_path):
    """`data: preparing local:/x/bad\\udcffname ...` to a strict UTF-8 stdout (en_US.UTF-8) was a UnicodeEncodeError
    traceback, exit 1."""
    import subprocess

    d = os.path.join(os.fsencode(tmp_path), b"bad\xffname")
    os.makedirs(d)
    with open(os.path.join(d, b"a.txt"), "wb") as f:
        f.write(b"some text to train on\n" * 100)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "ionllama.cli", "prepare", "--data_path", d,
                        "--data_dir", str(tmp_path / "c")], capture_output=True, env=env, timeout=300)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")[-500:]


def test_a_copy_moved_to_val_as_its_one_document_is_counted(tmp_path):
    """When no document hashes into val, the last train document is moved there ("at least one document"); that
    move came after the copies were counted, so a folder holding x.jsonl and its x.jsonl.xz (the val document's
    copy still in train) recorded documents_in_both_splits 0 and said nothing (an audit of the README)."""
    docs = [f"document {i}: some text of its own {i * 7}\n" * 3 for i in range(3)]
    docs.append(docs[0])  # the last document, the one moved to val, is a copy of the first
    p = tmp_path / "few.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with pytest.warns(UserWarning, match=r"1 distinct document\(s\) .* both train and val as exact copies"):
        sh = prep(tmp_path, data_path=str(p), val_fraction=0.01)
    assert docs_of(sh.val) == [docs[0].encode()]  # the fallback's move, not the hash, filled val
    assert sh.meta["documents_in_both_splits"] == 1
