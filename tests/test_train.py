"""Trainer end to end on a tiny dense model (CPU, fp32): loss falls, checkpoints, exact resume,
gradient accumulation, mixed precision paths, task data, SIGTERM."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ionllama.train.checkpoint import load_checkpoint, load_model
from ionllama.train.cli import main
from ionllama.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "dense", "--d_model", "32", "--n_layers", "1", "--n_heads", "2"]


def write_corpus(path: Path, n_docs: int = 120) -> Path:
    """Repetitive English-like documents: a tiny model learns them within a few dozen steps."""
    words = "the cat sat on a mat and the dog ran to the red ball while birds sang".split()
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(words[(i + j) % len(words)] for j in range(40)) + ".\n"
            f.write(json.dumps({"text": text * 3}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


def train(tmp_path, corpus, *extra, run_name="r"):
    argv = TINY + ["--data_path", str(corpus), "--data_dir", str(tmp_path / "cache"), "--save_dir", str(tmp_path / "runs"),
                   "--run_name", run_name, "--seq_len", "32", "--batch_size", "4", "--log_interval", "1",
                   "--eval_interval", "5", "--sample_bytes", "0", "--device", "cpu", "--val_fraction", "0.1",
                   "--lr", "3e-3", "--warmup_steps", "2", "--eval_batch_size", "64"] + list(extra)
    assert main(argv) == 0
    return tmp_path / "runs" / run_name


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["phase"] != "init" and "loss" in r]


def test_loss_falls_and_all_checkpoint_kinds_are_written(tmp_path, corpus, capsys):
    run = train(tmp_path, corpus, "--max_steps", "40", "--eval_interval", "10", "--save_interval", "20",
                "--sample_bytes", "24")
    recs = read_metrics(run / "metrics.jsonl")
    evals = [r for r in recs if "val_bpb" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert evals[0]["val_bpb"] > 7.5  # untrained: about 8 bits per byte
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"] - 3.0  # learned the repetitive text
    assert all(evals[i + 1]["val_bpb"] < evals[i]["val_bpb"] for i in range(3))
    tr = [r for r in recs if "loss" in r]
    for key in ("step", "phase", "bytes_seen", "train_time_s", "loss", "bpb", "lr", "bytes_per_s", "bytes_per_patch"):
        assert key in tr[-1], key
    assert tr[-1]["bytes_seen"] == 40 * 4 * 32 and tr[-1]["bytes_per_patch"] == 1.0
    # where each window's time went: the host's share per step and the wait for the device at the log point
    for prev, r in zip([{"step": 0}] + tr, tr):
        n = r["step"] - prev["step"]  # steps in this window (--log_interval 1, evaluations excluded)
        window_ms = 1e3 * n * 4 * 32 / r["bytes_per_s"]
        assert n >= 1 and 0 < r["host_ms_per_step"] * n <= window_ms * 1.001 + 0.01 and r["gpu_wait_ms"] >= 0
    assert abs(tr[-1]["lr"] - 3e-4) < 1e-6  # cosine ends at 10 % of the peak
    for name in ("best.pt", "latest.pt", "final.pt", "step_20.pt", "step_40.pt", "final.safetensors", "sample.txt"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*tmp*"))  # atomic writes leave no temp files
    ck = load_checkpoint(run / "best.pt")
    assert ck["step"] == 40 and ck["phase"] == "main" and ck["model_config"]["d_model"] == 32
    assert abs(ck["best_val_bpb"] - evals[-1]["val_bpb"]) < 1e-9
    assert ck["train_args"]["batch_size"] == 4 and ck["data_position"]["step"] == 40
    out = capsys.readouterr().out
    assert "global batch: 4 x 1 accum x 1 procs" in out and "--- sample" in out
    m = load_model(run / "final.safetensors")
    assert m.config.d_model == 32 and not m.training


def test_resume_continues_exactly(tmp_path, corpus):
    straight = train(tmp_path, corpus, "--max_steps", "20", run_name="straight")
    half = train(tmp_path, corpus, "--max_steps", "20", "--stop_at", "10", run_name="split")
    assert load_checkpoint(half / "latest.pt")["step"] == 10
    assert not (half / "final.pt").exists()
    train(tmp_path, corpus, "--max_steps", "20", "--resume", "auto", run_name="split")
    a, b = train_losses(straight), train_losses(half)
    assert [s for s, _ in a] == list(range(1, 21)) and a == b  # identical, not just close
    va = [r["val_bpb"] for r in read_metrics(straight / "metrics.jsonl") if "val_bpb" in r]
    vb = [r["val_bpb"] for r in read_metrics(half / "metrics.jsonl") if "val_bpb" in r]
    assert va == vb
    sa, sb = load_checkpoint(straight / "final.pt")["model"], load_checkpoint(half / "final.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_weight_decay_given_on_resume_is_used_and_an_entropy_checkpoint_is_refused(tmp_path, corpus, capsys):
    """The optimizer's saved param groups brought the checkpoint's weight decay back: "resuming with --weight_decay
    0.5" was said and recorded, and the run went on at 0.1, bit for bit. --entropy_checkpoint on a resume was said
    too and never loaded (the resumed weights hold the entropy model): now refused in one line."""
    straight = train(tmp_path, corpus, "--max_steps", "12", "--weight_decay", "0.1", run_name="straight")
    half = train(tmp_path, corpus, "--max_steps", "12", "--weight_decay", "0.1", "--stop_at", "6", run_name="half")
    train(tmp_path, corpus, "--max_steps", "12", "--resume", "auto", "--weight_decay", "0.5", run_name="half")
    assert "resuming with --weight_decay 0.5 (the checkpoint used 0.1)" in capsys.readouterr().out
    a, b = dict(train_losses(straight)), dict(train_losses(half))
    assert all(a[s] == b[s] for s in range(1, 7)) and all(a[s] != b[s] for s in range(8, 13)), (a, b)
    other = tmp_path / "entropy.pt"
    other.write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        train(tmp_path, corpus, "--max_steps", "14", "--resume", "auto", "--entropy_checkpoint", str(other),
              run_name="half")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "on a resume: the entropy model's weights come from" in err[0], err


def test_resuming_an_older_step_whose_best_went_aside_writes_a_new_best(tmp_path, corpus):
    """best.pt past step N moves aside with the abandoned branch, but the best score came back from step_N.pt: a
    new branch that never beat it (here a far too large lr) ended with no best.pt and a 'best val bpb' whose
    weights were gone."""
    flags = ("--max_steps", "12", "--eval_interval", "3", "--save_interval", "4")
    run = train(tmp_path, corpus, *flags)
    assert load_checkpoint(run / "best.pt")["step"] > 4
    train(tmp_path, corpus, *flags, "--resume", str(run / "step_4.pt"), "--lr", "1")
    assert (run / "best.pt").is_file() and load_checkpoint(run / "best.pt")["step"] > 4
    assert (next(run.glob("before-resume-step4")) / "best.pt").is_file()  # the old branch's best, kept aside


@pytest.mark.parametrize("flags", [("--stop_at", "2"), ("--max_steps", "3"), ("--max_train_time", "0.0001")])
def test_a_refused_resume_of_an_older_step_moves_nothing_aside(tmp_path, corpus, capsys, flags):
    """The branch past step_4.pt was moved aside (final.pt, best.pt, final.safetensors) and metrics.jsonl cut back
    at load, before the run was refused for having nothing to train: one mistyped flag emptied the run folder."""
    base = ("--max_steps", "8", "--eval_interval", "4", "--save_interval", "4")
    run = train(tmp_path, corpus, *base)
    before = sorted(p.name for p in run.iterdir())
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as e:
        train(tmp_path, corpus, *base, "--resume", str(run / "step_4.pt"), *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "nothing to train" in err[-1], err
    assert sorted(p.name for p in run.iterdir()) == before and (run / "metrics.jsonl").read_bytes() == metrics


def test_a_full_disk_at_the_start_says_so_and_leaves_no_probe_file(tmp_path, monkeypatch):
    """With the disk full, the write probe's file was created, its write failed, and it stayed; the error said
    "choose a writable folder" for a folder that was fine."""
    import errno
    from pathlib import Path as P

    from ionllama.errors import UserError
    from ionllama.train.trainer import ensure_writable

    real = P.write_bytes

    def full(self, data):
        if self.name.startswith(".write-test-"):
            self.touch()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(P, "write_bytes", full)
    with pytest.raises(UserError, match="no space left on the disk of --save_dir .*; free some, then run again"):
        ensure_writable(tmp_path / "runs" / "r", str(tmp_path / "runs"))
    assert list((tmp_path / "runs" / "r").iterdir()) == []


def test_resume_from_path_takes_the_checkpoint_settings(tmp_path, corpus, capsys):
    run = train(tmp_path, corpus, "--max_steps", "12", "--stop_at", "6", "--batch_size", "2")
    # only --resume: model, data and batch settings come from the checkpoint; a run folder means its latest.pt
    assert main(["--resume", str(run), "--stop_at", "9", "--sample_bytes", "0", "--device", "cpu"]) == 0
    assert load_checkpoint(run / "latest.pt")["step"] == 9
    assert main(["--resume", str(run / "latest.pt"), "--sample_bytes", "0", "--device", "cpu"]) == 0
    ck = load_checkpoint(run / "final.pt")
    assert ck["step"] == 12 and ck["train_args"]["batch_size"] == 2 and ck["model_config"]["d_model"] == 32


def test_stop_hint_finds_the_run_and_resume_notes_name_what_the_checkpoint_used(tmp_path, corpus, capsys):
    """The hint printed at a stop left out a non-default --save_dir: typed as printed, it started a new default run
    elsewhere. A flag given on resume that the first run left to the size's default was noted as "the checkpoint
    used None" (a new user's report); now the model's value, and no note when the values agree."""
    run = train(tmp_path, corpus, "--max_steps", "12", "--stop_at", "6")
    out = capsys.readouterr().out
    assert "stopped at step 6 (--stop_at 6)" in out, out  # the reason named, not "--stop_at / --max_train_time"
    hint = out.split("continue with ")[1].splitlines()[0]
    # --data_dir too: it is per invocation, and without it the data was prepared again into ./data_cache
    assert hint == f"--resume auto --save_dir {tmp_path / 'runs'} --run_name r --data_dir {tmp_path / 'cache'}", hint
    ck = load_checkpoint(run / "latest.pt")
    drop = ck["model_config"]["dropout"]
    assert drop is not None and ck["train_args"]["dropout"] is None  # left to the size's default
    assert main([*shlex.split(hint), "--dropout", str(drop), "--sample_bytes", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: resuming with --dropout" not in out, out  # the same value: nothing to note
    assert load_checkpoint(run / "final.pt")["step"] == 12  # the hint found the run; no new one started
    assert "starting a new run" not in out and "preparing" not in out  # nor prepared the data again
    # resumed from a checkpoint path, the run lives next to it: the hint names that folder, not the default one
    assert main(["--resume", str(run / "step_6.pt"), "--data_dir", str(tmp_path / "cache"), "--stop_at", "8",
                 "--sample_bytes", "0", "--device", "cpu"]) == 0
    hint = capsys.readouterr().out.split("continue with ")[1].splitlines()[0]
    assert hint.startswith(f"--resume auto --save_dir {run.parent} --run_name r "), hint


def test_resume_on_other_data_says_so(tmp_path, corpus, capsys):
    """Edited data (same size) under a resumed run went on without a word (a new user's report): now a note line
    names what changed; the same data resumes quietly."""
    other = tmp_path / "edited.jsonl"
    other.write_text(corpus.read_text().replace("cat", "cot"))
    train(tmp_path, corpus, "--max_steps", "8", "--stop_at", "4")
    capsys.readouterr()
    train(tmp_path, corpus, "--max_steps", "8", "--stop_at", "6", "--resume", "auto")
    assert "other data" not in capsys.readouterr().out
    train(tmp_path, other, "--max_steps", "8", "--resume", "auto")
    notes = [m for m in capsys.readouterr().out.splitlines() if "other data" in m]
    assert len(notes) == 1 and notes[0].startswith("note: resuming on other data") and "train and val" in notes[0]


def test_min_lr_ratio_sets_where_the_cosine_ends(tmp_path, corpus):
    """--min_lr_ratio 0 decays the learning rate to zero at the last step; the default ends at 10 %."""
    def lrs(run):
        return [r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r]

    zero = lrs(train(tmp_path, corpus, "--max_steps", "6", "--min_lr_ratio", "0", run_name="zero"))
    default = lrs(train(tmp_path, corpus, "--max_steps", "6", run_name="default"))
    assert zero[-1] == pytest.approx(0.0, abs=1e-12) and default[-1] == pytest.approx(3e-4)
    assert zero[1] == default[1] == pytest.approx(3e-3)  # the warmup's end: the peak either way
    assert len(zero) == 6 and all(z < d for z, d in zip(zero[3:], default[3:]))  # below the default after the peak


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, corpus):
    big = train(tmp_path, corpus, "--max_steps", "5", "--batch_size", "8", run_name="big")
    acc = train(tmp_path, corpus, "--max_steps", "5", "--batch_size", "4", "--grad_accum", "2", run_name="acc")
    a, b = train_losses(big), train_losses(acc)
    assert len(a) == 5
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < 1e-4 * la


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_run(tmp_path, corpus, precision):
    run = train(tmp_path, corpus, "--max_steps", "3", "--mixed_precision", precision)
    ck = load_checkpoint(run / "final.pt")
    assert (ck["scaler"] is not None) == (precision == "fp16")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_task_mix_and_task_only_training(tmp_path, corpus):
    run = train(tmp_path, corpus, "--max_steps", "3", "--task_mix", "0.5", "--seq_len", "96", run_name="mix")
    assert load_checkpoint(run / "final.pt")["train_args"]["task_mix"] == 0.5
    run = train(tmp_path, corpus, "--max_steps", "4", "--dataset", "tasks", "--data_path", "", "--seq_len", "96",
                "--eval_interval", "2", run_name="tasks")
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_bpb" in r]
    assert len(evals) == 3 and all(r["val_bytes"] > 0 for r in evals)
    # the task val set does not move with --eval_batch_size (8 batches of it: 136 / 610 / 2,433 bytes scored at 1 /
    # 4 / 16), which a resume takes from its own command line
    first = {}
    for bs in (1, 5, 64):
        run = train(tmp_path, corpus, "--max_steps", "1", "--dataset", "tasks", "--data_path", "", "--seq_len", "96",
                    "--eval_batch_size", str(bs), run_name=f"tasks-bs{bs}")
        first[bs] = next(r for r in read_metrics(run / "metrics.jsonl") if "val_bpb" in r)
    assert len({r["val_bytes"] for r in first.values()}) == 1, first
    assert max(r["val_bpb"] for r in first.values()) - min(r["val_bpb"] for r in first.values()) < 1e-5, first


def test_wandb_without_the_package_warns_and_keeps_logging(tmp_path, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.warns(UserWarning, match="wandb is not installed"):
        run = train(tmp_path, corpus, "--max_steps", "2", "--wandb")
    assert len(read_metrics(run / "metrics.jsonl")) >= 3


@pytest.mark.slow  # two subprocesses (~10-25 s on 2 cores)
def test_sigterm_saves_latest_and_the_run_resumes(tmp_path, corpus):
    save = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "train_cloud.py"), *TINY, "--data_path", str(corpus), "--data_dir",
           str(tmp_path / "cache"), "--save_dir", str(save), "--run_name", "sig", "--seq_len", "32", "--batch_size", "4",
           "--max_steps", "100000", "--eval_interval", "100000", "--log_interval", "1", "--sample_bytes", "0",
           "--device", "cpu", "--val_fraction", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    metrics = save / "sig" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and len(read_metrics(metrics)) >= 4):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    ck = load_checkpoint(save / "sig" / "latest.pt")
    assert 3 <= ck["step"] < 100000
    logged = max(r["step"] for r in read_metrics(metrics))
    assert logged == ck["step"]  # nothing trained after the last saved step
    rc = subprocess.run(cmd + ["--resume", "auto", "--stop_at", str(ck["step"] + 2)], env=env, capture_output=True,
                        text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr
    assert load_checkpoint(save / "sig" / "latest.pt")["step"] == ck["step"] + 2


def test_profile_trainer_step_script_times_each_variant(tmp_path, corpus):
    """benchmarks/profile_trainer_step.py (used on the GPU to find where the runner loses speed) runs the real
    Trainer's step and its variants; on CPU there is nothing to synchronise with."""
    out = tmp_path / "p.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "profile_trainer_step.py"), "--steps", "2", "--warmup", "1",
           "--profile_steps", "1", "--out", str(out), "--", *TINY, "--data_path", str(corpus), "--data_dir",
           str(tmp_path / "cache"), "--seq_len", "32", "--batch_size", "4", "--device", "cpu", "--val_fraction", "0.1"]
    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["variants"]) == {"trainer", "staged_data", "no_clip", "bench_step"}
    for v in res["variants"].values():
        assert v["step_ms"] > 0 and v["bytes_per_s"] == pytest.approx(res["bytes_per_step"] / (v["step_ms"] / 1e3), rel=0.02)
    assert res["bytes_per_step"] == 4 * 32 and res["syncs_in_one_step"] == []
    assert res["profile"]["wall_ms_per_step"] > 0 and res["profile"]["top_host_ops_ms_per_step"]


