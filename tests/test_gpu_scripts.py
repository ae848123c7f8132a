"""The device scripts (scripts/*.sh) before they cost GPU time: every script parses (bash -n), and every
command gpu_decode_levers.sh would run is accepted by the parser of the program it calls. A flag typo found
on the GPU machine costs a whole call of a 30-minute allotment; here it costs a second. The script runs with a
stand-in `python3` on PATH that records its arguments and exits 0."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch

from ionllama.errors import UserError
from ionllama.kernels import selfcheck

REPO = pathlib.Path(__file__).resolve().parents[1]
SEP = "\x1f"


def _load(name: str, folder: str = "benchmarks"):
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.sh")))
def test_script_parses(script):
    r = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _run_script(tmp_path, script: str, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run scripts/<script> with a python3 that only records its argv (one line per call)."""
    bin_dir, out, log = tmp_path / "bin", tmp_path / "out", tmp_path / "calls.txt"
    bin_dir.mkdir()
    out.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s{SEP}" "$a"; done >> "{log}"\necho >> "{log}"\n')
    stub.chmod(0o755)
    r = subprocess.run(["bash", str(REPO / "scripts" / script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), **env})
    calls = [line.rstrip("\n").split(SEP)[:-1] for line in log.read_text().splitlines()] if log.exists() else []
    return r, calls


def _levers(tmp_path, steps: str, **env):
    return _run_script(tmp_path, "gpu_decode_levers.sh", STEPS=steps, **env)


def test_train8k_arms_come_from_the_environment(tmp_path):
    """TRAIN8K_ARMS replaces the train8k step's arms (a list, word-split), each one a model ionllama builds."""
    from ionllama import create_model
    arms = "ionllama ionllama:n_dec_layers=2 ionllama:attention=dense"
    r, calls = _levers(tmp_path, "train8k", TRAIN8K_ARMS=arms)
    assert r.returncode == 0, r.stderr
    (argv,) = calls
    got = argv[argv.index("--arms") + 1:argv.index("--compile")]
    assert got == arms.split()
    train = _load("bench_train_throughput")
    for arm in got[1:]:  # the overrides as bench_train_throughput passes them
        create_model("tiny", model="ionllama", **train.parse_arm(arm)[1])


def test_train_throughput_arm_overrides_are_typed():
    """A float override (dropout=0.1) reaches the model as a float: as a string it crashed the model's build."""
    from ionllama import create_model
    train = _load("bench_train_throughput")
    kind, over = train.parse_arm("ionllama:attention=dense,dropout=0.1,n_layers=3,fixed_patch_size=3")
    assert kind == "ionllama" and over == {"attention": "dense", "dropout": 0.1, "n_layers": 3, "fixed_patch_size": 3}
    assert isinstance(over["n_layers"], int) and isinstance(over["dropout"], float)
    assert train.parse_arm("dense") == ("dense", {})
    m = create_model("tiny", model="ionllama", patching="fixed", **over)
    assert m.config.dropout == 0.1 and m.config.n_layers == 3
    with pytest.raises(UserError, match="not key=value"):
        train.parse_arm("ionllama:dropout")


def test_benchmark_bad_flags_run_as_a_script_are_one_line_exit_2(tmp_path):
    """The table below calls each script's main() in-process; this runs two of them as the device does (`python
    benchmarks/<script>.py`: its own sys.path set-up, cli_entry at the top). Found by the twenty-eighth session's
    CLI audit: --warmup 0 ended in an UnboundLocalError after the model was built; bench_generation printed one
    traceback per configuration for a bad size and exited 0."""
    for script, argv, says in (("bench_train_throughput", ["--sizes", "tiny", "--arms", "dense", "--warmup", "0"],
                                "--warmup must be at least 1"),
                               ("bench_generation", ["--size", "huge", "--device", "cpu"], "unknown size 'huge'")):
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *argv, "--out",
                            str(tmp_path / "o.json")], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO), "OUT": str(tmp_path)})
        assert r.returncode == 2, r.stderr[-2000:]
        assert says in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "o.json").exists()


