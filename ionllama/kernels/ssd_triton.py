"""The selective-SSM scan of the Mamba-2 blocks (``ionllama.model.ssm.ssd_chunked``) as one Triton kernel (or three:
the split form below), forward only: for the frozen entropy model (stage A of the two-stage training step,
evaluation, a decoder's prefill), where nothing needs its gradient.

Why: ``ssd_chunked`` is exact and O(T), but as PyTorch ops it writes its per-chunk tensors to memory: the decay and
score matrices (L x L per chunk, L x L x H with the heads), the chunk states, all in fp32. For the entropy model
(H = 16 heads of P = 16 channels, state N = 16) at the Phase-1 shape (64 rows of 1,024 bytes) that is hundreds of
MB per block for a 278K-parameter model; in the twelfth session's 7-minute run the entropy model alone trained at
3.26 MB/s, and entropy patching's step was 8 ms slower than fixed patching's, its stage A running the entropy
model's forward eagerly.

Here one program owns one (row, head) and walks its time chunks of L steps, the state (P x N, fp32) in registers:
  cum   = cumsum(log_a) over the chunk                              (L,)
  y     = ((C B^T) * exp(seg) [i >= j]) @ x                         (L, L) @ (L, P)   the chunk's own inputs
        + (C @ state^T) * exp(cum)                                  (L, N) @ (N, P)   the state entering it
  state = exp(cum_L) state + (x * exp(cum_L - cum))^T @ B           (P, L) @ (L, N)
with seg[i, j] = log_a_{j+1} + ... + log_a_i (= cum_i - cum_j) and cum_L - cum summed directly, not as differences
of prefix sums: one step's large decay (a reset) made those lose ~1e-4 in fp32.
the same algebra as ``ssd_chunked`` (its docstring), every matmul a ``tl.dot`` in fp32 ("ieee": no TF32), so
results agree to fp32 rounding; nothing but x, log_a, B, C is read and y and the final state written. Padded steps
(T not a multiple of L) have log_a = 0 and x = 0: decay 1, no input, the state unchanged.

The split form (``set_ssd_config(split=1)``; the default "auto" takes it below 512 (row, head) programs, as timed
on an H200: benchmarks/bench_ssd_forward.py --scan, levers step ssd_split): the sequential kernel has only rows x
heads programs, each walking all T / L chunks in order; at seq 8192 x batch 8 that is 128 programs of 128 chunks
(593 us per call on an H200, the GPU mostly idle), where the Phase-1 shape (64 x 1024) has 1,024 programs of 16.
The standard Mamba-2 state passing instead:
  1. _ssd_chunk_state, a program per (chunk, head, row): each chunk's own end state from a zero entering state
     (the state line above without its first term) and its log decay cum_L, to an fp32 (b, H, n_chunks, P, N) buffer
  2. _ssd_state_pass, a program per (row, head, block of the P*N state): H_c = exp(cum_L,c) H_(c-1) + local_c over
     the chunks from h0 (or zero), G chunks per step as one (G x G) @ (G x block) matmul (ssm._pass_states' form;
     a step costs one load of G x block elements, not a chunk's matmuls), in place in that buffer; the last is hT
  3. _ssd_chunk_out, a program per (chunk, head, row): y as above, the entering state read from the buffer.
split=2 ("auto") takes it when rows x heads < auto_programs (512) and there are >= 2 chunks; an untimed guess.

The oracle is ``ssd_chunked``; checked by ``ionllama.kernels.selfcheck`` kind "ssd_scan" (Triton's interpreter
on CPU, the GPU with --device cuda; the sequential form passed on an H200 in the thirteenth session, the split form
so far only under the interpreter and Triton's sm_90 compiler: tests/test_ssd_split.py). On by default
(``ionllama.kernels.SSD_SCAN_KERNEL``; IONLLAMA_SSD_SCAN=0 takes the reference): the two-stage training step at the
Phase-1 shape went 32.6 -> 29.8 ms with it (docs/results/train-profile.md).
"""
from __future__ import annotations

from typing import Optional  # custom-op schemas: the spelling every supported torch version parses

