"""benchmarks/task_step_graph_equal.py: every step's loss of the plain and the captured task stage, and the largest
relative difference per window of steps (the GPU check of the forty-sixth session's unexplained loss gap)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from script_loader import load_script


@pytest.fixture(scope="module")
def eq():
    return load_script("task_step_graph_equal")


def test_refused_off_cuda_in_one_line_before_writing(eq, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        eq.main(["--device", "cpu", "--size", "tiny", "--steps", "3", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs a GPU" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_max_rel_per_window(eq):
    a = [1.0] * 150
    b = list(a)
    b[3], b[50], b[120] = 1.1, 0.5, 2.0  # relative to b: 0.1 / 1.1, 0.5 / 0.5, 1.0 / 2.0
    got = eq.max_rel(a, b)
    assert list(got) == ["0-9", "10-99", "100-"]
    assert got["0-9"] == pytest.approx(0.1 / 1.1) and got["10-99"] == pytest.approx(1.0)
    assert got["100-"] == pytest.approx(0.5)
    assert eq.max_rel(a[:5], b[:5]) == {"0-9": pytest.approx(0.1 / 1.1)}  # windows past the run are left out


def test_train_logs_every_step_and_the_two_ways_agree_on_a_cpu(eq, monkeypatch):
    """On a CPU StepGraph runs the same step eagerly: the script's two ways must give the same losses there, so a
    difference on the GPU is the graph's (or float arithmetic's), not the script's."""
    import torch

    monkeypatch.setattr(torch, "compile", lambda model, **k: model)
    args = SimpleNamespace(model_config=None, size="tiny", device="cpu", steps=3, batch=2, row_len=96)
    plain, graph = eq.train(args, False, None), eq.train(args, True, None)
    assert len(plain) == 3 and plain[-1] < plain[0]
    assert graph == pytest.approx(plain, rel=1e-5)


def test_repeats_and_the_eager_step_name_their_runs_and_pairs(eq, monkeypatch, tmp_path):
    """--repeats names each set's runs apart (_2, ...), --eager_step adds StepGraph's step code without the capture
    (train(..., replay=False)), every run gets its mean loss over the last 50 steps, and each set's pairs compare
    with that set's plain run. train is faked (the loop, not the GPU, is under test)."""
    import json

    calls = []

    def fake_train(args, graph, amp, replay=True):
        calls.append((graph, replay))
        n = len(calls)
        return [float(n)] * 40 + [float(n) + 1.0] * 60  # tail_mean: n + 1

    monkeypatch.setattr(eq, "train", fake_train)
    monkeypatch.setattr(eq, "resolve_device", lambda d: "cuda")
    monkeypatch.setattr(eq, "device_name", lambda d: "fake")
    assert eq.main(["--precisions", "bf16", "--repeats", "2", "--eager_step", "--steps", "100",
                    "--out", str(tmp_path / "o")]) == 0
    assert calls == [(False, True), (False, True), (True, True), (True, False)] * 2
    res = json.loads((tmp_path / "o" / "task_step_graph_equal.json").read_text())
    names = ["bf16_plain", "bf16_plain_again", "bf16_graph", "bf16_eager_step"]
    assert list(res["losses"]) == names + [n + "_2" for n in names]
    assert res["tail_mean"] == {n: pytest.approx(i + 2.0) for i, n in enumerate(list(res["losses"]))}
    assert sorted(res["pairs"]) == sorted(f"bf16: plain vs {w}{s}" for s in ("", "_2")
                                          for w in ("plain_again", "graph", "eager_step"))
    # set 2's pairs are against set 2's plain run (5.0 / 6.0), not set 1's (1.0 / 2.0)
    assert res["pairs"]["bf16: plain vs graph_2"]["0-9"] == pytest.approx((7.0 - 5.0) / 7.0)
