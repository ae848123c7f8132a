"""Generation for every registered model: cached incremental decoding, sampling, UTF-8 streaming.

``generate(model, prompt_bytes, ...)`` is what ``model.generate(...)`` calls. Per model, a decoder
keeps the cached state (KV cache for the dense baseline; recurrent states, open patch and latent
KV cache for ionLlama) so each new byte costs one step; prefill uses the parallel forward.
"""
from .decoding import IncrementalDecoder, RecomputeDecoder, decoder_for, register_decoder
from .generate import DecodeSession, generate
from .prompts import DOC_SEP, normalize_prompts, normalize_stops
from .sampling import SamplingConfig, sample_next, uniform_noise
from .utf8 import Utf8StreamDecoder

__all__ = ["generate", "DecodeSession", "decoder_for", "register_decoder", "IncrementalDecoder", "RecomputeDecoder",
           "SamplingConfig", "sample_next", "uniform_noise", "Utf8StreamDecoder", "DOC_SEP",
           "normalize_prompts", "normalize_stops"]
