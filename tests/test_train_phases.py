"""The three training phases (entropy model -> calibration -> main -> joint) on a small fake model that
implements the protocol of ionllama/model/ionllama_model.py, and exact resume inside every phase."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ionllama.config import ModelConfig
from ionllama.model.dense import ParamCountMixin
from ionllama.registry import _REGISTRY
from ionllama.train.checkpoint import load_checkpoint
from ionllama.train.cli import main
from ionllama.train.metrics import read_metrics

from test_train import write_corpus

LN2 = math.log(2.0)


class FakeEntropyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.head = nn.Linear(16, 256)

    def forward(self, x, targets=None):
        logits = self.head(self.embed(x))
        out = {"logits": logits, "loss": None, "bpb": None}
        if targets is not None:
            out["loss"] = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), ignore_index=-100)
            out["bpb"] = out["loss"].detach() / LN2
        return out


class FakePatchedLM(ParamCountMixin, nn.Module):
    """Patches start where the entropy model's next-byte entropy exceeds a calibrated threshold; the
    threshold starts at -inf, so before calibration every byte is its own patch."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.entropy_model = FakeEntropyLM()
        self.embed = nn.Embedding(256, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 256)
        self.register_buffer("threshold", torch.tensor(float("-inf")))

    @property
    def needs_entropy_phase(self) -> bool:
        return self.config.patching == "entropy"

    def freeze_entropy(self, frozen: bool = True) -> None:
        for p in self.entropy_model.parameters():
            p.requires_grad_(not frozen)

    def _entropy(self, x):
        with torch.no_grad():
            logp = F.log_softmax(self.entropy_model(x)["logits"].float(), -1)
        return -(logp.exp() * logp).sum(-1)

    def calibrate_threshold(self, x):
        ent = self._entropy(x).flatten()
        self.threshold.fill_(torch.quantile(ent, 1 - 1 / self.config.target_patch_size).item())
        bpp = x.numel() / self._n_patches(x).sum().item()
        return {"threshold": self.threshold, "bytes_per_patch": bpp}

    def _n_patches(self, x):
        starts = self._entropy(x) > self.threshold
        starts[:, 0] = True
        return starts.sum(1)

    def forward(self, x, targets=None):
        logits = self.head(torch.tanh(self.mix(self.embed(x))))
        out = {"logits": logits, "loss": None, "bpb": None, "n_patches": self._n_patches(x), "aux_loss": None}
        if targets is not None:
            out["loss"] = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), ignore_index=-100)
            out["bpb"] = out["loss"].detach() / LN2
            if any(p.requires_grad for p in self.entropy_model.parameters()):
                out["aux_loss"] = self.entropy_model(x, targets)["loss"]
        return out


