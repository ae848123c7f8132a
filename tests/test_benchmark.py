"""Benchmark suite end to end on tiny random checkpoints (dense and ionllama) and real text slices."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ionllama import create_model
from ionllama.data import tasks as T
from ionllama.errors import UserError
from ionllama.eval import benchmark as B
from ionllama.eval import lm as LM
from ionllama.eval.report import load_published, render_markdown
from ionllama.eval.stats import wilson_interval

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL = dict(d_model=64, n_layers=2, n_heads=2)  # 'tiny' shrunk further: the suite must run in seconds


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine the threads' spin-waits
    made these tests ~100x slower; one thread keeps them fast everywhere."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _text(rel: str, n: int) -> bytes:
    p = SHARED / rel
    if p.is_file():
        return p.read_bytes()[:n]
    return Path(os.__file__).read_bytes()[:n]  # stdlib text where ../shared/data is absent


def _save_trainer_checkpoint(model, path: Path, **train_args) -> Path:
    """The dict the trainer writes (ionllama/train/trainer.py state()), minus optimizer state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "ionllama-checkpoint-1", "model": model.state_dict(), "model_config": model.config.to_dict(),
                "step": 7, "bytes_seen": 7 * 512, "train_args": {"seq_len": 64, "batch_size": 4, **train_args},
                "data_position": {"path": str(path.parent / "no-shards-here")}}, path)
    with open(path.parent / "metrics.jsonl", "w") as f:
        for s in range(1, 8):
            f.write(json.dumps({"step": s, "phase": "main", "bytes_seen": 512 * s, "loss": 5.5 - 0.1 * s,
                                "bpb": 8 - 0.1 * s}) + "\n")
        f.write(json.dumps({"step": 7, "phase": "main", "bytes_seen": 3584, "val_bpb": 7.4, "val_loss": 5.1}) + "\n")
    return path


@pytest.fixture()
def workdir(tmp_path):
    (tmp_path / "eval.txt").write_bytes(_text("tinystories/tinystories-sample.txt", 1500))
    udhr = tmp_path / "udhr"
    udhr.mkdir()
    for lang in ("english", "french", "chinese"):
        (udhr / f"{lang}.txt").write_bytes(_text(f"multilingual/udhr/{lang}.txt", 400))
    return tmp_path


def _run(workdir, ckpt, out, *extra):
    argv = ["--checkpoint", str(ckpt), "--eval_data", str(workdir / "eval.txt"), "--output", str(out),
            "--multilingual_dir", str(workdir / "udhr"), "--n_tasks", "3", "--max_digits", "2", "--seq_len", "64",
            "--batch_size", "4", "--gen_bytes", "8", "--speed_iters", "1", "--compression_bytes", "1024",
            "--bpe_vocab", "300", "--device", "cpu", *extra]
    assert B.main(argv, prog="python benchmark.py") == 0
    return json.loads(Path(out).read_text())


