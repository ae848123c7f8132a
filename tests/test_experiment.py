"""The Phase-1 experiment runner: equal-time arms, same val bytes, files, resume, time-based schedule."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ionllama import create_model
from ionllama.errors import UserError
from ionllama.eval.task_eval import read_outputs
from ionllama.experiment import (ARMS, Runner, TimeBudgetPlan, add_flops, build_parser, main, pack_examples,
                                 task_batch, task_examples, train_flops_per_byte)
from ionllama.train.schedule import PhasePlan
from test_baselines import write_corpus

TINY = ["--override", "d_model=32 n_layers=1 n_heads=2 vocab_size=300"]


@pytest.fixture
def one_thread():
    # tiny models on a shared 2-core machine: one thread avoids OpenMP contention stalls
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _argv(tmp_path, pattern, *extra):
    return ["--arms", "dense,bpe", "--budget_s", "2", "--data_path", pattern, "--data_dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "res" / "phase1"), "--ckpt_dir", str(tmp_path / "ck"), "--seq_len", "64",
            "--batch_size", "4", "--curve_eval_bytes", "1500", "--curve_points", "2", "--device", "cpu",
            "--no-compile", "--also_eval_seq_len", "32", *TINY, *extra]


def test_a_val_window_equal_to_the_arms_own_is_no_other_setting_on_a_rerun(tmp_path, capsys, one_thread):
    """--also_eval_seq_len equal to --seq_len writes no val@N (it is the val score), but the check of a finished arm
    wanted one: the same command run again refused its own finished arms ("evaluated with other settings"), so an
    interrupted experiment could never go on. And a non-numeric entropy_frac was a ValueError traceback."""
    pattern = write_corpus(tmp_path)
    argv = [*_argv(tmp_path, pattern), "--arms", "dense", "--budget_s", "1", "--also_eval_seq_len", "64"]
    assert main(argv) == 0
    final = json.loads((tmp_path / "res" / "phase1" / "dense" / "final.json").read_text())
    assert not [k for k in final if k.startswith("val@")]
    capsys.readouterr()
    assert main(argv) == 0 and "done already" in capsys.readouterr().out
    for key in ("entropy_frac", "joint_frac"):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--arms", "ionllama", "--override", f"{key}=abc", "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"{key}=abc: give a number" in err[0], err
        assert not (tmp_path / "bad").exists()


def test_bad_eval_data_or_out_fails_before_any_arm_trains(tmp_path, capsys):
    """A corrupt --eval_data used to fail after the first arm had trained (a traceback from lzma); an --out that
    cannot be made, in a traceback after training; a bad --override value printed two error lines. All are now one
    line before any training."""
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    bad = tmp_path / "bad.jsonl.xz"
    bad.write_bytes(b"hi")  # named .xz, not xz data
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "mine.json").write_text('{"mine": 1}')  # a user's file where the report's summary would go
    for extra, words in ((["--eval_data", str(bad)], f"cannot read {bad}"),
                         (["--out", str(tmp_path / "mine")], "a file of yours?"),
                         (["--ckpt_dir", "/proc/ck"], "cannot write --ckpt_dir /proc/ck"),
                         (["--out", str(blocker / "sub")], "cannot create --out"),
                         (["--override", "d_model=abc"], "invalid int value: 'abc'"),
                         # taken silently before: one curve point, no deadline, base settings instead of the picks
                         (["--curve_points", "-1"], "--curve_points must be at least 1"),
                         (["--deadline_s", "-1"], "--deadline_s must be above 0"),
                         (["--task_lr", "nan"], "--task_lr must be above 0"),
                         # 0 is its documented "only when stopped or signalled" (it was refused as not above 0)
                         (["--checkpoint_every_s", "-1"], "--checkpoint_every_s must be at least 0"),
                         (["--from_sweep"], "--from_sweep: no sweep folder"),
                         (["--from_sweep", "--sweep_dir", str(tmp_path / "nope")], "no sweep folder"),
                         # a mistyped --out for the report wrote an empty one with exit 0
                         (["--stage", "report", "--out", str(tmp_path / "typo")], "no finished arm under"),
                         (["--arms", "dense,dnese"], "unknown arm(s) ['dnese']"),
                         # found only when their arm (or the task stage) started, after earlier arms had trained
                         (["--override", "n_layers=-1"], "arm dense: n_layers must be >= 1"),
                         (["--override", "d_model=65"], "must split into"),
                         (["--stage", "pretrain,tasks", "--task_arms", "dense,dnese"], "--task_arms: unknown arm"),
                         # rows too short for the longest task example (65 bytes): found after every arm pretrained
                         (["--stage", "pretrain,tasks", "--task_seq_len", "40"], "pass --task_seq_len 66 or more"),
                         # bpe's rows hold 50 tokens; a task example can take 66
                         (["--stage", "pretrain,tasks", "--task_seq_len", "100"], "pass --task_seq_len 132 or more")):
        argv = _argv(tmp_path, pattern) + extra
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
        assert not (tmp_path / "ck").exists() and not (tmp_path / "typo").exists()  # no arm started, nothing made
        assert not (tmp_path / "res" / "phase1").exists()  # no empty --out folder left behind


def test_two_arm_matrix_writes_results_and_resumes(tmp_path, capsys, one_thread):
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    assert main(_argv(tmp_path, pattern)) == 0
    log = capsys.readouterr().out
    assert log.count(" KB/s); ->") == 2 and "0.00 MB/s" not in log  # CPU speeds in the unit the table uses
    # the BPE arm's windows hold tokens (they were labelled bytes); the dense arm's bytes
    assert "= 4 windows x 16 tokens = 64 tokens/step" in log and "= 4 windows x 64 bytes = 256 bytes/step" in log
    res = tmp_path / "res"
    finals = {a: json.loads((res / "phase1" / a / "final.json").read_text()) for a in ("dense", "bpe")}
    val_bytes = finals["dense"]["data"]["val_bytes"]
    for arm, f in finals.items():
        # the same val bytes for the byte model and the token model: every byte but the first
        assert f["val"]["bytes"] == val_bytes - 1
        assert 0 < f["val"]["bpb"] < 9
        # --also_eval_seq_len 32: the same bytes again in half-length windows (tokens: 32 // 4)
        alt = f["val@32"]
        assert alt["bytes"] == f["val"]["bytes"] and alt["seq_len"] == (8 if arm == "bpe" else 32)
        assert 0 < alt["bpb"] < 9 and alt["bpb"] != f["val"]["bpb"]
        t = f["train"]
        assert 2.0 <= t["train_time_s"] < 6.0 and t["steps"] >= 1 and t["train_flops"] > 0
        assert f["params"] > 0 and f["git"]["sha"] and f["date"].startswith("20") and f["device"]["name"]
        assert f["command"].startswith("ionllama experiment") and f["trainer_command"].startswith("ionllama train")
        recs = [json.loads(line) for line in (res / "phase1" / arm / "metrics.jsonl").read_text().splitlines()]
        assert recs[-1]["phase"] == "final" and recs[-1]["val_bpb"] == pytest.approx(f["val"]["bpb"])
        curve = [r for r in recs if "val_bpb" in r and r["phase"] not in ("init", "final")]
        assert 1 <= len(curve) <= 2 + 1  # --curve_points 2 (+ the evaluation at a phase change)
        flops = [r["train_flops"] for r in recs]
        assert flops == sorted(flops) and flops[-1] == pytest.approx(t["train_flops"])
    assert finals["bpe"]["train"]["seq_len"] == 16 and finals["bpe"]["train"]["bytes_per_token"] > 1.2
    assert finals["bpe"]["bytes_per_patch"] == pytest.approx(finals["bpe"]["train"]["bytes_per_token"], rel=0.2)
    md = (res / "phase1.md").read_text()
    # --arms dense,bpe: both ran, so no "Not yet run" line (it listed the matrix's seven other arms)
    assert "| dense |" in md and "| bpe |" in md and "Not yet run" not in md and "val@32 BPB" in md
    # the token model's val@32 cell says its window in tokens; the byte model's is in bytes, as the header says
    rows = {}  # the first table's rows (the equal-FLOPs / equal-steps tables below repeat the arm names)
    for line in md.splitlines():
        if line.startswith(("| dense |", "| bpe |")):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    assert "(8 tokens)" in rows["bpe"] and "tokens" not in rows["dense"]
    summary = json.loads((res / "phase1.json").read_text())
    assert set(summary["arms"]) == {"dense", "bpe"} and summary["missing"] == []  # both asked-for arms ran
    from ionllama.experiment.report import write_report
    runs = {"dense": res / "phase1" / "dense", "mamba": res / "phase1" / "mamba"}
    other = write_report(tmp_path / "rep" / "phase1", runs, "cmd", expected=["dense", "mamba"])
    assert other["missing"] == ["mamba"]  # an asked-for arm without a row is still named
    eq = summary["equal_flops"]  # the equal-compute view: both arms at the smaller arm's total FLOPs
    low = min(finals, key=lambda a: finals[a]["train"]["train_flops"])
    assert eq["arm"] == low and eq["train_flops"] == pytest.approx(finals[low]["train"]["train_flops"])
    assert eq["val_bpb"][low] == pytest.approx(finals[low]["val"]["bpb"])
    assert "at equal training FLOPs" in md
    st = summary["equal_steps"]  # and the equal-steps view, at the shorter run's step count
    low = min(finals, key=lambda a: finals[a]["train"]["steps"])
    assert st["arm"] == low and st["step"] == finals[low]["train"]["steps"]
    assert st["val_bpb"][low] == pytest.approx(finals[low]["val"]["bpb"])
    assert "at equal optimizer steps" in md
    tx = summary["equal_text"]  # and equal training text: the token arm's text counted in bytes, like the byte arm's
    low = min(finals, key=lambda a: finals[a]["train"]["bytes_seen"])
    assert tx["arm"] == low and tx["bytes_seen"] == finals[low]["train"]["bytes_seen"]
    assert tx["val_bpb"][low] == pytest.approx(finals[low]["val"]["bpb"])
    assert (res / "phase1" / "bpb_vs_time.png").stat().st_size > 1000
    assert (res / "phase1" / "bpb_vs_flops.png").stat().st_size > 1000
    assert (tmp_path / "ck" / "bpe" / "tokenizer.json").is_file()

    # a second invocation skips the finished arms
    capsys.readouterr()
    mtime = (res / "phase1" / "dense" / "final.json").stat().st_mtime_ns
    assert main(_argv(tmp_path, pattern)) == 0
    out = capsys.readouterr().out
    assert out.count("done already") == 2 and "training" not in out
    assert (res / "phase1" / "dense" / "final.json").stat().st_mtime_ns == mtime
    # ... but not under other training flags: that would report the old run as the new one (another --device or
    # --log_interval is no change in what was trained, and still skips)
    assert main(_argv(tmp_path, pattern, "--log_interval", "3")) == 0
    for extra, words in ((["--seed", "5"], "--seed 0 -> 5"), (["--override", "dropout=0.2"], "spec ")):
        with pytest.raises(SystemExit) as e:
            main(_argv(tmp_path, pattern, *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "finished with other settings" in err[0] and words in err[0]
    # nor under other evaluation flags: arms scored on other bytes would be ranked in one table (a new user's report)
    for extra, words in ((["--eval_bytes", "999"], "--eval_bytes"), (["--also_eval_seq_len", "16"], "val@")):
        with pytest.raises(SystemExit) as e:
            main(_argv(tmp_path, pattern, *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "evaluated with other settings" in err[0], err
    # the same files copied elsewhere still skip (as on the GPU machine); other text is refused, not relabelled
    import shutil

    (tmp_path / "copy").mkdir()
    for split in ("train", "val"):
        shutil.copy(pattern.format(split=split), tmp_path / "copy")
    assert main(_argv(tmp_path, str(tmp_path / "copy" / Path(pattern).name))) == 0
    assert capsys.readouterr().out.count("done already") == 2
    other = write_corpus(tmp_path / "copy", n_train=10, n_val=2, doc_bytes=1100)
    with pytest.raises(SystemExit) as e:
        main(_argv(tmp_path, other))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "trained on other data" in err[0], err
    # ... and so is other text of exactly the same sizes (one letter changed): the shards' checksums differ
    (tmp_path / "edit").mkdir()
    for split in ("train", "val"):
        text = Path(pattern.format(split=split)).read_text(encoding="utf-8")
        if split == "train":  # one ASCII letter of the first document, edited in its decoded text (an edit of the
            first, rest = text.split("\n", 1)  # raw line could hit an escape and make the line invalid JSON)
            doc = json.loads(first)
            i = next(k for k, c in enumerate(doc["text"]) if c.isascii() and c.isalpha())
            doc["text"] = doc["text"][:i] + ("Z" if doc["text"][i] != "Z" else "Y") + doc["text"][i + 1:]
            text = json.dumps(doc) + "\n" + rest
        (tmp_path / "edit" / Path(pattern.format(split=split)).name).write_text(text, encoding="utf-8")
    edited = str(tmp_path / "edit" / Path(pattern).name)
    with pytest.raises(SystemExit) as e:
        main(_argv(tmp_path, edited))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "same sizes, other checksums" in err[0], err
    assert (res / "phase1" / "dense" / "final.json").stat().st_mtime_ns == mtime

    # an arm interrupted after a checkpoint continues from latest.pt instead of starting over
    steps_before = finals["dense"]["train"]["steps"]
    (res / "phase1" / "dense" / "final.json").unlink()
    (tmp_path / "ck" / "dense" / "experiment.json").unlink()
    assert main(_argv(tmp_path, pattern, "--arms", "dense")) == 0
    out = capsys.readouterr().out
    assert "resumed" in out
    again = json.loads((res / "phase1" / "dense" / "final.json").read_text())
    assert again["train"]["steps"] >= steps_before

    # ... but not under other settings or on other data: the checkpoint would mix two runs in one result
    marker = tmp_path / "ck" / "dense" / "experiment.json"
    kept = {p: p.read_bytes() for p in (marker, res / "phase1" / "dense" / "final.json")}
    half = json.loads(kept[marker])
    assert half["trained"] and half["data_sha256"] and "--seq_len 64" in half["trainer_command"]
    (res / "phase1" / "dense" / "final.json").unlink()
    marker.write_text(json.dumps({**half, "trained": False}))  # as if stopped after a checkpoint
    for extra, words in ((["--seq_len", "32"], "--seq_len 64 -> 32"), (["--data_path", edited], "other train/val"),
                         (["--curve_eval_bytes", "1024"], "--curve_eval_bytes 1500 -> 1024")):  # the flag typed
        with pytest.raises(SystemExit) as e:
            main(_argv(tmp_path, pattern, "--arms", "dense", *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "partly trained with other settings" in err[0], err
        assert words in err[0], err
    for p, data in kept.items():
        p.write_bytes(data)

    # the task stage: identical task examples and steps for both arms, accuracy with CIs
    assert main(_argv(tmp_path, pattern, "--stage", "tasks", "--task_arms", "dense,bpe", "--task_steps", "2",
                      "--task_batch", "4", "--task_n", "1")) == 0
    for arm in ("dense", "bpe"):
        t = json.loads((res / "phase1" / arm / "tasks.json").read_text())
        assert t["fine_tuning"]["steps"] == 2
        per = t["results"]["per_task"]
        assert set(per) == {"count", "spell", "reverse", "add", "mul"} and per["add"]["n"] == 4
        lo, hi = per["count"]["ci95"]
        assert 0.0 <= lo <= per["count"]["accuracy"] <= hi <= 1.0
        # every scored example beside it, for the errors' analysis (tasks.json keeps one or a few per cell)
        assert t["results"]["outputs_file"] == "task_outputs.jsonl.gz" and "outputs" not in t["results"]
        rows = read_outputs(res / "phase1" / arm / "task_outputs.jsonl.gz")
        assert len(rows) == sum(r["n"] for r in per.values())
        assert sum(r["correct"] for r in rows) == sum(r["correct"] for r in per.values())
    assert "Task accuracy" in (res / "phase1.md").read_text()
    # task results of other task settings are refused, not skipped into the "identical fine-tuning" table
    with pytest.raises(SystemExit) as e:
        main(_argv(tmp_path, pattern, "--stage", "tasks", "--task_arms", "dense,bpe", "--task_steps", "3",
                   "--task_batch", "4", "--task_n", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "other settings (--task_steps 2)" in err[0], err
    # the task stage scored any latest.pt under --ckpt_dir: one pretrained with other flags is refused, and an arm
    # with no finished pretraining in --out is skipped, said so
    (res / "phase1" / "dense" / "tasks.json").unlink()
    with pytest.raises(SystemExit) as e:
        main(_argv(tmp_path, pattern, "--stage", "tasks", "--task_arms", "dense", "--task_steps", "2",
                   "--task_batch", "4", "--task_n", "1", "--seq_len", "32"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "pretrained with other settings" in err[0], err
    assert not (res / "phase1" / "dense" / "tasks.json").exists()
    (tmp_path / "res2").mkdir(exist_ok=True)
    assert main(_argv(tmp_path, pattern, "--stage", "tasks", "--task_arms", "dense", "--task_steps", "2",
                      "--task_batch", "4", "--task_n", "1", "--out", str(tmp_path / "res2" / "phase1"))) == 0
    assert "not pretrained in" in capsys.readouterr().out
    assert not (tmp_path / "res2" / "phase1" / "dense" / "tasks.json").exists()


def test_time_budget_plan_follows_the_clock():
    now = {"t": 0.0}
    base = PhasePlan(entropy_steps=600, max_steps=9400, joint_steps=940, lr=1e-3, entropy_lr=2e-3, warmup_steps=200)
    plan = TimeBudgetPlan(base, budget_s=100.0, clock=lambda: now["t"])
    seen = {}
    for t in np.linspace(0, 99.9, 400):
        now["t"] = t
        seen.setdefault(plan.phase_of(0), t)
    assert seen["entropy"] == 0 and 5.5 < seen["main"] < 6.5 and 90 < seen["joint"] < 92
    now["t"] = 50.0
    assert plan.lr_at(123) == pytest.approx(base.lr_at(5000))  # the step argument is ignored
    now["t"] = 90.0
    assert plan.lr_at(7) == pytest.approx(base.lr_at(9000))
    assert plan.total > 10 ** 8 and plan.lr == 1e-3 and plan.state_dict()["time_budget_s"] == 100.0


def test_flops_follow_measured_patches_and_tokens():
    ion = create_model("tiny", model="ionllama")
    f4 = train_flops_per_byte(ion, "main", 1024, 4.0, None)
    f8 = train_flops_per_byte(ion, "main", 1024, 8.0, None)
    assert f8 < f4 < train_flops_per_byte(ion, "main", 1024, 1.0, None)
    assert train_flops_per_byte(ion, "entropy", 1024, None, None) < f8
    bpe = create_model("tiny", model="bpe", d_model=64, n_layers=2, n_heads=2, vocab_size=512)
    assert train_flops_per_byte(bpe, "main", 256, None, 4.0) == pytest.approx(
        train_flops_per_byte(bpe, "main", 256, None, 2.0) / 2)
    recs = [{"step": 0, "phase": "init", "bytes_seen": 0, "val_bpb": 8.0},
            {"step": 10, "phase": "entropy", "bytes_seen": 1000, "loss": 1.0},
            {"step": 20, "phase": "main", "bytes_seen": 3000, "loss": 1.0, "bytes_per_patch": 4.0},
            {"step": 20, "phase": "main", "bytes_seen": 3000, "val_bpb": 3.0}]
    out = add_flops(recs, ion, 1024, None)
    fe = train_flops_per_byte(ion, "entropy", 1024, None, None)
    assert out[1]["train_flops"] == pytest.approx(1000 * fe)
    assert out[2]["train_flops"] == pytest.approx(1000 * fe + 2000 * f4)
    assert out[3]["train_flops"] == out[2]["train_flops"]


def test_task_row_check_before_pretraining_matches_what_packing_needs():
    from ionllama.experiment.tasks import check_task_row_len, longest_task_example

    longest = longest_task_example(seed=0, steps=40, n=16)
    longest_examples = [e for s in range(40) for e in task_examples(0, s, 16)
                        if len(e.prompt) + len(e.answer) + 1 == longest]
    pieces = [(list(e.prompt), list(e.answer + b"\n")) for e in longest_examples[:1]]
    check_task_row_len(longest + 1, longest, [])  # accepted: and packing takes it
    pack_examples(pieces, 0, longest + 1)
    with pytest.raises(Exception, match=f"--task_seq_len {longest + 1} or more"):
        check_task_row_len(longest, longest, [])
    with pytest.raises(Exception, match="task_seq_len"):  # and packing refuses that length too
        pack_examples(pieces, 0, longest)
    check_task_row_len(2 * (longest + 1), longest, ["bpe"])
    with pytest.raises(Exception, match=f"bpe rows of {longest} tokens"):
        check_task_row_len(2 * longest + 1, longest, ["bpe"])


def test_task_batches_hold_the_same_examples_for_bytes_and_tokens(tmp_path):
    from ionllama.data.bpe import train_tokenizer

    ex = task_examples(seed=0, step=3, n=6)
    assert [e.prompt for e in ex] == [e.prompt for e in task_examples(seed=0, step=3, n=6)]
    dense = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
    xb, yb = task_batch(dense, ex, 128)
    text = b"".join(bytes(r) for r in xb.tolist())
    assert all(e.prompt in text for e in ex)
    answers = b"".join(bytes(t for t in row if t != -100) for row in yb.tolist())
    assert answers == b"".join(e.answer + b"\n" for e in ex)
    bpe_model = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=300)
    bpe_model.set_tokenizer(train_tokenizer([e.text for s in range(4) for e in task_examples(1, s, 50)], 300))
    xt, yt = task_batch(bpe_model, ex, 128)
    assert bpe_model.bpe.decode([t for row in yt.tolist() for t in row if t != -100]) == answers
    with pytest.raises(Exception, match="task_seq_len"):
        pack_examples([([1] * 50, [2] * 20)], 0, 32)


def test_capped_evaluation_scores_the_same_bytes_for_byte_and_token_models(tmp_path, one_thread):
    from ionllama.data.bpe import open_token_shards, prepare_tokens
    from ionllama.data.shards import DataArgs, open_shards, prepare
    from ionllama.experiment import Runner, build_parser

    pattern = write_corpus(tmp_path, n_train=8, n_val=2, doc_bytes=1000)
    byte_dir = prepare(DataArgs(data_path=pattern, data_dir=str(tmp_path / "cache")), log=lambda m: None)
    toks = open_token_shards(prepare_tokens(byte_dir, vocab_size=300, log=lambda m: None))
    val = np.asarray(open_shards(byte_dir).val)
    dense = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
    bpe = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=300)
    bpe.set_tokenizer(toks.bpe)
    from ionllama.data.bpe import evaluate_token_bpb, token_prefix_for_bytes
    from ionllama.eval.lm import TOKEN_CUT_MARGIN

    longest = int(toks.bpe.token_nbytes.max())
    split_a_token = 0
    ends = set(np.cumsum(toks.bpe.token_nbytes[np.asarray(toks.val)]).tolist())
    inside = next(n for n in range(1000, 1500) if n + 1 not in ends)  # a cap inside a token, whatever the corpus
    for cap in (1234, inside, None):
        r = Runner(build_parser().parse_args(["--batch_size", "4"] + (["--eval_bytes", str(cap)] if cap else [])), [])
        b = r._bpb(dense, r._byte_set("val", None, val), 64, "cpu", None)["bytes"]
        t = r._bpb(bpe, r._byte_set("val", None, val, TOKEN_CUT_MARGIN), 16, "cpu", None)
        assert b == (cap if cap else len(val) - 1)
        # a token model scores the whole tokens within the first cap + 1 bytes of the split's tokens, as the trainer's
        # --eval_bytes and `ionllama bench` do: encoding the cut bytes split the last token (an audit: the runner's
        # final BPB of a checkpoint was ~1e-3 off the trainer's at a few kB)
        assert b - longest < t["bytes"] <= b
        want = evaluate_token_bpb(bpe, token_prefix_for_bytes(toks.val, toks.bpe.token_nbytes, cap), 16, 4, "cpu")
        assert (t["bytes"], t["tokens"]) == (want["bytes"], want["tokens"]) and t["bpb"] == pytest.approx(want["bpb"])
        split_a_token += t["bytes"] != b
    assert split_a_token  # some cap falls inside a token (else this test would not tell the two ways apart)


@pytest.mark.parametrize("patching,step_graph", [("entropy", False), ("space", False),
                                                 pytest.param("entropy", True, marks=pytest.mark.slow),
                                                 pytest.param("space", True, marks=pytest.mark.slow)])
def test_warm_up_compiles_every_shape_training_will_see(patching, step_graph, one_thread):
    """After warm_up, a new calibrated threshold and batches with new patch counts must not recompile:
    a recompile there lands inside an arm's measured training time. With --step_graph the main phase calls
    the forward as the two-stage step does (boundaries given, bucketed latent length)."""
    from types import SimpleNamespace

    from torch._dynamo.testing import CompileCounter

    from ionllama.experiment import warm_up

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = create_model("tiny", model="ionllama", patching=patching)
    g = torch.Generator().manual_seed(0)
    # varied text (code, prose, symbols) that edits to this repository do not change: this file's own bytes made
    # the drawn windows, and so whether their patch counts differ, depend on each edit of the tests
    text = torch.tensor(list(Path(os.__file__).read_bytes()[:200_000]))
    starts = torch.randint(0, len(text) - 129, (12, 2), generator=g)
    batches = [(text[s[:, None] + torch.arange(128)], text[s[:, None] + torch.arange(1, 129)]) for s in starts]
    dense = torch.tensor(list(b"1+2=3; 4*5=20; (a,b)->[c]! " * 10))[:129]  # a start at almost every byte
    batches[-1] = (dense[:-1].repeat(2, 1), dense[1:].repeat(2, 1))
    cnt, cnt_a = CompileCounter(), CompileCounter()
    # stage A compiled as the trainer makes it (--compile_stage_a auto), counted on its own
    stage_a = torch.compile(m.patch_boundaries, dynamic=False, backend=cnt_a)
    tr = SimpleNamespace(model=m, device=torch.device("cpu"), amp_dtype=None, fwd=torch.compile(m, backend=cnt),
                         sampler=SimpleNamespace(get=lambda k: batches[k]), stage_a=lambda phase: stage_a,
                         args=SimpleNamespace(compile=True, step_graph=step_graph), mark_step=lambda: None)
    warm_up(tr)
    compiled, compiled_a = cnt.frame_count, cnt_a.frame_count
    assert compiled_a == (1 if step_graph else 0)
    if patching == "entropy":
        m.freeze_entropy(True)
        with torch.no_grad():
            m.calibrate_threshold(batches[5][0])
    counts, lens = set(), set()
    for x, y in batches[2:]:
        kw = {}
        if step_graph:
            from ionllama.train.step_graph import latent_bucket

            with torch.no_grad():  # as StepGraph._stage_a_body calls it
                starts, n = stage_a(x)
            kw = {"patch_starts": starts, "latent_len": latent_bucket(int(n.max()), x.shape[1])}
            lens.add(kw["latent_len"])
        out = tr.fwd(x, y, **kw)
        out["loss"].backward()
        counts.add(int(out["n_patches"].max()))
    assert len(counts) > 1  # the batches really had different patch counts
    # and, with the step graph, two latent lengths below the warm-up's all-patches one: one of them is new
    assert len(lens - {128}) >= 2 or not step_graph
    assert cnt.frame_count == compiled and cnt_a.frame_count == compiled_a
    torch._dynamo.reset()


@pytest.mark.parametrize("model", ["dense", "bpe"])
def test_warm_up_of_a_baseline_with_step_graph_runs_its_plain_forward(model, one_thread):
    """The baselines share ModelConfig and its default (entropy) patching field: --step_graph must not send
    them down ionLlama's two-stage path (a sixth-session bug: AttributeError patch_boundaries)."""
    from types import SimpleNamespace

    from ionllama.experiment import warm_up

    kw = {"vocab_size": 300} if model == "bpe" else {}
    m = create_model("tiny", model=model, d_model=32, n_layers=1, n_heads=2, **kw)
    x = torch.randint(0, 256, (2, 17))
    calls = []
    fwd = lambda a, b, **k: calls.append(k) or m(a, b)  # noqa: E731
    tr = SimpleNamespace(model=m, device=torch.device("cpu"), amp_dtype=None, fwd=fwd, stage_a=lambda phase: None,
                         sampler=SimpleNamespace(get=lambda k: (x[:, :-1], x[:, 1:])),
                         args=SimpleNamespace(compile=False, step_graph=True), mark_step=lambda: None)
    warm_up(tr)
    assert calls and all(k == {} for k in calls)  # plain forwards: no boundaries, no latent length
    assert all(p.grad is None for p in m.parameters())


