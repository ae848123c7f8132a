"""Bad inputs of bench_task_stage.py and profile_decode_step.py are one line and exit 2 before any model is built
or timed (a benchmark-scripts audit, thirty-ninth session: tracebacks after the work, a --batch 0 stage timed and
written as a result, --out a file failing after the profile), and the task-stage results are written atomically
with their command."""
from __future__ import annotations

import json

import pytest
from script_loader import load_script


def _load(name):
    return load_script(name)


@pytest.fixture(scope="module")
def stage():
    return _load("bench_task_stage")


@pytest.fixture(scope="module")
def pds():
    return _load("profile_decode_step")


def _one_line_exit_2(fn, argv, capsys, needle):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("extra,needle", [
    (["--model_config", "/nonexistent/config.json"], "--model_config"),
    (["--size", "huge"], "huge"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--row_len", "1"], "--row_len must be at least 2"),
    (["--warmup", "5"], "--warmup must be between 0 and --steps"),
])
def test_bench_task_stage_refuses_bad_inputs_in_one_line(stage, tmp_path, capsys, extra, needle):
    _one_line_exit_2(stage.main, ["--device", "cpu", "--size", "tiny", "--steps", "3", "--warmup", "1",
                                  "--out", str(tmp_path / "o"), *extra], capsys, needle)
    assert not (tmp_path / "o").exists()  # refused before the results folder was made


def test_bench_task_stage_refuses_a_file_as_out_and_cuda_without_one(stage, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("mine")
    _one_line_exit_2(stage.main, ["--device", "cpu", "--size", "tiny", "--steps", "3", "--warmup", "1",
                                  "--out", str(tmp_path / "afile")], capsys, "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "mine"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _one_line_exit_2(stage.main, ["--device", "cuda", "--size", "tiny", "--steps", "3", "--warmup", "1",
                                  "--out", str(tmp_path / "o")], capsys, "cuda")


def test_bench_task_stage_writes_its_command(stage, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "time_way", lambda args, compiled: {
        "ms_per_step": 1.0, "timed_steps": 2, "warmup_steps": 1, "total_s": 0.1, "dynamo_graphs": 0,
        "last_loss": {"step": 2, "loss": 1.0, "bpb": 1.4}})
    assert stage.main(["--device", "cpu", "--size", "tiny", "--steps", "3", "--warmup", "1", "--ways", "eager",
                       "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "bench_task_stage.json").read_text())
    assert res["command"].endswith("--ways eager --out " + str(tmp_path / "o")) and "commit" in res


@pytest.mark.parametrize("extra,needle", [
    (["--context", "0"], "--context must be at least 1"),
    (["--threads", "-1"], "--threads must be at least 0"),
    (["--budget_s", "0"], "--budget_s must be above 0"),
])
def test_profile_decode_step_refuses_bad_numbers_in_one_line(pds, tmp_path, capsys, extra, needle):
    _one_line_exit_2(pds.main, ["--device", "cpu", "--bytes", "8", "--out", str(tmp_path / "o"), *extra], capsys,
                     needle)


def test_profile_decode_step_refuses_a_file_as_out_before_profiling(pds, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr(pds, "run_profile", lambda args: pytest.fail("profiled before checking --out"))
    _one_line_exit_2(pds.main, ["--device", "cpu", "--bytes", "8", "--out", str(tmp_path / "afile")], capsys,
                     "is a file, not a folder")
