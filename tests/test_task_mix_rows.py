"""--task_mix counts whole rows of each rank's batch: a share that rounds to no row is refused (it trained on text
alone and was labelled as trained on tasks), the token sampler checks the range too, and a rounded share is said."""
import numpy as np
import pytest

from ionllama.data.bpe import TokenTraining, TokenWindowSampler
from ionllama.data.loader import WindowSampler
from ionllama.errors import UserError
from ionllama.eval.loading import LoadedCheckpoint
from ionllama.train.cli import main
from test_train import TINY, write_corpus

DATA = np.frombuffer(b"abcdefgh" * 500, dtype=np.uint8)
TOKENS = np.arange(2000, dtype=np.uint16) % 256


@pytest.mark.parametrize("mix, batch, fix", [(0.1, 4, "--task_mix 0.25 or more (1 row), or --batch_size 6 or more"),
                                             (0.05, 8, "--task_mix 0.125 or more (1 row), or --batch_size 11 or more"),
                                             (0.125, 4, "--batch_size 5 or more")])  # round(0.5) is 0
def test_a_share_that_rounds_to_no_row_is_refused(mix, batch, fix):
    for make in (lambda: WindowSampler(DATA, 96, batch_size=batch, task_mix=mix),
                 lambda: TokenWindowSampler(TOKENS, None, 64, batch_size=batch, task_mix=mix)):
        with pytest.raises(UserError, match="rounds to 0 task rows") as e:
            make()
        assert fix in str(e.value) and "\n" not in str(e.value)
        # the suggested batch gives a row
        b = int(str(e.value).rsplit("--batch_size ", 1)[1].split()[0])
        assert WindowSampler(DATA, 96, batch_size=b, task_mix=mix).n_task_rows == 1


def test_a_vanishing_share_is_refused_at_once():
    """--task_mix 1e-30 (a typo for 1e-3) hung the trainer at 100 % CPU: the search for a batch size that gives a row
    counted up one at a time past 2**53, where b += 1 changes nothing. (In a child: the old code never returned.)"""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from ionllama.data.loader import checked_task_rows\n"
            "for mix in (1e-30, 1e-300, 5e-324):\n"
            "    try:\n        checked_task_rows(mix, 2)\n    except ValueError as e:\n        print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 3 and all("rounds to 0 task rows" in ln and "--batch_size" not in ln.split(";")[1]
                                   for ln in lines), p.stdout + p.stderr


@pytest.mark.parametrize("mix", [-0.1, 1.5, float("nan")])
def test_the_token_sampler_checks_the_range_as_the_byte_sampler_does(mix):
    for make in (lambda: WindowSampler(DATA, 96, batch_size=8, task_mix=mix),
                 lambda: TokenWindowSampler(TOKENS, None, 64, batch_size=8, task_mix=mix)):
        with pytest.raises(UserError, match="must be between 0 and 1"):
            make()


def test_token_training_refuses_before_training_a_tokenizer(tmp_path):
    # no byte shards here: the refusal comes before prepare_tokens would look for them
    with pytest.raises(UserError, match="rounds to 0 task rows"):
        TokenTraining(tmp_path / "no_shards", 300, 32, 4, task_mix=0.1, log=lambda m: None)
    with pytest.raises(UserError, match="must be between 0 and 1"):
        TokenTraining(tmp_path / "no_shards", 300, 32, 4, task_mix=2.0, log=lambda m: None)


def test_rows_and_the_note_on_a_rounded_share():
    s = WindowSampler(DATA, 96, batch_size=8, task_mix=0.3)
    assert s.n_task_rows == 2 and "effective share of 0.25" in s.task_note
    _, y = s.get(0)
    assert (y[:6] != -100).all() and (y[6:] == -100).any()  # two task rows, answers only
    assert TokenWindowSampler(TOKENS, None, 64, batch_size=8, task_mix=0.3).task_note == s.task_note
    for mix in (0.0, 0.25, 1.0):  # exact shares: nothing to say
        assert WindowSampler(DATA, 96, batch_size=8, task_mix=mix).task_note is None


def _train(tmp_path, *extra):
    corpus = write_corpus(tmp_path / "docs.jsonl", n_docs=16)
    return main(TINY + ["--data_path", str(corpus), "--data_dir", str(tmp_path / "cache"), "--save_dir",
                        str(tmp_path / "runs"), "--run_name", "r", "--seq_len", "96", "--sample_bytes", "0",
                        "--device", "cpu", "--val_fraction", "0.1", "--eval_interval", "100", *extra])


def test_trainer_refuses_before_training_and_says_the_effective_share(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--task_mix", "0.1", "--batch_size", "4", "--max_steps", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--task_mix 0.1 of a --batch_size 4 batch" in err[0], err
    assert not list((tmp_path / "runs").glob("**/*.pt"))  # no step trained
    assert _train(tmp_path, "--task_mix", "0.3", "--batch_size", "8", "--max_steps", "1") == 0
    out = capsys.readouterr().out
    assert "--task_mix 0.3 is 2 task row(s) of each 8-row batch (per rank): an effective share of 0.25" in out


@pytest.mark.parametrize("args, tasks", [
    ({"task_mix": 0.1, "batch_size": 4}, False),  # rounded to no row: trained on text alone
    ({"task_mix": 0.05, "batch_size": 8}, False),
    ({"task_mix": 0.25, "batch_size": 4}, True),
    ({"task_mix": 0.1}, True),  # batch not recorded: the share alone says
    ({"task_mix": 0.0, "batch_size": 8}, False),
    ({"dataset": "tasks"}, True),
    ({"dataset": "tasks", "data_path": "docs.jsonl"}, False),  # --data_path: trained on that file
])
def test_trained_on_tasks_only_when_task_rows_were_mixed_in(args, tasks):
    assert LoadedCheckpoint(None, None, None, train_args=args).trained_on_tasks is tasks