def test_bpb_at_interpolates_between_curve_points():
    from ionllama.experiment import bpb_at

    recs = [{"phase": "entropy", "train_flops": 1.0, "val_bpb": 9.0},
            {"phase": "main", "train_flops": 10.0, "val_bpb": 3.0},
            {"phase": "main", "train_flops": 20.0, "val_bpb": 2.0},
            {"phase": "final", "train_flops": 40.0, "val_bpb": 1.5}]
    assert bpb_at(recs, "train_flops", 15.0) == pytest.approx(2.5)
    assert bpb_at(recs, "train_flops", 30.0) == pytest.approx(1.75)
    assert bpb_at(recs, "train_flops", 5.0) is None  # before the first main-phase point: unknown
    assert bpb_at(recs, "train_flops", 50.0) is None  # the run never got that far


def test_step_graph_goes_only_to_arms_whose_step_can_be_captured(tmp_path):
    r = Runner(build_parser().parse_args(["--step_graph", "--out", str(tmp_path / "o"),
                                          "--ckpt_dir", str(tmp_path / "c")]), [])
    got = {arm: "--step_graph" in r.trainer_argv(arm, r.spec_of(arm, None), 60.0) for arm in ARMS}
    # every arm's main phase: entropy and space patching as the two-stage step (their joint phase, where
    # there is one, runs uncaptured: the trainer's rule, capture_problem)
    assert got == {arm: True for arm in ARMS}
    plain = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c")]), [])
    assert not any("--step_graph" in plain.trainer_argv(a, plain.spec_of(a, None), 60.0) for a in ARMS)


