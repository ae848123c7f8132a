"""flops_per_byte's attention terms against the keys each query really sees (counted from the masks)."""
import pytest
import torch

from ionllama import create_model
from ionllama.model.dilated_attention import dilated_offsets
from ionllama.model.flops import flops_per_byte

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_local=16, n_enc_layers=1, n_dec_layers=1, d_entropy=16,
            n_entropy_layers=1, entropy_headdim=8, ngram_buckets=64, patching="fixed")


def _window_keys(T: int, w: int) -> float:
    i = torch.arange(T)
    return float(((i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < w)).sum()) / T


@pytest.mark.parametrize("T", [64, 4096])
def test_local_attention_flops_count_the_keys_of_a_sliding_window(T):
    """(w + 1) / 2 keys per query is the mean only where T <= w: at T = 4096, w = 64 each query sees ~63.5 keys, and
    the transformer local layers were charged half their attention in equal-FLOPs comparisons (an audit)."""
    a, b = (create_model("tiny", local_layers="transformer", local_window=w, **TINY) for w in (16, 64))
    got = flops_per_byte(b, T) - flops_per_byte(a, T)
    want = 6 * 2 * 16 * 2 * (_window_keys(T, 64) - _window_keys(T, 16))  # mult * 2 * d_local * layers * keys
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("patches", [1, 5, 64, 1000])
def test_dilated_latent_flops_count_the_offsets_each_patch_can_use(patches):
    """Every offset was counted for every patch, also those before the sequence's start (patch 0 sees only itself)."""
    m = create_model("tiny", **TINY)
    dense = create_model("tiny", attention="dense", **TINY)
    per_key = 6 * 2 * 32 * 2  # mult * 2 * d_model * n_layers, per patch
    offs = dilated_offsets(patches, m.config.local_width)
    keys = sum(sum(1 for o in offs if o <= i) for i in range(patches)) / patches
    diff = (flops_per_byte(dense, patches) - flops_per_byte(m, patches))  # bytes/patch 1: seq_len = patches
    assert diff == pytest.approx(per_key * ((patches + 1) / 2 - keys), rel=1e-9, abs=1e-6)
