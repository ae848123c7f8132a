"""Running kernel checks in a child Python: Triton's interpreter (TRITON_INTERPRET=1) must be set before triton
is imported, and a real compile for sm_90 must run without it, so both need a process of their own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kernel_env(interpret: bool = True) -> dict:
    """The environment for a child run from the repository root: the package importable, warnings quiet, Triton's
    interpreter on (CPU) or off (a real compile). Interpreted children see no GPU: on a GPU machine a script's
    default device would be CUDA, whose tensors the interpreter cannot run (seventeenth session's CUDA tests)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    if interpret:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


def run_child(argv: list[str], interpret: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """python argv... in the repository root; fails the test (with the child's stderr) on a non-zero exit."""
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=kernel_env(interpret),
                       cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_json_script(script: str, *args: str, timeout: int = 300):
    """A script under the interpreter that prints its result as JSON on its last line; that result."""
    return json.loads(run_child(["-c", script, *args], timeout=timeout).stdout.strip().splitlines()[-1])


def assert_compiles_for_hopper(script: str) -> None:
    """A script that compiles kernels for sm_90 without the interpreter and prints OK (or SKIP <why>)."""
    last = run_child(["-c", script], interpret=False).stdout.strip().splitlines()[-1]
    if last.startswith("SKIP"):
        pytest.skip(f"Triton cannot compile for CUDA here: {last}")
    assert last == "OK"
