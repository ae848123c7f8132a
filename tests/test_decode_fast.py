"""The fast batch-1 decode path (issue #4): K iterations per graph replay (runner.graph_steps), the
precomputed sampling noise, and cache writes that torch.compile keeps in place.

On CPU the K-step loop runs eagerly with the host reading the same predicate the GPU's if-node
reads; it must give the same bytes as the one-step loop, with stop strings and lengths that are not
multiples of K. The CUDA-graph version is checked by test_cuda_graph_steps_equal_eager on a GPU and by
benchmarks/bench_generation.py's checks."""
from __future__ import annotations

import re

import pytest
import torch

from ionllama import create_model
from ionllama.generation import decoder_for, generate, uniform_noise
from ionllama.generation.runner import DecodeRunner
from ionllama.generation.sampling import NoiseSource, SamplingConfig

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=2, d_entropy=16,
            n_entropy_layers=2, entropy_headdim=8, entropy_state=4, ngram_buckets=64, scan_chunk=64,
            max_patch_size=5, local_width=2)
PROMPTS = [b"abc de", b"f", "a longer prompt. ab de\n"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ion():
    torch.manual_seed(1)
    m = create_model("tiny", **TINY, patching="entropy").eval()
    with torch.no_grad():
        m.head.weight.mul_(30.0)  # peaked logits: outputs repeat substrings, so stop strings can match
        ent = m.entropy_model(torch.randint(0, 256, (2, 64)))["entropy"].flatten()
        m.entropy_threshold.fill_(float(ent.median()))  # patches of varying length: latent steps happen
    return m


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(2)
    return create_model("tiny", model="dense", d_model=32, n_layers=2, n_heads=2).eval()


def test_noise_source_equals_uniform_noise():
    seeds = torch.tensor([0, 7, 2**62 + 5])
    src = NoiseSource(seeds, 256)
    for step in (0, 1, 12345, torch.tensor(99)):
        assert torch.equal(src(step), uniform_noise(seeds, step, 256))


@pytest.mark.parametrize("K", [4, 16])
@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=0.9, top_k=50)], ids=["greedy", "sample"])
def test_k_step_loop_equals_one_step_loop(ion, K, kw):
    for n_new in (37, 3, 64):  # not a multiple of K, shorter than K, a multiple
        ref, info_ref = generate(ion, PROMPTS, n_new, seed=5, return_info=True, **kw)
        got, info = generate(ion, PROMPTS, n_new, seed=5, graph_steps=K, return_info=True, **kw)
        assert got == ref and info == info_ref
    assert generate(ion, PROMPTS[1], 29, seed=5, graph_steps=K, **kw) == generate(ion, PROMPTS[1], 29, seed=5, **kw)


def test_k_step_loop_with_stop_strings_and_streaming(ion):
    full = generate(ion, PROMPTS, 60, seed=3, temperature=0.8)
    stop = [full[0][20:23], full[2][9:11]]  # strings the rows do produce: rows stop mid-chunk
    ref, info_ref = generate(ion, PROMPTS, 60, seed=3, temperature=0.8, stop=stop, return_info=True)
    assert "stop" in info_ref["stop_reasons"]
    got, info = generate(ion, PROMPTS, 60, seed=3, temperature=0.8, stop=stop, graph_steps=8, return_info=True)
    assert got == ref and info == info_ref
    pieces = {r: b"" for r in range(len(PROMPTS))}

    def stream(r, chunk):
        pieces[r] += chunk

    assert generate(ion, PROMPTS, 60, seed=3, temperature=0.8, stop=stop, graph_steps=8, stream=stream) == ref
    assert [pieces[r] for r in range(len(PROMPTS))] == ref


def test_runner_chunks_never_run_past_max_new(ion):
    """The runner sampled-byte buffer after uneven run() calls equals the one-step runner's."""
    outs = []
    for K in (1, 5):
        dec = decoder_for(ion, 2, 64)
        logits = dec.prefill([list(b"ab c"), list(b"d")])
        r = DecodeRunner(dec, SamplingConfig(temperature=1.0), torch.tensor([3, 4]), logits, 23, graph_steps=K)
        for n in (7, 1, 11, 50):  # the last asks for more than is left: stops at max_new
            r.run(n)
        assert r.n_done == 23 and int(r.step_no) == 23
        outs.append((r.out.clone(), dec.n_complete.clone(), dec.t.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


class _RecordingGraph:
    """Stands in for the CUDA graph being captured: records the if-node calls. Python cannot skip the
    body, so the latent stage runs every byte, which the masked commit makes a no-op for rows that do
    not open a patch: the bytes must still equal the one-step loop's."""

    def __init__(self):
        self.calls = []

    def begin_capture_to_if_node(self, pred):
        assert pred.dtype == torch.bool and pred.dim() == 0
        self.calls.append("begin")

    def end_capture_to_conditional_node(self):
        self.calls.append("end")


def test_capture_body_with_unconditional_latent_gives_same_bytes(ion):
    outs = []
    for fake in (None, _RecordingGraph()):
        dec = decoder_for(ion, 2, 64)
        logits = dec.prefill([list(b"ab c"), list(b"d")])
        r = DecodeRunner(dec, SamplingConfig(temperature=1.0), torch.tensor([3, 4]), logits, 40, graph_steps=8)
        with torch.no_grad():
            for _ in range(5):
                r._steps(8, fake)
        outs.append(r.out[:, :40].clone())
        if fake is not None:
            assert fake.calls == ["begin", "end"] * 40
    assert torch.equal(outs[0], outs[1])


def test_dense_k_step_loop_equals_one_step_loop(dense):
    ref = generate(dense, PROMPTS, 21, seed=1)
    assert generate(dense, PROMPTS, 21, seed=1, graph_steps=8) == ref


def _cache_sized_buffers(code: str, n: int) -> list[str]:
    """Buffers of the cache's layout (..., n, head_dim) that the compiled code allocates (a mask over
    the n keys, (..., n), is fine)."""
    return [m for m in re.findall(r"empty_strided\w*\(\(([^)]*)\)", code) if re.search(rf"\b{n}, \d", m)]


@pytest.mark.slow
def test_compiled_cache_writes_stay_in_place(ion, dense):
    """scatter_ into a cache made inductor copy the whole cache every compiled step; the slot writes
    must not allocate anything of the cache's length (max_len 333 is a size nothing else has)."""
    from torch._inductor.utils import run_and_get_code

    n = 333
    dec = decoder_for(ion, 1, n)
    dense_dec = decoder_for(dense, 1, n)
    with torch.no_grad():
        dec.prefill([list(b"abc de f")])
        dense_dec.prefill([list(b"abc de f")])
        commit = torch.ones(1, dtype=torch.bool)
        tok = torch.tensor([97])
        for fn in (lambda: dec.advance_latent(commit), lambda: dense_dec.step(tok)):
            torch._dynamo.reset()
            _, codes = run_and_get_code(torch.compile(fn, dynamic=False))
            assert codes and not _cache_sized_buffers("\n".join(codes), n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_equal_eager(ion):
    m = ion.to("cuda")
    try:
        ref = generate(m, PROMPTS, 70, seed=2, cuda_graphs=False)
        for K in (1, 8):
            assert generate(m, PROMPTS, 70, seed=2, cuda_graphs=True, graph_steps=K) == ref
    finally:
        ion.to("cpu")
