"""generate(..., session=DecodeSession()): a later call on the kept decoder (prefilled again in place, graphs and
compiled steps kept) gives exactly what a fresh call gives, and anything that would make the kept state wrong (other
weights, batch size, sampling settings, a buffer written in place) builds a new decoder instead."""
import pytest
import torch

from ionllama import create_model
from ionllama.errors import UserError
from ionllama.generation import DecodeSession, generate
from ionllama.generation.runner import DecodeRunner
from ionllama.generation.sampling import SamplingConfig

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=2, d_entropy=16,
            n_entropy_layers=2, entropy_headdim=8, entropy_state=4, ngram_buckets=64, scan_chunk=64,
            max_patch_size=5, local_width=2)


def _model(kind: str):
    m = _random_model(kind)
    with torch.no_grad():  # peaked logits and a zero one for the end-of-document byte: sampling all but never
        m.head.weight.mul_(30.0 if kind in ("dense", "mamba") else 1.0)  # stops there, so every call runs its
        m.head.weight[0].zero_()  # length and the kept caches grow as CALLS expects
    return m


def _random_model(kind: str):
    torch.manual_seed(3)
    if kind in ("dense", "mamba"):
        return create_model("tiny", model=kind, d_model=32, n_layers=2, **({"n_heads": 2} if kind == "dense" else {}))
    shift = {"ion_completed": "completed", "ion_lagged": "lagged"}.get(kind, "previous")
    patching = "fixed" if kind == "ion_fixed" else "entropy"
    m = create_model("tiny", **TINY, patching=patching, latent_shift=shift).eval()
    with torch.no_grad():
        m.head.weight.mul_(30.0)  # peaked logits: the bytes repeat, so stop strings match
        m.from_latent.weight.mul_(30.0)  # the latent visibly moves the logits
        if patching == "entropy":
            ent = m.entropy_model(torch.randint(0, 256, (2, 64)))["entropy"].flatten()
            m.entropy_threshold.fill_(float(ent.median()))  # patches of varying length: latent steps happen
    return m


LONG = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 3  # 243 bytes
# (prompts, new bytes, seed, stop, reused?): long then short then long again (a kept cache holds the earlier call's
# positions past the new prompt); an output past the first caches (the kept decoder grows); a 1-byte prompt, then a
# long prompt that fits the grown caches but needs them to grow again (the restart's prompt length decides how far);
# a prompt longer than the kept caches (a new decoder)
CALLS = [(["a longer prompt here, with words", "x"], 40, 1, None, False),
         (["q", "short one"], 25, 2, "e", True),
         (["a longer prompt here, with words", "x"], 40, 1, None, True),
         (["zz", "yy"], 300, 5, None, True),
         (["q", "r"], 10, 6, None, True),
         ([LONG, "b"], 100, 7, None, True),
         ([LONG * 3, "c"], 5, 8, None, False)]


@pytest.mark.parametrize("kind", ["ion", "ion_completed", "ion_lagged", "ion_fixed", "dense", "mamba"])
def test_session_calls_equal_fresh_calls(kind):
    m = _model(kind)
    session = DecodeSession()
    for i, (prompts, n, seed, stop, reused) in enumerate(CALLS):
        before = session.reuses
        got = generate(m, prompts, n, session=session, seed=seed, stop=stop)
        assert got == generate(m, prompts, n, seed=seed, stop=stop), (kind, i)
        if kind != "mamba":  # (Mamba's state has no length: every prompt fits)
            assert session.reuses - before == reused, (kind, i)
    # greedy and streamed calls are other settings: a new decoder each, then kept for the next like it
    pieces, before = [], session.reuses
    for _ in range(2):
        out = generate(m, "abc", 20, greedy=True, session=session, stream=lambda r, b: pieces.append(b))
        assert out == generate(m, "abc", 20, greedy=True)
    assert session.reuses - before == 1 and b"".join(pieces) == out * 2


def test_a_call_that_does_not_match_builds_a_new_decoder():
    m = _model("ion")
    session = DecodeSession()
    generate(m, ["ab", "cd"], 20, seed=1, session=session)
    kept = session._kept[2]
    for kw in (dict(temperature=0.7), dict(top_k=5), dict(prompt=["ab"]), dict(cuda_graphs=False, decoder="recompute")):
        prompt = kw.pop("prompt", ["ab", "cd"])
        got = generate(m, prompt, 20, seed=1, session=session, **kw)
        assert got == generate(m, prompt, 20, seed=1, **kw) and session.reuses == 0, kw
        assert session._kept[2] is not kept
        kept = session._kept[2]
    session.release()
    assert session._kept is None
    generate(m, "ab", 10, seed=1, session=session)
    assert session.reuses == 0


@pytest.mark.parametrize("which", [0, 1], ids=["head", "embed"])
def test_switching_a_fused_kernel_builds_a_new_decoder(monkeypatch, which):
    """The decoder head's and the n-gram embedding's fused kernels are chosen when a decoder is built (lnn_step_triton
    head_block_n, embed_step_triton enabled): a session kept across switching one must not replay the old choice, so
    the switches are part of the session's key."""
    import importlib

    gen_mod = importlib.import_module("ionllama.generation.generate")  # (the package exports the function by that name)

    m = _model("ion")
    session = DecodeSession()
    generate(m, ["ab", "cd"], 20, seed=1, session=session)
    kept, switches = session._kept[2], list(gen_mod._kernel_switches())
    switches[which] = not switches[which]
    monkeypatch.setattr(gen_mod, "_kernel_switches", lambda: tuple(switches))
    generate(m, ["ab", "cd"], 20, seed=1, session=session)
    assert session.reuses == 0 and session._kept[2] is not kept
    generate(m, ["ab", "cd"], 20, seed=1, session=session)  # the same switch again: the kept decoder
    assert session.reuses == 1


