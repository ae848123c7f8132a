"""Task generator: answers are right, batches are shaped and masked right, splits never leak."""
import json
import re

import numpy as np
import pytest
import torch

from ionllama.data import tasks as T
from ionllama.data.task_words import WORDS
from ionllama.errors import UserError

Q_WORD = re.compile(rb"'([a-z]+)'(?:\?|\.| with)")
Q_PAIR = re.compile(rb"What is (\d+) ([+*]) (\d+)\?")


def _solve(prompt: bytes) -> bytes:
    """Independent reference answer parsed from the prompt text."""
    q = prompt.decode()
    if m := re.match(r"Q: How many times does '(.)' appear in '([a-z]+)'\?\nA: $", q):
        return str(m.group(2).count(m.group(1))).encode()
    if m := re.match(r"Q: Spell '([a-z]+)' with hyphens\.\nA: $", q):
        return "-".join(m.group(1)).encode()
    if m := re.match(r"Q: Reverse '([a-z]+)'\.\nA: $", q):
        return m.group(1)[::-1].encode()
    if m := re.match(r"Q: What is (\d+) ([+*]) (\d+)\?\nA: $", q):
        a, b = int(m.group(1)), int(m.group(3))
        return str(a + b if m.group(2) == "+" else a * b).encode()
    raise AssertionError(f"prompt not in the fixed format: {prompt!r}")


def test_word_splits_partition_the_list_disjointly():
    parts = {s: set(T.split_words(s)) for s in T.SPLITS}
    assert set().union(*parts.values()) == set(WORDS)
    assert sum(len(p) for p in parts.values()) == len(set(WORDS))
    assert not parts["train"] & parts["test"] and not parts["train"] & parts["val"] and not parts["val"] & parts["test"]
    n = len(WORDS)
    assert 0.75 * n < len(parts["train"]) < 0.85 * n and 0.07 * n < len(parts["test"]) < 0.13 * n


def test_pair_split_is_commutative():
    for a, b in [(3, 5), (12, 907), (4411, 18)]:
        assert T.split_of(T.pair_key(a, b)) == T.split_of(T.pair_key(b, a))


@pytest.mark.parametrize("task", T.TASKS)
def test_examples_have_correct_answers_and_are_deterministic(task):
    ex = T.make_examples(task, "test", 40, seed=3)
    assert len(ex) == 40 and len({p for p, _ in ex}) == 40  # distinct prompts
    for prompt, answer in ex:
        assert _solve(prompt) == answer
    assert ex == T.make_examples(task, "test", 40, seed=3)
    assert ex != T.make_examples(task, "test", 40, seed=4)


def test_digit_counts_and_small_pools():
    for d in (1, 2, 3):
        for e in T.make_task_examples("mul", "test", 30, seed=0, digits=d):
            a, b = map(int, Q_PAIR.search(e.prompt).group(1, 3))
            assert e.digits == d and len(str(a)) == d and len(str(b)) == d
    # 1-digit test pairs are a small pool: fewer than asked, all distinct, all test pairs
    one = T.make_task_examples("add", "test", 100, seed=0, digits=1)
    assert 0 < len(one) < 100 and all(T.split_of(e.key) == "test" for e in one)


def test_test_words_and_pairs_never_appear_in_training_batches():
    test_words = set(T.split_words("test"))
    test_pairs = {(e.key) for t in T.ARITH_TASKS for d in (1, 2) for e in T.make_task_examples(t, "test", 500, 0, digits=d)}
    rng = np.random.default_rng(0)
    seen_words, seen_pairs = set(), set()
    for _ in range(20):
        x, _ = T.make_task_batch(rng, 16, 512, split="train", max_digits=2)
        text = bytes(x.flatten().tolist())
        seen_words |= {m.decode() for m in Q_WORD.findall(text)}
        seen_pairs |= {T.pair_key(int(a), int(b)) for a, _, b in Q_PAIR.findall(text)}
    assert len(seen_words) > 1000 and len(seen_pairs) > 500  # the check below is not vacuous
    assert not seen_words & test_words
    assert not seen_pairs & test_pairs


def test_make_task_batch_shapes_and_loss_mask():
    rng = np.random.default_rng(1)
    x, y = T.make_task_batch(rng, 4, 256, split="val")
    assert x.shape == y.shape == (4, 256) and x.dtype == y.dtype == torch.long
    for r in range(4):
        row = bytes(x[r].tolist())
        assert row[0] == T.DOC_SEP
        scored = y[r] != T.IGNORE_INDEX
        # targets are the next input byte wherever they are scored
        assert torch.equal(y[r, :-1][scored[:-1]], x[r, 1:][scored[:-1]])
        # scored bytes are exactly each packed example's answer plus its newline, nothing else
        expected = b""
        for seg in filter(None, row.split(bytes([T.DOC_SEP]))):
            prompt = seg[: seg.index(b"\nA: ") + 4]
            assert seg == prompt + _solve(prompt) + b"\n"
            expected += _solve(prompt) + b"\n"
        got = bytes(y[r][scored].tolist())
        assert got == expected and len(expected) > 10
        assert not any(b == T.DOC_SEP for b in got)  # separators and padding are never scored