def test_sweep_variants_change_what_they_name():
    from ionllama.config import make_config
    from ionllama.experiment import SWEEP_VARIANTS, variant_spec

    for arm in ("dense", "ionllama_fixed", "mamba"):
        base = ARMS[arm]
        cfg = make_config(base["size"], base["model"], **{k: v for k, v in base.items() if k in ("d_model", "n_layers", "n_heads")})
        got = {v: variant_spec(base, v) for v in SWEEP_VARIANTS}
        assert got["lr2x"]["lr"] == 2 * base["lr"] and got["lr0.5x"]["lr"] == base["lr"] / 2
        assert got["wide"]["d_model"] > cfg.d_model > got["narrow"]["d_model"]
        assert got["wide"]["d_model"] % 64 == 0
        # heads follow the width where the model has them; MambaByte has none (the trainer refuses --n_heads there)
        assert got["wide"].get("n_heads") == (None if arm == "mamba" else got["wide"]["d_model"] // 64)
        make_config(base["size"], base["model"], **{k: v for k, v in got["wide"].items() if k in ("d_model",
                                                                                                    "n_heads")})
        assert got["deep"]["n_layers"] > cfg.n_layers > got["shallow"]["n_layers"] >= 1
        assert got["wide"].get("n_layers") == base.get("n_layers") and got["deep"].get("d_model") == base.get("d_model")
        assert all(got[v]["lr"] == base["lr"] for v in ("wide", "narrow", "deep", "shallow"))


def test_ionllama_sweep_also_widens_and_deepens_the_byte_level(tmp_path, capsys):
    """ionLlama arms get two more variants (local width, decoder depth) that reach the trainer as flags and
    build; the baselines do not."""
    from ionllama.config import make_config
    from ionllama.experiment import ION_SWEEP_VARIANTS, SWEEP_VARIANTS, sweep_variants, variant_spec
    from ionllama.train.cli import build_train_parser as trainer_parser

    assert sweep_variants(ARMS["dense"]) == ("base", *SWEEP_VARIANTS)
    assert sweep_variants(ARMS["ionllama_fixed"]) == ("base", *SWEEP_VARIANTS, *ION_SWEEP_VARIANTS)
    base = ARMS["ionllama_fixed"]
    cfg = make_config(base["size"], base["model"])
    wide, deep = variant_spec(base, "local_wide"), variant_spec(base, "local_deep")
    assert wide["d_local"] == 384 > cfg.d_local and wide.get("n_dec_layers") is None and wide["lr"] == base["lr"]
    assert deep["n_dec_layers"] == cfg.n_dec_layers + 2 and deep.get("d_local") is None
    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c")]), [])
    for spec, flag, val in ((wide, "--d_local", "384"), (deep, "--n_dec_layers", str(cfg.n_dec_layers + 2))):
        argv = r.trainer_argv("x", spec, 60.0)
        assert argv[argv.index(flag) + 1] == val
        targs = trainer_parser().parse_args(argv)
        assert getattr(targs, flag[2:]) == int(val)
    m = create_model("tiny", model="ionllama", d_local=96, n_dec_layers=3, patching="fixed")
    assert len(m.decoder) == 3 and m.config.d_local == 96
    # the sweep trains exactly these, and --from_sweep picks the lowest val BPB among them
    ran = []
    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c"),
                                          "--arms", "dense,ionllama_fixed", "--from_sweep"]), [])
    r.run_arm = lambda arm, out, spec, budget, name: ran.append(name)
    r.sweep()
    assert ran == [f"dense~{v}" for v in sweep_variants(ARMS["dense"])] + \
        [f"ionllama_fixed~{v}" for v in sweep_variants(base)]
    for v, bpb in (("base", 1.57), ("lr2x", 1.56), ("local_deep", 1.55)):
        f = tmp_path / "o" / "sweep" / f"ionllama_fixed~{v}" / "final.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"val": {"bpb": bpb}}))
    assert r.best_sweep_variant("ionllama_fixed") == "local_deep"
    # runs of different budgets do not compare: one swept at 4x the time won by its budget (an audit)
    f = tmp_path / "o" / "sweep" / "ionllama_fixed~lr2x" / "final.json"
    f.write_text(json.dumps({"val": {"bpb": 1.56}, "train": {"budget_s": 4.0}}))
    f = tmp_path / "o" / "sweep" / "ionllama_fixed~base" / "final.json"
    f.write_text(json.dumps({"val": {"bpb": 1.57}, "train": {"budget_s": 1.0}}))
    with pytest.raises(UserError, match="trained for different budgets .base 1 s, lr2x 4 s"):
        r.best_sweep_variant("ionllama_fixed")
    f.write_text(json.dumps({"val": {"bpb": 1.57}, "train": {"budget_s": 4.0}}))
    assert r.best_sweep_variant("ionllama_fixed") == "local_deep"
    capsys.readouterr()
    r.spec_of("ionllama_fixed")
    r.spec_of("ionllama_fixed")  # said once per arm
    said = [ln for ln in capsys.readouterr().out.splitlines() if "--from_sweep picks" in ln]
    assert len(said) == 1 and "picks local_deep from 3 finished sweep run(s)" in said[0], said
    # a sweep run in the same invocation (--stage sweep,pretrain): the pick is said again after it, from its results
    r.sweep()
    r.spec_of("ionllama_fixed")
    said = [ln for ln in capsys.readouterr().out.splitlines() if "--from_sweep picks" in ln]
    assert len(said) == 1 and "picks local_deep" in said[0], said
    # --sweep_variants: a subset, in the sweep's order (half an arm's sweep per GPU); a typo is a UserError
    ran.clear()
    r.a.sweep_variants = "local_deep,wide"
    r.sweep()
    assert ran == ["dense~wide", "ionllama_fixed~wide", "ionllama_fixed~local_deep"]
    r.a.sweep_variants = "wide,tall"
    with pytest.raises(UserError, match="tall"):
        r.sweep()
    # composed variants: the parts applied in turn; a knob turned twice is refused; an arm without a part's
    # knob (dense has no byte level) skips it; --from_sweep and the report see composed results on disk
    from ionllama.experiment import variant_spec
    both = variant_spec(base, "shallow+lr2x")
    assert both == variant_spec(variant_spec(base, "shallow"), "lr2x")
    assert both["n_layers"] == variant_spec(base, "shallow")["n_layers"] < cfg.n_layers and both["lr"] == 2 * base["lr"]
    for bad in ("lr2x+lr0.5x", "deep+shallow"):
        r.a.sweep_variants = bad
        with pytest.raises(UserError, match="one knob twice"):
            r.sweep()
    ran.clear()
    r.a.sweep_variants = "shallow+local_deep"
    r.sweep()
    assert ran == ["ionllama_fixed~shallow+local_deep"]
    f = tmp_path / "o" / "sweep" / "ionllama_fixed~shallow+local_deep" / "final.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"val": {"bpb": 1.54}}))
    assert r.trained_variants("ionllama_fixed")[-1] == "shallow+local_deep"
    assert r.best_sweep_variant("ionllama_fixed") == "shallow+local_deep"
    spec = r.spec_of("ionllama_fixed")
    assert spec["n_dec_layers"] == cfg.n_dec_layers + 2 and spec["n_layers"] < cfg.n_layers
    assert r.spec_of("ionllama_fixed")["n_dec_layers"] == cfg.n_dec_layers + 2
    # --sweep_dir: another --out reads these picks (a new setting on top of them, its rows kept apart), and
    # --override dropout reaches the trainer as a flag
    r2 = Runner(build_parser().parse_args(["--out", str(tmp_path / "o2"), "--ckpt_dir", str(tmp_path / "c"),
                                           "--arms", "ionllama_fixed", "--from_sweep", "--override", "dropout=0.1",
                                           "--sweep_dir", str(tmp_path / "o" / "sweep")]), [])
    assert r2.best_sweep_variant("ionllama_fixed") == "shallow+local_deep"
    spec2 = r2.spec_of("ionllama_fixed")
    assert spec2["n_dec_layers"] == cfg.n_dec_layers + 2 and spec2["dropout"] == 0.1
    argv = r2.trainer_argv("x", spec2, 60.0)
    assert trainer_parser().parse_args(argv).dropout == 0.1
    assert r2.sweep_pick("ionllama_fixed", "ionllama_fixed") == {  # recorded in the row's final.json
        "variant": "shallow+local_deep", "sweep_dir": str(tmp_path / "o" / "sweep"), "val_bpb": 1.54,
        "from_runs": ["base", "lr2x", "local_deep", "shallow+local_deep"]}
    assert r2.sweep_pick("ionllama_fixed", "ionllama_fixed~lr2x") is None  # a sweep run is not set from a pick
    # an --override of a knob the pick set replaces it, said once (it was silent); one the pick left alone is not said
    r4 = Runner(build_parser().parse_args(["--out", str(tmp_path / "o4"), "--ckpt_dir", str(tmp_path / "c"),
                                           "--arms", "ionllama_fixed", "--from_sweep",
                                           "--override", "n_layers=5,lr=1e-3",
                                           "--sweep_dir", str(tmp_path / "o" / "sweep")]), [])
    capsys.readouterr()
    assert r4.spec_of("ionllama_fixed")["n_layers"] == 5 and r4.spec_of("ionllama_fixed")["n_dec_layers"] == \
        cfg.n_dec_layers + 2
    said = [ln for ln in capsys.readouterr().out.splitlines() if "--override replaces" in ln]
    assert said == ["[experiment] ionllama_fixed: --override replaces the sweep pick's "
                    f"n_layers={spec['n_layers']} with 5"], said
    r3 = Runner(build_parser().parse_args(["--out", str(tmp_path / "o2"), "--ckpt_dir", str(tmp_path / "c"),
                                           "--arms", "ionllama_fixed", "--from_sweep"]), [])
    assert r3.best_sweep_variant("ionllama_fixed") is None  # its own <out>/sweep has no runs


