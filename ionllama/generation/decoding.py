"""Incremental decoders: per-sequence cached state so each new byte costs one step, not a forward.

Contract (every decoder):
  ``dec = Decoder(model, batch_size, max_len)``
  ``dec.prefill(rows)`` - rows: list of B byte lists (lengths may differ, each >= 1). Runs the
      model's parallel forward over the prompts and returns the next-byte logits (B, V) after each
      row's last prompt byte.
  ``dec.step(tokens)`` - tokens: (B,) int64, one new byte per row (appended after that row's
      sequence). Returns the logits (B, V) for the byte after it.
  ``dec.capturable`` - True if what the runner replays (``step``, or ``byte_step`` and
      ``advance_latent`` for a decoder with a latent stage) is a fixed sequence of device ops with
      static shapes and no host reads, so it may be captured as a CUDA graph.
Rows never interact, so a row's logits do not depend on the other rows of the batch.

``decoder_for(model)`` picks the model's incremental decoder (registered by ``config.model``) and
falls back to ``RecomputeDecoder``, which reruns the full forward each step (any causal model).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..errors import UserError

_DECODERS: dict[str, Callable] = {}


def register_decoder(model_name: str):
    def deco(cls):
        _DECODERS[model_name] = cls
        return cls

    return deco


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def right_pad(rows: list[list[int]], device, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens (B, T_max) right-padded, lengths (B,). Causal models never see the padding from
    the real positions, so position i of row r is exact for i < lengths[r]."""
    lengths = [len(r) for r in rows]
    if min(lengths) < 1:
        raise UserError("every prompt needs at least one byte for prefill")
    T = max(lengths)
    x = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return x.to(device), torch.tensor(lengths, dtype=torch.long, device=device)


def shape_bucket(n: int, least: int = 1024) -> int:
    """Positions to allocate for n under torch.compile: the next power of two, at least `least`. The compiled decode
    step is specialised to its caches' shapes (dynamic=False), so exact sizes (prompt + max_new_bytes) compiled it
    again for every new prompt or output length (12-17 s a call for `tiny` on CPU), and past dynamo's recompile
    limit (8) it ran eager without a word. Buckets make such calls meet shapes already compiled, at the cost of up to
    2x the memory (more for runs shorter than `least`), and as much more attention work where a step reads its whole
    cache under a mask (the dense byte decoder; ionLlama's dilated latent step reads only its offsets)."""
    return max(least, 1 << max(0, n - 1).bit_length())


