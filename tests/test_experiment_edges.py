"""Experiment runner edges: equal-view tables without the untrained score, the deadline reserve, --from_sweep alike
runs only, stage order, the rows' own commands in a rebuilt page, entropy shares, cut rows (each failed before its fix)."""
import json

import pytest

from ionllama.experiment import bpb_at


def test_equal_views_do_not_interpolate_from_the_untrained_init_score():
    # phase1.md: bpe's first curve point is at step 570; at equal steps (308) the page gave 2.591, a line drawn
    # from the untrained model's 3.68 at step 0
    recs = [{"phase": "init", "step": 0, "val_bpb": 3.68},
            {"phase": "main", "step": 570, "val_bpb": 1.665},
            {"phase": "final", "step": 1200, "val_bpb": 1.5}]
    assert bpb_at(recs, "step", 308) is None
    assert bpb_at(recs, "step", 885) == pytest.approx((1.665 + 1.5) / 2)


def test_the_deadline_reserve_counts_the_final_evaluations_bytes_and_the_val_at_n_pass(tmp_path, monkeypatch):
    # the reserve was 1.5 x (1 + extra sets) x the last curve point's seconds: a curve point of --curve_eval_bytes
    # 100 against a final val of 2,401 bytes scored twice (val, val@32) counted as one evaluation
    from test_baselines import write_corpus
    from test_experiment import _argv

    from ionllama.experiment import main, runner

    got = {}

    class Stop(Exception):
        pass

    def fake(*a, **kw):
        got.update(kw)
        raise Stop

    monkeypatch.setattr(runner, "make_budget_trainer", fake)
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    with pytest.raises(Stop):
        main(_argv(tmp_path, pattern, "--arms", "dense", "--curve_eval_bytes", "100", "--deadline_s", "999"))
    assert got["final_eval_units"] == pytest.approx(2 * 2401 / 100)  # val and val@32, 24 curve points each
    got.clear()
    with pytest.raises(Stop):
        main(_argv(tmp_path, pattern, "--arms", "dense", "--curve_eval_bytes", "100", "--deadline_s", "999",
                   "--eval_bytes", "300", "--also_eval_seq_len", "64"))  # (64: the arm's own window, no val@N)
    assert got["final_eval_units"] == pytest.approx(3.0)


def test_from_sweep_compares_only_sweep_runs_scored_and_trained_alike(tmp_path):
    # half a sweep per GPU (--sweep_variants) with its own --eval_bytes / --seed, or a run cut by --deadline_s: the
    # lowest val BPB won on other val bytes, another seed or part of the budget; only the budget was checked
    from ionllama.errors import UserError
    from ionllama.experiment import Runner, build_parser

    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c"),
                                          "--arms", "dense", "--from_sweep"]), [])

    def run(v, bpb, scored, seed="0", cut=None):
        f = tmp_path / "o" / "sweep" / f"dense~{v}" / "final.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"val": {"bpb": bpb, "bytes": scored},
                                 "train": {"budget_s": 60.0, "cut_short_s": cut},
                                 "trainer_command": f"ionllama train --model dense --lr 0.001 --seed {seed} "
                                                    f"--run_name dense~{v} --max_train_time 60.0"}))

    run("base", 1.60, 2_000_000)
    run("lr2x", 1.50, 400)  # scored on the first 400 val bytes
    with pytest.raises(UserError, match="val bytes scored: base 2000000, lr2x 400"):
        r.best_sweep_variant("dense")
    run("lr2x", 1.50, 2_000_000, seed="1")
    with pytest.raises(UserError, match="--seed: base 0, lr2x 1"):
        r.best_sweep_variant("dense")
    run("lr2x", 1.50, 2_000_000, cut=20.0)
    with pytest.raises(UserError, match="sweep run lr2x was cut short"):
        r.best_sweep_variant("dense")
    run("lr2x", 1.50, 2_000_000)
    assert r.best_sweep_variant("dense") == "lr2x"


def test_stages_run_in_their_order_whatever_the_order_typed(tmp_path, monkeypatch):
    # `--stage pretrain,sweep --from_sweep` pretrained the arm at its base settings (no sweep run yet), then swept
    from test_baselines import write_corpus
    from test_experiment import _argv

    from ionllama.experiment import Runner, main

    ran = []
    monkeypatch.setattr(Runner, "run_arm", lambda self, arm, out, spec, budget, name: ran.append(name))
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    assert main(_argv(tmp_path, pattern, "--arms", "dense", "--stage", "pretrain,sweep", "--from_sweep",
                      "--sweep_variants", "base,lr2x")) == 0
    assert ran == ["dense~base", "dense~lr2x", "dense"]