def test_ngram_overrides_reach_the_trainer(tmp_path):
    """--override ngram_sizes=3-8,ngram_buckets=1024: the arm's spec holds the sizes as a tuple, and the trainer
    command it makes parses back to the same model options."""
    from ionllama.train.cli import build_train_parser

    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c"),
                                          "--override", "ngram_sizes=3-8,ngram_buckets=1024"]), [])
    spec = r.spec_of("ionllama_fixed", None)
    assert spec["ngram_sizes"] == (3, 4, 5, 6, 7, 8) and spec["ngram_buckets"] == 1024
    argv = r.trainer_argv("x", spec, 60.0)
    assert argv[argv.index("--ngram_sizes") + 1] == "3+4+5+6+7+8"
    targs = build_train_parser().parse_args(argv)
    assert (targs.ngram_sizes, targs.ngram_buckets) == ((3, 4, 5, 6, 7, 8), 1024)


def test_weight_decay_and_min_lr_ratio_overrides_reach_the_trainer_and_are_absent_otherwise(tmp_path):
    from ionllama.train.cli import build_train_parser

    def trainer_args(*override):
        r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c"),
                                              *override]), [])
        return r.trainer_argv("x", r.spec_of("ionllama_fixed", None), 60.0)

    argv = trainer_args("--override", "dropout=0.1,weight_decay=0.2,min_lr_ratio=0")
    targs = build_train_parser().parse_args(argv)
    assert (targs.weight_decay, targs.min_lr_ratio) == (0.2, 0.0)
    plain = trainer_args()
    assert "--weight_decay" not in plain and "--min_lr_ratio" not in plain  # earlier rows' commands stay as they were
    defaults = build_train_parser().parse_args(plain)
    assert (defaults.weight_decay, defaults.min_lr_ratio) == (0.1, 0.1)
    with pytest.raises(UserError, match="unknown key 'wd'"):
        trainer_args("--override", "wd=0.2")


