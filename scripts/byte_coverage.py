"""How much of an evaluation set consists of byte values a training set rarely or never shows.

Why: an out-of-domain BPB can be driven by a few byte values the model never trained on (their logits stay at
initialisation). This counts them, so that explanation can be ruled in or out before blaming the model.
Usage: python scripts/byte_coverage.py TRAIN EVAL [--eval_bytes N] [--field text]
(.jsonl[.gz|.xz] by the field, .parquet by the column, any other file as raw text: as the data pipeline reads them)
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ionllama.data.sources import iter_local_file  # noqa: E402
from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry  # noqa: E402


def byte_histogram(path: str, field: str, limit: int | None = None) -> tuple[np.ndarray, int]:
    hist, n = np.zeros(256, np.int64), 0
    with warnings.catch_warnings(record=True) as skipped:  # lines that are not JSON: said below, in one line
        warnings.simplefilter("always")
        # the bytes the data pipeline trains and evaluates on: a plain-text file was read as JSONL (0 bytes, exit 0)
        for _, doc in iter_local_file(path, os.path.dirname(os.path.abspath(path)), field):
            b = np.frombuffer(doc, np.uint8)
            if limit is not None:
                b = b[: limit - n]
            hist += np.bincount(b, minlength=256)
            n += len(b)
            if limit is not None and n >= limit:
                break
    if not n:  # nothing to compare: every rate below would be 0 / 0
        if skipped:
            raise UserError(f"{path}: no line is a JSON object with a '{field}' field; give JSONL, or plain text in a "
                            "file not named .jsonl")
        raise UserError(f"{path} holds no text; give a file with some")
    for w in skipped:
        warnings.warn(w.message, stacklevel=2)
    return hist, n


def coverage(train: np.ndarray, n_train: int, ev: np.ndarray, n_eval: int, rare: int = 100) -> dict:
    p_eval = ev / max(n_eval, 1)
    q = (train + 0.5) / (n_train + 128)  # add-1/2 unigram of the training bytes
    return {"train_bytes": n_train, "eval_bytes": n_eval,
            "eval_frac_unseen": float(p_eval[train == 0].sum()),
            f"eval_frac_rare_lt{rare}": float(p_eval[train < rare].sum()),
            "eval_frac_non_ascii": float(p_eval[128:].sum()),
            "train_frac_non_ascii": float(train[128:].sum() / max(n_train, 1)),
            "unigram_xent_eval_given_train_bits": float(-(p_eval * np.log2(q)).sum())}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("train")
    p.add_argument("eval")
    p.add_argument("--eval_bytes", type=int, default=2_000_000, help="the first N bytes, as the runner evaluates")
    # --text_field: the name the data readers' errors tell the user to pass
    p.add_argument("--field", "--text_field", dest="field", default="text")
    a = p.parse_args(argv)
    check_ranges(a, {"eval_bytes": 1})
    for path in (a.train, a.eval):
        if not Path(path).is_file():
            p.error(f"no such file: {path}")
    tr, n_tr = byte_histogram(a.train, a.field)
    ev, n_ev = byte_histogram(a.eval, a.field, a.eval_bytes)
    for k, v in coverage(tr, n_tr, ev, n_ev).items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
