"""IntegralLNN scan in Triton: h_t = a * h_{t-1} + u_t with a per-channel constant decay a = exp(log_a).

One program owns one batch row, one time chunk and BLOCK_D channels, and walks its chunk in tiles of
BLOCK_T steps: inside a tile an associative scan over (decay, value) pairs, across tiles a carried
state; the next tile's loads are issued before the current tile's scan (manual double buffering). The
default tile, 16 steps x 128 channels for one warp, lays the warp's threads (almost) all along the channels, so
the scan over a tile's steps crosses few threads; 64-channel tiles of two warps spread the steps over threads and
warps (shuffles, shared memory), and measured 26 % slower.

With one chunk (n_chunks = 1, the default when batch * channel blocks fill the GPU) every element of
u is read once and every h written once: the forward moves 2 tensors of B*T*D and the backward 3
(dy and h_{t-1} in, du out). When batch * channels are too few to fill the GPU, time is split into
n_chunks chunks: a summary pass computes each chunk's zero-start end state (one more read of the
input), and each chunk's program combines the earlier chunks' summaries with a^(L * distance)
weights (one tile load, no serial chain) before its own scan.

Backward (reverse scan):  g_t = dy_t + a g_{t+1},  du_t = g_t,  dh0 = a g_0,
dlog_a = a * sum_{b,t} g_t h_{t-1}  (h_{-1} = h0 or 0). The backward walks its tiles from the end and
loads each tile's rows in reverse order, so the same forward associative scan does the reverse scan.

The oracle is ``ionllama.model.scan.scan_const_decay``.
"""
from __future__ import annotations

from typing import Optional  # custom-op schemas: the spelling every supported torch version parses

import torch
import triton
import triton.language as tl

from .launch_config import update_config


@triton.jit
def _affine_combine(a1, x1, a2, x2):
    # (x -> a1 x + x1) followed by (x -> a2 x + x2)
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _powers(la, BLOCK_T: tl.constexpr):
    # a^(r+1) for r < BLOCK_T straight from exp: the scan's own running product of a drifts by a few
    # ulps, and as the carry's factor that drift compounds over ~1/(1-a) steps (1e-5 at a = 0.998)
    r = tl.arange(0, BLOCK_T).to(tl.float32) + 1.0
    return tl.exp(r[:, None] * la[None, :])