def test_an_arm_that_would_overrun_the_deadline_is_cut_short_with_its_row_kept(tmp_path, monkeypatch, one_thread,
                                                                                 capsys):
    """An arm that started but runs late (more warm-up than --arm_overhead_s allowed) stops training early
    enough for its final evaluation, instead of being killed at the deadline with no row at all; the row
    says it was cut short."""
    from ionllama.experiment import budget

    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    monkeypatch.setattr(budget, "RESERVE_FIRST_EVAL_S", 0.5)
    monkeypatch.setattr(budget, "RESERVE_MARGIN_S", 1.0)
    monkeypatch.setattr(Runner, "time_left", lambda self: float("inf"))  # the arm is started regardless
    monkeypatch.setattr("ionllama.experiment.runner.process_age_s", lambda: 0.0)  # the clock starts at main()
    argv = _argv(tmp_path, pattern, "--arms", "dense", "--budget_s", "120", "--deadline_s", "6",
                 "--curve_points", "60")
    assert main(argv) == 0
    f = json.loads((tmp_path / "res" / "phase1" / "dense" / "final.json").read_text())
    t = f["train"]
    assert t["budget_s"] == 120 and t["cut_short_s"] is not None
    assert 0.5 < t["train_time_s"] < 6 and t["steps"] >= 2  # it trained until the reserve, not longer
    assert 0 < f["val"]["bpb"] < 9
    assert "(cut, of 120)" in (tmp_path / "res" / "phase1.md").read_text()
    out = capsys.readouterr()
    # the trainer's own stop path (Trainer.request_stop), which names why it stopped
    assert "(wall-clock deadline); saved" in out.out + out.err


def _deadline_corpus(tmp_path, monkeypatch) -> str:
    """A small corpus, and the deadline's reserves short enough for a few seconds' budget (no time limit left)."""
    from ionllama.experiment import budget

    monkeypatch.setattr(budget, "RESERVE_FIRST_EVAL_S", 0.5)
    monkeypatch.setattr(budget, "RESERVE_MARGIN_S", 1.0)
    monkeypatch.setattr("ionllama.experiment.runner.process_age_s", lambda: 0.0)
    monkeypatch.setattr(Runner, "time_left", lambda self: float("inf"))
    return write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)


def test_a_rerun_continues_an_arm_cut_short_by_the_deadline(tmp_path, monkeypatch, one_thread, capsys):
    """A row cut short by --deadline_s used to stay cut: the rerun found its final.json and skipped the arm. It now
    resumes from the arm's checkpoint to the full budget, and the row is no longer marked cut; without the time
    for it, the cut row is kept and the log says why."""
    pattern = _deadline_corpus(tmp_path, monkeypatch)
    base = _argv(tmp_path, pattern, "--arms", "dense", "--budget_s", "6", "--curve_points", "6")
    assert main([*base, "--deadline_s", "3"]) == 0
    final = tmp_path / "res" / "phase1" / "dense" / "final.json"
    cut = json.loads(final.read_text())["train"]
    assert cut["cut_short_s"] is not None and cut["train_time_s"] < 3
    (final.parent / "tasks.json").write_text("{}")  # as if the task stage had scored the cut checkpoint
    (final.parent / "task_outputs.jsonl.gz").write_bytes(b"")

    monkeypatch.setattr(Runner, "time_left", lambda self: 1.0)  # too little time: the cut row is kept as it is
    assert main(base) == 0
    assert json.loads(final.read_text())["train"] == cut
    assert "not continued" in "".join(capsys.readouterr())

    monkeypatch.setattr(Runner, "time_left", lambda self: float("inf"))
    assert main(base) == 0
    t = json.loads(final.read_text())["train"]
    assert t["cut_short_s"] is None and t["train_time_s"] >= 6 and t["steps"] > cut["steps"]
    assert not (final.parent / "tasks.json").exists() and (final.parent / "tasks.cut.json").exists()
    assert not (final.parent / "task_outputs.jsonl.gz").exists()
    assert (final.parent / "cut.task_outputs.jsonl.gz").exists()
    assert "(cut, of" not in (tmp_path / "res" / "phase1.md").read_text()
    recs = [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["phase"] != "final"]
    assert steps == sorted(steps) and recs[-1]["phase"] == "final"  # one curve, resumed, not two runs mixed

    # cut again, then rerun where its checkpoint is gone (a fresh machine): the full budget, from the start
    import shutil

    final.unlink()
    shutil.rmtree(tmp_path / "ck" / "dense")
    assert main([*base, "--deadline_s", "3"]) == 0
    assert json.loads(final.read_text())["train"]["cut_short_s"] is not None
    shutil.rmtree(tmp_path / "ck" / "dense")
    capsys.readouterr()
    assert main(base) == 0
    assert "trains again from the start" in "".join(capsys.readouterr())
    t = json.loads(final.read_text())["train"]
    assert t["cut_short_s"] is None and t["train_time_s"] >= 6


def test_joint_frac_sets_the_joint_phase_and_is_checked(tmp_path):
    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c")]), [])
    spec = r.spec_of("ionllama", None)
    argv = r.trainer_argv("ionllama", spec, 10.0)
    default_joint = int(argv[argv.index("--joint_steps") + 1])
    argv0 = r.trainer_argv("ionllama", {**spec, "joint_frac": 0}, 10.0)
    assert default_joint > 0 and argv0[argv0.index("--joint_steps") + 1] == "0"
    with pytest.raises(UserError, match="joint_frac"):
        r.trainer_argv("ionllama", {**spec, "joint_frac": 1.5}, 10.0)
    # entropy_frac 1 was a ZeroDivisionError, -1 trained one entropy step; token_seq_div 0 divided by zero
    for bad in (1, -1, 1.5):
        with pytest.raises(UserError, match="entropy_frac"):
            r.trainer_argv("ionllama", {**spec, "entropy_frac": bad}, 10.0)
    for bad in (0, -1, 2.5):
        with pytest.raises(UserError, match="token_seq_div"):
            r.trainer_argv("bpe", {**r.spec_of("bpe", None), "token_seq_div": bad}, 10.0)


@pytest.mark.parametrize("joint_steps", [0, 5])
def test_warm_up_runs_the_joint_configuration_only_where_the_plan_has_one(joint_steps, one_thread):
    from types import SimpleNamespace

    from ionllama.experiment import warm_up

    torch.manual_seed(0)
    m = create_model("tiny", model="ionllama", patching="entropy")
    x = torch.randint(0, 256, (2, 64))
    frozen = []
    real = m.freeze_entropy
    m.freeze_entropy = lambda flag=True: (frozen.append(flag), real(flag))
    tr = SimpleNamespace(model=m, device=torch.device("cpu"), amp_dtype=None, fwd=m,
                         sampler=SimpleNamespace(get=lambda k: (x, x)), stage_a=None,
                         plan=SimpleNamespace(joint_steps=joint_steps),
                         args=SimpleNamespace(compile=False, step_graph=False), mark_step=lambda: None)
    warm_up(tr)
    configs = [f for f in frozen[:-1]]  # the last call restores the model's own setting
    assert configs == ([True, False] if joint_steps else [True])


def test_deadline_counts_from_the_process_start():
    import subprocess
    import sys

    from ionllama.experiment.runner import process_age_s

    assert process_age_s() > 0.0  # this pytest process started before now
    code = "import time; time.sleep(1.5); from ionllama.experiment.runner import process_age_s; print(process_age_s())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.4 <= child < 30.0  # the child's sleep before the import counts


