"""ionLlama v12: entropy-patched byte LM.

    bytes -> ByteEmbedding (causal n-grams) -> IntegralLNN encoder (per byte)
          -> pool each patch -> latent transformer over patches (dilated or dense attention)
          -> byte t gets the latent output of the last patch that ended before t (+ its encoder
             state) -> IntegralLNN decoder -> 256-way head.
             (latent_shift "completed": the last byte of a patch gets that patch's own latent output;
             "lagged": the bytes of patch p get patch p-2's, so a decoder can compute p-1's meanwhile.)

Patch boundaries come from the frozen entropy model (or fixed/space/byte rules) and depend only on
earlier bytes; the latent vector of patch p reaches only bytes of later patches (and, with "completed",
p's last byte). Hence output t never depends on bytes > t (tests/test_causality.py proves it for every
configuration).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig, check_config
from ..registry import register
from .byte_embedding import ByteEmbedding
from .common import (RMSNorm, checked_input, init_weights, scored_cross_entropy, swiglu_hidden,
                     zero_residual_branches)
from .dense import GenerateMixin, ParamCountMixin, lm_outputs
from .entropy_model import EntropyModel
from .integral_lnn import IntegralLNNBlock, redraw_local_inputs
from .latent_transformer import LatentTransformer
from .local_attention import LocalAttentionBlock
from .patcher import calibrate_threshold, compute_patches, patch_ids
from .pooling import PatchPooling


PATCH_PAD = 16


def make_local_layer(cfg: ModelConfig) -> nn.Module:
    hidden = swiglu_hidden(cfg.d_local, cfg.ffn_mult)
    p = cfg.dropout if cfg.local_dropout is None else cfg.local_dropout
    if cfg.local_layers == "integral":
        return IntegralLNNBlock(cfg.d_local, hidden, cfg.conv_kernel, cfg.scan_chunk, dropout=p)
    if cfg.local_layers == "transformer":
        return LocalAttentionBlock(cfg.d_local, max(1, cfg.d_local // 64), hidden, cfg.local_window, p)
    raise ValueError(f"unknown local_layers {cfg.local_layers!r}")


def static_patch_count(cfg: ModelConfig, T: int) -> int | None:
    """Patches per row of T bytes when the rule does not depend on the bytes (fixed, byte), else None.
    Same count as compute_patches (fixed starts every k bytes, capped at max_patch_size)."""
    if cfg.patching == "byte":
        return T
    if cfg.patching == "fixed":
        k, m = cfg.fixed_patch_size, cfg.max_patch_size
        per_block = -(-k // m)  # a start every m bytes inside each block of k
        full, rest = divmod(T, k)
        return full * per_block + -(-rest // m)
    return None


@register("ionllama")
class IonLlama(ParamCountMixin, GenerateMixin, nn.Module):
    # CUDA-graph replay of the compiled training step fails on the GPU ("tensor(s) in the cudagraph pool
    # not tracked as outputs"), measured for entropy patching (two graphs around the patch-count sync) and
    # for fixed patching (one graph, no sync): the trainer refuses --compile_mode reduce-overhead
    cuda_graph_training_ok = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        # every rule create_model applies, for a config made in Python or read from a checkpoint (a partial set of
        # them here let max_patch_size 0 reach a ZeroDivisionError and fixed 5-byte patches exceed a cap of 2)
        check_config(cfg)
        dl, dm = cfg.d_local, cfg.d_model
        self.embed = ByteEmbedding(dl, cfg.ngram, cfg.ngram_sizes, cfg.ngram_buckets, cfg.conv_kernel)
        self.entropy_model = EntropyModel(cfg.d_entropy, cfg.n_entropy_layers, cfg.entropy_state,
                                          cfg.entropy_headdim, cfg.conv_kernel, cfg.entropy_chunk)
        self.encoder = nn.ModuleList([make_local_layer(cfg) for _ in range(cfg.n_enc_layers)])
        self.pool = PatchPooling(dl, cfg.pooling)
        self.to_latent = nn.Linear(dl, dm, bias=False)
        self.latent = LatentTransformer(dm, cfg.n_layers, cfg.n_heads, cfg.ffn_mult, cfg.attention, cfg.local_width,
                                        cfg.dropout)
        self.from_latent = nn.Linear(dm, dl, bias=False)
        self.latent_start = nn.Parameter(torch.zeros(dl))  # context for bytes of the first patch
        self.decoder = nn.ModuleList([make_local_layer(cfg) for _ in range(cfg.n_dec_layers)])
        self.norm = RMSNorm(dl)
        self.head = nn.Linear(dl, 256, bias=False)
        # entropy threshold (bits); before calibration, in global mode, every byte starts a patch (bytes/patch = 1;
        # monotonic mode at threshold 0 starts one wherever the entropy rises: ~2 bytes/patch)
        self.register_buffer("entropy_threshold", torch.tensor(0.0))
        for part in (self.encoder, self.latent, self.decoder):
            init_weights(part, cfg.n_layers + cfg.n_enc_layers + cfg.n_dec_layers)
        for lin in (self.to_latent, self.from_latent, self.head):
            nn.init.normal_(lin.weight, 0.0, 0.02)
        # last, so a seed gives every other weight as with the default; 1.0 keeps nn.Embedding's own init and
        # the RNG stream of earlier runs
        if cfg.embed_std != 1.0:
            for table in self.embed.modules():
                if isinstance(table, nn.Embedding):
                    nn.init.normal_(table.weight, 0.0, cfg.embed_std)
        if cfg.dec_init == "zero":  # after every draw, so the other weights stay those of the default init
            zero_residual_branches(self.decoder)
        if cfg.local_init == "inputs":  # last: the draws above are those of the default init
            redraw_local_inputs(list(self.encoder) + list(self.decoder))
        self._entropy_frozen = False

    # ----------------------------------------------------------------- training-phase protocol
    @property
    def needs_entropy_phase(self) -> bool:
        return self.config.patching == "entropy"

    def _apply(self, fn, recurse=True):
        """model.to(torch.bfloat16) / .half() cast every float buffer; the calibrated threshold (bits) then rounded
        (7.991 -> 8.0) while the entropies it is compared with are computed in fp32, so the cast moved the patch
        boundaries. The threshold keeps fp32 through any cast; device moves still apply."""
        kept = self.entropy_threshold
        out = super()._apply(fn, recurse)
        moved = self.entropy_threshold
        if moved.dtype != torch.float32:
            self._buffers["entropy_threshold"] = kept.to(device=moved.device, dtype=torch.float32)
        return out

    def freeze_entropy(self, frozen: bool = True) -> None:
        self._entropy_frozen = frozen
        for p in self.entropy_model.parameters():
            p.requires_grad_(not frozen)

    @torch.no_grad()
    def calibrate_threshold(self, x: torch.Tensor) -> dict:
        """Set the entropy threshold so held-out bytes `x` (N, T) average target_patch_size bytes/patch."""
        if self.config.patching != "entropy":  # it returned target_patch_size and set a threshold nothing reads
            from ..errors import UserError
            raise UserError(f"calibrate_threshold is for entropy patching; this model patches by "
                            f"'{self.config.patching}', which has no threshold to set")
        x, _ = checked_input(x)  # a 1-D input ended in a shape error inside the entropy model's conv
        if x.shape[1] < 2:  # the entropies of the last byte are not scored: one byte left none (an error deep in torch)
            raise ValueError(f"calibrate_threshold needs rows of at least 2 bytes (got shape {tuple(x.shape)}); pass "
                             "held-out text, e.g. windows of seq_len bytes")
        was_training = self.entropy_model.training
        self.entropy_model.eval()
        x = x.to(self.head.weight.device)  # the patcher below cats x's tensors with the entropies': one device
        ent = self.entropy_model(x)["entropy"]
        self.entropy_model.train(was_training)
        th, bpp = calibrate_threshold(x, ent, self.config.target_patch_size, self.config.threshold_mode,
                                      self.config.max_patch_size)
        self.entropy_threshold.fill_(th)
        return {"threshold": th, "bytes_per_patch": bpp}

    def compile_parts(self, **kw) -> None:
        """torch.compile the byte-level and latent stacks separately: the patch count is data
        dependent (one host sync), so compiling the whole forward would break the graph there."""
        for stack in (self.encoder, self.decoder, self.latent.blocks):
            for layer in stack:
                layer.compile(**kw)  # in place: state_dict keys stay unchanged
        self.entropy_model.compile_blocks(**kw)

    # ----------------------------------------------------------------- forward
    def _entropy_learns(self) -> bool:
        """Does this forward train the entropy model (joint fine-tuning: not frozen, gradients on)?"""
        return self.config.patching == "entropy" and not self._entropy_frozen and torch.is_grad_enabled()

    def compute_entropy(self, x: torch.Tensor):
        """Next-byte entropy (bits) from the entropy model; its LM loss when it is being trained."""
        if self.config.patching != "entropy":
            return None, None
        if not self._entropy_learns():
            with torch.no_grad():
                return self.entropy_model(x)["entropy"], None
        return self.entropy_model(x), True

    def patches(self, x: torch.Tensor, entropy: torch.Tensor | None, with_next: bool = False):
        c = self.config
        # the threshold goes in as a tensor: as a Python float torch.compile would specialise on its value
        # and recompile the whole forward after every calibration (seen: ~19 s of a 75 s H200 budget)
        return compute_patches(x, entropy, c.patching, self.entropy_threshold, c.threshold_mode,
                               c.max_patch_size, c.fixed_patch_size, with_next)

    @torch.no_grad()
    def patch_boundaries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch boundaries the forward would use for x, as its ``patch_starts`` argument, and the patch
        count per row: ((B, T) bool, or (B, T + 1) with latent_shift "completed"; (B,) long). The entropy
        (frozen entropy model) and the rule are computed exactly as in the forward. For the two-stage
        training step (train/step_graph.py): this runs first, the host reads the largest count once, and
        the rest of the step is a CUDA graph given these boundaries and a latent length."""
        x = x.long()
        entropy, _ = self.compute_entropy(x)  # no grad here: the plain entropy tensor (or None)
        starts, _, n_patches, *next_start = self.patches(x, entropy, with_next=self.config.latent_shift == "completed")
        if next_start:
            starts = torch.cat([starts, next_start[0][:, None]], dim=1)
        return starts, n_patches

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                patch_starts: torch.Tensor | None = None, latent_len: int | None = None) -> dict:
        """patch_starts: optional (B, T) bool, patch boundaries to use instead of the patcher's (e.g. the
        ones generation decided, to compare its logits with this forward where a threshold tie could
        decide differently in two kernels' arithmetic; or ``patch_boundaries``'s, in the two-stage
        training step). With latent_shift "completed" it is (B, T + 1): the last column says whether byte
        T (after the window) starts a patch, i.e. whether byte T-1 closes its patch. Given boundaries, the
        entropy model runs only when it is being trained (its aux_loss); otherwise out['entropy'] is None.

        latent_len: the latent sequence length (patches per row, padding included) instead of the largest
        count rounded up to PATCH_PAD, which the host must read. It must be at least every row's patch
        count (not checked: that check would be the host read). Padding patches sit after every real one,
        so the real outputs do not depend on it (tests/test_step_graph.py compares the two)."""
        x, targets = checked_input(x, targets)
        B, T = x.shape
        if patch_starts is None or self._entropy_learns():
            entropy, trainable = self.compute_entropy(x)
        else:  # the boundaries are given and the entropy model is frozen: nothing to compute it for
            entropy, trainable = None, None
        aux_loss = None
        if trainable:  # joint fine-tuning: the entropy model learns alongside, boundaries use detached entropy
            ent_out = entropy
            entropy = ent_out["entropy"]
            if targets is not None:
                aux_loss = scored_cross_entropy(ent_out["logits"], targets)
        completed = self.config.latent_shift == "completed"
        if patch_starts is None:
            starts, b2p, n_patches, *next_start = self.patches(x, entropy, with_next=completed)
        else:
            if completed and patch_starts.shape[1] != T + 1:
                from ..errors import UserError
                raise UserError(f"latent_shift 'completed' needs patch_starts of T + 1 = {T + 1} columns "
                                f"(the last: does the byte after the window start a patch); got {patch_starts.shape[1]}")
            starts = patch_starts[:, :T].bool() | (torch.arange(T, device=x.device) == 0)
            next_start = [patch_starts[:, T].bool()] if completed else []
            b2p, n_patches = patch_ids(starts)
        # The latent length, rounded up to a multiple of PATCH_PAD so torch.compile sees few shapes;
        # padding patches sit after every real one, so causal attention never lets a real patch see
        # them. Fixed and byte patching give every row the same count, known from T: no host sync, so
        # the GPU can run ahead of the host. Otherwise it is the one host sync per forward, unless the
        # caller gives latent_len (the two-stage training step, which read the count already).
        if latent_len is not None:
            P = latent_len  # not int(): under torch.compile that would specialise a dynamic length
        else:
            static = static_patch_count(self.config, T) if patch_starts is None else None
            P = -(-(static if static is not None else int(n_patches.max())) // PATCH_PAD) * PATCH_PAD

        e = self.embed(x)
        for layer in self.encoder:
            e = layer(e)
        z = self.latent(self.to_latent(self.pool(e, b2p, P)))  # (B, P, d_model)
        z = self.from_latent(z)
        start_vec = self.latent_start.to(z.dtype).expand(B, 1, -1)
        if completed:
            # byte t that closes its patch (byte t+1 starts one) sees its own patch's latent: that patch
            # holds bytes <= t only, and whether t closes it depends only on bytes <= t. Other bytes see
            # the previous patch's. z_ext[j] = latent after j completed patches (j = 0: latent_start).
            closes = torch.cat([starts[:, 1:], next_start[0][:, None]], dim=1)
            z_ext = torch.cat([start_vec, z], dim=1)
            idx = b2p + closes.long()
            h = e + torch.gather(z_ext, 1, idx[..., None].expand(B, T, z_ext.shape[-1]))
        else:
            # patch p's latent output is shown to the bytes of patch p+1 ("lagged": of patch p+2): shift right
            lag = 2 if self.config.latent_shift == "lagged" else 1
            z_prev = torch.cat([start_vec.expand(B, lag, -1), z[:, :-lag]], dim=1)
            h = e + torch.gather(z_prev, 1, b2p[..., None].expand(B, T, z_prev.shape[-1]))
        for layer in self.decoder:
            h = layer(h)
        logits = self.head(self.norm(h))
        out = lm_outputs(logits, targets, n_patches)
        out.update(entropy=entropy, byte_to_patch=b2p, aux_loss=aux_loss)
        return out
