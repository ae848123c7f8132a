"""GPT-2-style transformer over byte-level BPE tokens: the tokenized baseline.

The same pre-norm RoPE / SwiGLU / SDPA blocks as the dense byte transformer, over tokens of a
byte-level BPE (ionllama.data.bpe) trained on the training split. Its BPB is bits per *byte*:
``forward`` divides by the bytes its scored targets cover (``token_nbytes``), so training-time numbers
are comparable with the byte models; the exact val number comes from
``ionllama.data.bpe.evaluate_token_bpb``.

The tokenizer travels inside the model: ``tokenizer_json`` (a uint8 buffer holding tokenizer.json)
is part of the state dict, so a checkpoint or safetensors export is self-contained. Attach one with
``set_tokenizer(bpe)`` before training (``config.vocab_size`` must equal its vocabulary).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import UserError, is_whole
from ..registry import register
from .common import checked_input, eval_mode
from .dense import ParamCountMixin, build_transformer_lm, lm_outputs, transformer_lm_logits

# the byte models' decode-speed options: taken at generate()'s own defaults (so one call serves every model); any
# other value asks for something the token decoder does not do, and is refused
BYTE_DECODER_OPTIONS = ("cuda_graphs", "compile", "fused_local_step", "fused_entropy_step", "fused_latent_step",
                        "entropy_branch", "unroll", "session")


def _byte_decoder_defaults() -> dict:
    """generate()'s defaults for BYTE_DECODER_OPTIONS, read from its signature (not written again here)."""
    import inspect

    from ..generation.generate import generate

    params = inspect.signature(generate).parameters
    return {name: params[name].default for name in BYTE_DECODER_OPTIONS}



@register("bpe", reads=("d_model", "n_layers", "n_heads", "ffn_mult", "dropout", "vocab_size",
                        "tokenizer_path"))