def test_checkpoint_finds_its_val_split_from_another_folder(tmp_path, corpus, monkeypatch):
    """The checkpoint recorded the shard folder as given (a relative --data_dir), so the benchmark run from any other
    folder said the val split was "not on this machine" while it was; it is recorded absolute now."""
    from ionllama.eval.loading import default_eval_path, load_checkpoint as load_for_bench

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    argv = TINY + ["--data_path", str(corpus), "--data_dir", "cache", "--save_dir", "runs", "--run_name", "r",
                   "--seq_len", "32", "--batch_size", "4", "--max_steps", "2", "--eval_interval", "100",
                   "--sample_bytes", "0", "--device", "cpu", "--val_fraction", "0.1"]
    assert main(argv) == 0
    monkeypatch.chdir(tmp_path / "b")
    ck = load_for_bench(tmp_path / "a" / "runs" / "r" / "final.pt")
    val = default_eval_path(ck)
    assert val.is_file() and val.is_relative_to(tmp_path / "a" / "cache"), val


def test_a_time_budget_stop_names_the_budget(tmp_path, corpus, capsys):
    """The experiment's arms end on --max_train_time, their normal end: the phase line said "steps 0..1000000000"
    and the stop "(--stop_at / --max_train_time)"; both now name the budget."""
    train(tmp_path, corpus, "--max_steps", "1000000", "--max_train_time", "0.01")
    out = capsys.readouterr().out
    assert "steps 0..1000000 (or until --max_train_time 0.01 s)" in out, out
    assert "(--max_train_time 0.01 s reached)" in out, out
    # resumed, the budget counts the run's earlier training: one already spent is refused, not one step and a rewrite
    d = tmp_path / "runs" / "r"
    before = (d / "latest.pt").read_bytes()
    trained = load_checkpoint(d / "latest.pt")["train_time_s"]
    with pytest.raises(SystemExit) as e:
        train(tmp_path, corpus, "--max_steps", "1000000", "--max_train_time", "0.01", "--resume", "auto")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"has trained {trained:.1f} s already" in err[0], err
    assert (d / "latest.pt").read_bytes() == before


