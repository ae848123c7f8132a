"""A checkpoint whose stored model config is invalid, or does not fit its weights, is one line naming the file and
the problem in every loader (an audit found `bench` ending in a torch traceback for a config that disagreed with its
weights, and every loader failing in a module's assert for n_heads 3 at d_model 32)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ionllama import build_model, create_model
from ionllama.config import ModelConfig
from ionllama.errors import UserError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    m = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
    cfg = dataclasses.asdict(m.config)
    paths = {}
    for name, change in (("good", {}), ("heads", {"n_heads": 3}), ("text", {"d_model": "32"}),
                         ("wider", {"d_model": 64})):
        paths[name] = d / f"{name}.pt"
        torch.save({"model": m.state_dict(), "model_config": {**cfg, **change}}, paths[name])
    return paths


def _loaders():
    from ionllama.eval.loading import load_checkpoint
    from ionllama.generation.cli import load_checkpoint_model
    from ionllama.train.checkpoint import load_model

    return {"bench": lambda p: load_checkpoint(p, device="cpu").model, "train.load_model": lambda p: load_model(p),
            "generate": lambda p: load_checkpoint_model(str(p), "cpu")}


@pytest.mark.parametrize("loader", ["bench", "train.load_model", "generate"])
def test_every_loader_names_the_file_and_the_bad_value(saved, loader):
    load = _loaders()[loader]
    assert isinstance(load(saved["good"]), torch.nn.Module)
    with pytest.raises(UserError, match=r"heads\.pt: its stored model config is not valid: d_model 32 must split "
                                        r"into n_heads 3"):
        load(saved["heads"])
    with pytest.raises(UserError, match=r"text\.pt: its stored model config is not valid: d_model must be a whole"):
        load(saved["text"])
    with pytest.raises(UserError, match=r"wider\.pt.* does not match .*size mismatch for embed\.weight"):
        load(saved["wider"])


def test_build_model_checks_a_hand_made_config():
    cfg = ModelConfig(model="dense", size="tiny", d_model=32, n_layers=1, n_heads=3)
    with pytest.raises(UserError, match="d_model 32 must split into n_heads 3"):
        build_model(cfg)
