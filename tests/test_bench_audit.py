"""`ionllama bench` on inputs an eval audit found mishandled (thirty-ninth session): a diverged checkpoint, flags
past what the task generator holds, a plot that cannot be drawn, sections a checkpoint skips by itself, a BPE model
without its tokenizer; and evaluate_bpb's argument checks for a BPE model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ionllama import create_model
from ionllama.errors import UserError
from ionllama.eval import benchmark as B
from test_benchmark import SMALL, _save_trainer_checkpoint, _text


@pytest.fixture()
def workdir(tmp_path):
    (tmp_path / "eval.txt").write_bytes(_text("tinystories/tinystories-sample.txt", 1500))
    return tmp_path


FAST = ["--device", "cpu", "--seq_len", "64", "--batch_size", "4"]


def _dense_ckpt(workdir, name="run", **train_args):
    return _save_trainer_checkpoint(create_model("tiny", model="dense", **SMALL), workdir / name / "best.pt",
                                    **train_args)


def test_a_diverged_checkpoint_is_benchmarked_and_said(workdir, capsys):
    """NaN weights: the results are written (BPB null) and the console says why, instead of a TypeError after the
    whole run when the summary formatted the missing BPB."""
    ckpt = _dense_ckpt(workdir)
    state = torch.load(ckpt, weights_only=True)
    state["model"]["embed.weight"].fill_(float("nan"))
    torch.save(state, ckpt)
    out = workdir / "nan" / "r.json"
    assert B.main(["--checkpoint", str(ckpt), "--eval_data", str(workdir / "eval.txt"), "--output", str(out),
                   "--skip", "tasks", "speed", "compression", "multilingual", "plots", *FAST]) == 0
    cap = capsys.readouterr()
    assert json.loads(out.read_text())["metrics"]["lm"]["bpb"] is None
    assert "BPB not finite" in cap.out and "loss is not finite" in cap.err


@pytest.mark.parametrize("flag,value,needle", [("--max_digits", "19", "--max_digits 18 or fewer"),
                                               ("--task_seed", "-1", "--task_seed")])
def test_task_flags_past_the_generator_are_refused_before_any_work(workdir, capsys, flag, value, needle):
    ckpt = _dense_ckpt(workdir)
    with pytest.raises(SystemExit) as e:
        B.main(["--checkpoint", str(ckpt), "--eval_data", str(workdir / "eval.txt"), "--output",
                str(workdir / "d" / "r.json"), flag, value, *FAST])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err
    assert not (workdir / "d").exists()


def test_a_run_folder_without_bpb_skips_its_plot_and_keeps_the_results(workdir, capsys):
    ckpt = _dense_ckpt(workdir)
    (ckpt.parent / "metrics.jsonl").unlink()  # only --runs to plot
    runx = workdir / "runx"
    runx.mkdir()
    (runx / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    out = workdir / "p" / "r.json"
    assert B.main(["--checkpoint", str(ckpt), "--eval_data", str(workdir / "eval.txt"), "--output", str(out),
                   "--skip", "tasks", "speed", "compression", "multilingual", "--runs", str(runx), *FAST]) == 0
    res = json.loads(out.read_text())
    assert "lm" in res["metrics"] and "no BPB values" in res["skipped"]["plot training_curves"]


def test_sections_a_checkpoint_skips_by_itself_do_not_replace_earlier_results(workdir, capsys):
    """A tasks-only checkpoint skips lm without --eval_data: an earlier results file holding lm is kept unless
    --overwrite (only --skip was checked, so the lm results vanished without a word)."""
    ckpt = _dense_ckpt(workdir, "tasks_run", dataset="tasks")
    out = workdir / "t" / "r.json"
    common = ["--checkpoint", str(ckpt), "--output", str(out), "--n_tasks", "1", "--max_digits", "1",
              "--skip", "speed", "compression", "multilingual", "plots", *FAST]
    assert B.main(common + ["--eval_data", str(workdir / "eval.txt")]) == 0
    assert "lm" in json.loads(out.read_text())["metrics"]
    with pytest.raises(SystemExit) as e:
        B.main(common)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds lm results that this run skips (for this checkpoint" in err, err
    assert "lm" in json.loads(out.read_text())["metrics"]
    assert B.main(common + ["--overwrite"]) == 0


def test_bpe_without_a_checkpoint_is_refused_with_a_fix_bench_has(capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--model", "bpe", "--skip", "lm", "tasks", "speed", "compression", "multilingual", "plots",
                "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--model bpe needs --checkpoint" in err and "--vocab_size" not in err


def test_evaluate_bpb_checks_its_arguments_for_a_bpe_model_too():
    from ionllama.eval.bpb import evaluate_bpb

    m = create_model("tiny", model="bpe", vocab_size=300, d_model=32, n_layers=1, n_heads=2)
    data = np.frombuffer(b"hello world " * 20, dtype=np.uint8)
    for kw, needle in (({"seq_len": 0, "batch_size": 4}, "seq_len"), ({"seq_len": 32, "batch_size": 0}, "batch_size"),
                       ({"seq_len": 32, "batch_size": 4, "max_bytes": -5}, "max_bytes")):
        with pytest.raises(UserError, match=needle):
            evaluate_bpb(m, data, device="cpu", **kw)
