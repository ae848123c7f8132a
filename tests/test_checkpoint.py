"""Checkpoint files: atomic writes, safe loading, one-line errors, RNG round trip, safetensors export."""
import pickle
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from ionllama import create_model
from ionllama.errors import UserError
from ionllama.train import checkpoint as C


def tiny():
    return create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)


def state_of(model, step=3):
    return {"format": C.CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model.config.to_dict(),
            "step": step, "phase": "main", "rng": C.capture_rng_state()}


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    m = tiny()
    path = tmp_path / "latest.pt"
    C.save_checkpoint(state_of(m, step=1), path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")  # save_checkpoint hands torch.save its open temp file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        C.save_checkpoint(state_of(m, step=2), path)
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # and no temp file is left
    monkeypatch.undo()
    C.copy_checkpoint(path, tmp_path / "best.pt")
    assert C.load_checkpoint(tmp_path / "best.pt")["step"] == 1


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the hand-made pickle
def test_damaged_or_foreign_files_give_one_line_errors(tmp_path):
    m = tiny()
    good = C.save_checkpoint(state_of(m), tmp_path / "good.pt")
    raw = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "pickle.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    C.export_safetensors(m, tmp_path / "final.safetensors")
    for name, pattern in [("truncated.pt", "corrupt"), ("garbage.pt", "corrupt"), ("empty.pt", "corrupt"),
                          ("foreign.pt", "not an ionllama checkpoint"), ("pickle.pt", "corrupt"),
                          ("missing.pt", "not found"),
                          # it said "no model / model_config" of a file that has both, as weights and metadata
                          ("final.safetensors", "a safetensors export .weights only.: it loads for generate")]:
        with pytest.raises(UserError, match=pattern) as e:
            C.load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)
    # a run folder given for its checkpoint: the error names the file to pass
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest.pt").write_bytes(raw)
    with pytest.raises(UserError, match="for this run folder's latest, pass .*latest.pt"):
        C.load_model(tmp_path / "run")
    # the benchmark's reader of the same files says what the trainer says, without torch's weights_only essay
    # (it read as advice to load with weights_only=False) or its zip-reader internals
    from ionllama.eval.loading import read_checkpoint_file

    for name in ("garbage.pt", "pickle.pt", "truncated.pt", "empty.pt"):
        with pytest.raises(UserError, match="is not a readable checkpoint") as e:
            read_checkpoint_file(tmp_path / name)
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value) and "miniz" not in str(e.value)


def test_first_line_cuts_between_words():
    from ionllama.errors import first_line

    e = RuntimeError("\n   " + "word " * 60 + "\nsecond line")
    assert first_line(e, 42) == ("word " * 8).strip() + " ..." and first_line(ValueError()) == "ValueError"
    assert first_line(OSError("short one")) == "short one"