def test_ctrl_c_after_the_final_save_is_not_caught_by_the_training_handler(tmp_path, corpus, monkeypatch):
    """A new user's report: Ctrl-C during --benchmark_after printed "finishing this step and saving latest.pt" and the
    benchmark ran on; the training handler stayed installed after the last save. The sample (and the benchmark) now
    run under the caller's handler."""
    import ionllama.train.trainer as T

    seen = []

    def fake_sample(*a, **k):
        seen.append(signal.getsignal(signal.SIGINT))
        return b"x"

    monkeypatch.setattr(T, "sample_bytes", fake_sample)
    outer = signal.getsignal(signal.SIGINT)
    train(tmp_path, corpus, "--max_steps", "2", "--sample_bytes", "4")
    assert seen == [outer] and signal.getsignal(signal.SIGINT) == outer


def test_a_bpe_run_samples_from_a_val_document(tmp_path, corpus):
    """Its self.val holds token ids, and the sample prompt was cut from them as if they were text: always ''."""
    d = train(tmp_path, corpus, "--model", "bpe", "--vocab_size", "300", "--d_model", "32", "--n_layers", "1",
              "--n_heads", "2", "--max_steps", "2", "--sample_bytes", "8", run_name="bpe")
    sample = (d / "sample.txt").read_text(encoding="utf-8")
    from ionllama.data.shards import open_shards

    val = bytes(open_shards(next(p.parent for p in (tmp_path / "cache").rglob("val.bin"))).val[:4096])
    prompt = val[1:].split(b"\x00")[0][:16].decode("utf-8", "replace")
    assert len(prompt) >= 8 and sample.startswith(prompt), (prompt, sample)
    recs = read_metrics(d / "metrics.jsonl")  # the train loss is per token there; the record says so
    assert all(r.get("loss_unit") == "nats/token" for r in recs if "loss" in r)


