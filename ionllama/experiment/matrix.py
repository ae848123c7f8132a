"""The experiment matrices: each arm's hyper-parameters, the sweep's variants and --override."""
from __future__ import annotations

import math

from ..config import parse_ngram_sizes
from ..errors import UserError


# One row per arm: trainer flags (model, size, size overrides, lr) and experiment keys:
#   token_seq_div - a token model's window = --seq_len // token_seq_div tokens (1024 bytes -> 256 tokens)
#   entropy_frac  - share of the budget spent training the entropy model (entropy patching only)
#   joint_frac    - share of the main + joint steps for joint fine-tuning at the end (entropy patching only;
#                   default JOINT_FRAC)
def _matrix(dense: dict, mamba: dict, ion: dict) -> dict[str, dict]:
    """The nine arms: three baselines and ionLlama with its five ablations, from base settings."""
    return {
        "dense": {"model": "dense", **dense},
        "bpe": {"model": "bpe", **dense, "vocab_size": 4096, "token_seq_div": 4},
        "mamba": {"model": "mamba", **mamba},
        "ionllama": dict(ion),
        "ionllama_dense_attn": {**ion, "attention": "dense"},
        "ionllama_tf_local": {**ion, "local_layers": "transformer"},
        "ionllama_fixed": {**ion, "patching": "fixed"},
        "ionllama_space": {**ion, "patching": "space"},
        "ionllama_byte": {**ion, "patching": "byte"},
    }


MATRICES: dict[str, dict[str, dict]] = {
    "phase1": _matrix(dense={"size": "tiny", "d_model": 384, "n_layers": 8, "n_heads": 6, "lr": 1e-3},
                      mamba={"size": "tiny", "d_model": 384, "n_layers": 16, "lr": 1e-3},
                      ion={"model": "ionllama", "size": "small", "lr": 1e-3, "entropy_frac": 0.06}),
    # every arm at the registry's `tiny` size (~5M parameters each, equal within 10 % but for BPE's
    # embeddings), for a CPU-scale run of the matrix: a quick, clearly smaller-scale look at the questions
    "cpu_tiny": _matrix(dense={"size": "tiny", "lr": 2e-3}, mamba={"size": "tiny", "lr": 2e-3, "n_layers": 12},
                        ion={"model": "ionllama", "size": "tiny", "lr": 2e-3, "entropy_frac": 0.06}),
}
ARMS = MATRICES["phase1"]
TASK_ARMS = ("ionllama", "dense", "bpe")
# --sweep: per arm, the base setting and these variants, each under --sweep_budget_s. Width (d_model) and
# depth (n_layers: the main stack; ionLlama's latent transformer) both ways: at a short budget a smaller
# model can win (more steps), at a long one a larger
SWEEP_VARIANTS = {"lr0.5x": {"lr_mult": 0.5}, "lr2x": {"lr_mult": 2.0}, "wide": {"width_mult": 4 / 3},
                  "narrow": {"width_mult": 3 / 4}, "deep": {"depth_mult": 4 / 3}, "shallow": {"depth_mult": 2 / 3}}
# ionLlama also has a byte-level part (local encoder / decoder) that the latent width and depth leave alone: at
# equal steps its arms trail dense bytes (phase1-7min.md), so the sweep also tries a wider and a deeper byte level
ION_SWEEP_VARIANTS = {"local_wide": {"local_width_mult": 1.5}, "local_deep": {"dec_layers_add": 2}}
MODEL_KEYS = ("d_model", "n_layers", "n_heads", "d_local", "n_enc_layers", "n_dec_layers", "attention",
              "local_layers", "patching", "threshold_mode", "max_patch_size", "target_patch_size", "ngram", "pooling",
              "vocab_size", "latent_shift", "dropout", "local_dropout", "fixed_patch_size", "entropy_chunk",
              "ngram_buckets", "ngram_sizes", "embed_std", "dec_init", "local_width",
              "local_init", "d_entropy", "n_entropy_layers", "entropy_state", "entropy_headdim")


