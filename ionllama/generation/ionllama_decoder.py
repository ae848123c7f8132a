"""Incremental decoder for the ionLlama model (ionllama/model/ionllama_model.py).

Per sequence it keeps everything the next byte needs, so a byte costs O(1) in the context length
(the latent step is O(log #patches) with dilated attention, O(#patches) with the dense ablation):

* n-gram embedding: the last max(n)-1 bytes (hash) or a conv buffer (conv);
* entropy model: per Mamba block its conv buffer and SSM state; the last two entropies;
* patcher: the next byte's start decision, the last rule start (for the max-size cap), last byte;
* encoder / decoder local layers: IntegralLNN conv buffer + state, or a window KV ring buffer;
* the open patch's pooling accumulator (running max, weighted sum, weight sum);
* latent transformer: a KV cache over completed patches and the current latent context vector.

A byte step is split in two so that both parts have static shapes (CUDA graphs):
``advance_latent()`` - when the next byte starts a patch, pool the finished patch and run one
latent step (dilated: gather only the cached keys at offsets {0..w-1} U {2^k}); rows that do not
start a patch compute it too but keep their state (masked commit), and
``byte_step(x)`` - entropy, embedding, encoder, accumulator, decoder, head, next start decision.
With latent_shift "completed" the byte's own decoder must see the patch it closes, so the latent step
sits inside the byte: ``byte_step_entropy`` (entropy, next start flag = "this byte closes its patch"),
``byte_step_encode`` (embedding, encoder, accumulator), ``advance_latent`` when the flag is set,
``byte_step_decode`` (decoder, head); ``step`` does this. With "lagged" the open patch's bytes see the
latent of the patch before the last completed one: a latent step's output waits in ``ctx_next`` until the
next patch opens (the step order is "previous"'s).
Prefill runs the model's parallel forward over the prompt (rows grouped by length) and reads the
final states from it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.byte_embedding import _PAD, HASHED, LastNgramHasher
from ..model.common import apply_rope, rope_cos_sin, upcast, upcast_dtype
from ..model.dilated_attention import dilated_offsets
from ..model.entropy_model import LN2, entropy_bits
from ..model.patcher import _is_word_byte, cap_patches, patch_ids, rule_starts
from .decoding import IncrementalDecoder, grown, register_decoder
from .local_state import MambaState, fused_entropy_fn, fused_latent_fn, local_state
from .slots import SlotWriter


def hashed_embed_step(emb, hasher, slots: SlotWriter, ring: torch.Tensor, x: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
    """The byte embedding of x (B,) at positions t with hashed n-grams, one byte: the bucket ids of the n-grams
    ending at x from the ring of the bytes before it (byte p in slot p % K), then x written into the ring.
    Equals emb's parallel forward at those positions (the PyTorch reference of kernels/embed_step_triton.py)."""
    e = emb.bytes(x)
    ids = hasher.ring(ring, x, t)
    skip = hasher.ring_has_digit(ring, x, t) if emb.ngram == "hash_nodigit" else None
    for i, table in enumerate(emb.tables):
        v = table(ids[:, i])
        e = e + (v if skip is None else v.masked_fill(skip[:, i, None], 0.0))
    e = e * (1.0 / (1 + len(emb.ngram_sizes)))
    slots.write_rows(ring, t % ring.shape[1], x)  # replaces byte t - K
    return e


def _kernel_if_on(on: bool, check, step, refusal: str | None = None):
    """step where a switchable kernel is on and can run this model, else None. On by default, a kernel that cannot
    run a model (check() raises ValueError: e.g. more n-gram sizes than it takes) leaves it to the PyTorch step, as
    fused_local_step="auto" does; where it was required (refusal given), that is a one-line UserError."""
    if not on:
        return None
    try:
        check()
    except ValueError as e:
        if refusal is not None:
            from ..errors import UserError
            raise UserError(f"{e}; {refusal}") from None
        return None
    return step


def _entropy_bits_step(logits: torch.Tensor) -> torch.Tensor:
    """entropy_bits as H = log s - sum(e z) / s with z = l - max, e = exp(z), s = sum(e): the same value
    up to rounding, with two reductions (log_softmax then a sum took four kernels compiled)."""
    z = upcast(logits)
    z = z - z.amax(-1, keepdim=True)
    e = z.exp()
    s = e.sum(-1)
    return (s.log() - (e * z).sum(-1) / s) / LN2


