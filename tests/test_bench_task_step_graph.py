"""bench_task_stage.py --step_graph times the experiment's --task_step_graph (the compiled, padded task stage with
its whole step one CUDA graph): refused in one line where it cannot apply, recorded in the results where it ran."""
from __future__ import annotations

import json

import pytest
import torch
from script_loader import load_script


@pytest.fixture(scope="module")
def stage():
    return load_script("bench_task_stage")


def _refused(stage, argv, capsys, needle):
    with pytest.raises(SystemExit) as e:
        stage.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err


def test_step_graph_needs_cuda_and_the_padded_compiled_stage(stage, tmp_path, capsys):
    base = ["--device", "cpu", "--size", "tiny", "--steps", "3", "--warmup", "1", "--out", str(tmp_path / "o")]
    _refused(stage, [*base, "--step_graph"], capsys, "--step_graph times the compiled stage")
    _refused(stage, [*base, "--step_graph", "--fixed_rows", "--ways", "eager"], capsys,
             "add --fixed_rows (and the compiled way)")
    # (an audit: on a CPU the step ran eagerly and was recorded, and printed, as a captured step)
    _refused(stage, [*base, "--step_graph", "--fixed_rows", "--ways", "compiled"], capsys,
             "--step_graph captures CUDA graphs; pass --device cuda")
    assert not (tmp_path / "o").exists()


def _args(tmp_path, cfg, **kw):
    from argparse import Namespace

    return Namespace(model_config=str(cfg), size="tiny", device="cpu", steps=3, warmup=1, batch=4, row_len=96,
                     fixed_rows=True, dynamic=False, step_graph=True, out=str(tmp_path / "o"), **kw)


def test_time_way_takes_the_graph_path_and_refuses_entropy_patching(stage, tmp_path, monkeypatch):
    """time_way (main refuses a CPU before it; here it is called directly, the StepGraph running its step eagerly):
    the compiled way trains through StepGraph; an entropy-patching model is refused in one line."""
    from ionllama import create_model
    from ionllama.errors import UserError
    from ionllama.train import step_graph as SG

    from ionllama.experiment import tasks as T

    monkeypatch.setattr("ionllama.experiment.tasks.torch.compile", lambda model, **k: model)
    # the shapes' rule as on a GPU (on this CPU the device alone refuses it, as main does before any model is built)
    monkeypatch.setattr(stage, "captured_stage_problem", lambda m, s, r, d: T.captured_stage_problem(m, s, r, "cuda"))
    made = []
    real = SG.StepGraph
    monkeypatch.setattr(SG, "StepGraph", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    cfg = tmp_path / "fixed.json"
    cfg.write_text(json.dumps({"model_config": create_model("tiny", patching="fixed", d_model=32, n_layers=1,
                                                            n_heads=2, d_local=32).config.__dict__}))
    torch.manual_seed(0)
    res = stage.time_way(_args(tmp_path, cfg), compiled=True)
    assert res["step_graph"] is True and res["timed_steps"] == 2 and len(made) == 1 and made[0].calls == 3
    ent = tmp_path / "entropy.json"
    ent.write_text(json.dumps({"model_config": create_model("tiny", patching="entropy").config.__dict__}))
    with pytest.raises(UserError, match="--step_graph: entropy patching reads its patch count on the host"):
        stage.time_way(_args(tmp_path, ent), compiled=True)
