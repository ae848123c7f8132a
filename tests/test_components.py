"""Each reference component against a direct naive computation."""
import math

import pytest
import torch

from ionllama.model.dilated_attention import dilated_attention_reference, dilated_offsets
from ionllama.model.local_attention import local_window_attention
from ionllama.model.patcher import calibrate_threshold, compute_patches
from ionllama.model.pooling import PatchPooling
from ionllama.model.scan import scan_const_decay, scan_general, scan_loop
from ionllama.model.ssm import MambaBlock, ssd_chunked, ssd_step

f64 = torch.float64


def ssd_loop(x, log_a, Bm, Cm, h0=None):
    """Naive recurrence over time: the ground truth for ssd_chunked."""
    b, T, H, P = x.shape
    state = h0.clone() if h0 is not None else x.new_zeros(b, H, P, Bm.shape[-1])
    ys = []
    for t in range(T):
        y, state = ssd_step(x[:, t], log_a[:, t], Bm[:, t], Cm[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("T,chunk", [(1, 4), (7, 4), (64, 8), (300, 16), (1000, 8), (9, 2)])
def test_const_decay_scan_matches_loop(T, chunk):
    u = torch.randn(2, T, 5, dtype=f64)
    log_a = -torch.rand(5, dtype=f64) * 3
    h0 = torch.randn(2, 5, dtype=f64)
    assert torch.allclose(scan_const_decay(u, log_a, h0, chunk), scan_loop(log_a, u, h0), atol=1e-12)
    assert torch.allclose(scan_const_decay(u, log_a, None, chunk), scan_loop(log_a, u), atol=1e-12)


def test_const_decay_scan_gradients_match_loop():
    u = torch.randn(2, 50, 3, dtype=f64, requires_grad=True)
    la = (-torch.rand(3, dtype=f64)).requires_grad_()
    g = torch.randn(2, 50, 3, dtype=f64)
    (scan_const_decay(u, la, chunk=8) * g).sum().backward()
    gu, gla = u.grad.clone(), la.grad.clone()
    u.grad = la.grad = None
    (scan_loop(la, u) * g).sum().backward()
    assert torch.allclose(gu, u.grad, atol=1e-10) and torch.allclose(gla, la.grad, atol=1e-10)


def test_scan_is_linear_time_not_quadratic():
    """Long sequences (the prototype crashed > 512) run without a T x T intermediate."""
    u = torch.randn(1, 65536, 4)
    h = scan_const_decay(u, torch.full((4,), -0.01))
    assert torch.isfinite(h).all() and h.shape == u.shape


def test_general_scan_matches_loop():
    la = -torch.rand(2, 77, 3, 4, dtype=f64) * 4
    u = torch.randn(2, 77, 3, 4, dtype=f64)
    h0 = torch.randn(2, 3, 4, dtype=f64)
    assert torch.allclose(scan_general(la, u, h0, chunk=8), scan_loop(la, u, h0), atol=1e-12)


@pytest.mark.parametrize("T,chunk,with_h0", [(100, 16, True), (100, 16, False), (5, 16, True), (300, 3, True),
                                             (300, 3, False), (64, 8, False)])
def test_ssd_matches_loop_and_step(T, chunk, with_h0):
    """T=300, chunk=3: 100 chunks, so the inter-chunk state passing recurses (groups of 16 chunks)."""
    b, H, P, N = 2, 3, 4, 5
    x, la = torch.randn(b, T, H, P, dtype=f64), -torch.rand(b, T, H, dtype=f64) * 2
    Bm, Cm = torch.randn(b, T, N, dtype=f64), torch.randn(b, T, N, dtype=f64)
    h0 = torch.randn(b, H, P, N, dtype=f64) if with_h0 else None
    y, s = ssd_chunked(x, la, Bm, Cm, chunk=chunk, h0=h0)
    y2, s2 = ssd_loop(x, la, Bm, Cm, h0)
    assert torch.allclose(y, y2, atol=1e-10) and torch.allclose(s, s2, atol=1e-10)


def test_ssd_state_passing_keeps_fp32_precision_over_strong_decays():
    """Many chunks of strong decays (their log sums reach ~-500): the inter-chunk weights are sums of the log
    decays between two chunks, not differences of two long prefix sums, which lost the short decays' precision
    (norm-relative error of the states 2.8e-7 before, 3e-8 now, on this input)."""
    from ionllama.model.ssm import _pass_states
    gen = torch.Generator().manual_seed(0)
    la, u = -torch.rand(2, 256, 4, generator=gen) * 6, torch.randn(2, 256, 4, 32, generator=gen)
    h = _pass_states(la, u)
    state, ref = torch.zeros(2, 4, 32, dtype=f64), []
    for c in range(la.shape[1]):
        state = torch.exp(la[:, c].double())[..., None] * state + u[:, c].double()
        ref.append(state)
    ref = torch.stack(ref, 1)
    assert ((h.double() - ref).norm() / ref.norm()).item() < 1e-7


def test_ssd_keeps_fp32_precision_across_a_reset_inside_a_chunk():
    """One step's large decay (log_a -1e4, a learned reset at a document separator) made the within-chunk weights,
    differences of two long fp32 prefix sums, lose ~1e-4 of every later short decay (values and gradients)."""
    gen = torch.Generator().manual_seed(0)
    b, T, H, P, N = 2, 128, 2, 4, 8
    x, Bm, Cm = (torch.randn(*s, generator=gen) for s in ((b, T, H, P), (b, T, N), (b, T, N)))
    la = -torch.rand(b, T, H, generator=gen) * 0.5
    la[:, 20] = la[:, 90] = -1e4
    gy = torch.randn(b, T, H, P, generator=gen)
    outs = []
    for dt in (torch.float32, torch.float64):
        ins = [t.detach().to(dt).clone().requires_grad_() for t in (x, la, Bm, Cm)]
        y, s = ssd_chunked(*ins, chunk=64)
        ((y * gy.to(dt)).sum() + s.sum()).backward()
        outs.append([y, s] + [t.grad for t in ins])
    y2, _ = ssd_loop(x.double(), la.double(), Bm.double(), Cm.double())
    assert torch.allclose(outs[1][0], y2, atol=1e-10)  # the fp64 chunked form is the loop
    for got, ref in zip(*outs):
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, err


@pytest.mark.parametrize("T,chunk", [(50, 16), (75, 2)])
def test_ssd_gradients_match_loop(T, chunk):
    """fp32, T not a multiple of the chunk, with h0; T=75, chunk=2: 38 chunks, the state passing recurses."""
    torch.manual_seed(0)
    b, H, P, N = 2, 3, 4, 5
    x = torch.randn(b, T, H, P)
    la = -torch.rand(b, T, H) * 0.5
    Bm, Cm = torch.randn(b, T, N) * 0.5, torch.randn(b, T, N) * 0.5
    h0 = torch.randn(b, H, P, N)
    gy, gs = torch.randn(b, T, H, P), torch.randn(b, H, P, N)
    grads = []
    for fn in (lambda *a: ssd_chunked(*a[:4], chunk=chunk, h0=a[4]), ssd_loop):
        ins = [t.clone().requires_grad_() for t in (x, la, Bm, Cm, h0)]
        y, s = fn(*ins)
        ((y * gy).sum() + (s * gs).sum()).backward()
        grads.append([t.grad for t in ins])
    for g1, g2 in zip(*grads):
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-5), (g1 - g2).abs().max()


def test_mamba_block_step_equals_parallel():
    m = MambaBlock(16, d_state=4, headdim=8).double()
    u = torch.randn(2, 30, 16, dtype=f64)
    y, st = m(u, return_state=True)
    cache = m.mixer.empty_cache(2, "cpu", f64)
    ys = []
    for t in range(30):
        yt, cache = m.step(u[:, t], cache)
        ys.append(yt)
    assert torch.allclose(torch.stack(ys, 1), y, atol=1e-10)
    assert torch.allclose(cache["ssm"].double(), st["ssm"].double(), atol=1e-10)


def _naive_attention(q, k, v, allowed):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("N", [1, 5, 33, 100])
def test_dilated_attention_matches_masked_dense(N):
    q, k, v = torch.randn(3, 2, 3, N, 8, dtype=f64).unbind(0)
    offs = dilated_offsets(N, 3)
    i = torch.arange(N)
    lag = i[:, None] - i[None, :]
    allowed = torch.zeros(N, N, dtype=torch.bool)
    for o in offs:
        allowed |= lag == o
    assert torch.allclose(dilated_attention_reference(q, k, v, offs), _naive_attention(q, k, v, allowed), atol=1e-12)


def test_dilated_attention_segments():
    N = 40
    q, k, v = torch.randn(3, 1, 2, N, 8, dtype=f64).unbind(0)
    seg = (torch.arange(N) >= 17).long()[None]
    offs = dilated_offsets(N)
    i = torch.arange(N)
    allowed = torch.zeros(N, N, dtype=torch.bool)
    for o in offs:
        allowed |= (i[:, None] - i[None, :]) == o
    allowed &= seg[0][:, None] == seg[0][None, :]
    out = dilated_attention_reference(q, k, v, offs, segment_ids=seg)
    assert torch.allclose(out, _naive_attention(q, k, v, allowed), atol=1e-12)


def test_dilated_offsets_are_logarithmic():
    assert dilated_offsets(100) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert len(dilated_offsets(1 << 17)) == 3 + 16 - 1


def test_local_width_widens_the_dense_window_and_reaches_the_model_and_the_trainer():
    from ionllama import create_model
    from ionllama.errors import UserError
    from ionllama.experiment import parse_overrides
    from ionllama.train.cli import build_train_parser
    assert dilated_offsets(100, 16) == list(range(16)) + [16, 32, 64]
    assert dilated_offsets(10, 16) == list(range(10))  # window wider than the sequence: dense
    kw = dict(d_model=32, n_layers=1, n_heads=2, d_local=16, n_enc_layers=1, n_dec_layers=1, ngram_buckets=16)
    m = create_model("tiny", **kw, local_width=16)
    assert m.latent.local_width == 16 and create_model("tiny", **kw).latent.local_width == 3
    assert parse_overrides(["local_width=16"]) == {"local_width": 16}
    assert build_train_parser().parse_args(["--local_width", "8"]).local_width == 8
    with pytest.raises(UserError, match="local_width must be >= 1"):
        create_model("tiny", **kw, local_width=0)


def test_a_scan_chunk_of_one_is_refused_where_it_never_ended():
    """A new user's report: create_model(scan_chunk=1) built, then the first forward hit a RecursionError (each level
    of the chunked scan shortens the sequence by the chunk)."""
    from ionllama import create_model
    from ionllama.errors import UserError
    with pytest.raises(UserError, match="scan_chunk must be >= 2"):
        create_model("tiny", scan_chunk=1)
    with pytest.raises(ValueError, match="at least 2"):
        scan_const_decay(torch.randn(1, 5, 3), -torch.rand(3), None, 1)


@pytest.mark.parametrize("T,W", [(37, 5), (8, 8), (64, 16), (3, 16)])
def test_local_window_attention_matches_masked_dense(T, W):
    q, k, v = torch.randn(3, 2, 2, T, 8, dtype=f64).unbind(0)
    i = torch.arange(T)
    lag = i[:, None] - i[None, :]
    assert torch.allclose(local_window_attention(q, k, v, W), _naive_attention(q, k, v, (lag >= 0) & (lag < W)),
                          atol=1e-12)


def _naive_starts(x, ent, mode, th, tmode, max_size, fixed):
    B, T = x.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        length = 0
        for t in range(T):
            if t == 0:
                s = True
            elif mode == "byte":
                s = True
            elif mode == "fixed":
                s = t % fixed == 0
            elif mode == "space":
                c = int(x[b, t - 1])
                s = not (chr(c).isascii() and chr(c).isalnum() or c >= 128)
            elif tmode == "global":
                s = bool(ent[b, t - 1] > th)
            else:
                prev = ent[b, t - 2] if t >= 2 else ent[b, t - 1]
                s = bool(ent[b, t - 1] - prev > th)
            if not s and length >= max_size:
                s = True
            length = 1 if s else length + 1
            out[b, t] = s
    return out


@pytest.mark.parametrize("mode,tmode", [("entropy", "global"), ("entropy", "monotonic"), ("space", "global"),
                                        ("fixed", "global"), ("byte", "global")])
def test_patch_rules_match_sequential_definition(mode, tmode):
    x = torch.tensor([list(b"the quick brown fox jumps over the lazy dog, \xc3\xa9t\xc3\xa9 1234567890abcdefghijk")])
    x = torch.cat([x, x.flip(1)])
    ent = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 4
    starts, b2p, n = compute_patches(x, ent, mode, 2.5 if tmode == "global" else 0.5, tmode, 6, 3)
    assert torch.equal(starts, _naive_starts(x, ent, mode, 2.5 if tmode == "global" else 0.5, tmode, 6, 3))
    assert torch.equal(n, starts.sum(1))
    lengths = torch.diff(torch.cat([torch.nonzero(starts[0]).flatten(), torch.tensor([x.shape[1]])]))
    assert lengths.max() <= 6


def test_calibration_hits_target():
    x = torch.randint(0, 256, (8, 500))
    ent = torch.rand(8, 500) * 8
    th, bpp = calibrate_threshold(x, ent, 4.0, "global", 8)
    assert abs(bpp - 4.0) < 0.1
    _, _, n = compute_patches(x, ent, "entropy", th, "global", 8)
    assert abs(x.numel() / n.sum().item() - bpp) < 1e-9


@pytest.mark.parametrize("mode", ["mean", "attention"])
def test_pooling_matches_loop(mode):
    pool = PatchPooling(6, mode).double()
    h = torch.randn(2, 20, 6, dtype=f64)
    starts = torch.rand(2, 20) < 0.3
    starts[:, 0] = True
    b2p = starts.long().cumsum(1) - 1
    P = int(b2p.max()) + 2  # one padding patch
    out = pool(h, b2p, P)
    for b in range(2):
        for p in range(P):
            sel = h[b][b2p[b] == p]
            if len(sel) == 0:
                assert out[b, p].abs().max() == 0
                continue
            w = torch.softmax(pool.score(sel).squeeze(-1), 0) if mode == "attention" else torch.full((len(sel),), 1 / len(sel), dtype=f64)
            assert torch.allclose(out[b, p], (w[:, None] * sel).sum(0), atol=1e-12)


@pytest.mark.parametrize("patching", ["fixed", "byte"])
def test_static_patch_count_equals_the_patcher(patching):
    """Fixed and byte patching skip the host read of the patch count: their static count must be the
    patcher's, for any fixed size, cap and length (else the latent stack would drop or pad patches)."""
    import dataclasses

    from ionllama.config import ModelConfig
    from ionllama.model.ionllama_model import static_patch_count

    g = torch.Generator().manual_seed(3)
    for k in (1, 3, 4, 8):
        for m in (1, 2, 3, 8):
            for T in (1, 5, 8, 9, 100):
                cfg = dataclasses.replace(ModelConfig(), patching=patching, fixed_patch_size=k, max_patch_size=m)
                x = torch.randint(0, 256, (2, T), generator=g)
                _, _, n = compute_patches(x, None, patching, 0.0, "global", m, k)
                assert n.tolist() == [static_patch_count(cfg, T)] * 2, (k, m, T)
    assert static_patch_count(dataclasses.replace(ModelConfig(), patching="entropy"), 64) is None


def test_fixed_and_byte_patches_skip_the_cap_only_where_it_adds_nothing():
    """compute_patches leaves out the cap's cummax for byte patching and fixed k <= max (a scan kernel in every
    compiled forward): the starts, ids, counts and next start equal the capped ones for every k and max."""
    from ionllama.model.patcher import cap_patches, patch_ids, rule_starts

    x = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    for mode in ("fixed", "byte"):
        for k in (1, 2, 3, 4, 8):
            for m in (1, 2, 3, 4, 8):
                want = cap_patches(rule_starts(torch.nn.functional.pad(x, (0, 1)), None, mode, 0.0, "global", k), m)
                starts, b2p, n, nxt = compute_patches(x, None, mode, 0.0, "global", m, k, with_next=True)
                assert torch.equal(starts, want[:, :37]) and torch.equal(nxt, want[:, 37]), (mode, k, m)
                assert all(torch.equal(a, b) for a, b in zip((b2p, n), patch_ids(want[:, :37])))


@pytest.mark.parametrize("ngram,kw", [("hash", dict(ngram_sizes=(2, 3, 5))), ("hash_nodigit", dict(ngram_sizes=(1, 4))),
                                      ("conv", dict(conv_kernel=4)), ("conv", dict(conv_kernel=1)), ("none", {})])
def test_byte_embedding_context_is_how_far_back_an_embedding_reads(ngram, kw):
    """ByteEmbedding.context promises how many previous bytes an embedding depends on: it was 0 for the causal
    conv mode, whose embedding at t reads the bytes t-k+1..t."""
    from ionllama.model.byte_embedding import ByteEmbedding

    torch.manual_seed(0)
    emb = ByteEmbedding(8, ngram, buckets=97, **kw).double()
    x = torch.randint(97, 123, (1, 16))  # letters: no digit, so hash_nodigit keeps every table
    t = x.shape[1] - 1
    with torch.no_grad():
        ref = emb(x)[0, t]
        reach = 0
        for lag in range(1, t + 1):
            y = x.clone()
            y[0, t - lag] = 32 if int(x[0, t - lag]) != 32 else 33
            if not torch.equal(emb(y)[0, t], ref):
                reach = lag
    assert emb.context == reach


def test_const_decay_scan_takes_a_decay_of_zero():
    """log_a <= 0 includes -inf (a = 0: the state is the input alone). The chunked scan formed a^0 as exp(0 * -inf),
    NaN for every output of that channel, where the loop gives h_t = u_t; the gradient stays the loop's too."""
    la = torch.tensor([float("-inf"), -0.5, 0.0], dtype=f64)
    for T, chunk in [(1, 4), (4, 4), (9, 4), (40, 3)]:
        u = torch.randn(2, T, 3, dtype=f64, requires_grad=True)
        h0 = torch.randn(2, 3, dtype=f64)
        h = scan_const_decay(u, la, h0, chunk)
        ref = scan_loop(la, u, h0)
        assert torch.allclose(h, ref, atol=1e-12), T
        assert torch.equal(h[..., 0], u[..., 0])
        g = torch.randn_like(h)
        (gu,) = torch.autograd.grad((h * g).sum(), u)
        (gu_ref,) = torch.autograd.grad((ref * g).sum(), u)
        assert torch.allclose(gu, gu_ref, atol=1e-12), T


def test_integral_lnn_refuses_time_constants_of_one_byte_or_less():
    """min_timescale 1 is a = 0, a decay logit of -inf (the trainer refuses to save non-finite weights), below 1 a NaN
    logit: both built silently and the forward gave NaN while step() did not."""
    from ionllama.model.integral_lnn import IntegralLNNBlock

    for lo, hi in [(1.0, 256.0), (0.5, 256.0), (8.0, 4.0)]:
        with pytest.raises(ValueError, match="min_timescale"):
            IntegralLNNBlock(4, 8, min_timescale=lo, max_timescale=hi)
    blk = IntegralLNNBlock(4, 8, min_timescale=1.01, max_timescale=1.01)
    assert torch.isfinite(blk.decay_logit).all() and torch.isfinite(blk(torch.randn(1, 5, 4))).all()
