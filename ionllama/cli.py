"""`ionllama <command> ...`: prepare, train, generate, bench, experiment.

Each command lives in its own module exposing ``main(argv) -> int``; it is imported only when run, so
`ionllama train` does not pay for the benchmark's imports (and a command whose module is not part of
this version says so in one line)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("ionllama.train.cli", "prepare_main", "build the byte shards of a dataset"),
    "train": ("ionllama.train.cli", "main", "train a model (same flags as train_cloud.py)"),
    "generate": ("ionllama.generation.cli", "main", "generate text from a checkpoint"),
    "bench": ("ionllama.eval.benchmark", "main", "run the benchmark suite on a checkpoint"),
    "experiment": ("ionllama.experiment", "main", "run an experiment matrix"),
}


def usage() -> str:
    lines = ["usage: ionllama <command> [options]   (ionllama <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command '{cmd}'; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[cmd]
    try:
        module = importlib.import_module(module_name)  # imports torch: ~1.5 s in which a Ctrl-C lands here
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        # only a missing command module is "not available"; a missing dependency inside it is a real error
        if e.name and module_name.startswith(e.name):
            print(f"error: `ionllama {cmd}` is not available in this version ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    rc = getattr(module, func_name)(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