def _fake_run(d, val, steps, flops, curve, trainer_flags=None):
    """A finished run folder: final.json and metrics.jsonl with curve points (step, train_flops, val_bpb); 1,000
    bytes of text per step."""
    d.mkdir(parents=True)
    train = {"budget_s": 420.0, "train_time_s": 420.0, "steps": steps, "epochs": 1.0, "bytes_per_s": 2e6,
             "train_flops": flops, "bytes_seen": 1000 * steps}
    final = {"params": 35e6, "val": {"bpb": val}, "wikipedia-val": {"bpb": val + 0.7}, "train": train,
             "bytes_per_patch": 4.0, "device": {"name": "NVIDIA H200"}, "date": "2026-12-01T00:00:00+00:00",
             "git": {"sha": "abc1234"}, "command": "ionllama experiment ...", "spec": {}}
    if trainer_flags:
        final["trainer_command"] = "ionllama train " + trainer_flags
    (d / "final.json").write_text(json.dumps(final))
    recs = [{"step": s, "phase": "main", "train_flops": f, "train_time_s": 1.0 + i, "val_bpb": b,
             "bytes_seen": 1000 * s}
            for i, (s, f, b) in enumerate(curve)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_compare_reports_runs_of_different_results_folders(tmp_path, capsys):
    """--stage compare: one table and the equal-FLOPs/-steps views over run folders of different results
    folders, each named <results folder>/<run>; nothing trained; bad --runs refused in one line."""
    a, b = tmp_path / "phase1-a" / "ionllama", tmp_path / "phase1-b" / "ionllama"
    _fake_run(a, 1.40, 100, 60.0, [(50, 30.0, 1.60), (100, 60.0, 1.40)])
    _fake_run(b, 1.37, 200, 90.0, [(50, 20.0, 1.70), (100, 40.0, 1.50), (200, 90.0, 1.37)])
    out = tmp_path / "cmp" / "entropy-vs-fixed"
    assert main(["--stage", "compare", "--runs", str(a), str(b), "--out", str(out)]) == 0
    md = (tmp_path / "cmp" / "entropy-vs-fixed.md").read_text()
    assert "| phase1-a/ionllama |" in md and "| phase1-b/ionllama |" in md and "Not yet run" not in md
    assert f"{a}/final.json" in md and "--stage compare" in md
    s = json.loads((tmp_path / "cmp" / "entropy-vs-fixed.json").read_text())
    # at a's 60 FLOPs b is between its points at 40 (1.50) and 90 (1.37); at a's 100 steps b had 1.50
    assert s["equal_flops"]["arm"] == "phase1-a/ionllama"
    assert s["equal_flops"]["val_bpb"]["phase1-b/ionllama"] == pytest.approx(1.50 - 0.13 * 20 / 50)
    assert s["equal_steps"]["val_bpb"] == {"phase1-a/ionllama": pytest.approx(1.40), "phase1-b/ionllama": 1.50}
    # equal text: a saw 100,000 bytes, b had seen as much at its step 100
    assert s["equal_text"]["bytes_seen"] == 100_000 and s["equal_text"]["arm"] == "phase1-a/ionllama"
    assert s["equal_text"]["val_bpb"]["phase1-b/ionllama"] == pytest.approx(1.50)
    assert "at equal training text (bytes)" in md
    assert "seed_groups" not in s  # no trainer command, so no seed to group by

    # seed groups: runs whose trainer flags differ only in --seed (and where they ran) give a mean and a spread;
    # another learning rate is another setting, a run given twice is not a seed group
    flags = "--model ionllama --lr 0.001 --seed {} --save_dir {} --device cuda"
    runs = {}
    for name, val, seed, lr in (("s0", 1.40, 0, "0.001"), ("s1", 1.44, 1, "0.001"), ("lr", 1.30, 2, "0.002")):
        runs[name] = tmp_path / f"seeds-{name}" / "ionllama"
        _fake_run(runs[name], val, 100, 60.0, [(100, 60.0, val)],
                  trainer_flags=flags.format(seed, f"ck/{name}").replace("0.001", lr))
    seeds_out = tmp_path / "cmp" / "seeds"
    assert main(["--stage", "compare", "--runs", *map(str, runs.values()), "--out", str(seeds_out)]) == 0
    s = json.loads((tmp_path / "cmp" / "seeds.json").read_text())
    (g,) = s["seed_groups"]
    assert g["runs"] == ["seeds-s0/ionllama", "seeds-s1/ionllama"] and g["seeds"] == ["0", "1"]
    assert g["val"]["mean"] == pytest.approx(1.42) and g["val"]["spread"] == pytest.approx(0.04)
    assert g["wikipedia-val"]["mean"] == pytest.approx(2.12)
    seeds_md = (tmp_path / "cmp" / "seeds.md").read_text()
    assert "| seeds-s0/ionllama, seeds-s1/ionllama | 0, 1 | 1.4200 (0.0400) |" in seeds_md
    assert (out / "bpb_vs_flops.png").is_file()
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    for argv, msg in ((["--stage", "compare", "--runs", str(tmp_path / "nope")], "nope does not exist"),
                      (["--stage", "compare", "--runs", str(tmp_path / "empty")], "no final.json"),
                      (["--stage", "compare,report", "--runs", str(a)], "no other stage"),
                      # an experiment's own folder: its report was silently replaced (a new user's report)
                      (["--stage", "compare", "--runs", str(b), "--out", str(a.parent)], "experiment's results folder"),
                      (["--stage", "compare", "--runs", str(b), "--out", str(a)], "is a run folder"),
                      (["--stage", "compare", "--runs", str(b), "--out", "/proc/cmp"], "cannot write --out"),
                      # a user's own <out>.json was replaced by the summary (a new user's audit)
                      (["--stage", "compare", "--runs", str(b), "--out", str(tmp_path / "notes")], "a file of yours?")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(out)] if "--out" not in argv else argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'


def test_report_title_heads_new_pages_and_replaces_only_the_placeholder(tmp_path, capsys):
    """--title heads a new page, replaces the "# comparison" placeholder of an earlier one, and never a heading
    written by hand."""
    a = tmp_path / "phase1-a" / "ionllama"
    _fake_run(a, 1.40, 100, 60.0, [(50, 30.0, 1.60), (100, 60.0, 1.40)])
    out = tmp_path / "cmp"
    md = tmp_path / "cmp.md"
    assert main(["--stage", "compare", "--runs", str(a), "--out", str(out)]) == 0
    assert md.read_text().startswith("# comparison\n")
    assert main(["--stage", "compare", "--runs", str(a), "--out", str(out), "--title", "Q2: wider window"]) == 0
    assert md.read_text().startswith("# Q2: wider window\n") and "| phase1-a/ionllama |" in md.read_text()
    md.write_text("# By hand\n\nprose\n\n" + md.read_text().split("\n", 1)[1])
    capsys.readouterr()
    assert main(["--stage", "compare", "--runs", str(a), "--out", str(out), "--title", "other"]) == 0
    text = md.read_text()
    assert text.startswith("# By hand\n\nprose\n") and "other" not in text.split("\n")[0]
    assert "keeps its own heading; --title 'other' is not applied" in capsys.readouterr().out  # it was silent


def test_an_arm_out_of_memory_is_one_line_naming_the_batch_and_other_errors_still_raise(tmp_path, monkeypatch,
                                                                                          capsys):
    """An arm that ran out of memory was a traceback from deep in the trainer; now it is one line naming the arm and
    the flags that size it (the train and generate commands already did this). An error that is not an allocation
    failure keeps its traceback: the catch must not hide bugs."""
    from ionllama.errors import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the types torch raises for it

    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)

    class Trainer:
        def __init__(self, error):
            self.error = error

        def run(self):
            raise self.error

    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"), RuntimeError("a bug")):
        monkeypatch.setattr("ionllama.experiment.runner.make_budget_trainer", lambda *a, **k: Trainer(error))
        argv = _argv(tmp_path, pattern, "--arms", "dense")
        if isinstance(error, torch.OutOfMemoryError):
            with pytest.raises(SystemExit) as e:
                main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2 and len(err) == 1, err
            assert err[0].startswith("error: arm dense: out of memory at --batch_size 4 x --seq_len 64"), err
        else:
            with pytest.raises(RuntimeError, match="a bug"):
                main(argv)

    # the task stage: the same, naming its own batch flag
    (tmp_path / "ck" / "dense").mkdir(parents=True, exist_ok=True)
    (tmp_path / "ck" / "dense" / "latest.pt").write_bytes(b"")
    (tmp_path / "res" / "phase1" / "dense").mkdir(parents=True, exist_ok=True)
    (tmp_path / "res" / "phase1" / "dense" / "final.json").write_text("{}")  # its pretraining, as the stage needs
    monkeypatch.setattr("ionllama.train.checkpoint.load_model", lambda *a, **k: None)

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr("ionllama.experiment.runner.run_task_stage", no_memory)
    with pytest.raises(SystemExit) as e:
        main(_argv(tmp_path, pattern, "--stage", "tasks", "--task_arms", "dense", "--task_batch", "8"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: arm dense: out of memory in the task stage at --task_batch 8"), err


def test_rows_scored_differently_are_flagged_in_a_comparison():
    """compare put 500,000 bytes in 256-byte windows beside 2,000,000 in 4,096-byte ones under one "val BPB"
    heading. Rows that differ in bytes scored, byte window or val data are now named in a warning line; a token
    model's window in tokens beside the byte models' (matched by design) is not."""
    from ionllama.experiment.report import scoring_note

    def arm(model, seq_len, scored, sha):
        return {"model": model, "train": {"seq_len": seq_len}, "val": {"bytes": scored, "bpb": 1.3},
                "data": {"val_sha256": sha}}

    alike = {"dense": arm("dense", 1024, 2_000_000, "ab" * 32), "bpe": arm("bpe", 256, 2_000_000, "ab" * 32),
             "ionllama": arm("ionllama", 1024, 2_000_000, "ab" * 32)}
    assert scoring_note(alike) is None
    note = scoring_note({**alike, "other": arm("ionllama", 4096, 500_000, "cd" * 32)})
    assert note.startswith("**Not scored alike**")
    assert "500,000 (other)" in note and "4096 bytes (other)" in note and "cdcdcdcdcdcd (other)" in note


def test_a_time_bounded_arm_logs_its_seconds_not_a_never_step_count(tmp_path, one_thread, capsys):
    """An arm's progress line read `step 3219/1000000000`: the time-based plan's loop bound (10**9, "never")
    shown as its last step. It now shows the arm's training seconds of its budget."""
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    assert main(_argv(tmp_path, pattern, "--arms", "dense", "--budget_s", "1", "--curve_points", "1")) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("step ") and " B/s " in x]
    assert lines, "no progress line"
    assert all("/1000000000" not in x and "(time-bounded: " in x and "/1 s) [main]" in x for x in lines), lines
    # nor the start lines ("phase main: steps 0..1000000000"; the nominal plan's steps said as the arm's length)
    assert "..1000000000" not in out and "phase main: from step 0 until --max_train_time 1 s" in out, out
    assert "(nominal: the schedule follows the 1 s budget)" in out, out


def test_a_given_arm_overhead_is_the_deadline_reserve_until_an_evaluation_is_timed(tmp_path, monkeypatch,
                                                                                   one_thread):
    """--deadline_s kept ~60 s for the first evaluation whatever --arm_overhead_s said: with --arm_overhead_s 1
    and a 40 s deadline, an arm the runner had started (budget + overhead fit) was cut at its first step, and an
    overhead above 60 s was not kept. A given overhead is now the reserve until a curve point times one."""
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    monkeypatch.setattr("ionllama.experiment.runner.process_age_s", lambda: 0.0)  # the clock starts at main()
    base = _argv(tmp_path, pattern, "--arms", "dense", "--budget_s", "2", "--curve_points", "1")
    assert main([*base, "--deadline_s", "40", "--arm_overhead_s", "1"]) == 0
    t = json.loads((tmp_path / "res" / "phase1" / "dense" / "final.json").read_text())["train"]
    assert t["cut_short_s"] is None and t["train_time_s"] >= 2

    monkeypatch.setattr(Runner, "time_left", lambda self: float("inf"))  # started although 2 + 100 s do not fit
    assert main([*base, "--deadline_s", "80", "--arm_overhead_s", "100", "--out", str(tmp_path / "r2" / "phase1"),
                 "--ckpt_dir", str(tmp_path / "ck2")]) == 0
    t = json.loads((tmp_path / "r2" / "phase1" / "dense" / "final.json").read_text())["train"]
    assert t["cut_short_s"] is not None and t["train_time_s"] < 2  # 100 s kept, not 60


def test_report_stage_rewrites_only_the_section_between_the_markers(tmp_path):
    """A results page regenerated by --stage report keeps a hand-written heading, prose and sections outside the
    markers; --title does not replace a heading of the user's. The "Generated by" line lies inside the
    markers: it names the command that generated the section (each arm's final.json keeps its own)."""
    from ionllama.experiment.report import BEGIN, END

    out = tmp_path / "res" / "phase1"
    _fake_run(out / "dense", 1.40, 100, 60.0, [(50, 30.0, 1.60), (100, 60.0, 1.40)])
    assert main(["--stage", "report", "--out", str(out)]) == 0
    md = tmp_path / "res" / "phase1.md"
    head, tail = "# My notes\n\nWhy these arms.\n\n", "\n## Discussion\n\nby hand\n"
    section = md.read_text()[md.read_text().index(BEGIN):md.read_text().index(END) + len(END)]
    md.write_text(head + section + tail)
    assert main(["--stage", "report", "--out", str(out), "--title", "Other", "--eval_bytes", "9"]) == 0
    text = md.read_text()
    assert text.startswith(head + BEGIN) and text.endswith(END + tail)
    assert "--title Other --eval_bytes 9` from" in text and "| dense |" in text and "# Other" not in text


def test_report_of_an_arm_whose_final_bpb_is_null_lists_it_last(tmp_path):
    """A non-finite final BPB is written as null (benchmark._clean): the report's sort compared None with a float, a
    TypeError traceback from --stage report and from the report at the end of every invocation."""
    out = tmp_path / "res" / "phase1"
    _fake_run(out / "dense", 1.40, 100, 60.0, [(50, 30.0, 1.60), (100, 60.0, 1.40)])
    _fake_run(out / "bpe", 1.20, 100, 60.0, [(50, 30.0, 1.60)])
    final = json.loads((out / "bpe" / "final.json").read_text())
    final["val"]["bpb"] = None
    (out / "bpe" / "final.json").write_text(json.dumps(final))
    _fake_run(out / "mamba", 1.30, 100, 60.0, [(50, 30.0, 1.50), (100, 60.0, 1.30)])
    assert main(["--stage", "report", "--out", str(out)]) == 0
    rows = [line.split("|")[1].strip() for line in (tmp_path / "res" / "phase1.md").read_text().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in ("dense", "bpe", "mamba")]
    assert rows[:3] == ["mamba", "dense", "bpe"]


def test_the_task_table_names_the_task_stages_own_device_date_and_commit(tmp_path):
    """The task stage is its own invocation (often a later commit): its accuracies were attributed to the pretraining's
    commit and date on the page, and the summary's tasks kept no command, device, date or commit."""
    out = tmp_path / "res" / "phase1"
    _fake_run(out / "dense", 1.40, 100, 60.0, [(50, 30.0, 1.60), (100, 60.0, 1.40)])
    per_task = {"add": {"accuracy": 0.5, "n": 4, "ci95": [0.2, 0.8]}}
    (out / "dense" / "tasks.json").write_text(json.dumps({
        "results": {"per_task": per_task}, "command": "ionllama experiment --stage tasks",
        "date": "2026-12-05T01:00:00", "device": {"name": "NVIDIA H100"}, "git": {"sha": "feedbeef12345"}}))
    assert main(["--stage", "report", "--out", str(out)]) == 0
    page = (tmp_path / "res" / "phase1.md").read_text()
    line = next(x for x in page.splitlines() if x.startswith("Task accuracy"))
    assert "device: NVIDIA H100; dates: 2026-12-05; commits: feedbeef12" in line, line
    summary = json.loads((tmp_path / "res" / "phase1.json").read_text())
    assert summary["tasks_provenance"]["dense"]["git"]["sha"] == "feedbeef12345"
    assert summary["tasks"]["dense"] == per_task


def test_a_report_reading_another_folders_sweep_leaves_its_page_alone(tmp_path):
    """--stage report with --sweep_dir <other>/sweep rewrote <other>/sweep.md, which then named this command."""
    other = tmp_path / "other" / "sweep"
    _fake_run(other / "dense~base", 1.50, 100, 60.0, [(100, 60.0, 1.50)])
    page = tmp_path / "other" / "sweep.md"
    page.write_text("# phase1 sweep\n\nwritten by the sweep's own command\n")
    out = tmp_path / "res" / "phase1"
    _fake_run(out / "dense", 1.40, 100, 60.0, [(50, 30.0, 1.60), (100, 60.0, 1.40)])
    assert main(["--stage", "report", "--out", str(out), "--sweep_dir", str(other)]) == 0
    assert page.read_text() == "# phase1 sweep\n\nwritten by the sweep's own command\n"
    assert "| dense |" in (tmp_path / "res" / "phase1.md").read_text()


def test_task_compile_trains_through_the_compiled_forward(monkeypatch):
    """--task_compile: the stage's steps go through torch.compile(model) (the eager stage waits on the host on a GPU)
    and tasks.json says so; the compiled forward (here torch's eager backend) trains to the eager losses."""
    from argparse import Namespace

    from ionllama.experiment import tasks as T

    monkeypatch.setattr("ionllama.eval.task_eval.run_tasks", lambda *a, **k: {"per_task": {}})
    real_compile, compiled = torch.compile, []

    def spy(model, **kw):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(T.torch, "compile", spy)
    losses = {}
    for on in (False, True):
        torch.manual_seed(0)
        m = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
        a = Namespace(task_steps=3, task_lr=1e-3, seed=1, task_batch=2, task_seq_len=96, task_n=1, task_compile=on)
        res = T.run_task_stage(m, torch.device("cpu"), None, a)
        assert res["fine_tuning"]["compiled"] is on and compiled == ([m] if on else [])
        losses[on] = [r["loss"] for r in res["fine_tuning"]["losses"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_task_results_of_the_other_stage_speed_are_not_reused(tmp_path):
    """A tasks.json from an eager stage is not skipped into a --task_compile row (compiled steps differ in their
    rounding) nor the other way round; files from before the flag carry no "compiled" and are taken as before."""
    from argparse import Namespace

    from ionllama.experiment.runner import Runner

    me = Namespace(a=Namespace(task_steps=3, task_batch=2, task_lr=1e-3, task_seq_len=96, seed=1, task_n=1,
                               task_compile=True))
    out = tmp_path / "tasks.json"
    ft = {"steps": 3, "examples_per_step": 2, "lr": 1e-3, "row_len": 96, "seed": 1}
    out.write_text(json.dumps({"fine_tuning": ft, "results": {"n_per_cell": 1}}))
    Runner._check_same_tasks(me, out, "dense")  # no "compiled" recorded: as before the flag
    out.write_text(json.dumps({"fine_tuning": {**ft, "compiled": False}, "results": {"n_per_cell": 1}}))
    with pytest.raises(UserError, match="under other settings"):
        Runner._check_same_tasks(me, out, "dense")
    me.a.task_compile = False
    Runner._check_same_tasks(me, out, "dense")


def test_a_curve_evaluation_is_left_out_of_the_next_windows_bytes_per_s(tmp_path, monkeypatch, one_thread):
    """The curve evaluations were taken off the training time but not off the logged bytes/s of the window they fell
    in: an H200 run at 2.8 MB/s logged 0.58 MB/s after each of them (0.08 after the last). A slow evaluation must
    now leave every window's rate near the others."""
    import time

    from ionllama.train.trainer import Trainer

    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    plain = Trainer.evaluate

    def slow(self, phase_label):
        time.sleep(1.0)
        return plain(self, phase_label)

    monkeypatch.setattr(Trainer, "evaluate", slow)
    assert main(_argv(tmp_path, pattern, "--arms", "dense", "--budget_s", "3", "--curve_points", "3")) == 0
    run = tmp_path / "res" / "phase1" / "dense"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["bytes_per_s"] for r in recs if r.get("bytes_per_s")]
    assert len([r for r in recs if "val_bpb" in r and r["phase"] != "final"]) >= 3  # init + curve points
    assert len(rates) >= 4
    median = sorted(rates)[len(rates) // 2]
    assert min(rates) > 0.25 * median, rates


def test_text_field_reaches_the_data_the_trainer_and_the_eval_sets(tmp_path, one_thread):
    """JSONL whose text is under another key could not be used: the experiment said "pass --text_field NAME" and
    then refused --text_field. It now takes it for the prepared data, the arms' trainer and --eval_data."""
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    for split in ("train", "val"):
        f = tmp_path / f"corpus-{split}.jsonl"
        f.write_text("".join(json.dumps({"content": json.loads(ln)["text"]}) + "\n"
                             for ln in f.read_text().splitlines()))
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"content": "an evaluation document " * 40}) + "\n")
    argv = _argv(tmp_path, pattern, "--arms", "dense", "--budget_s", "1", "--curve_points", "1",
                 "--eval_data", str(extra))
    with pytest.raises(SystemExit):
        main(argv)  # no 'text' field
    assert main([*argv, "--text_field", "content"]) == 0
    f = json.loads((tmp_path / "res" / "phase1" / "dense" / "final.json").read_text())
    assert 0 < f["val"]["bpb"] < 9 and f["val"]["bytes"] > 2000
    assert f["extra"]["bytes"] == len(("an evaluation document " * 40).encode())