@pytest.fixture
def fake_model():
    _REGISTRY["fake_patched"] = FakePatchedLM
    yield "fake_patched"
    _REGISTRY.pop("fake_patched", None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


def run(tmp_path, corpus, name, *extra):
    argv = ["--model", "fake_patched", "--data_path", str(corpus), "--data_dir", str(tmp_path / "cache"),
            "--save_dir", str(tmp_path / "runs"), "--run_name", name, "--seq_len", "32", "--batch_size", "4",
            "--max_steps", "10", "--entropy_steps", "6", "--joint_steps", "3", "--log_interval", "1",
            "--eval_interval", "4", "--sample_bytes", "0", "--device", "cpu", "--val_fraction", "0.1",
            "--lr", "3e-3", "--warmup_steps", "2", "--eval_batch_size", "64"] + list(extra)
    assert main(argv) == 0
    return tmp_path / "runs" / name


def params(ck, prefix):
    return {k: v for k, v in ck["model"].items() if k.startswith(prefix)}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_phases_in_order_with_calibration(tmp_path, corpus, fake_model, capsys):
    d = run(tmp_path, corpus, "straight")
    recs = read_metrics(d / "metrics.jsonl")
    train = [(r["step"], r["phase"]) for r in recs if "loss" in r]
    assert train == [(s, "entropy") for s in range(1, 7)] + [(s, "main") for s in range(7, 14)] + \
        [(s, "joint") for s in range(14, 17)]
    init = recs[0]
    assert init["phase"] == "init" and init["val_bytes_per_patch"] == pytest.approx(1.0)  # before calibration
    cal = [r for r in recs if r["phase"] == "calibrate"]
    # after phase 1, and at every evaluation of the joint phase (the entropy model trains there, so the threshold
    # set after phase 1 drifts off --target_patch_size): here the final one at step 16
    assert [r["step"] for r in cal] == [6, 16] and all(3.0 <= r["bytes_per_patch"] <= 5.0 for r in cal)
    final_eval = [r for r in recs if "val_bpb" in r and r["step"] == 16]
    assert len(final_eval) == 1 and 3.0 <= final_eval[0]["val_bytes_per_patch"] <= 5.0
    after = [r for r in recs if "val_bpb" in r and r["step"] == 6 and r["phase"] == "main"]
    assert len(after) == 1 and 3.0 <= after[0]["val_bytes_per_patch"] <= 5.0  # evaluated right after calibration
    assert all(3.0 <= r["bytes_per_patch"] <= 5.5 for r in recs if r.get("phase") in ("main", "joint") and "loss" in r)
    assert all("bytes_per_patch" not in r for r in recs if r["phase"] == "entropy")
    ck = load_checkpoint(d / "final.pt")
    assert ck["phase"] == "joint" and ck["step"] == 16 and torch.isfinite(ck["model"]["threshold"])
    # a larger --max_steps on the finished run: step 16 would fall back into the main phase (it recalibrated and ran
    # the joint phase again); refused, naming the --joint_steps that makes the added steps joint
    with pytest.raises(SystemExit) as e:
        run(tmp_path, corpus, "straight", "--resume", "auto", "--max_steps", "14")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "would go back a phase" in err[0] and "--joint_steps 4" in err[0]
    assert load_checkpoint(d / "latest.pt")["step"] == 16  # nothing rewritten
    run(tmp_path, corpus, "straight", "--resume", "auto", "--max_steps", "14", "--joint_steps", "4")
    recs = read_metrics(d / "metrics.jsonl")
    assert [(r["step"], r["phase"]) for r in recs if "loss" in r][-4:] == [(s, "joint") for s in range(17, 21)]
    assert [r["step"] for r in recs if r["phase"] == "calibrate"] == [6, 16, 20]  # phase 2 was not entered again


def test_each_phase_trains_only_its_parameters_and_resume_is_exact_in_every_phase(tmp_path, corpus, fake_model,
                                                                                  capsys):
    straight = run(tmp_path, corpus, "straight")
    paused = run(tmp_path, corpus, "paused", "--stop_at", "5")  # inside phase 1
    ck_entropy = load_checkpoint(paused / "latest.pt")
    run(tmp_path, corpus, "paused", "--resume", "auto", "--stop_at", "6")  # end of phase 1
    ck_p1 = load_checkpoint(paused / "latest.pt")
    run(tmp_path, corpus, "paused", "--resume", "auto", "--stop_at", "10")  # inside phase 2
    run(tmp_path, corpus, "paused", "--resume", "auto", "--stop_at", "13")  # end of phase 2
    ck_p2 = load_checkpoint(paused / "latest.pt")
    run(tmp_path, corpus, "paused", "--resume", "auto", "--stop_at", "15")  # inside phase 3
    ck_joint = load_checkpoint(paused / "latest.pt")
    run(tmp_path, corpus, "paused", "--resume", "auto")
    ck_end = load_checkpoint(paused / "final.pt")
    assert [c["phase"] for c in (ck_entropy, ck_p1, ck_p2, ck_joint, ck_end)] == \
        ["entropy", "entropy", "main", "joint", "joint"]

    torch.manual_seed(0)  # the model as the trainer initialised it (--seed 0)
    init = {"model": FakePatchedLM(ModelConfig.from_dict(ck_end["model_config"])).state_dict()}
    for prefix in ("embed.", "mix.", "head."):  # phase 1 leaves the main model untouched
        assert same(params(ck_p1, prefix), params(init, prefix))
    assert not same(params(ck_p1, "entropy_model."), params(init, "entropy_model."))
    assert same(params(ck_p2, "entropy_model."), params(ck_p1, "entropy_model."))  # phase 2: entropy frozen
    assert not same(params(ck_p2, "mix."), params(ck_p1, "mix."))
    assert not same(params(ck_end, "entropy_model."), params(ck_p2, "entropy_model."))  # phase 3: both train
    assert not same(params(ck_end, "mix."), params(ck_p2, "mix."))

    def points(d):  # every logged point but the timings; a resumed run logs exactly the same, once
        return [{k: v for k, v in r.items() if k not in ("train_time_s", "bytes_per_s", "host_ms_per_step", "gpu_wait_ms")}
                for r in read_metrics(d / "metrics.jsonl")]

    assert points(straight) == points(paused)
    assert [r["phase"] for r in points(paused)].count("calibrate") == 2
    # back to a checkpoint written at the end of phase 1 by a run that went on past it (calibrated, trained)
    branch = run(tmp_path, corpus, "branch", "--stop_at", "9", "--save_interval", "6")
    capsys.readouterr()
    before = points(branch)
    run(tmp_path, corpus, "branch", "--resume", str(branch / "step_6.pt"))
    notes = [m for m in capsys.readouterr().out.splitlines() if m.startswith("note:")]
    assert len(notes) == 2 and "went on to step 9" in notes[0] and "--run_name NEW" in notes[0], notes
    # and its checkpoints too: they were overwritten as the new branch saved (best.pt by a worse model)
    kept_dir = branch / "before-resume-step6"
    assert "best.pt, latest.pt" in notes[1] and str(kept_dir) in notes[1], notes
    assert load_checkpoint(kept_dir / "best.pt")["step"] == 8 and load_checkpoint(kept_dir / "latest.pt")["step"] == 9
    assert load_checkpoint(branch / "final.pt")["step"] == 16 and (branch / "step_6.pt").is_file()
    # the abandoned branch's points are kept aside, not lost: with the ones kept, they are the first run's log
    aside = branch / "metrics.before-resume-step6.jsonl"
    assert aside.name in notes[0]
    moved = [{k: v for k, v in r.items() if k not in ("train_time_s", "bytes_per_s", "host_ms_per_step",
                                                       "gpu_wait_ms")} for r in read_metrics(aside)]
    assert moved and min(r["step"] for r in moved) >= 6 and max(r["step"] for r in moved) == 9
    kept = [r for r in before if r not in moved]
    assert len(kept) + len(moved) == len(before) and points(branch)[:len(kept)] == kept
    assert points(branch) == points(straight)
    assert same(load_checkpoint(straight / "final.pt")["model"], ck_end["model"])
    # a second resume from the same step sets the second branch aside under a new name: it was moved over the first
    first_final = (kept_dir / "final.pt").read_bytes() if (kept_dir / "final.pt").exists() else None
    first_metrics = aside.read_text()
    run(tmp_path, corpus, "branch", "--resume", str(branch / "step_6.pt"))
    notes = [m for m in capsys.readouterr().out.splitlines() if m.startswith("note:")]
    second = branch / "before-resume-step6-2"
    assert str(second) in notes[-1] and "metrics.before-resume-step6-2.jsonl" in notes[0], notes
    assert load_checkpoint(second / "final.pt")["step"] == 16  # the second branch's end
    assert load_checkpoint(kept_dir / "best.pt")["step"] == 8 and load_checkpoint(kept_dir / "latest.pt")["step"] == 9
    assert aside.read_text() == first_metrics and (branch / "metrics.before-resume-step6-2.jsonl").is_file()
    assert first_final is None or (kept_dir / "final.pt").read_bytes() == first_final


def test_dense_models_run_only_the_main_phase(tmp_path, corpus, capsys):
    d = run(tmp_path, corpus, "dense", "--model", "dense", "--d_model", "32", "--n_layers", "1", "--n_heads", "2")
    phases = {r["phase"] for r in read_metrics(d / "metrics.jsonl")}
    assert phases == {"init", "main"}
    # run() passes --entropy_steps 6 --joint_steps 3: taken without a word before
    notes = [m for m in capsys.readouterr().out.splitlines() if m.startswith("note:")]
    assert notes == ["note: --entropy_steps and --joint_steps have no effect: --model dense has no entropy model to "
                     "train, so it trains the main phase only"], notes


def test_resume_at_a_joint_evaluation_keeps_its_calibration_point(tmp_path, corpus, fake_model):
    """The joint phase recalibrates before each evaluation, and the checkpoint of that step is saved after it: a
    resume from there must keep that calibration point (it is not logged again), so the log equals a straight run."""
    def points(d):
        return [{k: v for k, v in r.items() if k not in ("train_time_s", "bytes_per_s", "host_ms_per_step", "gpu_wait_ms")}
                for r in read_metrics(d / "metrics.jsonl")]

    straight = run(tmp_path, corpus, "s2", "--eval_interval", "2")
    paused = run(tmp_path, corpus, "p2", "--eval_interval", "2", "--stop_at", "14")
    run(tmp_path, corpus, "p2", "--eval_interval", "2", "--resume", "auto")
    assert [r["step"] for r in points(straight) if r["phase"] == "calibrate"] == [6, 14, 16]
    assert points(paused) == points(straight)


class PoisonedLM(FakePatchedLM):
    """Its main-phase loss turns NaN at the `poison_at`-th training forward, as a diverging run's would: the NaN
    gradients make AdamW's weights NaN too, so every later loss is NaN."""
    poison_at: int | None = None

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def forward(self, x, targets=None):
        out = super().forward(x, targets)
        if self.training and targets is not None:
            self.calls += 1
            if self.poison_at is not None and self.calls >= self.poison_at:
                out["loss"] = self.poison(out["loss"])
        return out

    def poison(self, loss):
        return loss * float("nan")


def test_a_diverged_run_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path, corpus, capsys):
    _REGISTRY["fake_patched"] = PoisonedLM
    try:
        PoisonedLM.poison_at = 3  # main phase: steps 7.. ; the third main step is step 9; latest.pt holds step 8
        with pytest.raises(SystemExit) as e:
            run(tmp_path, corpus, "nan", "--max_steps", "16")
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert "loss became nan by step 9 (main phase)" in err[0] and "holds step 8" in err[0]
        assert "--lr 0.0015" in err[0]
        d = tmp_path / "runs" / "nan"
        ck = load_checkpoint(d / "latest.pt")
        assert ck["step"] == 8 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
        assert not (d / "final.pt").exists()
        assert max(r["step"] for r in read_metrics(d / "metrics.jsonl")) == 8  # the NaN steps were not logged
        PoisonedLM.poison_at = None  # the hint's lower --lr resumes it to the end
        run(tmp_path, corpus, "nan", "--max_steps", "16", "--resume", "auto", "--lr", "1.5e-3")
        assert load_checkpoint(d / "final.pt")["step"] == 22
    finally:
        PoisonedLM.poison_at = None
        _REGISTRY.pop("fake_patched", None)


