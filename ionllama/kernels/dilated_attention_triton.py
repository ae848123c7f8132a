"""Dilated causal attention in Triton: forward + backward, O(N * Dh) memory, O(N * K * Dh) time.

Query i attends to keys i - o for the K offsets o (causal: i - o >= 0; packed batches: same segment
id). Every query has exactly one key per offset, so a score is an elementwise product and a row sum,
never a matmul: the kernels stream shifted, contiguous K/V (or Q/dO) rows and keep an online softmax
in fp32. The oracle is ``ionllama.model.dilated_attention.dilated_attention_reference``.

Kernels (one program = one block of rows of one (batch, head)):
  _fwd       per query block: load q once, loop over offsets, online softmax; writes out and lse.
  _delta     Delta_i = rowsum(dO_i * O_i) (the softmax-backward correction term).
  _bwd_dkdv  per key block j: loop over offsets, queries j + o are contiguous; recomputes p and
             ds = p (dO.v - Delta), accumulates dk, dv; optionally stores ds (B*H, K, N) fp32.
  _bwd_dq    per query block: dq_i = scale * sum_o ds[i, o] k[i - o], reading the stored ds
             (one shifted K row per offset); or, with store_ds=False, _bwd_dq_recompute recomputes
             ds from q, dO, lse, Delta and shifted K, V rows (no ds buffer, one more row per offset).
"""
from __future__ import annotations

from typing import Optional  # custom-op schemas: the spelling every supported torch version parses

import math

import torch
import triton
import triton.language as tl

from .launch_config import update_config

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _shifted_kv(k_base, v_base, OFFS, kk, SEG, seg_q, b, N, rows, row_ok, cols, col_ok, skn, svn,
                HAS_SEG: tl.constexpr):
    """K and V rows i - o for query rows i and the kk-th offset o (raw dtype), and which pairs are valid."""
    o = tl.load(OFFS + kk)
    krow = rows - o
    ok = row_ok & (krow >= 0)
    if HAS_SEG:
        seg_k = tl.load(SEG + b * N + krow, mask=ok, other=-2)
        ok = ok & (seg_k == seg_q)
    m = ok[:, None] & col_ok[None, :]
    k = tl.load(k_base + krow[:, None] * skn + cols[None, :], mask=m, other=0.0)
    v = tl.load(v_base + krow[:, None] * svn + cols[None, :], mask=m, other=0.0)
    return k, v, ok


@triton.jit
def _shifted_qdo(q_base, do_base, LSE, DELTA, OFFS, kk, SEG, seg_k, b, bh, N, keys, key_ok, cols, col_ok, sqn, sdn,
                 HAS_SEG: tl.constexpr):
    """Query rows j + o that see key rows j through the kk-th offset o: q, dO (raw dtype), lse, Delta."""
    o = tl.load(OFFS + kk)
    qrow = keys + o
    in_range = key_ok & (qrow < N)
    ok = in_range
    if HAS_SEG:
        seg_q = tl.load(SEG + b * N + qrow, mask=in_range, other=-2)
        ok = ok & (seg_q == seg_k)
    m = ok[:, None] & col_ok[None, :]
    q = tl.load(q_base + qrow[:, None] * sqn + cols[None, :], mask=m, other=0.0)
    do = tl.load(do_base + qrow[:, None] * sdn + cols[None, :], mask=m, other=0.0)
    lse = tl.load(LSE + bh * N + qrow, mask=ok, other=0.0)
    delta = tl.load(DELTA + bh * N + qrow, mask=ok, other=0.0)
    return q, do, lse, delta, ok, in_range, qrow


