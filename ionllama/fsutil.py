"""Small filesystem helpers shared by the trainer, the data pipeline and the experiment runner."""
from __future__ import annotations

import errno
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
    probe_write(p)


def ready_out_dir(folder: str | Path, flag: str = "--out") -> Path:
    """A results folder made and proven writable before any work, or a one-line UserError naming `flag`: a
    benchmark given a file there (or an unwritable place) used to fail with a traceback after all its measuring."""
    from .errors import UserError

    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder; pass a folder for the results")
    try:
        probe_writable(p)
    except OSError as e:
        raise UserError(f"cannot write results under {flag} {p} ({e.strerror or e}); pass a writable folder") from None
    return p


def ready_out_file(path: str | Path, flag: str = "--out") -> Path:
    """A results file's place checked before any work, or a one-line UserError naming `flag`: not a folder, its
    folder made and writable (a benchmark given a folder there failed at its first save, after the measuring)."""
    from .errors import UserError

    out = Path(path)
    if out.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file path, e.g. {out / 'results.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot make its folder {out.parent} ({e.strerror}); "
                        "give a path in a writable folder") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"{flag} {path}: its folder {out.parent} is not writable; give a path in a writable folder")
    return out


def out_not_an_input(path: str | Path, inputs, flag: str = "--out") -> Path:
    """ready_out_file, and refused when it is one of the files the command reads (`inputs`): a script's --out given
    its own input wrote the Markdown over it, exit 0, and the next run found no input."""
    from .errors import UserError

    out = ready_out_file(path, flag)
    for f in inputs:
        try:
            same = out.exists() and Path(f).exists() and os.path.samefile(out, f)
        except OSError:
            same = False
        if same:
            raise UserError(f"{flag} {path} is {f}, which this command reads; write the result to another file")
    return out


def probe_write(folder: str | Path) -> None:
    """Write and remove a small file in the existing `folder`; an OSError if that cannot be done (probe_writable
    without making the folder: bench probes the nearest existing parent and makes folders only to write results)."""
    probe = Path(folder) / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
    finally:  # a full disk creates the file and fails the write: it was left behind
        probe.unlink(missing_ok=True)


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


def write_target(path: str | Path) -> Path:
    """Where a write of `path` lands: a symlink's target (a rename over the link replaced the link with a file and
    left its target as it was), else `path`."""
    path = Path(path)
    if not path.is_symlink():
        return path
    try:
        return path.resolve(strict=False)
    except (RuntimeError, OSError):  # a symlink loop: Python 3.11 raises RuntimeError, later ones OSError
        raise OSError(errno.ELOOP, "a symlink loop", str(path)) from None


def temp_path(path: str | Path) -> Path:
    """The temp file an atomic write of `path` goes through: hidden, beside it (beside a symlink's target: same
    filesystem, so the rename is atomic), named by this process (stale ones of dead processes can be found and
    removed: process_gone)."""
    path = write_target(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_replace(tmp: str | Path, path: str | Path) -> None:
    """Flush `tmp` to disk, then rename it over `path` (a symlink's target): a crash leaves the old file or the new
    one, never half. An OSError, and `path` kept, where `path` is a pipe or a device: a rename would put a regular
    file in its place (as root, over /dev/null) and its reader would get nothing."""
    path = write_target(path)
    if path.exists() and not path.is_file():
        raise OSError(errno.EINVAL, "not a regular file (a pipe, a device or a folder)", str(path))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (str: UTF-8) to `path` through temp_path + fsync_replace. On any failure (a full disk, ^C) the
    earlier `path` is left as it was and the temp file is removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        # surrogateescape: a path that is not valid UTF-8 (named in a report) was a UnicodeEncodeError after the work
        tmp.write_bytes(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
        fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
