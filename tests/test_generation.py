"""Generation: sampling, stop strings, batching, UTF-8 streaming, CLI, dense KV-cache exactness."""
from __future__ import annotations

import importlib
import math
import os
import random
import re
import signal
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import ionllama
from ionllama.errors import UserError
from ionllama.generation import (SamplingConfig, Utf8StreamDecoder, decoder_for, generate,
                                 normalize_prompts, sample_next, uniform_noise)
from ionllama.generation.dense_decoder import DenseKVDecoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny-tensor tests: with 2 OpenMP threads on 2 shared cores every op can stall ~10 ms on a
    descheduled thread; one thread is faster and immune to that."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_dense(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=64, n_layers=2, n_heads=4)
    cfg.update(kw)
    m = ionllama.create_model("tiny", model="dense", **cfg).eval()
    with torch.no_grad():
        m.head.weight.mul_(40.0)  # spread the logits so greedy never sees near-ties
    return m


def teacher_forced_logits(dec, rows, prompt_lens):
    """Prefill each row's first prompt_lens[r] bytes, then feed the rest one step at a time.
    Returns per row the logits after every byte from the last prompt byte on."""
    logits = [dec.prefill([r[:p] for r, p in zip(rows, prompt_lens)])]
    n_steps = max(len(r) - p for r, p in zip(rows, prompt_lens))
    for s in range(n_steps):
        tok = torch.tensor([r[p + s] if p + s < len(r) else 0 for r, p in zip(rows, prompt_lens)])
        logits.append(dec.step(tok))
    return torch.stack(logits, 1)  # (B, n_steps + 1, V)


# ----------------------------------------------------------------------------- proof: dense KV cache
def test_dense_kv_cache_steps_equal_parallel_forward():
    m = tiny_dense()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (37, 20, 29)]
    prompt_lens = [5, 1, 12]
    dec = DenseKVDecoder(m, 3, 48)
    with torch.no_grad():
        got = teacher_forced_logits(dec, rows, prompt_lens)
        for r, (row, p) in enumerate(zip(rows, prompt_lens)):
            full = m(torch.tensor([row]))["logits"][0]  # (T, V)
            n = len(row) - p + 1
            torch.testing.assert_close(got[r, :n], full[p - 1:], atol=1e-4, rtol=1e-4)


def test_dense_rows_do_not_depend_on_batch():
    m = tiny_dense()
    rows = [list(b"the cat sat on the mat"), list(b"hi"), list(b"0123456789abcdef")]
    with torch.no_grad():
        batched = teacher_forced_logits(DenseKVDecoder(m, 3, 32), [r + [65] * 5 for r in rows],
                                        [len(r) for r in rows])
        for r, row in enumerate(rows):
            single = teacher_forced_logits(DenseKVDecoder(m, 1, 32), [row + [65] * 5], [len(row)])
            torch.testing.assert_close(batched[r], single[0], atol=1e-5, rtol=1e-5)


def test_auto_decoder_for_dense_is_kv_cache_and_matches_recompute():
    m = tiny_dense()
    assert isinstance(decoder_for(m, 1, 8), DenseKVDecoder)
    prompts = ["hello", "a much longer prompt, with commas", "x"]
    a = generate(m, prompts, 16, greedy=True)
    b = generate(m, prompts, 16, greedy=True, decoder="recompute")
    assert a == b and all(len(x) > 0 for x in a)


# ----------------------------------------------------------------------------- batched == single
@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=0.9, top_k=50, top_p=0.95)])
def test_batched_generation_equals_one_prompt_at_a_time(kw):
    m = tiny_dense()
    prompts = [b"abc", "d\u00e9j\u00e0 vu", [104, 105], b"a longer prompt than the others"]
    batched = generate(m, prompts, 20, seed=7, **kw)
    for r, p in enumerate(prompts):
        assert generate(m, p, 20, seed=7 + r, **kw) == batched[r]  # rule: row r uses seed + r


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    m = tiny_dense()
    a = generate(m, "abc", 40, seed=3)
    assert a == generate(m, "abc", 40, seed=3)
    assert a != generate(m, "abc", 40, seed=4)
    torch.manual_seed(11)
    c = generate(m, "abc", 40)  # seed=None draws from torch's RNG
    torch.manual_seed(11)
    assert c == generate(m, "abc", 40)


def test_model_generate_method_uses_generation_package():
    m = tiny_dense()
    assert m.generate(b"xy", max_new_bytes=12, temperature=0.7, top_k=5, seed=1) == \
        generate(m, b"xy", 12, temperature=0.7, top_k=5, seed=1)
    assert len(m.generate(b"xy", max_new_bytes=0)) == 0


# ----------------------------------------------------------------------------- sampling
def test_noise_is_uniform_and_row_independent():
    u = uniform_noise(torch.arange(64), 5, 256)
    assert u.shape == (64, 256) and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.std().item() - (1 / 12) ** 0.5) < 0.01
    assert torch.equal(uniform_noise(torch.tensor([9]), 5, 256)[0], u[9])  # same (seed, step) -> same noise
    assert not torch.equal(uniform_noise(torch.tensor([9]), 6, 256), u[9:10])
    big = uniform_noise(torch.tensor([2**40 + 3, 3]), 0, 16)
    assert not torch.equal(big[0], big[1])  # the high 32 bits of a seed matter


def test_sampling_frequencies_match_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    n = 20000
    cfg = SamplingConfig(temperature=1.0)
    tok = sample_next(logits.expand(n, -1), cfg, torch.arange(n), 0)
    freq = torch.bincount(tok, minlength=5).float() / n
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)
    hot = sample_next(logits.expand(n, -1), SamplingConfig(temperature=0.5), torch.arange(n), 0)
    torch.testing.assert_close(torch.bincount(hot, minlength=5).float() / n, (logits[0] / 0.5).softmax(-1),
                               atol=0.015, rtol=0)


def test_top_k_top_p_greedy_restrict_the_support():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0, -1.0]])
    n = 4000
    seeds = torch.arange(n)
    tk = sample_next(logits.expand(n, -1), SamplingConfig(top_k=2), seeds, 1)
    assert set(tk.tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # top-2 mass ~0.74: top_p=0.7 keeps exactly two bytes
    tp = sample_next(logits.expand(n, -1), SamplingConfig(top_p=float(p[:2].sum()) - 0.01), seeds, 1)
    assert set(tp.tolist()) == {0, 1}
    assert set(sample_next(logits.expand(n, -1), SamplingConfig(top_p=1e-6), seeds, 1).tolist()) == {0}
    assert set(sample_next(logits.expand(n, -1), SamplingConfig(temperature=0.0), seeds, 1).tolist()) == {0}
    assert set(sample_next(logits.expand(n, -1), SamplingConfig(greedy=True, temperature=5.0), seeds, 1).tolist()) == {0}


def test_top_k_keeps_exactly_k_bytes_when_logits_tie():
    """A threshold at the k-th value kept every byte tied with it: top_k=1 drew among equal maxima (3 of 24 rows
    of a bf16 model differed from greedy). Ties now go to the lower byte, as argmax's do."""
    tied = torch.tensor([[2.0, 2.0, 0.0, -1.0], [1.0, 3.0, 2.0, 2.0], [0.0, 5.0, 5.0, 5.0]])
    n = 500
    for row in tied:
        rows = row.expand(n, -1)
        one = sample_next(rows, SamplingConfig(top_k=1), torch.arange(n), 1)
        assert set(one.tolist()) == {int(row.argmax())}  # top_k=1 is greedy
        two = sample_next(rows, SamplingConfig(top_k=2), torch.arange(n), 1)
        kept = set(two.tolist())
        assert len(kept) == 2 and int(row.argmax()) in kept, (row, kept)
    from ionllama.generation.sampling import filter_logits

    assert filter_logits(tied, 2, None).isfinite().sum(-1).tolist() == [2, 2, 2]
    assert torch.equal(filter_logits(tied, 2, None)[2].isfinite(), torch.tensor([False, True, True, False]))


def test_top_p_breaks_ties_toward_the_lower_byte_as_argmax_does():
    """The nucleus sort was not stable: among equal logits the byte kept was the sort's pick (on CPU, at the real
    256-byte width, byte 176 of an all-zero row), so a top_p that keeps one byte was not greedy, and which of tied
    bytes made the nucleus was an accident of the sort (it may differ between devices). Ties now go to the lower
    byte, as top_k's and argmax's do."""
    from ionllama.generation.sampling import filter_logits

    tied = torch.zeros(4, 256)
    tied[1, [40, 41, 200]] = 3.0  # three equal maxima
    tied[2, [7, 250]] = 1.0
    tied[3] = torch.arange(256).float().div(64).floor().neg()  # four runs of 64 equal logits, the first highest
    n = 64
    for row in tied:
        one = sample_next(row.expand(n, -1), SamplingConfig(top_p=1e-6), torch.arange(n), 1)
        assert set(one.tolist()) == {int(row.argmax())}  # a top_p that keeps one byte is greedy
        both = sample_next(row.expand(n, -1), SamplingConfig(top_k=2, top_p=1e-6), torch.arange(n), 1)
        assert set(both.tolist()) == {int(row.argmax())}
    # equal probabilities: the nucleus holding half the mass is the lower half of the bytes
    assert torch.equal(filter_logits(tied[:1], None, 0.5)[0].isfinite(), torch.arange(256) < 128)
    kept = filter_logits(tied[3:], None, 0.1)[0].isfinite()  # part of the top run of 64: its lowest bytes
    assert 1 < int(kept.sum()) < 64 and torch.equal(kept, torch.arange(256) < int(kept.sum()))


def _filter_by_sort(logits, top_k, top_p):
    """The sort-based top-k / top-p filter generate() used through the forty-eighth session: the reference for the
    sort-free one (a compiled sort + scatter indexed out of range on an H100)."""
    if top_k is not None and top_k < logits.shape[-1]:
        order = logits.sort(dim=-1, descending=True, stable=True).indices[..., int(top_k):]
        logits = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, True), -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), -math.inf)
    return logits