@triton.jit
def _shifted_k_ds(k_base, DS, OFFS, kk, bh, n_offs, N, rows, row_ok, cols, col_ok, skn):
    """ds[i, kk] and K rows i - o (skipped where ds == 0: masked pairs need no row)."""
    o = tl.load(OFFS + kk)
    krow = rows - o
    ok = row_ok & (krow >= 0)
    ds = tl.load(DS + (bh * n_offs + kk) * N + rows, mask=ok, other=0.0)
    ok = ok & (ds != 0.0)
    k = tl.load(k_base + krow[:, None] * skn + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
    return ds, k


@triton.jit(do_not_specialize=["N", "n_offs"])  # an int of 1 gets its own compile (1-patch prompts)
def _fwd(Q, K, V, O, O32, LSE, OFFS, SEG,
         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
         H, N, n_offs, scale_log2,
         HAS_SEG: tl.constexpr, STORE_O32: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit base offsets: B * H * N * Dh may pass 2^31
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < HEAD_DIM  # constant-true (and folded) when BLOCK_D == HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_SEG:
        seg_q = tl.load(SEG + b * N + rows, mask=row_ok, other=-1)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    if not HAS_SEG:
        seg_q = rows  # unused placeholder
    # finite start: a row whose first offsets are all masked keeps alpha = 1, p = 0 (no inf - inf)
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if PREFETCH:
        k_n, v_n, ok_n = _shifted_kv(k_base, v_base, OFFS, 0, SEG, seg_q, b, N, rows, row_ok, cols, col_ok,
                                     skn, svn, HAS_SEG)
    for kk in range(0, n_offs):
        if PREFETCH:  # issue the next offset's loads before this offset's math (OFFS ends in a sentinel)
            k, v, ok = k_n, v_n, ok_n
            k_n, v_n, ok_n = _shifted_kv(k_base, v_base, OFFS, kk + 1, SEG, seg_q, b, N, rows, row_ok, cols,
                                         col_ok, skn, svn, HAS_SEG)
        else:
            k, v, ok = _shifted_kv(k_base, v_base, OFFS, kk, SEG, seg_q, b, N, rows, row_ok, cols, col_ok,
                                   skn, svn, HAS_SEG)
        s = tl.sum(q * k.to(tl.float32), 1) * scale_log2  # base-2 logits
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, s)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l = l * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m = m_new
    l = tl.where(row_ok, l, 1.0)  # padding rows: keep log2/div finite
    out = acc / l[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + cols[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if STORE_O32:  # the unrounded O for the backward's Delta (O32 is contiguous, O's shape)
        tl.store(O32 + bh.to(tl.int64) * N * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :], out,
                 mask=row_ok[:, None] & col_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * N + rows, (m + tl.log2(l)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _delta(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, N,
           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit base offsets: B * H * N * Dh may pass 2^31
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DS, DK, DV, OFFS, SEG,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
              sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
              H, N, n_offs, scale, scale_log2,
              HAS_SEG: tl.constexpr, STORE_DS: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    key_ok = keys < N
    col_ok = cols < HEAD_DIM
    kmask = key_ok[:, None] & col_ok[None, :]
    k = tl.load(K + b * skb + h * skh + keys[:, None] * skn + cols[None, :], mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + h * svh + keys[:, None] * svn + cols[None, :], mask=kmask, other=0.0).to(tl.float32)
    if HAS_SEG:
        seg_k = tl.load(SEG + b * N + keys, mask=key_ok, other=-1)
    else:
        seg_k = keys  # unused placeholder
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if PREFETCH:
        q_n, do_n, lse_n, de_n, ok_n, inr_n, qrow_n = _shifted_qdo(q_base, do_base, LSE, DELTA, OFFS, 0, SEG, seg_k, b,
                                                                   bh, N, keys, key_ok, cols, col_ok, sqn, sdn,
                                                                   HAS_SEG)
    for kk in range(0, n_offs):
        if PREFETCH:
            q, do, lse, delta, ok, in_range, qrow = q_n, do_n, lse_n, de_n, ok_n, inr_n, qrow_n
            q_n, do_n, lse_n, de_n, ok_n, inr_n, qrow_n = _shifted_qdo(q_base, do_base, LSE, DELTA, OFFS, kk + 1, SEG,
                                                                       seg_k, b, bh, N, keys, key_ok, cols, col_ok,
                                                                       sqn, sdn, HAS_SEG)
        else:
            q, do, lse, delta, ok, in_range, qrow = _shifted_qdo(q_base, do_base, LSE, DELTA, OFFS, kk, SEG, seg_k, b,
                                                                 bh, N, keys, key_ok, cols, col_ok, sqn, sdn, HAS_SEG)
        q = q.to(tl.float32)
        do = do.to(tl.float32)
        s = tl.sum(q * k, 1) * scale_log2
        p = tl.where(ok, tl.exp2(s - lse * 1.4426950408889634), 0.0)
        dv += p[:, None] * do
        dp = tl.sum(do * v, 1)
        ds = p * (dp - delta)
        dk += ds[:, None] * q
        if STORE_DS:
            # every (query i, offset o) with i - o >= 0 is written exactly once, here (0 where masked)
            tl.store(DS + (bh * n_offs + kk) * N + qrow, ds, mask=in_range)
    tl.store(DK + b * sdkb + h * sdkh + keys[:, None] * sdkn + cols[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kmask)
    tl.store(DV + b * sdvb + h * sdvh + keys[:, None] * sdvn + cols[None, :], dv.to(DV.dtype.element_ty),
             mask=kmask)


@triton.jit
def _bwd_dq(K, DS, DQ, OFFS, skb, skh, skn, sdqb, sdqh, sdqn, H, N, n_offs, scale,
            PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < HEAD_DIM
    k_base = K + b * skb + h * skh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if PREFETCH:
        ds_n, k_n = _shifted_k_ds(k_base, DS, OFFS, 0, bh, n_offs, N, rows, row_ok, cols, col_ok, skn)
    for kk in range(0, n_offs):
        if PREFETCH:
            ds, k = ds_n, k_n
            ds_n, k_n = _shifted_k_ds(k_base, DS, OFFS, kk + 1, bh, n_offs, N, rows, row_ok, cols, col_ok, skn)
        else:
            ds, k = _shifted_k_ds(k_base, DS, OFFS, kk, bh, n_offs, N, rows, row_ok, cols, col_ok, skn)
        dq += ds[:, None] * k.to(tl.float32)
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqn + cols[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bwd_dq_recompute(Q, K, V, DO, LSE, DELTA, DQ, OFFS, SEG,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sdqb, sdqh, sdqn,
                      H, N, n_offs, scale, scale_log2,
                      HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit base offsets: B * H * N * Dh may pass 2^31
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < HEAD_DIM  # constant-true (and folded) when BLOCK_D == HEAD_DIM
    rmask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + cols[None, :], mask=rmask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + cols[None, :], mask=rmask, other=0.0).to(tl.float32)
    lse2 = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
    if HAS_SEG:
        seg_q = tl.load(SEG + b * N + rows, mask=row_ok, other=-1)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for kk in range(0, n_offs):
        o = tl.load(OFFS + kk)
        krow = rows - o
        ok = row_ok & (krow >= 0)
        if HAS_SEG:
            seg_k = tl.load(SEG + b * N + krow, mask=ok, other=-2)
            ok = ok & (seg_k == seg_q)
        tile_ok = ok[:, None] & col_ok[None, :]
        k = tl.load(k_base + krow[:, None] * skn + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        v = tl.load(v_base + krow[:, None] * svn + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp2(tl.sum(q * k, 1) * scale_log2 - lse2), 0.0)
        ds = p * (tl.sum(do * v, 1) - delta)
        dq += ds[:, None] * k
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqn + cols[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=rmask)


# ----------------------------------------------------------------------------------------------
# launch configuration: defaults from the H100 sweep of 2026-11-25 (benchmarks/bench_attention.py --sweep,
# N = 16K and 64K; docs/notes/kernels-notes.md); override with set_attention_config() for experiments.
_CONFIG = {"fwd": (32, 4, True), "dkdv": (32, 4, True), "dq": (32, 4, True), "delta": (64, 4), "store_ds": True}


def set_attention_config(**kw) -> dict:
    """Set launch configs: fwd/dkdv/dq = (rows per program, num_warps, prefetch: issue the next offset's
    loads before the current offset's math); delta = (rows, num_warps); store_ds: bool.
    Returns the previous configuration."""
    return update_config(_CONFIG, "attention", kw)


def _block_d(Dh: int) -> int:
    return max(16, triton.next_power_of_2(Dh))


def _s(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _lastdim_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


_SENTINEL = 1 << 30  # an offset past every row: the prefetch of "offset K" loads nothing
_OFFS_HOST: dict = {}  # offsets -> pinned host int32 tensor; never cleared (one per distinct N, a captured
                      # CUDA graph re-reads its host tensor at every replay)


def _prep_offsets(offsets, N: int, device) -> torch.Tensor:
    """Offsets < N as an int32 device tensor with a trailing sentinel, copied from a cached pinned host
    tensor: an asynchronous copy, so the host does not wait. No device tensor is cached across calls: under
    `torch.compile(mode="reduce-overhead")` a cached one was allocated in the CUDA-graph pool during warm-up
    and replay failed with "1 tensor(s) in the cudagraph pool not tracked as outputs" (train-profile.md)."""
    offs = tuple(int(o) for o in offsets if int(o) < N) + (_SENTINEL,)
    device = torch.device(device)
    if device.type != "cuda":  # the Triton interpreter on CPU
        return torch.tensor(offs, dtype=torch.int32, device=device)
    host = _OFFS_HOST.get(offs)
    if host is None:
        host = _OFFS_HOST[offs] = torch.tensor(offs, dtype=torch.int32).pin_memory()
    return host.to(device, non_blocking=True)


def attention_forward(q, k, v, offs, seg, scale, o32=None):
    """o32: None, or a contiguous fp32 (B, H, N, Dh) tensor that also receives O before rounding to q's dtype."""
    B, H, N, Dh = q.shape
    o = torch.empty((B, H, N, Dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    bm, nw, pf = _CONFIG["fwd"]
    grid = (triton.cdiv(N, bm), B * H)
    _fwd[grid](q, k, v, o, o32 if o32 is not None else o, lse, offs, seg if seg is not None else offs,
               *_s(q), *_s(k), *_s(v), *_s(o), H, N, offs.numel() - 1, scale * LOG2E,
               HAS_SEG=seg is not None, STORE_O32=o32 is not None, PREFETCH=pf, BLOCK_M=bm, BLOCK_D=_block_d(Dh),
               HEAD_DIM=Dh, num_warps=nw)
    return o, lse


def ds_index_fits(bh: int, k: int, n: int) -> bool:
    """Does the stored ds buffer (B*H, K, N) fit the kernels' 32-bit index (bh * K + kk) * N + row? Past it (an 8 GiB
    fp32 buffer) the backward recomputes ds instead of storing it, which needs no such index (audit)."""
    return bh * k * n < 2**31


def attention_backward(do, q, k, v, o, lse, offs, seg, scale, store_ds=None, dlse=None):
    """dlse: the gradient of the returned lse, or None. d lse_i / d s_ij = p_ij, so it enters as delta_i - dlse_i
    in ds = p (dp - delta): no kernel changes."""
    B, H, N, Dh = q.shape
    store_ds = _CONFIG["store_ds"] if store_ds is None else store_ds
    BD = _block_d(Dh)
    K_ = offs.numel() - 1  # without the sentinel
    store_ds = store_ds and ds_index_fits(B * H, K_, N)
    seg_arg = seg if seg is not None else offs
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    bm, nw = _CONFIG["delta"]
    _delta[(triton.cdiv(N, bm), B * H)](o, do, delta, *_s(o), *_s(do), H, N,
                                        BLOCK_M=bm, BLOCK_D=BD, HEAD_DIM=Dh, num_warps=nw)
    if dlse is not None:
        delta -= dlse.float()
    dq = torch.empty((B, H, N, Dh), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, N, Dh), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, N, Dh), dtype=v.dtype, device=q.device)
    ds = torch.empty((B * H, K_, N) if store_ds else (1,), dtype=torch.float32, device=q.device)
    bn, nw, pf = _CONFIG["dkdv"]
    _bwd_dkdv[(triton.cdiv(N, bn), B * H)](
        q, k, v, do, lse, delta, ds, dk, dv, offs, seg_arg,
        *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv), H, N, K_, scale, scale * LOG2E,
        HAS_SEG=seg is not None, STORE_DS=store_ds, PREFETCH=pf, BLOCK_N=bn, BLOCK_D=BD, HEAD_DIM=Dh, num_warps=nw)
    bm, nw, pf = _CONFIG["dq"]
    grid = (triton.cdiv(N, bm), B * H)
    if store_ds:
        _bwd_dq[grid](k, ds, dq, offs, *_s(k), *_s(dq), H, N, K_, scale, PREFETCH=pf,
                      BLOCK_M=bm, BLOCK_D=BD, HEAD_DIM=Dh, num_warps=nw)
    else:
        _bwd_dq_recompute[grid](q, k, v, do, lse, delta, dq, offs, seg_arg,
                                *_s(q), *_s(k), *_s(v), *_s(do), *_s(dq), H, N, K_, scale, scale * LOG2E,
                                HAS_SEG=seg is not None, BLOCK_M=bm, BLOCK_D=BD, HEAD_DIM=Dh, num_warps=nw)
    return dq, dk, dv


# The kernels enter autograd and torch.compile as custom ops (torch.library): opaque to Inductor (which
# would otherwise re-trace the user kernels), visible to Dynamo as one node each, so a compiled forward
# keeps one graph around them instead of breaking at every call. `local_width >= 0` computes the dilated
# offsets inside the op from N, so a compiled caller never traces (and guards on) the offset list.
def _offsets_for(offsets: list[int], local_width: int, N: int) -> list[int]:
    if local_width < 0:
        return offsets
    from ..model.dilated_attention import dilated_offsets
    return dilated_offsets(N, local_width)


def _seg32(seg, device):
    """The kernels compare int32 ids: ids that differ by a multiple of 2**32 would share a segment. Checked unless a
    CUDA graph is being captured (the check reads the values back); no caller passes ids that large today."""
    if seg is None:
        return None
    if seg.dtype not in (torch.int32, torch.int16, torch.int8, torch.uint8) and seg.numel() and not (
            seg.is_cuda and torch.cuda.is_current_stream_capturing()):
        lo, hi = seg.aminmax()
        if lo.item() < -2**31 or hi.item() >= 2**31:
            raise ValueError(f"segment ids must fit in int32 (got {lo.item()} .. {hi.item()}); number the "
                             "segments of each row 0, 1, 2, ...")
    return seg.to(device=device, dtype=torch.int32).contiguous()


@torch.library.custom_op("ionllama::dilated_attention_fwd", mutates_args=())
def dilated_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: list[int], local_width: int,
                          segment_ids: Optional[torch.Tensor], scale: float, keep_fp32_o: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (o, lse, o32): o32 is O in fp32 before rounding when keep_fp32_o, else an empty tensor."""
    N = q.shape[2]
    offs = _prep_offsets(_offsets_for(offsets, local_width, N), N, q.device)
    o32 = torch.empty(q.shape if keep_fp32_o else (0,), dtype=torch.float32, device=q.device)
    o, lse = attention_forward(_lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v), offs,
                               _seg32(segment_ids, q.device), scale, o32=o32 if keep_fp32_o else None)
    return o, lse, o32


@dilated_attention_fwd.register_fake
def _(q, k, v, offsets, local_width, segment_ids, scale, keep_fp32_o=False):
    return (q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32),
            q.new_empty(q.shape if keep_fp32_o else (0,), dtype=torch.float32))


@torch.library.custom_op("ionllama::dilated_attention_bwd", mutates_args=())
def dilated_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, offsets: list[int], local_width: int, segment_ids: Optional[torch.Tensor],
                          scale: float, dlse: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = q.shape[2]
    offs = _prep_offsets(_offsets_for(offsets, local_width, N), N, q.device)
    return attention_backward(_lastdim_contig(do), _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v),
                              o, lse, offs, _seg32(segment_ids, q.device), scale, dlse=dlse)


@dilated_attention_bwd.register_fake
def _(do, q, k, v, o, lse, offsets, local_width, segment_ids, scale, dlse=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, offsets, local_width, segment_ids, scale, keep_fp32_o = inputs
    o, lse, o32 = output
    # Delta = rowsum(dO * O) from the rounded bf16 O cost dq / dk up to 8x their error at large logits (benchmarks/
    # attention_bf16_grads.py); the unrounded O brings them to the output's own rounding level
    ctx.save_for_backward(q, k, v, o32 if keep_fp32_o else o, lse, segment_ids)
    ctx.mark_non_differentiable(o32)  # a buffer for the backward: a loss on it got zero gradients, silently
    ctx.offsets, ctx.local_width, ctx.scale = offsets, local_width, scale
    ctx.set_materialize_grads(False)  # an unused lse (every caller today) brings no zeros to subtract


def _attn_backward(ctx, do, dlse, _do32):  # lse carries its gradient, as the reference's does (it was dropped)
    q, k, v, o, lse, seg = ctx.saved_tensors
    if do is None:  # only lse was used
        do = q.new_zeros(q.shape)
    dq, dk, dv = dilated_attention_bwd(do, q, k, v, o, lse, ctx.offsets, ctx.local_width, seg, ctx.scale, dlse)
    return dq, dk, dv, None, None, None, None, None


dilated_attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


def dilated_attention_triton(q, k, v, offsets, segment_ids=None, scale=None, return_lse=False, local_width=-1):
    """Triton dilated attention (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
    Same contract as dilated_attention_reference; offsets must contain 0. With local_width >= 0 the
    offsets are dilated_offsets(N, local_width), computed inside the op (pass offsets=None)."""
    Dh = q.shape[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(Dh)
    offs = [] if local_width >= 0 else [int(o) for o in offsets]
    # 16-bit inputs that will be differentiated keep an fp32 O for the backward (4 bytes per element of O)
    keep = (q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and any(t.requires_grad for t in (q, k, v)))
    o, lse, _ = dilated_attention_fwd(q, k, v, offs, local_width, segment_ids, scale, keep)
    return (o, lse) if return_lse else o