def _check_schema(res: dict, out: Path):
    for key in ("schema_version", "model", "checkpoint", "config", "device", "date", "commit", "command", "metrics"):
        assert key in res, key
    assert res["schema_version"] == 1 and res["date"].startswith("20")
    assert res["command"].startswith("python benchmark.py --checkpoint")
    m = res["metrics"]
    assert set(m) >= {"lm", "tasks", "speed", "memory", "compression", "multilingual"}
    assert math.isfinite(m["lm"]["bpb"]) and m["lm"]["bpb"] > 0 and m["lm"]["bytes"] == 1500  # 0x00 + 1500 text bytes, all text bytes scored
    assert m["tasks"]["label"] == "zero_shot" and m["tasks"]["split"] == "test"
    cells = [v for v in m["tasks"]["per_task"].values()]
    cells += [d for v in m["tasks"]["per_task"].values() for d in v.get("by_digits", {}).values()]
    for c in cells:
        lo, hi = c["ci95"]
        assert c["n"] > 0 and 0 <= lo <= c["accuracy"] <= hi <= 1
    assert set(m["tasks"]["per_task"]["add"]["by_digits"]) == {"1", "2"}
    # every scored example in a file of its own beside results.json (results.json keeps a few a cell)
    from ionllama.eval.task_eval import read_outputs
    rows = read_outputs(out.parent / res["files"]["task_outputs"])
    assert res["files"]["task_outputs"] == out.with_suffix("").name + "_task_outputs.jsonl.gz"
    assert len(rows) == sum(c["n"] for c in m["tasks"]["per_task"].values()) and "outputs" not in m["tasks"]
    mb = m["tasks"]["per_task"]["count"]["majority_baseline"]  # the floor of always answering the commonest count
    answers = [a for _, a in T.make_examples("count", "test", 3, seed=1234)]
    top = max(answers.count(a) for a in answers)
    assert mb["accuracy"] == pytest.approx(top / 3)
    assert mb["answer"] is None if top == 1 else answers.count(mb["answer"].encode()) == top
    assert m["speed"]["forward_bytes_per_s"] > 0 and m["speed"]["latency_ms"]["median"] > 0
    assert m["memory"]["peak_rss_mb"] > 0
    hist = {int(k): v for k, v in m["compression"]["histogram"].items()}
    # the histogram accounts for every byte it was computed on
    assert sum(k * v for k, v in hist.items()) == m["compression"]["bytes"]
    langs = m["multilingual"]["groups"][0]["languages"]
    assert set(langs) == {"english", "french", "chinese"} and m["multilingual"]["groups"][0]["parallel"]
    # every byte of each file is scored, as a document after the separator (the first byte was left out)
    assert all(r["bytes_scored"] == r["bytes"] for r in langs.values()), langs
    for r in langs.values():
        assert math.isfinite(r["bpb"]) and r["bpe_tokens"] > 0
        assert r["total_bits"] == pytest.approx(r["bpb"] * r["bytes"])
    assert "trained by the benchmark" in m["multilingual"]["bpe"]["source"]
    for name in ("results.json", "results.md", "results_curves.png", "results_languages.png", "results_patches.png"):
        f = out.parent / name
        assert f.is_file() and f.stat().st_size > 0, name
    md = (out.parent / "results.md").read_text()
    assert "## Tasks: zero_shot" in md and "## Published figures (not measured here)" in md


def test_full_suite_dense(workdir):
    ckpt = _save_trainer_checkpoint(create_model("tiny", model="dense", **SMALL), workdir / "run" / "best.pt")
    out = workdir / "bench" / "results.json"
    res = _run(workdir, ckpt, out)
    _check_schema(res, out)
    assert res["model"]["name"] == "dense" and res["metrics"]["compression"]["bytes_per_patch"] == 1.0
    assert "plot entropy_sample" in res["skipped"]  # dense models have no entropy
    # the test split the benchmark scored is disjoint from the training words
    assert not set(T.split_words("test")) & set(T.split_words("train"))
    # a later run that skips sections does not write over the full results (a new user's report) ...
    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:
        B.main(["--checkpoint", str(ckpt), "--output", str(out), "--device", "cpu", "--skip", "lm", "tasks", "speed",
                "compression", "multilingual", "plots"])
    assert e.value.code == 2 and out.read_bytes() == before
    # ... unless asked to
    res = _run(workdir, ckpt, out, "--skip", "tasks", "speed", "compression", "multilingual", "plots", "--overwrite")
    assert "tasks" not in res["metrics"] and "lm" in res["metrics"]


def test_full_suite_ionllama_with_patches_and_task_training(workdir):
    model = create_model("tiny", model="ionllama", d_local=32, d_entropy=32, **SMALL)
    with torch.no_grad():  # an uncalibrated model starts a patch at every byte; give it real patches
        x = torch.frombuffer(bytearray(_text("tinystories/tinystories-sample.txt", 256)), dtype=torch.uint8)
        ent = model.entropy_model(x.long()[None])["entropy"]
        model.entropy_threshold.fill_(float(ent.median()))
    ckpt = _save_trainer_checkpoint(model, workdir / "run2" / "best.pt", task_mix=0.25)
    out = workdir / "bench2" / "results.json"
    res = _run(workdir, ckpt, out, "--skip", "multilingual", "speed")
    m = res["metrics"]
    assert m["tasks"]["label"] == "in_format" and res["checkpoint"]["trained_on_tasks"]
    assert m["compression"]["bytes_per_patch"] > 1.2 and len(m["compression"]["histogram"]) > 1
    hist = {int(k): v for k, v in m["compression"]["histogram"].items()}
    assert sum(k * v for k, v in hist.items()) == m["compression"]["bytes"]
    assert (out.parent / "results_entropy.png").stat().st_size > 0
    assert "multilingual" not in m and "memory" in m
    assert "in_format" in (out.parent / "results.md").read_text()


