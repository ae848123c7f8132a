"""Small filesystem helpers shared by the trainer, the data pipeline and the experiment runner."""
from __future__ import annotations

import os
from pathlib import Path


def remove_if_empty(path: str | Path) -> bool:
    """Remove the folder `path` if it exists and holds nothing; True if it was removed. Best effort (a folder
    another process fills meanwhile, or one without permission, is left): a refused command must not leave an
    empty folder it made behind, and must not fail on the way out either."""
    p = Path(path)
    try:
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()
            return True
    except OSError:
        pass
    return False


def probe_writable(folder: str | Path) -> None:
    """Make `folder` (parents too) and write and remove a small file in it; an OSError if that cannot be done.
    Checked before any work, so a run is refused at once, not after hours, when its results cannot be saved."""
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    probe = p / f".write-test-{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()
