"""Which decode path changes the bytes? (issue #4: bench_generation's fixed_b1_compiled_graphs_equal_eager was false
on an H100 while the uncompiled graphs and the compiled three-prompt run gave the eager bytes.)

A tiny fixed-patching model in fp32 ("previous" shift), one and two prompts, sampled (seed 1) and greedy: each
variant's bytes against eager ones, as the index of the first differing byte (-1: equal).
    PYTHONPATH=. python scripts/diag_decode_paths.py [--device cuda] [--out diag.json]
"""
from __future__ import annotations

import argparse
import importlib
import json

import torch

from ionllama import create_model
from ionllama.generation import generate

gen_mod = importlib.import_module("ionllama.generation.generate")  # (the package exports the function by that name)

VARIANTS = {  # name: (generate kwargs, runner kwargs forced)
    "graphs": (dict(cuda_graphs=True), {}),
    "compiled_graphs": (dict(cuda_graphs=True, compile=True), {}),  # (overlap "auto": on at <= 2 prompts since s56)
    "compiled_graphs_overlap": (dict(cuda_graphs=True, compile=True), dict(overlap_latent=True)),
    "compiled_graphs_no_overlap": (dict(cuda_graphs=True, compile=True), dict(overlap_latent=False)),
    "compiled_graphs_schedule_no_overlap": (dict(cuda_graphs=True, compile=True),
                                            dict(overlap_latent=False, host_schedule=True)),
    "compiled_no_graphs": (dict(cuda_graphs=False, compile=True), {}),
    "compiled_graphs_pairs": (dict(cuda_graphs=True, compile=True), dict(overlap_latent=True, _pairs=True)),
    # overlap_latent with the latent stream made the bytes' stream (everything in order), and with one of its five
    # parts left uncompiled (encode, decode, stage, show, compute)
    "compiled_graphs_serial": (dict(cuda_graphs=True, compile=True), dict(overlap_latent=True, _serial=True)),
    **{f"compiled_graphs_eager_{name}": (dict(cuda_graphs=True, compile=True), dict(overlap_latent=True, _eager=i))
       for i, name in enumerate(("encode", "decode", "stage", "show", "compute"))},
}


def first_diff(a, b) -> int:
    a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
    for x, y in zip(a, b):
        for i, (p, q) in enumerate(zip(x, y)):
            if p != q:
                return i
        if len(x) != len(y):
            return min(len(x), len(y))
    return -1


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seeds", type=int, default=1, help="one prompt, sampled: seeds 1..N (rare flips vs a pattern)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sampled_only", action="store_true", help="one prompt, sampled: no greedy or two-prompt cases")
    ap.add_argument("--model_kw", default="",
                    help="model options over the tiny model's, e.g. 'ngram=none,conv_kernel=2'")
    a = ap.parse_args(argv)
    torch._dynamo.config.recompile_limit = 256  # (every forced runner class is a guard of its own)
    torch.manual_seed(0)
    kw = dict(d_model=64, n_layers=2, n_heads=2, d_local=64, n_enc_layers=1, n_dec_layers=2, patching="fixed")
    for item in filter(None, a.model_kw.split(",")):
        k, v = item.split("=")
        kw[k] = int(v) if v.lstrip("-").isdigit() else v
    m = create_model("tiny", **kw).to(a.device).eval()
    prompts = [b"def main(", b"import torch\n"]
    res = {}
    orig = gen_mod.DecodeRunner
    cases = [(prompts[:1], f"sampled{sd}" if sd > 1 else "sampled", dict(seed=sd)) for sd in range(1, a.seeds + 1)]
    if not a.sampled_only:
        cases += [(prompts[:1], "greedy", dict(greedy=True)), (prompts, "sampled", dict(seed=1)),
                  (prompts, "greedy", dict(greedy=True))]
    for rows, mode, kw in cases:
        p = rows[0] if len(rows) == 1 else rows
        ref = generate(m, p, a.n, cuda_graphs=False, **kw)
        for name in a.variants.split(","):
            gkw, force = VARIANTS[name]
            class Forced(orig):  # the runner with some options forced
                def __init__(self, *args, **kwargs):
                    kwargs.update({k: v for k, v in force.items() if not k.startswith("_")})
                    super().__init__(*args, **kwargs)
                    self.ov_pairs = bool(force.get("_pairs", False))
                    if force.get("_serial") and self.latent_stream is not None:
                        self.latent_stream = self.byte_stream
                    if "_eager" in force and self._ov_fns:
                        d = self.dec
                        plain = [self._ov_encode, self._iter_decode, d.latent_stage, d.latent_show, d.latent_compute]
                        self._ov_fns[force["_eager"]] = plain[force["_eager"]]
            gen_mod.DecodeRunner = Forced
            try:
                out, info = generate(m, p, a.n, return_info=True, **kw, **gkw)
                res[f"b{len(rows)}_{mode}_{name}"] = first_diff(out, ref)
            except Exception as e:  # report and go on
                res[f"b{len(rows)}_{mode}_{name}"] = repr(e)[:200]
            finally:
                gen_mod.DecodeRunner = orig
            print(f"b{len(rows)} {mode} {name}: first differing byte {res[f'b{len(rows)}_{mode}_{name}']}",
                  flush=True)
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