def test_a_failed_final_export_is_one_line_naming_the_re_export(tmp_path, corpus, monkeypatch, capsys):
    """A full disk at the final .safetensors export was a SafetensorError traceback; final.pt was saved, so a resume
    says "finished" and only Python can export it: the one line gives that command, and the command works."""
    from ionllama.train import checkpoint as ckpt_io

    real = ckpt_io.export_safetensors
    monkeypatch.setattr(ckpt_io, "export_safetensors",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(SystemExit) as e:
        train(tmp_path, corpus, "--max_steps", "3")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "final.safetensors (No space left on device)" in err[0], err
    run = tmp_path / "runs" / "r"
    assert (run / "final.pt").is_file() and not (run / "final.safetensors").exists()
    monkeypatch.setattr(ckpt_io, "export_safetensors", real)
    subprocess.run([sys.executable, "-c", shlex.split(err[0].split("then ", 1)[1])[2]], check=True, cwd=REPO)
    assert load_model(run / "final.safetensors").state_dict().keys() == load_model(run / "final.pt").state_dict().keys()


def test_a_save_killed_mid_write_leaves_no_temp_file_for_good(tmp_path, corpus):
    """SIGKILL during a save skips its clean-up; the temp file (GBs for big models) stayed in the run folder for
    ever. The next run in that folder removes temp files whose process is gone, and keeps a live one's."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / f".latest.pt.tmp-{dead.pid}").write_bytes(b"partial")
    (run / f".best.pt.tmp-{os.getppid()}").write_bytes(b"another run's save in progress")
    train(tmp_path, corpus, "--max_steps", "2")
    assert not (run / f".latest.pt.tmp-{dead.pid}").exists()
    assert (run / f".best.pt.tmp-{os.getppid()}").exists()


def test_a_signal_during_an_evaluation_stops_at_that_step(tmp_path, corpus, monkeypatch):
    """The stop flag was read before the evaluation: a SIGTERM arriving during it trained one more step, with its
    own save (and evaluation), out of a preemption's grace period."""
    from ionllama.train.trainer import Trainer

    real = Trainer.evaluate

    def evaluate(self, phase):
        res = real(self, phase)
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler only sets its flag
        return res

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    with pytest.raises(SystemExit) as e:
        train(tmp_path, corpus, "--max_steps", "20")
    assert e.value.code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "runs" / "r" / "latest.pt")["step"] == 5