@pytest.mark.parametrize("top_k,top_p", [(1, None), (5, None), (40, None), (255, None), (None, 0.5), (None, 0.9),
                                         (None, 1e-9), (20, 0.8), (3, 0.99)])
def test_sort_free_top_k_top_p_keep_the_bytes_the_sort_kept(top_k, top_p):
    """filter_logits ranks bytes by compares instead of a sort (torch.compile's sort + scatter indexed out of range in
    a CUDA decode graph). Same kept bytes as the sort-based filter, on random rows with ties (bf16-rounded logits,
    runs of equal values, -inf), up to top_p's float rounding at the nucleus edge."""
    from ionllama.generation.sampling import filter_logits

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g).mul(6)
    rows[:16] = rows[:16].bfloat16().float()  # many ties
    rows[16:24] = rows[16:24].mul(2).round()  # runs of equal values
    rows[24:28, ::3] = -math.inf
    rows[28] = 0.0
    new, old = filter_logits(rows, top_k, top_p).isfinite(), _filter_by_sort(rows, top_k, top_p).isfinite()
    differ = (new != old).any(-1)
    if top_p is None:
        assert not differ.any()
    else:  # a row may differ only where the mass above a byte is within float rounding of top_p
        for r in differ.nonzero().flatten().tolist():
            probs = rows[r].softmax(-1).sort(descending=True, stable=True).values
            assert ((probs.cumsum(-1) - probs - top_p).abs() < 1e-5).any(), r
        assert int(differ.sum()) <= 1
    assert new.any(-1).all()  # the best byte always stays


def test_compiled_filter_logits_matches_eager():
    """The filter compiles (CPU inductor here; the GPU run is the benchmark's) to the same kept bytes."""
    from ionllama.generation.sampling import filter_logits

    rows = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    compiled = torch.compile(filter_logits, dynamic=False)
    for k, p in [(5, None), (None, 0.7), (20, 0.9)]:
        assert torch.equal(compiled(rows, k, p).isfinite(), filter_logits(rows, k, p).isfinite())


def test_a_token_vocabulary_is_filtered_without_a_v_by_v_matrix(monkeypatch):
    """The compare filter builds (B, V, V) per call: for a BPE model's vocabulary (up to 65,536 tokens, 4 GiB of bools
    a row; 0.3 s a token at V=4,096 on CPU, and the trainer samples with top_k=40) the sort stays. Same bytes."""
    from ionllama.generation import sampling

    seen = []
    real = sampling._ranked_above
    monkeypatch.setattr(sampling, "_ranked_above", lambda x: seen.append(x.shape[-1]) or real(x))
    rows = torch.randn(2, 4096, generator=torch.Generator().manual_seed(2)).bfloat16().float()
    for k, p in [(40, None), (None, 0.9), (20, 0.8)]:
        assert torch.equal(sampling.filter_logits(rows, k, p), _filter_by_sort(rows, k, p))
    assert seen == []
    sampling.filter_logits(rows[:, :256], 40, 0.9)
    assert seen == [256]  # the byte models' filter (compiled on a GPU) compares, once for top_k and top_p


@pytest.mark.parametrize("kind", ["dense", "bpe", "ionllama"])
def test_generate_gives_each_submodule_its_own_mode_back(kind):
    """generate() restored only the top module's mode, train(was_training), which put a part kept in eval mode
    (dropout off while fine-tuning) back into train mode."""
    if kind == "ionllama":
        m = ionllama.create_model("tiny", d_model=32, n_layers=1, n_heads=2, d_local=32, n_enc_layers=1,
                                  n_dec_layers=1, d_entropy=16, n_entropy_layers=1, entropy_headdim=8,
                                  ngram_buckets=64, patching="fixed")
    elif kind == "bpe":
        from ionllama.data.bpe import train_tokenizer

        m = ionllama.create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=260)
        m.set_tokenizer(train_tokenizer([b"the cat sat on the mat " * 20], 260))
    else:
        m = tiny_dense()
    m.train()
    part = next(c for c in m.children() if list(c.parameters()))
    part.eval()
    modes = {name: mod.training for name, mod in m.named_modules()}
    m.generate(b"ab", max_new_bytes=3, seed=0)
    assert {name: mod.training for name, mod in m.named_modules()} == modes
    assert m.training and not part.training


def _train_root_with_an_eval_part(m):
    m.train()
    part = next(c for c in m.children() if list(c.parameters()))
    part.eval()
    return part, {name: mod.training for name, mod in m.named_modules()}


def test_token_bpb_and_the_fallback_sampler_give_each_submodule_its_own_mode_back():
    """evaluate_token_bpb and the trainer's plain sampling loop restored only the top module's mode, as generate()
    did: a part kept in eval mode came back in train mode (dropout on where the run had it off)."""
    from ionllama.data.bpe import evaluate_token_bpb, train_tokenizer
    from ionllama.train.trainer import sample_bytes

    m = ionllama.create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=260)
    m.set_tokenizer(train_tokenizer([b"the cat sat on the mat " * 20], 260))
    part, modes = _train_root_with_an_eval_part(m)
    evaluate_token_bpb(m, np.arange(40, dtype=np.int64) % 260, 8, 2, torch.device("cpu"))
    assert {name: mod.training for name, mod in m.named_modules()} == modes and not part.training

    dense = tiny_dense()
    plain = torch.nn.Sequential()  # no generate(): the plain loop samples from it
    plain.forward = dense.forward
    plain.add_module("model", dense)
    plain.train()
    part, modes = _train_root_with_an_eval_part(dense)
    assert len(sample_bytes(plain, b"ab", 3, 16, torch.device("cpu"), seed=0)) <= 3
    assert {name: mod.training for name, mod in dense.named_modules()} == modes and not part.training


def test_calibration_gives_each_submodule_its_own_mode_back():
    """The trainer's threshold calibration ran model.eval() then model.train(was): the frozen entropy model (eval
    while the main model trains) came back in train mode after every calibration."""
    from types import SimpleNamespace

    from ionllama.train.trainer import Trainer

    m = ionllama.create_model("tiny", d_model=32, n_layers=1, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=1,
                              d_entropy=16, n_entropy_layers=1, entropy_headdim=8, ngram_buckets=64)
    m.train()
    m.entropy_model.eval()
    modes = {name: mod.training for name, mod in m.named_modules()}
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    fake = SimpleNamespace(model=m, _calibration_batch=lambda: x, is_main=False,
                           par=SimpleNamespace(reshard=lambda: None, broadcast_buffers=lambda: None))
    Trainer._calibrate(fake)
    assert {name: mod.training for name, mod in m.named_modules()} == modes
    assert m.training and not m.entropy_model.training


def test_the_sampler_never_overrides_the_model_at_the_edges_of_float32():
    """Three ways the sampler's numbers left float32 (an audit): the noise of hash 2**24 - 1 rounded to 1.0, whose
    Gumbel +inf took its byte past top_k=1 (seed 13437, byte 71: about once in 65,536 bytes); a top_p below float32's
    range (1e-300 -> 0) dropped every byte, the best too, and byte 0 ended the document; a temperature of 1e39 turned
    float32 logits to 0. And numpy 2's bools were refused as flags."""
    from ionllama.generation.sampling import SamplingConfig, sample_next, uniform_noise

    seeds = torch.tensor([13437])
    u = uniform_noise(seeds, 0, 256)
    assert float(u.max()) < 1.0 and int(u.argmax()) == 71
    logits = torch.zeros(1, 256)
    logits[0, 200] = 30.0
    for cfg in (SamplingConfig(top_k=1), SamplingConfig(temperature=0.01), SamplingConfig(top_p=0.01),
                SamplingConfig(top_p=1e-300), SamplingConfig(top_p=5e-324, top_k=3)):
        assert int(sample_next(logits, cfg, seeds, 0)) == 200, cfg
    for t in (1e39, 1e300):
        with pytest.raises(UserError, match="temperature must be finite"):
            SamplingConfig(temperature=t)
    SamplingConfig(temperature=3e38, greedy=np.False_)  # the largest float32 and a numpy bool are fine
    with pytest.raises(UserError, match="greedy must be True or False"):
        SamplingConfig(greedy="yes")


