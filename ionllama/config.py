"""Model configuration: one flat dataclass shared by every registered model, so a checkpoint's
config round-trips through JSON and `create_model(size, model=..., **overrides)` works uniformly."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from .errors import UserError, is_whole


LATENT_SHIFTS = ("previous", "completed", "lagged")  # ModelConfig.latent_shift


@dataclass
class ModelConfig:
    model: str = "ionllama"
    size: str = "tiny"
    vocab_size: int = 256
    # latent (ionllama) / backbone (dense, bpe, mamba) width and depth
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: float = 8 / 3
    # residual dropout on every transformer / IntegralLNN block's two branches (latent, local, dense, BPE; the
    # Mamba blocks have none): a regulariser for runs that see the training data many times (Phase 1: 8-13
    # epochs of Gutenberg in 7 minutes). Off by default; a no-op in eval mode and in generation.
    dropout: float = 0.0
    # ionllama: the byte-level (local encoder / decoder) blocks' rate when it should differ from the latent's;
    # None: `dropout`. The byte level sees every byte and has few weights: at 8 epochs it may need less
    local_dropout: float | None = None
    # ionllama: byte-level local layers
    d_local: int = 128
    n_enc_layers: int = 1
    n_dec_layers: int = 2
    local_layers: str = "integral"  # integral | transformer
    local_window: int = 64  # transformer local layers: attention window (bytes)
    conv_kernel: int = 4  # causal depthwise conv width in IntegralLNN / Mamba blocks
    scan_chunk: int = 64
    ngram: str = "hash"  # hash | hash_nodigit | conv | none (model/byte_embedding.py)
    ngram_sizes: tuple = (2, 3, 4, 5)
    ngram_buckets: int = 16384
    pooling: str = "mean"  # mean | attention
    # ionllama: std of the byte and n-gram embedding tables' init. 1.0 is nn.Embedding's own N(0, 1), what every
    # run before the twentieth session used; then the byte path enters the decoder ~4.5x larger than the latent's
    # output (rms 1.0 vs 0.22 at init). 0.02 is the GPT-2 init the dense and BPE models give their embeddings
    embed_std: float = 1.0
    # ionllama: "zero" starts the decoder's residual branches (each block's state-mix or attention output and its
    # FFN output) at zero, so at init the decoder is the identity and the model predicts as one without decoder
    # layers; "default" is GPT-2's. It did not help addition from scratch (docs/results/probe-strip.md)
    dec_init: str = "default"
    # ionllama: init of the IntegralLNN local layers' inputs. "default" is what every committed run used: GPT-2's
    # rule scales every weight named *proj by 1/sqrt(2 x layers), which also catches each block's *input*
    # projection in_proj (std 0.0053 at tiny, not 0.02), and draws the depthwise conv at N(0, 0.02) over its own
    # N(0, 1/kernel). "inputs" redraws those two as meant (in_proj N(0, 0.02), conv N(0, 1/kernel)), last, so every
    # other weight stays that of the default init (an audit of the forty-eighth session; not yet measured on a GPU)
    local_init: str = "default"
    # ionllama: latent attention
    attention: str = "dilated"  # dilated | dense
    local_width: int = 3  # dilated offsets {0..local_width-1} U {powers of two}
    # ionllama: entropy model (Mamba-2 style selective SSM byte LM)
    d_entropy: int = 64
    n_entropy_layers: int = 2
    entropy_state: int = 16
    entropy_headdim: int = 16
    # the entropy model's SSD chunk: chunk L costs L x heads decay / score elements per byte against ~3 x heads x
    # headdim x state / L for the chunk states; the sum is least near L = sqrt(3 x headdim x state) (28 for 16 x 16)
    entropy_chunk: int = 64
    # ionllama: patching
    patching: str = "entropy"  # entropy | fixed | space | byte
    threshold_mode: str = "global"  # global | monotonic
    max_patch_size: int = 8
    target_patch_size: float = 4.0
    fixed_patch_size: int = 4
    # which latent a byte's decoder sees: "previous" (the last patch that ended before the byte's patch),
    # "completed" (as previous, but the last byte of a patch sees its own patch) or "lagged" (the patch before
    # the previous one: generation can then run a patch's latent step while the next patch's bytes decode):
    # docs/notes/latent-shift.md
    latent_shift: str = "previous"  # one of LATENT_SHIFTS
    # bpe baseline
    tokenizer_path: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ngram_sizes"] = list(d["ngram_sizes"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):  # a damaged or foreign file: set(5) was a TypeError traceback
            raise UserError(f"the model config is not a dict of settings (a {type(d).__name__}); load a checkpoint "
                            "written by ionllama")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown model config keys {sorted(unknown)}; the checkpoint is from a newer ionllama?")
        d = dict(d)
        if isinstance(d.get("ngram_sizes"), list):  # anything else is check_config's to refuse (tuple(5) failed)
            d["ngram_sizes"] = tuple(d["ngram_sizes"])
        return cls(**d)

    @classmethod
    def from_checkpoint(cls, d: dict, source) -> "ModelConfig":
        """from_dict, checked, with the file named: a bad value stored in a checkpoint (n_heads 3 at d_model 32) read
        as an error of the caller's own options."""
        try:
            return check_config(cls.from_dict(d))
        except UserError as e:
            raise UserError(f"{source}: its stored model config is not valid: {e}") from None


