"""The fast batch-1 decode path (issue #4): the precomputed sampling noise, cache writes that
torch.compile keeps in place, decode steps that only update state in place (what CUDA-graph capture
needs), and the runner's bookkeeping around capture (warm-up, a failed capture). The CUDA graphs
themselves are checked by test_cuda_graphs_equal_eager on a GPU and by
benchmarks/bench_generation.py's checks."""
from __future__ import annotations

import collections
import re
import warnings

import pytest
import torch

from ionllama import create_model
from ionllama.errors import UserError
from ionllama.generation import decoder_for, generate, uniform_noise
import ionllama.generation.runner as runner_mod
from ionllama.generation.runner import DecodeRunner
from ionllama.generation.sampling import NoiseSource, SamplingConfig

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=2, d_entropy=16,
            n_entropy_layers=2, entropy_headdim=8, entropy_state=4, ngram_buckets=64, scan_chunk=64,
            max_patch_size=5, local_width=2)
PROMPTS = [b"abc de", b"f", "a longer prompt. ab de\n"]
# unroll > 1 under 'skip' needs CUDA graph conditional nodes (torch's CUDAGraph.begin_capture_to_if_node: not in
# torch 2.11, the GPU machine's; the runner refuses there with a UserError, tested on CPU)
NEEDS_IF_NODES = pytest.mark.skipif(not runner_mod._HAS_IF_NODES, reason="this torch has no CUDA graph IF nodes")


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
def ion_completed():
    """As `ion`, with latent_shift "completed": the latent stage runs inside the byte (3 byte parts)."""
    torch.manual_seed(1)
    m = create_model("tiny", **TINY, patching="entropy", latent_shift="completed").eval()
    with torch.no_grad():
        m.head.weight.mul_(30.0)
        m.from_latent.weight.mul_(30.0)  # the latent visibly moves the logits
        ent = m.entropy_model(torch.randint(0, 256, (2, 64)))["entropy"].flatten()
        m.entropy_threshold.fill_(float(ent.median()))
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


def _runner(model, max_new: int, **kw) -> DecodeRunner:
    dec = decoder_for(model, 2, 64)
    logits = dec.prefill([list(b"ab c"), list(b"d")])
    return DecodeRunner(dec, SamplingConfig(temperature=1.0), torch.tensor([3, 4]), logits, max_new, **kw)


def _eager_bytes(model, n: int, max_new: int) -> torch.Tensor:
    r = _runner(model, max_new, entropy_branch=False)  # the plain iteration, also on CUDA (where "auto" branches)
    r.run(n)
    return r.out[:, :r.n_done].clone()


def test_runner_never_runs_past_max_new(ion):
    """Uneven run() calls give the bytes of one call, and stop at max_new."""
    r = _runner(ion, 23)
    for n in (7, 1, 11, 50):  # the last asks for more than is left
        r.run(n)
    assert r.n_done == 23 and int(r.step_no) == 23
    assert torch.equal(r.out[:, :23], _eager_bytes(ion, 23, 23))


def _state_tensors(obj) -> dict:
    """Every tensor reachable from a decoder's attributes (lists, dicts, local-layer states), by path."""
    out = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) \
        else vars(obj).items()
    for k, v in items:
        if isinstance(v, torch.Tensor):
            out[str(k)] = v
        elif isinstance(v, (list, tuple, dict)) or (hasattr(v, "__dict__") and not isinstance(v, torch.nn.Module)
                                                    and type(v).__module__.startswith("ionllama.generation")):
            out.update({f"{k}.{kk}": vv for kk, vv in _state_tensors(v).items()})
    return out


@pytest.mark.parametrize("kind", ["ion", "ion_completed", "dense", "mamba"])
def test_decode_steps_update_state_in_place(kind, ion, ion_completed, dense):
    """What the runner captures as a CUDA graph must only write into the decoder's existing tensors: a
    graph replays on the tensors it recorded, and capture runs no kernels, so neither a replay nor a
    (failed) capture may leave Python attributes pointing at other tensors. MambaDecoder used to rebind
    its cache every step: a captured graph would have kept reading the pre-capture state."""
    model = {"ion": ion, "ion_completed": ion_completed, "dense": dense}.get(kind) or create_model("tiny", model="mamba", d_model=32, n_layers=2).eval()
    r = _runner(model, 10, latent_policy="always")  # the latent stage runs every byte
    dec = r.dec
    assert dec.capturable
    before = {k: (v, v.data_ptr()) for k, v in _state_tensors(dec).items()}
    assert any(k.startswith("cache") or k in ("k", "lk") for k in before)  # the walk found the caches
    r.run(6)
    after = _state_tensors(dec)
    assert after.keys() == before.keys()
    assert all(after[k] is t and after[k].data_ptr() == p for k, (t, p) in before.items())


@pytest.mark.parametrize("kind", ["ion", "ion_completed", "dense", "mamba"])
def test_prefill_again_keeps_the_state_tensors(kind, ion, ion_completed, dense):
    """DecodeRunner.reset's contract: "start over after the decoder was prefilled again (in place): captured graphs
    stay valid" (bench_generation's sessions prefill one decoder per measurement). MambaDecoder's prefill made new
    cache tensors each time, so a graph captured before would have replayed on the first prompt's state. A second
    prefill now writes into the tensors the steps use, and the runner's bytes equal a fresh decoder's."""
    torch.manual_seed(0)
    model = {"ion": ion, "ion_completed": ion_completed, "dense": dense}.get(kind) or \
        create_model("tiny", model="mamba", d_model=32, n_layers=2).eval()
    r = _runner(model, 30, latent_policy="always")
    r.run(7)
    dec = r.dec
    # (prompt_starts: the prefill's patch flags kept for checks, stepwise_vs_parallel; no step reads them)
    state = lambda: {k: v for k, v in _state_tensors(dec).items() if not k.startswith("prompt_starts")}  # noqa: E731
    before = {k: (v, v.data_ptr()) for k, v in state().items()}
    prompts = [list(b"xyz q"), list(b"w e r t")]
    r.reset(dec.prefill(prompts))
    r.run(12)
    after = state()
    assert after.keys() == before.keys()
    assert all(after[k] is t and after[k].data_ptr() == p for k, (t, p) in before.items())
    fresh = decoder_for(model, 2, 64)
    ref = DecodeRunner(fresh, SamplingConfig(temperature=1.0), torch.tensor([3, 4]), fresh.prefill(prompts), 30,
                       latent_policy="always")
    ref.run(12)
    assert torch.equal(r.out[:, :12], ref.out[:, :12])


def test_recompute_decoder_is_never_captured(ion):
    from ionllama.generation import RecomputeDecoder

    dec = RecomputeDecoder(ion, 1, 16)
    assert not dec.capturable  # its step reads the length on the host


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    """Stands in for a captured CUDA graph: replay() runs the recorded function."""

    def __init__(self, fn):
        self.replay = fn


class _FakeEvent:
    """torch.cuda.Event for the CPU fakes: every replay 'took' 0.25 ms."""

    def __init__(self, enable_timing=False):
        pass

    def record(self):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 0.25