class GradPoisonedLM(PoisonedLM):
    """From its `poison_at`-th training forward on, the loss stays finite but the gradient is NaN (0 x sqrt(0)'s
    backward is 0 x inf), as an overflow in a backward makes it: the step that ruins the weights logs a finite loss,
    and only the next step's loss is NaN."""
    poison_at: int | None = None

    def poison(self, loss):
        return loss + 0.0 * torch.sqrt(0.0 * self.mix.weight.sum())


def test_weights_ruined_behind_a_finite_loss_are_not_saved_over_the_last_good_checkpoint(tmp_path, corpus, capsys):
    """The loss check saw step 8's loss (finite, taken before its update) and let step 8's NaN weights be saved as
    latest.pt; step 9's NaN loss then named that file as the one kept ("resume from it"), and the resume was NaN."""
    _REGISTRY["fake_patched"] = GradPoisonedLM
    try:
        GradPoisonedLM.poison_at = 2  # main phase: steps 7.. ; the second main step is step 8, an evaluation step
        with pytest.raises(SystemExit) as e:
            run(tmp_path, corpus, "gnan", "--max_steps", "16")
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "by step 8 (main phase)" in err[0], err
        ck = load_checkpoint(tmp_path / "runs" / "gnan" / "latest.pt")
        assert all(torch.isfinite(v).all() for k, v in ck["model"].items() if k != "threshold")  # (-inf: uncalibrated)
        assert ck["step"] == 6 and "holds step 6" in err[0]
    finally:
        GradPoisonedLM.poison_at = None
        _REGISTRY.pop("fake_patched", None)


