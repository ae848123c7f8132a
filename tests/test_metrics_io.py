"""Committed results keep their metrics gzipped (scripts/pack_results.sh); every reader takes either form."""
import gzip
import json
import subprocess

import pytest

from ionllama.errors import UserError
from ionllama.eval.plots import read_metrics as plot_read
from ionllama.train.metrics import metrics_file, read_metrics


def test_gzipped_metrics_read_like_the_plain_file(tmp_path):
    recs = [{"step": i, "loss": 1.0 / (i + 1), "val_bpb": 2.0 - i / 10} for i in range(5)]
    run = tmp_path / "run"
    run.mkdir()
    plain = run / "metrics.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"step": 5, "lo')  # a line cut mid-write
    assert read_metrics(run) == read_metrics(plain) == plot_read(run) == recs
    subprocess.run(["bash", "scripts/pack_results.sh", str(tmp_path)], check=True)  # under 32 KB: left alone
    assert plain.is_file()
    with gzip.open(run / "metrics.jsonl.gz", "wt") as f:
        f.write(plain.read_text())
    plain.unlink()
    assert metrics_file(run) == run / "metrics.jsonl.gz"
    assert read_metrics(run) == read_metrics(plain) == plot_read(plain) == recs
    (run / "metrics.jsonl.gz").unlink()
    assert metrics_file(run) is None
    with pytest.raises(FileNotFoundError):
        read_metrics(run)
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_read(run)


def test_pack_results_gzips_large_metrics_and_logs(tmp_path):
    big = tmp_path / "arm" / "metrics.jsonl"
    big.parent.mkdir()
    recs = [{"step": i, "loss": 0.5} for i in range(3000)]
    big.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    log = tmp_path / "log_gpu0.txt"
    log.write_text("step 1 loss 2.0\n" * 4000)
    subprocess.run(["bash", "scripts/pack_results.sh", str(tmp_path)], check=True)
    assert not big.exists() and not log.exists()
    assert read_metrics(tmp_path / "arm") == recs
    assert gzip.open(str(log) + ".gz", "rt").read() == "step 1 loss 2.0\n" * 4000


