"""Character and arithmetic task data with held-out splits, for task training and the benchmark.

One fixed format for every task and every split:

    <DOC_SEP>Q: <question>\\nA: <answer>\\n<DOC_SEP>Q: ...

* ``count``   How many times does 'r' appear in 'strawberry'?  -> 3
* ``spell``   Spell 'cat' with hyphens.                         -> c-a-t
* ``reverse`` Reverse 'cat'.                                    -> tac
* ``add``     What is 12 + 34?                                  -> 46
* ``mul``     What is 12 * 34?                                  -> 408

Splits are decided by a keyed hash, not by sampling order, so they are identical on every machine and
for every seed: a word belongs to train/val/test by the hash of the word (from the frozen list in
``task_words.py``); an arithmetic example by the hash of its *unordered* operand pair, so ``3 + 5`` in
test never appears as ``5 + 3`` (or ``3 * 5``) in training either. Test words and operand pairs therefore
never occur in training examples.

Two operands of an arithmetic example have the same number of digits d (1..max_digits); the benchmark
reports accuracy per d. Generation for scoring stops on ``\\n`` and on DOC_SEP.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from ..errors import UserError
from .task_words import WORDS

DOC_SEP = 0  # the document separator byte of the byte pipeline; the model sees it
DOC_SEP_BYTES = bytes([DOC_SEP])
STOP_BYTES = (b"\n", DOC_SEP_BYTES)  # greedy decoding of an answer stops on either
IGNORE_INDEX = -100

CHAR_TASKS = ("count", "spell", "reverse")
ARITH_TASKS = ("add", "mul")
TASKS = CHAR_TASKS + ARITH_TASKS
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
DEFAULT_MAX_DIGITS = 4
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class TaskExample:
    task: str
    prompt: bytes  # b"Q: <question>\nA: "
    answer: bytes  # b"<answer>" (no newline)
    digits: int = 0  # operand digit count for arithmetic, 0 for character tasks
    key: str = field(default="", compare=False)  # the split key (word or operand pair)

    @property
    def text(self) -> bytes:
        """The example as it appears in training data (without the separator)."""
        return self.prompt + self.answer + b"\n"


def split_of(key: str) -> str:
    """Deterministic split for a key: a keyed 64-bit hash mapped to [0, 1)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=b"ionllama-task").digest(), "little")
    u = h / 2.0**64
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["val"]:
        return "val"
    return "test"


def word_key(word: str) -> str:
    return f"word:{word}"


def pair_key(a: int, b: int) -> str:
    lo, hi = (a, b) if a <= b else (b, a)
    return f"pair:{lo},{hi}"


@lru_cache(maxsize=None)
def split_words(split: str) -> tuple[str, ...]:
    _check_split(split)
    return tuple(w for w in WORDS if split_of(word_key(w)) == split)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown task split '{split}'; choose one of {', '.join(SPLITS)}")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")


def _format(question: str) -> bytes:
    return f"Q: {question}\nA: ".encode()


def _char_example(rng: np.random.Generator, task: str, split: str) -> TaskExample:
    words = split_words(split)
    w = words[int(rng.integers(len(words)))]
    if task == "count":
        present = sorted(set(w))
        # mostly letters of the word (answers 1..k), sometimes absent letters (answer 0)
        if rng.random() < 0.8:
            c = present[int(rng.integers(len(present)))]
        else:
            absent = [a for a in _ALPHABET if a not in present]
            c = absent[int(rng.integers(len(absent)))]
        q, a = f"How many times does '{c}' appear in '{w}'?", str(w.count(c))
    elif task == "spell":
        q, a = f"Spell '{w}' with hyphens.", "-".join(w)
    else:  # reverse
        q, a = f"Reverse '{w}'.", w[::-1]
    return TaskExample(task, _format(q), a.encode(), 0, word_key(w))


def _operand_range(d: int) -> tuple[int, int]:
    return (0 if d == 1 else 10 ** (d - 1)), 10**d - 1


def _arith_example(rng: np.random.Generator, task: str, split: str, digits: int) -> TaskExample:
    lo, hi = _operand_range(digits)
    for _ in range(10_000):  # rejection sampling: expected 1.25 tries for train, 10 for val/test
        a, b = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        if split_of(pair_key(a, b)) == split:
            break
    else:  # pragma: no cover - would need a split with (almost) no pairs
        raise RuntimeError(f"no {split} operand pair found for {digits} digits")
    sym, val = ("+", a + b) if task == "add" else ("*", a * b)
    return TaskExample(task, _format(f"What is {a} {sym} {b}?"), str(val).encode(), digits, pair_key(a, b))


def sample_example(rng: np.random.Generator, task: str, split: str = "train", digits: int | None = None,
                   max_digits: int = DEFAULT_MAX_DIGITS) -> TaskExample:
    """One example of `task` from `split`; arithmetic digit count `digits`, else uniform in 1..max_digits."""
    _check_task(task)
    _check_split(split)
    if task in CHAR_TASKS:
        return _char_example(rng, task, split)
    if digits is None:
        if max_digits < 1:
            raise UserError(f"max_digits must be >= 1, got {max_digits}; pass a positive digit count")
        digits = int(rng.integers(1, max_digits + 1))
    return _arith_example(rng, task, split, digits)