def test_resume_auto_picks_the_run_of_this_data_among_runs_of_one_default_name(tmp_path, corpus, capsys):
    """en/train.txt and de/train.txt both get the default run name "...-train" (the second in "...-train-2"); a
    resume of the first with the same command picked the newest folder, the second's, and trained it on the
    first's data. It now resumes the folder whose run read this --data_path."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "docs.jsonl").write_text("".join(json.dumps({"text": f"entirely other words {i} " * 20}) + "\n"
                                              for i in range(60)))
    base = TINY + ["--data_dir", str(tmp_path / "cache"), "--save_dir", str(tmp_path / "runs"), "--seq_len", "32",
                   "--batch_size", "4", "--eval_interval", "5", "--sample_bytes", "0", "--device", "cpu",
                   "--val_fraction", "0.1", "--max_steps", "20"]
    assert main(base + ["--data_path", str(corpus), "--stop_at", "5"]) == 0
    assert main(base + ["--data_path", str(other / "docs.jsonl"), "--stop_at", "5"]) == 0  # newer, in "...-2"
    first, second = sorted((tmp_path / "runs").iterdir())
    assert second.name == first.name + "-2"
    before = load_checkpoint(second / "latest.pt")["step"]
    assert main(base + ["--data_path", str(corpus), "--resume", "auto", "--stop_at", "10"]) == 0
    assert load_checkpoint(first / "latest.pt")["step"] == 10  # this data's run went on
    assert load_checkpoint(second / "latest.pt")["step"] == before == 5  # the other was left as it was
    assert "resuming on other data" not in capsys.readouterr().out


def test_a_signalled_rank_exits_after_the_closing_barrier(monkeypatch):
    """Under torchrun, SIGTERM to one rank: the ranks agree to stop and save at the same step, but the signalled one
    left with SystemExit before the process group's closing barrier, so the others failed in theirs with a gloo
    traceback (an audit). Now its run returns, train() tears down with the barrier like the others, then exits 143."""
    from types import SimpleNamespace

    import ionllama.train.trainer as tr

    calls = []

    class Run:
        def __init__(self, *a, **k):
            pass

        def run(self):
            calls.append("run")
            return {"run_dir": "x", "step": 5, "stopped": True, "exit_code": 143}

    monkeypatch.setattr(tr.distributed, "setup", lambda device: tr.distributed.DistContext())
    monkeypatch.setattr(tr.distributed, "teardown", lambda finished=False: calls.append(("teardown", finished)))
    monkeypatch.setattr(tr, "Trainer", Run)
    with pytest.raises(SystemExit) as e:
        tr.train(SimpleNamespace(device="cpu", save_dir="/nonexistent-save-dir"))
    assert e.value.code == 143 and calls == ["run", ("teardown", True)]


def test_readme_names_every_setting_a_resume_does_not_take():
    """The README said a resume takes "every setting you do not pass again" from the checkpoint; the invocation's own
    settings (trainer._PER_INVOCATION) are not taken, and a new user lost --compile / --sample_bytes that way. The
    README's list must stay that set."""
    import re
    from pathlib import Path

    from ionllama.train.trainer import _PER_INVOCATION

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("Settings of the invocation")
    listed = set(re.findall(r"`--(\w+)`", readme[start:readme.index("so pass them again", start)]))
    assert listed == _PER_INVOCATION - {"resume"}


