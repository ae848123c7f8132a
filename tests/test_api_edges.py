"""Edges of the Python API and the model components: unsigned id dtypes, a local window past the sequence, a BPE
tokenizer_path that did not load, calibration from a CPU batch, the params CLI (each test failed before its fix)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from ionllama import create_model
from ionllama.errors import UserError

SMALL = dict(d_model=32, n_layers=1, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=1, d_entropy=16,
             n_entropy_layers=1, entropy_headdim=8, entropy_state=4, ngram_buckets=64)
KW = {"ionllama": SMALL, "dense": dict(d_model=32, n_layers=1, n_heads=2), "mamba": dict(d_model=32, n_layers=1),
      "bpe": dict(d_model=32, n_layers=1, n_heads=2, vocab_size=300)}


@pytest.mark.parametrize("model", sorted(KW))
@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64"])
def test_unsigned_ids_work_as_int64_ones(model, dtype):
    """uint16 is what ionllama.data.bpe writes its token shards in: torch.from_numpy of them was a
    NotImplementedError ("min_all" not implemented for 'UInt16') in the input check, not a result."""
    torch.manual_seed(0)
    m = create_model("tiny", model=model, **KW[model]).eval()
    x = torch.randint(0, 256, (2, 12))
    wide = torch.from_numpy(x.numpy().astype(dtype))
    with torch.no_grad():
        assert torch.equal(m(wide, wide)["logits"], m(x, x)["logits"])
    with pytest.raises(ValueError, match="outside 0"):
        m(torch.from_numpy(np.full((1, 4), 2 ** 64 - 1, dtype=np.uint64)))


def test_a_local_window_past_the_sequence_costs_no_more_than_the_sequence():
    """local_window_attention built (W, 2W) blocks whatever T: window 4096 at T 64 took ~1 GiB and 1.5 s, 16384
    would take ~16 GiB. Same outputs as the window cut to T."""
    from ionllama.model.local_attention import local_window_attention

    q, k, v = (torch.randn(1, 1, 5, 4, dtype=torch.float64) for _ in range(3))
    ref = local_window_attention(q, k, v, 5)
    seen = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask.numel())
        return orig(q, k, v, attn_mask=attn_mask, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        out = local_window_attention(q, k, v, 1 << 14)
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert seen == [5 * 10]  # one block of T x 2T, not 16384 x 32768


def test_calibrate_threshold_gives_the_patcher_x_on_the_entropies_device(monkeypatch):
    """It moved x to the model's device for the entropy model only and handed the patcher the caller's x: a CPU
    batch for a CUDA model ended in torch.cat of a CPU and a CUDA tensor (rule_starts). The meta device stands in
    for the GPU here."""
    import ionllama.model.ionllama_model as im

    seen = {}

    def spy(x, ent, *a, **kw):
        seen["devices"] = (x.device.type, ent.device.type)
        return 0.0, 1.0

    monkeypatch.setattr(im, "calibrate_threshold", spy)
    m = create_model("tiny", **SMALL).to("meta")
    m.calibrate_threshold(torch.randint(0, 256, (2, 16)))
    assert seen["devices"] == ("meta", "meta")


def test_a_bpe_tokenizer_path_that_did_not_load_is_said_not_scored_per_token(tmp_path):
    """A misspelt tokenizer_path built a model without a tokenizer, silently: its 'bpb' was bits per token."""
    m = create_model("tiny", model="bpe", tokenizer_path=str(tmp_path / "nope.json"), **KW["bpe"])
    x = torch.randint(0, 300, (1, 9))
    assert m(x)["loss"] is None  # no targets: nothing is scored, nothing to say
    with pytest.raises(UserError, match="nope.json"):
        m(x, x)


@pytest.mark.parametrize("args", [["foo"], ["--help"]])
def test_params_cli_answers_in_one_line(args):
    r = subprocess.run([sys.executable, "-m", "ionllama.params", *args], capture_output=True, text=True)
    assert "Traceback" not in r.stderr
    if args == ["--help"]:
        assert r.returncode == 0 and "usage" in r.stdout
    else:
        assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: unknown model 'foo'; choose any of bpe, "
                                                                        "dense, ionllama, mamba (or none for all)"]