def test_resuming_an_older_checkpoint_of_a_finished_run_keeps_that_run(tmp_path, corpus, fake_model, capsys):
    import hashlib

    def sha(f):
        return hashlib.sha256(f.read_bytes()).hexdigest()

    d = run(tmp_path, corpus, "fin", "--save_interval", "4")  # finished at step 16: step_4 ... step_16, final
    before = {f.name: sha(f) for f in d.iterdir() if f.is_file() and f.suffix in (".pt", ".safetensors")}
    assert {"step_12.pt", "step_16.pt", "final.pt", "best.pt"} <= set(before)
    run(tmp_path, corpus, "fin", "--resume", str(d / "step_8.pt"), "--lr", "1e-3", "--stop_at", "10")
    aside = d / "before-resume-step8"
    moved = {f.name: sha(f) for f in aside.iterdir()}
    for name in ("step_12.pt", "step_16.pt", "final.pt", "latest.pt"):
        assert moved[name] == before[name], name  # the finished run, byte for byte
    assert not (d / "final.pt").exists() and not (d / "step_12.pt").exists()
    assert load_checkpoint(d / "latest.pt")["step"] == 10 and sha(d / "step_8.pt") == before["step_8.pt"]
    # best.pt moved only if it came from past step 8; else it still holds a step of this branch
    best_here = (d / "best.pt").is_file() and load_checkpoint(d / "best.pt")["step"] <= 8
    assert ("best.pt" in moved) != best_here


