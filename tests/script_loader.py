"""Load a benchmark or script file as a module for tests (they are files run by path, not package modules)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_script(name: str, folder: str = "benchmarks"):
    """REPO/folder/name.py as a module; the folder goes on sys.path first, since benchmarks import each other."""
    path = REPO / folder
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    spec = importlib.util.spec_from_file_location(name, path / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