# Sizes near the original plan's budgets (~5M / ~50M / ~200M / ~800M / ~2B for ionllama).
# The README's parameter table is generated from these by `python -m ionllama.params`.
SIZES: dict[str, dict[str, dict]] = {
    "ionllama": {
        "tiny": dict(d_model=256, n_layers=4, n_heads=4, d_local=128, n_enc_layers=1, n_dec_layers=2,
                     d_entropy=64, n_entropy_layers=2, ngram_buckets=2048),
        "small": dict(d_model=512, n_layers=12, n_heads=8, d_local=256, n_enc_layers=2, n_dec_layers=4,
                      d_entropy=128, n_entropy_layers=2, ngram_buckets=4096),
        "base": dict(d_model=1024, n_layers=14, n_heads=16, d_local=512, n_enc_layers=2, n_dec_layers=6,
                     d_entropy=256, n_entropy_layers=4, ngram_buckets=8192),
        "large": dict(d_model=1536, n_layers=24, n_heads=16, d_local=768, n_enc_layers=3, n_dec_layers=9,
                      d_entropy=256, n_entropy_layers=4, ngram_buckets=16384),
        "xl": dict(d_model=2048, n_layers=36, n_heads=16, d_local=1024, n_enc_layers=3, n_dec_layers=9,
                   d_entropy=384, n_entropy_layers=6, ngram_buckets=16384),
    },
    "dense": {
        "tiny": dict(d_model=256, n_layers=6, n_heads=4),
        "small": dict(d_model=512, n_layers=14, n_heads=8),
        "base": dict(d_model=1024, n_layers=16, n_heads=16),
        "large": dict(d_model=1536, n_layers=28, n_heads=16),
        "xl": dict(d_model=2048, n_layers=40, n_heads=16),
    },
}


MAX_NGRAM = 8  # the incremental hasher's exact integer arithmetic holds up to 8-byte n-grams (byte_embedding.py)


def check_ngram_sizes(sizes, shown=None) -> tuple[int, ...]:
    """Hash n-gram sizes as a tuple if they are distinct and in 1..MAX_NGRAM, else a one-line UserError
    (shown: how the user wrote them)."""
    sizes = tuple(sizes)
    if not sizes or len(set(sizes)) != len(sizes) or min(sizes) < 1 or max(sizes) > MAX_NGRAM:
        raise UserError(f"ngram_sizes '{shown if shown is not None else sizes}' is not distinct n-gram sizes in "
                        f"1..{MAX_NGRAM}; write a range like 3-8, or sizes like 2+3+5")
    return sizes


def parse_ngram_sizes(text: str) -> tuple[int, ...]:
    """The hash n-gram sizes from the command line: "3-8" (a range, both ends included), "2+3+5" or "4"."""
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-"))
            sizes = tuple(range(lo, hi + 1))
        else:
            sizes = tuple(int(t) for t in text.split("+"))
    except ValueError:
        sizes = ()
    return check_ngram_sizes(sizes, text)


