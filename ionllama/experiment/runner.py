"""Runner: trains, evaluates and records each arm of a matrix (resumable, one folder per arm)."""
from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from ..config import format_ngram_sizes
from ..errors import UserError, is_out_of_memory, is_whole
from ..eval.lm import TOKEN_CUT_MARGIN
from ..eval.task_eval import OUTPUTS_FILE, write_outputs
from ..train.schedule import DEFAULT_MIN_LR_RATIO
from ._common import WHERE_FLAGS, _log, _now_iso, _read_json, _split_path, _write_json, flag_values
from .budget import make_budget_trainer
from .flops import add_flops
from .matrix import (
    JOINT_FRAC,
    MATRICES,
    MODEL_KEYS,
    NEVER,
    NOMINAL_STEPS,
    TASK_ARMS,
    WARMUP_FRAC,
    parse_overrides,
    sweep_variants,
    variant_parts,
    variant_spec,
)
from .report import _fmt
from .tasks import TaskStageCut, run_task_stage

# trainer flags that the experiment's own flags set under another name (a refusal names the flag the user typed)
_EXPERIMENT_NAME = {"eval_bytes": "curve_eval_bytes", "max_train_time": "budget_s"}
ARM_OVERHEAD_S = 120.0  # --arm_overhead_s when not given
# the keys of evaluate_arm's row besides its eval results (val, val@N, test, --eval_data): no eval set takes them
FINAL_KEYS = frozenset({"arm", "run", "model", "spec", "model_config", "sweep_pick", "params", "params_non_embedding",
                        "params_by_part", "bytes_per_patch", "train", "data", "command", "trainer_command", "device",
                        "date", "git", "tasks"})  # (tasks: the report puts tasks.json there)


def _share(spec: dict, key: str, default: float, example: str) -> float:
    """spec[key] as a number (--override entropy_frac=abc was a ValueError traceback, its --out left empty)."""
    v = spec.get(key, default)
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"{key}={v}: give a number, e.g. {example}") from None


def _unread(model: str) -> set[str]:
    """The model options `model` is not built from: an earlier run of a baseline arm may have been given them (an
    --override, before they were left out), and they never shaped what it trained."""
    from ..registry import unused_options

    return set(unused_options(model, MODEL_KEYS))


# the runner's keys of entropy patching alone (the entropy model's and the joint phase's shares of the budget)
ENTROPY_KEYS = ("entropy_frac", "joint_frac")


def _entropy_patched(spec: dict) -> bool:
    return spec.get("model", "ionllama") == "ionllama" and spec.get("patching", "entropy") == "entropy"


def _used(spec):
    """A recorded spec without the options its model is not built from, nor entropy patching's shares where the arm
    has none (anything but a dict: as it is)."""
    if not isinstance(spec, dict):
        return spec
    unread = _unread(spec.get("model", "ionllama")) | (set() if _entropy_patched(spec) else set(ENTROPY_KEYS))
    return {k: v for k, v in spec.items() if k not in unread}


def _changed_settings(final: dict, spec: dict, targv: list[str]) -> str:
    """What differs between a finished arm's final.json and the settings it would train with now ('' if
    nothing that shapes training)."""
    now = json.loads(json.dumps(spec))  # as final.json holds it (tuples as lists)
    if "spec" in final and _used(final["spec"]) != _used(now):
        return f"spec {final['spec']} -> {spec}"
    unread = _unread(spec.get("model", "ionllama"))
    old = {k: v for k, v in flag_values(shlex.split(final.get("trainer_command", ""))[2:]).items() if k not in unread}
    new = {k: v for k, v in flag_values(targv).items() if k not in unread}
    if not old:
        return ""
    diff = [f"--{_EXPERIMENT_NAME.get(k, k)} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
            if k not in WHERE_FLAGS and old.get(k) != new.get(k)]
    return ", ".join(diff)


# trainer flags a sweep variant sets (or names the run): the rest must be equal for its runs to compare
_VARIANT_FLAGS = {"lr", "d_model", "n_heads", "n_layers", "d_local", "n_dec_layers", "run_name", "max_train_time"}