# (folder, script, argv, words the one error line holds); {tmp} is the test's folder, holding text.txt (plain text)
# and text.jsonl (plain text under a JSONL name)
SCRIPT_BAD_INPUT = [
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "dense", "--batch_size", "0"],
     "--batch_size must be at"),
    # an unreadable or too short --text_path: a traceback before, and a short file silently became random bytes
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "ionllama", "--device", "cpu", "--steps",
                                              "1", "--seq_len", "128", "--text_path", "{tmp}/none.bin"],
     "cannot read it"),
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "ionllama", "--device", "cpu", "--steps",
                                              "1", "--seq_len", "128", "--text_path", "{tmp}/text.txt"],
     "too few for one 128-byte window"),
    # a bad --arms item, even the last one, stops the script before the first arm is built
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "dense", "ionllama:dropout", "--device",
                                              "cpu", "--steps", "1"], "not key=value"),
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "dense", "ionllama:dropuot=0.1",
                                              "--device", "cpu", "--steps", "1"], "unknown model option"),
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "dense", "ionlama", "--device", "cpu",
                                              "--steps", "1"], "unknown model 'ionlama'"),
    ("benchmarks", "bench_generation", ["--device", "foo", "--out", "{tmp}/o.json"], "unknown --device 'foo'"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--batch", "0", "--out", "{tmp}/o.json"],
     "--batch must be at least 1"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--contexts", "-5", "--out", "{tmp}/o.json"],
     "--contexts must all be at least 1"),
    ("benchmarks", "bench_attention", ["--out", "{tmp}/o.json", "--device", "cuda"], "no CUDA GPU is visible"),
    ("benchmarks", "bench_attention", ["--out", "{tmp}/o.json", "--device", "cpu", "--head-dim", "8"],
     "the Triton kernel takes head dims 16 to 128"),  # the reference was timed as "triton"
    ("benchmarks", "bench_attention", ["--out", "{tmp}/o.json", "--device", "cpu", "--sizes", "1024,0"],
     "--sizes '1024,0': give comma-separated N"),
    ("benchmarks", "bench_attention", ["--out", "{tmp}/o.json", "--device", "cpu", "--head-dim", "0"],
     "--head-dim must be at least 1"),
    ("benchmarks", "bench_attention", ["--out", "{tmp}/o.json", "--device", "cpu", "--variants", "0,2"],
     "--variants '2': a prefetch setting is 0 (none) or 1"),  # deeper prefetch was measured and removed (s60)
    ("benchmarks", "bench_scan", ["--out", "{tmp}/o.json", "--device", "cuda"], "no CUDA GPU is visible"),
    ("benchmarks", "bench_scan", ["--out", "{tmp}/o.json", "--device", "cpu", "--shapes", "16x0"],
     "--shapes '16x0': give comma-separated BxD"),
    ("benchmarks", "bench_scan", ["--out", "{tmp}/o.json", "--device", "cpu", "--dtypes", "fp16"],
     "--dtypes: unknown value 'fp16'"),
    ("benchmarks", "bench_conv_gate", ["--out", "{tmp}/o.json", "--device", "cuda"], "no CUDA GPU is visible"),
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--out", "{tmp}/tt", "--device", "cuda"],
     "no CUDA GPU is visible"),
    ("benchmarks", "bench_conv_gate", ["--out", "{tmp}/o.json", "--device", "cpu", "--rep", "0"],
     "--rep must be at least 1"),
    ("benchmarks", "bench_conv_gate", ["--out", "{tmp}/o.json", "--device", "cpu"], "set TRITON_INTERPRET=1"),
    ("benchmarks", "compare_runs", ["--base", "a={tmp}/no_run"], "no metrics.jsonl(.gz) in"),
    ("benchmarks", "compare_runs", ["--base", "a={tmp}/text.txt"], "holds no metrics records"),
    ("benchmarks", "compare_runs", ["--base", "a={tmp}", "--run", "b={tmp}:two"], "is not NAME=DIR[:GPUS]"),
    ("benchmarks", "count_decode_kernels", ["--size", "huge", "--no_compile"], "unknown size 'huge'"),
    ("benchmarks", "count_decode_kernels", ["--models", "dense", "mamab", "--no_compile"], "unknown model 'mamab'"),
    ("benchmarks", "count_decode_kernels", ["--no_compile", "--out", "{tmp}/no/x.json"], "its folder does not exist"),
    ("benchmarks", "count_decode_kernels", ["--no_compile", "--out", "{tmp}"], "is a folder; give a file path"),
    ("benchmarks", "count_graph_breaks", ["--device", "cpu", "--out", "{tmp}"], "is a folder; give a file path"),
    ("benchmarks", "profile_trainer_step", ["--steps", "1", "--out", "{tmp}", "--", "--model", "dense"],
     "is a folder; give a file path"),
    ("benchmarks", "profile_trainer_step", ["--steps", "0", "--", "--model", "dense"], "--steps must be at least 1"),
    ("benchmarks", "profile_trainer_step", ["--steps", "1"], "give the trainer's flags after `--`"),
    ("benchmarks", "count_graph_breaks", ["--device", "cuda"], "no CUDA GPU is visible"),
    ("benchmarks", "count_graph_breaks", ["--device", "cpu"], "set TRITON_INTERPRET=1"),
    ("benchmarks", "count_graph_breaks", ["--device", "cpu", "--seq_len", "0"], "--seq_len must be at least 2"),
    ("benchmarks", "count_graph_breaks", ["--device", "cpu", "--routings", "eager_reference,fast"],
     "unknown routing 'fast'"),
    ("benchmarks", "probe_tasks", ["--out", "{tmp}/probe", "--device", "cpu", "--steps", "0"],
     "--steps must be at least 1"),
    ("benchmarks", "probe_tasks", ["--out", "{tmp}/probe", "--device", "cuda"], "no CUDA GPU is visible"),
    ("benchmarks", "probe_tasks", ["--out", "{tmp}/probe", "--device", "cpu", "--seed", "-1"],
     "--seed must be 0 to 2**32-1"),  # numpy's ValueError traceback (an audit)
    # (a benchmark-script audit) --inductor items were tracebacks (AttributeError, SyntaxError) after the checks;
    # --threads -1 a RuntimeError; flags of the compiled rows dropped without --compile; a file as --out failed at
    # the first row's write
    ("benchmarks", "bench_generation", ["--device", "cpu", "--compile", "--inductor", "nosuchkey=1", "--out",
                                        "{tmp}/g"], "--inductor 'nosuchkey=1': give KEY=VALUE"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--compile", "--inductor", "combo_kernels", "--out",
                                        "{tmp}/g"], "--inductor 'combo_kernels': give KEY=VALUE"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--compile", "--inductor", "triton.nosuch=1", "--out",
                                        "{tmp}/g"], "--inductor 'triton.nosuch=1'"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--compile", "--inductor", "combo_kernels=Tru e", "--out",
                                        "{tmp}/g"], "is not a Python literal"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--threads", "-1", "--out", "{tmp}/g"],
     "--threads must be at least 0"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--kernel_config", "lnn=head_block_n=32", "--out",
                                        "{tmp}/g"],
     "give KIND:KEY=VALUE with KIND one of lnn, latent, ssm, scan, embed"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--kernel_config", "lnn:head_block_n=on", "--out",
                                        "{tmp}/g"], "the value must be an integer"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--kernel_config", "lnn:nosuch=1", "--out", "{tmp}/g"],
     "unknown lnn-step config key 'nosuch'"),
    ("benchmarks", "profile_decode_step", ["--device", "cpu", "--kernel_config", "latent:nosuch=2", "--out",
                                           "{tmp}/p"], "unknown latent-step config key 'nosuch'"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--kernel_config", "lnn:head_block_n=48", "--out",
                                        "{tmp}/g"], "lnn:head_block_n=48: a block size is 0 (off) or a power of two"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--kernel_config", "lnn:num_warps=3", "--out", "{tmp}/g"],
     "lnn:num_warps=3: warps are a power of two"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--kernel_config", "scan:fold=-1", "--out", "{tmp}/g"],
     "scan:fold=-1: the value must be >= 0"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--kernel_config", "embed:enabled=3", "--out", "{tmp}/g"],
     "embed:enabled=3: enabled is 0 (off), 1 (on where the model allows it) or 2 (required)"),
    # the sweep keeps one decoder: a key read only when a decoder is built swept nothing (a review of session 57)
    ("benchmarks", "profile_decode_step", ["--device", "cpu", "--sweep_lnn", "--grid", "head_block_n=32,64",
                                           "--out", "{tmp}/p"], "--grid head_block_n: it is read when a decoder"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--compiled_only", "--out", "{tmp}/g"], "add --compile"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--compile_mode", "default", "--out", "{tmp}/g"],
     "add --compile"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--inductor", "combo_kernels=True", "--out", "{tmp}/g"],
     "add --compile"),
    ("benchmarks", "bench_generation", ["--device", "cpu", "--size", "tiny", "--out", "{tmp}/text.txt"],
     "is a file, not a folder"),
    # --out a folder or under a file failed after every arm ran; --compile_mode without --compile was dropped
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "dense", "--device", "cpu", "--out",
                                              "{tmp}"], "is a folder; give a file path"),
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "dense", "--device", "cpu", "--out",
                                              "{tmp}/text.txt/t.json"], "cannot make its folder"),
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "dense", "--device", "cpu",
                                              "--compile_mode", "whole"], "add --compile"),
    # a BPE arm ran on random bytes as tokens, and its tokens/s was reported as bytes/s (a measurement audit)
    ("benchmarks", "bench_train_throughput", ["--sizes", "tiny", "--arms", "bpe:vocab_size=512", "--device", "cpu",
                                              "--steps", "1", "--seq_len", "16", "--batch_size", "1"],
     "a BPE model's steps hold tokens"),
    # fp32 rows run only at --sweep-length: --dtypes fp32 --lengths 64 printed an empty table with exit 0
    ("benchmarks", "bench_scan", ["--out", "{tmp}/o.json", "--device", "cpu", "--dtypes", "fp32", "--lengths", "64"],
     "--dtypes fp32 runs only at T = --sweep-length"),
    ("benchmarks", "bench_scan", ["--out", "{tmp}", "--device", "cpu"], "is a folder; give a file path"),
    ("benchmarks", "bench_attention", ["--out", "{tmp}", "--device", "cpu"], "is a folder; give a file path"),
    ("scripts", "byte_coverage", ["{tmp}/text.jsonl", "{tmp}/text.txt"], "no line is a JSON object with a 'text'"),
    ("scripts", "digit_ngram_buckets", ["--buckets", "0"], "--buckets must all be at least 1"),
    ("scripts", "digit_ngram_buckets", ["--buckets", "-1"], "--buckets must all be at least 1"),  # printed numbers
    ("scripts", "digit_ngram_buckets", ["--n", "0"], "--n must be at least 1"),
    ("scripts", "digit_ngram_buckets", ["--sizes", "-1"], "--sizes must all be n-gram sizes 1 to 8"),
    ("scripts", "byte_coverage", ["{tmp}/text.txt", "{tmp}/text.txt", "--eval_bytes", "0"],
     "--eval_bytes must be at least 1"),
    ("benchmarks", "time_generate_calls", ["--device", "cpu", "--lengths", "17,0", "--out", "{tmp}/o"],
     "--lengths '17,0'"),
    ("benchmarks", "time_generate_calls", ["--out", "{tmp}/o"], "no CUDA device here"),
    ("benchmarks", "time_generate_calls", ["--device", "cpu", "--arms", "pipe=2", "--out", "{tmp}/o"],
     "--arms 'pipe=2'"),
]


