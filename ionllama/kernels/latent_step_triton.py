"""One decode step of a latent TransformerBlock in five Triton kernels (forward only, small batches).

Why: batch-1 generation is GPU-bound on kernel count (issue #4). IonLlamaDecoder.advance_latent runs one step
of every latent block when a patch completes; compiled and captured, the whole latent stage was ~154 kernels
(104 Inductor kernels + 50 library matmuls for ionllama-small's 12 blocks). Here a block's step is five
launches (one custom op, ``ionllama::latent_block_step``):

  K1 _latent_qkv_rope: RMSNorm(z) -> qkv rows of a block of channel pairs (2c, 2c + 1) -> RoPE of the q and k
                       pairs at the patch position i -> q to a (B, d) buffer; k and v into the layer's caches
                       at slot i (in place, every row: rows that do not commit a patch write a slot that is
                       not yet valid, as the PyTorch path does).
  K2 _latent_attn:     one query per (row, head) over the dilated keys i - o for the decoder's offsets o
                       (i - o >= 0), or over all keys 0..i (dense attention; an online softmax over key blocks,
                       the loop bound read from i: O(i) work, not O(cache length)); scores, softmax and the
                       weighted sum of V in fp32, the unnormalised probabilities rounded to the model's dtype
                       before they weight V (as SDPA's fused kernels do) -> y (B, d).
  K3 = lnn_step_triton._lnn_ffn_down: proj rows over y -> z1 = z + that.
  K4 = lnn_step_triton._lnn_ffn_up:   norm2(z1) -> SwiGLU w_in rows (gate, value) -> u = silu(gate) * value.
  K5 = lnn_step_triton._lnn_ffn_down: w_out rows over u -> out = z1 + that.

K3-K5 are the IntegralLNN step's FFN kernels: a block's residual proj + SwiGLU FFN round exactly as that step's
FFN does. GEMVs are ``tl.dot`` of the rows (padded to BLOCK_B >= 16) with the program's weight rows, fp32
accumulation (IEEE fp32 for fp32 models and under the CPU interpreter: lnn_step_triton._rows_times_wt).

Dtypes follow advance_latent run eagerly in the model's dtype (weights, z and the caches in that dtype; the RoPE
tables cos / sin (N, head_dim / 2) in fp32 for every cache slot, common.rope_cos_sin of 0..N-1 computed once per
decoder: K1 reads row i, so a step computes no cos / sin; passed per step, Inductor recomputed them for every
layer's call of the op):
the normalised input, the qkv outputs, the rotated q and k (x1 cos - x2 sin, x1 sin + x2 cos in fp32, then
rounded), the attention output, the proj output and each residual sum, the SwiGLU gate / value / silu(gate) /
product, the w_out output are rounded to it (round to nearest even, lnn_step_triton._round), fp32 in between.
Attention: PyTorch's SDPA kernels differ by backend in what they round inside. Here, as CPU flash attention does
(and, presumably, the GPU flash / memory-efficient kernels, whose P @ V is a bf16 MMA; not checked), the scores,
max and sum are fp32 and the unnormalised probabilities exp(s - max) are rounded to the model's dtype for P @ V
(fp32 accumulation), then divided by the fp32 sum and rounded. In CPU checks (bf16, 37-40 keys, random inputs)
this matched SDPA's output on 90-99.6% of the elements (60-67% with P kept in fp32), the others a few bf16 steps
apart (at most 11, near zero). Under the interpreter (bf16): the tiny test shapes (heads of 16 / 32) mostly came
out bit-identical; at ionllama-small's latent shape (d 512, 8 heads of 64, real q / k projections) the attention
output differed from CPU SDPA on 8-13% of its elements (cause not pinned down: SDPA's exp or key blocking), so
a block's output came out ~4e-3 relative apart, while proj + FFN (K3-K5) given the same attention output were
bit-identical. fp32: the order of the fp32 sums (~3e-7 relative).

The reference is the PyTorch path of ``ionllama.generation.ionllama_decoder.IonLlamaDecoder.advance_latent``
(checked by ``ionllama.kernels.selfcheck`` kind "latent_step"). Block sizes are untuned: nothing has been timed
on a GPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch_config import update_config
from .lnn_step_triton import _cast, _lnn_ffn_down, _lnn_ffn_up, _pow2, _rms_rows, _round, _rows_times_wt, _tile
from .pdl import gdc_launch, gdc_wait, pdl_kwargs


@triton.jit
def _latent_qkv_rope(Z, NW, WQKV, COS, SIN, I, Q, KC, VC, B, D, NSLOT, eps,
                     szb, swq, scb, sqb, skb, skh, skn,
                     HD: tl.constexpr, DP: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr,
                     IEEE: tl.constexpr, GDC: tl.constexpr):
    DT = Q.dtype.element_ty
    # channel pairs j: qkv output channels 2j (x1) and 2j + 1 (x2); 3D / 2 pairs
    rows, row_ok, rows64, j, j_ok = _tile(B, 3 * D // 2, BLOCK_B, BLOCK_J)
    k = tl.arange(0, DP)
    k_ok = k < D
    m_jk = j_ok[:, None] & k_ok[None, :]
    m_rj = row_ok[:, None] & j_ok[None, :]

    nw = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)  # parameters before the wait (pdl.py)
    w_even = WQKV + (2 * j)[:, None].to(tl.int64) * swq + k[None, :]
    w1 = tl.load(w_even, mask=m_jk, other=0.0)
    w2 = tl.load(w_even + swq, mask=m_jk, other=0.0)
    gdc_wait(GDC)
    gdc_launch(GDC)
    x = tl.load(Z + rows64[:, None] * szb + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    a = _rms_rows(x.to(tl.float32), nw, eps, D, DT).to(DT)
    x1 = _round(_rows_times_wt(a, w1, IEEE), DT)
    x2 = _round(_rows_times_wt(a, w2, IEEE), DT)

    c = 2 * j
    sec = c // D  # 0: q, 1: k, 2: v (qkv.view(B, 1, 3, H, Dh))
    hd = c % D  # head * HD + dim (even)
    f = (hd % HD) // 2  # the pair's frequency
    slot = tl.load(I + rows, mask=row_ok, other=0)  # the patch index: RoPE position and cache slot
    slot_ok = row_ok & (slot >= 0) & (slot < NSLOT)
    m_t = slot_ok[:, None] & j_ok[None, :]
    cs = tl.load(COS + (slot * scb)[:, None] + f[None, :], mask=m_t, other=0.0)  # table row i
    sn = tl.load(SIN + (slot * scb)[:, None] + f[None, :], mask=m_t, other=0.0)
    rot = (sec < 2)[None, :]  # apply_rope in fp32 on q and k, then rounded; v as projected
    e = tl.where(rot, _round(x1 * cs - x2 * sn, DT), x1)
    o = tl.where(rot, _round(x1 * sn + x2 * cs, DT), x2)

    q_ptr = Q + rows64[:, None] * sqb + hd[None, :]
    m_q = m_rj & (sec == 0)[None, :]
    tl.store(q_ptr, e.to(DT), mask=m_q)
    tl.store(q_ptr + 1, o.to(DT), mask=m_q)
    cache_off = rows64[:, None] * skb + (slot * skn)[:, None] + ((hd // HD) * skh + hd % HD)[None, :]
    m_c = slot_ok[:, None] & j_ok[None, :]
    CT = KC.dtype.element_ty
    m_k = m_c & (sec == 1)[None, :]
    tl.store(KC + cache_off, e.to(CT), mask=m_k)
    tl.store(KC + cache_off + 1, o.to(CT), mask=m_k)
    m_v = m_c & (sec == 2)[None, :]
    tl.store(VC + cache_off, e.to(CT), mask=m_v)
    tl.store(VC + cache_off + 1, o.to(CT), mask=m_v)


@triton.jit
def _latent_attn(Q, KC, VC, I, OFFS, Y, NOFF, NSLOT, scale, sqb, skb, skh, skn, syb,
                 HD: tl.constexpr, DHP: tl.constexpr, KP: tl.constexpr, BLOCK_KV: tl.constexpr,
                 DILATED: tl.constexpr, GDC: tl.constexpr):
    DT = Y.dtype.element_ty
    gdc_wait(GDC)  # everything here is state: nothing to load before the wait (pdl.py)
    gdc_launch(GDC)
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, DHP)
    d_ok = d < HD
    q = tl.load(Q + b * sqb + h * HD + d, mask=d_ok, other=0.0).to(tl.float32)
    i = tl.load(I + b)
    kb = KC + b * skb + h * skh
    vb = VC + b * skb + h * skh
    if DILATED:  # keys i - o for the offsets o (offset 0, the patch itself, is always visible)
        o = tl.arange(0, KP)
        idx = i - tl.load(OFFS + o, mask=o < NOFF, other=0)
        ok = (o < NOFF) & (idx >= 0) & (idx < NSLOT)  # i < NSLOT unless the caller overran the cache
        m = ok[:, None] & d_ok[None, :]
        kk = tl.load(kb + idx[:, None] * skn + d[None, :], mask=m, other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(kk * q[None, :], 1) * scale, float("-inf"))
        p = tl.exp(s - tl.max(s, 0))
        vv = tl.load(vb + idx[:, None] * skn + d[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.sum(_round(p, DT)[:, None] * vv, 0) / tl.sum(p, 0)
    else:  # keys 0..i: online softmax over blocks of BLOCK_KV keys
        m_i = tl.max(tl.full([BLOCK_KV], float("-inf"), tl.float32), 0)
        l_i = tl.sum(tl.zeros([BLOCK_KV], tl.float32), 0)
        acc = tl.zeros([DHP], tl.float32)
        n_keys = tl.minimum(i + 1, NSLOT).to(tl.int32)
        for n0 in range(0, n_keys, BLOCK_KV):
            n = n0 + tl.arange(0, BLOCK_KV)
            ok = n < n_keys
            m = ok[:, None] & d_ok[None, :]
            kk = tl.load(kb + n[:, None].to(tl.int64) * skn + d[None, :], mask=m, other=0.0).to(tl.float32)
            s = tl.where(ok, tl.sum(kk * q[None, :], 1) * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            vv = tl.load(vb + n[:, None].to(tl.int64) * skn + d[None, :], mask=m, other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(_round(p, DT)[:, None] * vv, 0)
            m_i = m_new
        y = acc / l_i
    tl.store(Y + b * syb + h * HD + d, _cast(y, DT), mask=d_ok)


# Channel pairs per K1 program, keys per dense-attention block, output channels per program of K3 (proj) / K4
# (SwiGLU hidden) / K5, the K loop step of K3 and K5, warps. Rows per program: 16 (the tl.dot minimum) up to 32.
# Tuned on an H200 at batch 1 (small model, bf16; eleventh session, docs/results/decode-levers-s11/): of 17 points
# this one cut the latent graph 0.294 -> 0.218 ms with the same bytes (was 16 / 16 / 16 / 16, K step 128).
_CONFIG = {"qkv_block_j": 32, "attn_block_kv": 64, "proj_block_n": 32, "up_block_n": 32, "down_block_n": 32,
           "down_block_k": 512, "max_block_b": 32, "num_warps": 4, "attn_num_warps": 2}

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def set_latent_step_config(**kw) -> dict:
    """Set any of _CONFIG's keys; returns the previous configuration."""
    return update_config(_CONFIG, "latent-step", kw, int)


