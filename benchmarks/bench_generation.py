"""Generation speed: bytes/s at batch 1 and 32 and per-byte latency at 1K/8K/32K bytes of context,
ionLlama (cached incremental decoder) vs the dense byte transformer (KV cache), same run.

Random-weight models (speed does not depend on training) in bf16; the ionLlama entropy threshold
is calibrated on real text (this repository's source) to the configured bytes/patch, so latent
steps happen at the rate they would in use. Sampling: temperature 1, no top-k/top-p (Gumbel-max
with counter-based noise, inside the graph). Timing covers the decode loop only (prefill and graph
capture excluded and reported separately); one host sync at the end of each timed span.

    PYTHONPATH=. python benchmarks/bench_generation.py --out results_dir

Writes bench_generation.json and bench_generation.md (tables) into --out.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import platform
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone

import torch

from ionllama import create_model
from ionllama.config import LATENT_SHIFTS, ModelConfig
from ionllama.errors import UserError, check_ranges, cli_entry
from ionllama.eval.benchmark import device_info, git_commit
from ionllama.fsutil import atomic_write, ready_out_dir
from ionllama.generation import decoder_for
from ionllama.generation.runner import DecodeRunner, resolve_latent_policy
from ionllama.generation.sampling import SamplingConfig
from ionllama.kernels.launch_config import kernel_config_applied, parse_kernel_config
from ionllama.registry import build_model, model_config


def corpus_bytes(n: int) -> torch.Tensor:
    """Real text: this repository's Python and Markdown files, repeated to n bytes."""
    root = pathlib.Path(__file__).resolve().parents[1]
    data = b"".join(p.read_bytes() for p in sorted(root.glob("ionllama/**/*.py")) + sorted(root.glob("docs/**/*.md")))
    reps = n // len(data) + 1
    return torch.frombuffer(bytearray((data * reps)[:n]), dtype=torch.uint8).long()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# after each batch-1 row with graphs: this many more bytes with CUDA events around every replay (the
# GPU time of a byte; the rest of the wall time per byte is the GPU waiting for the host)
TIMED_BYTES = 256