@pytest.mark.parametrize("folder, script, argv, says", SCRIPT_BAD_INPUT,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(SCRIPT_BAD_INPUT)])
def test_script_bad_input_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys, folder, script, argv,
                                                             says):
    """Found by the bad-input audit of the benchmarks: --device cuda without a GPU was a traceback from the first
    CUDA call (bench_attention / scan / conv_gate), a zero size a ZeroDivisionError, a missing run folder or a file
    that is not a metrics log a traceback or silent nulls (compare_runs), an unknown size a traceback before the
    count (count_decode_kernels), --steps 0 an IndexError after the first arm trained (probe_tasks), a missing
    TRITON_INTERPRET an exit 1 (count_graph_breaks), plain text read as JSONL 0 bytes and exit 0 (byte_coverage).
    Now each is one line, exit 2, and nothing is written."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the same answer on a GPU machine
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "text.txt").write_text("plain text, not a log\n")
    (tmp_path / "text.jsonl").write_text("plain text, not a log\n")
    before = sorted(tmp_path.rglob("*"))
    main = _load(script, folder).main
    with pytest.raises(SystemExit) as e:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2, err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before  # no --out file or folder made
    assert "| arm |" not in out  # nothing was benchmarked


def test_byte_coverage_reads_plain_text_as_raw_bytes(tmp_path, capsys):
    """A .txt is raw text, as the data pipeline reads it (sources.iter_local_file): it used to be read as JSONL,
    every line skipped, and 0 bytes reported with exit 0."""
    train, ev = tmp_path / "train.txt", tmp_path / "eval.jsonl"
    train.write_bytes(b"ab" * 50)
    ev.write_text(json.dumps({"text": "abz"}) + "\n")
    assert _load("byte_coverage", "scripts").main([str(train), str(ev)]) == 0
    out = capsys.readouterr().out
    assert "train_bytes: 100\n" in out and "eval_bytes: 3\n" in out and "eval_frac_unseen: 0.333333\n" in out


def test_decode_levers_commands_parse(tmp_path):
    pds, bench, train = _load("profile_decode_step"), _load("bench_generation"), _load("bench_train_throughput")
    ssd = _load("bench_ssd_forward")
    steps = ("tests check_ssm check_ssd ssd_split check_lnn entropy inductor_pdl latent digest branch lagged unroll "
             "stage_a entropy_chunk train8k pick conv_gate kernels_graph batch32 bench")
    r, calls = _levers(tmp_path, steps, BUDGET="60", UNROLL="8")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "decode_levers.tgz").exists()  # the results come back packed
    seen = set()
    for argv in calls:
        if argv[:2] == ["-m", "pytest"]:
            files = [a for a in argv[2:] if a.endswith(".py")]
            assert files and all((REPO / f).is_file() for f in files), argv
            seen.add("pytest")
        elif argv[:2] == ["-m", "ionllama.kernels.selfcheck"]:
            selfcheck.build_parser().parse_args(argv[2:])
            seen.add("selfcheck")
        elif argv[0] == "benchmarks/profile_decode_step.py":
            args = pds.build_parser().parse_args(argv[1:])
            kind = next((k for k in pds.SWEEPS if getattr(args, f"sweep_{k}")), None)
            if args.grid is not None:
                assert kind is not None, argv
                pds.parse_grid(kind, args.grid)  # a bad grid raises a UserError
            if args.model_config:  # a committed run's architecture
                _load("bench_generation").model_config_from(str(REPO / args.model_config))
            seen.add("profile")
        elif argv[0] == "benchmarks/bench_generation.py":
            args = bench.build_parser().parse_args(argv[1:])
            import torch._inductor.config as ind
            for kv in args.inductor:  # each setting names an inductor config entry that exists
                target = ind
                for part in kv.partition("=")[0].split("."):
                    target = getattr(target, part)
            seen.add("bench")
        elif argv[0] == "benchmarks/bench_train_throughput.py":
            args = train.build_parser().parse_args(argv[1:])
            assert args.step_graph and args.compile_mode == "whole", argv  # stage A is only graphed in the step graph
            from ionllama import create_model
            for arm in args.arms:  # arms (kind:key=val,...) name a registry model and model options that exist
                kind, _, opts = arm.partition(":")
                create_model("tiny", model=kind, **{k: int(v) if v.isdigit() else v
                                                    for k, v in (kv.split("=") for kv in filter(None, opts.split(",")))})
            seen.add("train")
        elif argv[0] == "benchmarks/bench_ssd_forward.py":
            args = ssd.build_parser().parse_args(argv[1:])
            assert args.scan and all(len(s.split("x")) == 2 for s in args.shapes), argv
            seen.add("ssd")
        elif argv[0] == "benchmarks/bench_conv_gate.py":
            args = _load("bench_conv_gate").build_parser().parse_args(argv[1:])
            assert args.sweep and args.out.endswith("conv_gate.json"), argv
            seen.add("conv_gate")
        elif argv[0] in ("benchmarks/bench_attention.py", "benchmarks/bench_scan.py"):
            args = _load(argv[0][len("benchmarks/"):-3]).build_parser().parse_args(argv[1:])
            assert args.graph_timing and args.device == "cuda", argv
            seen.add(argv[0])
        else:
            pytest.fail(f"gpu_decode_levers.sh runs an unchecked command: {argv}")
    assert seen == {"pytest", "selfcheck", "profile", "bench", "train", "ssd", "conv_gate",
                    "benchmarks/bench_attention.py", "benchmarks/bench_scan.py"}
    # every step of every name ran its commands
    assert len(calls) == 1 + 3 + 1 + 3 + 1 + 1 + 4 + 1 + 2 + 2 + 8 + 1 + 1 + 2 + 1 + 2 + 2 + 2


def test_decode_levers_unknown_step_is_refused(tmp_path):
    r, calls = _levers(tmp_path, "bogus")
    assert r.returncode == 2 and "unknown step 'bogus'" in r.stderr and not calls


# the runbook's Phase-1 rows (docs/notes/gpu-runbook.md), one table shared with the command printer
PLANNED = _load("phase1_rows", "scripts").ROWS


@pytest.mark.parametrize("row", sorted(PLANNED))
def test_planned_phase1_rows_parse(tmp_path, row):
    """Each planned row's experiment commands (prepare, then one per GPU) are accepted by the experiment's
    parser, and its overrides by parse_overrides and the model config."""
    from ionllama import create_model
    from ionllama.experiment import build_parser, parse_overrides
    from ionllama.experiment.matrix import RUN_KEYS

    r, calls = _run_script(tmp_path, "gpu_phase1_parallel.sh", **{"T": "590", "BUDGET": "420", "RES": str(tmp_path / "res"),
                                                                   **PLANNED[row]})
    assert r.returncode == 0, r.stderr
    assert len(calls) == 2 and all(c[:3] == ["-m", "ionllama.cli", "experiment"] for c in calls)
    for argv in calls:
        a = build_parser().parse_args(argv[3:])
        overrides = parse_overrides(a.override)
        model_keys = {k: v for k, v in overrides.items() if k not in RUN_KEYS}
        create_model("tiny", **model_keys)  # a bad value (e.g. a latent_shift) is refused here


def test_planned_task_rows_keep_the_scoring_time_their_committed_runs_took():
    """--task_eval_s is the time a task row keeps for its held-out scoring under --deadline_s: less than the scoring
    takes, and a call's limit kills the process in it with no message and no scores (the forty-eighth session's
    H100 row). The committed logs of the rows say what scoring took: 121 s for 1-byte patches with local layers, above
    the 120 s default, and 38 s / 86 s for two rows without local layers that phase1_rows.py gave 30 s ("8 s")."""
    import gzip

    from ionllama.experiment import build_parser

    default = build_parser().get_default("task_eval_s")
    results = REPO / "docs" / "results"
    checked = []
    for log in sorted(results.glob("phase1-tasks-long-*/log_gpu0.txt*")):
        text = (gzip.open(log, "rt") if log.suffix == ".gz" else open(log)).read()
        took = [int(s) for s in re.findall(r"task scoring took (\d+) s", text)]
        page = results / f"{log.parent.name}.json"
        if not took or not page.is_file():
            continue
        cmd = json.loads(page.read_text())["arms"]["ionllama_fixed"]["command"].split()
        seed, override = cmd[cmd.index("--seed") + 1], cmd[cmd.index("--override") + 1]
        for name, row in PLANNED.items():
            extra = row.get("EXTRA", "").split()
            if "--override" not in extra or extra[extra.index("--override") + 1] != override:
                continue
            if extra[extra.index("--seed") + 1] != seed:
                continue
            kept = float(extra[extra.index("--task_eval_s") + 1]) if "--task_eval_s" in extra else default
            checked.append(name)
            assert kept >= max(took), (name, log.parent.name, max(took), kept)
    assert len(checked) >= 5, checked


@pytest.mark.parametrize("row", ["2K windows, dense, seed 1", "2K windows, bpe", "tasks ionllama_fixed"])
def test_printed_device_command_runs_the_tested_row(tmp_path, row):
    """scripts/phase1_rows.py prints the device call for a row; run in a tree with the session's data copies and a
    stand-in gpu_phase1_parallel.sh, it hands that script exactly the row's env (the arm, EXTRA word for word) and
    renames the data folders as the carry expects."""
    rows = _load("phase1_rows", "scripts")
    argv = [sys.executable, str(REPO / "scripts/phase1_rows.py"), row, "--res", "phase1-x", "--commit", "abc123"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (cmd,) = r.stdout.splitlines()
    for d in (".data/gut", ".data/wk", "scripts"):
        (tmp_path / d).mkdir(parents=True)
    keys = ["GPU0", "T", "BUDGET", "OVERHEAD", "RES", "EXTRA", "TASKS", "BENCH_COMMIT"]
    dump = "; ".join(f'printf "%s=%s\\n" {k} "${{{k}:-}}"' for k in keys)
    (tmp_path / "scripts/gpu_phase1_parallel.sh").write_text(f"{dump}; ls .data\n")
    out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    want = {"T": "594", "BUDGET": "420", "RES": "docs/results/phase1-x", "BENCH_COMMIT": "abc123", "TASKS": "",
            "OVERHEAD": "", **rows.ROWS[row]}
    assert got == want
    assert out.stdout.split()[-2:] == ["gutenberg", "wikipedia"]


def test_chained_device_command_runs_each_row_into_its_own_out(tmp_path):
    """Two rows in one call: the data folders are renamed once, then each row runs with its own env, deadline T and
    $OUT/rowN (the script writes phase1.tgz and its logs under $OUT: a second row into the same $OUT overwrote the
    first's archive and logs)."""
    rows = _load("phase1_rows", "scripts")
    a, b = "tasks best row, 1-byte patches, stripped, long compiled stage, seed 1", "tasks ionllama_fixed"
    cmd = rows.chained_command([(a, "res-a", 250), (b, "res-b", 300)], "abc123")
    for d in (".data/gut", ".data/wk", "scripts", "out"):
        (tmp_path / d).mkdir(parents=True)
    keys = ["GPU0", "T", "RES", "EXTRA", "BENCH_COMMIT", "OUT"]
    dump = "; ".join(f'printf "%s=%s\\n" {k} "${{{k}:-}}"' for k in keys)
    (tmp_path / "scripts/gpu_phase1_parallel.sh").write_text(f'echo ---; {dump}; touch "$OUT/phase1.tgz"\n')
    out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OUT": str(tmp_path / "out")})
    assert out.returncode == 0, out.stderr
    runs = [dict(line.split("=", 1) for line in part.strip().splitlines()) for part in out.stdout.split("---")[1:]]
    assert [r["T"] for r in runs] == ["250", "300"] and [r["RES"] for r in runs] == ["docs/results/res-a",
                                                                                    "docs/results/res-b"]
    assert [r["EXTRA"] for r in runs] == [rows.ROWS[a]["EXTRA"], rows.ROWS[b]["EXTRA"]]
    assert [r["OUT"] for r in runs] == [str(tmp_path / "out/row1"), str(tmp_path / "out/row2")]
    assert all(r["BENCH_COMMIT"] == "abc123" for r in runs)
    assert (tmp_path / "out/row1/phase1.tgz").exists() and (tmp_path / "out/row2/phase1.tgz").exists()
    assert sorted(p.name for p in (tmp_path / ".data").iterdir()) == ["gutenberg", "wikipedia"]


def test_res_before_the_row_still_names_the_row(capsys):
    """`--res x "row"` printed the row list and exited 0 when --res took several values (an audit): the options
    repeat instead, and the order of options and row does not matter."""
    main = _load("phase1_rows", "scripts").main
    row = "tasks ionllama_fixed"
    main(["--res", "x", row, "--commit", "abc123"])
    first = capsys.readouterr().out
    main([row, "--res", "x", "--commit", "abc123"])
    assert first == capsys.readouterr().out and "RES=docs/results/x" in first and first.count("\n") == 1


def test_device_command_refuses_bad_input(tmp_path, capsys):
    script = [sys.executable, str(REPO / "scripts/phase1_rows.py")]
    listed = subprocess.run(script, capture_output=True, text=True, timeout=60)  # as a script: its own entry
    assert listed.returncode == 0 and "2K windows, dense, seed 1" in listed.stdout.splitlines()
    main = _load("phase1_rows", "scripts").main  # the bad inputs in-process (a subprocess each cost ~3 s)
    for args, words in ((["no such row", "--res", "x"], "unknown row"),
                        (["2K windows, bpe"], "--res is needed"),
                        (["2K windows, bpe", "--res", "docs/results/x"], "bare folder name"),
                        (["2K windows, bpe", "--res", "x", "--t", "560"], "does not fit T=560"),
                        (["2K windows, bpe", "--res", "x", "--budget", "0"], "--budget must be at least 1"),
                        # (an audit: a --commit went into the shell line as given, `abc; rm ...` included, and
                        # --budget was dropped without a word for rows with their own budget)
                        (["2K windows, bpe", "--res", "x", "--commit", "abc def"], "give a git commit hash"),
                        (["2K windows, bpe", "--res", "x", "--commit", "abc123;ls"], "give a git commit hash"),
                        (["tasks ionllama_fixed", "--res", "x", "--budget", "200"], "sets its own budget (75 s)"),
                        (["2K windows, bpe", "--nope"], "unrecognized arguments: --nope"),
                        # chained rows: one --res and one --t per row, within one call's 600 s, no shared --budget
                        (["tasks ionllama_fixed", "tasks 3-byte patches", "--res", "a"], "2 rows need 2 --res"),
                        (["tasks ionllama_fixed", "tasks 3-byte patches", "--res", "a", "--res", "b", "--t", "300",
                          "--t", "300"], "add up to 600 s"),
                        (["tasks ionllama_fixed", "tasks 3-byte patches", "--res", "a", "--res", "b", "--t", "200",
                          "--t", "200", "--budget", "50"], "--budget is for one row"),
                        (["tasks ionllama_fixed", "--res", "a", "--res", "b"], "one row takes one --res"),
                        # (an audit: the same folder twice, a name the script would split or put in docs/)
                        (["tasks ionllama_fixed", "tasks 3-byte patches", "--res", "a", "--res", "a", "--t", "200",
                          "--t", "200"], "two chained rows share a --res (a)"),
                        (["tasks ionllama_fixed", "--res", ".."], "give a bare folder name"),
                        (["tasks ionllama_fixed", "--res", "a b"], "give a bare folder name")):
        with pytest.raises(SystemExit) as e:
            main(args)
        out, err = capsys.readouterr()
        assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out


def test_decode_benchmarks_build_a_runs_architecture(tmp_path):
    """--model_config: the decode benchmarks build the ionllama arm from a run's config.json (here the committed
    Phase-1 3-byte row), overrides on top; anything else is a one-line UserError."""
    from ionllama.errors import UserError
    from ionllama.registry import build_model

    bench = _load("bench_generation")
    run = REPO / "docs/results/phase1-patch3/ionllama_fixed/config.json"
    cfg = bench.model_config_from(str(run), latent_shift="lagged")
    saved = json.loads(run.read_text())["model_config"]
    assert (cfg.patching, cfg.fixed_patch_size, cfg.n_layers) == (saved["patching"], 3, 8) == ("fixed", 3, 8)
    assert cfg.latent_shift == "lagged" and saved["latent_shift"] == "completed"
    assert build_model(cfg).count_parameters()["total"] == 35_010_336  # the run's 35.0M
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps({"model_config": {**saved, "model": "dense"}}))
    listed = tmp_path / "list.json"  # valid JSON, not an object: .get() was an AttributeError traceback
    listed.write_text("[1, 2]")
    nested = tmp_path / "nested.json"
    nested.write_text('{"model_config": 3}')
    for bad, words in ((dense, "is not ionllama"), (tmp_path / "missing.json", "cannot read it as JSON"),
                       (listed, "is not a run's config.json"), (nested, "is not a run's config.json")):
        with pytest.raises(UserError, match=words):
            bench.model_config_from(str(bad))
    args = bench.build_parser().parse_args(["--model_config", str(run)])
    assert args.model_config == str(run)
    assert _load("profile_decode_step").build_parser().parse_args(["--model_config", str(run)]).model_config == str(run)


