"""benchmarks/bench_cli_generate.py: the CLI's steady bytes/s from two lengths run as a user would (issue #4)."""
from __future__ import annotations

import json

import pytest
import torch

import ionllama
from ionllama.errors import UserError
from script_loader import load_script

B = load_script("bench_cli_generate")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = ionllama.create_model("tiny", model="dense", d_model=16, n_layers=1, n_heads=2).eval()
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    torch.save({"model": m.state_dict(), "model_config": m.config.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def report(ckpt, tmp_path_factory) -> dict:
    """One benchmark run with both extras (--in_process, --each_line 3): each CLI process costs ~3 s on CPU."""
    out = tmp_path_factory.mktemp("report") / "r.json"
    assert B.main(["--checkpoint", str(ckpt), "--lengths", "8", "40", "--device", "cpu", "--top_k", "3",
                   "--in_process", "--each_line", "3", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_rate_is_the_extra_bytes_over_the_extra_time(report):
    r = report
    (pair,) = r["pairs"]
    short, long_ = pair["short"], pair["long"]
    assert short["max_new_bytes"] == 8 and long_["max_new_bytes"] == 40
    assert long_["cli_stats"].startswith(f"[generate] {long_['bytes']} new bytes in ")  # the CLI's --stats line
    assert 0 <= short["bytes"] <= 8 and short["bytes"] <= long_["bytes"] <= 40
    # the CLI's own rate after its first run, read from that line (None where it printed none: 0 or 1 byte)
    for run in (short, long_):
        if run["cli_steady_bytes_per_s"] is not None:
            assert f"; {run['cli_steady_bytes_per_s']:,} bytes/s after the first run (" in run["cli_stats"]
    assert long_["bytes"] < 2 or long_["cli_steady_bytes_per_s"] > 0
    assert r["cli_steady_bytes_per_s_median"] == long_["cli_steady_bytes_per_s"]  # one pair: its long run's
    if long_["bytes"] > short["bytes"] and long_["wall_s"] > short["wall_s"]:
        want = (long_["bytes"] - short["bytes"]) / (long_["wall_s"] - short["wall_s"])
        assert pair["steady_bytes_per_s"] == pytest.approx(want)
        assert r["steady_bytes_per_s_median"] == pytest.approx(want)
    else:  # a run ended at 0x00 as early as the short one: no rate, not a made-up one
        assert pair["steady_bytes_per_s"] is None and r["steady_bytes_per_s_median"] is None
    # in process, streamed and not: the same seed gives the CLI's bytes, so the same counts
    for mode in ("streamed", "not_streamed"):
        row = r["in_process"][mode]
        assert row["bytes"] == [short["bytes"], long_["bytes"]]
        if row["steady_bytes_per_s"] is not None:
            assert row["steady_bytes_per_s"] == pytest.approx(
                (row["bytes"][1] - row["bytes"][0]) / (row["wall_s"][1] - row["wall_s"][0]), rel=1e-3)


def test_each_line_times_every_line_of_one_process(report):
    """--each_line N: one `ionllama generate --each_line` process, N --stats lines parsed, the first (compile and
    capture) apart from the later ones (the kept decoder)."""
    e = report["each_line"]
    assert e["lines"] == 3 and len(e["each"]) == 3 and all(0 <= r["bytes"] <= 8 for r in e["each"])
    assert e["first_line_s"] == e["each"][0]["seconds"]
    assert e["later_lines_median_s"] == sorted(r["seconds"] for r in e["each"][1:])[1]
    assert e["wall_s"] >= sum(r["seconds"] for r in e["each"])


@pytest.mark.parametrize("argv,match", [(["--lengths", "40", "8"], "SHORT < LONG"),
                                        (["--lengths", "0", "8"], "SHORT < LONG"),
                                        (["--each_line", "-1"], "--each_line -1")])
def test_bad_lengths_are_refused_before_any_run(ckpt, argv, match):
    with pytest.raises(UserError, match=match):
        B.main.__wrapped__(["--checkpoint", str(ckpt), *argv])


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--checkpoint", str(tmp_path / "none.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


def test_a_failing_cli_run_is_reported_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        B.main(["--checkpoint", str(bad), "--lengths", "2", "4", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ionllama generate` exited with" in err[0]