def test_greedy_generate_leaves_torchs_rng_alone_and_options_are_checked_for_zero_new_bytes():
    """With seed=None, generate drew the rows' seeds from torch's RNG even when greedy (nothing sampled): every later
    draw of the caller moved (task scoring, speed runs). And max_new_bytes=0 returned b'' for decoder='x', seed='x',
    entropy_branch='x', fused_local_step='x', which a call with bytes to make refused."""
    from ionllama.data.bpe import train_tokenizer

    bpe = ionllama.create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=260)
    bpe.set_tokenizer(train_tokenizer([b"the cat sat on the mat " * 20], 260))
    for m in (tiny_dense(), bpe):
        for kw in ({"greedy": True}, {"temperature": 0}):
            torch.manual_seed(123)
            m.generate(b"ab", max_new_bytes=3, **kw)
            after = torch.rand(3)
            torch.manual_seed(123)
            assert torch.equal(after, torch.rand(3)), (type(m).__name__, kw)
    m = tiny_dense()
    for bad, words in (({"decoder": "x"}, "unknown decoder kind"), ({"seed": "x"}, "seed must be"),
                       ({"entropy_branch": "x"}, "entropy_branch must be"),
                       ({"fused_local_step": "x"}, "fused_local_step must be")):
        for n in (0, 2):
            with pytest.raises(UserError, match=words):
                m.generate(b"a", max_new_bytes=n, **bad)
    assert m.generate(b"a", max_new_bytes=0, greedy=np.True_) == b""


def test_options_a_model_cannot_use_are_refused_for_zero_new_bytes_and_before_the_prefill(monkeypatch):
    """entropy_branch / fused_*_step on a model that cannot use them returned b'' at max_new_bytes=0 and, with bytes
    asked for, were refused only after the prompt's prefill."""
    from ionllama.generation import ionllama_decoder

    fixed = ionllama.create_model("tiny", d_model=32, n_layers=1, n_heads=2, d_local=16, d_entropy=16,
                                  ngram_buckets=64, patching="fixed")
    prefills = []
    monkeypatch.setattr(ionllama_decoder.IonLlamaDecoder, "prefill",
                        lambda self, *a, **k: prefills.append(1) or (_ for _ in ()).throw(AssertionError("prefill")))
    for m, bad, words in ((fixed, {"entropy_branch": True}, "entropy_branch is for ionLlama with entropy patching"),
                          (tiny_dense(), {"entropy_branch": True}, "entropy_branch is for"),
                          (fixed, {"fused_entropy_step": True}, "fused_entropy_step"),
                          (fixed, {"fused_local_step": True}, "fused_local_step needs a CUDA device")):
        for n in (0, 3):
            with pytest.raises(UserError, match=words):
                m.generate(b"ab", max_new_bytes=n, **bad)
    assert prefills == []