def replay_gpu_ms(runner, n: int) -> dict:
    """Run n more bytes (batch 1, captured graphs) with CUDA events around every replay: the median GPU ms of
    the byte graph (all its parts) and of the latent graph, and the mean GPU ms per byte; {} if none ran."""
    gpu = {}
    runner.run(n, gpu_ms=gpu)
    med = (lambda v: sorted(v)[len(v) // 2] if v else None)  # noqa: E731
    if "byte_latent" in gpu:  # host_schedule: one graph per byte; those of closing bytes hold the latent stage
        plain, with_lat = sorted(gpu.get("byte", [])), sorted(gpu["byte_latent"])
        n_bytes = len(plain) + len(with_lat)
        lat = None if not plain else med(with_lat) - med(plain)  # the latent stage's share (a difference)
        return dict(gpu_ms_byte_graph=med(plain), gpu_ms_latent_graph=lat,
                    gpu_ms_per_byte=sum(sum(v) for v in gpu.values()) / n_bytes)
    if runner.overlap and runner.host_schedule:
        # overlap_latent: the bytes' graphs, and the latent step's compute on its own stream. A byte's wait for that
        # compute falls between two timed replays, so the GPU idle per byte (wall minus these) holds it too
        n_bytes = sum(len(gpu.get(k, [])) for k in ("byte", "encode", "encode_stage")) + 2 * len(gpu.get("pair", []))
        on_bytes = sum(sum(v) for k, v in gpu.items() if k != "compute")  # (the compute overlaps them; a pair holds it)
        plain = gpu.get("byte") or [a + b for a, b in zip(gpu.get("encode", []), gpu.get("show_decode", []))]
        return dict(gpu_ms_byte_graph=med(plain), gpu_ms_latent_graph=med(gpu.get("compute", [])),
                    gpu_ms_per_byte=on_bytes / n_bytes)
    n_bytes = len(gpu.get("byte", []))
    if not n_bytes:
        return {}
    rest = gpu.get("byte_rest", [])
    k = len(rest) // n_bytes  # later parts per byte: 0, 1 ('early') or 2 (latent_shift "completed")
    per_byte = [a + sum(rest[i * k:(i + 1) * k]) for i, a in enumerate(gpu["byte"])]
    lat = sorted(gpu.get("latent", []))
    return dict(gpu_ms_byte_graph=sorted(per_byte)[n_bytes // 2], gpu_ms_latent_graph=lat[len(lat) // 2] if lat else None,
                gpu_ms_per_byte=sum(sum(v) for v in gpu.values()) / n_bytes)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
        self.t_start = time.time()
        self.rows = []
        self.text = corpus_bytes(max(max(args.contexts) + 8192, 40000))
        self.models = {}
        self.checks = {}

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t_start)

    def model(self, kind):
        if kind not in self.models:
            torch.manual_seed(0)
            shift = getattr(self.args, "latent_shift", None)
            kw = dict(latent_shift=shift) if kind == "ionllama" and shift else {}
            path = getattr(self.args, "model_config", None)
            if kind == "ionllama" and path:  # a trained run's architecture (its config.json), random weights
                m = build_model(model_config_from(path, **kw)).to(self.device)
            else:
                m = create_model(self.args.size, model=kind, **kw).to(self.device)
            info = {"params": m.count_parameters()["total"]}
            if kind == "ionllama" and m.config.patching == "entropy":
                cal = self.text[: 32 * 1024].view(8, 4096).to(self.device)
                info.update(m.calibrate_threshold(cal))
            m = m.to(self.dtype).eval()
            self.models[kind] = (m, info)
        return self.models[kind]

    def prompts(self, B, ctx):
        return [self.text[(r * 7919) % 4096: (r * 7919) % 4096 + ctx].tolist() for r in range(B)]

    def session(self, kind, B, max_len, graphs=True, compile=False, policy="auto", label=""):
        """A decoder + runner reused across measurements: prefill is in place, so the captured
        graphs (and compiled code) stay valid; only the dense KV length depends on max_len."""
        m, _ = self.model(kind)
        fused = dict(fused_local_step=FUSED[self.args.fused_local_step],
                     fused_entropy_step=FUSED[self.args.fused_entropy_step],
                     fused_latent_step=FUSED[self.args.fused_latent_step]) if kind == "ionllama" else {}
        dec = decoder_for(m, B, max_len, **fused)
        seeds = torch.arange(B, device=self.device)
        logits = torch.zeros(B, 256, device=self.device, dtype=self.dtype)
        runner = DecodeRunner(dec, SamplingConfig(temperature=1.0), seeds, logits,
                              # every measure() of a session: run(8), then up to --new_bytes or --latency_bytes,
                              # then TIMED_BYTES (a runner never runs past its max_new: it decoded fewer bytes
                              # than a row claimed, and the row's bytes/s was too high by that ratio)
                              max(self.args.new_bytes, getattr(self.args, "latency_bytes", 0), 1024) + 16 + TIMED_BYTES,
                              cuda_graphs=graphs, compile=compile, latent_policy=policy,
                              compile_mode=self.args.compile_mode if compile else None,
                              entropy_branch=FUSED[getattr(self.args, "entropy_branch", "auto")] if kind == "ionllama" else False,
                              unroll=getattr(self.args, "unroll", 1) if graphs else 1,
                              host_schedule=FUSED[getattr(self.args, "host_schedule", "auto")]
                              if kind == "ionllama" else False,
                              overlap_latent=FUSED[getattr(self.args, "overlap_latent", "auto")]
                              if kind == "ionllama" else False)
        runner.ov_pairs = getattr(self.args, "overlap_pairs", "off") == "on"
        runner.set_overlap_priority(getattr(self.args, "overlap_priority", "bytes"))  # (only used with the overlap)
        return dict(kind=kind, B=B, dec=dec, runner=runner, graphs=graphs, compile=compile, max_len=max_len)

    @torch.no_grad()
    def measure(self, s, ctx, n_new, label="", policy=None):
        dec, runner, B = s["dec"], s["runner"], s["B"]
        assert ctx + n_new + 16 <= s["max_len"]
        if policy is not None:  # ("auto" as the runner resolves it: a runner left at "auto" skipped the lagged replay)
            runner.latent_policy = resolve_latent_policy(policy, B)
        rows = self.prompts(B, ctx)
        sync()
        t0 = time.perf_counter()
        logits = dec.prefill(rows)
        sync()
        t_prefill = time.perf_counter() - t0
        runner.reset(logits)
        t0 = time.perf_counter()
        runner.run(8)  # first use: warm-up iterations + capture (+ compilation)
        sync()
        t_setup = time.perf_counter() - t0
        patches0 = int(runner.patches_counted().sum()) if hasattr(dec, "n_complete") else None
        t0 = time.perf_counter()
        before = runner.n_done
        runner.run(n_new)
        sync()
        dt = time.perf_counter() - t0
        if n_new < 1 or runner.n_done - before != n_new:  # a row's rate is bytes it decoded over the time it took
            raise RuntimeError(f"measured {runner.n_done - before} decoded bytes, not the {n_new} the row would "
                               "claim; the session's runner holds too few (max_new)")
        row = dict(model=s["kind"], label=label + (", fused local step" if getattr(dec, "fused_local_step", False)
                                                   else "")
                   + (", fused entropy step" if getattr(dec, "fused_entropy_step", False) else "")
                   + (", fused latent step" if getattr(dec, "fused_latent_step", False) else "")
                   + (", fused head" if getattr(dec, "head_step", None) is not None else "")
                   + (", fused embedding" if getattr(dec, "embed_step", None) is not None else ""),
                   batch=B, context=ctx, new_bytes=n_new, graphs=runner.graphs is not None,
                   compile=s["compile"], latent_policy=runner.latent_policy if patches0 is not None else None,
                   bytes_per_s=B * n_new / dt, ms_per_byte=1000 * dt / n_new, prefill_s=t_prefill, setup_s=t_setup)
        if patches0 is not None:
            row["bytes_per_patch_decoded"] = B * n_new / max(1, int(runner.patches_counted().sum()) - patches0)
        if runner.graphs is not None and B == 1:  # where a byte's time goes: GPU time of the replays vs the rest
            room = s["max_len"] - (ctx + 8 + n_new) - 8  # the decoder's capacity left after this row
            row.update(replay_gpu_ms(runner, max(0, min(TIMED_BYTES, runner.max_new - runner.n_done, room))))
            if "gpu_ms_per_byte" in row:
                row["host_gap_ms_per_byte"] = row["ms_per_byte"] - row["gpu_ms_per_byte"]  # GPU idle per byte
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        write_results(self, self.args, self.checks)  # after every row: a killed run keeps what it measured
        return row

    def attempt(self, need_s, fn, *a, label="", **kw):
        if self.left() < need_s:
            print(f"skip {label}: {self.left():.0f}s left", flush=True)
            self.rows.append(dict(model=_model_name(a), label=label, skipped="time budget"))
            return None
        try:
            return fn(*a, label=label, **kw)
        except UserError:  # bad input is the user's to fix, not one configuration's failure
            raise
        except Exception as e:  # one failed configuration must not lose the others
            traceback.print_exc()
            self.rows.append(dict(model=_model_name(a), label=label,
                                  error=f"{type(e).__name__}: {str(e)[:200]}"))
            return None


def _model_name(args) -> str:
    """The model of an attempt's arguments: a model kind (session) or a session dict (measure)."""
    if not args:
        return ""
    return args[0]["kind"] if isinstance(args[0], dict) else str(args[0])



FUSED = {"auto": "auto", "on": True, "off": False}  # --fused_local_step -> decoder_for(fused_local_step=)

@torch.no_grad()
def correctness_checks(device, compile: bool, fused_local_step: bool = False, fused_entropy_step: bool = False,
                       fused_latent_step: bool = False) -> dict:
    """On the benchmark device: step-by-step logits vs the parallel forward (fp32, tiny ionLlama with
    entropy patching, GPU kernels in the forward), and graph replay / compiled steps vs eager; with
    fused_local_step, the fused IntegralLNN step (graphs, and compiled with --compile) vs the eager PyTorch step;
    with fused_entropy_step, the fused entropy-model step likewise (alone, and with the fused local step);
    with fused_latent_step, likewise the fused latent step."""
    from ionllama.generation import generate

    out = {}
    torch.manual_seed(0)
    m = create_model("tiny", d_model=64, n_layers=2, n_heads=2, d_local=64, n_enc_layers=1, n_dec_layers=2,
                     d_entropy=32, n_entropy_layers=2, entropy_headdim=16).to(device).eval()
    x = corpus_bytes(4096)[:3 * 300].view(3, 300).to(device)
    m.calibrate_threshold(x)
    from ionllama.generation.check import stepwise_vs_parallel

    # with a random entropy model most entropies sit near 8 bits, next to the calibrated threshold, so
    # kernel arithmetic can flip a boundary: the check also compares with the decoder's own boundaries
    res = stepwise_vs_parallel(m, x, prompt_len=20)
    out.update({f"stepwise_{k}": v for k, v in res.items()})
    prompts = [b"def main(", b"import torch\n", b"x"]
    ref = generate(m, prompts, 96, seed=1, cuda_graphs=False)
    if torch.device(device).type != "cuda":  # cuda_graphs=True runs eagerly off CUDA: eager against eager, always True
        out["graphs_equal_eager"] = None
    else:
        out["graphs_equal_eager"] = generate(m, prompts, 96, seed=1, cuda_graphs=True) == ref
    if compile:
        out["compiled_graphs_equal_eager"] = generate(m, prompts, 96, seed=1, cuda_graphs=True, compile=True) == ref
    if fused_local_step:
        out["fused_graphs_equal_eager"] = generate(m, prompts, 96, seed=1, cuda_graphs=True,
                                                   fused_local_step=True) == ref
        if compile:
            out["fused_compiled_graphs_equal_eager"] = generate(m, prompts, 96, seed=1, cuda_graphs=True, compile=True,
                                                                fused_local_step=True) == ref
    if fused_entropy_step:
        out["fused_entropy_graphs_equal_eager"] = generate(m, prompts, 96, seed=1, cuda_graphs=True,
                                                           fused_local_step=False, fused_entropy_step=True) == ref
        out["fused_both_graphs_equal_eager"] = generate(m, prompts, 96, seed=1, cuda_graphs=True,
                                                        fused_local_step=True, fused_entropy_step=True) == ref
        if compile:
            out["fused_entropy_compiled_graphs_equal_eager"] = generate(
                m, prompts, 96, seed=1, cuda_graphs=True, compile=True, fused_entropy_step=True) == ref
    if fused_latent_step:
        out["fused_latent_graphs_equal_eager"] = generate(m, prompts, 96, seed=1, cuda_graphs=True,
                                                          fused_latent_step=True) == ref
        if compile:
            out["fused_latent_compiled_graphs_equal_eager"] = generate(
                m, prompts, 96, seed=1, cuda_graphs=True, compile=True, fused_latent_step=True) == ref
    # fixed 4-byte patches: no entropy within rounding of a threshold (the model above has dozens of such bytes, so
    # a compiled kernel's rounding can flip a patch and every byte after it); one prompt: the overlapped latent
    # step uncompiled (overlap_latent, "auto" at batch <= 2 under graphs), three: the scheduled graphs; compiled,
    # the plain path without the overlap, and fixed_b1_compiled_overlap: the overlap under compile (its bytes
    # differed at one prompt while inductor's PDL was on, checks-s55/-s56)
    torch.manual_seed(0)
    mf = create_model("tiny", d_model=64, n_layers=2, n_heads=2, d_local=64, n_enc_layers=1, n_dec_layers=2,
                      patching="fixed").to(device).eval()
    for tag, p in (("", prompts), ("_b1", prompts[0])):
        ref_f = generate(mf, p, 96, seed=1, cuda_graphs=False)
        if torch.device(device).type == "cuda":
            out[f"fixed{tag}_graphs_equal_eager"] = generate(mf, p, 96, seed=1, cuda_graphs=True) == ref_f
            if compile:
                out[f"fixed{tag}_compiled_graphs_equal_eager"] = generate(mf, p, 96, seed=1, cuda_graphs=True,
                                                                          compile=True, overlap_latent=False) == ref_f
    if torch.device(device).type == "cuda" and compile:
        out["fixed_b1_compiled_overlap_graphs_equal_eager"] = torch.equal(
            _runner_bytes(mf, prompts[0], 96, cuda_graphs=True, compile=True, overlap_latent=True),
            _runner_bytes(mf, prompts[0], 96))
    print(json.dumps(out), flush=True)
    return out


def _runner_bytes(m, prompt: bytes, n: int, **kw) -> torch.Tensor:
    """n bytes sampled (seed 1) after one prompt by a DecodeRunner with options kw (generate() leaves overlap_latent
    at "auto")."""
    dec = decoder_for(m, 1, len(prompt) + n + 16)
    r = DecodeRunner(dec, SamplingConfig(temperature=1.0), torch.tensor([1]), dec.prefill([list(prompt)]), n, **kw)
    r.run(n)
    return r.out[0, :n].cpu()


def _gpu_cells(r) -> str:
    if "gpu_ms_per_byte" not in r:
        return " |"
    lat = r.get("gpu_ms_latent_graph")
    return (f"{r['gpu_ms_per_byte']:.3f} ({r['gpu_ms_byte_graph']:.3f}; {'-' if lat is None else f'{lat:.3f}'}) | "
            f"{r['host_gap_ms_per_byte']:.3f}")


def write_results(b, args, checks):
    # argv as given (main(argv) in tests, else sys.argv): where each number came from
    command = "python3 benchmarks/bench_generation.py " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
    env = dict(command=command, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, python=platform.python_version(), device=device_info(torch.device(args.device))["name"],
               dtype=args.dtype, size=args.size, threads=torch.get_num_threads(),
               compile_mode=args.compile_mode, inductor=args.inductor, fused_local_step=args.fused_local_step,
               fused_entropy_step=args.fused_entropy_step, fused_latent_step=args.fused_latent_step,
               entropy_branch=args.entropy_branch, latent_shift=args.latent_shift, unroll=args.unroll,
               host_schedule=getattr(args, "host_schedule", "auto"),
               overlap_latent=getattr(args, "overlap_latent", "auto"),
               overlap_pairs=getattr(args, "overlap_pairs", "off"),
               overlap_priority=getattr(args, "overlap_priority", "bytes"),
               kernel_config=getattr(args, "kernel_config", []),
               models={k: v[1] for k, v in b.models.items()}, checks=checks,
               commit=git_commit())  # BENCH_COMMIT-aware: the GPU machine's copy of .git is stale
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench_generation.json", json.dumps(dict(env=env, rows=b.rows), indent=1, default=str))
    lines = [f"command: `{command}`", "", f"env: {json.dumps(env, default=str)}", "",
             "| model | what | batch | context | graphs | compile | bytes/s | ms/byte | bytes/patch | prefill s | setup s "
             "| GPU ms/byte (byte graph; latent graph) | GPU idle ms/byte |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in b.rows:
        if "bytes_per_s" not in r:
            lines.append(f"| {r['model']} | {r['label']} | | | | | {r.get('error', r.get('skipped'))} | | | | | | |")
            continue
        bpp = r.get("bytes_per_patch_decoded")
        lines.append(f"| {r['model']} | {r['label']} | {r['batch']} | {r['context']} | {r['graphs']} | {r['compile']} | "
                     f"{r['bytes_per_s']:,.0f} | {r['ms_per_byte']:.3f} | {'' if bpp is None else f'{bpp:.2f}'} | "
                     f"{r['prefill_s']:.2f} | {r['setup_s']:.1f} | {_gpu_cells(r)} |")
    atomic_write(out / "bench_generation.md", "\n".join(lines) + "\n")
    return lines


def model_config_from(path: str, **overrides) -> ModelConfig:
    """The ionLlama architecture of a run's config.json (its "model_config"; or a bare ModelConfig dict), with
    overrides. Why: the Phase-1 quality pick (fixed 3-byte patches, an 8-layer latent, ...) is not a registry size,
    and its decode speed is a question of its own."""
    try:
        d = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--model_config {path}: cannot read it as JSON ({e}); give a run's config.json") from None
    if isinstance(d, dict):
        d = d.get("model_config", d)
    if not isinstance(d, dict):  # a list or a number: .get() was an AttributeError traceback
        raise UserError(f"--model_config {path}: is not a run's config.json (a JSON object); "
                        "give a run's config.json")
    if d.get("model") != "ionllama":
        raise UserError(f"--model_config {path}: model '{d.get('model')}' is not ionllama; give an ionllama run's config.json")
    return ModelConfig.from_dict({**d, **overrides})


def add_model_config_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model_config", default=None, metavar="CONFIG_JSON",
                    help="build the ionllama arm from a run's config.json (e.g. docs/results/phase1-patch3/"
                         "ionllama_fixed/config.json), random weights; --size then applies to the other models only")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    add_model_config_arg(ap)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--new_bytes", type=int, default=1024)
    ap.add_argument("--latency_bytes", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile'd steps (batch 1)")
    ap.add_argument("--models", nargs="+", default=["ionllama", "dense"], choices=["ionllama", "dense"])
    ap.add_argument("--compile_mode", default=None,
                    help="torch.compile mode for the compiled rows, e.g. max-autotune-no-cudagraphs (default: default)")
    ap.add_argument("--compiled_only", action="store_true",
                    help="with --compile: only the compiled batch-1 rows (for A/B runs of compiler settings)")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config settings for the compiled rows, e.g. combo_kernels=True")
    ap.add_argument("--fused_local_step", nargs="?", const="on", default="auto", choices=list(FUSED),
                    help="ionLlama's IntegralLNN local layers step through the fused Triton kernels "
                         "(ionllama/kernels/lnn_step_triton.py): on, off, or auto (the library's default: CUDA, "
                         "<= 32 rows); rows that used them are labelled ', fused local step'")
    ap.add_argument("--fused_entropy_step", nargs="?", const="on", default="auto", choices=list(FUSED),
                    help="ionLlama's entropy model (Mamba blocks + head) steps through the fused Triton kernels "
                         "(ionllama/kernels/ssm_step_triton.py): on, off, or auto (the library's default: CUDA, "
                         "<= 32 rows, entropy patching); rows that used them are labelled ', fused entropy step'")
    ap.add_argument("--fused_latent_step", nargs="?", const="on", default="auto", choices=list(FUSED),
                    help="ionLlama's latent blocks step through the fused Triton kernels "
                         "(ionllama/kernels/latent_step_triton.py): on, off, or auto (the library's default: CUDA, "
                         "<= 32 rows); rows that used them are labelled ', fused latent step'")
    ap.add_argument("--latent_shift", default=None, choices=LATENT_SHIFTS,
                    help="ionLlama's latent_shift (default: the model's, 'previous'); 'lagged' lets the runner overlap "
                         "the latent step with the next patch's bytes")
    ap.add_argument("--entropy_branch", nargs="?", const="on", default="auto", choices=list(FUSED),
                    help="ionLlama: the entropy model on a second CUDA stream beside the local layers, inside the byte "
                         "graph (DecodeRunner's entropy_branch): on, off, or auto (the library's default: CUDA, "
                         "batch <= 2, entropy patching, latent_shift other than 'completed')")
    ap.add_argument("--host_schedule", nargs="?", const="on", default="auto", choices=list(FUSED),
                    help="ionLlama with fixed patching: the host follows the patch boundaries and replays one graph per "
                         "byte, the latent stage inside it (DecodeRunner's host_schedule): on, off, or auto (the "
                         "library's default: on for fixed patching with the completed shift under CUDA graphs)")
    ap.add_argument("--overlap_latent", nargs="?", const="on", default="auto", choices=list(FUSED),
                    help="ionLlama, latent_shift 'previous' with fixed patching: the latent step on a second stream "
                         "beside the byte that closes a patch and the next byte's encoder (DecodeRunner's "
                         "overlap_latent): on, off, or auto (the library's default: on at batch <= 2 under graphs)")
    ap.add_argument("--overlap_priority", default="bytes", choices=["bytes", "latent"],
                    help="with overlap_latent, which replay stream gets the high priority (the runner's "
                         "set_overlap_priority): the bytes' (default) or the latent step's")
    ap.add_argument("--overlap_pairs", default="off", choices=["on", "off"],
                    help="with overlap_latent, a closing byte and the next one as one graph (DecodeRunner's ov_pairs)")
    ap.add_argument("--unroll", type=int, default=1,
                    help="bytes per CUDA graph launch (DecodeRunner's unroll: the latent stage of each byte a conditional "
                         "graph node, no host read between them); 1: one launch per byte")
    ap.add_argument("--kernel_config", nargs="*", default=[], metavar="KIND:KEY=VALUE",
                    help="launch settings of the fused Triton kernels before anything is built, e.g. "
                         "lnn:head_block_n=0 (the PyTorch decoder head), embed:enabled=0 (the PyTorch n-gram "
                         "embedding step in place of the kernel) or latent:attn_block_kv=32; KIND: lnn, latent, ssm, "
                         "scan, embed (their set_*_config keys)")
    ap.add_argument("--budget_s", type=float, default=280)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch default)")
    return ap


def inductor_settings(items) -> list:
    """--inductor KEY=VALUE items as (config object, attribute, value); a UserError naming the first bad item."""
    import torch._inductor.config as ind

    out = []
    for kv in items:
        key, eq, val = kv.partition("=")
        *parents, attr = key.split(".")
        target = ind
        for part in parents:
            target = getattr(target, part, None)
        if not eq or not key or target is None or not hasattr(target, attr):
            raise UserError(f"--inductor '{kv}': give KEY=VALUE with KEY a torch._inductor.config setting "
                            "(e.g. combo_kernels=True)")
        try:
            value = ast.literal_eval(val)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise UserError(f"--inductor '{kv}': the value '{val}' is not a Python literal; "
                            "give e.g. True, 4 or 'name'") from None
        out.append((target, attr, value))
    return out


def check_inputs(args) -> None:
    """Bad flags as one line before anything runs: a bad size or device used to fail every configuration one by
    one, each as a printed traceback, and the script still exited 0."""
    check_ranges(args, {"new_bytes": 1, "latency_bytes": 1, "batch": 1, "unroll": 1, "budget_s": 1, "threads": 0})
    if not args.compile:  # these only shape the compiled rows: without --compile they were silently dropped
        for flag, given in (("--compiled_only", args.compiled_only), ("--compile_mode", args.compile_mode is not None),
                            ("--inductor", bool(args.inductor))):
            if given:
                raise UserError(f"{flag} applies to the compiled rows only; add --compile (or drop {flag})")
    inductor_settings(args.inductor)  # a bad item is one line here, not a traceback after the checks ran
    parse_kernel_config(args.kernel_config)
    if min(args.contexts) < 1:
        raise UserError(f"--contexts must all be at least 1 (got {args.contexts})")
    for kind in args.models:
        model_config(args.size, kind)  # an unknown size is a UserError here
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"unknown --device '{args.device}'; use cuda, cuda:N or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded as the results' command
    check_inputs(args)
    with kernel_config_applied(args.kernel_config):  # an unknown key: one line before anything is written
        _main(args)


def _main(args):
    if args.model_config:
        model_config_from(args.model_config, **({"latent_shift": args.latent_shift} if args.latent_shift else {}))
    ready_out_dir(args.out)  # a file as --out failed at the first row's write, after the checks' minutes
    if args.threads:
        torch.set_num_threads(args.threads)
    # each compiled session may recompile DecodeRunner._iteration / advance_latent (another self); more than
    # dynamo's default 8 per code object would silently run the later sessions eagerly
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    for target, attr, value in inductor_settings(args.inductor):  # e.g. combo_kernels=True: fewer, fused kernels
        setattr(target, attr, value)
    b = Bench(args)
    try:
        checks = correctness_checks(b.device, args.compile, args.fused_local_step != "off" and b.device.type == "cuda",
                                    args.fused_entropy_step != "off" and b.device.type == "cuda",
                                    args.fused_latent_step != "off" and b.device.type == "cuda")
    except Exception as e:
        traceback.print_exc()
        checks = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    b.checks = checks
    n, nl, B, cmax = args.new_bytes, args.latency_bytes, args.batch, max(args.contexts)
    lat_len = max(cmax, 256) + max(n, nl) + 32 + TIMED_BYTES  # the b1 session also measures throughput at context 256

    def run_set(kind, compile):
        tag = ", compiled" if compile else ""
        s1 = b.attempt(100 if compile else 15, b.session, kind, 1, lat_len if kind == "ionllama" else 256 + n + 32 + TIMED_BYTES,
                       compile=compile, label=f"{kind} b1 session{tag}")
        if s1 is not None:
            b.attempt(100 if compile else 10, b.measure, s1, 256, n, label=f"throughput b1{tag}")
            if kind == "ionllama":
                b.attempt(10, b.measure, s1, 256, n, policy="always", label=f"throughput b1, latent every byte{tag}")
                for ctx in args.contexts:
                    b.attempt(15, b.measure, s1, ctx, nl, policy="auto", label=f"latency{tag}")
            del s1
        if kind == "ionllama":  # the byte stage as two graphs, the patch flag read between them
            se = b.attempt(100 if compile else 15, b.session, kind, 1, lat_len, compile=compile, policy="early",
                           label=f"ionllama b1 early-flag session{tag}")
            if se is not None:
                b.attempt(100 if compile else 10, b.measure, se, 256, n, label=f"throughput b1, early flag{tag}")
                for ctx in args.contexts:
                    b.attempt(15, b.measure, se, ctx, nl, label=f"latency, early flag{tag}")
            del se
        if compile:  # compiled: batch-1 sessions only (each compile costs tens of seconds)
            return
        if kind == "dense":  # the dense step attends over its whole static cache: one session per context
            for ctx in args.contexts:
                sc = b.attempt(100 if compile else 15, b.session, kind, 1, ctx + nl + 32 + TIMED_BYTES, compile=compile,
                               label=f"dense latency session {ctx}{tag}")
                if sc is not None:
                    b.attempt(100 if compile else 10, b.measure, sc, ctx, nl, label=f"latency{tag}")
                del sc
        sB = b.attempt(100 if compile else 15, b.session, kind, B, 256 + n + 32, compile=compile,
                       label=f"{kind} b{B} session{tag}")
        if sB is not None:
            b.attempt(100 if compile else 10, b.measure, sB, 256, max(1, n // 2), label=f"throughput b{B}{tag}")
        del sB
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    kinds = args.models
    for kind in ([] if args.compiled_only and args.compile else kinds):
        run_set(kind, False)
    for kind in ([] if args.compiled_only and args.compile else kinds):
        se = b.attempt(10, b.session, kind, 1, 256 + 96, graphs=False, label="eager session")
        if se is not None:
            b.attempt(10, b.measure, se, 256, 64, label="throughput b1, eager (no graphs)")
    if args.compile:
        for kind in kinds:
            run_set(kind, True)
    print("\n".join(write_results(b, args, checks)))
    failed = [r["label"] for r in b.rows if "error" in r] + (["correctness checks"] if "error" in checks else [])
    if not any("bytes_per_s" in r for r in b.rows):  # all skipped by the budget: an empty table is no result
        print(f"error: no configuration measured in --budget_s {args.budget_s:g} "
              f"({sum('skipped' in r for r in b.rows)} skipped); raise --budget_s", file=sys.stderr)
        sys.exit(1)
    if failed:  # the results are written; the exit status still says that not everything ran
        print(f"error: {len(failed)} configuration(s) failed ({', '.join(failed[:4])}); see their tracebacks above",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
