"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input from the user (paths, flags, data). The CLI prints `error: <msg>` and exits 2."""


def cli_entry(fn):
    """Wrap a CLI main so UserError (and a few common misuse errors) become one-line exits."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