def grown(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A zero tensor like `t` but `size` long along `dim`, holding `t` at the start of that dimension."""
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class IncrementalDecoder:
    capturable = True

    def __init__(self, model: nn.Module, batch_size: int, max_len: int):
        self.model = model
        self.batch_size = batch_size
        self.max_len = max_len
        self.device, self.dtype = model_device_dtype(model)

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def grow(self, max_len: int) -> bool:
        """Make room for `max_len` positions (the caches keep what they hold); True if the state tensors were
        replaced, so a captured graph or a compiled step that holds them must be made again. Why: generate used to
        allocate prompt + max_new_bytes positions up front, so a large max_new_bytes (a stop string expected long
        before it) failed at once: 10**8 bytes asked a dense tiny model for 614 GB."""
        if max_len <= self.max_len:
            return False
        replaced = self._grow(max_len)
        self.max_len = max_len
        return replaced

    def _grow(self, max_len: int) -> bool:
        """Decoders whose state has a length axis make it `max_len` long here and return True; a state of fixed
        size (Mamba's) has nothing to grow."""
        return False

    def _check_rows(self, rows):
        if len(rows) != self.batch_size:
            raise ValueError(f"decoder built for batch {self.batch_size}, got {len(rows)} rows")
        if max(len(r) for r in rows) > self.max_len:
            raise UserError(f"prompt of {max(len(r) for r in rows)} bytes exceeds max_len {self.max_len}")


class RecomputeDecoder(IncrementalDecoder):
    """Reference / fallback: keeps the whole sequence and reruns the parallel forward each step.
    Cost grows with the context; used for models without a cached decoder and in tests. Its step
    reads the length on the host and changes shape every byte: never captured as a CUDA graph."""

    capturable = False

    def __init__(self, model, batch_size, max_len):
        super().__init__(model, batch_size, max_len)
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    def _grow(self, max_len):
        self.tokens = grown(self.tokens, 1, max_len)
        return True

    def _logits_at_end(self) -> torch.Tensor:
        T = int(self.lengths.max())
        logits = self.model(self.tokens[:, :T])["logits"]
        idx = (self.lengths - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
        return logits.gather(1, idx)[:, 0]

    def prefill(self, rows):
        self._check_rows(rows)
        x, lengths = right_pad(rows, self.device)
        self.tokens.zero_()
        self.tokens[:, : x.shape[1]] = x
        self.lengths.copy_(lengths)
        return self._logits_at_end()

    def step(self, tokens):
        if int(self.lengths.max()) >= self.max_len:
            raise UserError(f"generation exceeded max_len {self.max_len}")
        self.tokens.scatter_(1, self.lengths[:, None], tokens.long()[:, None])
        self.lengths += 1
        return self._logits_at_end()


def check_decoder_options(kind: str = "auto", fused_local_step: bool | str = "auto",
                          fused_entropy_step: bool | str = "auto", fused_latent_step: bool | str = "auto") -> None:
    """decoder_for's option values, in one line each (generate checks them before any work, max_new_bytes=0 too)."""
    for flag, val in (("fused_local_step", fused_local_step), ("fused_entropy_step", fused_entropy_step),
                      ("fused_latent_step", fused_latent_step)):
        if val not in (True, False, "auto"):
            raise UserError(f"{flag} must be True, False or 'auto', got {val!r}")
    if kind == "recompute":
        for flag, val in (("fused_local_step", fused_local_step is True),
                          ("fused_entropy_step", fused_entropy_step is True),
                          ("fused_latent_step", fused_latent_step is True)):
            if val:
                raise UserError(f"{flag} needs the cached decoder; use decoder='auto'")
    elif kind != "auto":
        raise UserError(f"unknown decoder kind '{kind}'; use 'auto' or 'recompute'")


def decoder_for(model: nn.Module, batch_size: int, max_len: int, kind: str = "auto",
                fused_local_step: bool | str = "auto", fused_entropy_step: bool | str = "auto",
                fused_latent_step: bool | str = "auto") -> IncrementalDecoder:
    """kind: 'auto' (the model's cached decoder if registered) | 'recompute'.
    fused_local_step: ionLlama's IntegralLNN local layers step through the fused Triton kernels
    (ionllama/kernels/lnn_step_triton.py). True: required (CUDA, or CPU under TRITON_INTERPRET=1, else a
    UserError); False: the PyTorch step; "auto": fused where it was measured faster and equal (cached ionLlama
    decoder with IntegralLNN local layers, CUDA, triton, bf16 or fp16, <= 32 rows: local_state.fused_step_auto).
    fused_entropy_step: ionLlama's entropy model (Mamba blocks + head) steps through the fused Triton kernels
    (ionllama/kernels/ssm_step_triton.py). True: required (CUDA, or CPU under TRITON_INTERPRET=1, entropy
    patching; else a UserError); False: PyTorch; "auto" (default): fused on CUDA for <= 32 rows, bf16 or fp16, where
    the model patches by entropy (with PDL its byte graph took 0.102-0.105 ms against 0.109-0.110 on an H200).
    fused_latent_step: ionLlama's latent blocks step through the fused Triton kernels
    (ionllama/kernels/latent_step_triton.py): True requires them (CUDA, or CPU under TRITON_INTERPRET=1, else a
    UserError); False: the PyTorch step; "auto" (default): fused on CUDA for <= 32 rows, as fused_local_step."""
    check_decoder_options(kind, fused_local_step, fused_entropy_step, fused_latent_step)
    if kind == "recompute":
        return RecomputeDecoder(model, batch_size, max_len)
    from . import dense_decoder  # noqa: F401  (registers)
    try:
        from . import ionllama_decoder  # noqa: F401
    except ImportError:  # pragma: no cover - until the ionllama model exists
        pass
    name = getattr(getattr(model, "config", None), "model", None)
    cls = _DECODERS.get(name)
    if "auto" in (fused_local_step, fused_entropy_step, fused_latent_step):
        from .local_state import fused_entropy_fn, fused_latent_fn, fused_step_auto

        p = next(model.parameters())
        if fused_local_step == "auto":
            fused_local_step = (getattr(cls, "supports_fused_local_step", False)
                                and model.config.local_layers == "integral"
                                and fused_step_auto(p.device, p.dtype, batch_size))
        if fused_entropy_step == "auto":
            fused_entropy_step = (getattr(cls, "supports_fused_entropy_step", False)
                                  and getattr(model.config, "patching", None) == "entropy"
                                  and fused_step_auto(p.device, p.dtype, batch_size, fused_entropy_fn))
        if fused_latent_step == "auto":
            fused_latent_step = (getattr(cls, "supports_fused_latent_step", False)
                                 and fused_step_auto(p.device, p.dtype, batch_size, fused_latent_fn))
    fused = {}
    if fused_local_step:
        if not getattr(cls, "supports_fused_local_step", False):
            raise UserError(f"fused_local_step applies to ionLlama's IntegralLNN local layers, not to model "
                            f"'{name}'; leave it off")
        fused["fused_local_step"] = True
    for flag, val, what in (("fused_entropy_step", fused_entropy_step, "entropy model"),
                            ("fused_latent_step", fused_latent_step, "latent transformer")):
        if val:
            if not getattr(cls, f"supports_{flag}", False):
                raise UserError(f"{flag} applies to ionLlama's {what}, not to model '{name}'; leave it off")
            fused[flag] = True
    if cls is None:
        return RecomputeDecoder(model, batch_size, max_len)
    return cls(model, batch_size, max_len, **fused)