def format_ngram_sizes(sizes) -> str:
    """parse_ngram_sizes' inverse: (2, 3, 5) -> "2+3+5" (no commas: the experiment's --override splits on them)."""
    return "+".join(str(int(n)) for n in sizes)


def make_config(size: str = "tiny", model: str = "ionllama", **overrides) -> ModelConfig:
    table = SIZES.get(model, SIZES["dense"])
    if size not in table:
        from .registry import model_names

        kind = (f" ('{size}' is a model: create_model('tiny', model='{size}'))"
                if isinstance(size, str) and size in model_names() else "")
        raise UserError(f"unknown size '{size}'; choose one of {', '.join(table)}{kind}")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise UserError(f"unknown model option(s) {bad}; valid: {sorted(names)}")
    from .registry import options_read, unused_options  # (here: the registry imports this module)

    unused = sorted(unused_options(model, [k for k, v in overrides.items() if v is not None]))
    if unused:
        raise UserError(f"model '{model}' does not use {', '.join(unused)} (ignored, silently, before); drop "
                        f"{'it' if len(unused) == 1 else 'them'}: '{model}' is built from "
                        f"{', '.join(sorted(options_read(model)))}")
    kw = dict(table[size])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return check_config(ModelConfig(model=model, size=size, **kw))


CHOICES = {"attention": ("dilated", "dense"), "local_layers": ("integral", "transformer"),
           "patching": ("entropy", "fixed", "space", "byte"), "threshold_mode": ("global", "monotonic"),
           "ngram": ("hash", "hash_nodigit", "conv", "none"), "pooling": ("mean", "attention"),
           "dec_init": ("default", "zero"), "local_init": ("default", "inputs"),
           "latent_shift": LATENT_SHIFTS}
# the least value of each size option: a zero width or patch size used to end in a ZeroDivisionError or an
# assert deep in the model; a zero latent depth built a model without a latent transformer, silently; a scan chunk
# of 1 never shortened the chunked scan's recursion (RecursionError at the first forward)
AT_LEAST = {"vocab_size": 2, "d_model": 1, "n_layers": 1, "n_heads": 1, "d_local": 1, "n_enc_layers": 0,
            "n_dec_layers": 0, "local_window": 1, "conv_kernel": 1, "scan_chunk": 2, "ngram_buckets": 1,
            "local_width": 1, "d_entropy": 1, "n_entropy_layers": 1, "entropy_state": 1, "entropy_headdim": 1,
            "entropy_chunk": 1, "max_patch_size": 1, "fixed_patch_size": 1, "target_patch_size": 1}


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def _checked_ngram_sizes(v) -> tuple[int, ...]:
    """A tuple of n-gram sizes; the command line's text form ("3-8", "2+3+5") is taken too."""
    if isinstance(v, str):
        return parse_ngram_sizes(v)
    if not isinstance(v, (list, tuple)) or not all(is_whole(n) for n in v):
        raise UserError(f"ngram_sizes must be whole n-gram sizes like (2, 3, 4, 5) or the text \"2-5\" (got {v!r})")
    return check_ngram_sizes(tuple(int(n) for n in v), v)


def _check_types(cfg: ModelConfig) -> None:
    """Whole-number options hold ints (numpy ints become ints), real ones numbers, text ones str: a float layer
    count or a string width used to end in a TypeError deep in torch, a float patch size only at the first
    forward."""
    for f in dataclasses.fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        if kind == "int":
            if not is_whole(v):
                raise UserError(f"{f.name} must be a whole number (got {v!r}); e.g. {f.name}={f.default}")
            if v > 2 ** 31 - 1:  # no size here needs more; max_patch_size 1e20 was an OverflowError in the patcher
                raise UserError(f"{f.name} {v} is beyond any usable size (at most 2**31-1); e.g. {f.name}={f.default}")
            setattr(cfg, f.name, int(v))
        elif kind.startswith("float") and not (v is None and "None" in kind):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise UserError(f"{f.name} must be a number (got {v!r}); e.g. {f.name}={f.default}")
            setattr(cfg, f.name, float(v))
        elif kind == "str" and not isinstance(v, str):
            raise UserError(f"{f.name} must be a string (got {v!r}); e.g. {f.name}={f.default!r}")