def test_a_page_rebuilt_by_another_command_names_the_command_that_trained_its_rows(tmp_path):
    # a refused command (other --budget_s / --seed), --stage report or --stage tasks rebuilds the page: its header
    # named only that command, never the one behind the numbers
    from test_experiment import _fake_run

    from ionllama.experiment.report import write_report

    _fake_run(tmp_path / "res" / "dense", 1.9, 100, 1e15, [(50, 5e14, 2.0), (100, 1e15, 1.9)])
    write_report(tmp_path / "res", ["dense"], "ionllama experiment --budget_s 99 --seed 5")
    head = next(ln for ln in (tmp_path / "res.md").read_text().splitlines() if ln.startswith("Generated by"))
    assert "`ionllama experiment ...`" in head  # the row's own command (_fake_run's)
    write_report(tmp_path / "res", ["dense"], "ionllama experiment ...")  # its own command: said once
    head = next(ln for ln in (tmp_path / "res.md").read_text().splitlines() if ln.startswith("Generated by"))
    assert head.count("ionllama experiment ...") == 1


def test_entropy_shares_are_left_out_of_arms_without_entropy_patching(tmp_path):
    # --override entropy_frac=... went into dense's and ionllama_fixed's specs (which never read it): trying another
    # value on the entropy arm refused the finished baseline rows as "finished with other settings"
    from ionllama.experiment import Runner, build_parser
    from ionllama.experiment.runner import _changed_settings

    def runner(value):
        return Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c"),
                                                 "--override", f"entropy_frac={value},joint_frac=0"]), [])

    r1, r2 = runner(0.1), runner(0.2)
    assert r2.spec_of("ionllama")["entropy_frac"] == 0.2 and r2.spec_of("ionllama")["joint_frac"] == 0
    assert "entropy_frac" not in r2.spec_of("dense") and "joint_frac" not in r2.spec_of("dense")
    assert r2.spec_of("ionllama_fixed")["entropy_frac"] == 0.06  # the matrix's own value, untouched
    for arm in ("dense", "ionllama_fixed"):
        old = {"spec": {**r1.spec_of(arm), "entropy_frac": 0.1}}  # as such a row recorded it before
        assert _changed_settings(old, r2.spec_of(arm), []) == ""
    old = {"spec": r1.spec_of("ionllama")}
    assert "spec" in _changed_settings(old, r2.spec_of("ionllama"), [])  # the entropy arm's own change still counts


def test_a_row_cut_short_is_not_averaged_with_full_rows_of_other_seeds(tmp_path):
    from ionllama.experiment.report import seed_groups

    def row(seed, bpb, cut=None):
        return {"spec": {"model": "dense"}, "val": {"bpb": bpb},
                "train": {"budget_s": 420.0, "train_time_s": cut or 420.0, "cut_short_s": cut},
                "trainer_command": f"ionllama train --model dense --max_train_time 420.0 --seed {seed}"}

    arms = {"a/dense": row(0, 1.50), "b/dense": row(1, 1.52), "c/dense": row(2, 2.40, cut=60.0)}
    (g,) = seed_groups(arms, ["val"])
    assert g["runs"] == ["a/dense", "b/dense"] and g["val"]["mean"] == pytest.approx(1.51)


def test_the_task_stage_does_not_fine_tune_a_row_cut_short(tmp_path, capsys):
    # `--stage tasks` fine-tuned the cut checkpoint and put its accuracies in the task table, unmarked
    from ionllama.experiment import Runner, build_parser

    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c")]), [])
    f = tmp_path / "o" / "dense" / "final.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"train": {"budget_s": 420.0, "train_time_s": 100.0, "cut_short_s": 100.0}}))
    assert r._pretrained_here("dense") is False
    assert "cut short by --deadline_s" in capsys.readouterr().out
    f.write_text(json.dumps({"train": {"budget_s": 420.0, "train_time_s": 420.0, "cut_short_s": None}}))
    assert r._pretrained_here("dense") is True


def test_an_arm_whose_only_point_is_its_final_score_has_it_at_its_own_total():
    """--curve_points 1 (or a run shorter than its first curve mark) leaves each arm one point, its final evaluation:
    the equal views then gave every arm '—', also the arm whose whole run sets the point, whose value the page
    says is its final score."""
    from ionllama.experiment import equal_at

    recs = {"dense": [{"phase": "init", "step": 0, "val_bpb": 8.0},
                      {"phase": "final", "step": 184, "bytes_seen": 47104, "train_flops": 3.0e9, "val_bpb": 4.35}],
            "bpe": [{"phase": "init", "step": 0, "val_bpb": 8.0},
                    {"phase": "final", "step": 240, "bytes_seen": 40000, "train_flops": 2.2e9, "val_bpb": 3.82}]}
    assert bpb_at(recs["dense"], "step", 184) == pytest.approx(4.35)
    assert bpb_at(recs["dense"], "step", 100) is None  # still no point before x: no value
    arms = {n: {"train": {"steps": r[-1]["step"], "bytes_seen": r[-1]["bytes_seen"],
                          "train_flops": r[-1]["train_flops"]}} for n, r in recs.items()}
    eq = equal_at(arms, recs.__getitem__, "equal_flops")
    assert eq["arm"] == "bpe" and eq["val_bpb"] == {"dense": None, "bpe": pytest.approx(3.82)}
    st = equal_at(arms, recs.__getitem__, "equal_steps")
    assert st["arm"] == "dense" and st["val_bpb"] == {"dense": pytest.approx(4.35), "bpe": None}