def test_a_checkpoint_without_training_state_is_refused_in_one_line(tmp_path, corpus, fake_model, capsys):
    d = run(tmp_path, corpus, "w", "--max_steps", "2", "--entropy_steps", "1", "--joint_steps", "0")
    ck = load_checkpoint(d / "final.pt")
    for name, state, words in (("weights.pt", {"model": ck["model"], "model_config": ck["model_config"]},
                                "holds no training state (no step, phase, rng, optimizer)"),
                               ("odd.pt", {**ck, "phase": "weird"}, "unknown phase 'weird'")):
        torch.save(state, tmp_path / name)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run(tmp_path, corpus, "w2", "--resume", str(tmp_path / name))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0] and str(tmp_path / name) in err[0], err


def test_a_larger_max_steps_on_resume_keeps_the_trained_entropy_phase_and_warmup(tmp_path, corpus, fake_model, capsys):
    """A new user's report: --max_steps 20 -> 40 on resume re-derived the phases (6 entropy steps trained, 13
    planned), so the main phase's schedule shifted and its lr jumped; the resume note said the checkpoint used None."""
    argv = ["--model", "fake_patched", "--data_path", str(corpus), "--data_dir", str(tmp_path / "cache"),
            "--save_dir", str(tmp_path / "runs"), "--run_name", "grow", "--seq_len", "32", "--batch_size", "4",
            "--eval_interval", "4", "--sample_bytes", "0", "--device", "cpu", "--val_fraction", "0.1",
            "--eval_batch_size", "64"]
    assert main(argv + ["--max_steps", "30", "--stop_at", "12"]) == 0  # derived: 10 entropy, warmup 3, 3 joint
    ck = load_checkpoint(tmp_path / "runs" / "grow" / "latest.pt")
    assert (ck["scheduler"]["entropy_steps"], ck["scheduler"]["warmup_steps"]) == (10, 3)
    capsys.readouterr()
    assert main(argv + ["--max_steps", "60", "--stop_at", "14", "--resume", "auto", "--lr", "2e-3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 10 entropy + 54 main + 6 joint" in out, out
    assert "resuming with --lr 0.002 (the checkpoint used 0.001)" in out and "used None" not in out
    ck = load_checkpoint(tmp_path / "runs" / "grow" / "latest.pt")
    assert (ck["scheduler"]["entropy_steps"], ck["scheduler"]["warmup_steps"]) == (10, 3)


def test_an_experiment_arm_recalibrates_in_its_joint_phase_and_at_its_end(tmp_path, corpus, fake_model):
    """The experiment's arms skipped the joint phase's recalibration: its curve points call the evaluation
    directly and the time budget ends an arm by a stop, not by the trainer's last (evaluated) step, so an arm
    calibrated to 4.0 bytes/patch was scored at 6.56. Now each joint-phase curve point recalibrates first, and so
    does the stop whose checkpoint the arm is scored on; a plain run's stop still does not (its resume replays a
    straight run: test_resume_at_a_joint_evaluation_keeps_its_calibration_point)."""
    from ionllama.experiment.budget import make_budget_trainer
    from ionllama.train.cli import build_train_parser, explicit_args

    argv = ["--model", "fake_patched", "--data_path", str(corpus), "--data_dir", str(tmp_path / "cache"),
            "--save_dir", str(tmp_path / "runs"), "--run_name", "arm", "--seq_len", "32", "--batch_size", "4",
            "--max_steps", "100", "--entropy_steps", "20", "--joint_steps", "60", "--log_interval", "1",
            "--eval_interval", "1000000000", "--save_interval", "1000000000", "--sample_bytes", "0",
            "--device", "cpu", "--val_fraction", "0.1", "--lr", "3e-3", "--warmup_steps", "2",
            "--eval_batch_size", "64", "--max_train_time", "1.5"]
    parser = build_train_parser()
    tr = make_budget_trainer(parser.parse_args(argv), explicit_args(parser, argv), 1.5, curve_points=3,
                             warmup=False)
    tr.run()
    recs = read_metrics(tmp_path / "runs" / "arm" / "metrics.jsonl")
    joint = [r["step"] for r in recs if r["phase"] == "joint" and "loss" in r]
    assert joint, "the run never reached its joint phase"
    cal = [r["step"] for r in recs if r["phase"] == "calibrate"]
    curve = [r["step"] for r in recs if r["phase"] == "joint" and "val_bpb" in r]
    assert all(s in cal for s in curve) and curve, (cal, curve)  # each joint curve point, recalibrated first
    assert cal[-1] == tr.step == load_checkpoint(tmp_path / "runs" / "arm" / "latest.pt")["step"]  # and at the end


def test_an_entropy_model_trained_on_other_data_is_reused_and_recalibrated(tmp_path, capsys):
    """A trained entropy model could not be reused: no flag took one, and resuming its run (the only way) refused
    any other model width, --target_patch_size or --threshold_mode (an audit). --entropy_checkpoint takes its
    weights, skips phase 1 and calibrates this run's threshold on this run's val split; a checkpoint that cannot
    serve is one line, exit 2."""
    import json as _json

    from test_train import write_corpus

    a_data, b_data = write_corpus(tmp_path / "a.jsonl"), tmp_path / "b.jsonl"
    b_data.write_text("".join(_json.dumps({"text": f"Record {i}: the quick brown fox {i % 7} jumps. " * 5}) + "\n"
                              for i in range(80)))
    base = ["--model", "ionllama", "--size", "tiny", "--d_model", "32", "--n_layers", "1", "--n_heads", "2",
            "--d_local", "32", "--seq_len", "64", "--batch_size", "4", "--device", "cpu", "--sample_bytes", "0",
            "--data_dir", str(tmp_path / "cache"), "--save_dir", str(tmp_path / "runs"), "--val_fraction", "0.1",
            "--eval_interval", "1000", "--log_interval", "5", "--lr", "3e-3", "--warmup_steps", "2"]
    assert main(base + ["--data_path", str(a_data), "--run_name", "ent", "--max_steps", "10", "--entropy_steps", "25",
                        "--joint_steps", "0"]) == 0
    src = load_checkpoint(tmp_path / "runs" / "ent" / "final.pt")["model"]
    capsys.readouterr()
    # another main model (d_model 48), another target and threshold mode, other data
    assert main(base + ["--data_path", str(b_data), "--run_name", "reuse", "--max_steps", "6", "--joint_steps", "0",
                        "--d_model", "48", "--target_patch_size", "3", "--threshold_mode", "monotonic",
                        "--entropy_checkpoint", str(tmp_path / "runs" / "ent" / "final.pt")]) == 0
    out = capsys.readouterr().out
    assert "entropy model: weights from" in out and "phase 1 skipped" in out, out
    run = tmp_path / "runs" / "reuse"
    got = load_checkpoint(run / "final.pt")
    ent = {k: v for k, v in got["model"].items() if k.startswith("entropy_model.")}
    assert ent and all(torch.equal(v, src[k]) for k, v in ent.items())  # frozen in phase 2: exactly A's weights
    recs = read_metrics(run / "metrics.jsonl")
    assert not [r for r in recs if r.get("phase") == "entropy"]  # no phase-1 step
    cal = [r for r in recs if r.get("phase") == "calibrate"]
    assert cal and abs(cal[0]["bytes_per_patch"] - 3.0) < 0.35, cal
    assert got["model_config"]["threshold_mode"] == "monotonic" and got["model_config"]["d_model"] == 48

    dense = base[:] + ["--data_path", str(b_data), "--max_steps", "2"]
    dense[1] = "dense"
    del dense[dense.index("--d_local"):dense.index("--d_local") + 2]  # (a dense model has no local layers: refused)
    small_ent = base[:] + ["--data_path", str(b_data), "--max_steps", "2", "--size", "small", "--d_model", "32"]
    cases = [(dense + ["--run_name", "x1", "--entropy_checkpoint", str(run / "final.pt")], "is for --model ionllama"),
             (base + ["--data_path", str(b_data), "--max_steps", "2", "--run_name", "x2", "--entropy_checkpoint",
                      str(tmp_path / "nope.pt")], "not found"),
             (small_ent + ["--run_name", "x3", "--entropy_checkpoint", str(run / "final.pt")], "another entropy model")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and words in err, (words, err)


def _reuse_argv(tmp_path, data, name, *extra):
    return ["--model", "ionllama", "--size", "tiny", "--d_model", "32", "--n_layers", "1", "--n_heads", "2",
            "--d_local", "32", "--seq_len", "64", "--batch_size", "4", "--device", "cpu", "--sample_bytes", "0",
            "--data_dir", str(tmp_path / "cache"), "--save_dir", str(tmp_path / "runs"), "--val_fraction", "0.1",
            "--eval_interval", "1000", "--log_interval", "5", "--lr", "3e-3", "--warmup_steps", "2",
            "--data_path", str(data), "--run_name", name, "--joint_steps", "0", *extra]


def test_an_untrained_entropy_checkpoint_is_named_and_a_trained_one_scored(tmp_path, corpus, capsys):
    """--entropy_checkpoint took an entropy model that never trained (a run with --entropy_steps 0) without a word:
    calibration still hits --target_patch_size, so patches followed noise in a healthy-looking run, the case the
    --entropy_steps 0 note is for. The loaded model is now scored on this run's val, and a near-uniform one named."""
    assert main(_reuse_argv(tmp_path, corpus, "raw", "--max_steps", "1", "--entropy_steps", "0")) == 0
    assert main(_reuse_argv(tmp_path, corpus, "ent", "--max_steps", "1", "--entropy_steps", "25")) == 0
    capsys.readouterr()
    assert main(_reuse_argv(tmp_path, corpus, "r1", "--max_steps", "1", "--entropy_checkpoint",
                            str(tmp_path / "runs" / "raw" / "final.pt"))) == 0
    out = capsys.readouterr().out
    assert "bits/byte on this run's val" in out and "near the 8 of an untrained one" in out, out
    assert main(_reuse_argv(tmp_path, corpus, "r2", "--max_steps", "1", "--entropy_checkpoint",
                            str(tmp_path / "runs" / "ent" / "final.pt"))) == 0
    out = capsys.readouterr().out
    assert "bits/byte on this run's val" in out and "near the 8" not in out, out


def test_an_entropy_checkpoint_of_another_size_is_reused_under_a_bigger_main_model(tmp_path, corpus, capsys):
    """A tiny entropy model under a --size small main model: the refusal's only fix was "pass the --size of the run
    that trained it", i.e. the other main model too (no flag set the entropy model's sizes). The flags exist now, and
    the refusal names them with the checkpoint's values."""
    assert main(_reuse_argv(tmp_path, corpus, "ent", "--max_steps", "1", "--entropy_steps", "3")) == 0
    src = str(tmp_path / "runs" / "ent" / "final.pt")
    small = ["--size", "small", "--d_local", "32", "--n_enc_layers", "1", "--n_dec_layers", "1",
             "--ngram_buckets", "64", "--max_steps", "1", "--entropy_checkpoint", src]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(_reuse_argv(tmp_path, corpus, "big", *small))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "d_entropy 64 (this run: 128)" in err, err
    assert "pass --d_entropy 64" in err, err
    assert main(_reuse_argv(tmp_path, corpus, "big", *small, "--d_entropy", "64")) == 0
    got = load_checkpoint(tmp_path / "runs" / "big" / "final.pt")
    assert got["model_config"]["size"] == "small" and got["model_config"]["d_entropy"] == 64
    ent = load_checkpoint(src)["model"]
    assert all(torch.equal(v, ent[k]) for k, v in got["model"].items() if k.startswith("entropy_model."))


def test_the_entropy_model_is_scored_where_phase_one_ends(tmp_path, corpus, fake_model):
    """Phase 1's last steps went unscored unless --eval_interval divided --entropy_steps (here 6 steps, evaluations
    every 4: only step 4), so the entropy model's final validation, the one its patching goes by, was never logged.
    It is now also scored at the end of the phase, and the full model is scored there after calibration as before."""
    d = run(tmp_path, corpus, "ent_end")
    recs = read_metrics(d / "metrics.jsonl")
    assert [r["step"] for r in recs if "val_bpb" in r and r["phase"] == "entropy"] == [4, 6]
    assert [r["step"] for r in recs if "val_bpb" in r and r["phase"] == "main"][:1] == [6]


def test_an_untrained_entropy_model_is_named_and_a_file_in_the_run_folders_place_too(tmp_path, corpus, fake_model,
                                                                                     capsys):
    """--entropy_steps 0 with no --entropy_checkpoint patched by a random entropy model without a word (calibration
    still hits its target ratio, so the run looked healthy); now a note says so. And a file where the run folder
    goes was reported as an unwritable --save_dir, a folder that is fine."""
    run(tmp_path, corpus, "e0", "--entropy_steps", "0", "--joint_steps", "0", "--max_steps", "2")
    out = capsys.readouterr().out
    assert "note: --entropy_steps 0 without --entropy_checkpoint: the entropy model that places the patch " \
           "boundaries is untrained, so patches follow noise" in out, out
    run(tmp_path, corpus, "e6", "--max_steps", "2", "--entropy_steps", "2", "--joint_steps", "0")
    assert "note: --entropy_steps 0" not in capsys.readouterr().out
    (tmp_path / "runs" / "taken").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, corpus, "taken")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "the run folder" in err[0] and "taken is a file, not a folder; pass another --run_name" in err[0], err


def test_an_experiment_arm_past_its_nominal_step_count_resumes(tmp_path, corpus):
    """The refusal of a resume with nothing to train ran inside the trainer's constructor, where an experiment arm
    still has its nominal step plan (100,000 steps; a 420-s arm reached 54,371): an arm past it, cut by
    --deadline_s, could no longer be continued or evaluated (a review)."""
    from ionllama.experiment.budget import make_budget_trainer
    from ionllama.train.cli import build_train_parser, explicit_args
    from ionllama.train.cli import main as train_main

    common = ["--model", "dense", "--size", "tiny", "--d_model", "32", "--n_layers", "1", "--n_heads", "2",
              "--data_path", str(corpus), "--data_dir", str(tmp_path / "cache"), "--save_dir", str(tmp_path / "runs"),
              "--run_name", "arm", "--seq_len", "32", "--batch_size", "2", "--sample_bytes", "0", "--device", "cpu",
              "--eval_bytes", "256", "--log_interval", "1"]
    assert train_main(common + ["--max_steps", "50", "--stop_at", "5"]) == 0
    argv = common + ["--max_steps", "3", "--max_train_time", "30", "--resume", "auto"]
    parser = build_train_parser()
    tr = make_budget_trainer(parser.parse_args(argv), explicit_args(parser, argv), 30, curve_points=1, warmup=False)
    assert tr.step == 5


def test_a_resume_names_its_entropy_checkpoint_however_the_path_is_written(tmp_path, corpus, monkeypatch):
    """A run started with --entropy_checkpoint and resumed with the same flag, its path written absolute instead of
    relative (a scheduler's job script), was refused as another entropy model. The same file is the same run."""
    assert main(_reuse_argv(tmp_path, corpus, "ent", "--max_steps", "1", "--entropy_steps", "3")) == 0
    monkeypatch.chdir(tmp_path)
    rel = os.path.join("runs", "ent", "final.pt")
    assert main(_reuse_argv(tmp_path, corpus, "r", "--max_steps", "4", "--stop_at", "2",
                            "--entropy_checkpoint", rel)) == 0
    assert main(_reuse_argv(tmp_path, corpus, "r", "--max_steps", "4", "--resume", "auto",
                            "--entropy_checkpoint", str(tmp_path / rel))) == 0
    with pytest.raises(SystemExit):  # another file still is refused
        main(_reuse_argv(tmp_path, corpus, "r", "--max_steps", "5", "--resume", "auto",
                         "--entropy_checkpoint", str(tmp_path / "runs" / "r" / "latest.pt")))