def test_train_val_gap_reads_the_tail_of_training_rows(tmp_path):
    """scripts/train_val_gap.py: mean training BPB over the last share of rows, final and best val BPB; a folder
    without metrics is a one-line error (exit 2) before any table is printed."""
    import sys
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": i, "bpb": 2.0 - i / 100} for i in range(100)]
    recs += [{"step": 50, "val_bpb": 1.9}, {"step": 99, "val_bpb": 1.95}]
    with gzip.open(run / "metrics.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    r = subprocess.run([sys.executable, "scripts/train_val_gap.py", str(run), "--tail", "0.1"],
                       capture_output=True, text=True, check=True)
    row = r.stdout.strip().splitlines()[-1].split("|")
    train = sum(2.0 - i / 100 for i in range(90, 100)) / 10  # rows 90..99
    assert [float(c) for c in row[2:7]] == pytest.approx([train, 10, 1.95, 1.9, 1.95 - train], abs=1e-4)
    # --steps A:B: the rows of those steps (ends included), whatever the run's length
    r = subprocess.run([sys.executable, "scripts/train_val_gap.py", str(run), "--steps", "20:29"],
                       capture_output=True, text=True, check=True)
    row = r.stdout.strip().splitlines()[-1].split("|")
    assert "steps 20-29" in r.stdout
    assert [float(c) for c in row[2:4]] == pytest.approx([sum(2.0 - i / 100 for i in range(20, 30)) / 10, 10])
    for steps, msg in (("200:300", "no training row in steps 200:300"), ("30:20", "A <= B"), ("x", "A <= B")):
        bad = subprocess.run([sys.executable, "scripts/train_val_gap.py", str(run), "--steps", steps],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr, (steps, bad.stderr)
    bad = subprocess.run([sys.executable, "scripts/train_val_gap.py", str(run), str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "" and "no metrics.jsonl" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_unreadable_metrics_published_and_results_files_are_one_line(tmp_path, monkeypatch):
    """A folder bench --runs may not search, an unreadable --published / --baselines file, a damaged metrics .gz:
    PermissionError / BadGzipFile tracebacks (one after the whole LM evaluation). Root reads everything, so the
    refusals are simulated."""
    import gzip
    from pathlib import Path

    from ionllama.errors import UserError
    from ionllama.eval.report import load_published, load_results
    from ionllama.train.metrics import metrics_file, read_metrics

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl.gz").write_bytes(gzip.compress(b'{"step": 1}\n')[:12])  # cut short
    with pytest.raises(UserError, match="cannot read .*metrics.jsonl.gz"):
        read_metrics(tmp_path / "run")
    body = bytearray(gzip.compress(b"".join(b'{"step": %d, "loss": 1.5}\n' % i for i in range(2000))))
    body[20] ^= 0xFF  # a good header, a damaged deflate stream: zlib.error, neither OSError nor EOFError
    (tmp_path / "run" / "metrics.jsonl.gz").write_bytes(bytes(body))
    with pytest.raises(UserError, match="cannot read .*metrics.jsonl.gz"):
        read_metrics(tmp_path / "run")
    for name in ("pub.json", "res.json"):
        (tmp_path / name).write_text("{}")
    real_read, real_is_dir = Path.read_text, Path.is_dir

    def denied_read(self, *a, **k):
        if self.name in ("pub.json", "res.json"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *a, **k)

    def denied_dir(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(Path, "read_text", denied_read)
    monkeypatch.setattr(Path, "is_dir", denied_dir)
    with pytest.raises(UserError, match="cannot read it .*Permission denied"):
        load_published(tmp_path / "pub.json")
    with pytest.raises(UserError, match="cannot read it .*Permission denied"):
        load_results(tmp_path / "res.json")
    with pytest.raises(UserError, match="cannot read the metrics at .*locked"):
        metrics_file(tmp_path / "locked")


def test_train_val_gap_steps_window_reads_the_language_models_rows_only(tmp_path):
    """--steps A:B over a run with entropy patching: its first steps log the entropy model's own loss and bpb (phase
    "entropy"), which the window averaged in with the LM's rows (the training-curve plot leaves them out)."""
    import sys
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": i, "phase": "entropy", "bpb": 3.0} for i in range(0, 50, 10)]
    recs += [{"step": 50, "phase": "calibrate", "bpb": 9.0, "threshold": 1.5}]
    recs += [{"step": i, "phase": "main", "bpb": 2.0} for i in range(60, 100, 10)]
    recs += [{"step": 99, "phase": "main", "val_bpb": 1.95}]
    with gzip.open(run / "metrics.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    r = subprocess.run([sys.executable, "scripts/train_val_gap.py", str(run), "--steps", "30:80"],
                       capture_output=True, text=True, check=True)
    row = r.stdout.strip().splitlines()[-1].split("|")
    assert [float(c) for c in row[2:4]] == pytest.approx([2.0, 3])  # steps 60, 70, 80 of the main phase


def test_train_val_gap_weights_each_row_by_its_steps_and_leaves_out_the_entropy_model(tmp_path):
    """A row is the mean of its window's steps; a run's last window is cut (a 1-step row after 10-step ones, as in
    phase1-tasks-long-ng23-s2 at step 2831) and counted as a whole row. The tail also averaged in the entropy model's
    own rows (phase "entropy"), which --steps already left out."""
    import sys
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "phase": "entropy", "bpb": 5.0} for s in (5, 10)]
    recs += [{"step": 10, "phase": "calibrate", "bpb": 9.0, "threshold": 1.5}]
    recs += [{"step": s, "phase": "main", "bpb": 2.0} for s in range(20, 101, 10)]
    recs += [{"step": 101, "phase": "main", "bpb": 3.0}, {"step": 101, "phase": "final", "val_bpb": 1.9}]
    with gzip.open(run / "metrics.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    r = subprocess.run([sys.executable, "scripts/train_val_gap.py", str(run), "--tail", "1"],
                       capture_output=True, text=True, check=True)
    row = r.stdout.strip().splitlines()[-1].split("|")
    # nine 10-step rows at 2.0 and one 1-step row at 3.0
    assert [float(c) for c in row[2:4]] == pytest.approx([(90 * 2.0 + 3.0) / 91, 10], abs=1e-4)
