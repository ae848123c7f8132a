"""The benchmark suite: every metric on a checkpoint of any registered model.

    python benchmark.py --size small --checkpoint checkpoints/best.pt --output results.json
    ionllama bench --checkpoint runs/x/best.pt --eval_data ../shared/data/gutenberg/gutenberg-val.jsonl.xz

Writes results.json (versioned schema, docs/results/README.md), results.md and PNG plots next to it.
Sections (each can be skipped with --skip): lm, tasks, speed (with memory), compression, multilingual, plots.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..data import tasks as T
from ..devices import resolve_device
from ..errors import SEED_MAX, OneLineParser, UserError, check_ranges, cli_entry
from ..fsutil import atomic_write, probe_write
from ..registry import create_model
from ..train.metrics import metrics_file
from . import lm as lm_mod
from . import plots as P
from .loading import LoadedCheckpoint, default_eval_path, load_checkpoint, read_eval_bytes
from .multilingual import get_bpe, run_multilingual
from .report import DEFAULT_PUBLISHED, SCHEMA_VERSION, load_published, load_results, render_markdown
from .speed import peak_rss_mb, run_speed
from .task_eval import OUTPUTS_FILE, run_tasks, write_outputs

SECTIONS = ("lm", "tasks", "speed", "compression", "multilingual", "plots")
# parallel UDHR text first, then the other language/code samples; each used when present
DEFAULT_MULTILINGUAL = (Path("../shared/data/multilingual/udhr"), Path("../shared/data/multilingual"))
NO_MULTILINGUAL = "no --multilingual_dir and no " + " or ".join(map(str, DEFAULT_MULTILINGUAL))  # (a skip's reason)
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_multilingual_dirs() -> list[Path]:
    """DEFAULT_MULTILINGUAL from the working folder, else from the checkout's: run from another folder, the
    benchmark skipped the section although the data sat beside the checkout."""
    for base in (Path("."), REPO_ROOT):
        dirs = [base / d for d in DEFAULT_MULTILINGUAL if (base / d).is_dir()]
        if dirs:
            return dirs
    return []


def build_parser(prog: str = "ionllama bench") -> argparse.ArgumentParser:
    ap = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None,
                    help="a .pt written by the trainer, its .safetensors export or a torchrun run's .dcp folder (any "
                         "registered model)")
    ap.add_argument("--size", default=None, help="model size; without --checkpoint a random-init model of this "
                    "size is measured (speed/memory), with one it must match the checkpoint")
    ap.add_argument("--model", default="ionllama", help="model name for a random-init run (no --checkpoint)")
    ap.add_argument("--init_seed", type=int, default=0, help="torch seed of a random-init run's weights (no "
                    "--checkpoint): the same command scores the same model")
    ap.add_argument("--output", default="results.json", help="results.json path; results.md and plots go next to it")
    ap.add_argument("--eval_data", default=None, help="text / jsonl(.gz/.xz) / directory / prepared .bin; default: "
                    "the val split of the checkpoint's training data")
    ap.add_argument("--text_field", default="text", help="jsonl field holding the text")
    ap.add_argument("--max_eval_bytes", type=int, default=None,
                    help="score the first N >= 2 bytes of the eval data, as the trainer's --eval_bytes N does (N + 1 "
                         "bytes are read: the first is context only); the compression, speed and fallback-tokenizer "
                         "sections read the same bytes (default: the whole val split)")
    ap.add_argument("--multilingual_dir", action="append", default=None,
                    help="folder with one file per language (repeatable); default: "
                    + " and ".join(str(d) for d in DEFAULT_MULTILINGUAL) + ", those present")
    ap.add_argument("--max_lang_bytes", type=int, default=65536, help="bytes read per language file")
    ap.add_argument("--n_tasks", type=int, default=100, help="examples per task (and per digit count)")
    ap.add_argument("--max_digits", type=int, default=4, help="arithmetic operand digit counts 1..N")
    ap.add_argument("--task_shots", type=int, default=0, help="solved train examples before each question")
    ap.add_argument("--task_seed", type=int, default=1234)
    ap.add_argument("--task_split", default="test", choices=("val", "test"),
                    help="held-out split the task examples come from (select on val, report on test)")
    ap.add_argument("--seq_len", type=int, default=None, help="eval window (default: the checkpoint's training "
                    "seq_len, else 1024)")
    ap.add_argument("--batch_size", type=int, default=None, help="eval / throughput batch (default: training's, else 8)")
    ap.add_argument("--gen_batch", type=int, default=32, help="prompts per generate() call in the task eval")
    ap.add_argument("--gen_bytes", type=int, default=256, help="bytes generated for the generation speed test")
    ap.add_argument("--speed_iters", type=int, default=5)
    ap.add_argument("--compression_bytes", type=int, default=262144, help="bytes used for the patch histogram")
    ap.add_argument("--bpe_vocab", type=int, default=4096, help="vocab of the fallback BPE for token counts")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                    help="autocast dtype; auto = bf16 on CUDA, none on CPU")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an --output whose results hold sections this run skips (refused otherwise)")
    ap.add_argument("--runs", nargs="*", default=[], help="more run dirs for the training-curve plot")
    ap.add_argument("--baselines", nargs="*", default=[], help="results.json of other measured models for the table")
    ap.add_argument("--published", default=str(DEFAULT_PUBLISHED), help="published figures with citations")
    return ap


def _amp(name: str, device: torch.device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[name]


def device_name(device: torch.device | str | None = None) -> str:
    """What ran a measurement, for its record: the GPU's name for a cuda device, else the CPU's model name and
    torch's thread count (a bare "cpu" said nothing about which machine). None: cuda where there is one."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine() or dev.type
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({name}, {torch.get_num_threads()} threads)" if dev.type == "cpu" else f"{dev.type} ({name})"


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "name": device_name(device)}
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    else:
        info["threads"] = torch.get_num_threads()
    return info