import torch
import triton
import triton.language as tl

from .launch_config import update_config


@triton.jit
def _chunk_inputs(x_ptr, la_ptr, b_ptr, c_ptr, b, h, t, mt, rp, mp, rn, mn,
                  sx_b, sx_t, sx_h, sla_b, sla_t, sb_b, sb_t, sc_b, sc_t):
    """One chunk's x (L, BP), log_a (L,), B and C (L, BN), in fp32; padded steps (t >= T) read 0."""
    x = tl.load(x_ptr + b * sx_b + t[:, None] * sx_t + h * sx_h + rp[None, :],
                mask=mt[:, None] & mp[None, :], other=0.0).to(tl.float32)
    la = tl.load(la_ptr + b * sla_b + t * sla_t + h, mask=mt, other=0.0).to(tl.float32)
    bm = tl.load(b_ptr + b * sb_b + t[:, None] * sb_t + rn[None, :], mask=mt[:, None] & mn[None, :],
                 other=0.0).to(tl.float32)
    cm = tl.load(c_ptr + b * sc_b + t[:, None] * sc_t + rn[None, :], mask=mt[:, None] & mn[None, :],
                 other=0.0).to(tl.float32)
    return x, la, bm, cm


@triton.jit
def _segsum(la, rl):
    """seg[i, j] = la_{j+1} + ... + la_i (L, L), summed from zero per column, not as cum_i - cum_j: one step's large
    decay (log_a -1e4) made every later difference of two long fp32 sums lose ~1e-4 (ssm.ssd_chunked's form)."""
    return tl.cumsum(tl.where(rl[:, None] > rl[None, :], la[:, None], 0.0), 0)


@triton.jit
def _chunk_y(x, bm, cm, cum, seg, state, causal):
    """y of one chunk (L, BP): its own inputs ((C B^T) * exp(seg) [i >= j]) @ x, plus the state entering it,
    (C @ state^T) * exp(cum)."""
    scores = tl.dot(cm, tl.trans(bm), input_precision="ieee")  # (L, L): C_i . B_j
    decay = tl.where(causal, tl.exp(tl.where(causal, seg, 0.0)), 0.0)
    y = tl.dot(scores * decay, x, input_precision="ieee")
    return y + tl.dot(cm, tl.trans(state), input_precision="ieee") * tl.exp(cum)[:, None]


@triton.jit(do_not_specialize=["T"])  # an int of 1 gets its own compile (1-byte prompts)
def _ssd_fwd(x_ptr, la_ptr, b_ptr, c_ptr, h0_ptr, y_ptr, hT_ptr, T,
             sx_b, sx_t, sx_h, sla_b, sla_t, sb_b, sb_t, sc_b, sc_t, sy_b, sy_t, sy_h, sh_b, sh_h,
             P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
             L: tl.constexpr, HAS_H0: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rl = tl.arange(0, L)
    rp = tl.arange(0, BP)
    rn = tl.arange(0, BN)
    mp = rp < P
    mn = rn < N
    causal = rl[:, None] >= rl[None, :]
    s_off = b * sh_b + h * sh_h + rp[:, None] * N + rn[None, :]  # state (b, H, P, N), contiguous in (P, N)
    if HAS_H0:
        state = tl.load(h0_ptr + s_off, mask=mp[:, None] & mn[None, :], other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BP, BN), dtype=tl.float32)
    for c0 in range(0, T, L):
        t = c0 + rl
        mt = t < T
        x, la, bm, cm = _chunk_inputs(x_ptr, la_ptr, b_ptr, c_ptr, b, h, t, mt, rp, mp, rn, mn,
                                      sx_b, sx_t, sx_h, sla_b, sla_t, sb_b, sb_t, sc_b, sc_t)
        cum = tl.cumsum(la, 0)
        total = tl.sum(la, 0)
        seg = _segsum(la, rl)
        y = _chunk_y(x, bm, cm, cum, seg, state, causal)  # (L, BP)
        w = tl.exp(tl.sum(tl.where(rl[:, None] == L - 1, seg, 0.0), 0))  # decay from each step to the chunk's end
        state = state * tl.exp(total) + tl.dot(tl.trans(x * w[:, None]), bm, input_precision="ieee")
        tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + h * sy_h + rp[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mt[:, None] & mp[None, :])
    tl.store(hT_ptr + s_off, state, mask=mp[:, None] & mn[None, :])