@pytest.mark.parametrize("temperature", [1e-7, 1e-30, 1e-40, 1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_the_argmax(temperature):
    """logits / 1e-40 overflowed every positive logit to +inf in float32, and the ties at inf drew an arbitrary byte
    (the CLI printed 6 odd bytes, then a 0x00 ended the document): a positive temperature tends to greedy."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 256, generator=g) * 4 + 2  # mostly positive, the argmax rarely the first of them
    logits[:, 0] = -1e4  # byte 0 (the document separator) must never win
    want = logits.argmax(-1)
    seeds = torch.arange(8)
    for kw in (dict(), dict(top_k=5), dict(top_p=0.9)):
        cfg = SamplingConfig(temperature=temperature, **kw)
        for step in range(3):
            assert torch.equal(sample_next(logits, cfg, seeds, step), want), (kw, step)


def test_ordinary_temperatures_keep_the_bytes_of_a_seed():
    """The tiny-temperature fix leaves the draw of an ordinary temperature bit-identical: a seed repeats the bytes
    it gave before."""
    from ionllama.generation.sampling import filter_logits

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 256, generator=g) * 3
    seeds = torch.arange(64) * 7919
    for t, kw in ((1.0, {}), (0.7, dict(top_k=40)), (1e-3, dict(top_p=0.9)), (1e-5, {})):
        u = uniform_noise(seeds, 2, 256)
        old = (filter_logits(logits / t, kw.get("top_k"), kw.get("top_p")) - torch.log(-torch.log(u))).argmax(-1)
        assert torch.equal(sample_next(logits, SamplingConfig(temperature=t, **kw), seeds, 2), old), t


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("inf")), dict(top_k=0),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(top_k=2.5), dict(top_k=2.0),
                                 dict(top_k=True), dict(max_new_bytes=2.5), dict(max_new_bytes=None)])
def test_bad_sampling_settings_are_user_errors(bad):
    """Each is refused in one line before any work; a float top_k / max_new_bytes used to reach torch.topk /
    torch.zeros as a TypeError (top_k only after the prompt's prefill). UserError is a ValueError, so API code
    catching the ValueError that forward raises for bad input catches these too."""
    kw = {"max_new_bytes": 4, **bad}
    with pytest.raises(UserError):
        generate(tiny_dense(), "a", **kw)
    with pytest.raises(ValueError):
        generate(tiny_dense(), "a", **kw)


def test_numpy_ints_count_as_whole_numbers():
    import numpy as np
    m = tiny_dense()
    assert generate(m, "ab", np.int64(5), greedy=True, top_k=np.int64(3)) == generate(m, "ab", 5, greedy=True)


def test_compiled_decode_step_gives_the_eager_bytes():
    """compile=True runs the decode step through torch.compile (on CPU: no graphs): same bytes as eager."""
    m = tiny_dense()
    assert generate(m, "ab", 12, greedy=True, compile=True) == generate(m, "ab", 12, greedy=True)
    with pytest.raises(UserError, match="compile must be"):
        generate(m, "a", 4, compile="fastest")


# ----------------------------------------------------------------------------- prompts
def test_prompt_forms():
    assert normalize_prompts(b"ab") == ([[97, 98]], False)
    assert normalize_prompts("\u00e9") == ([[0xC3, 0xA9]], False)
    assert normalize_prompts([1, 2, 255]) == ([[1, 2, 255]], False)
    assert normalize_prompts(torch.tensor([5, 6])) == ([[5, 6]], False)
    assert normalize_prompts(torch.tensor([[5, 6], [7, 8]], dtype=torch.uint8)) == ([[5, 6], [7, 8]], True)
    assert normalize_prompts([b"a", "bc", [1]]) == ([[97], [98, 99], [1]], True)
    for bad in ([256], [b"a", 3.5], 3.5, torch.zeros(1, 1, 1)):
        with pytest.raises(UserError):
            normalize_prompts(bad)


def test_empty_prompt_starts_a_document():
    m = tiny_dense()
    assert generate(m, b"", 10, greedy=True) == generate(m, b"\x00", 10, greedy=True)


# ----------------------------------------------------------------------------- stops (scripted model)
class BigramScript(nn.Module):
    """Deterministic toy LM: after byte b the most likely byte is table[b]. No registered decoder,
    so generate() uses the RecomputeDecoder fallback."""

    def __init__(self, table: dict[int, int]):
        super().__init__()
        self.w = nn.Parameter(torch.full((256, 256), -20.0))
        with torch.no_grad():
            for a, b in table.items():
                self.w[a, b] = 20.0

    def forward(self, x, targets=None):
        return {"logits": self.w[x]}


def script_model(text: bytes):
    return BigramScript({a: b for a, b in zip(text, text[1:])})


def test_stop_string_excluded_and_stream_matches_result():
    m = script_model(b"abcdefgh")
    pieces = []
    out = generate(m, b"a", 20, greedy=True, stop=["ef", "xyz"], stream=lambda r, c: pieces.append(c))
    assert out == b"bcd" and b"".join(pieces) == b"bcd"
    out, info = generate(m, b"a", 20, greedy=True, stop=b"q", return_info=True)
    assert out == b"bcdefgh" and info["stop_reasons"] == ["doc_sep"]  # nothing follows 'h': argmax is 0x00


def test_held_back_stop_prefix_is_released_when_no_match():
    m = script_model(b"abcabd\x00")  # after 'b': 'c' (first) is overwritten by 'd' (later pair)
    pieces = []
    out, info = generate(m, b"a", 10, greedy=True, stop="bx", stream=lambda r, c: pieces.append(c),
                         return_info=True)
    assert out == b"bd" and b"".join(pieces) == out and info["stop_reasons"] == ["doc_sep"]


def test_doc_sep_stops_and_rows_stop_independently():
    m = script_model(b"abc\x00")
    m2 = {**{a: b for a, b in zip(b"xyzxyz", b"yzxyzx")}}
    with torch.no_grad():
        for a, b in m2.items():
            m.w[a].fill_(-20.0)
            m.w[a, b] = 20.0
    outs, info = generate(m, [b"a", b"x"], 9, greedy=True, return_info=True)
    assert outs == [b"bc", b"yzxyzxyzx"] and info["stop_reasons"] == ["doc_sep", "length"]
    d = info["decode"]  # not streamed on CPU: one run of all 9 steps, its seconds apart from the (empty) rest
    assert d["steps"] == d["first_run_steps"] == 9 and d["first_run_s"] > 0 and d["rest_s"] >= 0
    assert d["setup_s"] > 0


def test_pipelined_read_back_gives_the_same_bytes_streams_and_stops(monkeypatch):
    """On CUDA generate queues the next run before reading a run's bytes back (the GPU decodes while the host
    checks stops and streams). Forced on here on CPU: the same results, streamed pieces and stop reasons as one run
    read at a time, for a batch whose rows stop at different steps and a stop string; one run more is decoded past
    the last stop, never past max_new_bytes."""
    G = importlib.import_module("ionllama.generation.generate")
    m = script_model(b"abcdefghijklmnopqrstuvwxyz\x00")
    prompts = [b"a", b"m", b"x"]  # stop at "q" after 16 and 4 bytes, and at the document separator after 3

    def go():
        got = {}
        outs, info = generate(m, prompts, 45, greedy=True, stop="q", return_info=True,
                              stream=lambda r, c: got.__setitem__(r, got.get(r, b"") + c))
        outs2, info2 = generate(m, prompts, 45, greedy=True, stop="q", return_info=True)
        return outs, outs2, got, info, info2
    plain = go()
    monkeypatch.setattr(G, "_pipelined", lambda device: True)
    piped = go()
    assert piped[:3] == plain[:3] and [piped[2][r] for r in range(3)] == piped[0]
    assert piped[0] == [b"bcdefghijklmnop", b"nop", b"yz"]
    assert piped[3]["stop_reasons"] == plain[3]["stop_reasons"] == ["stop", "stop", "doc_sep"]
    for info_piped, info_plain in ((piped[3], plain[3]), (piped[4], plain[4])):
        steps, runs = info_piped["decode"]["steps"], info_plain["decode"]["steps"]
        assert runs < 45 and steps == min(45, runs + (1 if info_plain is plain[3] else 16))  # one run more
        d = info_piped["decode"]  # the steady rate's steps: those read back, not the run still queued at the stop
        assert d["first_run_steps"] + d["rest_steps"] == runs
    # sampled, no stop string: the same bytes
    m = tiny_dense(3)
    piped_sampled = generate(m, prompts, 40, seed=4)
    monkeypatch.undo()
    assert piped_sampled == generate(m, prompts, 40, seed=4)


# ----------------------------------------------------------------------------- UTF-8 streaming
def test_utf8_stream_decoder_split_everywhere_and_invalid_bytes():
    text = "h\u00e9llo \u20ac \U0001F600 \u4e2d".encode()
    for cut in range(len(text) + 1):
        d = Utf8StreamDecoder()
        assert d.decode(text[:cut]) + d.decode(text[cut:]) + d.flush() == text.decode()
    d = Utf8StreamDecoder()
    assert d.decode(b"\xe2\x82") == "" and d.pending == b"\xe2\x82"
    assert d.decode(0xAC) == "\u20ac"
    assert d.decode(b"a\xffb\xc0\xaf\xed\xa0\x80") == "a\ufffdb" + "\ufffd" * 5
    assert d.decode(b"\xf0\x9f") + d.flush() == "\ufffd"
    rng = random.Random(0)
    for _ in range(300):
        data = bytes(rng.choice([rng.randrange(256), 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x41]) for _ in range(10))
        d, out, i = Utf8StreamDecoder(), "", 0
        while i < len(data):
            j = i + rng.randrange(1, 4)
            out, i = out + d.decode(data[i:j]), j
        assert out + d.flush() == data.decode("utf-8", errors="replace")


def test_utf8_stream_decoder_takes_one_byte_value_of_any_integer_type():
    """decode(one byte value) took only a Python int: a numpy int or a 0-d tensor went to bytes(v), which is v zero
    bytes (decode(np.int64(65)) gave 65 NULs, not "A"), and an int outside 0..255 was masked to another byte."""
    d = Utf8StreamDecoder()
    assert d.decode(np.int64(65)) == "A" and d.decode(np.uint8(66)) == "B" and d.decode(torch.tensor(67)) == "C"
    assert d.decode(torch.tensor(0xE2)) == "" and d.decode(np.int32(0x82)) == "" and d.decode(0xAC) == "\u20ac"
    assert d.decode(np.array([0x68, 0x69], dtype=np.uint8)) == "hi" and d.decode([0x6F, 0x6B]) == "ok"
    for bad in (256, -1, np.int64(300), True):
        with pytest.raises(UserError, match="byte value"):
            d.decode(bad)
    assert d.flush() == ""


# ----------------------------------------------------------------------------- CLI
def _save_ckpt(model, path):
    # the trainer's checkpoint layout (ionllama.train.checkpoint.load_checkpoint needs these keys)
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)


def test_cli_stats_says_how_the_bytes_were_decoded(tmp_path, capsys):
    """--stats: one stderr line with the new bytes, the rate, device and dtype, and whether CUDA graphs were
    replayed (a cache or graph silently unused is what users of comparable projects could not see)."""
    from ionllama.generation.cli import main

    ck = tmp_path / "m.pt"
    _save_ckpt(tiny_dense(), ck)
    assert main(["--checkpoint", str(ck), "--prompt", "ab", "--max_new_bytes", "12", "--greedy", "--device", "cpu",
                 "--stats"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[generate]")]
    assert len(err) == 1
    n = int(err[0].split()[1])
    assert 0 < n <= 12 and "bytes/s; cpu, float32, compile none; no CUDA graphs (" in err[0]
    # the steady rate after the first run (streamed on CPU: one byte a run), which holds any compile and capture
    assert n < 2 or re.search(r"\d bytes/s after the first run \(1 byte, \d+\.\d\d s\)\)$", err[0]), err[0]
    assert main(["--checkpoint", str(ck), "--prompt", "ab", "--max_new_bytes", "12", "--greedy",
                 "--device", "cpu"]) == 0
    assert "[generate]" not in capsys.readouterr().err  # off by default


@pytest.mark.parametrize("kind", ["dense", "ionllama"])
def test_cli_streams_generation(tmp_path, capsys, kind):
    from ionllama.generation.cli import main

    m = tiny_dense() if kind == "dense" else ionllama.create_model(
        "tiny", d_model=32, n_layers=1, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=1, d_entropy=16,
        n_entropy_layers=1, entropy_headdim=8, ngram_buckets=64).eval()
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)
    assert main(["--checkpoint", str(ck), "--prompt", "h\u00e9", "--max_new_bytes", "16", "--greedy",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    expected = "h\u00e9" + generate(m, "h\u00e9", 16, greedy=True).decode("utf-8", errors="replace") + "\n"
    assert out == expected


def test_cli_prompt_file_carries_any_bytes(tmp_path, capsys):
    """--prompt_file: raw bytes a shell argument cannot carry (NUL, invalid UTF-8) reach the model unchanged, as
    through the Python API; a missing file, or both prompt flags, is one early line."""
    from ionllama.generation.cli import main

    m = tiny_dense()
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)
    raw = b"a\x00b\xff"
    (tmp_path / "p.bin").write_bytes(raw)
    assert main(["--checkpoint", str(ck), "--prompt_file", str(tmp_path / "p.bin"), "--max_new_bytes", "12",
                 "--greedy", "--device", "cpu", "--no_prompt_echo"]) == 0
    out = capsys.readouterr().out
    assert out == generate(m, raw, 12, greedy=True).decode("utf-8", errors="replace") + "\n"
    for extra, words in ((["--prompt_file", str(tmp_path / "nope")], "cannot read --prompt_file"),
                         (["--prompt_file", str(tmp_path / "p.bin"), "--prompt", "x"], "not both"),
                         # the last of several silently won (a new user's report): one prompt a run
                         (["--prompt", "a", "--prompt", "b"], "--prompt given 2 times"),
                         (["--prompt_file", "-", "--prompt_file", "-"], "--prompt_file given 2 times")):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(ck), "--device", "cpu", *extra])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and words in err and "\n" not in err


@pytest.mark.parametrize("content", [None, b"not a checkpoint", b"PK\x03\x04garbage"])
def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys, content):
    from ionllama.generation.cli import main

    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(path), "--prompt", "x", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    if content is not None:  # torch's raw message (cut mid-word before) is left out; the fix is named
        assert "is not a readable checkpoint" in err and "written by `ionllama train`" in err, err


@pytest.mark.parametrize("extra, words", [(["--temperature", "nan"], "temperature must be >= 0"),
                                          (["--temperature", "inf"], "temperature must be finite"),
                                          (["--device", "foo"], "unknown --device 'foo'"),
                                          # torch parses these: they were blamed on the checkpoint / a traceback
                                          (["--device", "meta"], "unknown --device 'meta'"),
                                          (["--device", "xpu"], "unknown --device 'xpu'"),
                                          pytest.param(["--device", "mps"], "MPS is not available",
                                                       marks=pytest.mark.skipif(torch.backends.mps.is_available(),
                                                                                reason="this machine has MPS")),
                                          (["--max_new_bytes", "abc"], "invalid int value: 'abc'"),
                                          (["--compile", "fast"], "invalid choice: 'fast'"),
                                          (["--top_k", "-5"], "top_k must be a whole number >= 1"),
                                          (["--top_p", "2"], "top_p must be in (0, 1]"),
                                          (["--stop", ""], "empty stop string"),
                                          (["--max_new_bytes", "-1"], "--max_new_bytes must be at least 0")])
def test_cli_bad_flags_are_one_line_exit_2(tmp_path, capsys, extra, words):
    """A NaN temperature used to print the prompt and exit 0 (an infinite one sampled uniform noise); a bad device
    read as a bad checkpoint; argparse mistakes printed the whole usage block; a huge --max_new_bytes was a torch
    allocation traceback. A bad sampling flag was refused only after the model loaded and the prompt was echoed,
    its error glued to the prompt on a terminal ("xerror: top_k ..."): now before any output. (A huge --max_new_bytes
    is no longer an error: the caches grow with the output, test_dense_caches_that_grow_...; a generation that
    outgrows the memory still ends in one line, test_cli_out_of_memory_while_generating_is_one_line.)"""
    from ionllama.generation.cli import main

    ck = tmp_path / "m.pt"
    _save_ckpt(tiny_dense(), ck)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(ck), "--prompt", "x", "--max_new_bytes", "4", "--device", "cpu"] + extra)
    out, err = capsys.readouterr()
    err = err.strip()
    assert e.value.code == 2 and "\n" not in err and words in err, err
    assert out == "", out


@pytest.mark.parametrize("kind", ["dense", "ionllama"])
def test_generate_inside_autocast_runs_in_model_dtype(kind):
    """A bf16 autocast region around generate (as in a training loop's task evaluation) must neither
    crash (bf16 keys written into fp32 caches) nor change the result: decoding runs in the model dtype."""
    if kind == "dense":
        m = tiny_dense()
    else:
        torch.manual_seed(0)
        m = ionllama.create_model("tiny", model="ionllama", patching="fixed", fixed_patch_size=3).eval()
    prompts = [b"the cat sat", b"on"]
    want = m.generate(prompts, max_new_bytes=12, greedy=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.generate(prompts, max_new_bytes=12, greedy=True)
        assert torch.is_autocast_enabled("cpu")  # the region is restored afterwards
    assert got == want


def test_a_list_of_numpy_ints_is_one_prompt():
    """[np.int64(65)] was read as a batch of prompts and refused as "unsupported prompt type int64"."""
    import numpy as np
    m = tiny_dense()
    ids = [np.int64(b) for b in b"ab"]
    assert generate(m, ids, 6, greedy=True) == generate(m, b"ab", 6, greedy=True)


def test_cli_stop_and_prompt_take_undecodable_argv_bytes(tmp_path, capsys):
    """Python hands undecodable argv bytes over as surrogate escapes. --prompt took them as bytes; --stop crashed
    with a UnicodeEncodeError traceback (exit 1). Both are bytes now, in the CLI and in the Python API."""
    from ionllama.generation.cli import main

    m = tiny_dense()
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)
    stop = "\udcff"  # what sys.argv holds for the byte 0xff
    assert main(["--checkpoint", str(ck), "--prompt", "a\udcfe", "--stop", stop, "--max_new_bytes", "12",
                 "--greedy", "--device", "cpu", "--no_prompt_echo"]) == 0
    want = generate(m, b"a\xfe", 12, greedy=True, stop=b"\xff")
    assert capsys.readouterr().out == want.decode("utf-8", errors="replace") + "\n"
    assert m.generate("a\udcfe", max_new_bytes=5, greedy=True) == m.generate(b"a\xfe", max_new_bytes=5, greedy=True)
    with pytest.raises(UserError, match="lone surrogate"):  # not an escape of a byte: said in one line
        m.generate("a\ud800", max_new_bytes=3)
    with pytest.raises(UserError, match="lone surrogate"):
        m.generate("ab", max_new_bytes=3, stop="\ud800")


def test_cli_echo_and_continuation_share_one_utf8_decoder(tmp_path, capsys, monkeypatch):
    """A character split between the prompt's end and the first generated byte printed as two U+FFFD: the echoed
    prompt was decoded on its own."""
    from ionllama.generation import cli

    m = tiny_dense()
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)

    def fake_generate(prompt, stream=None, **kw):  # the model's continuation: the euro sign's last byte
        stream(0, b"\xac")
        return b"\xac"

    monkeypatch.setattr(cli, "load_checkpoint_model", lambda path, device, dtype=None: type("M", (), {
        "generate": staticmethod(fake_generate), "config": m.config})())
    (tmp_path / "p.bin").write_bytes(b"abc\xe2\x82")
    assert cli.main(["--checkpoint", str(ck), "--prompt_file", str(tmp_path / "p.bin"), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "abc\u20ac\n"


def test_cli_notes_a_phase_one_checkpoint(tmp_path, capsys):
    """`bench` said a phase-1 checkpoint holds an untrained main model; `generate` printed its noise silently."""
    from ionllama.generation.cli import main

    m = tiny_dense()
    for phase, noted in (("entropy", True), ("main", False)):
        ck = tmp_path / f"{phase}.pt"
        torch.save({"model": m.state_dict(), "model_config": m.config.to_dict(), "phase": phase}, ck)
        assert main(["--checkpoint", str(ck), "--prompt", "x", "--max_new_bytes", "2", "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        assert ("written in phase 1" in err) == noted, err


@pytest.mark.parametrize("kw, words", [(dict(temperature="1"), "temperature must be a number"),
                                       (dict(top_p="0.9"), "top_p must be a number"),
                                       (dict(stop=5), "stop must be a str, bytes or a list"),
                                       (dict(stop=["a", 5]), "a stop string must be str or bytes"),
                                       # taken as they came before (an audit): "yes" meant greedy, "x" a tuple,
                                       # "x" CUDA graphs, 5 a TypeError after the prefill
                                       (dict(greedy="yes"), "greedy must be True or False"),
                                       (dict(return_info="x"), "return_info must be True or False"),
                                       (dict(cuda_graphs="x"), "cuda_graphs must be True, False or 'auto'"),
                                       (dict(stream=5), "stream must be a function"),
                                       (dict(prompt_bytes=torch.tensor([72.0, 105.0])), "integer dtype")])
def test_generate_wrong_types_are_user_errors(kw, words):
    """These ended in a bare TypeError from a comparison or an iteration deep inside."""
    with pytest.raises(UserError, match=words):
        tiny_dense().generate(**{"prompt_bytes": "ab", "max_new_bytes": 2, **kw})


def test_generate_takes_numpy_seeds():
    """numpy ints were taken for prompts and max_new_bytes but refused as a seed."""
    import numpy as np

    m = tiny_dense()
    assert m.generate("ab", max_new_bytes=6, seed=np.int64(3)) == m.generate("ab", max_new_bytes=6, seed=3)
    assert m.generate(["ab", "c"], max_new_bytes=6, seed=[np.int32(4), 9]) == m.generate(["ab", "c"], max_new_bytes=6,
                                                                                         seed=[4, 9])


def test_a_foreign_pickle_is_one_error_line(tmp_path):
    """torch's "Detected pickle protocol 4" warning came out as a second line above the error (a process: pytest
    captures warnings itself); `bench` on a folder that is no checkpoint said the existing folder was "not found"."""
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    for argv, words in ((["generate", "--checkpoint", str(path), "--prompt", "x", "--device", "cpu"],
                         "is not a readable checkpoint"),
                        (["bench", "--checkpoint", str(tmp_path), "--device", "cpu"], "is not a sharded checkpoint")):
        r = subprocess.run([sys.executable, "-m", "ionllama.cli", *argv], capture_output=True, text=True, timeout=300,
                           env=env, cwd=tmp_path)
        err = r.stderr.strip()
        assert r.returncode == 2 and err.startswith("error:") and "\n" not in err and words in err, err


def test_cli_help_names_every_flag_and_its_default():
    """--max_new_bytes, --temperature, --top_k, --top_p and --seed had no help at all, nor any default shown."""
    from ionllama.generation.cli import build_parser

    p = build_parser()
    text = " ".join(p.format_help().split())
    for a in p._actions:
        if a.dest not in ("help", "checkpoint"):  # --checkpoint is required: no default
            assert a.help and "(default: " in a.help, a.dest
    assert "(default: 256)" in text and "(default: 1.0)" in text and "(default: a random seed, printed to stderr)" in text


def _each_line_model(kind: str, tmp_path):
    if kind == "bpe":  # its tokenizer travels as a file the checkpoint's config names
        from ionllama.data.bpe import train_tokenizer

        train_tokenizer([b"the cat sat on the mat " * 20], 260).save(str(tmp_path / "tok.json"))
        return ionllama.create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=260,
                                     tokenizer_path=str(tmp_path / "tok.json")).eval()
    return tiny_dense() if kind == "dense" else ionllama.create_model(
        "tiny", d_model=32, n_layers=1, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=1, d_entropy=16,
        n_entropy_layers=1, entropy_headdim=8, ngram_buckets=64).eval()


@pytest.mark.parametrize("kind", ["dense", "ionllama", "bpe"])
def test_cli_each_line_continues_every_stdin_line_on_one_kept_decoder(tmp_path, capsys, monkeypatch, kind):
    """--each_line: one continuation line per stdin line (LF, CRLF, an empty line, a last line without its end),
    each the bytes generate gives that line with seed S + i, the decoder kept between them (a DecodeSession; the
    BPE model's own token decoder takes none)."""
    import io

    from ionllama.generation import cli

    m = _each_line_model(kind, tmp_path)
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)
    sessions, package = [], importlib.import_module("ionllama.generation")

    class Counted(package.DecodeSession):
        def __init__(self):
            super().__init__()
            sessions.append(self)
    monkeypatch.setattr(package, "DecodeSession", Counted)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\nh\xc3\xa9\r\n\nlast")))
    assert cli.main(["--checkpoint", str(ck), "--each_line", "--max_new_bytes", "10", "--seed", "7",
                     "--device", "cpu", "--stats"]) == 0
    out, err = capsys.readouterr()
    want = "".join(m.generate(p, 10, seed=7 + i).decode("utf-8", errors="replace") + "\n"
                   for i, p in enumerate([b"ab", b"h\xc3\xa9", b"", b"last"]))
    assert out == want and err.count("[generate]") == 4
    if kind == "bpe":
        assert not sessions
    else:
        assert len(sessions) == 1 and sessions[0].reuses == 3  # every line after the first on the kept decoder
    # without --seed: the drawn seed is said once, with how lines use it; not --stats: no stats lines
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\ncd\n")))
    assert cli.main(["--checkpoint", str(ck), "--each_line", "--max_new_bytes", "4", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    said = r"^seed (\d+) \(pass --seed \1 to repeat this run's bytes \(line i samples with seed \+ i\)\)$"
    seed = int(re.search(said, err, re.M).group(1))
    assert "[generate]" not in err and out == "".join(
        m.generate(p, 4, seed=seed + i).decode("utf-8", errors="replace") + "\n" for i, p in enumerate([b"ab", b"cd"]))


def test_cli_each_line_error_names_the_line_and_writes_no_empty_line(tmp_path, capsys, monkeypatch):
    """Memory running out on the second line: the first line's continuation stands, no empty line is written for
    the failed one, and the one error line names the stdin line; a closed stdin is one line too."""
    import io

    from ionllama.generation import cli

    ck = tmp_path / "m.pt"
    _save_ckpt(tiny_dense(), ck)
    prefill, calls = DenseKVDecoder.prefill, []

    def no_memory_on_line_two(self, rows):  # before any byte of line two is written
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return prefill(self, rows)
    monkeypatch.setattr(DenseKVDecoder, "prefill", no_memory_on_line_two)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x\nlonger line two\nthree\n")))
    with pytest.raises(SystemExit) as e:
        cli.main(["--checkpoint", str(ck), "--each_line", "--max_new_bytes", "6", "--device", "cpu", "--greedy"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "stdin line 2 (15 bytes): not enough memory for --max_new_bytes 6" in err, err
    assert out == generate(tiny_dense(), b"x", 6, greedy=True).decode("utf-8", errors="replace") + "\n"
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(SystemExit) as e:
        cli.main(["--checkpoint", str(ck), "--each_line", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "stdin, which is closed" in err[0]


@pytest.mark.parametrize("extra, words", [(["--prompt", "x"], "leave --prompt out"),
                                          (["--prompt_file", "-"], "leave --prompt_file out"),
                                          (["--output", "o.bin"], "leave --output out")])
def test_cli_each_line_refuses_the_one_prompt_flags(tmp_path, capsys, extra, words):
    from ionllama.generation.cli import main

    ck = tmp_path / "m.pt"
    _save_ckpt(tiny_dense(), ck)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(ck), "--each_line", "--device", "cpu"] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and words in err[0] and "--each_line" in err[0]


def test_cli_seed_outside_the_samplers_range_is_refused(tmp_path, capsys):
    """The sampler takes seeds modulo 2**63: --seed -1 and --seed 2**63 - 1 drew the same bytes, as did 0 and
    2**63, silently. Such a seed is one early line now; the range's ends still run."""
    from ionllama.generation.cli import main

    m = tiny_dense()
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)
    base = ["--checkpoint", str(ck), "--prompt", "x", "--max_new_bytes", "4", "--device", "cpu"]
    for bad in ("-1", str(2**63), str(2**64 + 3)):
        with pytest.raises(SystemExit) as e:
            main(base + ["--seed", bad])
        out, err = capsys.readouterr()
        err = err.strip()
        assert e.value.code == 2 and out == "" and "\n" not in err and "--seed must be 0 to 2**63-1" in err, err
    for good in (0, 2**63 - 1):
        assert main(base + ["--seed", str(good), "--no_prompt_echo"]) == 0
        want = generate(m, "x", 4, seed=good).decode("utf-8", errors="replace") + "\n"
        assert capsys.readouterr().out == want


def test_cli_output_writes_the_exact_bytes_atomically(tmp_path, capsys, monkeypatch):
    """The terminal shows U+FFFD for invalid UTF-8 and adds a newline; --output keeps the continuation's exact
    bytes (no prompt), replaces the file only when generation ends, and a bad path is one early line."""
    from ionllama.generation import cli

    m = tiny_dense()
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    base = ["--checkpoint", str(ck), "--prompt", "ab", "--max_new_bytes", "24", "--seed", "5", "--device", "cpu"]
    assert cli.main(base + ["--output", str(dest)]) == 0
    want = generate(m, "ab", 24, seed=5)
    assert dest.read_bytes() == want and len(want) > 0
    assert capsys.readouterr().out == "ab" + want.decode("utf-8", errors="replace") + "\n"  # the stream as before

    def fake_generate(prompt, stream=None, **kw):  # invalid UTF-8 and a control byte
        stream(0, b"\xff\xe2\x82")
        stream(0, b"z\x01")
        return b"\xff\xe2\x82z\x01"

    monkeypatch.setattr(cli, "load_checkpoint_model", lambda path, device, dtype=None: type("M", (), {
        "generate": staticmethod(fake_generate), "config": m.config})())
    assert cli.main(base + ["--output", str(dest), "--no_prompt_echo"]) == 0
    assert dest.read_bytes() == b"\xff\xe2\x82z\x01" and capsys.readouterr().out == "\ufffd\ufffdz\x01\n"

    def failing_generate(prompt, stream=None, **kw):  # a failure mid-way leaves the earlier file whole
        stream(0, b"partial")
        raise MemoryError

    monkeypatch.setattr(cli, "load_checkpoint_model", lambda path, device, dtype=None: type("M", (), {
        "generate": staticmethod(failing_generate), "config": m.config})())
    with pytest.raises(SystemExit) as e:
        cli.main(base + ["--output", str(dest)])
    assert e.value.code == 2 and dest.read_bytes() == b"\xff\xe2\x82z\x01"
    capsys.readouterr()

    def terminated_generate(prompt, stream=None, **kw):  # `kill PID` mid-way: it left the temp file behind
        stream(0, b"partial")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the handler's exception arrives first)
        return b"never"

    monkeypatch.setattr(cli, "load_checkpoint_model", lambda path, device, dtype=None: type("M", (), {
        "generate": staticmethod(terminated_generate), "config": m.config})())
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        cli.main(base + ["--output", str(dest)])
    assert e.value.code == 143 and dest.read_bytes() == b"\xff\xe2\x82z\x01"
    assert signal.getsignal(signal.SIGTERM) == handler  # given back
    capsys.readouterr()
    import ionllama.fsutil as fsutil

    real_replace = fsutil.fsync_replace

    def terminated_replace(tmp, path):  # `kill PID` while the finished output is flushed: the temp file stayed
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        real_replace(tmp, path)

    monkeypatch.setattr(cli, "load_checkpoint_model", lambda path, device, dtype=None: type("M", (), {
        "generate": staticmethod(fake_generate), "config": m.config})())
    monkeypatch.setattr(fsutil, "fsync_replace", terminated_replace)
    with pytest.raises(SystemExit) as e:
        cli.main(base + ["--output", str(dest), "--seed", "1"])
    assert e.value.code == 143 and dest.read_bytes() == b"\xff\xe2\x82z\x01"
    assert signal.getsignal(signal.SIGTERM) == handler
    monkeypatch.setattr(fsutil, "fsync_replace", real_replace)
    capsys.readouterr()
    for bad, words in ((tmp_path, "is a folder"), (tmp_path / "no" / "out.bin", "cannot write --output")):
        with pytest.raises(SystemExit) as e:
            cli.main(base + ["--output", str(bad)])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and out == "" and "\n" not in err.strip() and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "out.bin"]  # no temp file left behind


def test_cli_output_may_not_overwrite_the_checkpoint_or_the_prompt_file(tmp_path, capsys, monkeypatch):
    """`--output` equal to --checkpoint (or --prompt_file) replaced it with the continuation, exit 0: a 5-byte file
    where the checkpoint was. Refused in one line before the model loads: the same path however spelled, a hard
    link, a .dcp checkpoint folder or a file inside it."""
    from ionllama.generation import cli

    monkeypatch.setattr(cli, "load_checkpoint_model", lambda *a, **k: pytest.fail("loaded before the check"))
    ck, pf, dcp = tmp_path / "m.pt", tmp_path / "p.txt", tmp_path / "run.dcp"
    ck.write_bytes(b"weights")
    pf.write_bytes(b"prompt")
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"meta")
    os.link(ck, tmp_path / "hard.pt")
    monkeypatch.chdir(tmp_path)
    cases = [(["--checkpoint", str(ck)], str(ck), "is the --checkpoint "),
             (["--checkpoint", "m.pt"], str(tmp_path / "." / "m.pt"), "is the --checkpoint "),
             (["--checkpoint", str(ck)], "hard.pt", "is the --checkpoint "),
             (["--checkpoint", str(ck), "--prompt_file", "p.txt"], str(pf), "is the --prompt_file "),
             (["--checkpoint", str(dcp)], str(dcp / ".metadata"), "inside the checkpoint folder"),
             (["--checkpoint", str(dcp)], str(dcp / "new.bin"), "inside the checkpoint folder"),
             (["--checkpoint", str(dcp)], str(dcp), "the checkpoint folder")]
    for flags, out, words in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(flags + ["--max_new_bytes", "4", "--device", "cpu", "--output", out])
        o, err = capsys.readouterr()
        assert e.value.code == 2 and o == "" and "\n" not in err.strip() and words in err, (flags, out, err)
        assert "pass another --output" in err
    assert ck.read_bytes() == b"weights" and pf.read_bytes() == b"prompt"
    assert (dcp / ".metadata").read_bytes() == b"meta"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.pt", "m.pt", "p.txt", "run.dcp"]
    assert sorted(p.name for p in dcp.iterdir()) == [".metadata"]


@pytest.mark.parametrize("decoder", ["auto", "recompute"])
def test_dense_caches_that_grow_give_the_bytes_of_caches_made_whole(decoder, monkeypatch):
    """The dense KV cache (and the recompute decoder's token buffer) start at INITIAL_NEW_BYTES new bytes and double
    as the output grows (they were allocated for all of max_new_bytes up front: 10**8 bytes asked a dense tiny
    model for 614 GB). Growing four times in 40 bytes changes no byte of a batch, greedy or sampled."""
    import importlib

    G = importlib.import_module("ionllama.generation.generate")  # (the package's `generate` is the function)

    m = tiny_dense()
    prompts = [b"hello", b"a longer prompt here"]
    for kw in (dict(greedy=True), dict(temperature=1.0, top_p=0.9, seed=5)):
        whole = m.generate(prompts, max_new_bytes=40, decoder=decoder, **kw)
        with monkeypatch.context() as mp:
            mp.setattr(G, "INITIAL_NEW_BYTES", 3)
            grown = m.generate(prompts, max_new_bytes=40, decoder=decoder, **kw)
        assert grown == whole and max(map(len, whole)) > 12, kw
    head = m.generate(b"hello", max_new_bytes=12, greedy=True)
    stop = head[5:8]
    assert m.generate(b"hello", max_new_bytes=10**12, greedy=True, stop=stop) == head[:head.index(stop)]


def test_cli_out_of_memory_while_generating_is_one_line(tmp_path, capsys, monkeypatch):
    """The caches grow as the output does, so memory can run out mid-generation: one line naming
    --max_new_bytes, on a line of its own after the streamed bytes, exit 2."""
    from ionllama.generation import decoding
    from ionllama.generation.cli import main

    def no_memory(self, max_len):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(decoding.IncrementalDecoder, "grow", no_memory)
    ck = tmp_path / "m.pt"
    _save_ckpt(tiny_dense(), ck)
    monkeypatch.setattr(importlib.import_module("ionllama.generation.generate"), "INITIAL_NEW_BYTES", 3)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(ck), "--prompt", "x", "--max_new_bytes", "100", "--device", "cpu", "--greedy"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "\n" not in err.strip() and "smaller --max_new_bytes" in err, err
    assert out.startswith("x") and out.endswith("\n"), out


def test_cli_output_writes_through_a_link_and_refuses_pipes_devices_and_blank_names(tmp_path, capsys):
    """--output's atomic replace put a regular file where a symlink, a FIFO or a device was (exit 0: the link's
    target kept its old text, a reader of the FIFO got nothing, and as root `--output /dev/null` replaced the device
    node), and a blank name wrote a file called "  " (an audit). A link is now written through to its target; a
    pipe, a device or a blank name is one line, exit 2, before any output."""
    from ionllama.generation import cli

    ck = tmp_path / "m.pt"
    _save_ckpt(tiny_dense(), ck)
    base = ["--checkpoint", str(ck), "--prompt", "x", "--max_new_bytes", "5", "--device", "cpu", "--greedy"]
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("keep")
    link.symlink_to("target.txt")
    assert cli.main(base + ["--output", str(link)]) == 0
    assert link.is_symlink() and len(target.read_bytes()) == 5
    capsys.readouterr()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # (a device node is the same case as the FIFO; not /dev/null here: on a build without the check, as root,
    # the test itself would replace it)
    for bad, words in ((str(fifo), "is not a regular file"), ("  ", "--output is empty"), ("", "--output is empty")):
        with pytest.raises(SystemExit) as e:
            cli.main(base + ["--output", bad])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and out == "" and "\n" not in err.strip() and words in err, (bad, err)
    assert fifo.exists() and not fifo.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "m.pt", "pipe", "target.txt"]


def test_cli_without_a_seed_prints_the_one_it_drew_and_that_seed_repeats_the_bytes(tmp_path, capsys):
    """Without --seed a sampled run could not be repeated (an audit): the CLI now draws the seed itself, says it on
    stderr, and passing it back gives the same bytes. Greedy decoding needs none and prints none."""
    import re

    from ionllama.generation.cli import main

    m = tiny_dense()
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)
    base = ["--checkpoint", str(ck), "--prompt", "x", "--max_new_bytes", "12", "--device", "cpu", "--no_prompt_echo"]
    assert main(base) == 0
    out, err = capsys.readouterr()
    (seed,) = re.findall(r"^seed (\d+) \(pass --seed \1 to repeat these bytes\)$", err, re.M)
    assert main(base + ["--seed", seed]) == 0
    again, err2 = capsys.readouterr()
    assert again == out and "seed" not in err2
    assert main(base + ["--greedy"]) == 0 and "seed" not in capsys.readouterr().err
    # nothing sampled either: argmax by temperature 0, or no bytes (the seed line said they could be repeated)
    for extra in (["--temperature", "0"], ["--max_new_bytes", "0"]):
        assert main(base + extra) == 0 and "seed" not in capsys.readouterr().err, extra


def test_the_byte_generate_function_refuses_a_token_model():
    """ionllama.generation.generate(bpe_model, ...) sampled token ids as bytes and crashed on the first id above 255
    ("byte must be in range(0, 256)", an audit); it names the method to call instead."""
    from ionllama.generation import generate

    m = ionllama.create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=300)
    with pytest.raises(UserError, match=r"predicts tokens, not bytes; call its own model.generate"):
        generate(m, b"hello", max_new_bytes=4)


def test_eval_mode_reaches_what_a_wrapper_holds_outside_the_module_tree():
    """distributed._EntropyView holds the model outside its module tree and forwards train(): restoring by flags
    alone left the entropy model in eval mode after an evaluation (a review's find)."""
    from ionllama.model.common import eval_mode

    inner = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))

    class View(nn.Module):
        def __init__(self):
            super().__init__()
            object.__setattr__(self, "held", inner)  # not a submodule

        def train(self, mode=True):
            self.held.train(mode)
            return super().train(mode)

    v = View().train()
    with eval_mode(v):
        assert not inner.training
    assert v.training and inner.training and inner[1].training