def git_commit() -> dict:
    """HEAD of the checkout; BENCH_COMMIT overrides it (the GPU machine gets a copy of the tree without .git)."""
    if os.environ.get("BENCH_COMMIT"):
        return {"sha": os.environ["BENCH_COMMIT"], "source": "BENCH_COMMIT"}

    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        # the checkout's own HEAD only: an installed copy (site-packages in a venv inside some other repository)
        # recorded that repository's commit as the code's
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO_ROOT.resolve():
            return {"sha": "unknown"}
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"sha": "unknown"}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown"}


def _clean(o):
    """JSON-safe: NaN/inf -> None, numpy/torch scalars -> Python numbers, paths -> str."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return _clean(o.item())
    if isinstance(o, Path):
        return str(o)
    return o


def _fallback_text() -> np.ndarray:
    """Real text present on every machine (the stdlib's os.py), for speed runs without eval data."""
    return np.frombuffer(Path(os.__file__).read_bytes(), dtype=np.uint8).copy()


@torch.no_grad()
def _entropy_sample(model, data: np.ndarray, device, out_path: Path, n_bytes: int = 256) -> Path | None:
    """Per-byte entropy and patch boundaries on the start of the first document; None for models without."""
    raw = bytes(data[: 4 * n_bytes])
    doc = max(raw.split(bytes([T.DOC_SEP])), key=len)[:n_bytes] or raw[:n_bytes]
    x = torch.tensor([list(doc)], dtype=torch.long, device=device)
    out = model(x)
    ent, b2p = out.get("entropy"), out.get("byte_to_patch")
    if ent is None or b2p is None:
        return None
    th = getattr(model, "entropy_threshold", None)
    th = float(th) if th is not None and getattr(model.config, "patching", "") == "entropy" else None
    return P.plot_entropy_sample(doc, ent[0].float().cpu().tolist(), b2p[0].cpu().tolist(), out_path, threshold=th)


def _model_info(model, config, size_flag: str | None) -> dict:
    counts = model.count_parameters() if hasattr(model, "count_parameters") else {
        "total": sum(p.numel() for p in model.parameters())}
    return {"name": config.model, "size": config.size, "params_total": int(counts.get("total", 0)),
            "params": {k: int(v) for k, v in counts.items()}, "size_flag": size_flag}


# the least value of each numeric flag (a zero used to end in a ZeroDivisionError or an empty median, a negative
# count was taken silently)
BENCH_AT_LEAST = {"max_eval_bytes": 2, "max_lang_bytes": 1, "n_tasks": 1, "max_digits": 1, "task_shots": 0,
                  "seq_len": 2, "batch_size": 1, "gen_batch": 1, "gen_bytes": 1, "speed_iters": 1,
                  "compression_bytes": 1, "bpe_vocab": 257, "task_seed": 0, "init_seed": 0}
# the task generator draws operands as 64-bit integers: 19 digits overflow them (a numpy traceback after the LM eval)
MAX_DIGITS = 18


def _check_output(out: Path, skip: set[str], overwrite: bool, why: str = "--skip") -> None:
    """Before any work: the folder --output goes in must be creatable, and an earlier results.json is not
    replaced by one with fewer sections (a run with --skip lm tasks wrote over a full run's file, a new user's
    report) unless --overwrite says so."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot create '{out.parent}' ({parent} is not a writable folder); pass a writable --output")
    if overwrite:
        return
    md = out.with_suffix(".md")  # written beside it: a user's own notes of that name were replaced without a word
    if md.is_file() and md.read_text(encoding="utf-8", errors="replace").strip() and \
            not md.read_text(encoding="utf-8", errors="replace").startswith("# Benchmark:"):
        raise UserError(f"{md} is not a report of `ionllama bench` (a file of yours?) and this run would write its "
                        "report there; pass another --output, or --overwrite to replace it")
    if not out.is_file():
        return
    try:
        data = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or (data and "schema_version" not in data):
        raise UserError(f"--output {out} is not a results file of `ionllama bench` (a file of yours?); pass another "
                        "--output, or --overwrite to replace it")
    old = data.get("metrics") or {}
    lost = sorted(set(old) & skip)
    if lost:
        raise UserError(f"--output {out} holds {', '.join(lost)} results that this run skips ({why}); pass another "
                        "--output, or --overwrite to replace them")


def _check_output_path(output: str) -> None:
    """Before any work: an --output that cannot take the results (under /proc, an empty name) was a traceback after
    the whole benchmark had run, and /dev/null wrote a stray /dev/null.md."""
    if not output.strip():
        raise UserError("--output is empty; pass a file path such as results.json")
    out = Path(output)
    if out.suffix.lower() == ".md":  # its .md is the same file: the JSON (hashes, settings) was overwritten by it
        raise UserError(f"--output {output} names the JSON results, and the Markdown report is written beside it "
                        f"as .md; pass {out.with_suffix('.json')}")
    if out.is_dir():
        raise UserError(f"--output {output} is a directory; pass a file path such as {out / 'results.json'}")
    if out.exists() and not out.is_file():
        raise UserError(f"--output {output} is not a regular file (a device or a pipe); pass a file path such as "
                        "results.json (its .md is written beside it)")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders still to make are made later, when there is something to write
    if folder.is_dir():
        try:
            probe_write(folder)
        except OSError as e:
            raise UserError(f"cannot write results under {folder} ({e.strerror or e}); pass a writable --output") \
                from None


def run(argv: list[str], prog: str) -> dict:
    ap = build_parser(prog)
    default_model = ap.get_default("model")
    ap.set_defaults(model=None)  # None: --model not given; one given with a checkpoint must be the checkpoint's
    a = ap.parse_args(argv)
    check_ranges(a, BENCH_AT_LEAST)
    if a.init_seed > SEED_MAX:
        raise UserError(f"--init_seed must be 0 to 2**32-1 (got {a.init_seed}); pass a smaller seed")
    if a.max_digits > MAX_DIGITS:
        raise UserError(f"--max_digits {a.max_digits} is more than the task generator's {MAX_DIGITS} (its operands are "
                        f"64-bit integers); pass --max_digits {MAX_DIGITS} or fewer")
    _check_output_path(a.output)
    _check_output(Path(a.output), set(a.skip), a.overwrite)
    # checked here, not where they are used: a typo used to fail only after the whole LM and task eval had run
    for d in (a.multilingual_dir or []) if "multilingual" not in a.skip else []:
        if not Path(d).is_dir():
            raise UserError(f"--multilingual_dir '{d}' is not a directory; pass a folder with one file per language")
    for r in a.runs if "plots" not in a.skip else []:
        if metrics_file(r) is None:
            raise UserError(f"no metrics.jsonl at '{r}'; pass a run directory written by `ionllama train`")
    t_start = time.perf_counter()
    device = resolve_device(a.device)  # the one set of device names and messages (train, generate, bench)
    amp = _amp(a.amp, device)
    skip = set(a.skip)

    ck: LoadedCheckpoint | None = None
    if a.checkpoint:
        ck = load_checkpoint(a.checkpoint, device)
        model, config = ck.model, ck.config
        if a.model is not None and a.model != config.model:  # the checkpoint's model was scored, silently
            raise UserError(f"--model {a.model} but the checkpoint holds a '{config.size}' {config.model} model; "
                            "drop --model or pass the matching one")
        if a.size and a.size != config.size:
            raise UserError(f"--size {a.size} but the checkpoint holds a '{config.size}' {config.model} model; "
                            "drop --size or pass the matching one")
        if ck.untrained_main_model:  # its BPB and tasks measure an initialisation, not the method
            print(f"note: {a.checkpoint} was written in phase 1 (step {ck.step}): only the entropy model has trained, "
                  "the main model is at its initialisation; benchmark a checkpoint of the main phase", file=sys.stderr)
    else:
        if (a.model or default_model) == "bpe":  # its tokenizer is trained with the model: none exists without one
            raise UserError("--model bpe needs --checkpoint: a BPE model is scored with the tokenizer trained with it; "
                            "pass the checkpoint of an `ionllama train --model bpe` run")
        torch.manual_seed(a.init_seed)  # unseeded, each run scored another random model (BPB 8.09, then 8.03)
        model = create_model(a.size or "tiny", model=a.model or default_model).to(device).eval()
        config = model.config
    targs = ck.train_args if ck else {}
    seq_len = a.seq_len or int(targs.get("seq_len") or 1024)
    batch_size = a.batch_size or int(targs.get("batch_size") or 8)

    if seq_len < 2 or batch_size < 1:
        raise UserError(f"--seq_len must be >= 2 and --batch_size >= 1 (got {seq_len}, {batch_size})")

    out_path = Path(a.output)
    stem = out_path.with_suffix("")
    published = load_published(a.published or None)
    baselines = [load_results(p) for p in a.baselines]

    # eval bytes: needed by lm and compression; speed and the plots use them when they are there
    metrics: dict = {}
    skipped: dict = {s: "--skip" for s in sorted(skip)}
    timings: dict = {}
    data, data_path = None, None
    tasks_only = bool(ck and ck.train_args.get("dataset") == "tasks" and not ck.train_args.get("data_path"))
    if not a.eval_data and tasks_only and not {"lm", "compression"} <= skip:
        # trained on generated task data only: there is no val text to default to
        for s in ("lm", "compression"):
            if s not in skip:
                skip.add(s)
                skipped[s] = "the checkpoint was trained on --dataset tasks only; pass --eval_data PATH for text BPB"
    auto = {k: v for k, v in skipped.items() if v != "--skip"}
    if "multilingual" not in skip and not a.multilingual_dir and not default_multilingual_dirs():
        auto["multilingual"] = NO_MULTILINGUAL
    if auto:  # sections this checkpoint skips by itself: an earlier results file's must not vanish either
        _check_output(out_path, set(auto), a.overwrite, why="for this checkpoint: " + "; ".join(sorted(set(
            auto.values()))))
    if a.eval_data or not {"lm", "compression"} <= skip:
        data_path = Path(a.eval_data) if a.eval_data else default_eval_path(ck)
        # N scored bytes need N + 1 (the trainer's --eval_bytes N scores N): a third party's rerun of a trainer's
        # capped val BPB came out one byte short and a little different
        # a token model reads on past them: its tokens there must be those of the whole text (lm.TOKEN_CUT_MARGIN)
        margin = lm_mod.TOKEN_CUT_MARGIN if lm_mod.is_token_model(model) else 0
        lm_data = read_eval_bytes(data_path, None if a.max_eval_bytes is None else a.max_eval_bytes + 1 + margin,
                                  a.text_field)
        data = lm_data if a.max_eval_bytes is None else lm_data[:a.max_eval_bytes + 1]  # every other section's
    sample_data = data if data is not None else _fallback_text()

    if "lm" not in skip:
        if ck and not targs.get("seq_len") and not a.seq_len:  # the same weights scored ~0.01 apart from final.pt
            print(f"note: {a.checkpoint} records no training window (a .safetensors export); scoring in {seq_len}-"
                  "byte windows: pass --seq_len to match the window it trained with", file=sys.stderr)
        t0 = time.perf_counter()
        r = lm_mod.run_lm(model, lm_data, seq_len, batch_size, device, max_bytes=a.max_eval_bytes, amp_dtype=amp)
        if r.get("bpb") is None or not math.isfinite(r["bpb"]):  # written as null; said here, where the user looks
            print(f"note: the loss is not finite (BPB {r.get('bpb')}): the weights hold NaN or inf, e.g. a diverged "
                  "run; benchmark an earlier checkpoint", file=sys.stderr)
        # what a rerun must score to compare: the folder it ran in does not travel with the numbers, the hash does
        metrics["lm"] = {"data": str(data_path), "data_abs": str(data_path.resolve()),
                         "data_sha256": hashlib.sha256(data.tobytes()).hexdigest(),
                         "data_sha256_of": "the byte stream read for scoring (documents joined, capped at "
                                           "max_eval_bytes + 1), not the file",
                         "max_eval_bytes": a.max_eval_bytes, **r}
        timings["lm"] = time.perf_counter() - t0

    task_outputs, outputs_path = None, Path(f"{stem}_{OUTPUTS_FILE}")
    if "tasks" not in skip:
        t0 = time.perf_counter()
        metrics["tasks"] = run_tasks(model, device, n=a.n_tasks, max_digits=a.max_digits, seed=a.task_seed,
                                     shots=a.task_shots, trained_on_tasks=bool(ck and ck.trained_on_tasks),
                                     split=a.task_split,
                                     batch_size=a.gen_batch, amp_dtype=amp, keep_outputs=True)
        task_outputs = metrics["tasks"].pop("outputs")  # written beside results.json with it, below
        timings["tasks"] = time.perf_counter() - t0

    if "speed" not in skip:
        t0 = time.perf_counter()
        sm = run_speed(model, sample_data, device, seq_len, batch_size, amp_dtype=amp, iters=a.speed_iters,
                       gen_bytes=a.gen_bytes)
        metrics.update(sm)
        timings["speed"] = time.perf_counter() - t0
    else:
        metrics["memory"] = ({"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                              "kind": "cuda max_memory_allocated over the run"} if device.type == "cuda" else
                             {"peak_rss_mb": peak_rss_mb(), "kind": "process peak RSS over the run"})

    if "compression" not in skip:
        t0 = time.perf_counter()
        metrics["compression"] = lm_mod.patch_statistics(model, data, seq_len, batch_size, device,
                                                         max_bytes=a.compression_bytes, amp_dtype=amp)
        timings["compression"] = time.perf_counter() - t0

    if "multilingual" not in skip:
        dirs = [Path(d) for d in a.multilingual_dir] if a.multilingual_dir else default_multilingual_dirs()
        if dirs:
            t0 = time.perf_counter()
            bpe, bpe_info = get_bpe(ck.path if ck else None, data, a.bpe_vocab, model=model)
            ml = run_multilingual(model, dirs, seq_len, batch_size, device, amp_dtype=amp,
                                  max_lang_bytes=a.max_lang_bytes, bpe=bpe)
            ml["bpe"] = bpe_info
            metrics["multilingual"] = ml
            timings["multilingual"] = time.perf_counter() - t0
        else:
            skipped["multilingual"] = NO_MULTILINGUAL

    try:  # made only now: a run refused on its inputs leaves no empty folder (writability was checked at the start)
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create '{out_path.parent}' ({e.strerror}); pass a writable --output") from None
    plots: dict = {}
    if "plots" not in skip:
        t0 = time.perf_counter()
        runs = ([ck.run_dir] if ck and (ck.run_dir / "metrics.jsonl").is_file() else []) + [Path(r) for r in a.runs]
        if runs:
            try:  # a plot must not cost the results of the whole run: its reason goes with the other skips
                plots["training_curves"] = P.plot_runs([(r.name, r) for r in runs], f"{stem}_curves.png")
            except UserError as e:
                skipped["plot training_curves"] = str(e)
        else:
            skipped["plot training_curves"] = "no metrics.jsonl next to the checkpoint and no --runs"
        if metrics.get("multilingual"):
            plots["bpb_per_language"] = P.plot_language_bpb(metrics["multilingual"], f"{stem}_languages.png")
        if metrics.get("compression"):
            plots["patch_sizes"] = P.plot_patch_histogram(metrics["compression"], f"{stem}_patches.png")
        ent = _entropy_sample(model, sample_data, device, Path(f"{stem}_entropy.png"))
        if ent is not None:
            plots["entropy_sample"] = ent
        else:
            skipped["plot entropy_sample"] = f"model '{config.model}' returns no entropy/byte_to_patch"
        timings["plots"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    res = {
        "schema_version": SCHEMA_VERSION,
        "model": _model_info(model, config, a.size),
        "checkpoint": ({"path": str(ck.path), "path_abs": str(ck.path.resolve()), "sha256": _file_sha256(ck.path),
                        "step": ck.step, "phase": ck.phase,
                        "trained_on_tasks": ck.trained_on_tasks,
                        "train_args": ck.train_args} if ck else None),
        "config": config.to_dict(),
        "device": device_info(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": shlex.join(prog.split() + list(argv)),
        "settings": {"seq_len": seq_len, "batch_size": batch_size, "amp": str(amp).replace("torch.", "") if amp else
                     "none", "n_tasks": a.n_tasks, "max_digits": a.max_digits, "task_shots": a.task_shots,
                     "task_seed": a.task_seed, "task_split": a.task_split, "max_eval_bytes": a.max_eval_bytes,
                     "init_seed": None if a.checkpoint else a.init_seed},
        "metrics": metrics,
        "skipped": skipped,
        "timings_s": timings,
        "files": {"results_json": out_path.name, "markdown": out_path.with_suffix(".md").name,
                  "plots": {k: Path(v).name for k, v in plots.items()},
                  **({"task_outputs": outputs_path.name} if task_outputs is not None else {})},
    }
    res = _clean(res)
    md = render_markdown(res, baselines=baselines, published=published, plots=plots)
    # atomic: --output may hold earlier results this run merged (see _check_output); a full disk or ^C while
    # writing must not leave them truncated
    try:
        if task_outputs is not None:  # every scored example (results.json keeps a few): scripts/task_errors.py
            write_outputs(outputs_path, task_outputs)
        atomic_write(out_path, json.dumps(res, indent=2) + "\n")
        atomic_write(out_path.with_suffix(".md"), md)
    except OSError as e:
        raise UserError(f"could not write the results to {out_path} ({e.strerror or e}); an earlier file there is "
                        "kept as it was: free space or pass another --output, and run again") from None
    return res


def _file_sha256(path) -> str | None:
    """The checkpoint's hash (a .dcp folder: its train state's), so results name the exact weights they scored."""
    from ..data.shards import file_sha256
    from ..train.distributed import TRAIN_STATE_FILE

    p = Path(path)
    if p.is_dir():
        p = p / TRAIN_STATE_FILE
    return file_sha256(p) if p.is_file() else None


@cli_entry
def main(argv: list[str] | None = None, prog: str = "ionllama bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    res = run(argv, prog)
    m = res["metrics"]
    line = [f"wrote {res['files']['results_json']} and {res['files']['markdown']}"]
    if m.get("lm"):
        bpb = m["lm"].get("bpb")
        line.append("BPB not finite" if bpb is None else f"BPB {bpb:.4f}")
    if m.get("tasks"):
        accs = {k: v["accuracy"] for k, v in m["tasks"]["per_task"].items()}
        line.append(m["tasks"]["label"] + " " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items() if v is not None))
    print("; ".join(line))
    for section, why in (res.get("skipped") or {}).items():  # in results.md too; said here, where the user looks
        print(f"skipped {section}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
