"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback."""
from __future__ import annotations

import argparse
import errno
import functools
import math
import numbers
import os
import sys
import time
import warnings


class UserError(ValueError):
    """Bad input from the user (paths, flags, data). The CLI prints `error: <msg>` and exits 2. A ValueError, so
    API code that catches ValueError (what the models' forward raises for bad input) catches these too."""


class RelayedError(UserError):
    """A UserError raised on rank 0 of a torchrun job and passed to the other ranks so they stop too: rank 0
    prints it, the others exit 2 without printing it again."""


class PeerLostError(UserError):
    """A collective of a torchrun job failed because another of its processes stopped: that process says why (its own
    error line or traceback); this one says so in one line, and nothing where rank 0 has said its own error already."""


_STARTED = time.time()  # a note older than this process is another job's, under a reused --rdzv_id


def _error_note(run_id: str) -> str:
    import tempfile

    safe = "".join(c for c in run_id if c.isalnum() or c in "-_")[:64]
    return os.path.join(tempfile.gettempdir(), f"ionllama-error-{safe}-rank0.txt")


def _print_error_once(line: str, wait_s: float = 2.0, echo: bool = False) -> None:
    """Under torchrun every rank runs the same checks, so a refusal printed its line once per rank. Rank 0 prints it
    and leaves it in a small file named by the job's run id; another rank prints its own line (with its rank) only
    when rank 0's differs or has not come within wait_s: an error of one rank alone is still said. echo: the line only
    says that another process stopped, so any line of rank 0's (its own error, or this same news) makes it redundant."""
    rank, run_id = os.environ.get("RANK"), os.environ.get("TORCHELASTIC_RUN_ID")
    if rank is None or run_id is None or "WORLD_SIZE" not in os.environ:
        print(line, file=sys.stderr)
        return
    note = _error_note(run_id)
    if rank == "0":
        print(line, file=sys.stderr)
        from .fsutil import atomic_write

        try:
            atomic_write(note, line)
        except OSError:
            pass
        _prune_old_notes(note)
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if os.stat(note).st_mtime < _STARTED - 1.0:  # a stale note: it made this rank print its line too
                raise FileNotFoundError(note)
            with open(note) as f:
                if f.read() == line or echo:
                    return
                break
        except OSError:
            time.sleep(0.05)
    print(f"[rank {rank}] {line}", file=sys.stderr)


def _prune_old_notes(keep: str, max_age_s: float = 86400.0) -> None:
    """Notes of jobs a day gone (nothing removed them: an audit found 59 in one /tmp)."""
    import glob

    for f in glob.glob(os.path.join(os.path.dirname(keep), "ionllama-error-*-rank0.txt")):
        try:
            if f != keep and os.stat(f).st_mtime < time.time() - max_age_s:
                os.unlink(f)
        except OSError:
            pass


