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


@pytest.mark.parametrize("loader", ["bench", "train.load_model", "generate"])
@pytest.mark.parametrize("change", ["config_int", "model_list", "ngram_int"])
def test_a_config_or_weights_of_the_wrong_type_is_one_line(saved, tmp_path, loader, change):
    """An int config, a list where the weights go, or ngram_sizes 5 were TypeError/AttributeError tracebacks."""
    good = torch.load(saved["good"], weights_only=True)
    ck = {"config_int": {**good, "model_config": 5}, "model_list": {**good, "model": [1, 2]},
          "ngram_int": {**good, "model_config": {**good["model_config"], "ngram_sizes": 5}}}[change]
    path = tmp_path / f"{change}.pt"
    torch.save(ck, path)
    with pytest.raises(UserError):
        _loaders()[loader](path)


def test_resume_from_a_config_of_the_wrong_type_or_a_damaged_safetensors_is_one_line(saved, tmp_path):
    """--resume of an int model_config was an AttributeError in the trainer; of a damaged .safetensors, torch.load
    handed it to safetensors, whose error type no handler knew."""
    from ionllama.train.checkpoint import load_checkpoint

    good = torch.load(saved["good"], weights_only=True)
    torch.save({**good, "model_config": 5}, tmp_path / "int.pt")
    with pytest.raises(UserError, match="not an ionllama checkpoint"):
        load_checkpoint(tmp_path / "int.pt")
    (tmp_path / "zero.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="safetensors export .* not for --resume"):
        load_checkpoint(tmp_path / "zero.safetensors")


def test_bench_refuses_a_checkpoint_without_a_persistent_buffer(tmp_path):
    """bench loaded with strict=False and forgave every missing key but the parameters: an entropy model's
    threshold absent loaded as 0 (a patch at every byte), where generate refused the same file."""
    from ionllama.eval.loading import load_checkpoint

    torch.manual_seed(0)
    m = create_model("tiny", d_model=32, n_layers=1, n_heads=2, d_local=16, d_entropy=16, ngram_buckets=64)
    state = m.state_dict()
    buffers = [k for k in state if k not in dict(m.named_parameters())]
    assert buffers, "the test needs a model with a persistent buffer"
    del state[buffers[0]]
    torch.save({"model": state, "model_config": m.config.to_dict()}, tmp_path / "nobuf.pt")
    with pytest.raises(UserError, match=f"missing .*{buffers[0]}"):
        load_checkpoint(tmp_path / "nobuf.pt")


def test_a_compiled_models_safetensors_export_loads(tmp_path):
    """export_safetensors of a torch.compile'd model wrote '_orig_mod.'-prefixed keys that no load accepted, and the
    load's message named no key."""
    from safetensors.torch import save_model

    from ionllama.train.checkpoint import export_safetensors, load_model

    torch.manual_seed(0)
    m = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = m  # what torch.compile's OptimizedModule looks like to the exporter
    wrapped.config = m.config
    export_safetensors(wrapped, tmp_path / "c.safetensors")
    x = torch.randint(0, 256, (1, 16))
    assert torch.equal(load_model(tmp_path / "c.safetensors")(x)["logits"], m.eval()(x)["logits"])
    from ionllama.train.checkpoint import SAFETENSORS_CONFIG_KEY

    import json

    save_model(wrapped, str(tmp_path / "bad.safetensors"),
               metadata={SAFETENSORS_CONFIG_KEY: json.dumps(m.config.to_dict())})
    with pytest.raises(UserError, match=r"missing .*; unexpected _orig_mod\."):
        load_model(tmp_path / "bad.safetensors")
