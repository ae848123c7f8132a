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


def process_gone(pid: str) -> bool:
    """True when `pid` (the number in a temp file's name) is no running process, so its temp files are litter
    (SIGKILL skips every clean-up); False for this process, one alive under another user, or a name without one."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
