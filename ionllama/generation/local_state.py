"""Cached state of one byte-level local layer (encoder / decoder of ionLlama), per sequence.

* IntegralLNN block: causal conv buffer + recurrent state h. The conv buffer is a ring (the input of
  byte p in slot p % (kernel-1)): a step writes one slot instead of shifting the buffer (a temporary
  and a copy, two kernels when compiled); the conv weights are rotated to match instead.
* Transformer block with causal local-window attention: a ring buffer of the last W keys/values
  (slot = position mod W), so a step costs O(W) whatever the context length.
State tensors are allocated once and updated in place (CUDA-graph friendly)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model.common import apply_rope, rope_cos_sin
from .slots import SlotWriter


class RingConv:
    """The step of a CausalDepthwiseConv whose input buffer buf (B, k, C), k = kernel - 1, is a ring:
    the input of byte p sits in slot p % k. A step reads the ring with the weights rotated to match and
    then writes one slot, in place (a shifted buffer costs a temporary and a copy: two kernels compiled)."""

    def __init__(self, conv, buf: torch.Tensor):
        self.conv, self.buf, self.k = conv, buf, buf.shape[1]
        self.slot_ids = torch.arange(self.k, device=buf.device)
        self.slots = SlotWriter(buf.shape[0], 1, buf.device)

    def ring_order(self, tail: torch.Tensor, T: int) -> torch.Tensor:
        """conv.tail(x) of T inputs (time order) -> ring order: input p (T - k .. T - 1) to slot p % k."""
        return tail.roll(T % self.k, 1)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (B, C) the input at positions t (B,) -> conv output (B, C); then call write(x_t, t)."""
        w = self.conv.weight[:, 0].t().to(x_t.dtype)  # (k + 1, C): w[j] multiplies input t - k + j
        j = (self.slot_ids[None, :] - t[:, None]) % self.k  # (B, k): the weight row of each slot's input
        return (self.buf * w[j]).sum(1) + x_t * w[-1] + self.conv.bias.to(x_t.dtype)

    def write(self, x_t: torch.Tensor, t: torch.Tensor) -> None:
        """After the step's reads: x_t replaces input t - k. (Issued after the step's other state
        updates, compiled it fuses better: 6 kernels fewer for ionLlama-small's byte step on CPU.)"""
        self.slots.write_rows(self.buf, t % self.k, x_t)


