"""Eval inputs the audits found mishandled: shard files (.npy/.bin) that are not bytes or cannot be read, language
files of one byte, parallel folders without english.txt, NaN (null) numbers in a results.json, and the report
CLI's flags."""
import pickle

import numpy as np
import pytest
import torch

from ionllama import create_model
from ionllama.errors import UserError
from ionllama.eval import benchmark as B
from ionllama.eval import report
from ionllama.eval.loading import read_eval_bytes
from ionllama.eval.multilingual import run_multilingual


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()  # tiny matmuls: a second thread only spin-waits (see test_benchmark.py)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny():
    return create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2).eval()


def test_npy_eval_data_that_is_not_bytes_is_refused(tmp_path):
    """int16 300 was cast to byte 44 and a float 65.5 to 65: bytes not in the file were scored, with no word."""
    np.save(tmp_path / "big.npy", np.array([65, 300, 66], dtype=np.int16))
    np.save(tmp_path / "neg.npy", np.array([65, -1], dtype=np.int64))
    np.save(tmp_path / "float.npy", np.array([65.5, 66.0], dtype=np.float32))
    for name, words in (("big.npy", r"\(int16\) holds values outside 0\.\.255; pass a uint8 \.npy"),
                        ("neg.npy", r"\(int64\) holds values outside 0\.\.255"),
                        ("float.npy", r"holds float32 values, not bytes; pass a uint8 \.npy")):
        with pytest.raises(UserError, match=words) as e:
            read_eval_bytes(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    # integers that are all bytes are still read (cast), and uint8 as before
    np.save(tmp_path / "ok.npy", np.array([0, 65, 255], dtype=np.int64))
    np.save(tmp_path / "u8.npy", np.array([1, 2, 3], dtype=np.uint8))
    got = read_eval_bytes(tmp_path / "ok.npy")
    assert got.dtype == np.uint8 and got.tolist() == [0, 65, 255]
    assert read_eval_bytes(tmp_path / "u8.npy").tolist() == [0, 1, 2, 3]  # DOC_SEP first, as before a text file
    # only the bytes read are checked: a value past max_bytes does not refuse the file
    assert read_eval_bytes(tmp_path / "big.npy", max_bytes=2).tolist() == [0, 65]


def test_unreadable_shard_eval_data_is_one_line(tmp_path, capsys):
    """An empty .bin, a pickled or corrupt .npy were ValueError tracebacks; a folder named x.bin an
    IsADirectoryError one (it is a folder of documents)."""
    (tmp_path / "empty.bin").write_bytes(b"")
    with open(tmp_path / "pickled.npy", "wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "garbage.npy").write_bytes(pickle.dumps([1, 2, 3]))
    (tmp_path / "zero.npy").write_bytes(b"")
    for name in ("empty.bin", "pickled.npy", "garbage.npy", "zero.npy"):
        with pytest.raises(UserError, match=r"cannot read eval data .*; pass a uint8 \.npy, a raw byte \.bin") as e:
            read_eval_bytes(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value) and "allow_pickle" not in str(e.value)
    folder = tmp_path / "x.bin"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"hello")
    assert bytes(read_eval_bytes(folder)) == b"\x00hello"
    # through the CLI: one `error:` line and exit 2 (a 1-byte .bin is now scored after DOC_SEP, as a 1-byte .txt)
    for name in ("empty.bin",):
        with pytest.raises(SystemExit) as e:
            B.main(["--model", "dense", "--size", "tiny", "--device", "cpu", "--eval_data", str(tmp_path / name),
                    "--output", str(tmp_path / "out" / "r.json"), "--skip", "tasks", "speed", "compression",
                    "multilingual", "plots"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), (name, err)


def test_one_byte_language_files_are_scored_and_empty_ones_listed(tmp_path):
    """Files under 2 bytes were dropped without a word, and --max_lang_bytes 1 gave an empty table; the separator
    byte before each file makes one byte scoreable."""
    d = tmp_path / "langs"
    d.mkdir()
    (d / "one.txt").write_bytes(b"x")
    (d / "long.txt").write_bytes(b"some longer text " * 4)
    (d / "zero.txt").write_bytes(b"")
    (d / "nuls.txt").write_bytes(b"\x00\x00")  # NUL bytes are removed (the separator): nothing is left
    model = _tiny()
    g = run_multilingual(model, [d], seq_len=16, batch_size=2, device="cpu")["groups"][0]
    assert set(g["languages"]) == {"one", "long"} and g["empty_files"] == ["nuls.txt", "zero.txt"]
    one = g["languages"]["one"]
    assert one["bytes"] == one["bytes_scored"] == 1 and np.isfinite(one["bpb"]) and one["bpb"] > 0
    g = run_multilingual(model, [d], seq_len=16, batch_size=2, device="cpu", max_lang_bytes=1)["groups"][0]
    assert set(g["languages"]) == {"one", "long"}
    assert all(r["bytes"] == r["bytes_scored"] == 1 for r in g["languages"].values())


def _results(ml: dict) -> dict:
    return {"schema_version": 1, "model": {"name": "dense", "size": "tiny", "params_total": 1}, "checkpoint": None,
            "device": {"name": "cpu", "type": "cpu", "torch": "2"}, "date": "2025-01-01", "commit": {"sha": "x"},
            "command": "ionllama bench", "metrics": {"multilingual": ml}}


def test_the_parallel_reference_is_recorded_and_named_in_the_table(tmp_path):
    """Without english.txt the ratios were against the first file, headed "bits vs english"."""
    d = tmp_path / "par"
    d.mkdir()
    (d / "PARALLEL").write_text("")
    (d / "de.txt").write_bytes(b"Alle Menschen sind frei und gleich " * 3)
    (d / "fr.txt").write_bytes(b"Tous les etres humains naissent libres " * 3)
    model = _tiny()
    ml = run_multilingual(model, [d], seq_len=16, batch_size=2, device="cpu")
    g = ml["groups"][0]
    assert g["reference"] == "de" and g["languages"]["de"]["total_bits_vs_english"] == pytest.approx(1.0)
    md = report.render_markdown(_results(ml))
    assert "| bits vs de |" in md and "bits vs english" not in md
    (d / "english.txt").write_bytes(b"All human beings are born free " * 3)
    ml = run_multilingual(model, [d], seq_len=16, batch_size=2, device="cpu")
    assert ml["groups"][0]["reference"] == "english" and "| bits vs english |" in report.render_markdown(_results(ml))


def test_null_numbers_in_results_render_as_dashes():
    """benchmark.py's _clean writes NaN as null: `None / 1000` and `None:.2f` were TypeError tracebacks."""
    rec = {"bytes": 10, "bpb": None, "bytes_per_patch": None, "total_bits": None, "total_bits_vs_english": None}
    ml = {"groups": [{"dir": "udhr", "parallel": True, "reference": "english", "languages": {"english": rec},
                      "empty_files": ["zero.txt"]}], "max_lang_bytes": 100, "bpe": {}}
    res = _results(ml)
    res["metrics"].update(
        speed={"forward_bytes_per_s": None, "batch_size": 1, "seq_len": 8, "amp": "none",
               "latency_ms": {"median": None, "input_bytes": 8}, "generation": {}},
        memory={"peak_rss_mb": None, "kind": "process peak RSS"},
        compression={"bytes_per_patch": None, "bytes": 10, "source": "x", "histogram": {"1": 10}})
    md = report.render_markdown(res)
    assert "| english | 10 | - | - | - | - |" in md, md
    assert "| latency | - |" in md and "| peak_rss_mb | - |" in md and "Mean - bytes/patch" in md
    assert "Empty, not scored: zero.txt." in md


def test_report_cli_flags_are_one_line_and_spelt_out(tmp_path, capsys):
    """Plain argparse printed usage + error (3 lines), and took --out x.md as --output x.md."""
    for argv in (["r.json", "--bogus"], [str(tmp_path / "r.json"), "--out", str(tmp_path / "x.md")]):
        with pytest.raises(SystemExit) as e:
            report.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "unrecognized arguments" in err[0], err
    assert not (tmp_path / "x.md").exists()


def test_empty_data_is_named_empty_whatever_its_dtype():
    """An empty list or float array is refused for its length, not as 'float64 values, not bytes' (an audit: the
    shared byte-value check ran before the length check)."""
    import numpy as np

    from ionllama import create_model
    from ionllama.errors import UserError
    from ionllama.eval.bpb import evaluate_bpb

    m = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
    for data in ([], np.array([], dtype=np.float32), b""):
        with pytest.raises(UserError, match=r"has 0 byte\(s\); it needs at least 2"):
            evaluate_bpb(m, data, 8, 2, "cpu")


def test_a_raw_bin_is_scored_from_its_first_byte_by_byte_and_bpe_models_alike(tmp_path):
    """A .bin / .npy not written by `ionllama prepare` (no leading DOC_SEP) was read as is: a byte model left its first
    byte unscored and a BPE model its whole first token (" the": 4 bytes), so the two rows scored different bytes,
    and neither scored what the same bytes as a .txt (or `ionllama experiment`'s --eval_data) score."""
    from ionllama.data.bpe import train_tokenizer
    from ionllama.eval.lm import run_lm

    raw = b" the cat and the dog and the end"
    (tmp_path / "raw.bin").write_bytes(raw)
    (tmp_path / "raw.txt").write_bytes(raw)
    np.save(tmp_path / "raw.npy", np.frombuffer(raw, dtype=np.uint8))
    bpe = train_tokenizer([raw] * 4, vocab_size=270)
    assert bpe.decode(bpe.encode(raw)[:1]) == b" the"  # a first token of several bytes
    torch.manual_seed(0)
    tok = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=bpe.vocab_size).eval()
    tok.set_tokenizer(bpe)
    byte = _tiny()
    for name in ("raw.bin", "raw.npy"):
        data = read_eval_bytes(tmp_path / name)
        assert bytes(data) == bytes(read_eval_bytes(tmp_path / "raw.txt")) == b"\x00" + raw, name
        assert run_lm(byte, data, 16, 2, "cpu")["bytes"] == run_lm(tok, data, 16, 2, "cpu")["bytes"] == len(raw)
    # a cap still counts the stream read, the separator included; a prepared shard (DOC_SEP first) is read as it is
    assert bytes(read_eval_bytes(tmp_path / "raw.bin", max_bytes=5)) == b"\x00 the"
    (tmp_path / "val.bin").write_bytes(b"\x00" + raw)
    assert bytes(read_eval_bytes(tmp_path / "val.bin", max_bytes=5)) == b"\x00 the"


def test_language_rows_pin_the_bytes_they_scored(tmp_path):
    """results.json named each language file only by its path as given (relative for the default folders): a rerun
    could not check it scored the same bytes, as it can for the LM section's data_sha256."""
    import hashlib

    d = tmp_path / "langs"
    d.mkdir()
    (d / "cut.txt").write_bytes(b"abc\x00def" * 10)
    g = run_multilingual(_tiny(), [d], seq_len=16, batch_size=2, device="cpu", max_lang_bytes=20)["groups"][0]
    rec = g["languages"]["cut"]
    assert rec["sha256"] == hashlib.sha256((b"abc\x00def" * 10)[:20].replace(b"\x00", b"")).hexdigest()


def test_training_curves_leave_the_entropy_models_val_scores_off_the_lm_curve():
    """A trainer run with entropy patching logs the entropy model's own val BPB in its entropy phase (phase "entropy",
    as val_bpb), then the full model's at the same step: bench's training-curve plot drew both as the run's one val
    line (8.03 at 0, 7.62 and 7.58 from the entropy model, 8.02 from the LM at the same bytes, then down), while the
    entropy phase's train losses were already left out as "not the LM's"."""
    from ionllama.eval.plots import curves

    recs = [{"step": 0, "phase": "init", "bytes_seen": 0, "val_bpb": 8.03},
            {"step": 2, "phase": "entropy", "bytes_seen": 256, "loss": 1.9, "bpb": 2.7},
            {"step": 4, "phase": "entropy", "bytes_seen": 512, "val_bpb": 2.6},
            {"step": 6, "phase": "calibrate", "bytes_seen": 768, "threshold": 1.5, "bytes_per_patch": 4.0},
            {"step": 6, "phase": "main", "bytes_seen": 768, "val_bpb": 8.02},
            {"step": 8, "phase": "main", "bytes_seen": 1024, "loss": 4.0, "bpb": 5.8},
            {"step": 8, "phase": "main", "bytes_seen": 1024, "val_bpb": 5.5}]
    c = curves(recs)
    assert c["val"] == [(0, 8.03), (768, 8.02), (1024, 5.5)]
    assert c["train"] == [(1024, 5.8)]


def test_language_files_of_one_stem_each_keep_their_row(tmp_path):
    """hello.c and hello.py (both language files) were keyed by their stem alone: the second one's row replaced the
    first's, so a file was scored and its result dropped without a word."""
    d = tmp_path / "code"
    d.mkdir()
    (d / "hello.c").write_bytes(b'int main(void) { puts("hello"); return 0; }\n')
    (d / "hello.py").write_bytes(b'print("hello")\n')
    (d / "russian.txt").write_bytes("Все люди рождаются свободными".encode())
    g = run_multilingual(_tiny(), [d], seq_len=16, batch_size=2, device="cpu")["groups"][0]
    assert set(g["languages"]) == {"hello.c", "hello.py", "russian"}, set(g["languages"])
    assert {r["file"] for r in g["languages"].values()} == {str(d / n) for n in ("hello.c", "hello.py", "russian.txt")}


@pytest.mark.parametrize("frozen_before", [False, True])
def test_the_speed_train_step_is_the_main_phase_one(monkeypatch, frozen_before):
    """run_speed's forward + backward trained the entropy model too (its backward and aux loss counted in the
    bytes/s and the peak memory), while the main phase, most of training, has it frozen. It is frozen for the
    measurement now, and the model's own setting is put back."""
    from ionllama.eval import speed

    m = create_model("tiny", d_model=32, n_layers=1, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=1,
                     d_entropy=16, n_entropy_layers=1, entropy_headdim=8, ngram_buckets=64, patching="entropy")
    m.freeze_entropy(frozen_before)
    seen = []
    real = speed._timed

    def spy(fn, device, warmup, iters):
        seen.append(m.entropy_model.training and not m._entropy_frozen)
        if not seen[-1] and any(p.requires_grad for p in m.entropy_model.parameters()):
            seen[-1] = "entropy params trainable"
        return real(fn, device, 0, 1)

    monkeypatch.setattr(speed, "_timed", spy)
    data = np.frombuffer(b"some bytes to time a step on. " * 40, dtype=np.uint8)
    res = speed.run_speed(m, data, "cpu", seq_len=32, batch_size=2, iters=1, warmup=0, gen_bytes=2,
                          gen_prompt_bytes=4)
    assert seen[1] is False  # the train step: the entropy model frozen, no trainable entropy parameter
    assert res["speed"]["train_step_phase"] == "main (entropy model frozen)"
    assert m._entropy_frozen is frozen_before
    assert all(p.requires_grad is not frozen_before for p in m.entropy_model.parameters())
