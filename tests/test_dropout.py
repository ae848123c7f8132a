"""Residual dropout (config.dropout): off adds nothing, on is active only in training, never breaks causality,
and never reaches generation."""
import pytest
import torch

from ionllama import create_model
from ionllama.errors import UserError

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=1, d_entropy=16,
            n_entropy_layers=1, entropy_headdim=8, entropy_state=4, ngram_buckets=64, local_window=8,
            scan_chunk=8, max_patch_size=5)
MODELS = [("ionllama", dict(TINY, patching="fixed")),
          ("ionllama", dict(TINY, patching="fixed", local_layers="transformer")),
          ("dense", dict(d_model=32, n_layers=2, n_heads=2))]


def _pair(model, kw, p=0.3):
    """The same weights with dropout p and without."""
    torch.manual_seed(0)
    a = create_model("tiny", model=model, dropout=p, **kw)
    torch.manual_seed(0)
    b = create_model("tiny", model=model, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("model,kw", MODELS, ids=["ion-lnn", "ion-tf", "dense"])
def test_dropout_is_active_in_training_only(model, kw):
    a, b = _pair(model, kw)
    x = torch.randint(0, 256, (2, 24))
    # every latent / local / dense block carries it (2 latent + 1 encoder + 1 decoder layers, or 2 dense)
    drops = [m.drop.p for m in a.modules() if hasattr(m, "drop")]
    assert drops == [0.3] * (4 if model == "ionllama" else 2)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x)["logits"], b(x)["logits"], rtol=0, atol=0)  # eval: the identity
        a.train(), b.train()
        ya, yb = a(x)["logits"], b(x)["logits"]
        assert (ya - yb).abs().max() > 1e-3  # train: masks change the output
        torch.manual_seed(5)
        y1 = a(x)["logits"]
        torch.manual_seed(5)
        torch.testing.assert_close(a(x)["logits"], y1, rtol=0, atol=0)  # masks follow the seed
        # dropout 0 in train mode: exactly the eval output (no op was added)
        b.eval()
        yb_eval = b(x)["logits"]
        b.train()
        torch.testing.assert_close(b(x)["logits"], yb_eval, rtol=0, atol=0)


@pytest.mark.parametrize("model,kw", MODELS, ids=["ion-lnn", "ion-tf", "dense"])
def test_dropout_masks_keep_training_causal(model, kw):
    """Masks do not depend on the bytes, so with the same RNG state a later byte changes no earlier output."""
    a, _ = _pair(model, kw)
    a.double().train()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3, 40), generator=g)
    for i in (0, 7, 21, 38):
        x2 = x.clone()
        x2[:, i + 1:] = torch.randint(0, 256, (3, 40 - i - 1), generator=g)
        with torch.no_grad():
            torch.manual_seed(11)
            o1 = a(x)["logits"]
            torch.manual_seed(11)
            o2 = a(x2)["logits"]
        torch.testing.assert_close(o1[:, :i + 1], o2[:, :i + 1], rtol=0, atol=0)
        assert (o1[:, i + 1:] - o2[:, i + 1:]).abs().max() > 0


def test_generation_ignores_dropout_even_from_a_model_in_training_mode():
    a, b = _pair("ionllama", dict(TINY, patching="fixed"))
    a.train()
    prompt = b"Hello, w"
    ga = a.generate(prompt, max_new_bytes=24, temperature=0.0)
    assert a.training  # generate restores the mode
    assert ga == b.eval().generate(prompt, max_new_bytes=24, temperature=0.0)


def test_bad_dropout_is_a_user_error():
    with pytest.raises(UserError, match="dropout must be in"):
        create_model("tiny", model="dense", dropout=1.0)


@pytest.mark.parametrize("local", [0.0, 0.2])
def test_local_dropout_sets_the_byte_level_rate_alone(local):
    """local_dropout: the local encoder / decoder blocks' rate; the latent keeps `dropout`; unset, one rate for all."""
    torch.manual_seed(0)
    m = create_model("tiny", model="ionllama", dropout=0.1, local_dropout=local, **dict(TINY, patching="fixed"))
    latent = [blk.drop.p for blk in m.latent.blocks]
    local_p = [blk.drop.p for blk in list(m.encoder) + list(m.decoder)]
    assert latent == [0.1, 0.1] and local_p == [local, local]
    assert create_model("tiny", model="ionllama", dropout=0.1, **TINY).config.local_dropout is None
    both = [b.drop.p for b in create_model("tiny", model="ionllama", dropout=0.1, **TINY).modules()
            if hasattr(b, "drop")]
    assert both == [0.1] * 4  # unset: the one rate everywhere, as before
    with pytest.raises(UserError, match="dropout must be in"):
        create_model("tiny", model="ionllama", local_dropout=1.5, **TINY)


def test_local_dropout_reaches_the_trainer_and_the_experiment_runner():
    from ionllama.experiment import MODEL_KEYS, parse_overrides
    from ionllama.train.cli import MODEL_OVERRIDES
    assert MODEL_OVERRIDES["local_dropout"] is float and "local_dropout" in MODEL_KEYS
    assert MODEL_OVERRIDES["fixed_patch_size"] is int and "fixed_patch_size" in MODEL_KEYS  # a patch-size arm
    # every model option the experiment runner passes on is a flag the trainer takes, and the other way round
    assert set(MODEL_KEYS) == set(MODEL_OVERRIDES)
    assert parse_overrides(["dropout=0.1,local_dropout=0"]) == {"dropout": 0.1, "local_dropout": 0}