def _fake_cuda(monkeypatch, record):
    """Enough of torch.cuda for DecodeRunner._capture on CPU: streams are no-ops, set_stream is logged."""
    import contextlib

    current, restored = _FakeStream(), []
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current)
    monkeypatch.setattr(torch.cuda, "set_stream", restored.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    # every fake graph is pinned to the tensors of its capture, as a CUDA graph is
    monkeypatch.setattr(DecodeRunner, "_record", lambda self, fn, pool: _PinnedGraph(self, record(fn)))
    return current, restored


class _PinnedGraph:
    """A fake graph bound, like a captured CUDA graph, to the tensors that existed when it was recorded: replaying it
    after the runner or its decoder replaced one of them fails (on a GPU it would read the old memory). The plain
    _FakeGraph re-runs its function on whatever the attributes hold now, so it cannot see a stale graph."""

    def __init__(self, runner, inner):
        self.runner, self.inner, self.ptrs = runner, inner, _tensor_ptrs(runner)

    def replay(self):
        now = _tensor_ptrs(self.runner)
        stale = sorted(k for k in self.ptrs if now.get(k) != self.ptrs[k])
        assert not stale, f"a graph replayed after these tensors were replaced: {stale}"
        self.inner.replay()


def _tensor_ptrs(runner) -> dict:
    # (prompt_starts: the prefill's patch starts, kept for checks against the forward; no step reads them)
    return {k: v.data_ptr() for k, v in _state_tensors(runner).items() if not k.startswith("dec.prompt_starts")}


@pytest.mark.parametrize("n", [5, 6, 23])
def test_warm_up_iterations_count_and_capture_does_not(ion, monkeypatch, n):
    """The runner's bookkeeping around capture, on CPU: the warm-up's real iterations are output bytes
    and count toward run(n); capture itself advances nothing (the fake graph records without running,
    like CUDA); then replays continue. The bytes equal the eager runner's."""
    ref = _eager_bytes(ion, n, 23)
    _fake_cuda(monkeypatch, _FakeGraph)
    r = _runner(ion, 23)
    r.want_graphs = True
    r.run(n)
    assert r.graphs is not None and r.n_done == n and int(r.step_no) == n
    assert torch.equal(r.out[:, :n], ref)


def test_a_streamed_generate_captures_the_graphs_too(ion, monkeypatch):
    """generate() with a stream callback (the CLI's, always) ran the runner one byte at a time, and capture waits
    for a run of more than 4 bytes: a streamed generation never replayed a graph, whatever cuda_graphs said. Its
    first run is now 5 bytes; the bytes equal the eager ones and every chunk still reaches the callback."""
    _fake_cuda(monkeypatch, _FakeGraph)
    import sys

    gen_mod = sys.modules["ionllama.generation.generate"]
    runners = []

    runs = []

    class OnFakeCuda(DecodeRunner):  # CPU logits: say graphs are wanted, as on CUDA
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.want_graphs = kw["cuda_graphs"]
            runners.append(self)

        def run(self, n, gpu_ms=None):
            runs.append((self.want_graphs, n))
            return super().run(n, gpu_ms)

    monkeypatch.setattr(gen_mod, "DecodeRunner", OnFakeCuda)
    monkeypatch.setattr(gen_mod, "_use_cuda_graphs", lambda setting, device, max_new: bool(setting))
    chunks = {}
    streamed = generate(ion, PROMPTS[:2], 30, seed=1, cuda_graphs=True,
                        stream=lambda row, c: chunks.setdefault(row, []).append(c))
    assert runners[-1].graphs is not None  # replayed, not eager
    # with graphs the bytes come back gen_mod.STREAM_CHUNK at a time (each byte read back alone left the GPU idle
    # between replays), the first run long enough to capture
    k = gen_mod.STREAM_CHUNK
    assert 5 <= k < 30 and [n for _, n in runs] == [k] * (30 // k) + ([30 % k] if 30 % k else [])
    runs.clear()
    assert streamed == generate(ion, PROMPTS[:2], 30, seed=1, cuda_graphs=False)
    assert [b"".join(chunks.get(r, [])) for r in range(2)] == streamed
    runs.clear()
    eager_chunks = {}
    assert generate(ion, PROMPTS[:2], 30, seed=1, cuda_graphs=False,
                    stream=lambda row, c: eager_chunks.setdefault(row, []).append(c)) == streamed
    assert {n for _, n in runs} == {1}  # eager streaming: every byte as soon as it is sampled
    # return_info says how the bytes were decoded: replayed after a 3-step warm-up, or all eager
    _, info = generate(ion, PROMPTS[:2], 30, seed=1, cuda_graphs=True, return_info=True, stream=lambda r, c: None)
    how = {k: info["decode"][k] for k in ("steps", "eager_steps", "cuda_graphs", "first_run_steps")}
    assert how == {"steps": 30, "eager_steps": 3, "cuda_graphs": True, "first_run_steps": k}
    _, info = generate(ion, PROMPTS[:2], 30, seed=1, cuda_graphs=False, return_info=True)
    how = {k: info["decode"][k] for k in ("steps", "eager_steps", "cuda_graphs", "first_run_steps")}
    assert how == {"steps": 30, "eager_steps": 30, "cuda_graphs": False, "first_run_steps": 16}


def test_decode_info_counts_graphs_replayed_before_a_last_growth(ion, monkeypatch):
    """return_info's decode.cuda_graphs read the graphs held at the end: caches grown for a last run of <= 4 bytes
    (no capture then, those bytes eager) said no graphs, and --stats printed "no CUDA graphs (19 eager steps)"
    for a generation whose bytes were mostly replayed."""
    import sys

    _fake_cuda(monkeypatch, _FakeGraph)
    gen_mod = sys.modules["ionllama.generation.generate"]

    class OnFakeCuda(DecodeRunner):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.want_graphs = kw["cuda_graphs"]

    monkeypatch.setattr(gen_mod, "DecodeRunner", OnFakeCuda)
    monkeypatch.setattr(gen_mod, "_use_cuda_graphs", lambda setting, device, max_new: bool(setting))
    monkeypatch.setattr(gen_mod, "INITIAL_NEW_BYTES", 16)
    out, info = generate(ion, PROMPTS[:2], 19, seed=1, cuda_graphs=True, return_info=True, stream=lambda r, c: None)
    assert out == generate(ion, PROMPTS[:2], 19, seed=1, cuda_graphs=False)
    how = {k: info["decode"][k] for k in ("steps", "eager_steps", "cuda_graphs")}
    assert how == {"steps": 19, "eager_steps": 6, "cuda_graphs": True}, info  # 3 warm-up, 3 after growth


def test_timed_replays_give_the_same_bytes_and_one_time_per_replay(ion, monkeypatch):
    """run(n, gpu_ms=...) (benchmarks: GPU time per replay) brackets every replay with events and
    changes nothing else: same bytes, one byte-graph time per byte, one latent time per latent replay."""
    n = 23
    ref = _eager_bytes(ion, n, 23)
    _fake_cuda(monkeypatch, _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    r = _runner(ion, 23)
    r.want_graphs, r.latent_policy = True, "skip"
    r.run(8)
    latent_calls = []
    g_bytes, g_lat = r.graphs
    r.graphs = (g_bytes, _FakeGraph(lambda: (latent_calls.append(1), g_lat.replay())))
    times = {}
    r.run(n - 8, gpu_ms=times)
    assert torch.equal(r.out[:, :n], ref)
    assert times["byte"] == [0.25] * (n - 8) and len(times.get("latent", [])) == len(latent_calls) > 0


@pytest.mark.parametrize("graphs", [False, True])
def test_early_flag_policy_gives_the_same_bytes(ion, monkeypatch, graphs):
    """latent_policy 'early' (the byte stage as two parts, the patch flag read between them; on CPU the
    graphs are fakes that record without running, as CUDA does) samples exactly the bytes of 'skip'."""
    n = 23
    ref = _eager_bytes(ion, n, 23)
    if graphs:
        _fake_cuda(monkeypatch, _FakeGraph)
        monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    r = _runner(ion, 23, latent_policy="early")
    assert r.split and len(r._byte_parts) == 2
    r.want_graphs = graphs
    r.run(9)
    r.run(n - 9)
    assert (r.graphs is not None) == graphs and (not graphs or len(r.graphs[0]) == 2)
    assert torch.equal(r.out[:, :n], ref)


@pytest.mark.parametrize("policy,graphs", [("skip", False), ("always", False), ("early", False),
                                           ("skip", True), ("always", True)])
def test_completed_shift_runner_gives_the_bytes_of_the_recompute_decoder(ion_completed, monkeypatch, policy,
                                                                         graphs):
    """latent_shift "completed": three byte parts with the latent stage between the pooling and the
    decoder (flag read after part 1, or the latent every byte with 'always'; graphs are CPU fakes that
    record without running, as CUDA does) sample exactly the bytes of the full forward rerun per byte."""
    from ionllama.generation import RecomputeDecoder

    n = 23
    dec = RecomputeDecoder(ion_completed, 2, 64)
    logits = dec.prefill([list(b"ab c"), list(b"d")])
    ref = DecodeRunner(dec, SamplingConfig(temperature=1.0), torch.tensor([3, 4]), logits, n)
    ref.run(n)
    if graphs:
        _fake_cuda(monkeypatch, _FakeGraph)
        monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    r = _runner(ion_completed, n, latent_policy=policy)
    assert r.completed and r.split and len(r._byte_parts) == 3
    r.want_graphs = graphs
    r.run(9)
    r.run(n - 9)
    assert (r.graphs is not None) == graphs and (not graphs or len(r.graphs[0]) == 3)
    assert int(r.dec.n_complete.min()) >= 3  # patches were committed along the way
    assert torch.equal(r.out[:, :n], ref.out[:, :n])


@pytest.mark.parametrize("shift,graphs", [("previous", False), ("previous", True), ("completed", False),
                                          ("completed", True)])
def test_entropy_branch_gives_the_same_bytes(ion, ion_completed, monkeypatch, shift, graphs):
    """entropy_branch (the entropy model forked onto a second stream inside the byte graph; with "completed"
    beside embedding, encoder and pooling, joined before the latent stage; here the stream and graphs are CPU
    fakes that run in order, as a GPU may) samples exactly the bytes of the plain runner, patches committed along
    the way, and can be switched between runs."""
    model = ion if shift == "previous" else ion_completed
    n = 23
    ref = _eager_bytes(model, n, n)
    if graphs:
        _fake_cuda(monkeypatch, _FakeGraph)
        monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    r = _runner(model, n, entropy_branch=True)
    parts = [r._completed_branched, r._byte_parts[2]] if shift == "completed" else [r._iteration_branched]
    assert r.can_branch and r.entropy_branch and r._parts() == parts and r._latent_at() == len(parts) - 1
    if graphs:
        r.branch_stream = _FakeStream()  # the fork / join path (a CPU runner has no second stream)
    r.want_graphs = graphs
    r.run(9)
    assert (r.graphs is not None) == graphs and (not graphs or len(r.graphs[0]) == len(parts))
    if not graphs:  # switched off and on again between runs (eager: the next iteration takes it)
        r.entropy_branch = False
        r.run(5)
        r.entropy_branch = True
    r.run(n - r.n_done)
    assert int(r.dec.n_complete.min()) >= 3  # patches were committed along the way
    assert torch.equal(r.out[:, :n], ref)


def test_entropy_branch_refused_where_it_cannot_run(ion, ion_completed):
    """No entropy model in use (fixed patching) or the 'early' split of latent_shift "previous": a one-line
    UserError instead of a silent plain runner. "completed" can branch (its 'early' is its own split)."""
    fixed = create_model("tiny", **TINY, patching="fixed").eval()
    for model, kw in ((fixed, {}), (ion, {"latent_policy": "early"})):
        with pytest.raises(UserError, match="entropy_branch is for ionLlama with entropy patching"):
            _runner(model, 8, entropy_branch=True, **kw)
    assert not _runner(fixed, 8).can_branch and _runner(ion, 8).can_branch
    assert _runner(ion_completed, 8, latent_policy="early", entropy_branch=True).can_branch


def test_entropy_branch_auto_and_bad_values(ion, ion_completed):
    """The default "auto" turns the branch on only on CUDA (no second stream here, so off), never raises where
    it cannot run, and a value other than True / False / "auto" is a one-line UserError."""
    for model in (ion, ion_completed, create_model("tiny", **TINY, patching="fixed").eval()):
        assert not _runner(model, 8).entropy_branch  # CPU: the plain iteration
    with pytest.raises(UserError, match="entropy_branch must be True, False or 'auto'"):
        _runner(ion, 8, entropy_branch="on")


def test_generate_takes_entropy_branch_and_unroll(ion, dense):
    """generate() passes entropy_branch and unroll to the runner: the defaults and explicit off give the same
    bytes on CPU, asking for the branch where it cannot run is a UserError (dense bytes, no entropy model), and so
    is a bad unroll."""
    base = generate(ion, PROMPTS, 12, seed=3)
    assert generate(ion, PROMPTS, 12, seed=3, entropy_branch=False, unroll=4) == base
    with pytest.raises(UserError, match="entropy_branch is for ionLlama with entropy patching"):
        generate(dense, b"ab", 4, entropy_branch=True)
    with pytest.raises(UserError, match="unroll must be a whole number"):
        generate(ion, b"ab", 4, unroll=0)


def test_generate_takes_overlap_latent(ion, monkeypatch):
    """generate(overlap_latent=...) reaches the runner (and keys a session's kept runner); True where the latent step
    cannot overlap (entropy patching) is a one-line UserError before any prefill, and so is a bad value. On CPU
    (no graphs) the overlap never runs, so True and False give the same bytes."""
    import importlib
    gen_mod = importlib.import_module("ionllama.generation.generate")
    fixed = create_model("tiny", **TINY, patching="fixed").eval()
    seen = []
    orig = gen_mod.DecodeRunner

    asked = []

    class Recording(orig):
        def __init__(self, *a, **kw):
            asked.append(kw.get("overlap_latent"))
            super().__init__(*a, **kw)
            seen.append(self.overlap)
    monkeypatch.setattr(gen_mod, "DecodeRunner", Recording)
    on = generate(fixed, b"ab c", 10, seed=1, overlap_latent=True)
    assert seen == [True] and generate(fixed, b"ab c", 10, seed=1, overlap_latent=False) == on and seen[1] is False
    generate(fixed, b"ab c", 10, seed=1)
    assert seen[2] is False  # "auto": off without CUDA graphs
    from ionllama.generation.generate import DecodeSession
    s = DecodeSession()
    generate(fixed, b"ab c", 10, seed=1, overlap_latent=True, session=s)
    assert generate(fixed, b"ab c", 10, seed=1, overlap_latent=False, session=s) == on
    assert s.reuses == 0 and seen[3:] == [True, False]  # another overlap_latent: a new runner, not the kept one
    del seen[3:]
    prefills = []
    monkeypatch.setattr(type(decoder_for(ion, 1, 8)), "prefill", lambda self, rows: prefills.append(1))
    with pytest.raises(UserError, match="overlap_latent needs ionLlama with fixed patching"):
        generate(ion, b"ab", 4, overlap_latent=True)  # entropy patching
    with pytest.raises(UserError, match="overlap_latent must be True, False or 'auto'"):
        generate(fixed, b"ab", 4, overlap_latent="on")
    with pytest.raises(UserError, match="unroll > 1 does not combine"):
        generate(fixed, b"ab", 4, overlap_latent=True, unroll=4)
    assert prefills == [] and len(seen) == 3
    monkeypatch.undo()
    monkeypatch.setattr(gen_mod, "DecodeRunner", Recording)
    generate(fixed, b"ab c", 6, seed=1, unroll=4)  # "auto" yields to an explicit unroll (their replays do not mix)
    assert asked[-1] is False
    with pytest.raises(UserError, match="unroll > 1 does not combine"):
        _runner(fixed, 8, overlap_latent=True, unroll=4)


def test_generate_syncs_in_whole_unrolled_launches_and_not_when_streaming(ion, monkeypatch):
    """generate() reads bytes back every 16 without a stream callback, rounded up to whole unrolled launches
    (unroll 8: 16, unroll 12: 24); with a callback every byte, and then nothing is unrolled."""
    import sys

    gen_mod = sys.modules["ionllama.generation.generate"]  # (the package's `generate` is the function)

    seen = []

    class Recorder(DecodeRunner):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append(("unroll", self.unroll))

        def run(self, n, gpu_ms=None):
            seen.append(n)
            return super().run(n, gpu_ms)

    monkeypatch.setattr(gen_mod, "DecodeRunner", Recorder)
    for unroll, runs in ((8, [16, 16, 8]), (12, [24, 16])):
        seen.clear()
        generate(ion, b"ab", 40, seed=1, unroll=unroll)
        assert seen == [("unroll", unroll)] + runs
    seen.clear()
    generate(ion, b"ab", 3, seed=1, unroll=8, stream=lambda row, chunk: None)
    assert seen == [("unroll", 1), 1, 1, 1]


def test_compile_presets_are_inductor_settings():
    """Every decode compile preset names settings this torch's inductor has; each turns inductor's programmatic
    dependent launch off explicitly where inductor has it (torch 2.11's inductor loads scalar inputs before its
    gdc_wait: stale patch state, wrong bytes on an H100, docs/results/checks-s56.md; explicitly, so that
    TORCHINDUCTOR_ENABLE_PDL=1 cannot turn it on), and compile=True is the "default" preset."""
    import torch._inductor.config as ind
    from ionllama.generation.runner import COMPILE_PRESETS, compile_options

    for name, opts in COMPILE_PRESETS.items():
        for key in opts:
            target = ind
            for part in key.split("."):
                target = getattr(target, part)  # AttributeError: a setting inductor does not have
        assert opts.get("triton.enable_pdl", "absent") == (False if hasattr(ind.triton, "enable_pdl") else "absent")
    assert compile_options(True) == COMPILE_PRESETS["default"] and compile_options(False) is None


def test_compile_mode_with_inductor_pdl_on_is_refused(ion, monkeypatch):
    """A compile_mode (torch.compile's mode, no options) leaves inductor's PDL to its global setting: on there
    (TORCHINDUCTOR_ENABLE_PDL=1), the runner refuses in one line instead of decoding with the stale loads."""
    from ionllama.generation import runner as runner_mod
    monkeypatch.setattr(runner_mod, "_PDL", {"triton.enable_pdl": True})
    monkeypatch.setattr(torch._inductor.config.triton, "enable_pdl", True, raising=False)
    with pytest.raises(UserError, match="programmatic dependent launch is on"):
        _runner(ion, 8, compile=True, compile_mode="default")
    monkeypatch.setattr(torch._inductor.config.triton, "enable_pdl", False, raising=False)
    assert _runner(ion, 8, compile=True, compile_mode="default") is not None


def _fake_unrolled(monkeypatch, launches: list):

    """The unrolled graph as a CPU fake: replay() runs the unrolled iterations with the flag read on the host
    where CUDA would evaluate a conditional node; every replay is logged."""
    def record(self, pool):
        k = self.unroll  # what a real graph holds from its capture on

        def replay():
            launches.append(self.n_done)
            self._unrolled_body(self._when_eager, k)
        return _FakeGraph(replay)
    monkeypatch.setattr(DecodeRunner, "_record_unrolled", record)
    monkeypatch.setattr(runner_mod, "_HAS_IF_NODES", True)  # (a CPU build of torch has no conditional nodes)


@pytest.mark.parametrize("shift,policy,branch", [("previous", "skip", False), ("previous", "always", False),
                                                 ("previous", "early", False), ("completed", "skip", False),
                                                 ("completed", "always", False), ("previous", "skip", True),
                                                 ("completed", "skip", True)])
def test_unrolled_graph_gives_the_same_bytes(ion, ion_completed, monkeypatch, shift, policy, branch):
    """unroll=4: the host launches one graph per 4 bytes, the latent stage of each byte decided inside it; the
    rest (fewer than 4 bytes left) goes byte by byte. Same bytes as the eager runner, patches committed along the
    way, and n_done advances by whole launches (CPU fakes of graphs, run in order as a GPU would)."""
    model = ion if shift == "previous" else ion_completed
    n = 23
    ref = _runner(model, n, latent_policy=policy, entropy_branch=False)
    ref.run(n)
    _fake_cuda(monkeypatch, _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    launches = []
    _fake_unrolled(monkeypatch, launches)
    r = _runner(model, n, latent_policy=policy, unroll=4, entropy_branch=branch)
    if branch:
        r.branch_stream = _FakeStream()
    r.want_graphs = True
    r.run(9)  # 3 warm-up bytes, then one launch of 4, then 2 bytes one by one
    assert r.n_done == 9 and launches == [3] and r.multi_graph is not None
    r.unroll = 16  # changed without a new capture: launches still count the 4 bytes the graph holds
    r.run(n - 9)  # 14 left: three launches, then 2 bytes
    assert launches == [3, 9, 13, 17] and r.n_done == n
    assert int(r.dec.n_complete.min()) >= 3  # patches were committed along the way
    assert torch.equal(r.out[:, :n], ref.out[:, :n])


def test_unroll_refused_without_conditional_nodes(ion, dense, monkeypatch):
    """A torch without CUDA graph conditional nodes: unroll > 1 is a one-line UserError when graphs are to be
    captured with a latent stage that runs only where a patch opens; 'always' and models without a latent
    stage (dense) need no conditional node and are accepted."""
    monkeypatch.setattr(runner_mod, "_HAS_IF_NODES", False)
    r = _runner(ion, 8, unroll=4)
    r.want_graphs = True
    with pytest.raises(UserError, match="unroll > 1 needs CUDA graph conditional nodes"):
        r._check_unroll()
    r.latent_policy = "always"
    r._check_unroll()
    d = DecodeRunner(decoder_for(dense, 1, 32), SamplingConfig(), torch.tensor([0]), torch.zeros(1, 256), 8, unroll=4)
    d.want_graphs = True
    d._check_unroll()


def test_unrolled_graph_not_used_for_timed_replays(ion, monkeypatch):
    """GPU times per graph (run(gpu_ms=...)) come from the per-byte graphs, and a bad unroll is a UserError."""
    _fake_cuda(monkeypatch, _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    launches = []
    _fake_unrolled(monkeypatch, launches)
    r = _runner(ion, 23, unroll=4)
    r.want_graphs = True
    r.run(5)
    gpu = {}
    r.run(8, gpu_ms=gpu)
    assert launches == [] and len(gpu["byte"]) == 8
    for bad in (0, True, "4", 2.0):
        with pytest.raises(UserError, match="unroll must be a whole number"):
            _runner(ion, 8, unroll=bad)


@pytest.mark.parametrize("graphs,host", [pytest.param(False, False, id="eager"), pytest.param(True, True, id="host"),
                                         pytest.param(True, False, id="flag")])
def test_lagged_runner_gives_the_bytes_of_the_recompute_decoder(monkeypatch, graphs, host):
    """latent_shift "lagged": with graphs (CPU fakes that run in order) and 'skip', the latent step's commit
    graph runs on the bytes' stream and its compute graph on latent_stream, one per committed patch; the bytes equal
    the full forward rerun per byte (RecomputeDecoder), as do the eager runner's. Fixed patching (lagged_host): the
    host tells the patch starts, with no flag read after a byte, over runs of every length (its state kept between
    them); without it, the flag is read after every byte."""
    from ionllama.generation import RecomputeDecoder

    torch.manual_seed(1)
    m = create_model("tiny", **TINY, patching="fixed", fixed_patch_size=3, latent_shift="lagged").eval()
    with torch.no_grad():
        m.head.weight.mul_(30.0)
        m.from_latent.weight.mul_(30.0)  # the latent visibly moves the logits
    n = 23
    prompts, seeds = [list(b"ab c"), list(b"de"), list(b"fgh")], torch.tensor([3, 4, 5])  # three patch phases
    dec = RecomputeDecoder(m, 3, 64)
    ref = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, dec.prefill(prompts), n)
    ref.run(n)
    if graphs:
        _fake_cuda(monkeypatch, _FakeGraph)
        monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    dec = decoder_for(m, 3, 64)
    r = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, dec.prefill(prompts), n, latent_policy="skip")
    assert r.lagged and not r.split and r.lagged_host
    r.lagged_host = host
    computes, reads = [], []
    if graphs:
        r.latent_stream, r.byte_stream = _FakeStream(), _LogStream()
        r.want_graphs = True
        r.run(9)  # warm-up and capture, then replays
        commit, compute = r.lag_graphs
        r.lag_graphs = (commit, _FakeGraph(lambda: (computes.append(1), compute.replay())))
        flag = DecodeRunner._latent_needed
        monkeypatch.setattr(DecodeRunner, "_latent_needed", lambda self: (reads.append(1), flag(self))[1])
        assert r.byte_stream.waited  # the bytes' stream waited for the current one (and for latent_stream)
    for k in (1, 2, 5, n):  # runs of several lengths, and a kept host state between them
        r.run(k)
        assert not (graphs and host) or r._lag_h[0] == r.n_done
    assert r.n_done == n and int(r.dec.n_complete.min()) >= 4  # patches were committed along the way
    assert not graphs or len(computes) >= 3  # the lagged path ran (one compute per boundary)
    assert not graphs or (reads == [] if host else len(reads) >= 10)
    assert torch.equal(r.out[:, :n], ref.out[:, :n])


@pytest.mark.parametrize("rows,pairs", [(1, False), (1, True), (2, True), (3, True)])
def test_overlapped_latent_gives_the_bytes_of_the_recompute_decoder(monkeypatch, rows, pairs):
    """overlap_latent ("previous", fixed patching, graphs as CPU fakes that run in order): a byte that closes a patch
    stages it after its encoder, the latent step's compute runs on the latent stream, and the next byte shows it
    between its encoder and its decoder. The bytes equal the full forward rerun per byte (RecomputeDecoder) over runs
    of several lengths (a staged step kept between them) and across a run by another path (which uncounts the staged
    step and runs it again the plain way). With pairs, a closing byte and the next one are one graph (the compute
    forked inside it) wherever both fit in the run."""
    from ionllama.generation import RecomputeDecoder

    torch.manual_seed(2)
    m = create_model("tiny", **TINY, patching="fixed", fixed_patch_size=3).eval()
    with torch.no_grad():
        m.head.weight.mul_(30.0)
        m.from_latent.weight.mul_(30.0)  # the latent visibly moves the logits
    n = 29
    prompts = [list(b"ab c"), list(b"de"), list(b"fgh")][:rows]  # three patch phases
    seeds = torch.tensor([3, 4, 5])[:rows]
    dec = RecomputeDecoder(m, rows, 64)
    ref = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, dec.prefill(prompts), n)
    ref.run(n)
    _fake_cuda(monkeypatch, _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    dec = decoder_for(m, rows, 64)
    r = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, dec.prefill(prompts), n, overlap_latent=True)
    assert r.overlap and r.host_schedule and not r.completed
    assert not DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, r.logits, n).overlap  # "auto": no graphs
    with pytest.raises(UserError, match="overlap_latent needs ionLlama with fixed patching"):
        _runner(create_model("tiny", **TINY).eval(), 8, overlap_latent=True)  # entropy patching
    with pytest.raises(UserError, match="overlap_latent follows the patch ends on the host"):
        DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, r.logits, n, overlap_latent=True, host_schedule=False)
    r.latent_stream, r.byte_stream = _LogStream(), _LogStream()
    r.want_graphs = True
    r.ov_pairs = pairs
    r.run(6)  # warm-up (4 bytes) and capture, then replays
    pieces = {"latent", "byte", "encode", "encode_stage", "show_decode", "show_stage", "decode", "compute"}
    assert r.eager_steps == 4 and set(r.ov_graphs) == pieces | ({"pair"} if pairs else set())
    log = []
    r.ov_graphs = {k: _FakeGraph(lambda k=k, g=g: (log.append(k), g.replay())) for k, g in r.ov_graphs.items()}
    for k in (1, 2, 5):  # runs of several lengths
        r.run(k)
    r.overlap = False  # a run by the plain scheduled path
    log.append("other path")
    r.run(4)
    assert r._ov_pending_at is None
    r.overlap = True
    r.run(n)
    assert r.n_done == n and int(r.dec.n_complete.min()) >= 7
    assert torch.equal(r.out[:, :n], ref.out[:, :n])
    assert log.count("compute") + log.count("pair") >= 4 and r.latent_stream.waited and r.byte_stream.waited
    if pairs and rows == 1:  # every closing byte with its next one in the run: a pair
        assert log.count("pair") >= 4 and log.count("encode_stage") <= 3
        return
    # two phases of 3-byte patches: a byte that closes one row's patch is followed by one that closes the other's (a
    # pair there would stage the second patch too late); three phases: every byte opens a patch for some row
    assert "pair" not in log
    staged = [i for i, k in enumerate(log) if k in ("encode_stage", "show_stage")]
    for i in staged:  # the compute right after the stage, the byte's decoder after it
        assert log[i + 1:i + 3] == ["compute", "decode"]
    if rows == 1:  # one phase: a closing byte stages, the next shows; no byte does both
        assert "show_stage" not in log and log.count("show_decode") >= 3 and "byte" in log
        after = [tuple(log[i + 3:i + 5]) for i in staged]  # the next byte: its encoder, then show and decoder
        assert set(after[:-1]) == {("encode", "show_decode"), ("other path", "byte")}, after
    else:  # two or three phases: a byte opens a patch for one row and closes one for another
        assert log.count("show_stage") >= 5


