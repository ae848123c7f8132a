"""benchmarks/check_compiled_patches.py: compiled patcher and pooling against eager (the GPU check, on CPU here)."""
from __future__ import annotations

import json

import pytest
import torch

from script_loader import load_script

C = load_script("check_compiled_patches")


def test_compiled_byte_patching_agrees_and_matches_the_static_count(tmp_path):
    out = tmp_path / "p.json"
    assert C.main(["--device", "cpu", "--lengths", "24", "--batch", "2", "--modes", "byte", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    (row,) = r["rows"]
    assert (row["mode"], row["T"], row["differs"]) == ("byte", 24, [])
    assert row["static_patch_count"] == 24 and row["bytes_per_patch"] == 1.0


def test_a_compiled_result_that_differs_is_named_and_fails(tmp_path, monkeypatch):
    def fake_compile(fn, **kw):  # a "compiler" that moves one patch start and skews pooling
        def wrong(*args):
            res = fn(*args)
            if isinstance(res, tuple):
                starts = res[0].clone()
                starts[0, 1] = ~starts[0, 1]
                return (starts, *res[1:])
            return res + 1e-3
        return wrong
    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "p.json"
    assert C.main(["--device", "cpu", "--lengths", "16", "--batch", "2", "--modes", "fixed", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 and all(r["differs"] == ["starts", "pool_mean", "pool_attention"] for r in rows)


def test_bad_flags_are_one_line_exit_2(capsys):
    for argv in (["--modes", "fixd", "--device", "cpu"], ["--lengths", "0", "--device", "cpu"]):
        with pytest.raises(SystemExit) as e:
            C.main(argv)
        assert e.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