def test_a_kill_before_latest_is_written_keeps_the_new_best(tmp_path, corpus, monkeypatch):
    """latest.pt was written first and copied to best.pt after: a kill between the two left latest.pt recording the new
    best score and best.pt the old weights, and the resumed run wrote over latest.pt, the only copy of the best
    weights (a new user's report). latest.pt is now written last: whatever it records is on disk already."""
    from ionllama.train import checkpoint as ckpt_io
    from ionllama.train import trainer as tr

    real = ckpt_io.copy_checkpoint
    kill_at = {"step": None}

    def copy(src, dst):
        step = torch.load(src, map_location="cpu", weights_only=True)["step"]
        if Path(dst).name == "latest.pt" and step == kill_at["step"]:
            raise KeyboardInterrupt("killed before latest.pt")
        if Path(src).name == "latest.pt" and Path(dst).name == "best.pt" and step == kill_at["step"]:
            raise KeyboardInterrupt("killed before best.pt")  # the old order's kill point
        return real(src, dst)

    run = train(tmp_path, corpus, "--max_steps", "10", "--eval_interval", "5", run_name="k")
    assert load_checkpoint(run / "best.pt")["step"] == 10
    kill_at["step"] = 15  # the next evaluation scores better (the loss still falls): a new best
    monkeypatch.setattr(tr.ckpt_io, "copy_checkpoint", copy)
    with pytest.raises(SystemExit):  # the CLI turns the interrupt into exit 130
        train(tmp_path, corpus, "--max_steps", "20", "--eval_interval", "5", "--resume", "auto", run_name="k")
    best = load_checkpoint(run / "best.pt")
    latest = load_checkpoint(run / "latest.pt")
    # what latest.pt records as the best score is the score of the weights in best.pt
    assert best["step"] == 15 and best["best_val_bpb"] <= latest["best_val_bpb"]


def test_a_read_only_run_folder_is_named_not_the_save_dir(tmp_path, monkeypatch):
    """With --save_dir writable and only the run folder read-only, the error sent the user to --save_dir. Root writes
    anywhere, so the probe's refusal is simulated."""
    from ionllama.errors import UserError
    from ionllama.train import trainer as tr

    run = tmp_path / "save" / "r1"
    run.mkdir(parents=True)

    def refused(folder):
        if Path(folder) == run:
            raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(tr, "probe_writable", refused)
    with pytest.raises(UserError, match=r"cannot write to the run folder .*r1 .*another --run_name"):
        tr.ensure_writable(run, str(tmp_path / "save"))