def test_replay_gpu_ms_counts_host_scheduled_bytes():
    """host_schedule times one graph per byte ('byte', or 'byte_latent' where the latent stage is inside):
    every byte counts once, the latent graph is reported as the difference of the two medians."""
    bench = _load("bench_generation")

    class FakeRunner:
        def run(self, n, gpu_ms):
            gpu_ms["byte"] = [0.07, 0.08, 0.07, 0.07]
            gpu_ms["byte_latent"] = [0.22, 0.23]

    r = bench.replay_gpu_ms(FakeRunner(), 6)
    assert r["gpu_ms_byte_graph"] == 0.07 and abs(r["gpu_ms_latent_graph"] - 0.16) < 1e-9
    assert abs(r["gpu_ms_per_byte"] - (0.29 + 0.45) / 6) < 1e-9


def test_profile_breakdown_tells_our_kernels_from_inductors():
    pytest.importorskip("triton")
    train = _load("bench_train_throughput")

    def group(name):
        return next((c for c, rx in train.KERNEL_GROUPS if rx.search(name)), "other")

    assert group("_conv_gate_bwd_gate") == group("_ssd_fwd") == group("_scan_fwd") == "ours (ionllama/kernels, Triton)"
    assert group("triton_poi_fused__unsafe_view_mul_silu_split_29") == "inductor (triton_*)"
    assert group("nvjet_sm90_tst_128x192_64x5_2x1_v_bz_coopB_NNN") == "matmul"
    assert group("_not_a_kernel_of_ours") == "other"