def test_overlap_priority_swaps_the_replay_streams(monkeypatch):
    """set_overlap_priority: "latent" gives the latent step's replay stream the high priority (-1) and the bytes'
    the normal one, "bytes" the reverse; a runner without the overlap keeps its streams; anything else is a one-line
    UserError."""
    from ionllama.generation import runner as runner_mod

    _fake_cuda(monkeypatch, _FakeGraph)
    made = []
    monkeypatch.setattr(runner_mod, "reusable_stream", lambda dev, role, priority=0: (made.append((role, priority)),
                                                                                       (role, priority))[1])
    m = create_model("tiny", **TINY, patching="fixed", fixed_patch_size=3).eval()
    dec = decoder_for(m, 1, 64)
    r = DecodeRunner(dec, SamplingConfig(temperature=1.0), torch.tensor([1]), dec.prefill([list(b"ab")]), 8,
                     overlap_latent=True)
    assert r.overlap_priority == "bytes"
    r.latent_stream = r.byte_stream = "on CUDA"  # (CPU tensors: the runner made no side streams)
    r.set_overlap_priority("latent")
    assert (r.byte_stream, r.latent_stream) == (("decode_bytes", 0), ("decode_latent", -1))
    r.set_overlap_priority("bytes")
    assert (r.byte_stream, r.latent_stream) == (("decode_bytes", -1), ("decode_latent", 0))
    r.overlap = False
    made.clear()
    r.set_overlap_priority("latent")
    assert made == [] and r.overlap_priority == "latent"
    with pytest.raises(UserError, match="overlap priority must be 'bytes' or 'latent'"):
        r.set_overlap_priority("high")