def test_resuming_into_another_runs_folder_is_refused_and_touches_nothing(tmp_path, corpus, capsys):
    """--resume A/latest.pt --run_name B, B holding another run's checkpoints: B's latest.pt and best.pt were
    overwritten by A's branch and B's metrics cut back to A's step, with no copy kept."""
    a = train(tmp_path, corpus, "--max_steps", "12", "--stop_at", "6", run_name="a")
    b = train(tmp_path, corpus, "--max_steps", "12", "--seed", "7", run_name="b")
    before = {f.name: f.read_bytes() for f in b.iterdir() if f.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train(tmp_path, corpus, "--max_steps", "12", "--resume", str(a / "latest.pt"), run_name="b")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "already holds checkpoints of another run" in err[0], err
    assert {f.name: f.read_bytes() for f in b.iterdir() if f.is_file()} == before
    # a new folder, or the checkpoint's own folder under its own name, still resume
    train(tmp_path, corpus, "--max_steps", "12", "--resume", str(a / "latest.pt"), "--stop_at", "8", run_name="c")
    train(tmp_path, corpus, "--max_steps", "12", "--resume", str(a / "latest.pt"), run_name="a")
    assert load_checkpoint(a / "final.pt")["step"] == 12


def test_gradient_accumulation_scales_the_gradient_as_a_larger_batch(tmp_path, corpus):
    """The loss comparison above cannot see the 1/grad_accum loss scale: AdamW is invariant to a constant gradient
    scale and clipping hides the rest (it passed with the division removed). The logged gradient norm is not."""
    def norms(run):
        return [r["grad_norm"] for r in read_metrics(run / "metrics.jsonl") if "grad_norm" in r]

    big = norms(train(tmp_path, corpus, "--max_steps", "3", "--batch_size", "8", run_name="gbig"))
    acc = norms(train(tmp_path, corpus, "--max_steps", "3", "--batch_size", "2", "--grad_accum", "4", run_name="gacc"))
    assert len(big) == 3 and big == pytest.approx(acc, rel=1e-4)


def test_gradient_accumulation_of_masked_targets_matches_a_larger_batch(tmp_path):
    """Task rows score only their answers: a micro-batch's mean loss was weighted 1/grad_accum whatever its count of
    scored targets, so 4 rows as 4 micro-batches had a gradient up to 50 % off the same rows as one batch."""
    from ionllama.data.loader import TaskSampler
    from ionllama.train.cli import build_train_parser, explicit_args
    from ionllama.train.trainer import Trainer

    x, y = TaskSampler(128, 4, 1, 0).get(0, 0)
    assert len(set((y != -100).sum(1).tolist())) > 1  # rows of different scored counts

    def grads(bs, accum):
        argv = TINY + ["--dataset", "tasks", "--save_dir", str(tmp_path / f"r{accum}"), "--run_name", "g",
                       "--seq_len", "128", "--batch_size", str(bs), "--grad_accum", str(accum), "--max_steps", "4",
                       "--sample_bytes", "0", "--device", "cpu", "--grad_clip", "0"]
        parser = build_train_parser()
        t = Trainer(parser.parse_args(argv), explicit_args(parser, argv))
        t.sampler.get = lambda step, micro: (x[micro * bs:(micro + 1) * bs], y[micro * bs:(micro + 1) * bs])
        t._enter_phase("main")
        got = {}
        t.optimizer.step = lambda *a, **k: got.update({n: p.grad.clone() for n, p in t.model.named_parameters()})
        out = t._train_step(0)
        return got, float(out["loss"])

    (g1, l1), (g4, l4) = grads(4, 1), grads(1, 4)
    assert l4 == pytest.approx(l1, rel=1e-6)
    for n in g1:
        torch.testing.assert_close(g4[n], g1[n], rtol=1e-4, atol=1e-7)


def test_a_new_run_keeps_the_metrics_of_a_run_that_wrote_no_checkpoint(tmp_path, corpus, capsys):
    """A run that diverged (or was killed) before its first checkpoint leaves only its metrics.jsonl; starting again
    under the same name (as the divergence message says) deleted them without a word."""
    with pytest.raises(SystemExit):
        train(tmp_path, corpus, "--max_steps", "20", "--lr", "1e30", "--warmup_steps", "0", run_name="d")
    d = tmp_path / "runs" / "d"
    first = (d / "metrics.jsonl").read_text()
    assert first and not list(d.glob("*.pt"))
    capsys.readouterr()
    train(tmp_path, corpus, "--max_steps", "3", run_name="d")
    assert "metrics.before-new-run.jsonl" in capsys.readouterr().out
    assert (d / "metrics.before-new-run.jsonl").read_text() == first
    assert [r["step"] for r in read_metrics(d) if "loss" in r] == [1, 2, 3]


def test_a_resume_reads_past_foreign_lines_in_its_metrics(tmp_path, corpus, capsys):
    """truncate_after on resume: a JSON line that is not an object was an AttributeError traceback, a non-UTF-8 byte
    a UnicodeDecodeError one."""
    run = train(tmp_path, corpus, "--max_steps", "6", "--stop_at", "3")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"[1]\n7\n\xff\xfe\n")
    train(tmp_path, corpus, "--max_steps", "6", "--resume", "auto")
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 7))


