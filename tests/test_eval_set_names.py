"""--eval_data sets are named by their file name in final.json: a name that is already a key there (val, val@N,
test under --final_test, the row's own entries) or another set's name is refused before any arm trains; it
replaced the val score or lost one of two results."""
import shutil

import pytest

from ionllama.experiment import Runner, build_parser, main
from test_baselines import write_corpus


def _argv(tmp_path, pattern, *extra):
    return ["--arms", "dense", "--budget_s", "2", "--data_path", pattern, "--data_dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "res"), "--ckpt_dir", str(tmp_path / "ck"), "--seq_len", "64", "--batch_size", "4",
            "--device", "cpu", "--no-compile", "--also_eval_seq_len", "32", *extra]


def _file(tmp_path, rel):
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text('{"text": "some held-out text"}\n')
    return str(p)


def test_colliding_eval_set_names_are_refused_before_any_arm_trains(tmp_path, capsys):
    pattern = write_corpus(tmp_path, n_train=6, n_val=2, doc_bytes=600)
    shutil.copy(pattern.format(split="val"), pattern.format(split="test"))
    wiki_a, wiki_b = _file(tmp_path, "a/wikipedia-val.jsonl.xz"), _file(tmp_path, "b/wikipedia-val.jsonl")
    val, test = _file(tmp_path, "x/val.jsonl"), _file(tmp_path, "x/test.jsonl")
    alt, data = _file(tmp_path, "x/val@32.txt"), _file(tmp_path, "x/data.jsonl")
    tasks = _file(tmp_path, "x/tasks.jsonl")  # the report puts tasks.json there: a KeyError on every report after
    for extra, words in (
            (["--eval_data", val], f"--eval_data {val} would be named 'val'"),
            (["--eval_data", alt], f"--eval_data {alt} would be named 'val@32'"),
            (["--eval_data", data], f"--eval_data {data} would be named 'data'"),  # the row's data entry
            (["--eval_data", tasks], f"--eval_data {tasks} would be named 'tasks'"),
            (["--eval_data", wiki_a, "--eval_data", wiki_b],
             f"--eval_data {wiki_b} and --eval_data {wiki_a} are both named 'wikipedia-val'"),
            (["--eval_data", wiki_a, "--eval_data", wiki_a], "are both named 'wikipedia-val'"),
            (["--final_test", "--eval_data", test],
             f"--eval_data {test} and --final_test's split {pattern.format(split='test')} are both named 'test'")):
        with pytest.raises(SystemExit) as e:
            main(_argv(tmp_path, pattern, *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0] and "rename" in err[0], err
        assert not (tmp_path / "ck").exists() and not (tmp_path / "res").exists()  # no arm started


def test_the_name_rule_is_unchanged_for_names_that_do_not_collide(tmp_path):
    wiki, test = _file(tmp_path, "a/wikipedia-val.jsonl.xz"), _file(tmp_path, "x/test.jsonl")
    r = Runner(build_parser().parse_args(["--out", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "c"),
                                          "--eval_data", wiki, "--eval_data", test]), [])
    # test is free without --final_test
    assert r.eval_sets() == [("wikipedia-val", wiki), ("test", test)]