class _DeferredStream:
    """A fake latent stream whose work runs as late as the streams' edges allow: queued, and run only when the bytes'
    stream waits for it. A missing join, or a compute that reads live state instead of its staged copies, then
    changes the bytes on CPU too."""

    def __init__(self):
        self.queue = []

    def wait_stream(self, other):
        pass

    def flush(self):
        q, self.queue = self.queue, []
        for f in q:
            f()


class _JoiningStream:
    def __init__(self, side):
        self.side = side

    def wait_stream(self, other):
        if other is self.side:
            self.side.flush()


def _overlap_model(k: int):
    torch.manual_seed(2)
    m = create_model("tiny", **TINY, patching="fixed", fixed_patch_size=k).eval()
    with torch.no_grad():
        m.head.weight.mul_(30.0)
        m.from_latent.weight.mul_(30.0)  # the latent visibly moves the logits
    return m


def _plain_bytes(m, prompts, seeds, n):
    dec = decoder_for(m, len(prompts), 64)
    ref = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, dec.prefill(prompts), n, host_schedule=False)
    ref.run(n)
    return ref.out[:, :n].clone()


@pytest.mark.parametrize("rows,pairs,k", [(1, False, 3), (1, True, 3), (3, True, 4), (1, True, 2), (2, False, 1)])
def test_overlapped_latent_with_the_latent_stream_as_late_as_allowed(monkeypatch, rows, pairs, k):
    """overlap_latent with the latent step's compute deferred to the join before the next byte's show (the latest a
    GPU could run it): the bytes of the plain runner, for several patch sizes, phases and run lengths."""
    m, n = _overlap_model(k), 40
    prompts, seeds = [list(b"ab c"), list(b"de"), list(b"fgh")][:rows], torch.tensor([3, 4, 5])[:rows]
    ref = _plain_bytes(m, prompts, seeds, n)
    _fake_cuda(monkeypatch, _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    side = _DeferredStream()
    main = _JoiningStream(side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: main)
    dec = decoder_for(m, rows, 64)
    r = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, dec.prefill(prompts), n, overlap_latent=True)
    r.latent_stream, r.byte_stream, r.want_graphs, r.ov_pairs = side, main, True, pairs
    r.run(6)
    compute = r._ov_fns[4]
    r._ov_fns[4] = lambda: side.queue.append(compute)  # (the pair graph's fork calls it)
    g = r.ov_graphs["compute"]
    r.ov_graphs["compute"] = _FakeGraph(lambda: side.queue.append(g.replay))
    for k_run in (1, 2, 5, 7, n):
        r.run(k_run)
    assert torch.equal(r.out[:, :n], ref)


@pytest.mark.parametrize("k", [2, 4])
def test_overlapped_latent_survives_host_schedule_switches_and_counts_patches(monkeypatch, k):
    """host_schedule switched off and on between runs of an overlapping runner (profile_decode_step's sched sweep):
    the warm-up and capture in between do not follow a stale host state, and the bytes stay the plain runner's. A
    staged step is not yet a patch in patches_counted (the plain path runs it before the next byte)."""
    m, n = _overlap_model(k), 29
    prompts, seeds = [list(b"ab c"), list(b"de")], torch.tensor([3, 4])
    ref = _plain_bytes(m, prompts[:1], seeds[:1], n)
    _fake_cuda(monkeypatch, _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    dec = decoder_for(m, 1, 64)
    r = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds[:1], dec.prefill(prompts[:1]), n, overlap_latent=True)
    r.latent_stream, r.byte_stream, r.want_graphs = _LogStream(), _LogStream(), True
    r.run(7)
    r.set_host_schedule(False)
    r.run(8)
    r.set_host_schedule(True)
    r.run(6)  # warm-up and capture again
    pending = []
    plain = decoder_for(m, 1, 64)  # the plain path's count after the same bytes: a prefill over prompt and output
    while r.n_done < n:
        r.run(1)
        pending.append(r._ov_pending_at is not None)
        plain.prefill([prompts[0] + r.out[0, :r.n_done].tolist()])  # (the runner fed every byte it sampled)
        assert int(r.patches_counted()[0]) == int(plain.n_complete[0]) == int(r.dec.n_complete[0]) - pending[-1]
    assert torch.equal(r.out[:, :n], ref) and any(pending) and not all(pending)