def test_device_slim_untracks_the_largest_results_and_puts_them_back(tmp_path):
    """scripts/device_slim.sh in a scratch repo: `on` drops the largest result folders from the index (never
    phase1-sweep), keeps their files on disk, and blocks commits; `off` restores the index and commits work again."""
    repo = tmp_path / "repo"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    sizes = {"big": 3 << 20, "mid": 2 << 20, "small": 1 << 10, "phase1-sweep": 5 << 20}
    for name, n in sizes.items():
        (repo / "docs" / "results" / name).mkdir(parents=True)
        (repo / "docs" / "results" / name / "metrics.bin").write_bytes(os.urandom(n))
    (repo / "scripts").mkdir()
    (repo / "scripts" / "device_slim.sh").write_bytes((REPO / "scripts" / "device_slim.sh").read_bytes())
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "init"], check=True)

    def run(*args):
        return subprocess.run(["bash", "scripts/device_slim.sh", *args], cwd=repo, capture_output=True, text=True)

    def tracked():
        out = subprocess.run(git + ["ls-files"], capture_output=True, text=True, check=True).stdout
        return {p.split("/")[2] for p in out.split() if p.startswith("docs/results/")}

    (repo / "docs" / "results" / "small" / "new.txt").write_text("staged")
    subprocess.run(git + ["add", "."], check=True)
    refused = run("on")
    assert refused.returncode == 2 and "staged changes" in refused.stderr
    assert not (repo / ".git" / "ionllama-slim").exists()
    subprocess.run(git + ["commit", "-qm", "more"], check=True)
    assert run("on", "4").returncode == 0
    assert tracked() == {"small", "phase1-sweep"}  # big (3 MiB) + mid (2 MiB) free >= 4 MiB; the sweep stays
    assert (repo / "docs" / "results" / "big" / "metrics.bin").stat().st_size == sizes["big"]  # still on disk
    assert subprocess.run(git + ["status", "--short", "--untracked-files=all"], capture_output=True,
                          text=True).stdout.count("??") == 0  # ignored, not shown as new files
    assert run("on").returncode == 2  # twice is refused
    blocked = subprocess.run(git + ["commit", "-qm", "x", "--allow-empty"], capture_output=True, text=True)
    assert blocked.returncode != 0 and "device_slim is on" in blocked.stderr
    assert run("off").returncode == 0
    assert tracked() == set(sizes)
    assert subprocess.run(git + ["status", "--short"], capture_output=True, text=True).stdout == ""
    assert subprocess.run(git + ["commit", "-qm", "after", "--allow-empty"]).returncode == 0