@triton.jit(do_not_specialize=["T", "NC"])  # prompt lengths: one compile (see _ssd_fwd)
def _ssd_chunk_state(x_ptr, la_ptr, b_ptr, s_ptr, d_ptr, T, NC, H,
                     sx_b, sx_t, sx_h, sla_b, sla_t, sb_b, sb_t,
                     P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, L: tl.constexpr):
    """Split form, pass 1 (one program per chunk, head, row): the chunk's own end state from a zero entering state,
    (x * exp(cum_L - cum))^T @ B (P x N), into s[b, h, c], and its log decay cum_L into d[b, h, c]."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    rl = tl.arange(0, L)
    rp = tl.arange(0, BP)
    rn = tl.arange(0, BN)
    mp = rp < P
    mn = rn < N
    t = c * L + rl
    mt = t < T
    x = tl.load(x_ptr + b * sx_b + t[:, None] * sx_t + h * sx_h + rp[None, :],
                mask=mt[:, None] & mp[None, :], other=0.0).to(tl.float32)  # (L, BP)
    la = tl.load(la_ptr + b * sla_b + t * sla_t + h, mask=mt, other=0.0).to(tl.float32)  # (L,)
    bm = tl.load(b_ptr + b * sb_b + t[:, None] * sb_t + rn[None, :], mask=mt[:, None] & mn[None, :],
                 other=0.0).to(tl.float32)  # (L, BN)
    total = tl.sum(la, 0)
    to_end = tl.sum(tl.where(rl[:, None] > rl[None, :], la[:, None], 0.0), 0)  # la_{j+1} + ... + la_L, summed directly
    local = tl.dot(tl.trans(x * tl.exp(to_end)[:, None]), bm, input_precision="ieee")  # (BP, BN)
    bhc = (b.to(tl.int64) * H + h) * NC + c
    tl.store(s_ptr + bhc * (P * N) + rp[:, None] * N + rn[None, :], local, mask=mp[:, None] & mn[None, :])
    tl.store(d_ptr + bhc, total)


@triton.jit(do_not_specialize=["NC"])  # prompt lengths: one compile (see _ssd_fwd)
def _ssd_state_pass(s_ptr, d_ptr, h0_ptr, hT_ptr, NC, PN: tl.constexpr, G: tl.constexpr, BLK: tl.constexpr,
                    HAS_H0: tl.constexpr):
    """Split form, pass 2 (one program per (row, head) and BLK of its P*N state elements): the recurrence
    H_c = exp(d_c) H_{c-1} + s_c over the chunks, G chunks at a time as a (G x G) @ (G x BLK) matmul with the
    weights exp(cum_i - cum_j) [i >= j] (ssm._pass_states' form); s[b, h, c] is overwritten by H_c in place (each
    element is read, then written, by the same program), the last one written to hT as well."""
    bh = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLK + tl.arange(0, BLK)
    me = e < PN
    rg = tl.arange(0, G)
    causal = rg[:, None] >= rg[None, :]
    if HAS_H0:
        state = tl.load(h0_ptr + bh * PN + e, mask=me, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLK,), dtype=tl.float32)
    for c0 in range(0, NC, G):
        c = c0 + rg
        mc = c < NC
        ptrs = s_ptr + (bh * NC + c)[:, None] * PN + e[None, :]
        loc = tl.load(ptrs, mask=mc[:, None] & me[None, :], other=0.0)  # (G, BLK); padded chunks: 0, decay 1
        d = tl.load(d_ptr + bh * NC + c, mask=mc, other=0.0)  # (G,) log decays
        cum = tl.cumsum(d, 0)
        # seg[i, j] = d_{j+1} + ... + d_i, summed from zero per column rather than as cum_i - cum_j: over 32
        # chunks cum reaches ~-160, and the difference of two such fp32 sums loses ~1e-5 of the short decays
        # (the final state's relative error 1e-5 on the H200 against 4e-7 for the sequential kernel)
        seg = tl.cumsum(tl.where(rg[:, None] > rg[None, :], d[:, None], 0.0), 0)
        w = tl.where(causal, tl.exp(seg), 0.0)
        out = tl.dot(w, loc, input_precision="ieee") + tl.exp(cum)[:, None] * state[None, :]
        tl.store(ptrs, out, mask=mc[:, None] & me[None, :])
        to_end = tl.sum(tl.where(rg[:, None] == G - 1, seg, 0.0), 0)  # (G,): d_{j+1} + ... + d_{G-1}
        state = state * tl.exp(tl.sum(d, 0)) + tl.sum(tl.exp(to_end)[:, None] * loc, 0)
    tl.store(hT_ptr + bh * PN + e, state, mask=me)


@triton.jit(do_not_specialize=["T", "NC"])  # prompt lengths: one compile (see _ssd_fwd)
def _ssd_chunk_out(x_ptr, la_ptr, b_ptr, c_ptr, s_ptr, h0_ptr, y_ptr, T, NC, H,
                   sx_b, sx_t, sx_h, sla_b, sla_t, sb_b, sb_t, sc_b, sc_t, sy_b, sy_t, sy_h,
                   P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, L: tl.constexpr,
                   HAS_H0: tl.constexpr):
    """Split form, pass 3 (one program per chunk, head, row): y of the chunk, its own inputs plus the state
    entering it (s[b, h, c - 1] after pass 2; h0 or zero for the first chunk): _ssd_fwd's loop body."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    rl = tl.arange(0, L)
    rp = tl.arange(0, BP)
    rn = tl.arange(0, BN)
    mp = rp < P
    mn = rn < N
    ms = mp[:, None] & mn[None, :]
    causal = rl[:, None] >= rl[None, :]
    t = c * L + rl
    mt = t < T
    bh = b.to(tl.int64) * H + h
    s_off = rp[:, None] * N + rn[None, :]
    first = (tl.zeros((BP, BN), dtype=tl.int32) + c) == 0  # (a tensor mask: the interpreter takes no scalar one)
    state = tl.load(s_ptr + (bh * NC + c - 1) * (P * N) + s_off, mask=ms & ~first, other=0.0)
    if HAS_H0:
        state += tl.load(h0_ptr + bh * (P * N) + s_off, mask=ms & first, other=0.0).to(tl.float32)
    x, la, bm, cm = _chunk_inputs(x_ptr, la_ptr, b_ptr, c_ptr, b, h, t, mt, rp, mp, rn, mn,
                                  sx_b, sx_t, sx_h, sla_b, sla_t, sb_b, sb_t, sc_b, sc_t)
    y = _chunk_y(x, bm, cm, tl.cumsum(la, 0), _segsum(la, rl), state, causal)  # (L, BP)
    tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + h * sy_h + rp[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mt[:, None] & mp[None, :])


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot's operands are at least 16 wide