def test_weights_that_do_not_fit_the_model_are_a_user_error(tmp_path):
    m = tiny()
    st = state_of(m)
    st["model"]["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(UserError, match="does not match"):
        C.load_model_state(m, st["model"], "x.pt")


def test_rng_state_round_trip():
    C.restore_rng_state(C.capture_rng_state())  # restorable as captured
    st = C.capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    C.restore_rng_state(st)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_rng_state_survives_weights_only_loading(tmp_path):
    def draws():
        return random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()

    np.random.standard_normal()  # an odd count of normals leaves numpy's cached gaussian set: it must survive too
    C.save_checkpoint(state_of(tiny()), tmp_path / "c.pt")
    expected = draws()  # what the run would have drawn next
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert draws() != expected
    ck = C.load_checkpoint(tmp_path / "c.pt")  # weights_only=True inside
    C.restore_rng_state(ck["rng"])
    assert draws() == expected


def test_safetensors_export_and_load_model(tmp_path):
    m = tiny().eval()
    x = torch.randint(0, 256, (2, 16))
    C.export_safetensors(m, tmp_path / "m.safetensors", metadata={"step": 7})
    C.save_checkpoint(state_of(m), tmp_path / "m.pt")
    for p in ("m.safetensors", "m.pt"):
        loaded = C.load_model(tmp_path / p)
        assert loaded.config == m.config and not loaded.training
        assert torch.equal(loaded(x)["logits"], m(x)["logits"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError):
        C.load_model(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="not found"):
        C.load_model(tmp_path / "nope.pt")


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE stands in for a full disk")
def test_a_full_disk_while_saving_is_an_oserror_and_leaves_no_temp_file(tmp_path):
    """torch.save(path) reported a full disk as a RuntimeError ("[enforce fail at inline_container.cc] unexpected
    pos") and safetensors as its own SafetensorError: the trainer's one-line handler (OSError) missed both and the
    run ended in a traceback. A file-size limit stands in for the full disk, in a process of its own."""
    code = f"""
import resource, signal, torch
from pathlib import Path
from ionllama import create_model
from ionllama.train.checkpoint import save_checkpoint, export_safetensors
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is then EFBIG, not a killed process
m = create_model("tiny", model="dense", d_model=64, n_layers=2, n_heads=2)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
for save in (lambda: save_checkpoint({{"model": m.state_dict()}}, Path(r"{tmp_path}") / "latest.pt"),
             lambda: export_safetensors(m, Path(r"{tmp_path}") / "final.safetensors")):
    try:
        save()
        print("saved")
    except OSError as e:
        print("OSError")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["OSError", "OSError"], r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial file, no temp file


def test_a_state_that_does_not_match_names_its_keys():
    """The message was torch's first line, "Error(s) in loading state_dict for DenseByteTransformer:", which names
    no key; now the missing / unexpected keys (or, for a shape, torch's next line)."""
    m = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
    state = m.state_dict()
    gone = sorted(state)[0]
    short = {k: v for k, v in state.items() if k != gone}
    with pytest.raises(UserError, match=f"missing {gone}"):
        C.load_model_state(m, {**short, "extra.weight": torch.zeros(1)}, "x.pt")
    with pytest.raises(UserError, match="unexpected extra.weight"):
        C.load_model_state(m, {**state, "extra.weight": torch.zeros(1)}, "x.pt")
    with pytest.raises(UserError, match=f"size mismatch for {gone}"):
        C.load_model_state(m, {**state, gone: torch.zeros(3, 3, 3)}, "x.pt")


def test_flipped_bytes_in_a_checkpoint_are_refused_not_loaded(tmp_path, capsys):
    """torch.load does not check the zip's CRC-32s: 64 flipped bytes in the weights loaded (and resumed, and
    generated) as silently wrong weights. Now they are one line naming the damaged record, from every loader."""
    from ionllama.generation.cli import main as generate_main

    m = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
    path = tmp_path / "final.pt"
    C.save_checkpoint({"model": m.state_dict(), "model_config": m.config.to_dict(), "step": 1}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:  # flip bytes inside the largest record's data
        info = max(z.infolist(), key=lambda i: i.file_size)
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    raw[at:at + 64] = bytes(b ^ 255 for b in raw[at:at + 64])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    assert C.load_checkpoint(path)["step"] == 1
    with pytest.raises(UserError, match=r"flipped.pt is damaged \(its record .* fails its checksum\)"):
        C.load_checkpoint(bad)
    with pytest.raises(SystemExit) as e:
        generate_main(["--checkpoint", str(bad), "--prompt", "a", "--max_new_bytes", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "is damaged" in err[0], err


def test_a_damaged_record_header_is_one_line_not_a_zlib_traceback(tmp_path):
    """A flipped compression-method field (stored -> deflated, 2 bytes of a record's headers) made the CRC pass
    raise zlib.error, a type no loader catches: `ionllama train --resume` ended in a traceback (a fuzz's find)."""
    import struct

    from ionllama.train.distributed import TRAIN_STATE_FILE, load_train_state

    m = tiny()
    path = C.save_checkpoint(state_of(m), tmp_path / "latest.pt")
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    name = info.filename.encode()
    raw[info.header_offset + 8:info.header_offset + 10] = struct.pack("<H", zipfile.ZIP_DEFLATED)  # local header
    cd = raw.find(b"PK\x01\x02")
    while raw[cd + 46:cd + 46 + len(name)] != name:  # its central directory entry
        cd = raw.find(b"PK\x01\x02", cd + 4)
    raw[cd + 10:cd + 12] = struct.pack("<H", zipfile.ZIP_DEFLATED)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="bad.pt is damaged"):
        C.load_checkpoint(bad)
    dcp = tmp_path / "x.dcp"  # a sharded checkpoint's train state goes through the same check
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"")
    (dcp / TRAIN_STATE_FILE).write_bytes(bytes(raw))
    with pytest.raises(UserError, match="damaged"):
        load_train_state(dcp)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    """fsutil.atomic_write, which the checkpoints' naming now shares with bench, generate --output, eval.report and
    the experiment's JSON files: text as UTF-8, bytes as given; a failure (here the rename) keeps the earlier file
    and removes the temp file."""
    import os

    from ionllama import fsutil

    p = tmp_path / "r.json"
    fsutil.atomic_write(p, "é\n")
    assert p.read_bytes() == "é\n".encode()
    fsutil.atomic_write(p, b"\xff\x00")
    assert p.read_bytes() == b"\xff\x00"
    assert fsutil.temp_path(p).name == f".r.json.tmp-{os.getpid()}"

    def boom(tmp, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(fsutil, "fsync_replace", boom)
    with pytest.raises(KeyboardInterrupt):
        fsutil.atomic_write(p, "new")
    assert p.read_bytes() == b"\xff\x00" and [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_goes_through_a_symlink_and_refuses_a_pipe(tmp_path):
    """The rename over a symlink replaced the link with a file (its target untouched), and one over a FIFO or a
    device replaced it with a regular file: generate --output was mended alone, bench / eval.report / checkpoints
    not. fsutil writes a link's target now and refuses a pipe with an OSError, leaving it in place."""
    import os

    from ionllama.fsutil import atomic_write

    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to("target.json")
    atomic_write(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write(fifo, "x")
    assert fifo.exists() and not fifo.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "pipe", "target.json"]  # no temp file left