def test_bench_generation_inductor_settings_are_parsed_before_use():
    """--inductor KEY=VALUE: a dotted key reaches the nested config object, the value is a Python literal."""
    import torch._inductor.config as ind
    bench = _load("bench_generation")
    (target, attr, value), = bench.inductor_settings(["triton.cudagraphs=False"])
    assert target is ind.triton and attr == "cudagraphs" and value is False
    assert bench.inductor_settings([]) == []


def test_bench_generation_results_record_command_date_and_device(tmp_path):
    """bench_generation.json had no command or date, and its device was platform.processor() (often '' on Linux)
    whatever --device said; the JSON and the .md are written atomically (no temp file left)."""
    from types import SimpleNamespace
    bench = _load("bench_generation")
    argv = ["--device", "cpu", "--size", "tiny", "--out", str(tmp_path)]
    args = bench.build_parser().parse_args(argv)
    args.argv = argv
    bench.write_results(SimpleNamespace(rows=[], models={}), args, {})
    env = json.loads((tmp_path / "bench_generation.json").read_text())["env"]
    assert env["command"].endswith("bench_generation.py --device cpu --size tiny --out " + str(tmp_path))
    assert env["date"][:2] == "20" and env["device"] and env["commit"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_generation.json", "bench_generation.md"]


def test_bench_generation_exits_non_zero_when_the_budget_skipped_everything(tmp_path, monkeypatch, capsys):
    """Every configuration skipped by --budget_s was an empty table and exit 0."""
    bench = _load("bench_generation")
    monkeypatch.setattr(bench, "correctness_checks", lambda *a, **k: {})  # the minutes-long part; not asked here
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--size", "tiny", "--contexts", "64", "--budget_s", "1", "--out",
                    str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "no configuration measured" in err and "raise --budget_s" in err, err


def test_train_throughput_result_is_strict_json_with_its_provenance(tmp_path, monkeypatch):
    """The result file held NaN (peak_bf16_flops, mfu on CPU: not JSON), no command, commit or date, and the
    device of torch.cuda.is_available() rather than --device; --out's missing folder is made up front."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    train = _load("bench_train_throughput")
    out = tmp_path / "new" / "t.json"
    train.main(["--sizes", "tiny", "--arms", "dense", "--device", "cpu", "--steps", "1", "--warmup", "1",
                "--seq_len", "32", "--batch_size", "1", "--out", str(out)])

    def no_constants(c):
        raise AssertionError(f"{c} in the JSON")

    meta = json.loads(out.read_text(), parse_constant=no_constants)
    # the machine, not a bare "cpu": the CPU's model and torch's threads
    assert meta["device"].startswith("CPU (") and f"{torch.get_num_threads()} threads)" in meta["device"]
    assert meta["peak_bf16_flops"] is None and meta["rows"][0]["mfu"] is None
    assert "bench_train_throughput.py --sizes tiny" in meta["command"] and meta["date"][:2] == "20"
    assert meta["commit"]["sha"]
    assert [p.name for p in out.parent.iterdir()] == ["t.json"]  # atomic: no temp file left


def _timed_inputs(monkeypatch, train, argv: list[str], steps: int) -> tuple[list[int], list[int]]:
    """The inputs (their data pointers) of the warm-up steps and of the timed steps of bench_train_throughput."""
    seen = []
    make = train.create_model

    def tracked(*a, **k):
        m = make(*a, **k)
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].data_ptr()))
        return m

    monkeypatch.setattr(train, "create_model", tracked)
    train.main(argv)
    return seen[:-steps], seen[-steps:]


def test_train_throughput_times_only_batches_its_warm_up_ran(monkeypatch, capsys):
    """The timed steps cycle through 4 batches, the warm-up ran only the first --warmup of them: with --warmup 1 three
    batches made their first step inside the timing. Under --compile with entropy patching each has its own padded
    patch count, so graphs were compiled in the timed steps (4 of them for ionllama tiny, seq 512, in the audit)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    train = _load("bench_train_throughput")
    argv = ["--sizes", "tiny", "--arms", "dense:d_model=32,n_layers=1,n_heads=2", "--device", "cpu", "--steps", "4",
            "--warmup", "1", "--seq_len", "16", "--batch_size", "1"]
    warm, timed = _timed_inputs(monkeypatch, train, argv, 4)
    assert len(set(timed)) == 4 and set(timed) <= set(warm), (warm, timed)
    assert '"warmup_steps": 4' in capsys.readouterr().out


def test_train_throughput_mfu_peak_is_the_cards_own(monkeypatch):
    """An H100 PCIe (756.5 dense bf16 TFLOP/s) matched the "H100" key and got the SXM part's 989.4: its MFU read 24 %
    low. NVL cards, of other rates again, are unknown (no MFU) rather than wrong."""
    train = _load("bench_train_throughput")
    for name, want in (("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H200", 989.4e12),
                       ("NVIDIA H100 PCIe", 756.5e12), ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None),
                       ("NVIDIA A100-SXM4-80GB", None)):
        monkeypatch.setattr(train, "device_name", lambda device=None, n=name: n)
        got = train.peak_flops("cuda")
        assert (got != got) if want is None else got == want, (name, got)