# split: 0 the sequential kernel (_ssd_fwd), 1 the split form, 2 "auto" (the default): the split form when the
# sequential grid (rows x heads) has fewer than auto_programs programs and there are >= 2 chunks. Measured on an
# H200 (benchmarks/bench_ssd_forward.py --scan, sixteenth session, docs/results/kernels.md), the entropy model's
# 16 heads: seq 8192 x 8 (128 programs) 595 -> 484 us with the split form; seq 1024 x 64 (1,024 programs) 484 ->
# 501 us. The threshold 512 lies between the two measured grids; nothing between them was timed.
# pass_group / pass_block: pass 2's chunks per step (G) and state elements per program; num_warps: passes 1 and 3.
_CONFIG = {"split": 2, "auto_programs": 512, "pass_group": 32, "pass_block": 64, "num_warps": 4}


def set_ssd_config(**kw) -> dict:
    """Set any of _CONFIG's keys; returns the previous configuration."""
    return update_config(_CONFIG, "ssd", kw, int)


def _use_split(b: int, H: int, n_chunks: int) -> bool:
    v = _CONFIG["split"]
    if v not in (0, 1, 2):
        raise ValueError(f"ssd split must be 0, 1 or 2 (auto), got {v}")
    return v == 1 or (v == 2 and n_chunks >= 2 and b * H < _CONFIG["auto_programs"])