def test_generate_cli_gives_back_a_sigterm_handler_python_cannot_name(monkeypatch):
    """signal.signal returns None for a handler installed outside Python; putting None back raised TypeError after
    a finished generation (a review's find)."""
    from ionllama.generation import cli

    calls = []
    monkeypatch.setattr(cli.signal, "signal", lambda sig, handler: calls.append(handler) or None)
    with cli._terminate_unwinds():
        pass
    assert calls[-1] == signal.SIG_DFL and len(calls) == 2


def test_cli_closed_stdin_or_stdout_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Started with stdin closed (`<&-`), --prompt_file - was an AttributeError traceback ('NoneType' object has no
    attribute 'buffer'); with stdout closed (`>&-`), the prompt's echo was one too."""
    import sys
    from ionllama.generation.cli import main

    ck = tmp_path / "m.pt"
    _save_ckpt(tiny_dense(), ck)
    for stream, extra, words in (("stdin", ["--prompt_file", "-"], "stdin, which is closed"),
                                 ("stdout", ["--prompt", "ab"], "stdout is closed")):
        with monkeypatch.context() as mp:
            mp.setattr(sys, stream, None)
            with pytest.raises(SystemExit) as e:
                main(["--checkpoint", str(ck), "--device", "cpu", "--max_new_bytes", "2", "--greedy", *extra])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and words in err and "\n" not in err, err