def test_failed_capture_raises_and_keeps_warm_up_state(ion, monkeypatch):
    """A failed capture raises a clear error (no silent fallback), with the current stream restored;
    the runner holds exactly the warm-up's bytes."""
    def record(fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    current, restored = _fake_cuda(monkeypatch, record)
    r = _runner(ion, 23)
    r.want_graphs = True
    with pytest.raises(runner_mod.GraphCaptureError, match="cuda_graphs=False"):  # (a RuntimeError)
        r.run(20)
    assert restored == [current] and r.graphs is None
    assert r.n_done == 3 and int(r.step_no) == 3
    assert torch.equal(r.out[:, :3], _eager_bytes(ion, 3, 23)) and not r.out[:, 3:].any()


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
def test_cuda_graphs_equal_eager(ion):
    m = ion.to("cuda")
    try:
        ref = generate(m, PROMPTS, 70, seed=2, cuda_graphs=False)
        assert generate(m, PROMPTS, 70, seed=2, cuda_graphs=True) == ref
    finally:
        ion.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("policy", ["early", "skip", "always"])
def test_byte_graphs_equal_eager_on_cuda(ion, policy):
    """On a GPU, the byte stage as captured by default: 'early', two byte graphs, the patch flag copied to pinned
    host memory inside the first and read after an event; 'skip' / 'always', one byte graph with the entropy
    model on a second stream ("auto" for 2 rows on CUDA), forked and joined inside it. The bytes equal the
    plain eager runner's."""
    m = ion.to("cuda")
    try:
        ref = _eager_bytes(m, 40, 40)
        r = _runner(m, 40, latent_policy=policy, cuda_graphs=True)
        branched = policy != "early"  # ('early' splits the byte stage instead)
        assert r.entropy_branch == branched and (r.branch_stream is not None) == branched
        r.run(40)
        assert r.graphs is not None and len(r.graphs[0]) == (1 if branched else 2)
        assert torch.equal(r.out[:, :40], ref)
    finally:
        ion.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (a second CUDA stream)")
@pytest.mark.parametrize("shift", ["previous", "completed"])
def test_entropy_branch_without_graphs_on_cuda(ion, ion_completed, shift):
    """The entropy branch run eagerly on a GPU (what "auto" does where graphs are off or not possible): the fork onto
    the second stream and the join happen per byte through the caching allocator, not inside a graph's pool; the
    bytes equal the plain runner's."""
    model = ion if shift == "previous" else ion_completed
    m = model.to("cuda")
    try:
        ref = _eager_bytes(m, 40, 40)
        r = _runner(m, 40)
        assert r.entropy_branch and r.branch_stream is not None and not r.want_graphs
        r.run(40)
        assert r.graphs is None and torch.equal(r.out[:, :40], ref)
    finally:
        model.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("patching", [dict(patching="entropy"), dict(patching="fixed", fixed_patch_size=3)])
def test_lagged_overlap_graphs_equal_eager_on_cuda(patching):
    """latent_shift "lagged" on a GPU: the latent compute graph on its own stream, overlapping the next bytes'
    graphs on a high-priority one (fixed patching: the patch starts followed on the host, kept between runs); the
    bytes equal the eager runner's."""
    torch.manual_seed(1)
    m = create_model("tiny", **TINY, **patching, latent_shift="lagged").eval().to("cuda")
    with torch.no_grad():
        m.from_latent.weight.mul_(30.0)
    ref = _eager_bytes(m, 60, 60)
    r = _runner(m, 60, latent_policy="skip", cuda_graphs=True)
    for k in (9, 1, 2, 48):
        r.run(k)
    assert r.lag_graphs is not None and r.latent_stream is not None and r.byte_stream is not None
    assert r.lagged_host == (patching["patching"] == "fixed")
    assert torch.equal(r.out[:, :60], ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rows,pairs", [(1, False), (1, True), (3, False)])
def test_overlapped_latent_graphs_equal_eager_on_cuda(rows, pairs):
    """overlap_latent on a GPU ("previous", fixed patching): the latent compute graph on the latent stream while the
    bytes' graphs run on a high-priority one, shown before the next byte's decoder; over runs of several lengths (a
    staged step kept between them) and one run by the plain scheduled path, the bytes equal the eager runner's."""
    torch.manual_seed(1)
    m = create_model("tiny", **TINY, patching="fixed", fixed_patch_size=3).eval().to("cuda")
    with torch.no_grad():
        m.from_latent.weight.mul_(30.0)
    prompts, seeds = [list(b"ab c"), list(b"de"), list(b"fgh")][:rows], torch.arange(rows) + 3
    dec = decoder_for(m, rows, 80)
    ref = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, dec.prefill(prompts), 60)
    ref.run(60)
    dec = decoder_for(m, rows, 80)
    r = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, dec.prefill(prompts), 60, cuda_graphs=True,
                     overlap_latent=True)
    assert r.overlap and not r.ov_pairs  # (asked for; "auto" is on at batch <= 2 under graphs; pairs off)
    r.ov_pairs = pairs
    auto = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, ref.logits, 60, cuda_graphs=True)
    assert auto.overlap == (rows <= 2) and not DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, ref.logits,
                                                             60, cuda_graphs=True, host_schedule=False).overlap
    for k in (9, 1, 2, 5):
        r.run(k)
    r.overlap = False
    r.run(4)
    r.overlap = True
    r.run(60)
    assert r.ov_graphs is not None and ("pair" in r.ov_graphs) == pairs and r.latent_stream is not None
    assert r.byte_stream is not None
    assert r.eager_steps == 4 and r.n_done == 60
    assert torch.equal(r.out[:, :60], ref.out[:, :60])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("conv_kernel,rows", [(4, 1), (1, 1), (1, 2)])
def test_compiled_overlapped_latent_equals_eager_on_cuda(monkeypatch, conv_kernel, rows):
    """overlap_latent under torch.compile, which changed the sampled bytes at one prompt on an H100 (8 of 8 seeds
    with the byte's first part compiled as one function, 3 of 4 split in two with conv_kernel 1) while inductor's
    programmatic dependent launch was on (its kernels loaded the position and flags before waiting for the kernel
    that wrote them; docs/results/checks-s55.md, checks-s56.md): it must give the eager runner's bytes, at one
    prompt and at two ("auto" turns it on at both). Every runner compiles its parts afresh: the recompile limit is
    raised, else dynamo would run them eagerly past it and prove nothing."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 256)
    torch.manual_seed(0)  # the model of scripts/diag_decode_paths.py (--model_kw conv_kernel=1 for the second)
    m = create_model("tiny", d_model=64, n_layers=2, n_heads=2, d_local=64, n_enc_layers=1, n_dec_layers=2,
                     patching="fixed", conv_kernel=conv_kernel).eval().to("cuda")
    prompt = [list(b"def main("), list(b"import torch\n")][:rows]
    for seed in (1, 2, 3, 4):
        seeds = torch.tensor([seed, seed + 10][:rows])
        dec = decoder_for(m, rows, 160)
        ref = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, dec.prefill(prompt), 96)
        ref.run(96)
        dec = decoder_for(m, rows, 160)
        logits = dec.prefill(prompt)
        assert DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, logits.clone(), 96, cuda_graphs=True,
                            compile=True).overlap  # ("auto" picks it here)
        r = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, logits, 96, cuda_graphs=True, compile=True,
                         overlap_latent=True)
        assert r.overlap
        r.run(96)
        assert r.ov_graphs is not None and r.n_done == 96
        assert torch.equal(r.out[:, :96], ref.out[:, :96]), f"seed {seed}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("policy,unroll", [("skip", 1), ("always", 1), pytest.param("skip", 8, marks=NEEDS_IF_NODES)])
def test_completed_entropy_branch_graphs_equal_eager_on_cuda(ion_completed, policy, unroll):
    """latent_shift "completed" with entropy_branch=True on a GPU (what "auto" picks there at batch <= 2): the
    entropy model beside the encoder in the first byte graph, joined before the latent graph; alone and unrolled;
    bytes of the plain runner."""
    m = ion_completed.to("cuda")
    try:
        ref = _runner(m, 40, latent_policy=policy, entropy_branch=False)
        ref.run(40)
        assert _runner(m, 8).entropy_branch and not _runner(m, 8, entropy_branch=False).entropy_branch
        r = _runner(m, 40, latent_policy=policy, cuda_graphs=True, entropy_branch=True, unroll=unroll)
        r.run(40)
        assert r.graphs is not None and len(r.graphs[0]) == 2 and (r.multi_graph is not None) == (unroll > 1)
        assert torch.equal(r.out[:, :40], ref.out[:, :40])
    finally:
        ion_completed.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("shift,policy", [pytest.param("previous", "skip", marks=NEEDS_IF_NODES), ("previous", "always"),
                                          pytest.param("completed", "skip", marks=NEEDS_IF_NODES)])
def test_unrolled_graph_equals_eager_on_cuda(ion, ion_completed, shift, policy):
    """unroll=8 on a GPU: eight iterations per graph launch, each latent stage a conditional graph node on the
    flag the byte before set (the entropy branch on, as by default at 2 rows); 40 bytes = 3 warm-up + 4 launches + 5
    single bytes, equal to the plain eager runner's."""
    model = ion if shift == "previous" else ion_completed
    m = model.to("cuda")
    try:
        ref = _runner(m, 40, latent_policy=policy, entropy_branch=False)
        ref.run(40)
        r = _runner(m, 40, latent_policy=policy, cuda_graphs=True, unroll=8)
        r.run(40)
        assert r.multi_graph is not None
        assert int(r.dec.n_complete.min()) >= 3
        assert torch.equal(r.out[:, :40], ref.out[:, :40])
    finally:
        model.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("policy", ["skip", "always"])
def test_completed_shift_graphs_equal_eager_on_cuda(ion_completed, policy):
    """latent_shift "completed" on a GPU: three byte graphs, the latent graph between the second and the
    third (flag from pinned host memory, or every byte with 'always'), or two with the entropy branch (on by
    default where it can run: the first two parts as one); the bytes equal the eager runner's."""
    m = ion_completed.to("cuda")
    try:
        ref = _runner(m, 40, latent_policy=policy)
        ref.run(40)
        r = _runner(m, 40, latent_policy=policy, cuda_graphs=True)
        r.run(40)
        assert r.graphs is not None and len(r.graphs[0]) == (2 if r.entropy_branch and r.can_branch else 3)
        assert torch.equal(r.out[:, :40], ref.out[:, :40])
    finally:
        ion_completed.to("cpu")


def test_ngram_hasher_ring_equals_ngram_hashes():
    """The decoder's n-gram ids (powers table, ring buffer, no cat or cumsum) equal the training
    hashes of the same bytes, integer-exact, at every position including the padded start."""
    from ionllama.model.byte_embedding import _PAD, LastNgramHasher, ngram_hashes

    sizes, buckets = (2, 3, 4, 5), 4096
    x = torch.randint(0, 256, (3, 40))
    ref = torch.stack([ngram_hashes(x, n, buckets) for n in sizes], -1)  # (B, T, S)
    h = LastNgramHasher(sizes, buckets, 5, "cpu")
    ring = torch.full((3, 4), _PAD)
    for t in range(x.shape[1]):
        pos = torch.full((3,), t)
        assert torch.equal(h.ring(ring, x[:, t], pos), ref[:, t])
        window = torch.cat([ring.roll(-(t % 4), 1), x[:, t:t + 1]], 1)  # the ring in time order
        assert torch.equal(h(window), ref[:, t])
        ring[:, t % 4] = x[:, t]


def test_entropy_step_equals_entropy_bits():
    from ionllama.generation.ionllama_decoder import _entropy_bits_step
    from ionllama.model.entropy_model import entropy_bits

    logits = torch.randn(4, 256) * torch.tensor([[0.1], [1.0], [10.0], [100.0]])
    torch.testing.assert_close(_entropy_bits_step(logits), entropy_bits(logits), rtol=1e-5, atol=1e-5)