def _sweep_facts(final: dict) -> dict:
    """What must be equal between the sweep runs --from_sweep compares, from what a final.json records: the val
    bytes scored, the val data and the trainer flags besides the variant's knobs (a flag one run lacks is its
    default)."""
    facts = {}
    val, data = final.get("val") or {}, final.get("data") or {}
    if val.get("bytes") is not None:
        facts["val bytes scored"] = val["bytes"]
    if data.get("val_sha256"):
        facts["val data"] = data["val_sha256"][:12]
    if final.get("trainer_command"):
        flags = {k: v for k, v in flag_values(shlex.split(final["trainer_command"])[2:]).items()
                 if k not in WHERE_FLAGS and k not in _VARIANT_FLAGS}
        facts["flags"] = {f"--{_EXPERIMENT_NAME.get(k, k)}": v for k, v in flags.items()}
    return facts


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0). --deadline_s counts from the process start,
    as the `timeout` that a script wraps it in does, so Python's and torch's import time is not left out."""
    try:
        import os

        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Runner:
    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.a = args
        self.argv = argv
        self.out = Path(args.out)
        self._picks_said: set[str] = set()
        self._overrides_said: set[tuple] = set()
        self.ckpt_dir = Path(args.ckpt_dir)
        self.t_start = time.perf_counter() - process_age_s()  # --deadline_s counts from the process start
        self.command = "ionllama experiment " + " ".join(shlex.quote(x) for x in argv)
        if args.matrix not in MATRICES:
            raise UserError(f"unknown --matrix '{args.matrix}'; choose one of {', '.join(MATRICES)}")
        try:  # before any arm trains: its results must have somewhere to go
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out {self.out} ({e.strerror}); pass a writable folder") from None
        self.matrix = MATRICES[args.matrix]
        self.overrides = parse_overrides(args.override)
        # the sweep's runs: --from_sweep may read another results folder's sweep (a new setting on top of the
        # picks, e.g. --override dropout=0.1, written to its own --out so the picks' rows stay)
        self.sweep_dir = Path(args.sweep_dir) if getattr(args, "sweep_dir", None) else self.out / "sweep"
        self._data_facts: dict | None = None  # sizes and checksums of the prepared train/val shards
        self._set_bytes: dict[str, int] = {}  # scored bytes of each extra evaluation set (final_eval_units)

    # ------------------------------------------------------------------ arm list
    def arm_names(self) -> list[str]:
        if not self.a.arms:
            return list(self.matrix)
        names = [s.strip() for s in self.a.arms.split(",") if s.strip()]
        if not names:  # "--arms ," prepared the data, ran nothing and exited 0
            raise UserError(f"--arms {self.a.arms!r} names no arm; choose from {', '.join(self.matrix)}")
        bad = [n for n in names if n not in self.matrix]
        if bad:
            raise UserError(f"unknown arm(s) {bad}; choose from {', '.join(self.matrix)}")
        return names

    def spec_of(self, arm: str, variant: str | None = None) -> dict:
        spec = dict(self.matrix[arm])
        if self.a.from_sweep and variant is None:
            best = self.best_sweep_variant(arm)
            if best:
                spec = variant_spec(spec, best) if best != "base" else spec
            if arm not in self._picks_said:  # once per arm: which of the sweep's runs set this arm
                self._picks_said.add(arm)
                done = [v for v in self.trained_variants(arm)
                        if (self.sweep_dir / f"{arm}~{v}" / "final.json").is_file()]
                _log(f"{arm}: --from_sweep picks {best or 'nothing (no finished sweep run)'} from {len(done)} "
                     f"finished sweep run(s) in {self.sweep_dir}" + (f": {', '.join(done)}" if done else ""))
        if variant and variant != "base":
            spec = variant_spec(spec, variant)
        replaced = {k: spec[k] for k, v in self.overrides.items() if k in spec and spec[k] != v
                    and spec[k] != self.matrix[arm].get(k)}  # what the sweep pick or the variant had set
        if replaced and (arm, variant) not in self._overrides_said:  # once; it was silent, so a pick's knob vanished
            self._overrides_said.add((arm, variant))
            _log(f"{arm}{'~' + variant if variant else ''}: --override replaces the "
                 f"{'sweep variant' if variant else 'sweep pick'}'s "
                 + ", ".join(f"{k}={v} with {self.overrides[k]}" for k, v in replaced.items()))
        from ..registry import unused_options

        from ..data.bpe import is_token_model

        skip = unused_options(spec["model"], [k for k in self.overrides if k in MODEL_KEYS])
        if "token_seq_div" in self.overrides and not is_token_model(spec["model"]):
            skip = [*skip, "token_seq_div"]  # a byte arm's window is --seq_len bytes (it halved dense's, silently)
        if not _entropy_patched({**spec, **{k: v for k, v in self.overrides.items() if k not in skip}}):
            # (dense, fixed patches, ...: the trainer never reads them, yet a finished row was refused as trained
            # "with other settings" when another entropy_frac was tried on the entropy arm)
            skip = [*skip, *(k for k in ENTROPY_KEYS if k in self.overrides)]
        if skip and ("skip", arm) not in self._overrides_said:  # the trainer refuses an option its model lacks
            self._overrides_said.add(("skip", arm))
            how = f" with {spec.get('patching', 'entropy')} patching" if spec["model"] == "ionllama" else ""
            _log(f"{arm}: --override {', '.join(skip)} left out: model {spec['model']}{how} does not use "
                 f"{'it' if len(skip) == 1 else 'them'}")
        spec.update({k: v for k, v in self.overrides.items() if k not in skip})
        return spec

    def sweep_subset(self) -> list[str]:
        """--sweep_variants: which variants this process trains (e.g. an arm's sweep split over two GPUs), and
        composed ones ('shallow+lr2x': the winners of single knobs combined)."""
        only = list(dict.fromkeys(s.strip() for s in (self.a.sweep_variants or "").split(",") if s.strip()))
        for v in only:
            if v != "base":
                try:
                    variant_parts(v)
                except UserError as e:
                    raise UserError(f"--sweep_variants: {e}") from None
        return only

    def trained_variants(self, arm: str) -> list[str]:
        """The arm's sweep variants, then any composed ones that have results in the sweep folder."""
        names = list(sweep_variants(self.matrix[arm]))
        for f in sorted(self.sweep_dir.glob(f"{arm}~*+*/final.json")):
            names.append(f.parent.name.split("~", 1)[1])
        return names

    def best_sweep_variant(self, arm: str) -> str | None:
        runs, facts = [], {}
        for v in self.trained_variants(arm):
            f = _read_json(self.sweep_dir / f"{arm}~{v}" / "final.json")
            if f and f.get("val", {}).get("bpb") is not None:
                if (f.get("train") or {}).get("cut_short_s") is not None:  # a part of its budget: no comparison
                    raise UserError(f"--from_sweep: {arm}'s sweep run {v} was cut short by --deadline_s; run the "
                                    "sweep again to finish it (it continues from its checkpoint), or delete it")
                runs.append((v, f["val"]["bpb"], (f.get("train") or {}).get("budget_s")))
                facts[v] = _sweep_facts(f)
        # only runs of one budget compare: a variant swept at 4x the time of the others won by its budget
        budgets = sorted({b for _, _, b in runs if b is not None})
        if len(budgets) > 1:
            each = ", ".join(f"{v} {b:g} s" for v, _, b in runs if b is not None)
            raise UserError(f"--from_sweep: {arm}'s sweep runs trained for different budgets ({each}); train them "
                            "at one --sweep_budget_s (delete the odd ones), or pass the --sweep_dir of one sweep")
        # nor runs scored on other val bytes, or trained with other flags than the variant's own knobs (half a sweep
        # run per GPU with its own --eval_bytes, --batch_size or --seed: the lowest BPB won on those)
        with_flags = [f for f in facts.values() if "flags" in f]
        for flag in {k for f in with_flags for k in f["flags"]}:
            for f in with_flags:
                f[flag] = f["flags"].get(flag, "(default)")
        for what in sorted({k for f in facts.values() for k in f} - {"flags"}):
            have = {v: f[what] for v, f in facts.items() if what in f}
            if len(set(map(str, have.values()))) > 1:
                each = ", ".join(f"{v} {x}" for v, x in have.items())
                raise UserError(f"--from_sweep: {arm}'s sweep runs differ in more than their variant ({what}: {each});"
                                " train them under one setting (delete the odd ones), or pass the --sweep_dir of one "
                                "sweep")
        return min(runs, key=lambda r: r[1])[0] if runs else None

    def sweep_pick(self, arm: str, run_name: str) -> dict | None:
        """What --from_sweep set this row from, for its final.json (the pick's knobs were in the trainer command,
        but not which sweep run, folder and score they came from)."""
        if not self.a.from_sweep or run_name != arm:
            return None
        best = self.best_sweep_variant(arm)
        f = _read_json(self.sweep_dir / f"{arm}~{best}" / "final.json") if best else None
        return {"variant": best, "sweep_dir": str(self.sweep_dir),
                "val_bpb": (f or {}).get("val", {}).get("bpb"),
                "from_runs": [v for v in self.trained_variants(arm)
                              if (self.sweep_dir / f"{arm}~{v}" / "final.json").is_file()]}

    def arm_overhead_s(self) -> float:
        return ARM_OVERHEAD_S if self.a.arm_overhead_s is None else self.a.arm_overhead_s

    def time_left(self) -> float:
        if self.a.deadline_s is None:
            return math.inf
        return self.a.deadline_s - (time.perf_counter() - self.t_start)

    # ------------------------------------------------------------------ trainer flags
    @staticmethod
    def joint_frac(spec: dict) -> float:
        f = _share(spec, "joint_frac", JOINT_FRAC, "0 for none")
        if not 0.0 <= f < 1.0:
            raise UserError(f"joint_frac={f}: give a share of the main + joint steps in [0, 1), e.g. 0 for none")
        return f

    def alt_seq_len(self, spec: dict) -> int | None:
        """The window of this arm's val@N evaluation (--also_eval_seq_len N), or None where there is none: not given,
        or equal to the arm's own window (its val score already)."""
        alt = self.a.also_eval_seq_len
        if not alt:
            return None
        alt_seq = max(8, alt // spec.get("token_seq_div", 1))
        return None if alt_seq == self.seq_len_of(spec) else alt_seq

    def seq_len_of(self, spec: dict) -> int:
        div = spec.get("token_seq_div", 1)
        if not is_whole(div) or div < 1:  # 0 was a ZeroDivisionError, -1 a silent 8-token window
            raise UserError(f"token_seq_div={div}: give a whole number >= 1 (bytes per token of the window), e.g. 4")
        return max(8, self.a.seq_len // div)

    @staticmethod
    def entropy_frac(spec: dict) -> float:
        f = _share(spec, "entropy_frac", 0.06, "0.06")
        if not 0.0 < f < 1.0:  # 1 was a ZeroDivisionError, -1 or 1.5 trained one entropy step without a word
            raise UserError(f"entropy_frac={f}: give the entropy model's share of the budget in (0, 1), e.g. 0.06")
        return f

    @staticmethod
    def _capturable(spec: dict) -> bool:
        """Can this arm's main-phase step be captured (the trainer's own rule, train/step_graph.py)?"""
        from ..config import make_config
        from ..train.step_graph import capture_problem

        cfg = make_config(spec["size"], spec["model"], **{k: spec[k] for k in MODEL_KEYS if k in spec})
        return capture_problem(cfg, "main") is None

    def trainer_argv(self, run_name: str, spec: dict, budget_s: float) -> list[str]:
        a = self.a
        argv = ["--model", spec["model"], "--size", spec["size"]]
        for k in MODEL_KEYS:
            if k in spec and k != "vocab_size":
                argv += [f"--{k}", format_ngram_sizes(spec[k]) if k == "ngram_sizes" else str(spec[k])]
        if spec["model"] == "bpe" and "vocab_size" in spec:
            argv += ["--vocab_size", str(spec["vocab_size"])]
        argv += ["--data_path", a.data_path] if a.data_path else ["--dataset", a.dataset]
        if a.text_field != "text":  # only when given: the recorded commands of earlier arms stay as they were
            argv += ["--text_field", a.text_field]
        seq = self.seq_len_of(spec)
        n_entropy = 0
        if spec["model"] == "ionllama" and spec.get("patching", "entropy") == "entropy":
            f = self.entropy_frac(spec)
            n_entropy = max(1, int(round(NOMINAL_STEPS * f / (1 - f))))
        argv += ["--data_dir", a.data_dir, "--seq_len", str(seq), "--batch_size", str(a.batch_size),
                 "--grad_accum", str(a.grad_accum), "--lr", str(spec["lr"]), "--max_steps", str(NOMINAL_STEPS),
                 "--warmup_steps", str(int(NOMINAL_STEPS * WARMUP_FRAC)), "--entropy_steps", str(n_entropy),
                 "--joint_steps", str(int(NOMINAL_STEPS * self.joint_frac(spec))) if n_entropy else "0",
                 "--max_train_time", str(budget_s), "--eval_interval", str(NEVER), "--save_interval", str(NEVER),
                 "--log_interval", str(a.log_interval), "--save_dir", str(self.ckpt_dir), "--run_name", run_name,
                 "--resume", "auto", "--sample_bytes", "0", "--seed", str(a.seed), "--device", a.device]
        for k in ("weight_decay", "min_lr_ratio"):  # only when overridden: earlier rows ran at the trainer's default
            if k in spec:
                argv += [f"--{k}", str(spec[k])]
        if a.curve_eval_bytes:
            argv += ["--eval_bytes", str(a.curve_eval_bytes)]
        if a.eval_batch_size:
            argv += ["--eval_batch_size", str(a.eval_batch_size)]
        if a.mixed_precision:
            argv += ["--mixed_precision", a.mixed_precision]
        if a.compile:
            argv += ["--compile", "--compile_mode", a.compile_mode]
        if a.step_graph and self._capturable(spec):
            # entropy and space patching: the two-stage step in the main phase; the joint phase (entropy
            # model trained) runs without the graph, the trainer says so
            argv += ["--step_graph"]
        return argv

    # ------------------------------------------------------------------ one arm
    def run_arm(self, arm: str, out_dir: Path, spec: dict, budget_s: float, run_name: str) -> dict | None:
        final_path = out_dir / "final.json"
        if final_path.exists():
            done = _read_json(final_path)
            if not isinstance(done, dict) or not done:  # it read as done with no settings to compare, and the
                # report left it out: the arm could never be finished
                raise UserError(f"{final_path} is not a readable results file (cut short?); delete it to evaluate "
                                f"{run_name} again (its checkpoint is kept), or use another --out")
            diff = _changed_settings(done, spec, self.trainer_argv(run_name, spec, budget_s))
            if diff:  # skipping it would report the old run under the new flags
                raise UserError(f"{final_path} holds {run_name} finished with other settings ({diff}); use "
                                "another --out (or delete that folder) to train it with these")
            self._check_same_data(done, final_path, run_name)
            self._check_same_evals(done, final_path, run_name, spec)
            trained_s = (done.get("train") or {}).get("train_time_s") or 0.0
            if (done.get("train") or {}).get("cut_short_s") is None:
                _log(f"{run_name}: done already ({final_path}); skipped")
                return done
            # a row cut short by --deadline_s: continue it from its checkpoint, so a rerun finishes the arm (on a
            # machine without that checkpoint, e.g. a fresh GPU machine, it trains again from the start)
            from ..train.distributed import latest_checkpoint

            here = latest_checkpoint(self.ckpt_dir / run_name) is not None
            need = budget_s - (trained_s if here else 0.0) + self.arm_overhead_s()
            if self.time_left() < need:
                _log(f"{run_name}: cut short at {trained_s:.0f} s of {budget_s:g} s and not continued "
                     f"({self.time_left():.0f} s left before --deadline_s, ~{need:.0f} s needed); its row stays "
                     "marked cut; run the same command again with more time to finish it")
                return done
            _log(f"{run_name}: cut short at {trained_s:.0f} s of {budget_s:g} s; " +
                 ("continuing from its checkpoint" if here else
                  f"its checkpoint is not under {self.ckpt_dir}, so it trains again from the start"))
            if (out_dir / "tasks.json").exists():  # scored on the cut checkpoint: kept aside, not reported as this row
                (out_dir / "tasks.json").replace(out_dir / "tasks.cut.json")
                if (out_dir / OUTPUTS_FILE).exists():
                    (out_dir / OUTPUTS_FILE).replace(out_dir / ("cut." + OUTPUTS_FILE))
                _log(f"{run_name}: task results of the cut checkpoint moved to {out_dir / 'tasks.cut.json'}")
            marker = self.ckpt_dir / run_name / "experiment.json"
            _write_json(marker, {**(_read_json(marker) or {}), "trained": False})
        else:
            need = budget_s + self.arm_overhead_s()
            if self.time_left() < need:
                _log(f"{run_name}: not started ({self.time_left():.0f} s left before --deadline_s, an arm needs "
                     f"~{need:.0f} s); run the same command again to continue")
                return None
        from ..train.cli import build_train_parser

        targv = self.trainer_argv(run_name, spec, budget_s)
        parser = build_train_parser()

        def reject(message):  # one line naming the flag, instead of the trainer's line and then this one
            raise UserError(f"arm {run_name}: the trainer rejected its flags: {message}; check --override and the "
                            "arm's settings")

        parser.error = reject
        targs = parser.parse_args(targv)
        run_dir = self.ckpt_dir / run_name
        marker = run_dir / "experiment.json"
        state = _read_json(marker) or {}
        self._check_same_run(state, run_dir, run_name, spec, budget_s, targv)
        if not state.get("trained"):  # what a later invocation resuming this arm must match
            run_dir.mkdir(parents=True, exist_ok=True)
            state = {"trained": False, "spec": spec, "budget_s": budget_s,
                     "trainer_command": "ionllama train " + " ".join(shlex.quote(x) for x in targv),
                     "data_sha256": self._data_shas()}
            _write_json(marker, state)
        _log(f"{run_name}: {'evaluating (trained already)' if state.get('trained') else 'training'} "
             f"- ionllama train {' '.join(shlex.quote(x) for x in targv)}")
        try:
            return self._train_and_evaluate(arm, run_name, spec, budget_s, targs, targv, parser, state, marker,
                                            run_dir, out_dir)
        except (MemoryError, RuntimeError, TypeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            # one line instead of a traceback; finished arms' final.json and this arm's checkpoints stay as written
            raise UserError(f"arm {run_name}: out of memory at --batch_size {self.a.batch_size} x --seq_len "
                            f"{self.seq_len_of(spec)}; pass a smaller --batch_size (--grad_accum keeps the batch) or "
                            "--eval_batch_size") from None

    def _data_shas(self) -> list[str]:
        f = self.data_facts()
        return [f["train_sha256"], f["val_sha256"]]

    def _check_same_run(self, state: dict, run_dir: Path, run_name: str, spec: dict, budget_s: float,
                        targv: list[str]) -> None:
        """An arm half-trained (or trained, not yet evaluated) under other settings or on other data is not
        continued: its checkpoint would mix two runs in one result (a new user's report: an arm interrupted at
        --seq_len 64 resumed at 32, and one resumed on edited text, both without a word)."""
        if not state:
            return  # nothing started, or a marker from before the settings were recorded
        if not state.get("trained"):
            from ..train.distributed import latest_checkpoint

            if latest_checkpoint(run_dir) is None:
                return  # stopped before its first checkpoint (a refused flag, out of memory): nothing to mix
        what = "trained" if state.get("trained") else "partly trained"
        if _used(state.get("spec")) != _used(json.loads(json.dumps(spec))) or state.get("budget_s") != budget_s:
            diff = f"{state.get('spec')}, budget {state.get('budget_s')} s"
        else:
            diff = _changed_settings({"trainer_command": state.get("trainer_command", "")}, spec, targv)
            if not diff and state.get("data_sha256") not in (None, self._data_shas()):
                diff = "other train/val data"
        if diff:
            raise UserError(f"{run_dir} holds {run_name} {what} with other settings ({diff}); delete {run_dir} to "
                            "train it again with these, or rerun with the earlier settings")

    def _train_and_evaluate(self, arm, run_name, spec, budget_s, targs, targv, parser, state, marker, run_dir,
                            out_dir) -> dict:
        from ..train.cli import explicit_args

        if not state.get("trained"):
            deadline = None if self.a.deadline_s is None else self.t_start + self.a.deadline_s
            tr = make_budget_trainer(targs, explicit_args(parser, targv), budget_s, self.a.curve_points,
                                     warmup=self.a.warmup, checkpoint_every_s=self.a.checkpoint_every_s,
                                     wall_deadline=deadline, final_evals=1 + len(self.eval_sets()),
                                     final_eval_units=self.final_eval_units(spec),
                                     # the user's own estimate of an arm's time beyond its budget (the reserve
                                     # ignored it: 60 s kept for a 10 s evaluation cut every arm at once)
                                     first_reserve_s=self.a.arm_overhead_s)
            result = tr.run()
            if not result:
                raise UserError(f"{run_name}: the trainer returned no result; see its log above")
            model, device, amp = tr.model, tr.device, tr.amp_dtype
            state = {**state, "trained": True, "spec": spec, "budget_s": budget_s, "step": tr.step,
                     "train_time_s": tr.train_time,
                     "warmup_s": getattr(tr, "warmup_s", None),
                     "cut_short_s": getattr(tr, "cut_short_s", None),
                     "bytes_seen": tr.bytes_seen, "train_bytes": tr.data_meta.get("train_bytes"),
                     "data": tr.data_meta}
            _write_json(marker, state)
            del tr
        else:
            from ..train.checkpoint import load_model
            from ..train.trainer import resolve_amp, resolve_device

            device = resolve_device(self.a.device)
            amp = resolve_amp(self.a.mixed_precision, device)
            model = load_model(run_dir / "latest.pt", device=device)
        final = self.evaluate_arm(arm, run_name, spec, model, device, amp, state, targv, run_dir, budget_s)
        self.write_arm_outputs(out_dir, run_dir, model, spec, final)
        del model
        _free_finished_arm(device)
        return final

    def final_eval_units(self, spec: dict) -> float:
        """The arm's final evaluations in curve points, for the deadline's reserve (the last curve point's seconds x
        this): val, val@N where there is one, and each extra set, each its scored bytes (up to --eval_bytes) over a
        curve point's --curve_eval_bytes. It was 1 + the extra sets: a final val of 3.1 MB against curve points of
        20 kB, scored twice with --also_eval_seq_len, ran to 84 s under --deadline_s 60 (the `timeout` of
        gpu_phase1_parallel.sh would have killed it mid-evaluation: no row)."""
        cap = self.a.eval_bytes

        def units(n: int) -> float:
            return max(1.0, (n if cap is None else min(n, cap)) / self.a.curve_eval_bytes)

        total = units(self.data_facts()["val_bytes"] - 1) * (2 if self.alt_seq_len(spec) is not None else 1)
        for name, path in self.eval_sets():
            if name not in self._set_bytes:  # read once (a size needs the decoded text: jsonl, xz)
                self._set_bytes[name] = len(self._byte_set(name, path, None)) - 1 if cap is None else cap
            total += units(self._set_bytes[name])
        return total

    def _check_same_evals(self, done: dict, final_path: Path, run_name: str, spec: dict) -> None:
        """A finished arm scored under other evaluation flags is not this command's row either: the report would
        rank arms scored on different bytes side by side (a new user's report: 4,000 and 1,500 val bytes in one
        table, under one command)."""
        diff = []
        data = done.get("data") or {}
        if "eval_bytes_cap" in data and data["eval_bytes_cap"] != self.a.eval_bytes:
            diff.append(f"--eval_bytes {data['eval_bytes_cap'] or 'not given'}")
        alt = [k for k in done if k.startswith("val@")]
        # as evaluate_arm writes it: no val@N where N is the arm's own window (the same command run again refused
        # its finished arms as "evaluated with other settings")
        want = [f"val@{self.a.also_eval_seq_len}"] if self.alt_seq_len(spec) is not None else []
        if alt != want:
            diff.append(f"--also_eval_seq_len {alt[0][4:] if alt else 'not given'}")
        missing = [name for name, _ in self.eval_sets() if name not in done]
        if missing:
            diff.append(f"no {', '.join(missing)} evaluation")
        if diff:
            raise UserError(f"{final_path} holds {run_name} evaluated with other settings ({'; '.join(diff)}); use "
                            "another --out (or delete that folder) to evaluate it with these")

    def data_facts(self) -> dict:
        """Sizes and checksums of the train/val shards this command trains on (built here if need be)."""
        if self._data_facts is None:
            from ..data.shards import DataArgs, prepare

            self._data_facts = _split_facts(prepare(DataArgs(dataset=self.a.dataset, data_path=self.a.data_path,
                                                             data_dir=self.a.data_dir,
                                                             text_field=self.a.text_field), log=lambda _m: None))
        return self._data_facts

    def _check_same_data(self, done: dict, final_path: Path, run_name: str) -> None:
        """A finished arm trained on other data is not this command's result. --data_path itself may differ (the
        same files copied elsewhere, as on the GPU machine), so the shards' checksums say whether the text is the
        same (a new user's report: the arms were skipped and the report relabelled). A final.json written before
        the checksums were recorded is compared by the split sizes."""
        old = done.get("data") or {}
        if not (old.get("train_bytes") and old.get("val_bytes")):
            return  # a final.json from before the sizes were recorded
        now = self.data_facts()
        keys = ("train_sha256", "val_sha256") if old.get("train_sha256") else ("train_bytes", "val_bytes")
        if any(old.get(k) != now[k] for k in keys):
            sizes = (old["train_bytes"], old["val_bytes"]) == (now["train_bytes"], now["val_bytes"])
            what = ("the same sizes, other checksums" if sizes else
                    f"{old['train_bytes']:,} train / {old['val_bytes']:,} val bytes; now {now['train_bytes']:,} / "
                    f"{now['val_bytes']:,}")
            raise UserError(f"{final_path} holds {run_name} trained on other data (from {old.get('path')}: {what}); "
                            "use another --out to train it on this data")

    # ------------------------------------------------------------------ evaluation of one arm
    def eval_sets(self) -> list[tuple[str, str | None]]:
        """(name, path) of the extra evaluation sets: test (with --final_test) and --eval_data."""
        sets, owner = [], {}
        if self.a.final_test:
            p = _split_path(self.a.data_path or "", "test")
            if p is None:
                raise UserError("--final_test needs a --data_path with '{split}' and a test file next to train/val")
            sets.append(("test", p))
            owner["test"] = f"--final_test's split {p}"
        for p in self.a.eval_data or []:
            if not Path(p).exists():
                raise UserError(f"--eval_data {p} does not exist; give a text/jsonl(.xz) file or a directory")
            name = Path(p).name.split(".")[0]
            # final.json holds each set's result under its name, beside val, val@N and the row's own keys: a
            # val.jsonl replaced the val score, and of two wikipedia-val files one result was lost
            if name == "val" or name.startswith("val@") or name in FINAL_KEYS:
                raise UserError(f"--eval_data {p} would be named '{name}', a key final.json holds already (the row's "
                                f"{name} entry); rename the file")
            if name in owner:
                raise UserError(f"--eval_data {p} and {owner[name]} are both named '{name}' in final.json (one "
                                "result would replace the other); rename one file, or pass only one of them")
            owner[name] = f"--eval_data {p}"
            sets.append((name, p))
        return sets

    def _byte_set(self, name: str, path: str | None, val: np.ndarray | None, margin: int = 0) -> np.ndarray:
        """The bytes of an evaluation set, starting with DOC_SEP (so byte and token models score the same
        bytes: all but the first), capped at --eval_bytes scored bytes, plus `margin` bytes past the cap (a token
        model's tokens of the capped bytes are those of the text that goes on: _bpb cuts them)."""
        from ..data import DOC_SEP

        if path is None:
            data = val
        else:
            from ..eval.loading import read_eval_bytes

            data = read_eval_bytes(path, text_field=self.a.text_field)
            if data[0] != DOC_SEP:
                data = np.concatenate([np.array([DOC_SEP], dtype=np.uint8), data])
        if self.a.eval_bytes is not None:
            data = data[: self.a.eval_bytes + 1 + margin]
        return data

    def _scored(self, data: np.ndarray) -> int:
        """How many bytes of a _byte_set are scored (all but the first, up to --eval_bytes)."""
        return len(data) - 1 if self.a.eval_bytes is None else min(len(data) - 1, self.a.eval_bytes)

    def _bpb(self, model, data: np.ndarray, seq_len: int, device, amp, shard_tokens=None) -> dict:
        t0 = time.perf_counter()
        if getattr(model, "token_level", False):
            from ..data.bpe import evaluate_token_bpb, token_prefix_for_bytes

            # --eval_bytes N: the whole tokens within the first N + 1 bytes of the tokens of the text that goes on,
            # as the trainer and `ionllama bench` take them (encoding the cut bytes split the last token: the same
            # checkpoint scored ~1e-3 BPB apart at a few kB)
            toks = shard_tokens if shard_tokens is not None else model.bpe.encode(data)
            toks = token_prefix_for_bytes(toks, model.bpe.token_nbytes, self.a.eval_bytes)
            r = evaluate_token_bpb(model, toks, seq_len, self.a.eval_batch_size or self.a.batch_size, device, amp)
            r["bytes_per_patch"] = r.pop("bytes_per_token")
        else:
            from ..eval.bpb import evaluate_bpb

            r = dict(evaluate_bpb(model, data, seq_len, self.a.eval_batch_size or self.a.batch_size, device,
                                  amp_dtype=amp))
        r["seconds"] = time.perf_counter() - t0
        return r

    def evaluate_arm(self, arm, run_name, spec, model, device, amp, state, targv, run_dir, budget_s) -> dict:
        from ..data.shards import open_shards
        from ..eval.benchmark import device_info, git_commit

        data_dir = Path(state["data"]["path"]) if state.get("data", {}).get("path") else None
        if data_dir is None:
            raise UserError(f"{run_name}: the trained run records no data folder; delete {run_dir} and run again")
        shards = open_shards(data_dir)
        seq = self.seq_len_of(spec)
        token_level = getattr(model, "token_level", False)
        margin = TOKEN_CUT_MARGIN if token_level else 0
        val = self._byte_set("val", None, np.asarray(shards.val), margin)
        shard_tokens = None
        if token_level:
            tok_dir = state["data"].get("token_dir")
            if tok_dir:
                from ..data.bpe import open_token_shards

                ts = open_token_shards(tok_dir)
                if ts.bpe.to_str() == model.bpe.to_str():
                    shard_tokens = ts.val
        model.eval()
        _log(f"{run_name}: final evaluation on {self._scored(val):,} val bytes")
        res = {"val": self._bpb(model, val, seq, device, amp, shard_tokens)}
        alt, alt_seq = self.a.also_eval_seq_len, self.alt_seq_len(spec)
        if alt_seq is not None:
            # the same val bytes in windows of another length: separates a longer-context model's gain from the
            # longer eval window it is scored with (each window starts from an empty context)
            unit = "tokens" if spec.get("token_seq_div", 1) > 1 else "bytes"
            _log(f"{run_name}: val again in windows of {alt_seq} {unit}")
            res[f"val@{alt}"] = dict(self._bpb(model, val, alt_seq, device, amp, shard_tokens), seq_len=alt_seq)
        for name, path in self.eval_sets():
            data = self._byte_set(name, path, None, margin)
            _log(f"{run_name}: evaluating {name} ({self._scored(data):,} bytes of {path})")
            res[name] = self._bpb(model, data, seq, device, amp)
            res[name]["path"] = path
        params = model.count_parameters()
        emb = sum(v for k, v in params.items() if k in ("embed",))
        bpt = state["data"].get("bytes_per_token")
        train_bytes = state["data"].get("train_bytes") or len(shards.train)
        records = self._trainer_records(run_dir)
        flops = add_flops(records, model, seq, bpt)[-1]["train_flops"] if records else None
        bytes_seen = state["bytes_seen"]
        cfg = model.config.to_dict()
        return {
            "arm": arm, "run": run_name, "model": spec["model"], "spec": spec, "model_config": cfg,
            "sweep_pick": self.sweep_pick(arm, run_name),
            "params": params["total"], "params_non_embedding": params["total"] - emb, "params_by_part": params,
            **res,
            "bytes_per_patch": res["val"].get("bytes_per_patch"),
            "train": {"budget_s": budget_s, "train_time_s": state["train_time_s"], "steps": state["step"],
                      # set when the wall-clock deadline stopped training early: not comparable with full rows
                      "cut_short_s": state.get("cut_short_s"),
                      "warmup_s_excluded": state.get("warmup_s"), "compile": bool(self.a.compile),
                      "step_graph": "--step_graph" in targv,
                      "bytes_seen": bytes_seen, "bytes_per_s": bytes_seen / max(state["train_time_s"], 1e-9),
                      "epochs": bytes_seen / max(train_bytes, 1), "train_flops": flops,
                      "seq_len": seq, "batch_size": self.a.batch_size * self.a.grad_accum,
                      "seq_len_unit": "tokens" if spec["model"] == "bpe" else "bytes", "bytes_per_token": bpt,
                      "schedule": f"time-based: warmup {WARMUP_FRAC:.0%}, cosine to "
                                  f"{float(spec.get('min_lr_ratio', DEFAULT_MIN_LR_RATIO)):.0%} over the budget"
                                  + (f", entropy model first {spec.get('entropy_frac', 0.06):.0%}, joint last "
                                     f"{self.joint_frac(spec):.0%}" if spec["model"] == "ionllama" and
                                     spec.get("patching", "entropy") == "entropy" else "")},
            "data": {"path": self.a.data_path or self.a.dataset, "shards": str(data_dir),
                     "train_bytes": train_bytes, "val_bytes": len(shards.val),
                     **{f"{s}_sha256": shards.meta["splits"][s]["sha256"] for s in ("train", "val")},
                     "eval_bytes_cap": self.a.eval_bytes},
            "command": self.command,
            "trainer_command": "ionllama train " + " ".join(shlex.quote(x) for x in targv),
            "device": device_info(device), "date": _now_iso(), "git": git_commit(),
        }

    def _trainer_records(self, run_dir: Path) -> list[dict]:
        from ..train.metrics import metrics_file, read_metrics

        return read_metrics(run_dir) if metrics_file(run_dir) else []

    def write_arm_outputs(self, out_dir: Path, run_dir: Path, model, spec: dict, final: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        recs = add_flops(self._trainer_records(run_dir), model, final["train"]["seq_len"],
                         final["train"]["bytes_per_token"])
        last_flops = recs[-1]["train_flops"] if recs else None
        recs.append({"step": final["train"]["steps"], "phase": "final", "bytes_seen": final["train"]["bytes_seen"],
                     "train_time_s": final["train"]["train_time_s"], "train_flops": last_flops,
                     **{f"val_{k}": v for k, v in final["val"].items() if isinstance(v, (int, float))}})
        with open(out_dir / "metrics.jsonl.tmp", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        (out_dir / "metrics.jsonl.tmp").replace(out_dir / "metrics.jsonl")
        cfg = _read_json(run_dir / "config.json")
        if cfg is not None:
            _write_json(out_dir / "config.json", cfg)
        _write_json(out_dir / "final.json", final)
        t = final["train"]
        _log(f"{final['run']}: val bpb {final['val']['bpb']:.4f} over {final['val']['bytes']:,} bytes; "
             f"{t['steps']} steps in {t['train_time_s']:.0f} s ({_rate(t['bytes_per_s'])}); "
             f"-> {out_dir / 'final.json'}")

    # ------------------------------------------------------------------ stages
    def prepare(self, eval_sets: bool = True) -> None:
        """Byte shards, the token shards of the token arms and the extra evaluation sets, without training
        (the first call on a fresh machine; later arms then start training at once)."""
        from ..data.shards import DataArgs, prepare

        t0 = time.perf_counter()
        byte_dir = prepare(DataArgs(dataset=self.a.dataset, data_path=self.a.data_path, data_dir=self.a.data_dir,
                                    text_field=self.a.text_field), log=_log)
        self._data_facts = _split_facts(byte_dir)
        for arm in self.arm_names():
            spec = self.spec_of(arm)
            if spec["model"] == "bpe":
                from ..data.bpe import DEFAULT_VOCAB, prepare_tokens

                prepare_tokens(byte_dir, int(spec.get("vocab_size", DEFAULT_VOCAB)), log=_log)
        for name, path in self.eval_sets():
            if eval_sets:
                _log(f"eval set {name}: {len(self._byte_set(name, path, None)) - 1:,} bytes from {path}")
            else:  # read after training; its first bytes now, so a corrupt file fails before the arms train
                from ..eval.loading import read_eval_bytes

                read_eval_bytes(path, max_bytes=4096, text_field=self.a.text_field)
        _log(f"data ready in {time.perf_counter() - t0:.0f} s")

    def pretrain(self) -> None:
        for arm in self.arm_names():
            spec = self.spec_of(arm)
            self.run_arm(arm, self.out / arm, spec, self.a.budget_s, arm)

    def sweep(self) -> None:
        budget = self.a.sweep_budget_s or self.a.budget_s
        only = self.sweep_subset()
        composed = [v for v in only if "+" in v]
        for arm in self.arm_names():
            for v in (*sweep_variants(self.matrix[arm]), *composed):
                if only and v not in only:
                    continue
                if any(p not in sweep_variants(self.matrix[arm]) for p in v.split("+")):
                    _log(f"{arm}~{v}: not a variant of this arm (its model has no such knob); skipped")
                    continue
                name = f"{arm}~{v}"
                self.run_arm(arm, self.sweep_dir / name, self.spec_of(arm, v), budget, name)
        # the picks said before the sweep ran (the up-front config check) named what was on disk then: say them again
        self._picks_said.clear()

    def _check_same_tasks(self, out: Path, arm: str) -> None:
        """Task results of other task settings are not skipped into a table headed "identical task fine-tuning"
        (a new user's report: one arm's row from 3 steps, the next from 6)."""
        old = _read_json(out) or {}
        ft, res = old.get("fine_tuning") or {}, old.get("results") or {}
        a = self.a
        now = {"steps": ("--task_steps", a.task_steps), "examples_per_step": ("--task_batch", a.task_batch),
               "lr": ("--task_lr", a.task_lr), "row_len": ("--task_seq_len", a.task_seq_len),
               "seed": ("--seed", a.seed), "compiled": ("--task_compile", bool(getattr(a, "task_compile", False)))}
        diff = [f"{flag} {ft[k]}" for k, (flag, v) in now.items() if k in ft and ft[k] != v]
        if res.get("n_per_cell") not in (None, a.task_n):
            diff.append(f"--task_n {res['n_per_cell']}")
        if diff:
            raise UserError(f"{out} holds {arm}'s task results under other settings ({', '.join(diff)}); use another "
                            "--out (or delete that file) to run the task stage with these")

    def _pretrained_here(self, arm: str) -> bool:
        """The arm's checkpoint is this command's finished pretraining: its final.json is in --out, under this
        command's settings. The task stage scored whatever latest.pt lay in --ckpt_dir: a run stopped half-way, or
        one trained with other flags, without a word (a new user's audit)."""
        final = self.out / arm / "final.json"
        if not final.is_file():
            _log(f"{arm}: not pretrained in {self.out} yet (no final.json); task stage skipped: run the pretrain "
                 "stage first")
            return False
        done = _read_json(final) or {}
        spec = self.spec_of(arm)
        diff = _changed_settings(done, spec, self.trainer_argv(arm, spec, self.a.budget_s))
        if diff:
            raise UserError(f"{final} holds {arm} pretrained with other settings ({diff}); run the task stage with "
                            "the flags it was pretrained with")
        cut = (done.get("train") or {}).get("cut_short_s")
        if cut is not None:  # its task row sat in the "identical task fine-tuning" table, unmarked, beside full ones
            _log(f"{arm}: pretrained {cut:.0f} s of its {self.a.budget_s:g} s budget (cut short by --deadline_s); "
                 "task stage skipped: run the pretrain stage again to finish it first")
            return False
        return True

    def _check_task_checkpoint(self, arm: str, ck: Path) -> None:
        """The task stage fine-tunes --ckpt_dir's latest.pt and reports it beside the arm's final.json: a
        checkpoint of another run there (another budget, 642 steps against the row's 1,320) was fine-tuned without
        a word."""
        from ..train.distributed import checkpoint_header

        final = _read_json(self.out / arm / "final.json") or {}
        steps = (final.get("train") or {}).get("steps")
        step = (checkpoint_header(ck) or {}).get("step")  # unreadable: load_model says why in its own line
        if steps is not None and step is not None and int(step) != int(steps):
            raise UserError(f"{ck} is at step {step}, but {self.out / arm / 'final.json'} reports {steps} steps: it "
                            f"is not the checkpoint behind that row; pass the --ckpt_dir it was trained in, or "
                            f"retrain the arm")

    def tasks(self) -> None:
        arms = [s.strip() for s in (self.a.task_arms or ",".join(TASK_ARMS)).split(",") if s.strip()]
        for arm in arms:
            if arm not in self.matrix:
                raise UserError(f"--task_arms: unknown arm '{arm}'; choose from {', '.join(self.matrix)}")
            out = self.out / arm / "tasks.json"
            if out.exists():
                self._check_same_tasks(out, arm)
                _log(f"{arm}: task results exist ({out}); skipped")
                continue
            if self.time_left() < self.a.task_time_s:
                _log(f"{arm}: task stage not started (too little time before --deadline_s); run again to continue")
                return
            if not self._pretrained_here(arm):
                continue
            ck = self.ckpt_dir / arm / "latest.pt"
            if not ck.is_file():
                _log(f"{arm}: no checkpoint {ck} (train the arm first on this machine); task stage skipped")
                continue
            from ..train.checkpoint import load_model
            from ..train.trainer import resolve_amp, resolve_device

            device = resolve_device(self.a.device)
            amp = resolve_amp(self.a.mixed_precision, device)
            self._check_task_checkpoint(arm, ck)
            model = load_model(ck, device=device)
            try:
                deadline = None if self.a.deadline_s is None else self.t_start + self.a.deadline_s
                res = run_task_stage(model, device, amp, self.a, deadline=deadline, log=lambda m: _log(f"{arm}: {m}"))
            except TaskStageCut as cut:
                _log(f"{arm}: task stage {cut} before --deadline_s less --task_eval_s {self.a.task_eval_s:.0f} s "
                     f"for its scoring; no task scores written. Give the task stage more time (a call of its own) or "
                     f"pass fewer --task_steps")
                return
            except (MemoryError, RuntimeError, TypeError) as e:  # torch.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(e):
                    raise
                raise UserError(f"arm {arm}: out of memory in the task stage at --task_batch {self.a.task_batch} x "
                                f"--task_seq_len {self.a.task_seq_len}; pass a smaller --task_batch") from None
            res.update({"arm": arm, "checkpoint": str(ck), "command": self.command, "date": _now_iso(),
                        "device": _device_info(device), "git": _git()})
            # every scored example beside the scores (tasks.json keeps a few samples per cell): the errors' analysis
            # (scripts/task_errors.py) reads them. Written first: tasks.json is what marks the stage done.
            outputs = res["results"].pop("outputs", None)
            if outputs is not None:
                write_outputs(out.parent / OUTPUTS_FILE, outputs)
                res["results"]["outputs_file"] = OUTPUTS_FILE
            _write_json(out, res)
            acc = ", ".join(f"{t} {_fmt(r['accuracy'], 2)}" for t, r in res["results"]["per_task"].items())
            _log(f"{arm}: task accuracy (test split) {acc} -> {out}")
            del model, res
            _free_finished_arm(device)


def _free_finished_arm(device: torch.device) -> None:
    """A finished arm's model stays alive in its trainer's reference cycles (seen on a CPU), and with it whatever CUDA
    memory they hold, until the cyclic collector runs: a process's third mamba sweep cell ran out of memory as it
    started (sixty-first session, H100 80 GB). Collect, then hand the freed blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rate(bytes_per_s: float) -> str:
    """MB/s on a GPU; KB/s for CPU runs, which read "0.00 MB/s" (as the report's table does)."""
    return f"{bytes_per_s / 1e6:.2f} MB/s" if bytes_per_s >= 1e5 else f"{bytes_per_s / 1e3:.2f} KB/s"


def _split_facts(byte_dir: Path) -> dict:
    splits = json.loads((Path(byte_dir) / "meta.json").read_text())["splits"]
    return {f"{s}_{k}": (int(splits[s]["bytes"]) if k == "bytes" else splits[s]["sha256"])
            for s in ("train", "val") for k in ("bytes", "sha256")}


def _device_info(device):
    from ..eval.benchmark import device_info

    return device_info(device)


def _git():
    from ..eval.benchmark import git_commit

    return git_commit()
