"""How many hash buckets the digit n-grams of arithmetic prompts get (issue #11, question 4). The hashed n-gram
tables give each byte the sum of its 2..5-gram buckets' vectors; where many strings share a bucket, the vector
cannot say which string it was. Two counts under the model's own hash (`ngram_hashes`):
  1. all 10^n pure digit strings of each size n: their distinct buckets;
  2. the held-out addition prompts the task stage scores (test split, n per digit count, the scorer's seed): the
     distinct n-grams that hold a digit, over prompt and answer, and their distinct buckets.

    python scripts/digit_ngram_buckets.py [--buckets 4096 32768] [--sizes 2 3 4 5] [--n 200]
"""
from __future__ import annotations

import itertools

import torch

from ionllama.config import MAX_NGRAM
from ionllama.data import tasks as T
from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry
from ionllama.model.byte_embedding import ngram_hashes

SCORER_SEED = 1234  # eval.task_eval's seed for the held-out prompts (tasks.json "seed")


def buckets_of(strings: list[bytes], n: int, buckets: int) -> int:
    ids = ngram_hashes(torch.tensor([list(s) for s in strings]), n, buckets)[:, -1]  # n-gram ending at the last byte
    return len(set(ids.tolist()))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--buckets", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--n", type=int, default=200, help="held-out addition prompts per digit count")
    a = p.parse_args(argv)
    # (an audit) --buckets 0 was a ZeroDivisionError, --n 0 an IndexError, --sizes -1 a ValueError, and
    # --buckets -1 printed a table row of wrong numbers, exit 0
    check_ranges(a, {"n": 1})
    if min(a.buckets) < 1:
        raise UserError(f"--buckets must all be at least 1 (got {a.buckets}); e.g. --buckets 4096 32768")
    if not all(1 <= n <= MAX_NGRAM for n in a.sizes):
        raise UserError(f"--sizes must all be n-gram sizes 1 to {MAX_NGRAM} (got {a.sizes}); e.g. --sizes 2 3 4 5")
    print("All pure digit strings:\n\n| buckets | n | digit n-grams | distinct buckets | share |\n|---|---|---|---|---|")
    for buckets in a.buckets:
        for n in a.sizes:
            grams = [bytes(g) for g in itertools.product(range(48, 58), repeat=n)]  # b"0".."9"
            k = buckets_of(grams, n, buckets)
            print(f"| {buckets:,} | {n} | {len(grams):,} | {k:,} | {k / len(grams):.3f} |")
    print(f"\nThe held-out addition prompts and answers ({a.n} per digit count, seed {SCORER_SEED}): n-grams that hold a "
          "digit\n\n| buckets | digits | n | distinct n-grams | distinct buckets |\n|---|---|---|---|---|")
    for buckets in a.buckets:
        for d in range(1, T.DEFAULT_MAX_DIGITS + 1):
            examples = T.make_task_examples("add", "test", a.n, SCORER_SEED, digits=d)
            for n in a.sizes:
                found = {e.prompt[i - n:i] if i <= len(e.prompt) else (e.prompt + e.answer)[i - n:i]
                         for e in examples for i in range(n, len(e.prompt) + len(e.answer) + 1)}
                found = sorted(s for s in found if any(48 <= c <= 57 for c in s))
                print(f"| {buckets:,} | {d} | {n} | {len(found):,} | {buckets_of(found, n, buckets):,} |")


if __name__ == "__main__":
    main()