def test_resuming_into_a_folder_that_holds_a_checkpointless_runs_metrics_keeps_them(tmp_path, corpus):
    """--resume A/latest.pt --run_name D, D holding only the metrics of a run that diverged before its first checkpoint:
    D's points up to A's step stayed in D's metrics.jsonl as if this run's, and the later ones were deleted."""
    with pytest.raises(SystemExit):
        train(tmp_path, corpus, "--max_steps", "20", "--lr", "1e30", "--warmup_steps", "0", run_name="d")
    d = tmp_path / "runs" / "d"
    first = (d / "metrics.jsonl").read_text()
    assert first and not list(d.glob("*.pt"))
    a = train(tmp_path, corpus, "--max_steps", "12", "--stop_at", "6", run_name="a")
    train(tmp_path, corpus, "--max_steps", "12", "--resume", str(a / "latest.pt"), run_name="d")
    assert (d / "metrics.before-new-run.jsonl").read_text() == first
    assert [r["step"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] == list(range(7, 13))


def test_a_blank_data_path_alone_is_refused_beside_a_dataset_it_is_no_file(tmp_path, corpus, capsys):
    """--data_path '' alone is an unset "$DATA" (it trained on --dataset builtin): refused. Beside --dataset it says
    "no file", the one way to drop the --data_path a resume takes from its checkpoint; the refusal broke it."""
    with pytest.raises(SystemExit) as e:
        train(tmp_path, corpus, "--max_steps", "1", "--data_path", "", run_name="blank")
    assert e.value.code == 2 and "--data_path is blank" in capsys.readouterr().err
    run = train(tmp_path, corpus, "--max_steps", "2", "--stop_at", "1", run_name="switch")
    train(tmp_path, corpus, "--max_steps", "2", "--resume", "auto", "--dataset", "tasks", "--data_path", "",
          "--seq_len", "96", run_name="switch")
    assert load_checkpoint(run / "final.pt")["train_args"]["dataset"] == "tasks"
    assert not load_checkpoint(run / "final.pt")["train_args"]["data_path"]


def test_a_resume_takes_the_ngram_sizes_the_run_was_started_with(tmp_path, corpus, capsys):
    """--ngram_sizes parses to a tuple, which the checkpoint's train_args left out (only plain values were kept): a
    plain --resume auto built the default sizes and was refused ("drop those flags") for a flag it was never given."""
    ion = ["--model", "ionllama", "--d_local", "16", "--n_enc_layers", "1", "--n_dec_layers", "1", "--patching",
           "fixed", "--max_steps", "6"]
    run = train(tmp_path, corpus, *ion, "--ngram_sizes", "2+3", "--stop_at", "2")
    assert load_checkpoint(run / "latest.pt")["train_args"]["ngram_sizes"] == [2, 3]
    train(tmp_path, corpus, *ion, "--resume", "auto", "--stop_at", "4")
    capsys.readouterr()
    train(tmp_path, corpus, *ion, "--resume", "auto", "--ngram_sizes", "2+3")  # the same sizes: nothing to note
    assert "note: resuming with --ngram_sizes" not in capsys.readouterr().out
    ck = load_checkpoint(run / "final.pt")
    assert ck["step"] == 6 and ck["model_config"]["ngram_sizes"] == [2, 3]
    # a checkpoint written before the sizes were kept in its train_args: they come from its model config
    old = load_checkpoint(run / "step_3.pt")
    del old["train_args"]["ngram_sizes"]
    torch.save(old, run / "step_3.pt")
    train(tmp_path, corpus, *ion, "--resume", str(run / "step_3.pt"), "--stop_at", "4")
    assert load_checkpoint(run / "latest.pt")["model_config"]["ngram_sizes"] == [2, 3]


def test_sample_decodes_a_character_split_between_prompt_and_continuation(tmp_path, corpus, monkeypatch):
    """The default sample prompt is cut at 48 bytes, often inside a multi-byte character (any non-English text); the
    prompt and the continuation were decoded apart, so a character the model completed showed as two U+FFFD in the
    printed sample and sample.txt (`ionllama generate` decodes both with one stream decoder)."""
    import ionllama.train.trainer as T

    monkeypatch.setattr(T, "sample_bytes", lambda *a, **k: "\u00e9!".encode("utf-8")[1:])  # b"\xa9!"
    d = train(tmp_path, corpus, "--max_steps", "2", "--sample_bytes", "2",
              "--sample_prompt", "caf\u00e9".encode("utf-8")[:-1].decode("utf-8", "surrogateescape"))
    assert (d / "sample.txt").read_text(encoding="utf-8") == "caf\u00e9!"
