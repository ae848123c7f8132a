"""bench_task_stage.py --step_graph times the experiment's --task_step_graph (the compiled, padded task stage with
its whole step one CUDA graph): refused in one line where it cannot apply, recorded in the results where it ran."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def stage():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_task_stage", BENCH / "bench_task_stage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _refused(stage, argv, capsys, needle):
    with pytest.raises(SystemExit) as e:
        stage.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err


def test_step_graph_needs_the_padded_compiled_stage_and_static_shapes(stage, tmp_path, capsys, monkeypatch):
    base = ["--device", "cpu", "--steps", "3", "--warmup", "1", "--out", str(tmp_path / "o")]
    _refused(stage, [*base, "--size", "tiny", "--step_graph"], capsys, "--step_graph times the compiled stage")
    _refused(stage, [*base, "--size", "tiny", "--step_graph", "--fixed_rows", "--ways", "eager"], capsys,
             "add --fixed_rows (and the compiled way)")
    from ionllama import create_model

    cfg = tmp_path / "config.json"  # an entropy-patching run: its forward reads the patch count on the host
    cfg.write_text(json.dumps({"model_config": create_model("tiny", patching="entropy").config.__dict__}))
    monkeypatch.setattr("ionllama.experiment.tasks.torch.compile", lambda model, **k: model)
    _refused(stage, [*base, "--model_config", str(cfg), "--step_graph", "--fixed_rows", "--ways", "compiled"],
             capsys, "--step_graph: entropy patching reads its patch count on the host")


def test_step_graph_run_is_recorded(stage, tmp_path, monkeypatch):
    monkeypatch.setattr("ionllama.experiment.tasks.torch.compile", lambda model, **k: model)
    from ionllama import create_model

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_config": create_model("tiny", patching="fixed", d_model=32, n_layers=1,
                                                            n_heads=2, d_local=32).config.__dict__}))
    torch.manual_seed(0)
    assert stage.main(["--device", "cpu", "--model_config", str(cfg), "--steps", "3", "--warmup", "1", "--batch", "4",
                       "--row_len", "96", "--fixed_rows", "--ways", "compiled", "--step_graph",
                       "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "bench_task_stage.json").read_text())
    assert res["compiled"]["step_graph"] is True and res["compiled"]["timed_steps"] == 2