def test_make_task_batch_user_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="--seq_len 16 is too short for the longest task example .67 bytes"):
        T.make_task_batch(rng, 2, 16)
    T.make_task_batch(rng, 64, 66)  # the longest fits: no row ever fails at 66
    with pytest.raises(UserError, match="--seq_len 33 is too short .* use --seq_len 34 or more"):
        T.make_task_batch(rng, 2, 33, tasks=("add",))  # 'Q: What is 9999 + 9999?\nA: 19998\n'
    with pytest.raises(UserError):
        T.make_task_batch(rng, 2, 256, split="dev")
    with pytest.raises(UserError):
        T.make_task_batch(rng, 2, 256, tasks=("division",))


def test_answer_extraction_stops_on_newline_and_separator():
    assert T.extract_answer(b"42\nQ: more") == b"42"
    assert T.extract_answer(b"c-a-t\x00junk") == b"c-a-t"
    assert T.is_correct(b"408\n", b"408") and not T.is_correct(b"4080\n", b"408")


def _probe_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "probe_tasks.py"
    spec = importlib.util.spec_from_file_location("probe_tasks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_tasks_bpe_arm_tokenizes_its_own_training_examples(tmp_path, monkeypatch):
    """The probe's BPE arm: a tokenizer trained on the seed's training examples (so held-out numbers come out in
    learned multi-digit pieces), the model sized to the tokenizer's vocabulary, and its loss recorded per answer
    byte like the byte arms' (its own loss is per token)."""
    pytest.importorskip("tokenizers")
    probe = _probe_module()
    monkeypatch.setattr(probe, "git_commit", lambda: {"sha": "sha0", "dirty": False})
    args = ["--out", str(tmp_path), "--steps", "30", "--batch", "8", "--n_test", "2", "--max_digits", "3",
            "--arms", "bpe:d_model=32,n_layers=1,n_heads=2,vocab_size=300", "--device", "cpu"]
    assert probe.main(args) == 0
    arm = json.loads((tmp_path / "probe.json").read_text())["arms"]["bpe:d_model=32,n_layers=1,n_heads=2,vocab_size=300"]
    tok = arm["tokenizer"]
    assert 256 < tok["vocab_size"] <= 300 and 0.3 < tok["tokens_per_byte"] < 1.0
    pieces = [p.strip() for ex in tok["examples"] for p in ex.split(" | ")]
    assert any(len(p) >= 2 and p.isdigit() for p in pieces)  # merged digits: what a BPE model has to add with
    emb = 32 * tok["vocab_size"]
    assert arm["params"] >= emb and set(arm["results"]["per_task"]) == {"add"}
    assert 0 < arm["losses"][-1]["loss"] < arm["losses"][0]["loss"] < 10  # nats per answer byte, learning


def test_probe_tasks_same_examples_for_every_arm_and_resumes(tmp_path, capsys, monkeypatch):
    """benchmarks/probe_tasks.py: every arm trains on the same examples (a function of seed and step only), only
    the chosen tasks are drawn, results land per arm and digit count with the commit the process started from
    (not one taken later, when the tree may have moved on), a rerun keeps finished arms, and a bad arm or task is a
    one-line exit 2."""
    probe = _probe_module()
    commits = iter(f"sha{i}" for i in range(100))
    monkeypatch.setattr(probe, "git_commit", lambda: {"sha": next(commits), "dirty": False})
    a, b = probe.step_examples(0, 5, 16, ("add",), 2), probe.step_examples(0, 5, 16, ("add",), 2)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert {e.task for e in a} == {"add"} and max(e.digits for e in a) <= 2
    assert [e.prompt for e in probe.step_examples(0, 6, 16, ("add",), 2)] != [e.prompt for e in a]
    args = ["--out", str(tmp_path), "--steps", "2", "--batch", "4", "--n_test", "3", "--max_digits", "2",
            "--tasks", "add,reverse", "--arms", "dense:d_model=32,n_layers=1,n_heads=2",
            "ion_fixed3:d_model=32,n_layers=1,n_heads=2,d_local=32", "--device", "cpu"]
    assert probe.main(args) == 0
    res = json.loads((tmp_path / "probe.json").read_text())
    assert list(res["arms"]) == ["dense:d_model=32,n_layers=1,n_heads=2",
                                 "ion_fixed3:d_model=32,n_layers=1,n_heads=2,d_local=32"]
    for r in res["arms"].values():
        per = r["results"]["per_task"]
        assert set(per) == {"add", "reverse"} and set(per["add"]["by_digits"]) == {"1", "2"}
        assert per["reverse"]["n"] == 3 and r["losses"][-1]["step"] == 1
    assert res["arms"]["ion_fixed3:d_model=32,n_layers=1,n_heads=2,d_local=32"]["config"]["d_local"] == 32
    assert [r["run"]["commit"]["sha"] for r in res["arms"].values()] == ["sha0", "sha0"]
    assert res["meta"]["commit"]["sha"] == "sha0" and "Trained by:" in (tmp_path / "probe.md").read_text()
    md = (tmp_path / "probe.md").read_text()
    assert md.count("\n| ") == 3 and "add 2d" in md
    capsys.readouterr()
    assert probe.main(args) == 0
    assert capsys.readouterr().out.count("kept from") == 2
    # the same folder under other settings or another seed is refused before anything trains or is rewritten
    before = (tmp_path / "probe.json").read_text()
    for other_setting in (["--max_digits", "3"], ["--seed", "1"]):
        with pytest.raises(SystemExit) as e:
            probe.main([*args, *other_setting])
        assert e.value.code == 2 and "give a new --out" in capsys.readouterr().err
    assert (tmp_path / "probe.json").read_text() == before
    # --combine: another seed's folder (here the same run relabelled seed 7, one accuracy changed) side by side
    other = tmp_path / "seed7"
    other.mkdir()
    res["meta"]["settings"]["seed"] = 7
    cell = res["arms"]["dense:d_model=32,n_layers=1,n_heads=2"]["results"]["per_task"]["add"]["by_digits"]["2"]
    first = cell["accuracy"]
    cell["accuracy"] = 1.0
    last = res["arms"]["dense:d_model=32,n_layers=1,n_heads=2"]["losses"][-1]
    first_loss, last["loss"] = last["loss"], 0.5
    (other / "probe.json").write_text(json.dumps(res))
    assert probe.main(["--out", str(tmp_path / "both"), "--combine", str(tmp_path), str(other)]) == 0
    both = json.loads((tmp_path / "both" / "combined.json").read_text())
    row = both["arms"]["dense:d_model=32,n_layers=1,n_heads=2"]
    i = both["columns"].index(["add", 2])
    assert set(row["seeds"]) == {"0", "7"} and row["mean"][i] == pytest.approx((first + 1.0) / 2)
    assert row["last_loss_mean"] == pytest.approx((first_loss + 0.5) / 2)
    assert "| seeds |" in capsys.readouterr().out
    assert (tmp_path / "both" / "combined.md").read_text().startswith("`python ") and "--combine" in \
        (tmp_path / "both" / "combined.md").read_text().splitlines()[0]
    # a folder of seed 0 holding another arm merges into seed 0; the same arm twice for a seed, or a folder
    # trained with other settings, is refused
    extra, longer = tmp_path / "extra", tmp_path / "longer"
    res["meta"]["settings"]["seed"] = 0
    res["arms"] = {"dense:d_model=48": res["arms"]["dense:d_model=32,n_layers=1,n_heads=2"]}
    extra.mkdir()
    (extra / "probe.json").write_text(json.dumps(res))
    assert probe.main(["--out", str(tmp_path / "three"), "--combine", str(tmp_path), str(other), str(extra)]) == 0
    three = json.loads((tmp_path / "three" / "combined.json").read_text())
    assert set(three["arms"]["dense:d_model=48"]["seeds"]) == {"0"} and three["seeds"] == [0, 7]
    res["meta"]["settings"]["steps"] = 3
    longer.mkdir()
    (longer / "probe.json").write_text(json.dumps(res))
    for bad in (["--arms", "bogus"], ["--tasks", "division"], ["--combine", str(tmp_path), str(tmp_path)],
                ["--combine", str(other), str(longer)]):
        with pytest.raises(SystemExit) as e:
            probe.main(["--out", str(tmp_path / "x"), "--steps", "1", *bad])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().count("\n") == 0


class _AnswerThen:
    """A stand-in for a model whose greedy continuation is the right answer and then `tail` (None: nothing, the
    generation stops with a newline), produced by model.generate's contract: the stop byte is not in the result,
    and a row that fills max_new_bytes ends with reason 'length'."""

    training = False

    def __init__(self, tail: bytes | None):
        self.tail = tail

    def eval(self):
        return self.train(False)

    def train(self, mode=True):
        self.training = mode
        return self

    def generate(self, prompts, max_new_bytes, greedy, stop, return_info=False):
        outs, reasons = [], []
        for p in prompts:
            task = next(t for t in ("count", "spell", "reverse", "add", "mul") if self._match(t, p))
            ans = self._answer(task, p)
            full = ans + (self.tail if self.tail is not None else b"\n")
            cut = full.find(b"\n")
            if cut != -1 and cut < max_new_bytes:
                outs.append(full[:cut]), reasons.append("stop")
            else:
                outs.append(full[:max_new_bytes]), reasons.append("length")
        return (outs, {"stop_reasons": reasons}) if return_info else outs

    @staticmethod
    def _match(task, prompt):
        return any(e.prompt in prompt for e in _EXAMPLES[task])

    @staticmethod
    def _answer(task, prompt):
        return next(e.answer for e in _EXAMPLES[task] if e.prompt in prompt)


_EXAMPLES = {t: [e for d in (1, 2) for e in T.make_task_examples(t, "test", 12, 1234, digits=d)]
             if t in ("add", "mul") else T.make_task_examples(t, "test", 12, 1234) for t in T.TASKS}


def test_task_scores_do_not_depend_on_the_generation_batch():
    """The generation budget was one byte past the longest answer of each batch: "7 and more" was cut to "7 " and
    counted right in a batch of one, "7 a" and wrong in a batch with a longer answer, so accuracy moved with
    bench's --gen_batch (1.0 against 0.58 on addition). Each output is now judged as if generated with its own
    budget: the answer then a stop byte."""
    from ionllama.eval.task_eval import run_tasks

    for tail, expect in ((None, 1.0), (b" and more\n", 0.0), (b"9\n", 0.0)):
        res = {bs: run_tasks(_AnswerThen(tail), "cpu", n=12, max_digits=2, batch_size=bs, keep_outputs=True)
               for bs in (1, 5, 32)}
        for task in T.TASKS:
            accs = {bs: res[bs]["per_task"][task]["accuracy"] for bs in res}
            assert set(accs.values()) == {expect}, (tail, task, accs)
        # and each stored row ("stopped" too: it was the batch's flag, True for "<answer>9" in a batch whose longer
        # answers left room for the newline)
        assert res[1]["outputs"] == res[5]["outputs"] == res[32]["outputs"], tail


def test_probe_tasks_refuses_no_tasks_and_a_short_row_before_any_arm_trains(tmp_path, capsys, monkeypatch):
    """An empty --tasks ended in a numpy traceback; a --row_len too short for a later step's example was refused
    only at that step, after the arm had trained (hours, on a long probe), without the value to pass. Both are now
    one line before anything trains, with the row length that fits (twice it for a BPE arm, whose rows hold
    row_len // 2 tokens)."""
    probe = _probe_module()
    trained = []
    monkeypatch.setattr(probe, "train_arm", lambda *a, **k: trained.append(1))
    base = ["--steps", "40", "--batch", "2", "--n_test", "1", "--max_digits", "3", "--tasks", "add", "--device", "cpu"]
    longest = max(len(e.prompt) + len(e.answer) + 1 for s in range(40) for e in probe.step_examples(0, s, 2, ("add",), 3))
    cases = [(["--tasks", ","], "--tasks names no task; choose from"),
             (["--row_len", str(longest), "--arms", "dense"],
              f"--row_len {longest} is shorter than the longest task example ({longest} bytes and a separator); "
              f"pass --row_len {longest + 1} or more"),
             (["--row_len", str(longest + 1), "--arms", "bpe"], f"pass --row_len {2 * (longest + 1)} or more")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            probe.main([*base, "--out", str(tmp_path / "p"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not trained and not (tmp_path / "p").exists()


def test_pad_rows_keeps_the_loss_and_its_gradients():
    """The compiled task stage pads every batch to one row count (one shape for torch.compile) with copies of the
    first row that have no targets: the loss and its gradients are those of the unpadded batch."""
    from ionllama import create_model
    from ionllama.experiment.tasks import pad_rows, task_batch, task_examples

    torch.manual_seed(0)
    m = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
    x, y = task_batch(m, task_examples(1, 0, 8), 96)
    px, py = pad_rows(x, y, x.shape[0] + 3)
    assert px.shape == (x.shape[0] + 3, x.shape[1]) and (px[x.shape[0]:] == x[0]).all()
    assert (py[x.shape[0]:] == -100).all() and torch.equal(px[:x.shape[0]], x)
    a, b = m(x, y)["loss"], m(px, py)["loss"]
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, m.head.weight)[0]
    gb = torch.autograd.grad(b, m.head.weight)[0]
    torch.testing.assert_close(ga, gb)
    assert pad_rows(x, y, 2)[0] is x  # never cut


def test_compiled_stage_gives_space_patching_one_shape_and_the_same_loss(monkeypatch):
    """Space patching's compiled task stage: one row count and one latent length for every batch (at least each
    batch's largest patch count, a multiple of PATCH_PAD), so the forward never reads the count on the host; the
    loss of every batch is the unpadded, uncapped forward's."""
    from ionllama import create_model
    from ionllama.experiment import tasks as T
    from ionllama.model.ionllama_model import PATCH_PAD

    monkeypatch.setattr(T.torch, "compile", lambda model, **kw: model)  # the forward as compiled, without compiling
    torch.manual_seed(0)
    m = create_model("tiny", patching="space", max_patch_size=6).eval()
    raw = [T.task_batch(m, T.task_examples(1, step, 16), 96) for step in range(6)]
    assert len({x.shape[0] for x, _ in raw}) > 1  # the rows do vary: the padding is exercised
    batches, forward, shapes = T.compiled_stage(m, raw)
    assert shapes["padded_rows"] == max(x.shape[0] for x, _ in raw)
    assert {x.shape for x, _ in batches} == {(shapes["padded_rows"], 96)}
    counts = [int(m.patches(x, None)[2].max()) for x, _ in raw]
    assert shapes["latent_len"] % PATCH_PAD == 0 and max(counts) <= shapes["latent_len"] < max(counts) + PATCH_PAD
    seen = []
    real = m.forward
    monkeypatch.setattr(m, "forward", lambda x, y, **kw: seen.append(kw) or real(x, y, **kw))
    with torch.no_grad():
        for (x, y), (px, py) in zip(raw, batches):
            torch.testing.assert_close(forward(px, py)["loss"], real(x, y)["loss"])
    assert seen and all(kw == {"latent_len": shapes["latent_len"]} for kw in seen)
    fixed = create_model("tiny", patching="fixed")
    assert T.compiled_stage(fixed, [T.task_batch(fixed, T.task_examples(1, 0, 4), 96)])[2]["latent_len"] is None


def test_compiled_stage_of_a_dense_arm_with_patching_space_runs(monkeypatch):
    """--override patching=space reached every arm of the experiment, the dense one too (it is left out of a
    baseline's now, but a config saved before carries it): its compiled stage must not pass the ionLlama-only latent
    length (TypeError: unexpected keyword argument 'latent_len')."""
    import dataclasses
    from argparse import Namespace

    from ionllama import create_model
    from ionllama.experiment import tasks as T
    from ionllama.registry import build_model

    monkeypatch.setattr(T.torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr("ionllama.eval.task_eval.run_tasks", lambda *a, **k: {"per_task": {}})
    cfg = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2).config
    m = build_model(dataclasses.replace(cfg, patching="space"))
    a = Namespace(task_steps=2, task_lr=1e-3, seed=1, task_batch=4, task_seq_len=96, task_n=1, task_compile=True)
    res = T.run_task_stage(m, torch.device("cpu"), None, a)
    assert res["fine_tuning"]["latent_len"] is None and len(res["fine_tuning"]["losses"]) == 2


def test_the_task_stage_with_dropout_repeats_for_the_same_seed(monkeypatch):
    """Nothing seeded torch in the task stage: with dropout on, the same checkpoint, flags and --seed gave another
    loss curve each run (3.550 / 3.590 / 3.578 at step 0 in an audit), depending on what ran before it."""
    import copy
    from argparse import Namespace

    from ionllama import create_model
    from ionllama.experiment import tasks as T

    monkeypatch.setattr("ionllama.eval.task_eval.run_tasks", lambda *a, **k: {"per_task": {}})
    torch.manual_seed(0)
    m = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2, dropout=0.3)
    a = Namespace(task_steps=3, task_lr=1e-3, seed=1, task_batch=4, task_seq_len=96, task_n=1)
    curves = []
    for noise in (0, 5):
        torch.rand(noise)  # what ran before moves the global RNG
        curves.append([r["loss"] for r in T.run_task_stage(copy.deepcopy(m), torch.device("cpu"), None, a)
                       ["fine_tuning"]["losses"]])
    assert curves[0] == curves[1]
    a.seed = 2  # and the seed still decides: another seed, other masks
    res = T.run_task_stage(copy.deepcopy(m), torch.device("cpu"), None, a)
    other = [r["loss"] for r in res["fine_tuning"]["losses"]]
    assert other != curves[0]


def test_a_word_byte_tail_keeps_the_loss_and_shortens_space_patching(monkeypatch):
    """Task rows end in TAIL_BYTE after their last separator, not in separators: the loss is the same (no targets
    there, and causal), while space patching, which starts a patch after every separator, gets a latent about half
    as long as the row instead of the whole row."""
    from ionllama import create_model
    from ionllama.data import DOC_SEP
    from ionllama.experiment import tasks as T

    torch.manual_seed(0)
    examples = T.task_examples(1, 0, 16)
    pieces = [(list(e.prompt), list(e.answer + b"\n")) for e in examples]
    for kw in ({"patching": "space", "latent_shift": "completed"}, {"patching": "space"}, {"patching": "fixed"},
               {"model": "dense", "d_model": 32, "n_layers": 1, "n_heads": 2}):
        m = create_model("tiny", **kw).eval()
        x, y = T.task_batch(m, examples, 128)
        sx, sy = T.pack_examples(pieces, DOC_SEP, 128)  # the separator tail
        assert torch.equal(y, sy) and not torch.equal(x, sx) and (x[sx != x] == T.TAIL_BYTE).all()
        with torch.no_grad():
            torch.testing.assert_close(m(x, y)["loss"], m(sx, sy)["loss"])
    m = create_model("tiny", patching="space")
    raw = [T.task_batch(m, T.task_examples(1, step, 32), 256) for step in range(8)]
    sep_tail = [T.pack_examples([(list(e.prompt), list(e.answer + b"\n")) for e in T.task_examples(1, step, 32)],
                                DOC_SEP, 256) for step in range(8)]
    assert T.stage_latent_len(m, sep_tail) == 256 and T.stage_latent_len(m, raw) <= 128


@pytest.mark.parametrize("kw", [{"patching": "fixed", "fixed_patch_size": 3, "latent_shift": "completed"},
                                {"patching": "space"}, {"model": "dense", "d_model": 32, "n_layers": 1, "n_heads": 2}])
def test_task_step_graph_trains_to_the_eager_losses(monkeypatch, kw):
    """train_on_tasks(step_graph=True): the compiled stage's step goes through the trainer's StepGraph (capturable
    AdamW, the lr a device tensor; on a CPU the same step eagerly) and trains to the plain loop's losses, also from
    a model that arrives with gradients (the plain loop added them to its first step)."""
    from ionllama import create_model
    from ionllama.experiment import tasks as T
    from ionllama.train import step_graph as SG

    monkeypatch.setattr(T.torch, "compile", lambda model, **k: model)
    made = []
    real = SG.StepGraph
    monkeypatch.setattr(SG, "StepGraph", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    losses = {}
    for graph in (False, True):
        torch.manual_seed(0)
        m = create_model("tiny", **kw)
        for p in m.parameters():  # a caller's leftover gradients: neither loop may add them to its first step
            p.grad = torch.full_like(p, 3.0)
        raw = [T.task_batch(m, T.task_examples(1, step, 4), 96) for step in range(4)]
        batches, forward, shapes = T.compiled_stage(m, raw)
        assert T.captured_stage_problem(m, shapes, 96, "cuda") is None
        rows, _ = T.train_on_tasks(m, torch.device("cpu"), None, 4, 1e-3, batches.__getitem__, log_every=2,
                                   forward=forward, step_graph=graph)
        losses[graph] = [r["loss"] for r in rows]
    assert len(made) == 1 and made[0].calls == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4) and len(losses[True]) == 3


def test_task_stage_plain_and_step_graph_train_an_unfrozen_entropy_model_alike(monkeypatch):
    """train_on_tasks called directly on an entropy-patched model whose entropy model still learns: both ways add its
    aux_loss, as StepGraph and the trainer do (an audit: the plain loop dropped it, so the two ways trained different
    parameters and the losses parted after one step; run_task_stage freezes the entropy model, so the stage itself
    never had an aux_loss)."""
    from ionllama import create_model
    from ionllama.experiment import tasks as T

    monkeypatch.setattr(T.torch, "compile", lambda model, **k: model)
    params = {}
    for graph in (False, True):
        torch.manual_seed(0)
        m = create_model("tiny", patching="entropy")
        init = {n: p.detach().clone() for n, p in m.named_parameters() if n.startswith("entropy_model.")}
        raw = [T.task_batch(m, T.task_examples(1, step, 2), 96) for step in range(2)]
        batches, forward, _ = T.compiled_stage(m, raw)
        T.train_on_tasks(m, torch.device("cpu"), None, 2, 1e-3, batches.__getitem__, forward=forward, step_graph=graph)
        params[graph] = {n: p.detach().clone() for n, p in m.named_parameters() if n.startswith("entropy_model.")}
    assert params[False]
    # it learned (two ways that both left it untouched would pass the check below too); same seed: one init
    assert any(not torch.equal(params[False][n], p) for n, p in init.items())
    for n, p in params[True].items():
        torch.testing.assert_close(params[False][n], p, rtol=1e-5, atol=1e-6, msg=n)


def test_task_step_graph_on_a_cpu_runs_without_the_graph_and_says_so(monkeypatch):
    """The experiment's --task_step_graph on a CPU device: nothing to capture, so the stage runs the plain loop and
    tasks.json records step_graph false (an audit: it was recorded true for a step run eagerly)."""
    from argparse import Namespace

    from ionllama import create_model
    from ionllama.experiment import tasks as T

    monkeypatch.setattr(T.torch, "compile", lambda model, **k: model)
    monkeypatch.setattr("ionllama.eval.task_eval.run_tasks", lambda *a, **k: {"per_task": {}})
    lines = []
    a = Namespace(task_steps=2, task_lr=1e-3, seed=1, task_batch=4, task_seq_len=96, task_n=1, task_compile=True,
                  task_step_graph=True)
    res = T.run_task_stage(create_model("tiny", patching="fixed"), torch.device("cpu"), None, a, log=lines.append)
    assert res["fine_tuning"]["step_graph"] is False
    assert any("--task_step_graph: it captures CUDA graphs, and this stage runs on cpu" in ln for ln in lines)


def test_task_step_graph_leaves_entropy_patching_uncaptured_and_says_why(monkeypatch, capsys):
    """Entropy patching reads its patch count on the host each step: that arm's stage runs without the graph, and
    the log says why (the run goes on); --task_step_graph without --task_compile is refused in one line."""
    from argparse import Namespace

    from ionllama import create_model
    from ionllama.experiment import tasks as T
    from ionllama.experiment.cli import main

    monkeypatch.setattr(T.torch, "compile", lambda model, **k: model)
    monkeypatch.setattr("ionllama.eval.task_eval.run_tasks", lambda *a, **k: {"per_task": {}})
    m = create_model("tiny", patching="entropy")
    assert T.captured_stage_problem(m, {"latent_len": None}, 96, "cuda") == \
        "entropy patching reads its patch count on the host each step"
    space = create_model("tiny", patching="space")
    assert T.captured_stage_problem(space, {"latent_len": 64}, 96, "cuda") is None
    assert T.captured_stage_problem(space, {"latent_len": 64}, 96, "cpu") == \
        "it captures CUDA graphs, and this stage runs on cpu"
    lines = []
    a = Namespace(task_steps=2, task_lr=1e-3, seed=1, task_batch=4, task_seq_len=96, task_n=1, task_compile=True,
                  task_step_graph=True)
    res = T.run_task_stage(m, torch.device("cpu"), None, a, log=lines.append)
    assert res["fine_tuning"]["step_graph"] is False
    assert any("--task_step_graph: entropy patching reads its patch count" in ln for ln in lines)
    with pytest.raises(SystemExit) as e:
        main(["--stage", "tasks", "--task_step_graph"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.endswith("--task_step_graph needs --task_compile (every step one shape); add "
                                               "--task_compile") and len(err.splitlines()) == 1


class _NoCarry(_AnswerThen):
    """Right on every task but addition, where it adds each place mod 10 and drops every carry (58 + 67 -> 15)."""

    def __init__(self):
        super().__init__(None)

    @staticmethod
    def _match(task, prompt):
        q = {"count": b"How many", "spell": b"Spell", "reverse": b"Reverse", "add": b" + ", "mul": b" * "}[task]
        return q in prompt

    @staticmethod
    def _answer(task, prompt):
        m = Q_PAIR.search(prompt)
        if task != "add" or not m:
            return _solve(prompt[prompt.index(b"Q: "):])
        a, b = m.group(1).decode()[::-1], m.group(3).decode()[::-1]
        digits = [(int(a[i]) if i < len(a) else 0) + (int(b[i]) if i < len(b) else 0) for i in range(max(len(a),
                                                                                                          len(b)))]
        return str(int("".join(str(d % 10) for d in reversed(digits)))).encode()


def test_task_outputs_file_holds_every_example_and_the_error_analysis_finds_the_lost_carries(tmp_path):
    """run_tasks(keep_outputs=True) keeps every scored example (tasks.json keeps 1-3 a cell, too few to see how
    answers go wrong); scripts/task_errors.py reads the file: a model that drops every carry must show each wrong
    same-length sum as a carry lost at its first wrong place, and no carry errors on multiplication."""
    import importlib.util

    from ionllama.eval.task_eval import read_outputs, run_tasks, write_outputs

    res = run_tasks(_NoCarry(), "cpu", n=40, max_digits=3, batch_size=7, keep_outputs=True)
    rows = res.pop("outputs")
    per = res["per_task"]
    assert len(rows) == sum(r["n"] for r in per.values())
    for task, rec in per.items():
        assert sum(r["correct"] for r in rows if r["task"] == task) == rec["correct"]
    assert per["mul"]["accuracy"] == 1.0 and per["add"]["accuracy"] < 1.0
    r0 = rows[0]
    assert r0["answer_at"] == len(T.DOC_SEP_BYTES) + len(r0["prompt"].encode())
    f = write_outputs(tmp_path / "task_outputs.jsonl.gz", rows)
    assert read_outputs(f) == rows and f.read_bytes() == write_outputs(tmp_path / "again.gz", rows).read_bytes()

    spec = importlib.util.spec_from_file_location("task_errors", "scripts/task_errors.py")
    te = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(te)
    assert te.carries_in(58, 67) == [0, 1, 1] and te.carries_in(0, 0) == [0] and te.carries_in(5, 5) == [0, 1]
    assert te.first_wrong("115", "125") == 1 and te.first_wrong("12", "125") == 2 and te.first_wrong("1", "1") is None
    cells = te.analyse(rows, patch=3)
    for d in (1, 2, 3):
        c = cells[("add", d)]
        ex = [r for r in rows if r["task"] == "add" and r["digits"] == d]
        wrong = [r for r in ex if not r["correct"]]
        assert c["n"] == len(ex) and c["correct"] == len(ex) - len(wrong)
        same = [r for r in wrong if len(r["output"]) == len(r["answer"])]
        assert c["same_len"] == len(same) and c["length"] == len(wrong) - len(same)
        # a dropped carry makes the first wrong digit one less, with a carry into its place
        assert c["carry_lost"] == c["carry_in"] == sum(c["place"].values()) and c["carry_extra"] == 0
        assert sum(c["patch_pos_err"].values()) == len(wrong)
        assert sum(c["patch_pos_all"].values()) == sum(len(r["answer"]) for r in ex)
    assert all(cells[("mul", d)]["correct"] == cells[("mul", d)]["n"] for d in (1, 2, 3))
    (tmp_path / "config.json").write_text(json.dumps({"model_config": {"model": "ionllama", "patching": "fixed",
                                                                       "fixed_patch_size": 3}}))
    assert te.patch_size_of(tmp_path) == 3
    te.main([str(tmp_path), "--out", str(tmp_path / "e.md")])
    # the page says what wrote it and where the answers came from (here: no tasks.json beside them)
    head = (tmp_path / "e.md").read_text().splitlines()
    assert head[0].startswith("Generated by `python scripts/task_errors.py ") and "(tree " in head[0]
    assert "no readable tasks.json" in head[1]
    md = (tmp_path / "e.md").read_text()
    assert "fixed 3-byte patches" in md and "| add | 2 | 40 |" in md and "place 2: errors / all" in md
    with pytest.raises(SystemExit) as e:  # its own input as --out: the Markdown went over it, exit 0 (an audit)
        te.main([str(tmp_path), "--out", str(tmp_path / "task_outputs.jsonl.gz")])
    assert e.value.code == 2 and read_outputs(f) == rows


def test_scoring_gives_the_model_back_in_the_mode_it_had():
    """run_tasks and patch_statistics left a training model in eval mode (evaluate_bpb and generate gave it back):
    a caller that trained on after them lost its dropout without a word (an audit)."""
    from ionllama import create_model
    from ionllama.eval.lm import patch_statistics
    from ionllama.eval.task_eval import run_tasks

    model = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2, dropout=0.1)
    for mode in (True, False):
        model.train(mode)
        run_tasks(model, "cpu", n=1, max_digits=1, tasks=("count", "add"))
        assert model.training is mode
        patch_statistics(model, np.frombuffer(b"some text " * 20, dtype=np.uint8), 64, 2, "cpu")
        assert model.training is mode


def test_task_stage_scales_fp16_losses_as_the_trainer_does(monkeypatch):
    """--mixed_precision fp16: the trainer scales the loss (GradScaler), the task stage did not, so a model that
    fits its answers well (as a pretrained one does) lost its small gradients to fp16 underflow: here 1.3 % of the
    gradient entries came out zero and the gradient 7 % off against fp32 (at a loss of 0.0016, 7 % and 35 %). The
    captured step has no loss scaling, so --task_step_graph leaves an fp16 stage uncaptured, as the trainer's
    step_graph_problem does."""
    from ionllama import create_model
    from ionllama.experiment import tasks as T

    torch.manual_seed(0)
    m = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2)
    x, y = T.task_batch(m, T.task_examples(1, 0, 8), 96)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(100):  # fit this batch: small probabilities off the targets, so small gradients
        m(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()
    m(x, y)["loss"].backward()
    exact = torch.cat([p.grad.flatten() for p in m.parameters()])
    m.zero_grad(set_to_none=True)
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda ps, c, **k: seen.append(torch.cat([p.grad.flatten() for p in ps])) or real(ps, c, **k))
    T.train_on_tasks(m, torch.device("cpu"), torch.float16, 1, 1e-3, lambda step: (x, y))
    lost = ((seen[0] == 0) & (exact != 0)).float().mean().item()
    rel = ((seen[0] - exact).norm() / exact.norm()).item()
    assert lost < 1e-3 and rel < 0.03, (lost, rel)
    shapes = {"latent_len": None}
    assert T.captured_stage_problem(m, shapes, 96, "cuda", torch.float16) == "it has no fp16 loss scaling"
    assert T.captured_stage_problem(m, shapes, 96, "cuda", torch.bfloat16) is None
    with pytest.raises(UserError, match="fp16"):
        T.train_on_tasks(m, torch.device("cpu"), torch.float16, 1, 1e-3, lambda step: (x, y), step_graph=True)