class BPETransformer(ParamCountMixin, nn.Module):
    token_level = True  # the trainer / data pipeline feed token ids, not bytes

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size <= 256:
            raise UserError(f"--model bpe needs vocab_size > 256 (the tokenizer's vocabulary), got "
                            f"{config.vocab_size}; pass --vocab_size 4096 (vocab_size=4096 in create_model)")
        build_transformer_lm(self, config)
        # bytes per token id; all ones until a tokenizer is attached
        self.register_buffer("token_nbytes", torch.ones(config.vocab_size, dtype=torch.long))
        self.register_buffer("tokenizer_json", torch.zeros(0, dtype=torch.uint8))
        self._bpe = None
        self._tokenizer_error = None
        if config.tokenizer_path:
            from ..data.bpe import ByteBPE

            try:
                self.set_tokenizer(ByteBPE.from_file(config.tokenizer_path))
            except UserError as e:  # loading a checkpoint elsewhere: its state dict carries the tokenizer. Said when
                # none came by the first scored forward: a misspelt path gave bits per *token* labelled as bpb
                self._tokenizer_error = f"tokenizer_path {config.tokenizer_path!r} was not loaded ({e})"

    # ------------------------------------------------------------------ tokenizer
    def set_tokenizer(self, bpe) -> None:
        if bpe.vocab_size != self.config.vocab_size:
            raise UserError(f"tokenizer has {bpe.vocab_size} tokens but the model vocab_size is "
                            f"{self.config.vocab_size}; build the model with vocab_size={bpe.vocab_size}")
        dev = self.token_nbytes.device
        self.token_nbytes = torch.as_tensor(bpe.token_nbytes, dtype=torch.long, device=dev)
        self.tokenizer_json = torch.frombuffer(bytearray(bpe.to_str().encode("utf-8")), dtype=torch.uint8).to(dev)
        self._bpe = bpe

    @property
    def bpe(self):
        if self._bpe is None:
            if self.tokenizer_json.numel() == 0:
                raise UserError("this BPE model has no tokenizer attached; train it with `ionllama train --model bpe` "
                                "or call set_tokenizer()")
            from ..data.bpe import ByteBPE

            self._bpe = ByteBPE.from_str(bytes(self.tokenizer_json.cpu().numpy()).decode("utf-8"))
        return self._bpe

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the tokenizer buffer's length is only known from the checkpoint: adopt it before loading
        key = prefix + "tokenizer_json"
        if key in state_dict:
            self.tokenizer_json = torch.empty_like(state_dict[key], device=self.tokenizer_json.device)
            self._bpe = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        x, targets = checked_input(x, targets, vocab=self.config.vocab_size)
        B, T = x.shape
        logits = transformer_lm_logits(self, x)
        bytes_per_target = 1.0
        n_bytes = None
        if targets is not None:
            if self._tokenizer_error is not None and self.tokenizer_json.numel() == 0:
                raise UserError(f"{self._tokenizer_error}; without it bpb would be bits per token: fix the path, "
                                "or call set_tokenizer()")
            valid = targets != -100
            n_bytes = torch.where(valid, self.token_nbytes[targets.clamp_min(0)], 0).sum()
            bytes_per_target = (n_bytes.float() / valid.sum().clamp_min(1)).clamp_min(1e-6)
        out = lm_outputs(logits, targets, torch.full((B,), T, device=x.device, dtype=torch.long), bytes_per_target)
        out["n_bytes"] = n_bytes  # bytes covered by the scored targets (for exact byte accounting)
        out["input_bytes"] = self.token_nbytes[x.long()].sum()
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt_bytes, max_new_bytes: int = 256, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, greedy: bool = False, seed=None, stop=None, stream=None,
                 decoder: str = "auto", return_info: bool = False, prompt_ids=None, **byte_decoder_options):
        """Same signature and stopping rules as the byte models: encode each prompt, sample tokens, emit
        their bytes until max_new_bytes, DOC_SEP or a stop string. decoder: 'auto' (the dense KV cache
        over token ids) | 'recompute' (a full forward per token). Returns bytes, or a list for a batch.
        prompt_ids: each row's prompt already as token ids (decoding the same bytes as prompt_bytes), for callers
        that must tokenize a prompt in pieces as training did (the task evaluation's solved examples)."""
        from ..generation.generate import _row_seeds, check_call_options, finish_outputs, model_precision
        from ..generation.prompts import DOC_SEP, RowOutput, normalize_prompts, normalize_stops
        from ..generation.sampling import SamplingConfig

        unknown = sorted(set(byte_decoder_options) - set(BYTE_DECODER_OPTIONS))
        if unknown:  # a misspelt option (topk=3) was dropped here silently while the byte models refuse it
            raise TypeError(f"generate() got an unexpected keyword argument '{unknown[0]}'")
        defaults = _byte_decoder_defaults()
        for name, value in byte_decoder_options.items():  # compile=True, unroll=0, ... were ignored without a word
            default = defaults[name]
            if name == "cuda_graphs":  # a yes / no / auto for every model (checked below): no graphs here
                continue
            if type(value) is not type(default) or value != default:
                raise UserError(f"{name}={value!r} is a byte-model decoder option; the BPE model's token decoder "
                                f"has no such setting: leave it out (or {name}={default!r})")
        rows, is_batch = normalize_prompts(prompt_bytes)
        if not rows:
            raise UserError("empty batch of prompts; pass at least one prompt")
        if not is_whole(max_new_bytes) or max_new_bytes < 0:
            raise UserError(f"max_new_bytes must be a whole number >= 0, got {max_new_bytes!r}")
        max_new_bytes = int(max_new_bytes)
        check_call_options(stream=stream, return_info=return_info,
                           cuda_graphs=byte_decoder_options.get("cuda_graphs", "auto"))
        if decoder not in ("auto", "recompute"):
            raise UserError(f"unknown decoder kind '{decoder}'; use 'auto' or 'recompute'")
        cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        stops = normalize_stops(stop)
        bpe = self.bpe
        device = self.head.weight.device
        if prompt_ids is not None:
            try:  # a flat list for one prompt was a TypeError traceback
                seqs = [[int(t) for t in ids] for ids in prompt_ids]
            except (TypeError, ValueError):
                seqs = None
            if seqs is None or len(seqs) != len(rows) or any(bpe.decode(s) != bytes(r if r else [DOC_SEP])
                                                             for s, r in zip(seqs, rows)):
                raise UserError("prompt_ids must hold, row by row, token ids of the bytes given as prompt_bytes")
        else:
            seqs = [[int(t) for t in bpe.encode(bytes(r if r else [DOC_SEP]))] for r in rows]
        outs = [RowOutput(stops) for _ in rows]
        emitted = [0] * len(rows)
        seeds = _row_seeds(seed, len(rows), device, draw=not cfg.is_greedy and max_new_bytes > 0)
        with eval_mode(self), model_precision(self):
            self._decode(decoder, rows, seqs, outs, emitted, cfg, seeds, max_new_bytes, stream)
        return finish_outputs(outs, stream, is_batch, return_info)

    def _decode(self, decoder, rows, seqs, outs, emitted, cfg, seeds, max_new_bytes, stream) -> None:
        from ..generation.sampling import sample_next

        if max_new_bytes <= 0:
            return
        bpe = self.bpe
        from ..generation.generate import INITIAL_NEW_BYTES

        # every token holds >= 1 byte: max_new_bytes tokens always suffice; the cache starts smaller and doubles
        # as needed (generate.INITIAL_NEW_BYTES)
        full = max(map(len, seqs)) + max_new_bytes
        dec = _make_decoder(self, decoder, len(rows), min(full, max(map(len, seqs)) + INITIAL_NEW_BYTES))
        logits = dec.prefill(seqs)
        for step in range(max_new_bytes):
            toks = sample_next(logits, cfg, seeds, step)
            for r, t in enumerate(toks.tolist()):
                for b in bpe.token_bytes[t][:max_new_bytes - emitted[r]]:
                    if outs[r].done:
                        break
                    emitted[r] += 1
                    piece = outs[r].push(b)
                    if stream is not None and piece:
                        stream(r, piece)
            if all(o.done or e >= max_new_bytes for o, e in zip(outs, emitted)):
                break
            if full - max_new_bytes + step + 1 > dec.max_len:  # this step writes position len(prompt) + step
                dec.grow(min(full, 2 * dec.max_len))
            logits = dec.step(toks)


def _make_decoder(model, kind: str, batch: int, max_len: int):
    """The dense KV-cache decoder works on any ids (same modules as the dense byte model)."""
    from ..generation.decoding import RecomputeDecoder
    from ..generation.dense_decoder import DenseKVDecoder

    if kind == "auto":
        return DenseKVDecoder(model, batch, max_len)
    return RecomputeDecoder(model, batch, max_len)
