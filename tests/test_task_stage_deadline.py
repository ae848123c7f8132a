"""The task stage and the wall-clock deadline (--deadline_s): a space-patching row compiled its task stage for twice
as long as the fixed-patch rows and was killed by the device call's time limit, leaving neither scores nor how far
it had got. The stage now logs its progress and stops, saying what it would need, as soon as the pace of its latest
steps says it cannot finish before the deadline."""
from __future__ import annotations

import itertools
from argparse import Namespace

import pytest
import torch

from ionllama import create_model
from ionllama.experiment import main
from ionllama.experiment import tasks as T
from test_baselines import write_corpus
from test_experiment import _argv


def _stage(monkeypatch, deadline, steps=40, log_every=10):
    """train_on_tasks on a tiny model under a clock that advances 10 s per reading: 1 s per step at log_every 10."""
    clock = itertools.count(0.0, 10.0)
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    torch.manual_seed(0)
    m = create_model("tiny", model="dense", d_model=16, n_layers=1, n_heads=2)
    x = torch.randint(0, 256, (2, 16))
    return T.train_on_tasks(m, torch.device("cpu"), None, steps, 1e-3, lambda s: (x, x), log_every=log_every,
                            deadline=deadline)


def test_a_stage_that_cannot_finish_stops_at_the_third_log_point_and_says_what_it_needs(monkeypatch):
    # t0 = 0; log points at steps 0, 10, 20 read 10, 20, 30: 1 s per step lately, 19 steps left -> ends at 49
    with pytest.raises(T.TaskStageCut) as cut:
        _stage(monkeypatch, deadline=45.0)
    c = cut.value
    assert (c.step, c.steps, c.seconds, c.ms_per_step) == (20, 40, 30.0, 1000.0)
    assert c.need_s == pytest.approx(49.0) and "after step 21 of 40" in str(c) and "~49 s" in str(c)


def test_one_slow_window_does_not_cut_a_stage_that_would_finish(monkeypatch):
    """The pace is taken over every step since the second log point: a recompile's slow window late in the stage
    (here 60 s in the window of steps 20-30, then 1 s per step again) is averaged in, not taken as the pace."""
    ticks = iter([0.0, 10.0, 20.0, 30.0, 100.0, 110.0, 120.0])
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(ticks))
    torch.manual_seed(0)
    m = create_model("tiny", model="dense", d_model=16, n_layers=1, n_heads=2)
    x = torch.randint(0, 256, (2, 16))
    # at step 30, 9 steps left: the latest window alone says 7 s per step (ends at 163, past 140: cut); the steps
    # since step 10 say 4 s per step (ends at 136: not cut)
    losses, _ = T.train_on_tasks(m, torch.device("cpu"), None, 40, 1e-3, lambda s: (x, x), log_every=10, deadline=140.0)
    assert losses[-1]["step"] == 39


def test_a_stage_that_can_finish_runs_every_step(monkeypatch):
    losses, seconds = _stage(monkeypatch, deadline=50.0)  # (projected to end at 49 at step 30: not cut)
    assert [r["step"] for r in losses] == [0, 10, 20, 30, 39] and seconds == 60.0  # (one more reading)
    losses, _ = _stage(monkeypatch, deadline=None)
    assert losses[-1]["step"] == 39


def test_run_task_stage_logs_progress_about_every_tenth():
    torch.manual_seed(0)
    m = create_model("tiny", model="dense", d_model=16, n_layers=1, n_heads=2)
    lines = []
    a = Namespace(task_steps=60, task_lr=1e-3, seed=1, task_batch=2, task_seq_len=96, task_n=1, task_compile=False)
    import ionllama.eval.task_eval as E

    real = E.run_tasks
    E.run_tasks = lambda *a, **k: {"per_task": {}}
    try:
        T.run_task_stage(m, torch.device("cpu"), None, a, log=lines.append)
    finally:
        E.run_tasks = real
    assert [ln.split(":")[0] for ln in lines[:2]] == ["task stage step 0 of 60", "task stage step 50 of 60"], lines
    assert lines[2].startswith("task scoring took ") and len(lines) == 3, lines


def test_the_stage_keeps_task_eval_s_for_the_scoring_after_it(monkeypatch):
    """--deadline_s: training is paced against the deadline less --task_eval_s, since the held-out scoring runs
    after it (a stage projected to end just before the deadline ran its scoring past it, killed without scores)."""
    seen = {}

    def fake_train(model, device, amp, steps, lr, batch_of_step, **kw):
        seen["deadline"] = kw["deadline"]
        return [{"step": steps - 1, "loss": 1.0, "bpb": 1.0}], 0.0

    monkeypatch.setattr(T, "train_on_tasks", fake_train)
    monkeypatch.setattr("ionllama.eval.task_eval.run_tasks", lambda *a, **k: {"per_task": {}})
    m = create_model("tiny", model="dense", d_model=16, n_layers=1, n_heads=2)
    a = Namespace(task_steps=3, task_lr=1e-3, seed=1, task_batch=2, task_seq_len=96, task_n=1, task_compile=False,
                  task_eval_s=45.0)
    res = T.run_task_stage(m, torch.device("cpu"), None, a, deadline=1000.0)
    assert seen["deadline"] == 955.0 and res["scoring_seconds"] >= 0
    T.run_task_stage(m, torch.device("cpu"), None, a, deadline=None)
    assert seen["deadline"] is None


def test_the_runner_writes_no_scores_for_a_cut_stage_and_says_why(tmp_path, monkeypatch, capsys):
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    (tmp_path / "ck" / "dense").mkdir(parents=True)
    (tmp_path / "ck" / "dense" / "latest.pt").write_bytes(b"")
    (tmp_path / "res" / "phase1" / "dense").mkdir(parents=True)
    (tmp_path / "res" / "phase1" / "dense" / "final.json").write_text("{}")
    monkeypatch.setattr("ionllama.train.checkpoint.load_model", lambda *a, **k: None)
    seen = {}

    def cut(model, device, amp, a, deadline=None, log=None):
        seen["deadline"] = deadline
        raise T.TaskStageCut(599, 6000, 350.0, 41.6)

    monkeypatch.setattr("ionllama.experiment.runner.run_task_stage", cut)
    main(_argv(tmp_path, pattern, "--stage", "tasks", "--task_arms", "dense", "--deadline_s", "3000"))
    cap = capsys.readouterr()
    err = cap.out + cap.err
    assert seen["deadline"] is not None
    assert "dense: task stage stopped after step 600 of 6000 (350 s; 41.6 ms per step since compiling: the stage " \
           "needs ~575 s) before --deadline_s less --task_eval_s 150 s for its scoring; no task scores " \
           "written" in err, err
    assert not (tmp_path / "res" / "phase1" / "dense" / "tasks.json").exists()