def test_a_random_init_run_scores_the_same_model_each_time(workdir):
    """Without --checkpoint, create_model ran unseeded: the same command scored another random model each run
    (BPB 8.0948, then 8.0334) and results.json held nothing to repeat it by. --init_seed (default 0) seeds it."""
    def bpb(*extra):
        out = workdir / f"r{len(list(workdir.glob('r*')))}" / "results.json"
        B.main(["--model", "dense", "--size", "tiny", "--eval_data", str(workdir / "eval.txt"), "--output", str(out),
                "--max_eval_bytes", "300", "--seq_len", "64", "--batch_size", "4", "--device", "cpu", "--skip",
                "tasks", "speed", "compression", "multilingual", "plots", *extra])
        res = json.loads(out.read_text())
        return res["metrics"]["lm"]["bpb"], res["settings"]["init_seed"]

    first, again, other = bpb(), bpb(), bpb("--init_seed", "3")
    assert first == again and first[1] == 0 and other[1] == 3 and other[0] != first[0]


def test_bad_inputs_exit_with_one_line(workdir, capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--checkpoint", str(workdir / "missing.pt")])
    assert e.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    ckpt = _save_trainer_checkpoint(create_model("tiny", model="dense", **SMALL), workdir / "run" / "best.pt")
    with pytest.raises(SystemExit) as e:  # no shards on this machine and no --eval_data
        B.main(["--checkpoint", str(ckpt), "--output", str(workdir / "r.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--eval_data" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:  # a refused run leaves no empty --output folder behind
        B.main(["--checkpoint", str(ckpt), "--eval_data", str(workdir / "nope.txt"), "--output",
                str(workdir / "new" / "r.json")])
    assert e.value.code == 2 and not (workdir / "new").exists()
    (workdir / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        B.main(["--checkpoint", str(workdir / "bad.pt"), "--eval_data", str(workdir / "eval.txt")])
    assert e.value.code == 2


def test_more_bad_inputs_are_one_line_before_any_work(workdir, capsys):
    """The bench's other mistakes (the CLI audit of the twenty-eighth session found each as a traceback, or as
    silently accepted): a directory, a device, an empty name or an unwritable folder as --output, zero counts, a
    missing --published, undecodable files."""
    ckpt = _save_trainer_checkpoint(create_model("tiny", model="dense", **SMALL), workdir / "run" / "best.pt")
    (workdir / "adir").mkdir()
    (workdir / "bad.txt").write_bytes(b"\xff\xfe abc")
    (workdir / "bad.jsonl.xz").write_bytes(b"hi")  # named .xz, not xz data
    base = ["--checkpoint", str(ckpt), "--device", "cpu", "--eval_data", str(workdir / "eval.txt")]
    cases = [(["--output", str(workdir / "adir")], "is a directory"),
             (["--output", ""], "--output is empty"),
             (["--output", "/dev/null"], "not a regular file"),
             (["--output", "/proc/ionllama-r.json"], "cannot write results under /proc"),
             (["--speed_iters", "0"], "--speed_iters must be at least 1"),
             (["--gen_batch", "0"], "--gen_batch must be at least 1"),
             (["--compression_bytes", "0"], "--compression_bytes must be at least 1"),
             (["--task_shots", "-1"], "--task_shots must be at least 0"),
             (["--published", str(workdir / "nope.json")], "no such file"),
             (["--published", str(workdir / "bad.txt")], "is not valid JSON"),
             (["--baselines", str(workdir / "bad.txt")], "is not valid JSON"),
             (["--amp", "foo"], "invalid choice"),
             # the .md report goes beside the JSON: the same name overwrote the JSON with it (an audit)
             (["--output", str(workdir / "kept" / "report.md")], "names the JSON results"),
             (["--device", "mps"], "MPS is not available"),
             (["--skip", "nope"], "invalid choice")]
    out = workdir / "kept" / "results.json"
    out.parent.mkdir()
    out.write_text("{}")
    for extra, words in cases:
        with pytest.raises(SystemExit) as e:
            B.main(base + ["--output", str(out)] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], (extra, err)
    # a corrupt .xz, and a .gz with a valid header but bad deflate data (a zlib.error, which is no OSError)
    (workdir / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbagegarbage")
    for bad in ("bad.jsonl.xz", "bad.jsonl.gz"):
        with pytest.raises(SystemExit) as e:
            B.main(["--checkpoint", str(ckpt), "--device", "cpu", "--eval_data", str(workdir / bad),
                    "--output", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "cannot read" in err[0] and bad in err[0], err
    assert out.read_text() == "{}"  # nothing written over the earlier results


def test_a_model_or_size_other_than_the_checkpoints_is_refused(workdir, capsys):
    """`--model mamba` with a dense checkpoint scored the dense model and exit 0 (a mismatched --size was refused):
    now one line as well; the checkpoint's own model and size, or none given, pass on to the next check."""
    ckpt = _save_trainer_checkpoint(create_model("tiny", model="dense", **SMALL), workdir / "run" / "best.pt")
    base = ["--checkpoint", str(ckpt), "--device", "cpu", "--output", str(workdir / "r.json")]
    for extra, words in [(["--model", "mamba"], "--model mamba but the checkpoint holds a 'tiny' dense model"),
                         (["--model", "ionllama"], "--model ionllama but the checkpoint holds"),
                         (["--size", "small"], "--size small but the checkpoint holds"),
                         (["--model", "dense", "--size", "tiny"], "--eval_data"),  # no val data: the next check
                         ([], "--eval_data")]:
        with pytest.raises(SystemExit) as e:
            B.main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], (extra, err)
    assert not (workdir / "r.json").exists()


def test_bad_multilingual_dir_or_runs_fail_before_the_checkpoint_is_loaded(workdir, capsys, monkeypatch):
    """A typo in --multilingual_dir or --runs used to fail only after the whole LM and task eval had run (and
    nothing of it was written)."""
    monkeypatch.setattr(B, "load_checkpoint", lambda *a, **k: pytest.fail("work started before the flags were checked"))
    (workdir / "adir").mkdir()
    out = workdir / "kept" / "results.json"
    for extra, words in [(["--multilingual_dir", str(workdir / "nodir")], "is not a directory"),
                         (["--runs", str(workdir / "adir")], "no metrics.jsonl at")]:
        with pytest.raises(SystemExit) as e:
            B.main(["--checkpoint", "x.pt", "--device", "cpu", "--output", str(out)] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], (extra, err)
    assert not out.parent.exists()  # nothing written


def test_lm_fallback_matches_harness_evaluator():
    bpb = pytest.importorskip("ionllama.eval.bpb")
    torch.manual_seed(0)
    model = create_model("tiny", model="dense", **SMALL).eval()
    data = np.frombuffer(_text("tinystories/tinystories-sample.txt", 300), dtype=np.uint8)
    a = LM.fallback_evaluate_bpb(model, data, 64, 3, "cpu")
    b = bpb.evaluate_bpb(model, data, 64, 3, "cpu")
    assert a["bytes"] == b["bytes"] == 299
    assert a["bpb"] == pytest.approx(b["bpb"], rel=1e-5)
    # fewer bytes than --seq_len: the record says the window they were scored in (it said the 100,000 asked for)
    r = LM.run_lm(model, data, 100_000, 3, "cpu")
    assert (r["seq_len"], r["seq_len_requested"], r["bytes"]) == (299, 100_000, 299)
    assert r["bpb"] == pytest.approx(LM.run_lm(model, data, 299, 3, "cpu")["bpb"])
    assert "seq_len_requested" not in LM.run_lm(model, data, 64, 3, "cpu")


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 100) == pytest.approx((0.7222, 0.8749), abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.15 < hi < 0.17
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_published_figures_need_citation_and_dataset(tmp_path):
    p = tmp_path / "published.json"
    p.write_text(json.dumps({"entries": [{"model": "X", "metric": "bpb", "value": 1.0, "dataset": "PG19 test"}]}))
    with pytest.raises(UserError, match="citation"):
        load_published(p)
    good = {"model": "MambaByte-353M", "metric": "bpb", "value": 0.93, "dataset": "PG19 test",
            "citation": {"paper": "Example et al. 2099", "table": "Table 9"}}
    p.write_text(json.dumps({"entries": [good]}))
    entries = load_published(p)
    res = {"schema_version": 1, "model": {"name": "dense", "size": "tiny", "params_total": 1}, "checkpoint": None,
           "device": {"name": "cpu", "type": "cpu", "torch": "x"}, "date": "2026-11-25", "commit": {"sha": "abc"},
           "command": "x", "metrics": {}}
    md = render_markdown(res, published=entries)
    measured, published = md.split("## Published figures (not measured here)")
    assert "MambaByte-353M" in published and "Table 9" in published and "MambaByte" not in measured


def test_tasks_only_checkpoint_skips_text_metrics_and_labels_in_format(workdir):
    ckpt = _save_trainer_checkpoint(create_model("tiny", model="dense", **SMALL), workdir / "run3" / "best.pt",
                                    dataset="tasks")
    out = workdir / "bench3" / "results.json"
    argv = ["--checkpoint", str(ckpt), "--output", str(out), "--n_tasks", "2", "--max_digits", "1", "--device", "cpu",
            "--skip", "speed", "multilingual", "plots"]
    assert B.main(argv) == 0
    res = json.loads(out.read_text())
    assert "lm" not in res["metrics"] and "--dataset tasks" in res["skipped"]["lm"]
    assert res["metrics"]["tasks"]["label"] == "in_format"
    assert res["command"].startswith("ionllama bench --checkpoint")


@pytest.mark.parametrize("kind", ["bpe", "mamba"])
def test_suite_runs_on_the_baselines(workdir, kind):
    """Any registered model: the token-level BPE baseline (seq_len in tokens, BPB over bytes) and MambaByte."""
    if kind == "bpe":
        from ionllama.data.bpe import train_tokenizer

        txt = _text("tinystories/tinystories-sample.txt", 8000)
        bpe = train_tokenizer([txt[i:i + 1000] for i in range(0, len(txt), 1000)], vocab_size=320)
        model = create_model("tiny", model="bpe", vocab_size=bpe.vocab_size, **SMALL)
        model.set_tokenizer(bpe)
    else:
        model = create_model("tiny", model="mamba", d_model=64, n_layers=2)
    ckpt = _save_trainer_checkpoint(model, workdir / f"run-{kind}" / "best.pt")
    out = workdir / f"bench-{kind}" / "results.json"
    res = _run(workdir, ckpt, out, "--n_tasks", "2", "--max_digits", "1", "--skip", "plots")
    m = res["metrics"]
    assert math.isfinite(m["lm"]["bpb"]) and m["lm"]["bpb"] > 0
    g = m["speed"]["generation"]
    assert m["speed"]["forward_bytes_per_s"] > 0 and g["max_new_bytes"] == 8
    assert (g["bytes_per_s"] or 0) > 0 or g["stopped_early"]  # a random model may emit DOC_SEP at once
    for rec in m["tasks"]["per_task"].values():
        assert rec["n"] > 0 and rec["ci95"][0] <= rec["accuracy"] <= rec["ci95"][1]
    if kind == "bpe":
        assert "evaluate_token_bpb" in m["lm"]["method"] and m["compression"]["bytes_per_patch"] > 1.3
        assert m["multilingual"]["bpe"]["source"] == "the model's own tokenizer"
    else:
        assert m["compression"]["bytes_per_patch"] == 1.0


def test_default_multilingual_data_is_found_from_any_folder(tmp_path, monkeypatch):
    """The default language folders were looked up from the working folder only: run from elsewhere, the benchmark
    skipped the section (noted in results.md alone) although the data sat beside the checkout."""
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (tmp_path / "shared" / "data" / "multilingual" / "udhr").mkdir(parents=True)
    repo.mkdir()
    elsewhere.mkdir()
    monkeypatch.setattr(B, "REPO_ROOT", repo)
    monkeypatch.chdir(elsewhere)
    found = B.default_multilingual_dirs()
    assert [d.resolve() for d in found] == [(tmp_path / "shared" / "data" / "multilingual" / d).resolve()
                                           for d in ("udhr", ".")]
    monkeypatch.chdir(repo)  # from the checkout itself the relative default is found, and written as given
    assert found[0].resolve() == B.default_multilingual_dirs()[0].resolve()
    assert not B.default_multilingual_dirs()[0].is_absolute()
    bare = tmp_path / "a" / "b"  # no ../shared/data beside it
    bare.mkdir(parents=True)
    monkeypatch.setattr(B, "REPO_ROOT", bare)
    monkeypatch.chdir(bare)
    assert B.default_multilingual_dirs() == []


def test_skipped_sections_are_said_on_the_console(workdir, capsys):
    torch.manual_seed(0)
    ckpt = _save_trainer_checkpoint(create_model("tiny", model="dense", **SMALL), workdir / "run" / "final.pt")
    (workdir / "run" / "metrics.jsonl").unlink()  # no curve to plot: the plots section is skipped
    _run(workdir, ckpt, workdir / "out" / "results.json", "--skip", "tasks", "speed", "compression", "multilingual")
    out = capsys.readouterr().out
    assert "skipped plot training_curves: no metrics.jsonl" in out, out


def test_a_phase_one_checkpoint_is_flagged_as_an_untrained_main_model(workdir, capsys):
    """A checkpoint written while only the entropy model trained (phase 1) was benchmarked like any other: its BPB
    (about 8) read as the method's. Now the console and results.md say the main model is at its initialisation."""
    torch.manual_seed(0)
    ckpt = _save_trainer_checkpoint(create_model("tiny", **SMALL, d_local=32, d_entropy=16), workdir / "r" / "step_3.pt")
    raw = torch.load(ckpt, weights_only=True)
    torch.save({**raw, "phase": "entropy"}, ckpt)
    out = workdir / "o" / "results.json"
    res = _run(workdir, ckpt, out, "--skip", "tasks", "speed", "compression", "multilingual", "plots")
    assert res["checkpoint"]["phase"] == "entropy"
    assert "only the entropy model has trained" in capsys.readouterr().err
    assert "the main model is at its initialisation" in out.with_suffix(".md").read_text()
    torch.save({**raw, "phase": "main"}, ckpt)
    res = _run(workdir, ckpt, out, "--skip", "tasks", "speed", "compression", "multilingual", "plots", "--overwrite")
    assert res["checkpoint"]["phase"] == "main" and "initialisation" not in capsys.readouterr().err


def test_eval_bytes_are_the_files_bytes_and_the_trainers_count_and_are_pinned(workdir):
    """Three reproducibility gaps (a new user's audit): a text file was decoded with errors="replace", so invalid
    UTF-8 was scored as U+FFFD bytes not in the file; --max_eval_bytes N scored N - 1 bytes where the trainer's
    --eval_bytes N scores N; and results.json named the data and weights only by the paths as typed."""
    import hashlib

    from ionllama.eval.loading import read_eval_bytes
    from ionllama.eval.bpb import evaluate_bpb

    raw = b"plain text \xff\xfe\x80 then more \xc3 text " * 20
    (workdir / "bad.txt").write_bytes(raw)
    got = read_eval_bytes(workdir / "bad.txt")
    assert got.tobytes() == b"\x00" + raw  # the file's own bytes after the document separator
    torch.manual_seed(0)
    model = create_model("tiny", model="dense", **SMALL)
    ckpt = _save_trainer_checkpoint(model, workdir / "run" / "final.pt")
    res = _run(workdir, ckpt, workdir / "o" / "results.json", "--eval_data", str(workdir / "bad.txt"),
               "--max_eval_bytes", "300", "--skip", "tasks", "speed", "compression", "multilingual", "plots")
    lm = res["metrics"]["lm"]
    assert lm["bytes"] == 300
    scored = got[:301]
    assert lm["data_sha256"] == hashlib.sha256(scored.tobytes()).hexdigest()
    assert "not the file" in lm["data_sha256_of"]  # a reader would hash the file and find another value
    assert lm["bpb"] == pytest.approx(evaluate_bpb(model.eval(), scored, 64, 4, "cpu")["bpb"], rel=1e-6)
    assert lm["data_abs"] == str((workdir / "bad.txt").resolve())
    assert res["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_measured_rows_say_bytes_scored_and_window():
    """--baselines put rows of other byte counts and windows (bytes or tokens) side by side with nothing saying so."""
    from ionllama.eval.report import measured_rows

    def res(name, scored, seq_len):
        return {"model": {"name": name, "size": "tiny", "params_total": 1}, "device": {"name": "cpu"},
                "metrics": {"lm": {"data": "ev.txt", "bytes": scored, "seq_len": seq_len, "bpb": 5.0}}}

    table = "\n".join(measured_rows([res("dense", 299, 32), res("bpe", 1999, 128)]))
    assert "| bytes scored | window |" in table
    assert "| 299 | 32 bytes |" in table and "| 1,999 | 128 tokens |" in table


def test_a_safetensors_export_says_what_it_lacks(workdir, capsys):
    """An export has weights and config only: its default window was taken silently (the same weights scored 0.01
    apart from final.pt), and without --eval_data it was told its val split "is not on this machine"."""
    from ionllama.train.checkpoint import export_safetensors

    torch.manual_seed(0)
    st = export_safetensors(create_model("tiny", model="dense", **SMALL), workdir / "m.safetensors")
    _run(workdir, st, workdir / "o" / "results.json", "--skip", "tasks", "speed", "compression", "multilingual",
         "plots", "--seq_len", "64")
    assert "records no training window" not in capsys.readouterr().err  # --seq_len given: nothing to say
    with pytest.raises(SystemExit) as e:
        B.main(["--checkpoint", str(st), "--device", "cpu", "--output", str(workdir / "o2" / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "records no training data" in err[0], err
    assert B.main(["--checkpoint", str(st), "--eval_data", str(workdir / "eval.txt"), "--device", "cpu",
                   "--output", str(workdir / "o3" / "r.json"), "--skip", "tasks", "speed", "compression",
                   "multilingual", "plots"]) == 0
    assert "records no training window" in capsys.readouterr().err


def test_a_users_own_files_at_the_output_are_not_replaced(workdir, capsys):
    """results.md beside --output, and an --output that is not a results file, were replaced without a word."""
    torch.manual_seed(0)
    ckpt = _save_trainer_checkpoint(create_model("tiny", model="dense", **SMALL), workdir / "run" / "final.pt")
    skip = ["--skip", "tasks", "speed", "compression", "multilingual", "plots"]
    for name, content in (("results.md", "# My paper notes\nIMPORTANT\n"), ("results.json", '{"mine": 1}')):
        d = workdir / name.replace(".", "_")
        d.mkdir()
        (d / name).write_text(content)
        with pytest.raises(SystemExit) as e:
            _run(workdir, ckpt, d / "results.json", *skip)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "a file of yours?" in err[0], err
        assert (d / name).read_text() == content
        _run(workdir, ckpt, d / "results.json", *skip, "--overwrite")  # said so: replaced
        assert (d / name).read_text() != content
    _run(workdir, ckpt, workdir / "again" / "results.json", *skip)  # its own report is replaced by a rerun
    _run(workdir, ckpt, workdir / "again" / "results.json", *skip)


def test_a_failed_results_write_keeps_the_earlier_results(workdir, capsys, monkeypatch):
    """results.json was written in place: a full disk (or ^C) while writing truncated the earlier results that a
    --skip rerun merges into it, and the error was a traceback. Now the write goes through a temp file: the earlier
    file stays whole, no temp file is left, and the error is one line."""
    import errno

    from ionllama import fsutil

    torch.manual_seed(0)
    ckpt = _save_trainer_checkpoint(create_model("tiny", model="dense", **SMALL), workdir / "run" / "final.pt")
    skip = ["--skip", "tasks", "speed", "compression", "multilingual", "plots"]
    out = workdir / "o" / "results.json"
    _run(workdir, ckpt, out, *skip)
    before = out.read_bytes()

    def full_disk(tmp, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil, "fsync_replace", full_disk)
    with pytest.raises(SystemExit) as e:
        _run(workdir, ckpt, out, *skip, "--overwrite")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "No space left on device" in err[-1] and "kept as it was" in err[-1], err
    assert out.read_bytes() == before and json.loads(before)["metrics"]["lm"]["bpb"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json", "results.md"]

    # the table of `python -m ionllama.eval.report`: written the same way, and an unwritable --output is one line
    from ionllama.eval import report

    monkeypatch.undo()
    table = workdir / "table.md"
    assert report.main([str(out), "--output", str(table)]) == 0 and "| " in table.read_text()
    with pytest.raises(SystemExit) as e:
        report.main([str(out), "--output", str(workdir / "no" / "such" / "t.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "cannot write --output" in err[0], err


def test_multilingual_bpe_tokens_count_the_files_own_bytes(tmp_path):
    """BPE tokens per language were counted on the text decoded with "replace": a character cut by max_lang_bytes
    (or an invalid byte) became three bytes of U+FFFD, and 2,048 bytes of Chinese counted 2,050 tokens, more tokens
    than bytes from a byte-level BPE (an audit). The count is now of the file's own (first max_lang_bytes) bytes."""
    from ionllama.data.bpe import ByteBPE
    from ionllama.eval.multilingual import run_multilingual, train_bpe_on

    d = tmp_path / "udhr"
    d.mkdir()
    zh = "人人生而自由，在尊严和权利上一律平等。".encode() * 20
    (d / "chinese.txt").write_bytes(zh)
    (d / "broken.txt").write_bytes(b"abc \xff\xfe def " * 30)
    tok, _ = train_bpe_on(np.frombuffer(b"\x00" + zh + b" hello world " * 50, dtype=np.uint8), vocab_size=300)
    model = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2).eval()
    cap = 101  # 33 three-byte characters and the first byte of the next
    r = run_multilingual(model, [d], seq_len=32, batch_size=4, device="cpu", max_lang_bytes=cap, bpe=tok)
    langs = r["groups"][0]["languages"]
    for name, content in (("chinese", zh), ("broken", (d / "broken.txt").read_bytes())):
        raw = content[:cap]
        rec = langs[name]
        assert rec["bytes"] == cap and rec["bpe_tokens"] <= cap, rec
        assert rec["bpe_tokens"] == len(ByteBPE(tok).encode(raw)), name


def test_results_files_without_the_fields_the_tables_read_are_one_line(tmp_path, capsys):
    """A results.json with a non-numeric schema_version, no model or a null metrics passed load_results and then
    failed as a KeyError / TypeError / AttributeError traceback in `python -m ionllama.eval.report` and
    `bench --baselines` (an audit)."""
    from ionllama.eval import report

    good = {"schema_version": 1, "model": {"name": "dense", "size": "tiny"}, "metrics": {}}
    bad = [{"schema_version": 1, "metrics": {}}, {**good, "schema_version": "1"}, {**good, "metrics": None},
           {**good, "model": {"name": "dense"}}, {**good, "schema_version": True}]
    for i, r in enumerate(bad + [good]):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps(r))
        if r is good:
            assert report.main([str(p)]) == 0
            continue
        with pytest.raises(SystemExit) as e:
            report.main([str(p)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and "is not a benchmark results.json" in err, (r, err)


def test_measured_rows_name_the_task_split():
    """A --task_split val row stood under "accuracies on the held-out test split" (an audit): the split is now a
    column of its own."""
    from ionllama.eval.report import measured_rows

    def res(split):
        return {"model": {"name": "dense", "size": "tiny", "params_total": 1}, "device": {"name": "cpu"},
                "metrics": {"tasks": {"label": "in_format", "split": split, "per_task": {}}}}

    table = "\n".join(measured_rows([res("val"), res("test")]))
    assert "held-out test split" not in table and "| tasks label | tasks split |" in table
    assert "| in_format | val |" in table and "| in_format | test |" in table


def test_a_datasets_save_to_disk_folder_as_eval_data_is_refused_naming_the_export(tmp_path):
    """Training reads a save_to_disk folder's rows; bench --eval_data read it as plain files and scored its JSON
    metadata (479 bytes of it) with no word (an audit). Now it is one line saying how to export the split."""
    from ionllama.eval.loading import read_eval_bytes

    for kind, files in (("dict", ["dataset_dict.json"]), ("dataset", ["state.json", "dataset_info.json"])):
        d = tmp_path / kind
        d.mkdir()
        for f in files:
            (d / f).write_text('{"splits": ["train", "validation"]}')
        with pytest.raises(UserError, match=r"is a `datasets` save_to_disk folder, which is not read here; export"):
            read_eval_bytes(d)


def test_the_commit_is_the_checkouts_not_an_enclosing_repositorys(tmp_path, monkeypatch):
    """An installed copy (site-packages of a venv inside another git repository) recorded that repository's HEAD as
    the commit of the code that produced the results."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git on this machine")

    def git(*a):
        return subprocess.run(["git", *a], cwd=tmp_path, capture_output=True, text=True, check=True)

    git("init", "-q")
    git("-c", "user.email=a@b", "-c", "user.name=x", "-c", "commit.gpgsign=false", "commit", "-q", "--allow-empty",
        "-m", "someone else's")
    outer = git("rev-parse", "HEAD").stdout.strip()
    site = tmp_path / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    monkeypatch.setattr(B, "REPO_ROOT", site)
    assert B.git_commit()["sha"] != outer
    assert B.git_commit() == {"sha": "unknown"}
    monkeypatch.setattr(B, "REPO_ROOT", tmp_path)  # the checkout itself: its HEAD
    assert B.git_commit() == {"sha": outer, "dirty": False}