def test_a_session_is_reused_when_building_the_decoder_imported_the_head_kernel(monkeypatch):
    """The head switch reads the kernel module only once it is imported (generate imports no triton), and the first
    decoder with the fused local step imports it, the fused head on by default: the first call's switch then reads
    off, the second's on. The kept runner must be found by the second call, not rebuilt (and recompiled)."""
    import importlib

    gen_mod = importlib.import_module("ionllama.generation.generate")
    imported = []
    build = gen_mod.decoder_for

    def decoder_for(*a, **kw):  # stands in for the import a fused local step does on CUDA
        imported.append(True)
        return build(*a, **kw)

    monkeypatch.setattr(gen_mod, "decoder_for", decoder_for)
    monkeypatch.setattr(gen_mod, "_kernel_switches", lambda: (bool(imported), False))
    m = _model("ion")
    session = DecodeSession()
    first = generate(m, "ab", 20, seed=1, session=session)
    assert generate(m, "ab", 20, seed=1, session=session) == first
    assert session.reuses == 1 and len(imported) == 1


def test_weights_written_in_place_are_seen():
    """An optimizer step, load_state_dict or a buffer's fill_ (the CLI's --threshold) changes what the kept decoder
    derived from the weights: the next call builds a new one and matches a fresh call on the new weights."""
    m = _model("ion")
    session = DecodeSession()
    before = generate(m, "hello", 30, seed=4, session=session)
    with torch.no_grad():
        m.entropy_threshold.fill_(float(m.entropy_threshold) + 1.0)  # longer patches
    after = generate(m, "hello", 30, seed=4, session=session)
    assert session.reuses == 0 and after == generate(m, "hello", 30, seed=4)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    stepped = generate(m, "hello", 30, seed=4, session=session)
    assert session.reuses == 0 and stepped == generate(m, "hello", 30, seed=4) and stepped != after != before
    generate(m, "hello", 30, seed=4, session=session)
    m.half().float()  # weights rounded into new storages (their version counters start again at 0)
    rounded = generate(m, "hello", 30, seed=4, session=session)
    assert session.reuses == 1 and rounded == generate(m, "hello", 30, seed=4)
    other = _model("ion")  # another model object with the same weights: not the kept one
    generate(other, "hello", 30, seed=4, session=session)
    assert session.reuses == 1


def test_restart_gives_the_runner_new_seeds_lengths_and_state():
    """DecodeRunner.restart on a decoder prefilled again: the same bytes as a new runner for the new prompt, seeds
    and max_new (the noise keys are rewritten in place, so a captured graph reads the new ones)."""
    from ionllama.generation import decoder_for

    m = _model("ion")
    dec = decoder_for(m, 2, 64)
    r = DecodeRunner(dec, SamplingConfig(), torch.tensor([3, 4]), dec.prefill([list(b"abcdef"), list(b"g")]), 30,
                     prompt_len=6)
    r.run(30)
    keys = r.noise.keys
    r.restart(dec.prefill([list(b"xy"), list(b"zzz")]), torch.tensor([8, 9]), 12, 3)
    r.run(50)
    fresh_dec = decoder_for(m, 2, 64)
    f = DecodeRunner(fresh_dec, SamplingConfig(), torch.tensor([8, 9]),
                     fresh_dec.prefill([list(b"xy"), list(b"zzz")]), 12, prompt_len=3)
    f.run(50)
    assert r.n_done == f.n_done == 12 and torch.equal(r.out[:, :12], f.out[:, :12])
    assert r.noise.keys is keys and torch.equal(keys, f.noise.keys)


def test_bad_session_is_one_line_and_bpe_refuses_it():
    m = _model("dense")
    with pytest.raises(UserError, match="session must be a DecodeSession"):
        generate(m, "a", 5, session={})
    bpe = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=300)
    with pytest.raises(UserError, match="session=.* is a byte-model decoder option"):
        bpe.generate("a", 5, session=DecodeSession())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["ion", "ion_fixed", "dense"])
def test_session_on_cuda_replays_the_kept_graphs(kind, monkeypatch):
    """On a GPU with CUDA graphs: later session calls of the same settings capture nothing (until the caches grow)
    and give the bytes of fresh calls, batched and single, sampled and greedy."""
    m = _model(kind).to("cuda")
    captures = []
    capture = DecodeRunner._capture
    monkeypatch.setattr(DecodeRunner, "_capture", lambda self: (captures.append(1), capture(self))[1])
    try:
        for greedy in (False, True):
            session, session_captures = DecodeSession(), []
            for prompt in (["a longer prompt here", "x"], ["q", "zz top"], ["a longer prompt here", "x"]):
                n0 = len(captures)
                got = generate(m, prompt, 100, seed=3, greedy=greedy, session=session, cuda_graphs=True)
                session_captures.append(len(captures) - n0)
                assert got == generate(m, prompt, 100, seed=3, greedy=greedy, cuda_graphs=True)
                assert got == generate(m, prompt, 100, seed=3, greedy=greedy, cuda_graphs=False)
            assert session.reuses == 2 and session_captures[0] >= 1 and session_captures[1:] == [0, 0]
    finally:
        m.to("cpu")