class IntegralState:
    """fused=True: step() runs the block as the four Triton kernels of ionllama/kernels/lnn_step_triton.py
    (CUDA, or CPU under TRITON_INTERPRET=1; anything else is refused with a UserError, no silent fallback);
    the default is the PyTorch path below, which is also the kernels' reference."""

    def __init__(self, layer, batch, device, dtype, fused: bool = False):
        self.layer = layer
        self.cache = layer.empty_cache(batch, device, dtype)
        self.ring = RingConv(layer.conv, self.cache["conv"]) if self.cache["conv"].shape[1] else None
        with torch.no_grad():  # the per-channel decay is a constant while decoding: computed once
            self.decay = torch.exp(layer.log_decay()).to(self.cache["h"].dtype)
        self.fused_step = None
        if fused:
            self.fused_step = fused_step_fn(torch.device(device), dtype)
            from ..kernels.lnn_step_triton import check_block_state
            check_block_state(layer, dtype, self.cache["h"], self.cache["conv"], self.decay)

    def prefill(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        y, st = self.layer(x, return_state=True)
        if self.ring is not None:
            st["conv"] = self.ring.ring_order(st["conv"], x.shape[1])
        for k, v in st.items():
            self.cache[k][rows] = v.to(self.cache[k].dtype)
        return y

    def step(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """IntegralLNNBlock.step with the ring conv buffer."""
        layer = self.layer
        if self.fused_step is not None:
            return self.fused_step(layer, x_t, self.cache["h"], self.cache["conv"], t, self.decay)
        if self.ring is None:  # conv kernel 1: no buffer
            y, new = layer.step(x_t, self.cache, decay=self.decay)
            self.cache["h"].copy_(new["h"])
            return y
        gc, o = layer.in_proj(layer.norm1(x_t)).split([2 * layer.dim, layer.dim], dim=-1)
        g, c = self.ring(gc, t).chunk(2, dim=-1)
        h = self.decay * self.cache["h"] + (torch.sigmoid(g) * c).to(self.cache["h"].dtype)
        self.cache["h"].copy_(h)
        self.ring.write(gc, t)
        return layer._mix_out(x_t, h, o)


class MambaState:
    """Decode state of one MambaBlock of the entropy model: its conv buffer as a ring (RingConv) and the SSM
    state. step() is MambaBlock.step through Mamba2Mixer.step_from_proj with the ring (the PyTorch path, and
    the reference of the fused kernels); fused=True runs it as the two Triton kernels of
    ionllama/kernels/ssm_step_triton.py (CUDA, or CPU under TRITON_INTERPRET=1; anything else is refused with a
    UserError, no silent fallback)."""

    def __init__(self, block, batch, device, dtype, fused: bool = False):
        self.block = block
        self.cache = block.mixer.empty_cache(batch, device, dtype)
        self.ring = RingConv(block.mixer.conv, self.cache["conv"]) if self.cache["conv"].shape[1] else None
        self.fused_step = None
        if fused:
            self.fused_step = fused_entropy_fn(torch.device(device), dtype)[0]
            self.refresh_weights()
            from ..kernels.ssm_step_triton import check_ssm_block_state
            check_ssm_block_state(block, dtype, self.cache["ssm"], self.cache["conv"], self.neg_a)

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """The fused step's A = -exp(A_log), computed as the PyTorch step does (in the model's dtype), in fp32;
        call again if the weights change."""
        if self.fused_step is not None:
            self.neg_a = (-torch.exp(self.block.mixer.A_log)).float()

    def step(self, x_t: torch.Tensor, t: torch.Tensor, proj: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, d) at positions t (B,) -> x_t + mixer(norm(x_t)). proj: in_proj(norm(x_t)) when the caller
        has it (a table row), else computed."""
        if self.fused_step is not None:
            if proj is not None:
                raise ValueError("the fused step computes in_proj itself; use step_tokens for a table's rows")
            return self.fused_step(self.block, x_t, self.cache["ssm"], self.cache["conv"], t, self.neg_a)
        blk, ring = self.block, self.ring
        if proj is None:
            proj = blk.mixer.in_proj(blk.norm(x_t))
        y, new = blk.mixer.step_from_proj(proj, self.cache, None if ring is None else (lambda u: ring(u, t)))
        h = x_t + y
        for k, v in new.items():
            self.cache[k].copy_(v)
        if ring is not None:
            ring.write(blk.mixer._split(proj)[1], t)  # the conv input xBC
        return h

    def step_tokens(self, tokens: torch.Tensor, embed, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The first block on bytes `tokens` (B,): x_t = embed(tokens), in_proj(norm(x_t)) = table[tokens]."""
        if self.fused_step is not None:
            return self.fused_step(self.block, embed.weight, self.cache["ssm"], self.cache["conv"], t, self.neg_a,
                                   tokens=tokens, table=table)
        return self.step(embed(tokens), t, proj=table[tokens])


class WindowAttentionState:
    """For ``LocalAttentionBlock`` (RoPE at absolute byte positions, keys t-W+1..t)."""

    def __init__(self, layer, batch, device, dtype):
        self.layer = layer
        attn = layer.attn
        self.W, self.H, self.Dh = layer.window, attn.n_heads, attn.head_dim
        self.k = torch.zeros(batch, self.H, self.W, self.Dh, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((batch, self.W), -1, dtype=torch.long, device=device)
        self.slots = SlotWriter(batch, self.H, device)

    def prefill(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        layer, (G, T, _) = self.layer, x.shape
        y = layer(x)
        n = min(T, self.W)
        pos = torch.arange(T - n, T, device=x.device)
        _, k, v = layer.attn.project_qkv(layer.norm1(x[:, T - n:]), pos)
        slots = pos % self.W
        k_all, v_all = self.k[rows], self.v[rows]
        k_all[:, :, slots], v_all[:, :, slots] = k, v
        sp = torch.full((G, self.W), -1, dtype=torch.long, device=x.device)
        sp[:, slots] = pos
        self.k[rows], self.v[rows], self.slot_pos[rows] = k_all, v_all, sp
        return y

    def step(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        layer, attn = self.layer, self.layer.attn
        B, H, Dh = x_t.shape[0], self.H, self.Dh
        qkv = attn.qkv(layer.norm1(x_t)).view(B, 1, 3, H, Dh).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(t[:, None], Dh, attn.rope_base)
        q, k = apply_rope(qkv[:2], cos, sin)  # q and k in one call: half the rope ops
        v = qkv[2]
        slot = t % self.W
        self.slots.write(self.k, slot, k[:, :, 0])
        self.slots.write(self.v, slot, v[:, :, 0])
        self.slots.write_rows(self.slot_pos, slot, t)
        visible = (self.slot_pos >= 0).view(B, 1, 1, self.W)  # every written slot is within the window
        y = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=visible)
        x = x_t + attn.proj(y.reshape(B, H * Dh))
        return x + layer.ffn(layer.norm2(x))


def fused_kernels(flag: str, module: str, names: tuple[str, ...], device: torch.device, dtype: torch.dtype):
    """The fused decode-step ops `names` of ionllama.kernels.<module>, or a one-line UserError naming `flag`
    and why they cannot run here (CUDA, or CPU under TRITON_INTERPRET=1; triton; a supported dtype): no
    silent fallback to the PyTorch step."""
    import importlib

    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"{flag} needs a CUDA device (or TRITON_INTERPRET=1 on CPU); leave {flag} off on CPU")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"{flag} runs on CUDA only, not {device.type}; leave it off")
    try:
        mod = importlib.import_module(f"ionllama.kernels.{module}")
    except ImportError as e:
        raise UserError(f"{flag} needs triton ({e}); install triton or leave {flag} off")
    if dtype not in mod.SUPPORTED_DTYPES:
        raise UserError(f"{flag} supports fp32, bf16 and fp16 models, not {dtype}; leave it off")
    fns = tuple(getattr(mod, n) for n in names)
    return fns[0] if len(fns) == 1 else fns


def fused_step_fn(device: torch.device, dtype: torch.dtype):
    """lnn_step_triton.lnn_block_step, or a UserError saying why the fused step cannot run here."""
    return fused_kernels("fused_local_step", "lnn_step_triton", ("lnn_block_step",), device, dtype)


def fused_entropy_fn(device: torch.device, dtype: torch.dtype):
    """(ssm_step_triton.ssm_block_step, entropy_head_step), or a UserError saying why the fused entropy-model
    step cannot run here."""
    return fused_kernels("fused_entropy_step", "ssm_step_triton", ("ssm_block_step", "entropy_head_step"), device,
                         dtype)


def fused_latent_fn(device: torch.device, dtype: torch.dtype):
    """latent_step_triton.latent_block_step, or a UserError saying why the fused latent step cannot run here."""
    return fused_kernels("fused_latent_step", "latent_step_triton", ("latent_block_step",), device, dtype)


# "auto" uses a fused step where it was measured: on CUDA, for up to 32 rows (the kernels pad to 16-row MMA tiles).
# H200 bf16, batch 1, outputs equal to the PyTorch step: the local step 4,013 -> 5,280 bytes/s (seventh session);
# the latent step 0.383 -> 0.295 ms of GPU time per patch (eighth; docs/results/generation.md); the entropy-model
# step, once its kernels launched with PDL, the byte graph 0.109-0.110 -> 0.102-0.105 ms (eleventh; without PDL it
# had gained nothing). Batch 32, all three together: 11,821 -> 33,077 bytes/s (eighteenth; the kernels pass their
# GPU selfcheck at 17 and 32 rows). Larger batches keep the PyTorch steps until measured. fp32 models keep them too:
# there the fused kernels ran 2.8x slower than the PyTorch steps (H100, `small`, graphs, not compiled: 2,765 against
# 1,001 us a byte, fiftieth session; e.g. `_lnn_ffn_down` 108 us a call against ~5 in bf16).
FUSED_AUTO_MAX_BATCH = 32
FUSED_AUTO_DTYPES = (torch.bfloat16, torch.float16)


def fused_step_auto(device: torch.device, dtype: torch.dtype, batch: int, kernels=None) -> bool:
    """Does "auto" pick a fused Triton step here (CUDA, triton, bf16 or fp16, up to 32 rows)? kernels: the step's
    loader (fused_step_fn, the IntegralLNN step, by default; fused_latent_fn)."""
    if device.type != "cuda" or batch > FUSED_AUTO_MAX_BATCH or dtype not in FUSED_AUTO_DTYPES:
        return False
    try:
        (kernels or fused_step_fn)(device, dtype)
    except UserError:
        return False
    return True


def local_state(layer, batch, device, dtype, fused: bool = False):
    """fused: IntegralLNN blocks step through the fused Triton kernels (IntegralState); attention blocks
    have no fused step and ignore it."""
    if hasattr(layer, "window"):
        return WindowAttentionState(layer, batch, device, dtype)
    return IntegralState(layer, batch, device, dtype, fused=fused)