def test_the_experiment_refuses_torchrun_in_one_line(tmp_path, monkeypatch, capsys):
    """Under torchrun every rank ran the whole matrix into the same folders, its in-process trainer joining the
    other ranks' in DDP: refused before anything is written (one experiment process per GPU is the way)."""
    from ionllama.experiment import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["--arms", "dense", "--out", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not torchrun" in err and err.count("\n") == 1, err
    assert not (tmp_path / "res").exists()


def _task_row(tmp_path, name, add=None, task_cmd=None):
    """A finished arm in tmp_path/name; with `add` (correct of 200) a tasks.json of one scored task, run by
    `task_cmd`."""
    d = tmp_path / name
    d.mkdir(parents=True)
    train = {"budget_s": 75.0, "train_time_s": 75.0, "steps": 10, "epochs": 1.0, "bytes_per_s": 2e6,
             "bytes_seen": 1000}
    (d / "final.json").write_text(json.dumps({
        "params": 1e6, "val": {"bpb": 1.5}, "train": train, "device": {"name": "cpu"},
        "date": "2026-12-01T00:00:00+00:00", "git": {"sha": "abc1234"}, "spec": {}}))
    if add is not None:
        (d / "tasks.json").write_text(json.dumps({"command": task_cmd, "results": {"per_task": {
            "add": {"n": 200, "correct": add, "accuracy": add / 200, "ci95": [0.1, 0.2]}}}}))


def test_an_arm_without_task_scores_is_named_not_dropped_from_the_task_table(tmp_path):
    """A pretrained arm whose task stage was cut (no tasks.json) vanished from the task table without a word, while
    "Not yet run" names only arms without final.json: the page read as if every row had been scored."""
    from ionllama.experiment.report import write_report

    # the task stage ran for dense and bpe; bpe's was cut; mamba was never asked for
    _task_row(tmp_path / "res", "dense", add=150, task_cmd="ionllama experiment --stage tasks --task_arms dense,bpe")
    _task_row(tmp_path / "res", "bpe")
    _task_row(tmp_path / "res", "mamba")
    s = write_report(tmp_path / "res", ["dense", "bpe", "mamba"], "ionllama experiment --stage report")
    md = (tmp_path / "res.md").read_text()
    assert "| dense | — | — | — | 0.750" in md
    assert s["tasks_missing"] == ["bpe"]
    assert "No task scores: bpe (" in md
    # no task stage asked (a pretraining page): no such line
    _task_row(tmp_path / "lm", "dense")
    s = write_report(tmp_path / "lm", ["dense"], "ionllama experiment --stage report")
    assert "tasks_missing" not in s and "No task scores" not in (tmp_path / "lm.md").read_text()
    # one row whose own command ran the task stage for it, cut before scoring (phase1-tasks-long-ng23-s2)
    _task_row(tmp_path / "cut", "ionllama_fixed")
    f = tmp_path / "cut" / "ionllama_fixed" / "final.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "command": "ionllama experiment --out x --stage "
                             "pretrain,tasks --task_arms ionllama_fixed --arms ionllama_fixed"}))
    s = write_report(tmp_path / "cut", ["ionllama_fixed"], "ionllama experiment --stage report")
    assert s["tasks_missing"] == ["ionllama_fixed"]
    assert "No task scores: ionllama_fixed" in (tmp_path / "cut.md").read_text()



def test_the_task_tables_ci_says_it_is_over_test_items_of_one_run(tmp_path):
    """The Wilson interval counts the n test prompts of one fine-tuned run; reruns of one row moved addition by 0.13
    where the interval is +-0.035, so "intervals apart" between single runs is no evidence across seeds."""
    from ionllama.experiment.report import write_report

    _task_row(tmp_path / "res", "dense", add=150)
    write_report(tmp_path / "res", ["dense"], "ionllama experiment --stage report")
    md = (tmp_path / "res.md").read_text()
    assert "95% Wilson CI over the n test prompts of one run (not over seeds" in md