def test_an_empty_arm_list_a_broken_final_json_and_a_foreign_task_checkpoint_are_refused(tmp_path, one_thread,
                                                                                         capsys):
    """From a new user's audit: `--arms ,` prepared the data, ran nothing and exited 0; a final.json cut short read as
    "done already" while the report left the arm out, so it could never be finished; the task stage fine-tuned
    whatever latest.pt lay in --ckpt_dir (a 642-step run of another budget) beside a 1,320-step row."""
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    base = _argv(tmp_path, pattern, "--arms", "dense", "--budget_s", "1", "--curve_points", "1")

    def refused(argv, words):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err

    refused(_argv(tmp_path, pattern, "--arms", ","), "names no arm")
    # (a CLI audit) --stage '' ran nothing, exit 0, and left an empty --out; a blank --ckpt_dir made a folder '  '
    refused(_argv(tmp_path, pattern, "--stage", ","), "names no stage")
    refused(_argv(tmp_path, pattern, "--ckpt_dir", "  "), "--ckpt_dir is blank")
    assert main(base) == 0
    final = tmp_path / "res" / "phase1" / "dense" / "final.json"
    good = final.read_text()
    final.write_text(good[:40])
    refused(base, "is not a readable results file")
    final.write_text(good)
    f = json.loads(good)
    f["train"]["steps"] += 7  # as if another run's checkpoint lay in --ckpt_dir
    final.write_text(json.dumps(f))
    tasks = [*base, "--stage", "tasks", "--task_arms", "dense", "--task_steps", "2", "--task_n", "1"]
    refused(tasks, "is not the checkpoint behind that row")
    final.write_text(good)
    assert main(tasks) == 0 and (final.parent / "tasks.json").is_file()


