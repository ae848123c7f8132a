"""How many hash buckets the digit n-grams of arithmetic prompts get (issue #11, question 4). The hashed n-gram
tables give each byte the sum of its 2..5-gram buckets' vectors; where many digit strings share a bucket, the vector
cannot say which string it was. Counts the distinct buckets of all 10^n digit n-grams under the model's own hash.

    python scripts/digit_ngram_buckets.py [--buckets 4096 32768] [--sizes 2 3 4 5]
"""
from __future__ import annotations

import argparse
import itertools

import torch

from ionllama.model.byte_embedding import ngram_hashes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buckets", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 5])
    a = p.parse_args()
    print("| buckets | n | digit n-grams | distinct buckets | share |\n|---|---|---|---|---|")
    for buckets in a.buckets:
        for n in a.sizes:
            grams = torch.tensor(list(itertools.product(range(48, 58), repeat=n)))  # b"0".."9"
            ids = ngram_hashes(grams, n, buckets)[:, -1]  # the n-gram ending at each window's last byte
            distinct = len(set(ids.tolist()))
            print(f"| {buckets:,} | {n} | {len(grams):,} | {distinct:,} | {distinct / len(grams):.3f} |")


if __name__ == "__main__":
    main()
