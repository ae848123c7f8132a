"""Does the compiled patcher (and pooling) give what eager gives? A correctness check for the GPU (issue #4/#8).

The forty-ninth session found a compiled sort + scatter that produced out-of-range indices on CUDA (device-side
assert) while eager was right. The patcher's `cummax` (the max-patch-size cap) and `patch_ids`' `cumsum` compile to
Triton scans on CUDA, the same kind of multi-output code; the trainer compiles them inside the model. This script
runs `compute_patches` and `PatchPooling` eager and under `torch.compile(dynamic=False)` on the same random inputs
for every patching mode, and compares: starts, byte_to_patch, n_patches and next_start exactly, the pooled vectors
within fp32 rounding; for fixed and byte patching, n_patches must also equal `static_patch_count`, the count the
compiled trainer sizes its tensors with.

    PYTHONPATH=. python3 benchmarks/check_compiled_patches.py --device cuda --lengths 1024,8192 --out $OUT/patches.json

Exit status 1 when any case differs (each case is a JSON row with what differed), 0 when all agree.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from ionllama.config import ModelConfig
from ionllama.errors import OneLineParser, UserError, cli_entry
from ionllama.eval.benchmark import git_commit
from ionllama.fsutil import atomic_write
from ionllama.model.ionllama_model import static_patch_count
from ionllama.model.patcher import compute_patches
from ionllama.model.pooling import PatchPooling

from _checks import int_list  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

# (mode, threshold_mode, fixed_size, max_patch_size): every rule, and fixed with and without the cap
CASES = [("fixed", "global", 4, 8), ("fixed", "global", 3, 8), ("fixed", "global", 8, 3), ("byte", "global", 4, 8),
         ("space", "global", 4, 8), ("entropy", "global", 4, 8), ("entropy", "monotonic", 4, 8),
         ("entropy", "global", 4, 2)]


def inputs(B: int, T: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    # text-like bytes (letters, spaces, punctuation, some UTF-8 lead bytes) so space patching has runs of words
    alphabet = torch.tensor(list(b"etaoin shrdlu,.\n") + [0xC3, 0xA9], dtype=torch.long)
    x = alphabet[torch.randint(len(alphabet), (B, T), generator=g)]
    entropy = 4 * torch.rand(B, T, generator=g)
    h = torch.randn(B, T, 16, generator=g)
    return x.to(device), entropy.to(device), h.to(device)


def patch_fn(mode, threshold_mode, k, cap):
    def fn(x, entropy, threshold):
        return compute_patches(x, entropy, mode, threshold, threshold_mode, cap, k, with_next=True)
    return fn


def check_case(case, B: int, T: int, device: str, seed: int, pools: dict) -> dict:
    mode, threshold_mode, k, cap = case
    x, entropy, h = inputs(B, T, device, seed)
    threshold = 2.0 if threshold_mode == "global" else 0.5
    fn = patch_fn(*case)
    torch._dynamo.reset()  # a fresh compile per case: past the recompile limit dynamo would quietly run eager
    eager = fn(x, entropy, threshold)
    compiled = torch.compile(fn, dynamic=False)(x, entropy, threshold)
    if device == "cuda":
        torch.cuda.synchronize()  # a device-side assert shows here, not later
    names = ("starts", "byte_to_patch", "n_patches", "next_start")
    row = dict(mode=mode, threshold_mode=threshold_mode, fixed_size=k, max_patch_size=cap, B=B, T=T,
               bytes_per_patch=round(B * T / int(eager[2].sum()), 3))
    row["differs"] = [n for n, a, b in zip(names, eager, compiled) if not torch.equal(a.cpu(), b.cpu())]
    b2p, n_out = eager[1], int(eager[2].max())
    for pool_mode, pool in pools.items():
        want = pool(h, b2p, n_out)
        got = torch.compile(pool, dynamic=False)(h, b2p, n_out)
        err = (want - got).abs().max().item()
        row[f"pool_{pool_mode}_max_abs_err"] = err
        if not err <= 1e-5:
            row["differs"].append(f"pool_{pool_mode}")
    if mode in ("fixed", "byte"):
        cfg = ModelConfig(patching=mode, fixed_patch_size=k, max_patch_size=cap)
        static = static_patch_count(cfg, T)
        row["static_patch_count"] = static
        if not bool((eager[2] == static).all()):
            row["differs"].append("static_patch_count")
    return row


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--lengths", default="1024,8192", help="comma list of sequence lengths T")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--modes", default=None, help="comma list of patching modes to keep (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    a = p.parse_args(argv)
    lengths = int_list("lengths", a.lengths)
    if a.batch < 1:
        raise UserError(f"--batch {a.batch}: give at least 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; pass --device cpu")
    cases = CASES
    if a.modes:
        keep = a.modes.split(",")
        unknown = sorted(set(keep) - {c[0] for c in CASES})
        if unknown:
            raise UserError(f"--modes: unknown mode {unknown[0]!r}; give a comma list of fixed, byte, space, entropy")
        cases = [c for c in CASES if c[0] in keep]
    torch.manual_seed(a.seed)
    pools = {m: PatchPooling(16, m).to(a.device) for m in ("mean", "attention")}
    rows = []
    for T in lengths:
        for case in cases:
            rows.append(check_case(case, a.batch, T, a.device, a.seed, pools))
            print(json.dumps(rows[-1]), flush=True)
    bad = [r for r in rows if r["differs"]]
    result = dict(device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu", torch=torch.__version__,
                  commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M"),
                  argv=sys.argv[1:] if argv is None else argv, cases=len(rows), differing=len(bad), rows=rows)
    if a.out:
        atomic_write(a.out, json.dumps(result, indent=1))
    print(f"{len(rows) - len(bad)} of {len(rows)} cases agree" + (f"; differing: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