def test_entropy_table_step_equals_unfused(ion):
    """The byte step with the entropy model's first projection looked up from the per-decoder table
    (refresh_weights) gives the logits and entropies of the plain block step, fp32, random weights."""
    decs = [decoder_for(ion, 2, 64) for _ in range(2)]
    decs[1].ent_in0 = None  # the unfused path: norm + in_proj every byte
    with torch.no_grad():
        out = [d.prefill([list(b"ab c"), list(b"d")]) for d in decs]
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            tok = torch.randint(0, 256, (2,), generator=g)
            res = [d.step(tok) for d in decs]
            torch.testing.assert_close(res[0], res[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(decs[0].ent1, decs[1].ent1, rtol=1e-5, atol=1e-5)
            assert torch.equal(decs[0].next_start, decs[1].next_start)


def _assert_refused_where_it_cannot_run(ion, dense, flag: str, bad_value, bad_match: str) -> None:
    """A fused decode step asked for (flag=True) on CPU without TRITON_INTERPRET=1, for the dense model or for
    the recompute decoder, or given a value it does not take, is refused with a one-line UserError."""
    for call in (lambda: decoder_for(ion, 1, 16, **{flag: True}),
                 lambda: generate(ion, b"ab", 4, **{flag: True}),
                 lambda: ion.generate(b"ab", 4, **{flag: True})):
        with pytest.raises(UserError, match=f"{flag} needs a CUDA device"):
            call()
    with pytest.raises(UserError, match="not to model 'dense'"):
        generate(dense, b"ab", 4, **{flag: True})
    with pytest.raises(UserError, match="cached decoder"):
        decoder_for(ion, 1, 16, kind="recompute", **{flag: True})
    with pytest.raises(UserError, match=bad_match):
        decoder_for(ion, 1, 16, **{flag: bad_value})


def test_fused_local_step_auto_on_cuda_only_and_refused_where_it_cannot_run(ion, dense, monkeypatch):
    """The fused IntegralLNN step (ionllama/kernels/lnn_step_triton.py; its numbers are checked against
    IntegralState.step under the interpreter in test_kernels.py). "auto", the default, picks it only on CUDA
    for <= 32 rows with a supported dtype and for IntegralLNN local layers, and never errors; True asked for
    on CPU without TRITON_INTERPRET=1, or for a model without IntegralLNN local layers, is refused with a
    UserError (no silent fallback)."""
    from ionllama.generation import local_state

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dec = decoder_for(ion, 1, 16)  # auto on CPU: the PyTorch step
    assert not dec.fused_local_step and dec.enc and dec.dec
    assert all(st.fused_step is None for st in dec.enc + dec.dec)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert not local_state.fused_step_auto(torch.device("cpu"), bf16, 1)
    assert not local_state.fused_step_auto(cuda, bf16, local_state.FUSED_AUTO_MAX_BATCH + 1)
    assert not local_state.fused_step_auto(cuda, torch.float64, 1)
    assert not local_state.fused_step_auto(cuda, torch.float32, 1)  # supported, but 2.8x slower than PyTorch's
    try:
        import triton  # noqa: F401
        assert local_state.fused_step_auto(cuda, bf16, local_state.FUSED_AUTO_MAX_BATCH)
    except ImportError:
        assert not local_state.fused_step_auto(cuda, bf16, 1)
    _assert_refused_where_it_cannot_run(ion, dense, "fused_local_step", "yes", "True, False or 'auto'")
    attn = create_model("tiny", **dict(TINY, local_layers="transformer", local_window=8)).eval()
    with pytest.raises(UserError, match="local_layers='transformer'"):
        decoder_for(attn, 1, 16, fused_local_step=True)
    # where "auto" says yes (as on CUDA), only the cached IntegralLNN decoder takes the fused step
    monkeypatch.setattr(local_state, "fused_step_auto", lambda *a: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
        dec = decoder_for(ion, 1, 16)
        assert dec.fused_local_step and all(st.fused_step is not None for st in dec.enc + dec.dec)
    except ImportError:
        pass
    assert not decoder_for(attn, 1, 16).fused_local_step
    assert decoder_for(ion, 1, 16, kind="recompute") is not None and decoder_for(dense, 1, 16) is not None


def test_fused_byte_head_only_where_switched_on_with_the_fused_local_step(ion, monkeypatch):
    """The decoder's head as one kernel (lnn_step_triton.byte_head_step; its logits are checked against
    head(norm(h)) under the interpreter in test_kernels.py, and greedy bytes through it) is on by default
    (head_block_n 32: faster on an H100, checks-s58.md), taken only with the fused local step, off with
    head_block_n 0, and a decoder's _decode then calls it: the PyTorch head is not run."""
    pytest.importorskip("triton")
    from ionllama.kernels import lnn_step_triton as ls

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ls._CONFIG["head_block_n"] == 32
    old = ls.set_lnn_step_config(head_block_n=0)
    try:
        assert decoder_for(ion, 1, 16, fused_local_step=True).head_step is None
        ls.set_lnn_step_config(head_block_n=32)
        assert decoder_for(ion, 1, 16, fused_local_step=False).head_step is None
        dec = decoder_for(ion, 1, 16, fused_local_step=True)
        assert dec.head_step is ls.byte_head_step
        # a head the kernel cannot run (a bias) decodes with the PyTorch head, never a refusal of a valid model
        biased = create_model("tiny", **TINY).eval()
        biased.head = torch.nn.Linear(TINY["d_local"], 256)
        assert decoder_for(biased, 1, 16, fused_local_step=True).head_step is None
        # _decode's head: the kernel's stand-in, never the PyTorch head (the fused layers, compiled kernels in this
        # process, are stood in for too: identity)
        calls = []
        dec.head_step = lambda norm, head, h: calls.append((norm, head, tuple(h.shape))) or torch.zeros(1, 256)
        for st in dec.dec:
            st.step = lambda h, t: h
        monkeypatch.setattr(ion.head, "forward", lambda x: pytest.fail("the PyTorch head ran"))
        out = dec._decode(torch.zeros(1, dtype=torch.long), torch.zeros(1, ion.config.d_local))
        assert calls == [(ion.norm, ion.head, (1, ion.config.d_local))] and out.shape == (1, 256)
    finally:
        ls.set_lnn_step_config(**old)


def test_fused_embed_step_on_by_default_with_the_fused_local_step_where_the_model_allows(ion, monkeypatch):
    """The hashed n-gram embedding as one kernel (embed_step_triton.embed_step; checked against the PyTorch step
    under the interpreter in test_kernels.py, and greedy bytes through it) is on by default (measured faster on an
    H100, checks-s59.md), taken only with the fused local step and hashed n-grams, off when switched off; a model it
    cannot run gets the PyTorch step by default (no refusal, no warning) and a one-line refusal where it was required
    (enabled=2); a decoder's _encode then calls it: the PyTorch step is not run."""
    pytest.importorskip("triton")
    from ionllama.generation import ionllama_decoder
    from ionllama.kernels import embed_step_triton as es

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert es._CONFIG["enabled"] == 1
    old = es.set_embed_step_config(enabled=0)
    try:
        assert decoder_for(ion, 1, 16, fused_local_step=True).embed_step is None
        es.set_embed_step_config(enabled=1)
        assert decoder_for(ion, 1, 16, fused_local_step=False).embed_step is None
        conv = create_model("tiny", **{**TINY, "ngram": "conv"}).eval()
        assert decoder_for(conv, 1, 16, fused_local_step=True).embed_step is None
        six = create_model("tiny", **{**TINY, "ngram_sizes": (2, 3, 4, 5, 6)}).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert decoder_for(six, 1, 16, fused_local_step=True).embed_step is None
        es.set_embed_step_config(enabled=2)
        with pytest.raises(UserError, match="5 n-gram sizes .*set_embed_step_config"):
            decoder_for(six, 1, 16, fused_local_step=True)
        dec = decoder_for(ion, 1, 16, fused_local_step=True)
        assert dec.embed_step is es.embed_step
        # _encode's embedding: the kernel's stand-in, never the PyTorch step (the fused encoder layers, compiled
        # kernels in this process, are stood in for too: identity)
        calls = []
        dec.embed_step = lambda emb, hasher, ring, x, t: calls.append((emb, ring)) or torch.zeros(1, TINY["d_local"])
        for st in dec.enc:
            st.step = lambda h, t: h
        monkeypatch.setattr(ionllama_decoder, "hashed_embed_step", lambda *a: pytest.fail("the PyTorch step ran"))
        dec._encode(torch.zeros(1, dtype=torch.long))
        assert len(calls) == 1 and calls[0][0] is ion.embed and calls[0][1] is dec.ngram_buf
    finally:
        es.set_embed_step_config(**old)


def test_fused_entropy_step_auto_on_cuda_only_and_refused_where_it_cannot_run(ion, dense, monkeypatch):
    """The fused entropy-model step (ionllama/kernels/ssm_step_triton.py; its numbers are checked against
    MambaState.step under the interpreter in test_kernels.py). "auto", the default, picks it only where
    local_state.fused_step_auto says so for the entropy kernels (CUDA, <= 32 rows) and the model patches by
    entropy, and never errors; True asked for on CPU without TRITON_INTERPRET=1, for a model without an entropy
    model in use, or for the recompute decoder, is refused with a UserError (no silent fallback)."""
    from ionllama.generation import local_state

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dec = decoder_for(ion, 1, 16)  # auto on CPU: the PyTorch step
    assert not dec.fused_entropy_step and dec.ent_head is None
    assert all(st.fused_step is None for st in dec.ent_states) and len(dec.ent_states) == TINY["n_entropy_layers"]
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert not local_state.fused_step_auto(torch.device("cpu"), bf16, 1, local_state.fused_entropy_fn)
    assert not local_state.fused_step_auto(cuda, bf16, local_state.FUSED_AUTO_MAX_BATCH + 1,
                                           local_state.fused_entropy_fn)
    _assert_refused_where_it_cannot_run(ion, dense, "fused_entropy_step", "yes", "True, False or 'auto'")
    fixed = create_model("tiny", **TINY, patching="fixed").eval()
    with pytest.raises(UserError, match="patching='fixed'"):
        decoder_for(fixed, 1, 16, fused_entropy_step=True)
    # where "auto" says yes for the entropy kernels only (as on CUDA): the entropy-patching decoder takes the
    # step, a fixed-patching one (no entropy model in use) does not and raises nothing
    real = local_state.fused_step_auto
    monkeypatch.setattr(local_state, "fused_step_auto",
                        lambda dev, dt, b, kernels=None: kernels is local_state.fused_entropy_fn or real(dev, dt, b))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    dec = decoder_for(ion, 1, 16)  # built, not run (the kernels run in a subprocess)
    assert dec.fused_entropy_step and dec.ent_head is not None and not dec.fused_local_step
    assert all(st.fused_step is not None for st in dec.ent_states)
    assert not decoder_for(fixed, 1, 16).fused_entropy_step
    assert not decoder_for(ion, 1, 16, fused_entropy_step=False).fused_entropy_step


def test_fused_latent_step_auto_on_cuda_only_and_refused_where_it_cannot_run(ion, dense, monkeypatch):
    """The fused latent step (ionllama/kernels/latent_step_triton.py; its numbers are checked against
    advance_latent's PyTorch path under the interpreter in test_kernels.py). "auto", the default, picks it only
    where local_state.fused_step_auto says so for the latent kernels (CUDA, <= 32 rows) and never errors; True
    asked for on CPU without TRITON_INTERPRET=1, for the recompute decoder or a model without a latent
    transformer, or a value other than True / False / 'auto', is refused with a UserError (no silent fallback)."""
    from ionllama.generation import local_state

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dec = decoder_for(ion, 1, 16)  # auto on CPU: the PyTorch step
    assert not dec.fused_latent_step and dec.fused_latent is None
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert not local_state.fused_step_auto(torch.device("cpu"), bf16, 1, local_state.fused_latent_fn)
    assert not local_state.fused_step_auto(cuda, bf16, local_state.FUSED_AUTO_MAX_BATCH + 1,
                                           local_state.fused_latent_fn)
    _assert_refused_where_it_cannot_run(ion, dense, "fused_latent_step", "yes", "True, False or 'auto'")
    assert decoder_for(dense, 1, 16) is not None  # "auto" never errors for a model without the step
    # where "auto" says yes for the latent kernels only (as on CUDA), the ionLlama decoder takes the latent step
    real = local_state.fused_step_auto
    monkeypatch.setattr(local_state, "fused_step_auto",
                        lambda dev, dt, b, kernels=None: kernels is local_state.fused_latent_fn or real(dev, dt, b))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    dec = decoder_for(ion, 1, 16)  # built, not run (the kernels run in a subprocess)
    assert dec.fused_latent_step and dec.fused_latent is not None and not dec.fused_local_step
    assert not decoder_for(ion, 1, 16, fused_latent_step=False).fused_latent_step
    dec = decoder_for(ion, 1, 16, fused_local_step=False, fused_latent_step=True)
    assert dec.fused_latent_step and not dec.fused_local_step


def _fixed(shift: str, k: int, cap: int):
    torch.manual_seed(1)
    m = create_model("tiny", **{**TINY, "max_patch_size": cap}, patching="fixed", fixed_patch_size=k,
                     latent_shift=shift).eval()
    with torch.no_grad():
        m.head.weight.mul_(30.0)
        m.from_latent.weight.mul_(30.0)  # the latent visibly moves the logits
    return m


@pytest.mark.parametrize("shift,k,cap", [("previous", 3, 5), ("completed", 3, 5), ("completed", 4, 4),
                                         ("previous", 2, 8), ("completed", 5, 5)])
def test_host_schedule_follows_the_decoders_patcher_exactly(shift, k, cap):
    """Fixed patching: the host's copy of the patcher state (position, last rule start, next-start flag) equals
    the decoder's after every byte, for rows at different positions (prompts of different lengths), with patches
    at and below the max size (a fixed size above it is refused by the config since the thirty-sixth session)."""
    m = _fixed(shift, k, cap)
    dec = decoder_for(m, 3, 96)
    logits = dec.prefill([list(p if isinstance(p, bytes) else p.encode()) for p in PROMPTS])
    r = DecodeRunner(dec, SamplingConfig(temperature=1.0), torch.tensor([3, 4, 5]), logits, 40, host_schedule=True)
    assert r.host_schedule
    for _ in range(40):
        r.run(1)
        assert r._h == (dec.t.tolist(), dec.last_rule.tolist(), dec.next_start.tolist())


@pytest.mark.parametrize("shift,policy,graphs", [("previous", "skip", False), ("previous", "always", True),
                                                 ("completed", "skip", False), ("completed", "skip", True),
                                                 ("completed", "always", True)])
def test_host_schedule_gives_the_bytes_of_the_recompute_decoder(monkeypatch, shift, policy, graphs):
    """With the host choosing each byte's graph (one per byte; the latent stage inside it where a row needs it),
    the sampled bytes equal those of the full forward rerun per byte; graphs are the CPU fakes that record
    without running, as CUDA does."""
    from ionllama.generation import RecomputeDecoder

    m, n = _fixed(shift, 3, 5), 23
    rec = RecomputeDecoder(m, 2, 64)
    ref = DecodeRunner(rec, SamplingConfig(temperature=1.0), torch.tensor([3, 4]),
                       rec.prefill([list(b"ab c"), list(b"d")]), n)
    ref.run(n)
    if graphs:
        _fake_cuda(monkeypatch, _FakeGraph)
        monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    r = _runner(m, n, latent_policy=policy, host_schedule=True)
    assert r.host_schedule
    r.want_graphs = graphs
    r.run(9)
    gpu = {}
    r.run(n - 9, gpu_ms=gpu if graphs else None)
    assert (r.sched_graphs is not None) == graphs
    if graphs:  # one replay per byte, a byte's graph holding the latent stage at every third byte or so
        assert r.graphs == ([], None) and len(gpu["byte"]) + len(gpu["byte_latent"]) == n - 9
        assert 3 <= len(gpu["byte_latent"]) <= 8
    assert int(r.dec.n_complete.min()) >= 3
    assert torch.equal(r.out[:, :n], ref.out[:, :n])


@pytest.mark.parametrize("shift,unroll,cap_graphs", [("completed", 6, 8), ("completed", 4, 8), ("previous", 5, 8),
                                                    ("completed", 4, 1)])
def test_host_schedule_span_graphs_give_the_bytes_of_the_recompute_decoder(monkeypatch, shift, unroll, cap_graphs):
    """host_schedule with unroll > 1: one graph per `unroll` bytes, the latent stage inside it at the bytes the host
    schedules, one graph per latent pattern (captured at first use, at most MAX_SPAN_GRAPHS). Two rows at different
    phases, runs of uneven length: the bytes equal the full forward rerun per byte, the host state the decoder's."""
    from ionllama.generation import RecomputeDecoder

    monkeypatch.setattr(runner_mod, "MAX_SPAN_GRAPHS", cap_graphs)
    m, n = _fixed(shift, 3, 5), 47
    rec = RecomputeDecoder(m, 2, 64)
    ref = DecodeRunner(rec, SamplingConfig(temperature=1.0), torch.tensor([3, 4]),
                       rec.prefill([list(b"ab c"), list(b"d")]), n)
    ref.run(n)
    replays = collections.Counter()

    class Counted(_FakeGraph):
        def __init__(self, fn):
            super().__init__(lambda: (replays.update([self]), fn()))
    _fake_cuda(monkeypatch, Counted)
    r = _runner(m, n, host_schedule=True, unroll=unroll)
    r.want_graphs = True
    primed = None
    for k in (9, 1, 13, 24):
        r.run(k)
        primed = len(r.span_graphs) if primed is None else primed  # recorded with the capture, before any replay
        assert r._h == (r.dec.t.tolist(), r.dec.last_rule.tolist(), r.dec.next_start.tolist())
    # the capture recorded every phase's pattern (3-byte patches: 3 phases): none was recorded while replaying
    assert primed == len(r.span_graphs) == min(cap_graphs, 3)
    assert r.n_done == n and torch.equal(r.out[:, :n], ref.out[:, :n])
    spans = {g.inner for g in r.span_graphs.values()}  # (each fake pinned to its capture's tensors)
    assert 1 <= len(spans) <= cap_graphs
    per_byte = sum(c for g, c in replays.items() if g not in spans)
    assert sum(replays[g] for g in spans) * unroll + per_byte == n - 3  # 3 warm-up bytes ran eager
    # fixed 3-byte patches (cap 5 never cuts): a pattern is set by the span's start phase, at most 3
    assert len(spans) <= min(cap_graphs, 3)
    # GPU times asked for: per-byte graphs only (the span graph is not timed)
    r2 = _runner(m, n, host_schedule=True, unroll=unroll)
    r2.want_graphs = True
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    gpu = {}
    r2.run(9)
    r2.run(n - 9, gpu_ms=gpu)
    assert len(gpu["byte"]) + len(gpu["byte_latent"]) == n - 9 and torch.equal(r2.out[:, :n], ref.out[:, :n])


def test_span_graphs_are_dropped_and_captured_again_when_the_caches_grow(monkeypatch):
    """Caches that grow mid-run (generate's runner starts small and doubles) are new tensors: span graphs recorded
    before must not replay on them. With graphs pinned to their capture's tensors, runs that grow the caches twice
    give the recompute decoder's bytes."""
    from ionllama.generation import RecomputeDecoder

    m, n = _fixed("completed", 3, 5), 60
    rec = RecomputeDecoder(m, 2, 128)
    ref = DecodeRunner(rec, SamplingConfig(temperature=1.0), torch.tensor([3, 4]),
                       rec.prefill([list(b"ab c"), list(b"d")]), n)
    ref.run(n)
    _fake_cuda(monkeypatch, _FakeGraph)
    dec = decoder_for(m, 2, 20)  # room for 15 new bytes after the 4-byte prompt: grows at ~16 and ~36
    r = DecodeRunner(dec, SamplingConfig(temperature=1.0), torch.tensor([3, 4]),
                     dec.prefill([list(b"ab c"), list(b"d")]), n, host_schedule=True, unroll=4, prompt_len=4)
    r.want_graphs = True
    lens = []
    for k in (12, 12, 12, 12, 12):
        r.run(k)
        lens.append(dec.max_len)
    assert lens[0] < lens[-1] and len(set(lens)) >= 3  # (grown twice)
    assert r.span_graphs and torch.equal(r.out[:, :n], ref.out[:, :n])


def test_graph_capture_runs_with_the_cyclic_collector_off(monkeypatch, ion):
    """An earlier runner's CUDA graphs destroyed by the collector during a capture failed it on an H100 ("operation
    not permitted when stream is capturing (function reset)") or aborted the process: _record keeps the collector
    off for the capture (torch.cuda.graph collects once before it) and turns it back on, after a failure too."""
    import contextlib
    import gc

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        yield
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    r, seen = _runner(ion, 4), []
    assert gc.isenabled()
    DecodeRunner._record(r, lambda: seen.append(gc.isenabled()), None)
    assert seen == [False] and gc.isenabled()

    def fails():
        raise RuntimeError("capture failed")
    with pytest.raises(RuntimeError, match="capture failed"):
        DecodeRunner._record(r, fails, None)
    assert gc.isenabled()


@pytest.mark.parametrize("kind", ["ion", "fixed_sched"])
def test_restart_replays_the_kept_graphs_without_capturing_again(monkeypatch, ion, kind):
    """generate's DecodeSession: after a new prefill in place, DecodeRunner.restart replays the graphs it captured
    for the earlier prompt (CPU fakes that record without running, as CUDA does): no new capture, and the bytes of
    a fresh eager runner for the new prompts and seeds."""
    m = ion if kind == "ion" else _fixed("completed", 3, 5)
    fresh = _runner(m, 30, entropy_branch=False)  # (its prompts; restarted below onto other ones)
    fresh.restart(fresh.dec.prefill([list(b"zz top"), list(b"qq")]), torch.tensor([7, 8]), 30, 6)
    fresh.run(30)
    _fake_cuda(monkeypatch, _FakeGraph)
    captures = []
    capture = DecodeRunner._capture
    monkeypatch.setattr(DecodeRunner, "_capture", lambda self: (captures.append(1), capture(self))[1])
    r = _runner(m, 30, host_schedule=kind == "fixed_sched", unroll=4 if kind == "fixed_sched" else 1)
    r.want_graphs = True
    r.run(30)
    graphs = (r.graphs, r.sched_graphs)
    assert captures == [1] and r.graphs is not None
    r.restart(r.dec.prefill([list(b"zz top"), list(b"qq")]), torch.tensor([7, 8]), 30, 6)
    r.run(30)
    # all 30 replayed the kept graphs (span graphs of the new rows' phase patterns are recorded at first use: at
    # most 3 for each call's pair of row phases)
    assert captures == [1] and (r.graphs, r.sched_graphs) == graphs and r.eager_steps == 0
    assert len(r.span_graphs) <= 6
    assert torch.equal(r.out[:, :30], fresh.out[:, :30])


def test_host_schedule_auto_on_only_where_measured_and_refused_where_the_gpu_decides(ion, dense):
    assert not _runner(ion, 8).host_schedule  # entropy patching: boundaries come from the bytes
    fixed = _runner(_fixed("completed", 3, 5), 8)
    assert fixed.can_schedule and not fixed.host_schedule  # "auto": on only under CUDA graphs (measured there)
    with pytest.raises(UserError, match="host_schedule needs ionLlama with fixed patching"):
        _runner(ion, 8, host_schedule=True)
    with pytest.raises(UserError, match="host_schedule must be"):
        _runner(_fixed("previous", 3, 5), 8, host_schedule="yes")
    d = DecodeRunner(decoder_for(dense, 1, 32), SamplingConfig(), torch.tensor([0]), torch.zeros(1, 256), 8)
    assert not d.host_schedule
    off = _runner(_fixed("completed", 3, 5), 8, host_schedule=False)
    assert not off.host_schedule and off._h is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("shift,unroll", [("previous", 1), ("completed", 1), ("completed", 6), ("previous", 4)])
def test_host_schedule_graphs_equal_eager_on_cuda(shift, unroll):
    """Fixed patching on a GPU: one captured graph per byte (or per `unroll` bytes), chosen on the host; the bytes
    equal the eager runner's that reads the flag from the GPU."""
    m = _fixed(shift, 3, 5).to("cuda")
    ref = _runner(m, 40, host_schedule=False)
    ref.run(40)
    r = _runner(m, 40, cuda_graphs=True, host_schedule=True, unroll=unroll)
    for k in (9, 13, 18):
        r.run(k)
    assert r.host_schedule and r.sched_graphs is not None and (len(r.span_graphs) > 0) == (unroll > 1)
    assert torch.equal(r.out[:, :40], ref.out[:, :40])
    # "auto" takes it where it was measured faster: the "completed" shift under graphs, and under overlap_latent
    # ("auto" for "previous" at this batch), which follows the patch ends on the host
    auto = _runner(m, 40, cuda_graphs=True)
    assert auto.overlap == (shift == "previous") and auto.host_schedule


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_generate_with_span_graphs_gives_the_bytes_of_one_graph_per_byte_on_cuda():
    """generate(unroll=6) on a fixed-patch model ("completed", host_schedule on by default under graphs): the same
    bytes as unroll=1 and as eager decoding, streamed (whole spans per read-back) and not, batched prompts too."""
    m = _fixed("completed", 3, 5).to("cuda")
    try:
        for prompts in (PROMPTS, PROMPTS[0]):
            want = generate(m, prompts, 90, seed=5, cuda_graphs=False)
            assert generate(m, prompts, 90, seed=5, cuda_graphs=True, unroll=6) == want
            got = collections.defaultdict(bytes)
            out = generate(m, prompts, 90, seed=5, cuda_graphs=True, unroll=6,
                           stream=lambda r, b: got.__setitem__(r, got[r] + b))
            rows = out if isinstance(out, list) else [out]
            assert out == want and [got[r] for r in range(len(rows))] == rows
    finally:
        m.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["ion", "ion_completed", "fixed_completed", "dense"])
def test_graphs_captured_again_after_the_caches_grow_on_cuda(kind, ion, ion_completed, dense, monkeypatch):
    """Caches start at INITIAL_NEW_BYTES new bytes and double (generate's runner): a captured graph holds the old
    tensors, so growing drops the graphs and the next run() captures them again. With a start of 8 new bytes, 70
    bytes grow the caches four times under CUDA graphs (the host-scheduled pair for fixed patches with the
    "completed" shift, the entropy branch for 3 rows); the bytes equal those of caches made whole at once."""
    import importlib

    G = importlib.import_module("ionllama.generation.generate")
    if kind == "fixed_completed":
        torch.manual_seed(1)
        model = create_model("tiny", **TINY, patching="fixed", fixed_patch_size=3, latent_shift="completed").eval()
    else:
        model = dict(ion=ion, ion_completed=ion_completed, dense=dense)[kind]
    m = model.to("cuda")
    try:
        for prompts in (PROMPTS, PROMPTS[:1]):
            whole = generate(m, prompts, 70, seed=2, cuda_graphs=True)
            captures = []
            with monkeypatch.context() as mp:
                mp.setattr(G, "INITIAL_NEW_BYTES", 8)
                capture = DecodeRunner._capture
                mp.setattr(DecodeRunner, "_capture", lambda self: (captures.append(1), capture(self))[1])
                grown = generate(m, prompts, 70, seed=2, cuda_graphs=True)
            assert len(captures) >= 3, captures  # (room for 8 -> 16 -> 32 -> 64 -> 71 new bytes)
            assert grown == whole and generate(m, prompts, 70, seed=2, cuda_graphs=False) == whole, (kind, prompts)
    finally:
        model.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["fixed_completed", "ion"])
def test_repeated_generate_keeps_cuda_memory_flat(kind, ion):
    """A second, third, ... generate() in one process must not keep the earlier calls' caches or graphs alive:
    profile_decode_step's repeated prefill of one decoder grew allocated memory by 32 MB per capture on the H200
    (generation.md, fortieth session), and a server calling generate() per request would run out of memory."""
    import gc

    if kind == "fixed_completed":
        torch.manual_seed(1)
        model = create_model("tiny", **TINY, patching="fixed", fixed_patch_size=3, latent_shift="completed").eval()
    else:
        model = ion
    m = model.to("cuda")
    try:
        used = []
        for _ in range(4):
            out = generate(m, PROMPTS, 40, seed=2, cuda_graphs=True)
            del out
            gc.collect()
            torch.cuda.synchronize()
            used.append(torch.cuda.memory_allocated())
        # the first call may keep compiled/lazily made constants; from then on nothing may pile up
        assert used[3] <= used[1], f"allocated bytes after calls 1-4: {used}"
    finally:
        model.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_top_p_sampling_in_graphs_equals_eager_on_cuda(dtype):
    """top_k keeps exactly k bytes through a stable sort (forty-third session); the captured decode step must sample
    the bytes the eager one does, batched and seeded, in float32 and bfloat16 (where logits tie more often)."""
    torch.manual_seed(3)
    m = create_model("tiny", **TINY, patching="fixed").eval().to("cuda", dtype)
    prompts = [b"The cat", b"12+34=", b"a"]
    kw = dict(temperature=0.8, top_k=3, top_p=0.95, seed=5)
    eager = generate(m, prompts, 80, cuda_graphs=False, **kw)
    graphs = generate(m, prompts, 80, cuda_graphs=True, **kw)
    assert graphs == eager
    one = generate(m, prompts, 80, cuda_graphs=True, **{**kw, "top_k": 1})
    assert one == generate(m, prompts, 80, cuda_graphs=True, greedy=True)  # top_k=1 is greedy


def test_cuda_streams_are_made_once_per_role_not_per_call(monkeypatch):
    """torch keeps a cuBLAS workspace (32 MiB on Hopper) for every stream a matmul ran on and never frees it: a new
    warm-up and capture stream per generate() call grew allocated memory by 64 MiB a call on an H100 (the CUDA test
    above). Streams now come from devices.reusable_stream, made once per (device, role, priority, thread)."""
    import pathlib
    import threading

    import ionllama.devices as D

    made = []
    monkeypatch.setattr(D, "_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: made.append((device, priority)) or object())
    a = D.reusable_stream("cuda", "capture", -1)
    assert D.reusable_stream(torch.device("cuda", 0), "capture", -1) is a
    assert D.reusable_stream("cuda", "warm_up") is not a and D.reusable_stream("cuda", "capture", 0) is not a
    other = []
    t = threading.Thread(target=lambda: other.append(D.reusable_stream("cuda", "capture", -1)))
    t.start()
    t.join()
    assert other[0] is not a and len(made) == 4
    # CPU tensors (tests that fake torch.cuda): a fresh stream each time, none kept past the fake
    assert D.reusable_stream("cpu", "warm_up") is not D.reusable_stream("cpu", "warm_up") and len(D._STREAMS) == 4
    assert len(made) == 6
    root = pathlib.Path(__file__).resolve().parents[1] / "ionllama"
    direct = [str(p.relative_to(root)) for p in root.rglob("*.py")
              if p.name != "devices.py" and "cuda.Stream(" in p.read_text()]
    assert direct == [], f"make streams with devices.reusable_stream: {direct}"


class _LogStream:
    """A fake stream that logs the streams it was told to wait for."""

    def __init__(self, device=None, priority=0):
        self.waited = []

    def wait_stream(self, other):
        self.waited.append(other)


def _fake_second_gpu(monkeypatch):
    """torch.cuda's current device and each device's current stream, on CPU: the model's tensors are on the CPU,
    which stands in for cuda:1, while the current device stays cuda:0 (generate() and StepGraph set none)."""
    from fake_cuda import device_switch

    streams, cur, log, made = {"cuda:0": _LogStream(), "cpu": _LogStream()}, ["cuda:0"], [], []

    device = device_switch(cur)

    def current_stream(device=None):
        return streams[cur[0] if device is None else str(torch.device(device))]

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            log.append(("record", stream or torch.cuda.current_stream()))

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 0.25

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync", device or cur[0])))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: made.append(_LogStream()) or made[-1])
    return streams, log, made


@pytest.mark.parametrize("shift", ["completed", "lagged"])
def test_runner_orders_its_streams_on_the_models_device(ion_completed, monkeypatch, shift):
    """The model on another GPU than the current one (--device cuda:1): the warm-up's side stream, the entropy
    branch and the lagged latent stream must wait for that device's current stream (where the prefill ran and the
    graphs replay) and it for them, and the event the host waits on before reading the patch flag must follow
    that device's work. They used cuda:0's (the warm-up races the prefill, the replays the warm-up, the flag is
    read before it is written)."""
    if shift == "lagged":
        torch.manual_seed(1)
        model = create_model("tiny", **TINY, patching="fixed", fixed_patch_size=3, latent_shift="lagged").eval()
    else:
        model = ion_completed
    n = 23
    ref = _eager_bytes(model, n, n)
    _fake_cuda(monkeypatch, _FakeGraph)
    streams, log, made = _fake_second_gpu(monkeypatch)
    r = _runner(model, n, **({"latent_policy": "skip"} if shift == "lagged" else {"entropy_branch": True}))
    sides = [_LogStream() for _ in range(3)]
    r.capture_stream, r.branch_stream, r.latent_stream = sides[0], sides[1], sides[2]  # a CUDA runner's streams
    r.want_graphs = True
    r.run(9)
    r.run(n - r.n_done)
    assert torch.equal(r.out[:, :n], ref)
    main, sides = streams["cpu"], sides + made  # made: the warm-up's
    assert len(made) == 1 and made[0].waited and (sides[1].waited if shift == "completed" else sides[2].waited)
    assert not streams["cuda:0"].waited and streams["cuda:0"] not in [s for side in sides for s in side.waited]
    assert all(s is main for side in sides for s in side.waited) and main.waited
    assert log and all(x in (main, "cpu", torch.device("cpu")) for _, x in log)  # events and syncs