def latent_step_launch(z, lk, lv, layer: int, i, cos, sin, offsets, norm1_w, qkv_w, proj_w, norm2_w, ffn_in_w,
                       ffn_out_w, eps1: float, eps2: float, dilated: bool, pdl_safe: bool = True) -> torch.Tensor:
    """The five launches. z (B, D) with unit inner stride; lk, lv (L, B, H, N, Dh) contiguous, layer `layer`'s
    slot i written in place; i (B,) int64; cos, sin (N, Dh / 2) fp32 contiguous RoPE tables of positions 0..N-1;
    offsets (K,) int64 (dilated);
    weights contiguous, in z's dtype. Returns the block output (B, D). pdl_safe: as lnn_step_launch's."""
    B, D = z.shape
    H, N, Dh = lk.shape[2], lk.shape[3], lk.shape[4]
    HID = ffn_out_w.shape[1]
    dev, dt = z.device, z.dtype
    kc, vc = lk[layer], lv[layer]
    q = torch.empty((B, D), device=dev, dtype=dt)
    y = torch.empty((B, D), device=dev, dtype=dt)
    z1 = torch.empty((B, D), device=dev, dtype=dt)
    u = torch.empty((B, HID), device=dev, dtype=dt)
    out = torch.empty((B, D), device=dev, dtype=dt)
    bb = min(_CONFIG["max_block_b"], _pow2(B))
    nb = triton.cdiv(B, bb)
    DP = _pow2(D)
    ieee = dt == torch.float32 or dev.type != "cuda"
    nw = _CONFIG["num_warps"]
    pdl = pdl_kwargs(dev) if pdl_safe else {"GDC": False}
    bj = _CONFIG["qkv_block_j"]
    _latent_qkv_rope[(triton.cdiv(3 * D // 2, bj), nb)](
        z, norm1_w, qkv_w, cos, sin, i, q, kc, vc, B, D, N, eps1, z.stride(0), qkv_w.stride(0), cos.stride(0),
        q.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
        HD=Dh, DP=DP, BLOCK_J=bj, BLOCK_B=bb, IEEE=ieee, num_warps=nw, **pdl)
    K = offsets.shape[0]
    _latent_attn[(H, B)](
        q, kc, vc, i, offsets, y, K, N, 1.0 / math.sqrt(Dh), q.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
        y.stride(0), HD=Dh, DHP=triton.next_power_of_2(Dh), KP=triton.next_power_of_2(max(K, 1)),
        BLOCK_KV=_CONFIG["attn_block_kv"], DILATED=dilated, num_warps=_CONFIG["attn_num_warps"], **pdl)
    bk = _CONFIG["down_block_k"]
    bn = _CONFIG["proj_block_n"]
    _lnn_ffn_down[(triton.cdiv(D, bn), nb)](
        z, y, proj_w, z1, B, D, D, z.stride(0), y.stride(0), proj_w.stride(0), z1.stride(0),
        BLOCK_K=max(16, min(bk, triton.next_power_of_2(D))), BLOCK_N=bn, BLOCK_B=bb, IEEE=ieee, num_warps=nw, **pdl)
    bn = _CONFIG["up_block_n"]
    _lnn_ffn_up[(triton.cdiv(HID, bn), nb)](
        z1, norm2_w, ffn_in_w, u, B, D, HID, eps2, z1.stride(0), ffn_in_w.stride(0), u.stride(0),
        DP=DP, BLOCK_N=bn, BLOCK_B=bb, IEEE=ieee, num_warps=nw, **pdl)
    bn = _CONFIG["down_block_n"]
    _lnn_ffn_down[(triton.cdiv(D, bn), nb)](
        z1, u, ffn_out_w, out, B, D, HID, z1.stride(0), u.stride(0), ffn_out_w.stride(0), out.stride(0),
        BLOCK_K=max(16, min(bk, triton.next_power_of_2(HID))), BLOCK_N=bn, BLOCK_B=bb, IEEE=ieee, num_warps=nw, **pdl)
    return out


# One opaque node for torch.compile; mutates_args keeps the caches in place (functionalised and re-inplaced by
# the compiler), so a captured CUDA graph replays into the decoder's own cache tensors. The whole (L, ...) caches
# are passed with the layer index: the op never receives a view of them.
@torch.library.custom_op("ionllama::latent_block_step", mutates_args=("lk", "lv"))
def latent_block_step_op(z: torch.Tensor, lk: torch.Tensor, lv: torch.Tensor, layer: int, i: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, offsets: torch.Tensor, norm1_w: torch.Tensor,
                         qkv_w: torch.Tensor, proj_w: torch.Tensor, norm2_w: torch.Tensor, ffn_in_w: torch.Tensor,
                         ffn_out_w: torch.Tensor, eps1: float, eps2: float, dilated: bool) -> torch.Tensor:
    z = z if z.stride(-1) == 1 else z.contiguous()
    weights = (norm1_w, qkv_w, proj_w, norm2_w, ffn_in_w, ffn_out_w)
    pdl_safe = all(w.is_contiguous() for w in weights)  # no weight copied by a kernel of this step (pdl.py)
    return latent_step_launch(z, lk, lv, layer, i.contiguous(), cos.contiguous(), sin.contiguous(),
                              offsets.contiguous(), *(w.contiguous() for w in weights), eps1, eps2, dilated,
                              pdl_safe=pdl_safe)


@latent_block_step_op.register_fake
def _(z, lk, lv, layer, i, cos, sin, offsets, norm1_w, qkv_w, proj_w, norm2_w, ffn_in_w, ffn_out_w, eps1, eps2,
      dilated):
    return z.new_empty(z.shape)


def check_latent_state(blocks, dtype: torch.dtype, lk: torch.Tensor, lv: torch.Tensor) -> None:
    """ValueError unless the kernels can step the latent TransformerBlocks `blocks` in `dtype` with these caches
    (what they assume about shapes, strides and dtypes); checked once per decoder, not per step."""
    problems = []
    if dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {dtype} (supported: fp32, bf16, fp16)")
    if any(p.dtype != dtype for blk in blocks for p in blk.parameters()):
        problems.append(f"weights not all in {dtype}")
    if len(blocks):
        attn = blocks[0].attn
        H, Dh = attn.n_heads, attn.head_dim
        if Dh % 2:
            problems.append(f"head_dim {Dh} is odd (RoPE pairs)")
        shape = (len(blocks), lk.shape[1], H, lk.shape[3], Dh)
        for name, c in (("k", lk), ("v", lv)):
            if c.dim() != 5 or tuple(c.shape) != shape or c.dtype != dtype or not c.is_contiguous():
                problems.append(f"{name} cache {tuple(c.shape)} {c.dtype} is not a contiguous {shape} {dtype} tensor")
    if problems:
        raise ValueError("fused latent step: " + "; ".join(problems))


def latent_block_step(blk, z: torch.Tensor, lk: torch.Tensor, lv: torch.Tensor, layer: int, i: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, offsets: torch.Tensor, dilated: bool) -> torch.Tensor:
    """One decode step of latent TransformerBlock `blk` (index `layer`) in five kernels: z (B, D) for the patch
    at position i (B,) int64 -> the block output (B, D); its k, v go into lk[layer], lv[layer] (L, B, H, N, Dh)
    at slot i in place. cos, sin: (N, Dh / 2) fp32 (rope_cos_sin of positions 0..N-1; row i is used);
    offsets (K,) int64: the dilated key
    offsets (dilated=True), unused for dense attention (keys 0..i). CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1."""
    attn, ffn = blk.attn, blk.ffn
    return latent_block_step_op(z, lk, lv, layer, i, cos, sin, offsets, blk.norm1.weight, attn.qkv.weight,
                                attn.proj.weight, blk.norm2.weight, ffn.w_in.weight, ffn.w_out.weight,
                                float(blk.norm1.eps), float(blk.norm2.eps), bool(dilated))