def ssd_forward(x: torch.Tensor, log_a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                h0: Optional[torch.Tensor], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, T, H, P = x.shape
    N = Bm.shape[-1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    log_a, Bm, Cm = log_a.contiguous(), Bm.contiguous(), Cm.contiguous()
    work = torch.promote_types(x.dtype, torch.float32)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    hT = torch.empty(b, H, P, N, device=x.device, dtype=work)
    h0c = h0.to(work).contiguous() if h0 is not None else hT  # (unread without HAS_H0)
    L = max(16, min(triton.next_power_of_2(int(chunk)), 64))
    nc = triton.cdiv(T, L)
    if not _use_split(b, H, nc):
        _ssd_fwd[(b, H)](x, log_a, Bm, Cm, h0c, y, hT, T,
                         x.stride(0), x.stride(1), x.stride(2), log_a.stride(0), log_a.stride(1), Bm.stride(0),
                         Bm.stride(1), Cm.stride(0), Cm.stride(1), y.stride(0), y.stride(1), y.stride(2),
                         hT.stride(0), hT.stride(1),
                         P=P, N=N, BP=_block(P), BN=_block(N), L=L, HAS_H0=h0 is not None, num_warps=4)
        return y, hT
    # the split form: chunk states (fp32, P x N per chunk: 1 KB per chunk and head at P = N = 16), in place
    states = torch.empty(b, H, nc, P, N, device=x.device, dtype=torch.float32)
    decays = torch.empty(b, H, nc, device=x.device, dtype=torch.float32)
    nw = _CONFIG["num_warps"]
    _ssd_chunk_state[(nc, H, b)](x, log_a, Bm, states, decays, T, nc, H,
                                 x.stride(0), x.stride(1), x.stride(2), log_a.stride(0), log_a.stride(1),
                                 Bm.stride(0), Bm.stride(1),
                                 P=P, N=N, BP=_block(P), BN=_block(N), L=L, num_warps=nw)
    blk = max(16, min(triton.next_power_of_2(_CONFIG["pass_block"]), triton.next_power_of_2(P * N)))
    G = max(16, triton.next_power_of_2(_CONFIG["pass_group"]))
    _ssd_state_pass[(b * H, triton.cdiv(P * N, blk))](states, decays, h0c, hT, nc, PN=P * N, G=G, BLK=blk,
                                                      HAS_H0=h0 is not None, num_warps=4)
    _ssd_chunk_out[(nc, H, b)](x, log_a, Bm, Cm, states, h0c, y, T, nc, H,
                               x.stride(0), x.stride(1), x.stride(2), log_a.stride(0), log_a.stride(1),
                               Bm.stride(0), Bm.stride(1), Cm.stride(0), Cm.stride(1),
                               y.stride(0), y.stride(1), y.stride(2),
                               P=P, N=N, BP=_block(P), BN=_block(N), L=L, HAS_H0=h0 is not None, num_warps=nw)
    return y, hT


# A custom op, like the other kernels: one opaque node for Dynamo (stage A may be compiled). No autograd: the
# dispatcher (ionllama.kernels.ssd_scan) routes here only when no input needs a gradient.
@torch.library.custom_op("ionllama::ssd_scan_fwd", mutates_args=())
def ssd_scan_fwd(x: torch.Tensor, log_a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, h0: Optional[torch.Tensor],
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ssd_forward(x, log_a, Bm, Cm, h0, chunk)


@ssd_scan_fwd.register_fake
def _(x, log_a, Bm, Cm, h0, chunk):
    b, _, H, P = x.shape
    return x.new_empty(x.shape), x.new_empty((b, H, P, Bm.shape[-1]), dtype=torch.promote_types(x.dtype, torch.float32))