@triton.jit
def _tile_rows(c_start, c_end, i, n_tiles, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
    steps = tl.arange(0, BLOCK_T)
    if REVERSE:
        rows = c_start + (n_tiles - 1 - i) * BLOCK_T + (BLOCK_T - 1 - steps)  # descending time
    else:
        rows = c_start + i * BLOCK_T + steps
    return rows, (rows >= c_start) & (rows < c_end)  # tile i == n_tiles (the prefetch past the end): empty


@triton.jit
def _columns(dblock, D, LOG_A, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Channel block `dblock`: its columns, their mask, and their log decays in fp32."""
    cols = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if EVEN_D:  # a mask constant along the channels keeps the loads 16-byte wide
        col_ok = tl.full([BLOCK_D], 1, tl.int1)
    return cols, col_ok, tl.load(LOG_A + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _chunk_summary(X, la, b, c, T, L, sxb, sxt, cols, col_ok,
                   REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Chunk c's zero-start final state, a weighted sum (no scan needed): forward
    E_c = sum_t a^(end-1-t) x_t (end = the chunk's last step + 1), reverse F_c = sum_t a^(t-start) x_t.
    Accumulated elementwise in a register tile with exact exp weights and reduced once at the end:
    one streaming read of x."""
    steps = tl.arange(0, BLOCK_T)
    if REVERSE:
        w_row = tl.exp(steps.to(tl.float32)[:, None] * la[None, :])  # a^r
    else:
        w_row = tl.exp((BLOCK_T - 1 - steps).to(tl.float32)[:, None] * la[None, :])  # a^(BT-1-r)
    c_start = c * L
    c_end = tl.minimum(c_start + L, T)
    base = X + b * sxb + cols[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for t0 in range(c_start, c_end, BLOCK_T):
        rows = t0 + steps
        x = tl.load(base + rows[:, None] * sxt, mask=(rows < c_end)[:, None] & col_ok[None, :], other=0.0)
        if REVERSE:
            w_tile = tl.exp((t0 - c_start).to(tl.float32) * la)  # a^(t0 - start)
        else:
            # a^(end - t0 - BT); the clamp only touches the last chunk's partial tile, whose E is never used
            w_tile = tl.exp(tl.maximum(c_end - t0 - BLOCK_T, 0).to(tl.float32) * la)
        acc += x.to(tl.float32) * w_row * w_tile[None, :]
    return tl.sum(acc, 0)


@triton.jit(do_not_specialize=["T", "n_chunks"])  # a prompt's length, whatever it is mod 16: one compile
def _scan_summary(X, LOG_A, SUM, T, D, L, n_chunks, sxb, sxt,
                  REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Every chunk's summary (_chunk_summary) into SUM: (B, n_chunks, D) fp32."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols, col_ok, la = _columns(tl.program_id(2), D, LOG_A, BLOCK_D, EVEN_D)
    s = _chunk_summary(X, la, b, c, T, L, sxb, sxt, cols, col_ok, REVERSE, BLOCK_T, BLOCK_D)
    tl.store(SUM + (b * n_chunks + c) * D + cols, s, mask=col_ok)


@triton.jit
def _carry_in(SUM, b, c, n_chunks, la, cols, col_ok, L, D, REVERSE: tl.constexpr, CG: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """State entering chunk c from the other chunks' summaries (zero when n_chunks == 1):
    forward sum_{c' < c} a^(L (c-1-c')) E_c', reverse sum_{c' > c} a^(L (c'-c-1)) F_c'.
    CG summaries a load (a [CG, BLOCK_D] tile: wide channel blocks load fewer at once)."""
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, n_chunks, CG):
        cc = c0 + tl.arange(0, CG)
        if REVERSE:
            use = (cc > c) & (cc < n_chunks)
            dist = cc - c - 1
        else:
            use = cc < c
            dist = c - 1 - cc
        s = tl.load(SUM + (b * n_chunks + cc)[:, None] * D + cols[None, :], mask=use[:, None] & col_ok[None, :],
                    other=0.0)
        w = tl.exp((tl.maximum(dist, 0) * L).to(tl.float32)[:, None] * la[None, :])
        acc += tl.sum(tl.where(use[:, None], w * s, 0.0), 0)
    return acc


@triton.jit
def _fwd_chunk(U, HOUT, b, c, h, la, T, L, sub, sut, shb, sht, cols, col_ok,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, FOLD: tl.constexpr):
    """Scan chunk c of row b from the state h entering it; writes h_t. FOLD: the entering state goes into the
    tile's first row (u_0 + a h) before its scan, instead of a^(r+1) h added to every row after it."""
    a = tl.exp(la)
    decay = tl.zeros([BLOCK_T, BLOCK_D], tl.float32) + a[None, :]
    if not FOLD:
        a_pow = _powers(la, BLOCK_T)
    is_first = (tl.arange(0, BLOCK_T) == 0)[:, None]
    is_last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None]
    c_start = c * L
    c_end = tl.minimum(c_start + L, T)
    n_tiles = tl.cdiv(c_end - c_start, BLOCK_T)
    u_base = U + b * sub + cols[None, :]
    h_base = HOUT + b * shb + cols[None, :]
    rows, ok = _tile_rows(c_start, c_end, 0, n_tiles, False, BLOCK_T)
    u_next = tl.load(u_base + rows[:, None] * sut, mask=ok[:, None] & col_ok[None, :], other=0.0)
    for i in range(0, n_tiles):
        u = u_next.to(tl.float32)
        mask = ok[:, None] & col_ok[None, :]
        cur_rows = rows
        rows, ok = _tile_rows(c_start, c_end, i + 1, n_tiles, False, BLOCK_T)
        u_next = tl.load(u_base + rows[:, None] * sut, mask=ok[:, None] & col_ok[None, :],
                         other=0.0)
        if FOLD:
            _, hs = tl.associative_scan((decay, tl.where(is_first, u + (a * h)[None, :], u)), 0, _affine_combine)
        else:
            _, x = tl.associative_scan((decay, u), 0, _affine_combine)  # zero-start scan of the tile
            hs = x + a_pow * h[None, :]
        tl.store(h_base + cur_rows[:, None] * sht, hs.to(HOUT.dtype.element_ty), mask=mask)
        h = tl.sum(tl.where(is_last, hs, 0.0), 0)


# an int of 1 gets its own compile (1-byte prompts), and so does n_chunks 1 against more (prompts from 512 bytes)
@triton.jit(do_not_specialize=["T", "n_chunks"])
def _scan_fwd(U, LOG_A, H0, SUM, HOUT, T, D, L, n_chunks, sub, sut, shb, sht,
              HAS_H0: tl.constexpr, CG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
              EVEN_D: tl.constexpr, FOLD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols, col_ok, la = _columns(tl.program_id(2), D, LOG_A, BLOCK_D, EVEN_D)
    h = _carry_in(SUM, b, c, n_chunks, la, cols, col_ok, L, D, False, CG, BLOCK_D)
    if HAS_H0:  # h0 decayed over the c * L steps before this chunk
        h0 = tl.load(H0 + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        h += tl.exp((c * L).to(tl.float32) * la) * h0
    _fwd_chunk(U, HOUT, b, c, h, la, T, L, sub, sut, shb, sht, cols, col_ok, BLOCK_T, BLOCK_D, FOLD)


@triton.jit
def _bwd_chunk(DY, HOUT, H0, DU, b, c, carry, la, T, D, L, sdb, sdt, shb, sht, sub, sut, cols, col_ok,
               HAS_H0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, FOLD: tl.constexpr):
    """Reverse scan of chunk c of row b from the gradient `carry` after it; writes du. Returns (this chunk's
    sum of g_t h_{t-1}, g at the chunk's first step). FOLD as in _fwd_chunk (a partial tile, whose first rows
    in reverse order are padding, is only ever the last chunk's, where the carry is zero)."""
    a = tl.exp(la)
    if HAS_H0:
        h0 = tl.load(H0 + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    decay = tl.zeros([BLOCK_T, BLOCK_D], tl.float32) + a[None, :]
    if not FOLD:
        a_pow = _powers(la, BLOCK_T)
    is_first = (tl.arange(0, BLOCK_T) == 0)[:, None]
    is_last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None]
    dla = tl.zeros([BLOCK_D], tl.float32)
    c_start = c * L
    c_end = tl.minimum(c_start + L, T)
    n_tiles = tl.cdiv(c_end - c_start, BLOCK_T)
    dy_base = DY + b * sdb + cols[None, :]
    h_base = HOUT + b * shb + cols[None, :]
    rows, ok = _tile_rows(c_start, c_end, 0, n_tiles, True, BLOCK_T)
    dy_next = tl.load(dy_base + rows[:, None] * sdt, mask=ok[:, None] & col_ok[None, :], other=0.0)
    hp_next = tl.load(h_base + (rows - 1)[:, None] * sht, mask=(ok & (rows >= 1))[:, None] & col_ok[None, :],
                      other=0.0)
    for i in range(0, n_tiles):
        dy = dy_next.to(tl.float32)
        h_prev = hp_next.to(tl.float32)
        mask = ok[:, None] & col_ok[None, :]
        cur_rows = rows
        rows, ok = _tile_rows(c_start, c_end, i + 1, n_tiles, True, BLOCK_T)
        nmask = ok
        dy_next = tl.load(dy_base + rows[:, None] * sdt, mask=nmask[:, None] & col_ok[None, :], other=0.0)
        hp_next = tl.load(h_base + (rows - 1)[:, None] * sht, mask=(nmask & (rows >= 1))[:, None] & col_ok[None, :],
                          other=0.0)
        if FOLD:
            _, g = tl.associative_scan((decay, tl.where(is_first, dy + (a * carry)[None, :], dy)), 0,
                                       _affine_combine)
        else:
            _, x = tl.associative_scan((decay, dy), 0, _affine_combine)
            g = x + a_pow * carry[None, :]
        tl.store(DU + b * sub + cur_rows[:, None] * sut + cols[None, :], g.to(DU.dtype.element_ty), mask=mask)
        if HAS_H0:
            h_prev = tl.where((cur_rows == 0)[:, None], h0[None, :], h_prev)
        dla += tl.sum(g * h_prev, 0)
        carry = tl.sum(tl.where(is_last, g, 0.0), 0)  # g at the tile's earliest step
    return dla, carry


@triton.jit
def _store_bwd_sums(DLA, DH0, b, c, n_rows, n_chunks, dla, carry, la, cols, col_ok, D):
    a = tl.exp(la)
    tl.store(DLA + cols.to(tl.int64) * (n_rows * n_chunks) + (b * n_chunks + c), dla * a, mask=col_ok)
    if c == 0:
        tl.store(DH0 + b * D + cols, carry * a, mask=col_ok)


@triton.jit
def _scan_bwd(DY, HOUT, LOG_A, H0, SUM, DU, DLA, DH0, T, D, L, n_chunks, sdb, sdt, shb, sht, sub, sut,
              HAS_H0: tl.constexpr, CG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
              EVEN_D: tl.constexpr, FOLD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols, col_ok, la = _columns(tl.program_id(2), D, LOG_A, BLOCK_D, EVEN_D)
    carry = _carry_in(SUM, b, c, n_chunks, la, cols, col_ok, L, D, True, CG, BLOCK_D)  # g after
    dla, carry = _bwd_chunk(DY, HOUT, H0, DU, b, c, carry, la, T, D, L, sdb, sdt, shb, sht, sub, sut, cols, col_ok,
                            HAS_H0, BLOCK_T, BLOCK_D, FOLD)
    _store_bwd_sums(DLA, DH0, b, c, tl.num_programs(0), n_chunks, dla, carry, la, cols, col_ok, D)


# Defaults from the H100 sweep of 2026-12-06 (bench_scan.py --sweep over 42 points, kernels timed directly,
# docs/results/checks-s55.md): 16-step x 128-channel tiles with one warp, whose threads lie (almost) all along the
# channels, so the scan over a tile's steps crosses few threads (the 2026-11-25 sweep had tried only 16-64 channels,
# whose tiles spread the steps over threads and warps); time split into chunks until batch x channel blocks x
# chunks >= 1024.
# 0.572 against 0.772 ms for the 16x8192x256 and 8x8192x1024 fwd+bwd kernels together.
# fold 1: in bf16 / fp16 the entering state goes into each tile's first row (0.572 against 0.625 ms); fp32 keeps
# the exact powers a^(r+1): folded, the fp32 rounding of a compounds over the tiles (dlog_a 1.1e-5 against the
# 1e-5 tolerance in the GPU selfcheck). fold 0: never; 2: in every dtype (the CPU checks of the folded form, in
# fp32, where bf16 rounding would hide an error). carry_group: chunk summaries a load in the carry-in (0: automatic).
_CONFIG = {"block_t": 16, "block_d": 128, "num_warps": 1, "n_chunks": 0, "min_programs": 1024,
           "min_chunk": 256, "fold": 1, "carry_group": 0}
MAX_CHUNKS = 64


def set_scan_config(**kw) -> dict:
    """Set block_t, block_d, num_warps, fold (0, 1, 2), carry_group; n_chunks (0 = automatic, else a fixed count);
    min_programs (automatic mode splits time until batch * channel blocks * chunks reaches this); min_chunk (steps).
    Returns the previous configuration."""
    old = update_config(_CONFIG, "scan", kw, int)
    if _CONFIG["fold"] not in (0, 1, 2) or _CONFIG["carry_group"] < 0:
        bad = dict(fold=_CONFIG["fold"], carry_group=_CONFIG["carry_group"])
        _CONFIG.update(old)
        raise ValueError(f"scan config {bad}: fold is 0, 1 or 2 and carry_group >= 0")
    return old


def _chunking(B: int, T: int, D: int) -> tuple[int, int]:
    """(n_chunks, chunk length L): L a multiple of block_t."""
    bt = _CONFIG["block_t"]
    n = _CONFIG["n_chunks"]
    if n <= 0:
        progs = B * triton.cdiv(D, _block_d(D))
        n = 1 if progs >= _CONFIG["min_programs"] else triton.cdiv(_CONFIG["min_programs"], progs)
        n = min(n, max(1, T // max(_CONFIG["min_chunk"], bt)))
    n = max(1, min(n, MAX_CHUNKS, triton.cdiv(T, bt)))
    L = triton.cdiv(triton.cdiv(T, n), bt) * bt  # a whole number of tiles: only the last chunk has a partial one
    return triton.cdiv(T, L), L


def _block_d(D: int) -> int:
    """Channels per program: block_d, or fewer for narrow inputs (at least 16, a power of two covering D), so a small
    D does not run mostly masked lanes (the tiny test models under the CPU interpreter: D 16-80)."""
    return min(_CONFIG["block_d"], max(16, triton.next_power_of_2(D)))


def _meta(D):
    bd = _block_d(D)
    return dict(BLOCK_T=_CONFIG["block_t"], BLOCK_D=bd, EVEN_D=D % bd == 0, num_warps=_CONFIG["num_warps"])


def _scan_meta(D, dtype):
    """_meta plus the scans' own constants: summaries loaded CG at a time (automatic: at most 4096 values a tile,
    32 at 128-channel blocks), FOLD (config fold: 1 in 16-bit dtypes, 2 in all)."""
    meta = _meta(D)
    cg = _CONFIG["carry_group"] or max(1, min(MAX_CHUNKS, 4096 // meta["BLOCK_D"]))
    fold = _CONFIG["fold"] == 2 or (_CONFIG["fold"] == 1 and dtype in (torch.bfloat16, torch.float16))
    return dict(meta, CG=triton.next_power_of_2(cg), FOLD=fold)


def _summaries(x, log_a, n, L, reverse):
    B, T, D = x.shape
    s = torch.empty((B, n, D), dtype=torch.float32, device=x.device)
    if n > 1:
        _scan_summary[(B, n, triton.cdiv(D, _block_d(D)))](
            x, log_a, s, T, D, L, n, x.stride(0), x.stride(1), REVERSE=reverse, **_meta(D))
    return s


def scan_forward(u, log_a, h0):
    B, T, D = u.shape
    n, L = _chunking(B, T, D)
    h = torch.empty((B, T, D), dtype=u.dtype, device=u.device)
    s = _summaries(u, log_a, n, L, reverse=False)
    _scan_fwd[(B, n, triton.cdiv(D, _block_d(D)))](
        u, log_a, h0 if h0 is not None else log_a, s, h, T, D, L, n,
        u.stride(0), u.stride(1), h.stride(0), h.stride(1),
        HAS_H0=h0 is not None, **_scan_meta(D, u.dtype))
    return h


def scan_backward(dy, h, log_a, h0):
    B, T, D = dy.shape
    n, L = _chunking(B, T, D)
    du = torch.empty((B, T, D), dtype=dy.dtype, device=dy.device)
    dla = torch.empty((D, B * n), dtype=torch.float32, device=dy.device)  # summed over its contiguous dim
    dh0 = torch.empty((B, D), dtype=torch.float32, device=dy.device)
    s = _summaries(dy, log_a, n, L, reverse=True)
    _scan_bwd[(B, n, triton.cdiv(D, _block_d(D)))](
        dy, h, log_a, h0 if h0 is not None else log_a, s, du, dla, dh0, T, D, L, n,
        dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), du.stride(0), du.stride(1),
        HAS_H0=h0 is not None, **_scan_meta(D, dy.dtype))
    return du, dla.sum(1), dh0


# A custom op, like the attention kernel (see dilated_attention_triton.py): one opaque node for Dynamo.
@torch.library.custom_op("ionllama::scan_const_decay_fwd", mutates_args=())
def scan_const_decay_fwd(u: torch.Tensor, log_a: torch.Tensor, h0: Optional[torch.Tensor]) -> torch.Tensor:
    return scan_forward(u if u.stride(-1) == 1 else u.contiguous(), log_a.contiguous(),
                        h0.contiguous() if h0 is not None else None)


@scan_const_decay_fwd.register_fake
def _(u, log_a, h0):
    return u.new_empty(u.shape)


@torch.library.custom_op("ionllama::scan_const_decay_bwd", mutates_args=())
def scan_const_decay_bwd(dy: torch.Tensor, h: torch.Tensor, log_a: torch.Tensor,
                         h0: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dlog_a in log_a's dtype, dh0 in h0's dtype, or fp32 zeros-shaped (B, D) when there is no h0)."""
    h0c = h0.contiguous() if h0 is not None else None
    du, dla, dh0 = scan_backward(dy if dy.stride(-1) == 1 else dy.contiguous(), h, log_a.contiguous(), h0c)
    return du, dla.to(log_a.dtype), dh0.to(h0.dtype) if h0 is not None else dh0


@scan_const_decay_bwd.register_fake
def _(dy, h, log_a, h0):
    B, _, D = dy.shape
    return (dy.new_empty(dy.shape), log_a.new_empty(log_a.shape),
            dy.new_empty((B, D), dtype=h0.dtype if h0 is not None else torch.float32))


def _scan_setup_context(ctx, inputs, output):
    u, log_a, h0 = inputs
    ctx.save_for_backward(output, log_a, h0)


def _scan_backward(ctx, dy):
    h, log_a, h0 = ctx.saved_tensors
    du, dla, dh0 = scan_const_decay_bwd(dy, h, log_a, h0)
    return du, dla, (dh0 if h0 is not None and ctx.needs_input_grad[2] else None)


scan_const_decay_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def scan_const_decay_triton(u: torch.Tensor, log_a: torch.Tensor, h0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton scan (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); same contract as the reference:
    u (B, T, D), log_a (D,) <= 0, h0 (B, D) or None -> h (B, T, D) in u's dtype."""
    return scan_const_decay_fwd(u, log_a, h0)
