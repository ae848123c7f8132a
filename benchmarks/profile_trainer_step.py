"""Where does the harness Trainer's step lose time against the same model in bench_train_throughput.py?

On an H200 the trainer trains dense d384 L8 (seq 1024, batch 64, whole-model compile) at 1.44-1.55 MB/s,
while bench_train_throughput.py measures 2.46 MB/s for the same model and shape (docs/results/
train-profile.md). This script builds the real Trainer from trainer flags, enters its main phase and times
`Trainer.train_step` as is and with one thing changed at a time:

- `trainer`: the step as the trainer runs it (sampler, pinned copy, autocast, clip, fused AdamW);
- `staged_data`: the same, with the batches made beforehand (no sampling, no host-to-device copy);
- `no_clip`: the same as `trainer`, with --grad_clip 0;
- `bench_step`: the bench's loop (forward, backward, optimizer step) on the trainer's compiled module.

Then it lists every host-device synchronisation of one step (torch.cuda.set_sync_debug_mode) and profiles
a few steps (CUDA runtime calls that block, GPU busy time, top host ops).

    PYTHONPATH=. python benchmarks/profile_trainer_step.py --out r.json -- --model dense --size tiny \\
        --d_model 384 --n_layers 8 --n_heads 6 --seq_len 1024 --batch_size 64 --compile --mixed_precision bf16
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings

import torch

from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry
from ionllama.fsutil import atomic_write, ready_out_file
from ionllama.eval.benchmark import device_name


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_steps(tr, n: int, fn) -> float:
    _sync(tr.device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(tr.device)
    return (time.perf_counter() - t0) / n


@cli_entry
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv and not {"-h", "--help"} & set(argv):  # --help alone shows the help (it was this error)
        raise UserError("give the trainer's flags after `--`; see --help")
    cut = argv.index("--") if "--" in argv else len(argv)
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv[:cut])
    # a step count of 0 divided by zero after the warm-up (and a negative one timed nothing, exit 0)
    check_ranges(a, {"steps": 1, "warmup": 0, "profile_steps": 1})
    if a.out:  # checked before the work: --out . was an IsADirectoryError after it (an audit)
        ready_out_file(a.out)
    from ionllama.train.cli import build_train_parser
    from ionllama.train.trainer import Trainer

    targs = build_train_parser().parse_args(argv[cut + 1:] + ["--save_dir", tempfile.mkdtemp(), "--warmup_steps", "1"])
    tr = Trainer(targs)
    tr._enter_phase("main")
    step = [0]

    def trainer_step():
        tr.train_step(step[0])
        step[0] += 1

    for _ in range(a.warmup):
        trainer_step()
    rows = {"trainer": time_steps(tr, a.steps, trainer_step)}

    real_get = tr.sampler.get
    staged = [tuple(t.to(tr.device) for t in real_get(i)) for i in range(4)]
    tr.sampler.get = lambda s, m=0: staged[s % len(staged)]  # on the device already: no pinning, no copy
    try:
        rows["staged_data"] = time_steps(tr, a.steps, trainer_step)
    finally:
        tr.sampler.get = real_get

    clip = tr.args.grad_clip
    tr.args.grad_clip = 0.0
    rows["no_clip"] = time_steps(tr, a.steps, trainer_step)
    tr.args.grad_clip = clip

    def bench_step():
        x, y = staged[step[0] % len(staged)]
        step[0] += 1
        with tr._autocast():
            out = tr.fwd(x, y)
        out["loss"].backward()
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        bench_step()
    rows["bench_step"] = time_steps(tr, a.steps, bench_step)

    bytes_per_step = tr.sampler.global_batch * tr.args.seq_len
    result = {"device": device_name(tr.device), "torch": torch.__version__,
              "trainer_flags": argv[cut + 1:], "bytes_per_step": bytes_per_step,
              "variants": {k: {"step_ms": round(v * 1e3, 2), "bytes_per_s": round(bytes_per_step / v)} for k, v in rows.items()}}

    syncs = []
    if tr.device.type == "cuda":  # every synchronising call of one trainer step, with where it came from
        import traceback

        def record(message, category, filename, lineno, file=None, line=None):
            if "prototype feature" in str(message):  # set_sync_debug_mode's own notice, not a sync
                return
            stack = [f"{f.filename.split('/site-packages/')[-1]}:{f.lineno} {f.name}"
                     for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-6:]
            syncs.append({"message": str(message)[:160], "stack": stack})

        old = warnings.showwarning
        warnings.showwarning = record
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            trainer_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old
    result["syncs_in_one_step"] = syncs

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.device.type == "cuda" else [])
    _sync(tr.device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(a.profile_steps):
            trainer_step()
        _sync(tr.device)
    wall = (time.perf_counter() - t0) / a.profile_steps
    ev = prof.key_averages()
    blocking = {e.key: e.count for e in ev if any(s in e.key for s in
                ("Synchronize", "cudaMemcpy", "HostAlloc", "cudaFree", "cudaMalloc"))}
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
    kernels = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    top = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    result["profile"] = {"steps": a.profile_steps, "wall_ms_per_step": round(wall * 1e3, 2),
                         "gpu_busy_ms_per_step": round(gpu_us / 1e3 / a.profile_steps, 2),
                         "launches_per_step": kernels / a.profile_steps,
                         "blocking_runtime_calls": {k: v / a.profile_steps for k, v in blocking.items()},
                         "top_host_ops_ms_per_step": {e.key[:80]: round(e.self_cpu_time_total / 1e3 / a.profile_steps, 2)
                                                      for e in top}}
    print(json.dumps(result, indent=1))
    if a.out:
        atomic_write(a.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