def test_an_interrupted_run_still_rebuilds_the_report_of_its_finished_arms(tmp_path, one_thread, monkeypatch,
                                                                          capsys):
    """^C after an arm had finished left no report page (--help: "rebuilt after every invocation"); the finished
    arms' rows now land in it before the interrupt ends the run (exit 130)."""
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    base = _argv(tmp_path, pattern, "--arms", "dense", "--budget_s", "1", "--curve_points", "1")
    assert main(base) == 0
    page = tmp_path / "res" / "phase1.md"
    page.unlink()

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "tasks", interrupted)
    with pytest.raises(SystemExit) as e:
        main([*base, "--stage", "pretrain,tasks", "--task_arms", "dense"])
    assert e.value.code == 130 and "| dense |" in page.read_text()


def test_rows_run_with_different_settings_are_named_on_the_page(tmp_path, one_thread):
    """Two invocations into one --out (`--arms dense --seed 1`, later `--arms bpe --seed 2 --task_steps ...`) were
    tabled side by side with no word that they ran differently. The page now names each flag whose value differs
    between its rows (the task flags read from the command that ran the task stage); bookkeeping flags (--arms,
    --out, --deadline_s, ...) are not settings."""
    from ionllama.experiment.report import settings_note

    def arm(cmd, task_cmd=None):
        f = {"command": cmd}
        if task_cmd:
            f["tasks"] = {"command": task_cmd}
        return f

    base = "ionllama experiment --matrix phase1 --budget_s 75 --out r --deadline_s 500"
    alike = {"dense": arm(f"{base} --arms dense --seed 1"), "bpe": arm(f"{base} --arms bpe --seed 1 --ckpt_dir c")}
    assert settings_note(alike) is None
    note = settings_note({**alike, "x": arm(f"{base} --arms x --seed 2 --step_graph",
                                            f"{base} --stage tasks --task_arms x --task_steps 6000")})
    assert note.startswith("**Run with different settings**"), note
    assert "--seed: 1 (dense, bpe); 2 (x)" in note and "--step_graph: (default) (dense, bpe); (on) (x)" in note
    assert "--task_steps: (default) (dense, bpe); 6000 (x)" in note
    assert "--arms" not in note and "--task_arms" not in note and "--deadline_s" not in note, note
    # a repeated --override: every value counts, not the last alone (same last, different first: one setting before)
    twice = settings_note({"dense": arm(f"{base} --arms dense --override d_model=32 --override n_layers=1"),
                           "mamba": arm(f"{base} --arms mamba --override d_model=64 --override n_layers=1")})
    assert twice and "--override: d_model=32 n_layers=1 (dense); d_model=64 n_layers=1 (mamba)" in twice, twice

    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    assert main(_argv(tmp_path, pattern, "--arms", "dense", "--budget_s", "1", "--curve_points", "1")) == 0
    page = tmp_path / "res" / "phase1.md"
    assert "Run with different settings" not in page.read_text()
    assert main(_argv(tmp_path, pattern, "--arms", "bpe", "--budget_s", "1", "--curve_points", "1",
                      "--seed", "7")) == 0
    text = page.read_text()
    assert "| dense |" in text and "| bpe |" in text
    line = next(x for x in text.splitlines() if x.startswith("**Run with different settings**"))
    assert line.startswith("**Run with different settings**: --seed: ") and line.count("|") == 0, line
    assert "7 (bpe)" in line and "(default) (dense)" in line, line


def test_an_entropy_arm_cut_in_its_main_phase_continues(tmp_path, monkeypatch, one_thread):
    """The trainer checks a resumed step's phase against the nominal step counts (the arm's 100,000-step schedule puts
    thousands of steps in the entropy phase), but an arm's phases follow its training time: an entropy arm stopped in
    its main phase at step ~20 was refused on every rerun ("step 21 is in the entropy phase", a new user's report)."""
    pattern = _deadline_corpus(tmp_path, monkeypatch)
    base = _argv(tmp_path, pattern, "--arms", "ionllama", "--budget_s", "8", "--curve_points", "3")
    assert main([*base, "--deadline_s", "6"]) == 0
    ck = torch.load(tmp_path / "ck" / "ionllama" / "latest.pt", map_location="cpu", weights_only=True)
    assert ck["phase"] == "main" and ck["step"] < ck["scheduler"]["entropy_steps"]  # nominally an entropy step
    assert main(base) == 0
    t = json.loads((tmp_path / "res" / "phase1" / "ionllama" / "final.json").read_text())["train"]
    assert t["cut_short_s"] is None and t["train_time_s"] >= 8


def test_the_report_is_rebuilt_when_an_arm_is_stopped_or_refused(tmp_path, monkeypatch, one_thread):
    """--help says the report is rebuilt after every invocation, but a signal during an arm's training reaches the
    runner as the trainer's SystemExit(130), not KeyboardInterrupt, and a refused arm (exit 2) skipped it too: the
    finished arms stayed "Not yet run" on the page (a new user's report)."""
    pattern = write_corpus(tmp_path, n_train=12, n_val=2, doc_bytes=1200)
    assert main(_argv(tmp_path, pattern, "--arms", "dense")) == 0
    page = tmp_path / "res" / "phase1.md"
    for stop in (SystemExit(130), UserError("refused")):
        page.unlink()

        def pretrain(self, stop=stop):
            raise stop
        monkeypatch.setattr(Runner, "pretrain", pretrain)
        with pytest.raises(SystemExit):  # 130, or the refusal's 2
            main(_argv(tmp_path, pattern, "--arms", "dense,bpe"))
        assert "| dense |" in page.read_text(), stop


def test_an_override_a_baseline_does_not_use_is_left_out_of_its_arm_and_said(tmp_path, capsys):
    """--override d_local=64 applies to every arm; the trainer now refuses options a model does not use, so the
    runner leaves it out of the baselines' commands (once said per arm) and keeps it for ionLlama's."""
    from ionllama.train.cli import build_train_parser
    from ionllama.train.trainer import model_config_from_args

    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c"),
                                          "--override", "d_local=64,n_heads=4"]), [])
    capsys.readouterr()
    assert r.spec_of("ionllama_fixed")["d_local"] == 64
    for arm in ("dense", "mamba", "dense"):
        spec = r.spec_of(arm)
        assert "d_local" not in spec
        model_config_from_args(build_train_parser().parse_args(r.trainer_argv("x", spec, 60.0)))  # not refused
    assert r.spec_of("dense")["n_heads"] == 4 and "n_heads" not in r.spec_of("mamba")
    said = [ln for ln in capsys.readouterr().out.splitlines() if "left out" in ln]
    assert said == ["[experiment] dense: --override d_local left out: model dense does not use it",
                    "[experiment] mamba: --override d_local, n_heads left out: model mamba does not use them"], said
    # token_seq_div (a token model's window) halved the byte arms' windows too, without a word (an audit)
    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o2"), "--ckpt_dir", str(tmp_path / "c2"),
                                          "--override", "token_seq_div=2"]), [])
    capsys.readouterr()
    assert r.seq_len_of(r.spec_of("bpe")) == 512 and r.seq_len_of(r.spec_of("dense")) == 1024
    assert "dense: --override token_seq_div left out" in capsys.readouterr().out
    # the sweep's width variant sets heads only where the model has them
    from ionllama.experiment.matrix import variant_spec

    assert "n_heads" not in variant_spec(dict(ARMS["mamba"]), "wide") and "n_heads" in variant_spec(
        dict(ARMS["dense"]), "wide")


def test_a_baseline_row_finished_with_an_override_it_ignores_is_not_a_changed_setting(tmp_path):
    """A mamba row run under --override dropout=0.1 before such keys were left out of baseline arms recorded it in
    its spec and trainer command; comparing with today's spec (without it) refused the finished row as "other
    settings", with advice that could no longer be followed (a review's find). An option the model is not built
    from is not compared; one it is built from still is."""
    from ionllama.experiment.runner import _changed_settings

    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c"),
                                          "--override", "dropout=0.1"]), [])
    spec = r.spec_of("mamba")
    argv = r.trainer_argv("mamba", spec, 60.0)
    old_spec = {**json.loads(json.dumps(spec)), "dropout": 0.1}
    old_cmd = "ionllama train " + " ".join(argv + ["--dropout", "0.1"])
    assert _changed_settings({"spec": old_spec, "trainer_command": old_cmd}, spec, argv) == ""
    other = {**old_spec, "d_model": 256}
    assert "spec" in _changed_settings({"spec": other, "trainer_command": old_cmd}, spec, argv)


def test_a_finished_arms_model_is_freed_before_the_next_arm_even_with_automatic_gc_off(tmp_path, monkeypatch,
                                                                                      one_thread):
    """A process's third mamba sweep cell ran out of GPU memory as it started (sixty-first session, H100 80 GB; it
    trained in a fresh process): a finished arm's trainer holds its model in reference cycles (here on a CPU too:
    without the runner's collection the first arm's model is alive when the second starts), so its CUDA memory
    stays held until the cyclic collector runs. With automatic collection off, every model of a finished arm must
    be gone by the time the next arm starts and after the last."""
    import gc
    import weakref

    import ionllama.experiment.runner as R

    models, alive_at_start = [], []
    real = R.make_budget_trainer

    def tracked(*a, **k):  # (no closure over the trainer here: that would make a cycle of the test's own)
        alive_at_start.append(sum(m() is not None for m in models))
        tr = real(*a, **k)
        models.append(weakref.ref(tr.model))
        return tr

    monkeypatch.setattr(R, "make_budget_trainer", tracked)
    pattern = write_corpus(tmp_path)
    gc.disable()
    try:
        assert main([*_argv(tmp_path, pattern), "--budget_s", "1", "--curve_points", "1"]) == 0
        left = sum(m() is not None for m in models)
    finally:
        gc.enable()
    assert len(models) == 2 and alive_at_start == [0, 0] and left == 0, (alive_at_start, left)