def make_task_examples(task: str, split: str, n: int, seed: int, digits: int | None = None,
                       max_digits: int = DEFAULT_MAX_DIGITS) -> list[TaskExample]:
    """Up to `n` distinct examples (by prompt). Fewer when the split holds fewer (e.g. 1-digit test pairs)."""
    rng = np.random.default_rng([seed, TASKS.index(task) if task in TASKS else 0, SPLITS.index(split)
                                 if split in SPLITS else 0, digits or 0])
    seen: set[bytes] = set()
    out: list[TaskExample] = []
    misses = 0
    while len(out) < n and misses < 200 + 20 * n:
        ex = sample_example(rng, task, split, digits=digits, max_digits=max_digits)
        if ex.prompt in seen:
            misses += 1
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def make_examples(task: str, split: str, n: int, seed: int, digits: int | None = None,
                  max_digits: int = DEFAULT_MAX_DIGITS) -> list[tuple[bytes, bytes]]:
    """`[(prompt, answer), ...]` for evaluation: prompt = b"Q: ...\\nA: ", answer without newline.
    Callers prepend DOC_SEP_BYTES to the prompt so the model sees a document start, as in training."""
    return [(e.prompt, e.answer) for e in make_task_examples(task, split, n, seed, digits, max_digits)]


@lru_cache(maxsize=None)
def longest_example(tasks: tuple[str, ...], split: str, max_digits: int) -> int:
    """Bytes of the longest example `tasks` can draw from `split` (its text, without separators); for arithmetic the
    largest d-digit operands' (their sum or product has the most digits any pair of the split can have)."""
    longest = 0
    for task in tasks:
        if task in CHAR_TASKS:
            for w in split_words(split):
                if task == "count":
                    q, a = f"How many times does 'x' appear in '{w}'?", str(max(w.count(c) for c in set(w)))
                elif task == "spell":
                    q, a = f"Spell '{w}' with hyphens.", "-".join(w)
                else:
                    q, a = f"Reverse '{w}'.", w
                longest = max(longest, len(_format(q)) + len(a.encode()) + 1)
        else:
            top = 10**max_digits - 1
            sym, val = ("+", top + top) if task == "add" else ("*", top * top)
            longest = max(longest, len(_format(f"What is {top} {sym} {top}?")) + len(str(val)) + 1)
    return longest


def check_seq_len(seq_len: int, split: str = "train", tasks: tuple[str, ...] | list[str] = TASKS,
                  max_digits: int = DEFAULT_MAX_DIGITS) -> None:
    """Every row must hold the longest example: checked before any batch is drawn (the samplers call it too), the
    error came at whichever step first drew a long one (step 16 or 20 of a run at --seq_len 64, by the seed)."""
    need = longest_example(tuple(tasks), split, max_digits) + 2  # with the separators before and after it
    if need > seq_len + 1:
        raise UserError(f"--seq_len {seq_len} is too short for the longest task example ({need} bytes with its "
                        f"separators); use --seq_len {need - 1} or more")


def make_task_batch(rng: np.random.Generator, batch_size: int, seq_len: int, split: str = "train",
                    tasks: tuple[str, ...] | list[str] = TASKS, max_digits: int = DEFAULT_MAX_DIGITS,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of packed task examples.

    Each row is ``DOC_SEP ex DOC_SEP ex ... DOC_SEP`` padded with DOC_SEP to seq_len + 1 bytes; examples
    are never cut. Returns x, y LongTensors (B, seq_len): y is the next byte where that byte belongs to an
    answer or its closing newline, IGNORE_INDEX (-100) on prompts, separators and padding.
    """
    _check_split(split)
    if not tasks:
        raise UserError("no tasks given; choose from " + ", ".join(TASKS))
    for t in tasks:
        _check_task(t)
    L = seq_len + 1
    check_seq_len(seq_len, split, tasks, max_digits)
    tokens = np.full((batch_size, L), DOC_SEP, dtype=np.int64)
    target_mask = np.zeros((batch_size, L), dtype=bool)  # byte i is a scored target (predicted at i-1)
    for r in range(batch_size):
        pos = 1  # position 0 is the leading DOC_SEP
        while True:
            ex = sample_example(rng, tasks[int(rng.integers(len(tasks)))], split, max_digits=max_digits)
            text = ex.text
            if pos + len(text) + 1 > L:  # +1: the separator after the example
                break
            tokens[r, pos:pos + len(text)] = np.frombuffer(text, dtype=np.uint8)
            a0 = pos + len(ex.prompt)
            target_mask[r, a0:pos + len(text)] = True
            pos += len(text) + 1
    x = torch.from_numpy(tokens[:, :-1].copy())
    y = torch.from_numpy(np.where(target_mask[:, 1:], tokens[:, 1:], IGNORE_INDEX))
    return x, y


def extract_answer(generated: bytes) -> bytes:
    """The model's answer: generated bytes up to the first stop byte."""
    cut = len(generated)
    for s in STOP_BYTES:
        i = generated.find(s)
        if i != -1:
            cut = min(cut, i)
    return generated[:cut]


def is_correct(generated: bytes, answer: bytes) -> bool:
    """Exact match of the decoded answer (surrounding ASCII spaces ignored)."""
    return extract_answer(generated).strip(b" ") == answer