@register_decoder("ionllama")
class IonLlamaDecoder(IncrementalDecoder):
    supports_fused_local_step = True
    supports_fused_entropy_step = True
    supports_fused_latent_step = True

    def __init__(self, model, batch_size, max_len, fused_local_step: bool = False, fused_entropy_step: bool = False,
                 fused_latent_step: bool = False):
        """fused_local_step: IntegralLNN encoder / decoder layers step through the fused Triton kernels
        (local_state.IntegralState; a UserError where they cannot run). fused_entropy_step: the entropy
        model's Mamba blocks and head step through the fused Triton kernels of kernels/ssm_step_triton.py
        (local_state.MambaState; a UserError where they cannot run or there is no entropy model).
        fused_latent_step: advance_latent steps each latent block through the fused Triton kernels of
        kernels/latent_step_triton.py (a UserError where they cannot run; decoder_for picks it on CUDA by default)."""
        super().__init__(model, batch_size, max_len)
        cfg, B, dev, dt = model.config, batch_size, self.device, self.dtype
        self.cfg = cfg
        # latent_shift "completed": commit a patch after its last byte's pooling, before that byte's decoder
        self.completed = cfg.latent_shift == "completed"
        self.threshold = float(model.entropy_threshold)
        f32 = upcast_dtype(dt)  # fp32 state, float64 for a float64 model
        # position / patcher state
        self.t = torch.zeros(B, dtype=torch.long, device=dev)
        self.prompt_starts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, (G, T) bool) per prefill group
        self.next_start = torch.zeros(B, dtype=torch.bool, device=dev)
        self.cur_start = torch.zeros(B, dtype=torch.bool, device=dev)  # the fed byte's flag (byte_step_rest)
        self.last_rule = torch.zeros(B, dtype=torch.long, device=dev)
        self.last_x = torch.zeros(B, dtype=torch.long, device=dev)
        self.ent1 = torch.zeros(B, dtype=f32, device=dev)  # entropy at t-1 (about byte t)
        self.ent2 = torch.zeros(B, dtype=f32, device=dev)  # entropy at t-2
        # embedding
        emb = model.embed
        # at least one ring slot: with ngram_sizes (1,) a context of 0 read as "no tables" and the step left them out
        self.ngram_ctx = max(max(emb.ngram_sizes) - 1, 1) if emb.ngram in HASHED else 0
        self.ngram_buf = torch.full((B, self.ngram_ctx), _PAD, dtype=torch.long, device=dev)
        if self.ngram_ctx:
            self.hasher = LastNgramHasher(emb.ngram_sizes, emb.buckets, self.ngram_ctx + 1, dev)
        self.emb_conv = (torch.zeros(B, emb.conv.kernel - 1, emb.bytes.embedding_dim, device=dev, dtype=dt)
                         if emb.ngram == "conv" else None)
        # entropy model
        self.use_entropy = cfg.patching == "entropy"
        em = model.entropy_model
        if fused_entropy_step and not self.use_entropy:
            from ..errors import UserError
            raise UserError(f"fused_entropy_step is for entropy patching (the entropy model), not patching="
                            f"'{cfg.patching}'; leave it off")
        self.fused_entropy_step = bool(fused_entropy_step)
        # per block: the SSM state and the conv buffer as a ring (local_state.RingConv; None for a conv kernel of 1)
        self.ent_states = ([MambaState(blk, B, dev, dt, fused=self.fused_entropy_step) for blk in em.blocks]
                           if self.use_entropy else [])
        self.ent_cache = [st.cache for st in self.ent_states]
        self.ent_rings = [st.ring for st in self.ent_states]
        self.ent_head = fused_entropy_fn(dev, dt)[1] if self.fused_entropy_step else None
        self.refresh_weights()
        # local layers
        if fused_local_step and cfg.local_layers != "integral":
            from ..errors import UserError
            raise UserError(f"fused_local_step is for IntegralLNN local layers, not local_layers="
                            f"'{cfg.local_layers}'; leave it off")
        self.fused_local_step = bool(fused_local_step)  # what decoder_for resolved "auto" to
        self.enc = [local_state(layer, B, dev, dt, fused_local_step) for layer in model.encoder]
        self.dec = [local_state(layer, B, dev, dt, fused_local_step) for layer in model.decoder]
        # with the fused local step, the decoder's head and the hashed n-gram embedding as one kernel each (both on
        # by default; measured faster on an H100: docs/results/checks-s58.md, checks-s59.md)
        self.head_step = self.embed_step = None
        if self.fused_local_step:
            from ..kernels import lnn_step_triton as ls
            # head_block_n > 0: where the model allows it (no required setting)
            self.head_step = _kernel_if_on(ls.head_on(), lambda: ls.check_byte_head(model.norm, model.head, dt),
                                           ls.byte_head_step)
        if self.fused_local_step and self.ngram_ctx:
            from ..kernels import embed_step_triton as es
            self.embed_step = _kernel_if_on(
                es.embed_on(), lambda: es.check_embed_step(model.embed, self.ngram_buf, dt), es.embed_step,
                "set_embed_step_config(enabled=1) takes it only where the model allows, 0 never"
                if es.embed_required() else None)
        # open patch accumulator (fp32, like the parallel pooling)
        dl = cfg.d_local
        self.acc_num = torch.zeros(B, dl, dtype=f32, device=dev)
        self.acc_den = torch.zeros(B, dtype=f32, device=dev)
        self.acc_max = torch.full((B,), float("-inf"), dtype=f32, device=dev)
        self.e_cur = torch.zeros(B, dl, device=dev, dtype=dt)  # encoder output between encode and decode
        # latent
        lat = model.latent
        attn0 = lat.blocks[0].attn
        self.H, self.Dh, self.rope_base = attn0.n_heads, attn0.head_dim, attn0.rope_base
        shape = (len(lat.blocks), B, self.H, max_len, self.Dh)
        self.lk = torch.zeros(shape, device=dev, dtype=dt)
        self.lv = torch.zeros(shape, device=dev, dtype=dt)
        self.n_complete = torch.zeros(B, dtype=torch.long, device=dev)  # completed patches = cached keys
        self.ctx = torch.zeros(B, dl, device=dev, dtype=dt)  # latent output shown to the open patch
        # "lagged": the last completed patch's latent output, shown from the patch after the open one on
        self.lagged = cfg.latent_shift == "lagged"
        # "lagged" and "previous" (a runner's overlapped latent step): latent_stage's copies of the pooled patch and
        # of the flags, read by latent_compute, which writes ctx_next; latent_show moves it to ctx
        staged = not self.completed
        self.ctx_next = torch.zeros(B, dl, device=dev, dtype=dt) if staged else None
        self.pooled_buf = torch.zeros(B, dl, device=dev, dtype=dt) if staged else None
        self.mask_buf = torch.zeros(B, dtype=torch.bool, device=dev) if staged else None
        self.dilated = lat.attention == "dilated"
        self.slots = SlotWriter(B, self.H, dev, len(lat.blocks))
        self.fused_latent = fused_latent_fn(torch.device(dev), dt) if fused_latent_step else None
        self.fused_latent_step = self.fused_latent is not None
        self._patch_tables(max_len)

    def _patch_tables(self, max_patches: int) -> None:
        """What the latent step reads that depends on the cache length (max_len patches: the worst case, every
        byte starts a patch): dilated offsets, key positions, the fused step's RoPE table."""
        dev = self.device
        self.max_patches = max_patches
        self.offsets = torch.tensor(dilated_offsets(max_patches, self.model.latent.local_width), dtype=torch.long,
                                    device=dev)
        self.key_index = torch.arange(max_patches, device=dev)
        if self.fused_latent is not None:
            from ..kernels.latent_step_triton import check_latent_state
            check_latent_state(self.model.latent.blocks, self.dtype, self.lk, self.lv)
            # RoPE of every slot, once (the fused step reads row i; per step, compiled, they were recomputed
            # for each layer): rope_cos_sin's values, elementwise the same computation as the per-step call
            self.rope_cos, self.rope_sin = rope_cos_sin(self.key_index, self.Dh, self.rope_base)

    def _grow(self, max_len: int) -> bool:
        self.lk, self.lv = grown(self.lk, 3, max_len), grown(self.lv, 3, max_len)
        self._patch_tables(max_len)
        return True

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Tables derived from the weights, built once per decoder: call again if the weights change.
        ent_in0: the entropy model's first in_proj(norm(embed(byte))) for all 256 bytes. It depends on
        the byte alone, so a byte step looks it up instead of running a norm and a matmul. (And the fused
        entropy step's A = -exp(A_log), local_state.MambaState.refresh_weights.)"""
        self.ent_in0 = None
        for st in getattr(self, "ent_states", []):
            st.refresh_weights()
        if self.use_entropy and len(self.model.entropy_model.blocks):
            em = self.model.entropy_model
            blk = em.blocks[0]
            self.ent_in0 = blk.mixer.in_proj(blk.norm(em.embed.weight))  # (256, in_proj out)

    # ------------------------------------------------------------------ prefill (parallel forward)
    @torch.no_grad()
    def prefill(self, rows):
        self._check_rows(rows)
        self.prompt_starts = []
        logits = torch.zeros(self.batch_size, 256, device=self.device, dtype=self.dtype)
        by_len: dict[int, list[int]] = {}
        for r, row in enumerate(rows):
            by_len.setdefault(len(row), []).append(r)
        for T, idx in by_len.items():
            x = torch.tensor([rows[r] for r in idx], dtype=torch.long, device=self.device)
            logits[idx] = self._prefill_group(x, torch.tensor(idx, device=self.device))
        return logits

    def _prefill_group(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        G, T = x.shape
        # entropy model with final states
        entropy = None
        if self.use_entropy:
            em = m.entropy_model
            h = em.embed(x)
            for blk, cache, ring in zip(em.blocks, self.ent_cache, self.ent_rings):
                h, st = blk(h, return_state=True)
                if ring is not None:
                    st["conv"] = ring.ring_order(st["conv"], T)
                for k, v in st.items():
                    cache[k][rows] = v.to(cache[k].dtype)
            entropy = entropy_bits(em.head(em.norm(h)))
            self.ent1[rows] = entropy[:, -1]
            self.ent2[rows] = entropy[:, -2] if T >= 2 else 0.0
        # patches, decided one byte past the prompt: the start flag of the next byte
        x_ext = F.pad(x, (0, 1))
        ent_ext = F.pad(entropy, (0, 1)) if entropy is not None else None
        rules = rule_starts(x_ext, ent_ext, cfg.patching, self.threshold, cfg.threshold_mode, cfg.fixed_patch_size)
        starts = cap_patches(rules, cfg.max_patch_size)
        b2p, n_patches = patch_ids(starts[:, :T])
        self.prompt_starts.append((rows, starts[:, :T]))  # for checks against the parallel forward
        self.next_start[rows] = starts[:, T]
        tpos = torch.arange(T + 1, device=x.device)
        self.last_rule[rows] = torch.where(rules, tpos, torch.zeros_like(tpos)).amax(1)
        self.last_x[rows] = x[:, -1]
        self.t[rows] = T
        # embedding (+ its n-gram context) and encoder
        emb = m.embed
        e = emb(x)
        if self.ngram_ctx:
            # a ring: the byte at position p sits in slot p % ngram_ctx (a step writes one slot)
            tail = F.pad(x, (self.ngram_ctx, 0), value=_PAD)[:, -self.ngram_ctx:]
            self.ngram_buf[rows] = tail.roll(T % self.ngram_ctx, 1)
        if self.emb_conv is not None:
            self.emb_conv[rows] = emb.conv.tail(emb.bytes(x))
        for st in self.enc:
            e = st.prefill(e, rows)
        # open patch accumulator (the patch holding the last byte stays open)
        open_mask = b2p == (n_patches - 1)[:, None]
        s = m.pool.byte_weights(e).masked_fill(~open_mask, float("-inf"))
        smax = s.amax(1)
        w = torch.exp(s - smax[:, None])
        self.acc_max[rows] = smax
        self.acc_den[rows] = w.sum(1)
        self.acc_num[rows] = (w[..., None] * upcast(e)).sum(1)
        # latent transformer over all patches (causal over patches: the open one affects nothing
        # cached), keeping per-layer keys/values
        P = int(n_patches.max())
        z = m.to_latent(m.pool(e, b2p, P))
        pos = torch.arange(P, device=x.device)
        for li, blk in enumerate(m.latent.blocks):
            q, k, v = blk.attn.project_qkv(blk.norm1(z), pos)
            lk, lv = self.lk[li], self.lv[li]
            lk[rows, :, :P], lv[rows, :, :P] = k, v
            y = blk.attn.attn_fn(q, k, v)
            z = z + blk.attn.proj(y.transpose(1, 2).reshape(G, P, -1))
            z = z + blk.ffn(blk.norm2(z))
        z = m.from_latent(m.latent.norm(z))
        start_vec = m.latent_start.to(z.dtype).expand(G, 1, -1)
        z_ext = torch.cat([start_vec, z], dim=1)  # (G, P + 1, dl): latent after j completed patches
        # the context of byte t: patch b2p[t] - 1's output (z_ext[b2p]); with "completed" a byte that
        # closes its patch (starts[t + 1], the last one decided one byte past the prompt) gets its own
        idx, n_done = b2p, n_patches - 1
        if self.completed:
            idx, n_done = b2p + starts[:, 1:].long(), n_done + starts[:, T].long()
        shown = n_done
        if self.lagged:  # the open patch sees z_ext[n_done - 1]; z_ext[n_done] waits for the next patch
            idx, shown = (b2p - 1).clamp_min(0), (n_done - 1).clamp_min(0)
            self.ctx_next[rows] = z_ext.gather(1, n_done.view(G, 1, 1).expand(G, 1, z.shape[-1]))[:, 0]
        self.ctx[rows] = z_ext.gather(1, shown.view(G, 1, 1).expand(G, 1, z.shape[-1]))[:, 0]
        self.n_complete[rows] = n_done
        # decoder
        h = e + torch.gather(z_ext, 1, idx[..., None].expand(G, T, z_ext.shape[-1]))
        for st in self.dec:
            h = st.prefill(h, rows)
        return m.head(m.norm(h[:, -1]))

    # ------------------------------------------------------------------ incremental steps
    @torch.no_grad()
    def step(self, tokens):
        # host decision: skip the latent when no row opens a patch
        if not self.completed:
            if bool(self.next_start.any()):
                self.advance_latent()
            return self.byte_step(tokens)
        # "completed": the patch this byte closes is committed after its pooling, before its decoder
        self.byte_step_entropy(tokens)
        self.byte_step_encode(tokens)
        if bool(self.next_start.any()):
            self.advance_latent()
        return self.byte_step_decode(tokens)

    def advance_latent(self, mask: torch.Tensor | None = None) -> None:
        """Close the open patch of rows whose next byte starts a patch; one latent step for them.
        mask (B,) bool overrides which rows commit (default: next_start; all-False is a no-op).
        "previous": called before the byte that opens the next patch; "completed": after the pooling of
        the byte that closes the patch (byte_step_encode), before its decoder; "lagged": as "previous", in
        two parts (latent_commit, latent_compute) that a runner may run on two streams."""
        if mask is None:
            mask = self.next_start
        if self.lagged:
            self.latent_commit(mask)
            self.latent_compute()
            return
        c = self._latent_output(self._pooled(), mask)
        self.ctx.copy_(torch.where(mask[:, None], c, self.ctx))

    # "lagged" in two parts. latent_commit reads what the next byte overwrites (the pooling accumulator, the
    # patch flags) and shows the open patch's successor the pending output; latent_compute reads only its own
    # copies, so it may run while the next patch's bytes decode. It must finish before the next latent_commit
    # (which shows its output) and before the next latent_compute (same cache, same stream in the runner).
    def latent_commit(self, mask: torch.Tensor | None = None) -> None:
        self.latent_stage(mask)
        self.latent_show()

    def latent_compute(self) -> None:
        c = self._latent_output(self.pooled_buf, self.mask_buf)
        self.ctx_next.copy_(torch.where(self.mask_buf[:, None], c, self.ctx_next))

    # "previous" in three parts, for a runner that overlaps the latent step with the bytes around it: latent_stage
    # after the encoder and pooling of the byte that closes a patch (it copies what the next byte overwrites),
    # latent_compute on another stream while that byte's decoder and the next byte's encoder run, latent_show before
    # the next byte's decoder (the first byte of the next patch: the one that must see the new output). The three
    # give what advance_latent before that byte gives.
    def latent_stage(self, mask: torch.Tensor | None = None) -> None:
        self.pooled_buf.copy_(self._pooled())
        self.mask_buf.copy_(self.next_start if mask is None else mask)

    def latent_show(self) -> None:
        self.ctx.copy_(torch.where(self.mask_buf[:, None], self.ctx_next, self.ctx))

    def _pooled(self) -> torch.Tensor:
        return (self.acc_num / self.acc_den.clamp_min(1e-30)[:, None]).to(self.dtype)

    def _latent_output(self, pooled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One latent step over the pooled patch vectors (B, dl): writes the KV slot n_complete of every row
        (rows outside mask write a slot that is not valid yet), counts the patch for rows in mask, returns the
        latent output (B, dl)."""
        m, B, H, Dh = self.model, self.batch_size, self.H, self.Dh
        z = m.to_latent(pooled)[:, None]  # (B, 1, dm)
        i = self.n_complete  # this patch's index
        if self.fused_latent is not None:  # five Triton kernels per block (kernels/latent_step_triton.py)
            zf = z[:, 0]
            for li, blk in enumerate(m.latent.blocks):
                zf = self.fused_latent(blk, zf, self.lk, self.lv, li, i, self.rope_cos, self.rope_sin, self.offsets,
                                       self.dilated)
            c = m.from_latent(m.latent.norm(zf))
            self.n_complete += mask.long()
            return c
        cos, sin = rope_cos_sin(i[:, None], Dh, self.rope_base)
        if self.dilated:
            key_idx = i[:, None] - self.offsets[None, :]  # (B, K)
            visible = (key_idx >= 0).view(B, 1, 1, -1)
            gather_idx = key_idx.clamp_min(0).view(B, 1, -1, 1).expand(B, H, -1, Dh)
        else:
            visible = (self.key_index[None, :] <= i[:, None]).view(B, 1, 1, -1)
        for li, blk in enumerate(m.latent.blocks):
            qkv = blk.attn.qkv(blk.norm1(z)).view(B, 1, 3, H, Dh).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(qkv[:2], cos, sin)  # q and k in one call: half the rope ops
            v = qkv[2]
            self.slots.write(self.lk, i, k[:, :, 0], layer=li)
            self.slots.write(self.lv, i, v[:, :, 0], layer=li)
            if self.dilated:
                keys, vals = self.lk[li].gather(2, gather_idx), self.lv[li].gather(2, gather_idx)
            else:
                keys, vals = self.lk[li], self.lv[li]
            y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=visible)
            z = z + blk.attn.proj(y.transpose(1, 2).reshape(B, 1, -1))
            z = z + blk.ffn(blk.norm2(z))
        c = m.from_latent(m.latent.norm(z))[:, 0]
        self.n_complete += mask.long()
        return c

    def byte_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """A whole byte step without the latent stage ("previous" only: "completed" needs the latent
        between byte_step_encode and byte_step_decode)."""
        self.byte_step_entropy(tokens)
        return self.byte_step_rest(tokens)

    def byte_step_entropy(self, tokens: torch.Tensor) -> None:
        """First part of a byte step: the entropy model on the fed byte and, from it, the next byte's patch
        flag (next_start). Split off so a runner can read that flag while byte_step_rest runs."""
        self.begin_byte()
        self.next_patch_flag(tokens)

    # The byte step as two independent branches (a runner may run them on two CUDA streams): begin_byte;
    # then next_patch_flag (entropy model, rule: reads t, writes the entropy state, ent1/ent2, last_rule,
    # next_start) beside byte_step_local (embedding, encoder, pooling, decoder, head: reads t and cur_start,
    # writes their own state); then end_byte. The two branches share no tensor that either writes.
    def begin_byte(self) -> None:
        """The fed byte opens a patch if the last byte decided so."""
        self.cur_start.copy_(self.next_start)

    def byte_step_local(self, tokens: torch.Tensor) -> torch.Tensor:
        """byte_step_rest without advancing the position (end_byte does, once both branches are done)."""
        return self._decode(tokens, self._encode(tokens), advance=False)

    def end_byte(self) -> None:
        self.t += 1

    def next_patch_flag(self, tokens: torch.Tensor) -> None:
        """The entropy model on the fed byte (about the byte after it) and the next byte's patch flag."""
        m, cfg = self.model, self.cfg
        x = tokens.long()
        t = self.t
        # entropy model (about the byte after x)
        if self.use_entropy:
            em = m.entropy_model
            h = None
            for i, st in enumerate(self.ent_states):
                # MambaBlock.step; the first in_proj(norm(embed(x))) depends on x alone: a table row
                if i == 0 and self.ent_in0 is not None:
                    h = st.step_tokens(x, em.embed, self.ent_in0, t)
                else:
                    h = st.step(em.embed(x) if h is None else h, t)
            if h is None:  # no blocks
                h = em.embed(x)
            if self.ent_head is not None:
                ent = self.ent_head(em.norm, em.head, h)
            else:
                ent = _entropy_bits_step(em.head(em.norm(h)))
            self.ent2.copy_(self.ent1)
            self.ent1.copy_(ent)
        # the next byte's patch start (depends only on bytes <= x)
        tn = t + 1
        if cfg.patching == "entropy":
            if cfg.threshold_mode == "monotonic":
                rule = torch.where(tn >= 2, self.ent1 - self.ent2, torch.zeros_like(self.ent1)) > self.threshold
            else:
                rule = self.ent1 > self.threshold
        elif cfg.patching == "fixed":
            rule = tn % cfg.fixed_patch_size == 0
        elif cfg.patching == "space":
            rule = ~_is_word_byte(x)
        else:  # byte
            rule = torch.ones_like(self.cur_start)
        self.last_rule.copy_(torch.where(rule, tn, self.last_rule))
        self.next_start.copy_(rule | ((tn - self.last_rule) % cfg.max_patch_size == 0))

    def byte_step_rest(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rest of a byte step (after byte_step_entropy on the same byte): embedding, encoder, pooling,
        decoder, head. Returns the next byte's logits."""
        return self._decode(tokens, self._encode(tokens))

    def byte_step_encode(self, tokens: torch.Tensor) -> None:
        """"completed", part 2 (after byte_step_entropy): embedding, encoder, pooling accumulator."""
        self.e_cur.copy_(self._encode(tokens))

    def byte_step_decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """"completed", part 3 (after the latent stage if this byte closed a patch): decoder, head."""
        return self._decode(tokens, self.e_cur)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = tokens.long()
        t, start = self.t, self.cur_start
        # embedding
        emb = m.embed
        if self.embed_step is not None:
            e = self.embed_step(emb, self.hasher, self.ngram_buf, x, t)
        elif self.ngram_ctx:
            e = hashed_embed_step(emb, self.hasher, self.slots, self.ngram_buf, x, t)
        else:
            e = emb.bytes(x)
            if self.emb_conv is not None:
                y, buf = emb.conv.step(e, self.emb_conv)
                e = e + y
                self.emb_conv.copy_(buf)
        for st in self.enc:
            e = st.step(e, t)
        # pooling accumulator: a new patch restarts it with this byte
        s = m.pool.byte_weights(e[:, None])[:, 0]
        mx = torch.where(start, torch.full_like(self.acc_max, float("-inf")), self.acc_max)
        num = torch.where(start[:, None], torch.zeros_like(self.acc_num), self.acc_num)
        den = torch.where(start, torch.zeros_like(self.acc_den), self.acc_den)
        new_max = torch.maximum(mx, s)
        a, b = torch.exp(mx - new_max), torch.exp(s - new_max)
        self.acc_num.copy_(num * a[:, None] + b[:, None] * upcast(e))
        self.acc_den.copy_(den * a + b)
        self.acc_max.copy_(new_max)
        return e

    def _decode(self, tokens: torch.Tensor, e: torch.Tensor, advance: bool = True) -> torch.Tensor:
        m, t = self.model, self.t
        x = tokens.long()
        h = e + self.ctx
        for st in self.dec:
            h = st.step(h, t)
        logits = self.head_step(m.norm, m.head, h) if self.head_step is not None else m.head(m.norm(h))
        self.last_x.copy_(x)
        if advance:
            self.t += 1
        return logits
