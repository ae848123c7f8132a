"""Small filesystem helpers shared by the trainer, the data pipeline and the experiment runner."""
from __future__ import annotations

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