def test_train_throughput_counts_a_mamba_arms_scan_flops(monkeypatch, capsys):
    """MFU's FLOPs per byte came from ionllama.model.flops alone, which leaves out MambaByte's chunked scan (its C.B
    scores, score x input and chunk states: ~11 % of mamba-small's FLOPs at seq 8192, 41 % of the tiny one below);
    the equal-FLOPs accounting of the experiments (train_flops_per_byte) counts them."""
    from ionllama import create_model
    from ionllama.experiment.flops import train_flops_per_byte

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    train = _load("bench_train_throughput")
    over = "d_model=32,n_layers=1"
    train.main(["--sizes", "tiny", "--arms", f"mamba:{over}", "--device", "cpu", "--steps", "1", "--warmup", "1",
                "--seq_len", "16", "--batch_size", "1"])
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    want = train_flops_per_byte(create_model("tiny", model="mamba", **train.parse_arm(f"mamba:{over}")[1]), "main",
                                16, None, None)
    assert row["flops_per_byte"] == pytest.approx(want)


def test_attention_flex_check_uses_the_rows_local_width():
    """Flex's rel_err_vs_triton compared Flex over --local-width's mask with ours over the default width's offsets: at
    --local-width 5 a correct Flex read as a 0.37 relative error (Flex runs eagerly on the CPU here)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    ba = _load("bench_attention")
    N, g = 64, torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 2, N, 16, generator=g) for _ in range(3)]
    for w in (3, 5):
        bm = create_block_mask(ba.dilated_mask_mod(w), None, None, N, N, device="cpu")
        with warnings.catch_warnings():  # eager Flex materialises the scores: said once, fine at N = 64
            warnings.simplefilter("ignore")
            assert ba.flex_rel_err(flex_attention, xs, bm, N, w) < 1e-5, w


def test_kernel_benchmarks_record_the_date_and_command():
    ba = _load("bench_attention")
    info = ba.run_info(["--out", "x.json"])
    assert info["argv"][1:] == ["--out", "x.json"] and info["date"][:2] == "20" and info["commit"]


def test_profile_trainer_step_help_alone_shows_the_help(capsys):
    """--help without `--` was the "give the trainer's flags after `--`" error, exit 2 (an audit)."""
    main = _load("profile_trainer_step", "benchmarks").main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--profile_steps" in capsys.readouterr().out


def test_generation_bench_rows_count_the_bytes_they_decoded(tmp_path, monkeypatch):
    """A row's bytes/s is the bytes its runner decoded over the time taken. A session's runner held at most
    max(--new_bytes, 1024) + 272 bytes, so a latency row with a larger --latency_bytes timed fewer bytes than it
    reported (2,000 claimed, 1,288 decoded: its rate 1.55x too high); and --new_bytes 1 made the batch row measure
    0 bytes, a ZeroDivisionError and exit 1."""
    import ionllama

    bench = _load("bench_generation")
    monkeypatch.setattr(bench, "correctness_checks", lambda *a, **k: {})
    torch.manual_seed(0)
    small = ionllama.create_model("tiny", model="dense", d_model=16, n_layers=1, n_heads=2).eval()
    monkeypatch.setattr(bench.Bench, "model", lambda self, kind: (small, {"params": 0}))
    seen = []
    measure = bench.Bench.measure

    def counted(self, s, ctx, n_new, **kw):
        row = measure(self, s, ctx, n_new, **kw)
        seen.append((n_new, s["runner"].n_done - 8))  # run(8) first; no timed replays on CPU
        return row

    monkeypatch.setattr(bench.Bench, "measure", counted)
    bench.main(["--device", "cpu", "--dtype", "fp32", "--size", "tiny", "--models", "dense", "--contexts", "8",
                "--new_bytes", "1", "--latency_bytes", "1300", "--batch", "2", "--threads", "1",
                "--out", str(tmp_path / "g")])
    rows = json.loads((tmp_path / "g" / "bench_generation.json").read_text())["rows"]
    assert rows and all("bytes_per_s" in r for r in rows), rows
    assert (1300, 1300) in seen and all(n == done for n, done in seen), seen


def test_generation_bench_does_not_report_an_eager_run_as_graphs_equal_eager():
    """On CPU generate(cuda_graphs=True) decodes eagerly, so the check compared eager bytes with eager bytes and its
    results said graphs_equal_eager: true for graphs that never ran."""
    bench = _load("bench_generation")
    checks = bench.correctness_checks(torch.device("cpu"), False)
    assert checks["graphs_equal_eager"] is None and not [k for k in checks if k.startswith("fixed")]


def test_time_generate_calls_times_each_call_in_order(tmp_path):
    """benchmarks/time_generate_calls.py: one row per prompt length and arm, in order, each with its setup and run
    times; a session arm runs its later calls on the kept decoder; the read-back switch is restored afterwards."""
    gen = sys.modules["ionllama.generation.generate"]
    pipelined = gen._pipelined
    res = _load("time_generate_calls").main(["--device", "cpu", "--lengths", "5,1,5", "--new_bytes", "12",
                                             "--arms", "pipe=1", "pipe=0,session=1", "--out", str(tmp_path)])
    calls = res["calls"]
    assert [(c["arm"], c["prompt_bytes"]) for c in calls] == [(0, 5), (0, 1), (0, 5), (1, 5), (1, 1), (1, 5)]
    assert all(c["new_bytes"] == 12 and c["steps"] >= 12 and c["setup_s"] > 0 and
               c["wall_s"] >= c["setup_s"] + c["first_run_s"] for c in calls)  # (no end-of-document stop)
    assert [c["reused"] for c in calls] == [False] * 4 + [True, True]
    assert [(a["pipe"], a["session"]) for a in res["summary"]] == [(1, 0), (0, 1)]
    assert json.loads((tmp_path / "generate_calls.json").read_text())["calls"] == calls
    assert gen._pipelined is pipelined


def _jit_kernels_or_skip():
    """The kernels as JITFunctions: under TRITON_INTERPRET=1 @triton.jit gives interpreted functions, with neither
    compiled variants nor specialization."""
    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    from ionllama.kernels import conv_gate_triton
    if not isinstance(conv_gate_triton._conv_gate_fwd, JITFunction):
        pytest.skip("the kernels are interpreted here (TRITON_INTERPRET=1)")


def test_time_generate_calls_counts_new_kernel_variants(monkeypatch):
    """new_kernel_variants names the ionllama Triton kernels that compiled a new specialization during a call: the
    count is read from each JITFunction's per-device cache (through autotuner wrappers), a kernel imported by two
    modules counts once, and only growth shows."""
    _jit_kernels_or_skip()
    tgc = _load("time_generate_calls")
    from types import SimpleNamespace

    from ionllama.kernels import conv_gate_triton, latent_step_triton, lnn_step_triton, scan_triton
    monkeypatch.setattr(conv_gate_triton._conv_gate_fwd, "device_caches", {0: ({"a": 1, "b": 2}, {}, None)})
    monkeypatch.setattr(scan_triton._scan_fwd, "device_caches", {0: ({"a": 1}, {}, None), 1: ({"c": 3}, {}, None)})
    # a kernel latent_step_triton imports from lnn_step_triton is one kernel, named by its own module
    assert latent_step_triton._lnn_ffn_up is lnn_step_triton._lnn_ffn_up
    monkeypatch.setattr(lnn_step_triton._lnn_ffn_up, "device_caches", {0: ({"a": 1}, {}, None)})
    # a wrapper (as triton.autotune / triton.heuristics) is unwrapped through .fn: the kernel is reachable only so
    bwd = scan_triton._scan_bwd
    monkeypatch.setattr(bwd, "device_caches", {0: ({"a": 1, "b": 2, "c": 3}, {}, None)})
    monkeypatch.delattr(scan_triton, "_scan_bwd")
    monkeypatch.setattr(conv_gate_triton, "_wrapped_for_test", SimpleNamespace(fn=SimpleNamespace(fn=bwd)),
                        raising=False)
    before = tgc.kernel_variants()
    assert {k: before.get(k) for k in ("conv_gate_triton._conv_gate_fwd", "scan_triton._scan_fwd",
                                       "lnn_step_triton._lnn_ffn_up", "scan_triton._scan_bwd")} == {
        "conv_gate_triton._conv_gate_fwd": 2, "scan_triton._scan_fwd": 2, "lnn_step_triton._lnn_ffn_up": 1,
        "scan_triton._scan_bwd": 3}
    assert "latent_step_triton._lnn_ffn_up" not in before
    conv_gate_triton._conv_gate_fwd.device_caches[0][0]["d"] = 4
    assert tgc.new_variants(before, tgc.kernel_variants()) == {"conv_gate_triton._conv_gate_fwd": 1}


def test_prefill_kernels_do_not_specialize_their_length():
    """Triton compiles a variant apart for an int argument equal to 1: the forward kernels that a prompt's prefill
    runs take the length (and the attention its offset count) unspecialized, so a 1-byte (or 1-patch) prompt reuses
    the compiled kernel (on an H100 the first 1-byte prompt compiled these three kernels again: 2.57 s of setup)."""
    _jit_kernels_or_skip()
    from ionllama.kernels import conv_gate_triton, dilated_attention_triton, scan_triton, ssd_triton
    # Past one scan chunk (512 bytes on an H100) the scan's chunk count and its summary pass's T vary too: a 512- and
    # a 520-byte prompt compiled _scan_fwd / _scan_summary again (0.74 and 0.20 s of setup, fifty-third session);
    # so would the split SSD kernels, which the entropy model's prefill takes past 64 bytes
    for fn, arg in [(conv_gate_triton._conv_gate_fwd, "T"), (scan_triton._scan_fwd, "T"), (ssd_triton._ssd_fwd, "T"),
                    (dilated_attention_triton._fwd, "N"),
                    (dilated_attention_triton._fwd, "n_offs"),  # a 1-patch prompt has one offset, 0
                    (scan_triton._scan_fwd, "n_chunks"), (scan_triton._scan_summary, "T"),
                    (scan_triton._scan_summary, "n_chunks"), (ssd_triton._ssd_chunk_state, "T"),
                    (ssd_triton._ssd_chunk_state, "NC"), (ssd_triton._ssd_state_pass, "NC"),
                    (ssd_triton._ssd_chunk_out, "T"), (ssd_triton._ssd_chunk_out, "NC")]:
        names = [fn.arg_names[d] if isinstance(d, int) else d for d in fn.do_not_specialize]  # names or indices
        assert arg in names, (fn, arg)


def test_kernel_ab_script_runs_a_b_a_b_with_accepted_commands(tmp_path):
    """gpu_kernel_ab.sh: the selfcheck of KINDS, then four bench processes A B A B (comma-separated items become
    separate --kernel_config items, each accepted by the parser; the first, cold process gets the larger budget),
    then the CUDA tests selected by TESTS."""
    from ionllama.kernels.launch_config import parse_kernel_config
    from ionllama.kernels.selfcheck import build_parser as selfcheck_parser

    r, calls = _run_script(tmp_path, "gpu_kernel_ab.sh", A="embed:enabled=1,lnn:head_block_n=0", B="embed:enabled=0",
                           KINDS="embed_step,lnn_generate", TESTS="host_schedule", BENCH_COMMIT="abc1234")
    assert r.returncode == 0, r.stderr
    bench_call = ["benchmarks/bench_generation.py", "--kernel_config"]
    assert [c[:2] for c in calls] == [["-m", "ionllama.kernels.selfcheck"]] + [bench_call] * 4 + [["-m", "pytest"]]
    assert selfcheck_parser().parse_args(calls[0][2:]).kinds == "embed_step,lnn_generate"
    bench = _load("bench_generation").build_parser()
    items, budgets = [], []
    for argv in calls[1:5]:
        args = bench.parse_args(argv[1:])
        parse_kernel_config(args.kernel_config)  # a UserError on a bad item
        items.append(args.kernel_config)
        budgets.append(args.budget_s)
    a, b = ["embed:enabled=1", "lnn:head_block_n=0"], ["embed:enabled=0"]
    assert items == [a, b, a, b] and budgets == [230, 170, 170, 170]
    assert calls[5][calls[5].index("-k") + 1] == "host_schedule"