def sweep_variants(spec: dict) -> tuple[str, ...]:
    """The variants the sweep trains for an arm, base first."""
    extra = tuple(ION_SWEEP_VARIANTS) if spec["model"] == "ionllama" else ()
    return ("base", *SWEEP_VARIANTS, *extra)


NOMINAL_STEPS = 100_000  # schedule resolution of the time-based plan (steps never reach it)
WARMUP_FRAC = 0.02
JOINT_FRAC = 0.1
NEVER = 10 ** 9


def variant_parts(variant: str) -> list[str]:
    """'shallow+lr2x' -> ['shallow', 'lr2x']: a composed variant (the sweep's winners combined), each part a
    known variant and no two turning the same knob; a UserError names the problem."""
    known = {**SWEEP_VARIANTS, **ION_SWEEP_VARIANTS}
    parts = variant.split("+")
    bad = [p for p in parts if p not in known]
    if bad:
        raise UserError(f"unknown sweep variant(s) {bad} in '{variant}'; choose from base, {', '.join(known)} "
                        f"(combine with '+', e.g. shallow+lr2x)")
    knobs = [k for p in parts for k in known[p]]
    if len(parts) > 1 and len(set(knobs)) < len(knobs):
        raise UserError(f"sweep variant '{variant}' turns one knob twice; combine variants of different knobs")
    return parts


def variant_spec(spec: dict, variant: str) -> dict:
    if "+" in variant:  # applied one after the other: each part sees the previous parts' model
        for part in variant_parts(variant):
            spec = variant_spec(spec, part)
        return spec
    v = {**SWEEP_VARIANTS, **ION_SWEEP_VARIANTS}[variant]
    out = dict(spec)
    out["lr"] = spec["lr"] * v.get("lr_mult", 1.0)
    if v.keys() - {"lr_mult"}:
        from ..config import make_config

        base = make_config(spec["size"], spec["model"], **{k: spec[k] for k in MODEL_KEYS if k in spec})
    if "width_mult" in v:
        d = max(64, int(math.floor(base.d_model * v["width_mult"] / 64 + 0.5)) * 64)  # multiples of 64 heads
        out["d_model"] = d
        from ..registry import unused_options

        if not unused_options(spec["model"], ["n_heads"]):  # (MambaByte has no attention heads)
            out["n_heads"] = max(1, d // 64)
    if "depth_mult" in v:
        out["n_layers"] = max(1, int(math.floor(base.n_layers * v["depth_mult"] + 0.5)))
    if "local_width_mult" in v:
        out["d_local"] = max(64, int(math.floor(base.d_local * v["local_width_mult"] / 64 + 0.5)) * 64)
    if "dec_layers_add" in v:
        out["n_dec_layers"] = base.n_dec_layers + v["dec_layers_add"]
    return out


# --override keys beyond the model options: the optimiser's, and the runner's own per-arm settings
RUN_KEYS = ("lr", "weight_decay", "min_lr_ratio", "size", "entropy_frac", "joint_frac", "token_seq_div")


def parse_overrides(items: list[str] | None) -> dict:
    """--override d_model=64 --override lr=3e-3 -> typed values for every arm (tests, quick checks)."""
    out = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            if "=" not in part:
                raise UserError(f"--override '{part}' is not KEY=VALUE; e.g. --override d_model=64")
            k, v = part.split("=", 1)
            if k not in MODEL_KEYS + RUN_KEYS:
                raise UserError(f"--override: unknown key '{k}'; valid: {', '.join(MODEL_KEYS + RUN_KEYS)}")
            if k == "ngram_sizes":  # "3-8" or "2+3+5" -> a tuple
                out[k] = parse_ngram_sizes(v)
                continue
            for cast in (int, float):
                try:
                    v = cast(v)
                    break
                except ValueError:
                    continue
            out[k] = v
    return out
