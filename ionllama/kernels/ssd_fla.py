"""The Mamba-2 scan with gradients, on CUDA, through flash-linear-attention's chunked simple-GLA kernels (opt-in).

Why a library and not our own kernel: our Triton SSD kernel (ssd_triton.py) is forward-only (the frozen entropy
model), so training the MambaByte baseline runs the chunked PyTorch reference, 4x slower per byte than the dense
byte transformer. ``fla.ops.simple_gla.chunk_simple_gla`` (package ``fla-core``, Triton forward + backward) computes
exactly ``ssd_chunked``'s recurrence

    h_t = exp(g_t) h_{t-1} + k_t v_t^T,   o_t = scale * h_t^T q_t

with g = log_a (one decay per head), k = B, q = C (shared by the heads: broadcast), v = x (already scaled by dt)
and scale = 1; ``state_v_first=True`` keeps the state as ours, (b, H, P, N).

Off unless ``IONLLAMA_SSD_TRAIN=fla`` is in the environment: the baseline's numbers so far were trained with the
reference, and this path is a measured A/B first (selfcheck kind "ssd_fla" against ``ssd_chunked``, forward and
every gradient; fla-core imports only where a GPU driver is found, so it has no CPU check).
"""
from __future__ import annotations

import os

import torch

# "fla": the scan with gradients goes through fla-core on CUDA; anything else: the chunked reference
SSD_TRAIN_BACKEND = os.environ.get("IONLLAMA_SSD_TRAIN", "reference")
_FLA_OK: bool | None = None


@torch.compiler.assume_constant_result  # a compiled caller takes the answer as a constant, no tracing
def fla_available() -> bool:
    """fla-core imports (it needs Triton and a GPU driver at import time)."""
    global _FLA_OK
    if _FLA_OK is None:
        try:
            from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
            _FLA_OK = True
        except Exception:  # ImportError, or no driver (fla probes the device when imported)
            _FLA_OK = False
    return _FLA_OK


def fla_problem(device: torch.device) -> str | None:
    """Why IONLLAMA_SSD_TRAIN=fla cannot be honoured on this device, as a one-line error (None: it can, or it is not
    asked). The trainer asks before training, so the setting is never dropped without a word."""
    if SSD_TRAIN_BACKEND != "fla":
        return None
    if torch.device(device).type != "cuda":
        return (f"IONLLAMA_SSD_TRAIN=fla needs a CUDA device (fla-core's kernels are Triton on CUDA), not "
                f"{torch.device(device).type}; unset it there")
    if not fla_available():
        return ("IONLLAMA_SSD_TRAIN=fla: fla-core does not import; pip install fla-core einops, "
                "or unset IONLLAMA_SSD_TRAIN to train with the reference scan")
    return None


@torch.compiler.disable  # fla's own entry point is compiler-disabled too: one graph break per call either way
def ssd_scan_fla(x: torch.Tensor, log_a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                 h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_chunked``'s contract: x (b, T, H, P) scaled by dt, log_a (b, T, H), B / C (b, T, N), h0 (b, H, P, N) or
    None -> y (b, T, H, P) in x's dtype, the final state (b, H, P, N) in fp32."""
    from fla.ops.simple_gla import chunk_simple_gla

    H = x.shape[2]
    q = Cm.to(x.dtype).unsqueeze(2).expand(-1, -1, H, -1)
    k = Bm.to(x.dtype).unsqueeze(2).expand(-1, -1, H, -1)
    y, state = chunk_simple_gla(q, k, x, g=log_a.float(), scale=1.0,
                                initial_state=None if h0 is None else h0.float(),
                                output_final_state=True, state_v_first=True)
    return y.to(x.dtype), state.float()
