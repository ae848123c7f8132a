"""Step-by-step decoding vs the parallel forward, robust to threshold ties.

Entropy patching compares a float entropy with a threshold. The parallel forward (chunked scans, Triton
kernels, TF32) and the one-byte steps compute that entropy in different orders, so an entropy within
float noise of the threshold can open a patch in one and not the other; after that the two runs see
different patches and their logits rightly differ. That says nothing about the cache. So the check
reports both: the logits against the forward with its own boundaries, and against the forward given
the boundaries the decoder chose (``patch_starts``), plus where and by how much the decisions differ.
"""
from __future__ import annotations

import torch

from .decoding import decoder_for


@torch.no_grad()
def stepwise_vs_parallel(model, x: torch.Tensor, prompt_len: int) -> dict:
    """x: (B, T) bytes; the first prompt_len are prefilled, the rest fed one step at a time."""
    B, T = x.shape
    dec = decoder_for(model, B, T + 1)
    logits = [dec.prefill([r[:prompt_len].tolist() for r in x])]
    if not hasattr(dec, "prompt_starts"):  # a model without patches (dense, Mamba): only the logits to compare
        for t in range(prompt_len, T):
            logits.append(dec.step(x[:, t]))
        err = float((torch.stack(logits[:-1], 1) - model(x)["logits"][:, prompt_len - 1:T - 1]).abs().max())
        return {"max_abs_err_same_boundaries": err, "max_abs_err_own_boundaries": err, "patches_match": True}
    starts = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    for rows, s in dec.prompt_starts:
        starts[rows, :prompt_len] = s
    for t in range(prompt_len, T):
        starts[:, t] = dec.next_start  # does byte t open a patch? (decided before it is fed)
        logits.append(dec.step(x[:, t]))
    got = torch.stack(logits[:-1], 1)  # predictions for bytes prompt_len .. T-1
    own = model(x)
    # + the flag of the byte after x (does x's last byte close its patch? read by latent_shift "completed")
    same = model(x, patch_starts=torch.cat([starts, dec.next_start[:, None]], 1))
    ref_own, ref_same = own["logits"][:, prompt_len - 1:T - 1], same["logits"][:, prompt_len - 1:T - 1]
    out = {
        "max_abs_err_same_boundaries": float((got - ref_same).abs().max()),
        "max_abs_err_own_boundaries": float((got - ref_own).abs().max()),
        # ("completed" has also committed the last patch when the byte after x would open one)
        "patches_match": bool(torch.equal(dec.n_complete + 1 - dec.completed * dec.next_start.long(),
                                          own["n_patches"])),
    }
    ent = own.get("entropy")
    if ent is not None and model.config.patching == "entropy":
        par_starts = torch.zeros_like(starts)
        par_starts[:, 1:] = own["byte_to_patch"][:, 1:] != own["byte_to_patch"][:, :-1]
        par_starts[:, 0] = True
        differ = par_starts != starts
        h = ent[:, :-1].float()  # about byte t = 1..T-1
        if model.config.threshold_mode == "monotonic":  # what the patcher compares there: the entropy's rise
            h = h - torch.cat([h[:, :1], h[:, :-1]], 1)
        margin = (h - float(model.entropy_threshold)).abs()
        out["boundary_disagreements"] = int(differ.sum())
        out["bytes"] = B * T
        out["max_margin_at_disagreement_bits"] = float(margin[differ[:, 1:]].max()) if differ.any() else None
        out["bytes_within_1e-4_bits_of_threshold"] = int((margin < 1e-4).sum())
    return out