def test_cli_dtype_generates_in_bf16_from_an_fp32_checkpoint(tmp_path, capsys, monkeypatch):
    """Checkpoints store fp32 weights and the CLI decoded in them, whatever the device: no way to decode in bf16,
    the dtype every GPU benchmark times. --dtype bf16 gives the bytes of the model cast to bf16; --dtype auto is bf16
    on a CUDA GPU that has it, fp32 elsewhere (so the CPU default keeps its bytes)."""
    import copy
    from ionllama.generation import cli

    m = tiny_dense()
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)
    for dtype, model in (("bf16", copy.deepcopy(m).to(torch.bfloat16)), ("fp32", m), ("auto", m)):
        out = tmp_path / f"{dtype}.bin"
        assert cli.main(["--checkpoint", str(ck), "--prompt", "ab", "--max_new_bytes", "12", "--seed", "3",
                         "--device", "cpu", "--dtype", dtype, "--output", str(out), "--stats"]) == 0
        assert out.read_bytes() == model.generate(b"ab", max_new_bytes=12, seed=3), dtype
        # (this tiny model's 12 bytes are the same in both dtypes: the weights' dtype is what tells them apart)
        want = "bfloat16" if dtype == "bf16" else "float32"
        assert f"cpu, {want}, compile" in capsys.readouterr().err, dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cli.resolve_dtype("auto", "cuda:0") == torch.bfloat16 and cli.resolve_dtype("auto", "cpu") == torch.float32
    assert cli.resolve_dtype("auto", "mps") == torch.float32 and cli.resolve_dtype("fp32", "cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere: no native bf16
    assert cli.resolve_dtype("auto", "cuda") == torch.float32


def test_cli_cuda_graphs_flag_and_a_failed_capture_is_one_line(tmp_path, capsys, monkeypatch):
    """A failed CUDA graph capture was a traceback whose advice, cuda_graphs=False, names an option the CLI did not
    have: --cuda_graphs off reaches generate(), a failed capture is one line naming it (after the streamed bytes),
    and --cuda_graphs on where there is no CUDA device is refused instead of being ignored."""
    from ionllama.generation import cli
    from ionllama.generation.runner import DecodeRunner, GraphCaptureError

    ck = tmp_path / "m.pt"
    _save_ckpt(tiny_dense(), ck)
    base = ["--checkpoint", str(ck), "--prompt", "x", "--max_new_bytes", "4", "--greedy", "--device", "cpu"]
    seen = []
    gen_mod = importlib.import_module("ionllama.generation.generate")
    real = gen_mod._use_cuda_graphs

    def spy(setting, device, max_new):  # the setting itself: on CPU the runner gets False whatever it was
        seen.append(setting)
        return real(setting, device, max_new)

    with monkeypatch.context() as mp:
        mp.setattr(gen_mod, "_use_cuda_graphs", spy)
        assert cli.main(base + ["--cuda_graphs", "off"]) == 0 and cli.main(base) == 0 and seen == [False, "auto"]
    with pytest.raises(SystemExit) as e:
        cli.main(base + ["--cuda_graphs", "on"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "CUDA" in err and "\n" not in err, err

    def fail(self, n, gpu_ms=None):
        raise GraphCaptureError("capturing the decode step as a CUDA graph failed (...)") \
            from RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeRunner, "run", fail)
    with pytest.raises(SystemExit) as e:
        cli.main(base)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "--cuda_graphs off" in err and "not permitted" in err, err
    assert "\n" not in err.strip() and out == "x\n", (out, err)


def test_a_large_batch_is_filtered_in_slices_with_the_same_result(monkeypatch):
    """The sort-free filter holds V * V compares per row: above _FILTER_ROWS rows it works in slices (a batch of
    thousands of prompts held GBs at once); the kept bytes are those of one pass."""
    from ionllama.generation import sampling

    rows = torch.randn(7, 3, 256, generator=torch.Generator().manual_seed(2)).bfloat16().float()
    whole = sampling.filter_logits(rows, 9, 0.8)
    monkeypatch.setattr(sampling, "_FILTER_ROWS", 4)
    sliced = sampling.filter_logits(rows, 9, 0.8)
    assert sliced.shape == rows.shape and torch.equal(sliced.isfinite(), whole.isfinite())
    assert torch.equal(sampling.filter_logits(rows, None, None), rows)


def test_cli_threshold_overrides_the_entropy_threshold_and_stats_show_bytes_per_patch(tmp_path, capsys):
    """--threshold BITS: entropy patching's threshold for this run, in place of the calibrated one (a patch threshold
    no longer needs retraining to try); --stats says the bytes/patch it gave. Refused, one line, where there is no
    entropy threshold."""
    from ionllama.generation.cli import main

    m = ionllama.create_model("tiny", d_model=32, n_layers=1, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=1,
                              d_entropy=16, n_entropy_layers=1, entropy_headdim=8, ngram_buckets=64,
                              max_patch_size=6).eval()
    ck = tmp_path / "m.pt"
    _save_ckpt(m, ck)  # threshold 0 (never calibrated): every byte's entropy is above it, a patch a byte
    base = ["--checkpoint", str(ck), "--prompt", "hello", "--max_new_bytes", "30", "--greedy", "--device", "cpu",
            "--stats", "--no_prompt_echo"]

    def bytes_per_patch(extra):
        assert main(base + extra) == 0
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[generate]")]
        return float(re.search(r"; (\d+\.\d\d) bytes/patch over prompt and output\)$", err[0]).group(1))
    assert bytes_per_patch([]) == 1.0
    assert bytes_per_patch(["--threshold", "1e9"]) == pytest.approx(6.0, abs=0.5)  # only the cap of 6 cuts
    assert bytes_per_patch([]) == 1.0  # for that run only: the checkpoint's threshold again
    # a non-finite value is refused before the checkpoint is read: alone, even where the checkpoint is missing
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "missing.pt"), "--prompt", "a", "--threshold", "inf", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --threshold must be a finite number of bits, got inf"]
    for extra, dense_or_fixed, says in (
            (["--threshold", "nan"], m, "must be a finite number"),
            (["--threshold", "3"], tiny_dense(), "this checkpoint is a 'dense' model, without patches"),
            (["--threshold", "3"], ionllama.create_model("tiny", patching="fixed").eval(), "patches by 'fixed'")):
        _save_ckpt(dense_or_fixed, ck)
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--threshold" in last and says in last, last