def check_config(cfg: ModelConfig) -> ModelConfig:
    """The config if every option is in range, else a one-line UserError naming the option and the fix."""
    _check_types(cfg)
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise UserError(f"unknown {name} '{getattr(cfg, name)}'; choose one of {', '.join(options)}")
    for name, low in AT_LEAST.items():
        if not getattr(cfg, name) >= low:  # `not >=`: NaN fails too
            raise UserError(f"{name} must be >= {low} (got {getattr(cfg, name)}); pass {low} or more (--{name} on the "
                            f"command line, {name}= in Python); ModelConfig's default is {_DEFAULTS[name]}, and a "
                            "--size may set its own")
    for name in ("dropout", "local_dropout"):
        v = getattr(cfg, name)
        if v is not None and not 0 <= v < 1:
            raise UserError(f"{name} must be in [0, 1) (got {v}); e.g. --{name} 0.1 (off: 0)")
    for name in ("ffn_mult", "embed_std"):  # NaN, inf, 0 or below: a torch error at build time or a NaN loss later
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            raise UserError(f"{name} must be a finite number above 0 (got {v}); e.g. {name}="
                            f"{_DEFAULTS[name]:.4g}")
    # int(width * ffn_mult) = 0 built feed-forward layers of no hidden units, silently (ffn_mult 0.003 at d_model 256)
    widths = {"dense": (cfg.d_model,), "bpe": (cfg.d_model,), "ionllama": (cfg.d_model, cfg.d_local)}.get(cfg.model, ())
    if widths and int(min(widths) * cfg.ffn_mult) < 1:
        raise UserError(f"ffn_mult {cfg.ffn_mult:g} leaves the feed-forward layers of width {min(widths)} no hidden "
                        f"units; pass at least {1 / min(widths):.3g} (default {_DEFAULTS['ffn_mult']:.4g})")
    cfg.ngram_sizes = _checked_ngram_sizes(cfg.ngram_sizes)
    if cfg.model != "bpe" and cfg.vocab_size != 256:  # a byte model's head wider than 256 sampled non-bytes
        raise UserError(f"vocab_size {cfg.vocab_size} is for the bpe model; a byte model ({cfg.model}) has the "
                        "256 byte values: leave vocab_size out")
    if cfg.model == "ionllama":
        if (2 * cfg.d_entropy) % cfg.entropy_headdim:  # the entropy model's SSM splits 2 x d_entropy into heads
            raise UserError(f"d_entropy {cfg.d_entropy} x 2 must split into heads of entropy_headdim "
                            f"{cfg.entropy_headdim}; e.g. d_entropy {cfg.entropy_headdim * 4}")
        heads = max(1, cfg.d_local // 64)  # the transformer local layers' heads (model/ionllama_model.py)
        if cfg.local_layers == "transformer" and (cfg.d_local % heads or (cfg.d_local // heads) % 2):
            raise UserError(f"d_local {cfg.d_local} must split into {heads} local attention head(s) of an even "
                            f"width (rotary embeddings); e.g. d_local {heads * 64}")
    # MambaByte has no attention: its d_model need not split into heads (d_model 36 was refused for it)
    if cfg.model != "mamba" and (cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2):
        raise UserError(f"d_model {cfg.d_model} must split into n_heads {cfg.n_heads} heads of an even width "
                        f"(rotary embeddings); e.g. d_model {cfg.n_heads * 64} for n_heads {cfg.n_heads}")
    if cfg.model == "ionllama" and cfg.patching == "fixed" and cfg.fixed_patch_size > cfg.max_patch_size:
        # the cap applies to every patching mode: 16-byte patches came out as 8, 12 as 8 and 4 alternating
        raise UserError(f"fixed_patch_size {cfg.fixed_patch_size} is above max_patch_size {cfg.max_patch_size}; "
                        f"raise max_patch_size to {cfg.fixed_patch_size} too, or lower fixed_patch_size")
    if cfg.model == "ionllama" and cfg.patching == "entropy" and cfg.target_patch_size > cfg.max_patch_size:
        raise UserError(f"target_patch_size {cfg.target_patch_size} is above max_patch_size {cfg.max_patch_size}; "
                        "raise max_patch_size or lower the target")
    return cfg