def cli_entry(fn):
    """Wrap a CLI main so UserError (and a few common misuse errors) become one-line exits."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = _one_line_warning  # a warning is one line too, not message + source line
        # a path of non-UTF-8 bytes (read with surrogateescape) printed to a strict stdout (en_US.UTF-8 locales) was a
        # UnicodeEncodeError traceback after `data: preparing ...`; stderr already uses backslashreplace
        if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
            try:
                sys.stdout.reconfigure(errors="backslashreplace")
            except (OSError, ValueError):
                pass
        try:
            return fn(*args, **kwargs)
        except RelayedError:
            sys.exit(2)
        except UserError as e:
            _print_error_once(f"error: {e}", echo=isinstance(e, PeerLostError))
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # `ionllama bench ... | head -1`: the reader left; no traceback, as other tools
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush must not fail
            except (OSError, ValueError):
                pass
            sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a writer killed by the signal
        except OSError as e:
            # a path no filesystem takes (a name over 255 bytes, a symlink loop), wherever it was first used
            if e.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
                raise
            where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
            _print_error_once(f"error: {where}{e.strerror}; pass a shorter path, or one without a symlink loop"[:400])
            sys.exit(2)

    return wrapper


def is_whole(v) -> bool:
    """An int (numpy's included), not a bool and not a float: a count or size the user passed."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message, cut at a word boundary (torch's load errors run to
    pages; a cut mid-word read as a typo), or its type name when it has no message."""
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "") or type(e).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def check_ranges(args, at_least: dict[str, float], above_zero: tuple[str, ...] = (),
                 at_most: dict[str, float] | None = None) -> None:
    """One-line UserError for a numeric flag below its least value or not above zero (NaN included), or infinite;
    a flag left at None (not given) is skipped."""
    for name, low in at_least.items():
        v = getattr(args, name, None)
        if v is not None and not v >= low:
            raise UserError(f"--{name} must be at least {low} (got {v}); pass --{name} {low} or more")
    for name in above_zero:
        v = getattr(args, name, None)
        if v is not None and not v > 0:
            raise UserError(f"--{name} must be above 0 (got {v}); pass a positive --{name}")
    for name in (*at_least, *above_zero):
        # --lr inf used to train to NaN weights and exit 0; no flag here means anything by inf
        v = getattr(args, name, None)
        if isinstance(v, float) and math.isinf(v):
            raise UserError(f"--{name} must be a finite number (got {v}); leave it out for the default")
        # past float32: --lr 1e39 was an overflow error after the entropy phase had run
        if isinstance(v, float) and abs(v) > FLOAT32_MAX:
            raise UserError(f"--{name} {v} is beyond any usable value (float32); pass a smaller --{name}")
    for name, high in (at_most or {}).items():  # --batch_size 1e20: numpy's "maximum allowed dimension exceeded"
        v = getattr(args, name, None)
        if v is not None and v > high:
            raise UserError(f"--{name} {v} is beyond any usable size (at most {high}); pass a smaller --{name}")


def check_not_blank(args, names: tuple[str, ...]) -> None:
    """Path flags given as '' or spaces: a folder literally named '  ' was made (an audit); generate and bench refused
    their own blank --output already."""
    for name in names:
        v = getattr(args, name, None)
        if isinstance(v, str) and not v.strip():
            raise UserError(f"--{name} is blank ({v!r}); give a folder path or leave it out for the default")


FLOAT32_MAX = 3.4028234663852886e38
SEED_MAX = 2**32 - 1  # numpy's legacy seeding (np.random.seed) and default_rng's int seeds take 0..2**32-1 here


def check_seed(seed) -> None:
    """--seed of train / experiment: numpy's seed range, in one line (it was a ValueError traceback, exit 1)."""
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed must be 0 to 2**32-1 (got {seed}); pass a non-negative seed below 4294967296")


# torch's messages for an allocation that cannot be made: the CPU allocator, CUDA (torch.OutOfMemoryError's text),
# a size past int64 (a RuntimeError or, from a shape, a TypeError)
_NO_MEMORY = ("can't allocate memory", "out of memory", "size calculation overflowed", "Overflow when unpacking")


def is_out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure (MemoryError, torch.OutOfMemoryError, or torch's CPU / overflow messages),
    which the commands turn into one line naming the flag that sized it. Why strings too: the CPU allocator and
    the int64 overflow raise plain RuntimeError / TypeError; a torch that rewords them brings back the traceback,
    never a wrong result."""
    import torch  # here, not at the top: the one-line error helpers stay importable without loading torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, (RuntimeError, TypeError)) and any(s in str(e) for s in _NO_MEMORY)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one `error: ...` line (exit 2) instead of usage + error, and a flag must be
    spelt out: argparse's prefix matching took `bench --out x` as `--output x` and wrote a stray file (an audit)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # under torchrun every rank parses the same flags: rank 0 says it once, not once per process
        if os.environ.get("RANK", "0") == "0" or "WORLD_SIZE" not in os.environ:
            print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)
