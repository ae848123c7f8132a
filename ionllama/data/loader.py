"""Training batches: random windows of seq_len + 1 bytes from the train shard.

Every batch is a pure function of (seed, step, micro-step, rank): resuming at step N continues the
same stream, and no sampler state needs saving. The offsets of one optimizer step are drawn for the
*global* batch (batch_size x grad_accum x world_size) and each (micro-step, rank) takes its own block,
so one process with a larger batch sees exactly the rows that several ranks see together. Not with --task_mix:
task rows replace the last rows of each rank's batch, so which text windows they replace depends on how the global
batch is split (the task rows themselves are drawn per (seed, step, block) too)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

_TASK_STREAM = 0x7A5C  # separates the task-row random stream from the window offsets


def _import_tasks():
    import importlib

    try:
        tasks = importlib.import_module("ionllama.data.tasks")
    except ModuleNotFoundError as e:
        if e.name == "ionllama.data.tasks":
            raise UserError("task data needs ionllama.data.tasks, which is not installed in this version; "
                            "drop --task_mix / --dataset tasks") from None
        raise
    return tasks


def task_rows(task_mix: float, batch_size: int) -> int:
    """The task rows of each batch of batch_size rows (one rank's micro-batch): whole rows, so the share is
    rounded (--task_mix 0.3 of 8 rows is 2 rows, 0.25)."""
    return int(round(task_mix * batch_size))


def checked_task_rows(task_mix: float, batch_size: int) -> tuple[int, str | None]:
    """(task rows per batch, the line the trainer says when their share is not --task_mix), refusing a --task_mix
    out of range or one that rounds to no row (0.1 of 4 rows trained on text alone, labelled as trained on tasks)."""
    if not 0.0 <= task_mix <= 1.0:
        raise UserError(f"--task_mix {task_mix} must be between 0 and 1 (the share of each batch's rows that are "
                        "task examples, e.g. 0.1)")
    n = task_rows(task_mix, batch_size)
    if task_mix > 0 and n == 0:
        batch = ""
        if task_mix * 2 ** 31 > 0.5:  # a batch size that gives a row exists: name it
            b = int(0.5 / task_mix) + 1  # the smallest batch whose share rounds to a row (round(0.5) is 0)
            for _ in range(4):  # a step or two past float rounding; no open loop: past 2**53, b += 1 changed
                if task_rows(task_mix, b) >= 1:  # nothing, and --task_mix 1e-30 hung the trainer at 100 % CPU
                    batch = f", or --batch_size {b} or more"
                    break
                b += 1
        raise UserError(f"--task_mix {task_mix:g} of a --batch_size {batch_size} batch (rows per rank) rounds to 0 "
                        f"task rows; pass --task_mix {1 / batch_size:g} or more (1 row){batch}")
    eff = n / batch_size if batch_size else 0.0
    if n == 0 or abs(eff - task_mix) < 1e-9:
        return n, None
    return n, (f"note: --task_mix {task_mix:g} is {n} task row(s) of each {batch_size}-row batch (per rank): an "
               f"effective share of {eff:g}")


class WindowSampler:
    def __init__(self, data: np.ndarray, seq_len: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1, task_mix: float = 0.0):
        if len(data) < seq_len + 2:
            raise UserError(f"the train split has {len(data):,} bytes, fewer than --seq_len {seq_len} + 2; "
                            "lower --seq_len or add data")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.grad_accum, self.seed, self.rank, self.world_size = grad_accum, seed, rank, world_size
        self.n_task_rows, self.task_note = checked_task_rows(task_mix, batch_size)
        self.tasks = _import_tasks() if self.n_task_rows else None
        if self.tasks:
            self.tasks.check_seq_len(seq_len)
        self._cached_step: int | None = None
        self._offsets: np.ndarray | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def offsets(self, step: int) -> np.ndarray:
        if self._cached_step != step:
            rng = np.random.default_rng([self.seed, step])
            self._offsets = rng.integers(0, len(self.data) - self.seq_len, size=self.global_batch)
            self._cached_step = step
        return self._offsets

    def block(self, micro: int) -> int:
        return micro * self.world_size + self.rank

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors (batch_size, seq_len); y = x shifted by one byte."""
        k = self.block(micro)
        offs = self.offsets(step)[k * self.batch_size:(k + 1) * self.batch_size]
        idx = offs[:, None] + np.arange(self.seq_len + 1)
        w = torch.from_numpy(np.asarray(self.data[idx], dtype=np.int64))
        x, y = w[:, :-1].clone(), w[:, 1:].clone()
        if self.n_task_rows:
            rng = np.random.default_rng([self.seed, step, k, _TASK_STREAM])
            tx, ty = self.tasks.make_task_batch(rng, self.n_task_rows, self.seq_len, "train")
            x[-self.n_task_rows:], y[-self.n_task_rows:] = tx, ty
        return x, y


class TaskSampler:
    """`--dataset tasks`: every row is packed task examples (targets only on answers)."""

    def __init__(self, seq_len: int, batch_size: int, grad_accum: int = 1, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.tasks = _import_tasks()
        self.tasks.check_seq_len(seq_len)
        self.seq_len, self.batch_size, self.grad_accum = seq_len, batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        k = micro * self.world_size + self.rank
        rng = np.random.default_rng([self.seed, step, k, _TASK_STREAM])
        return self.tasks.make_task_batch(rng, self.batch_size, self.seq_len, "train")


TASK_VAL_ROWS = 64


def task_val_batches(seq_len: int, batch_size: int, n_rows: int = TASK_VAL_ROWS, seed: int = 0) -> list:
    """A fixed set of validation task rows (split 'val'), identical for every run, in batches of batch_size. The
    rows do not depend on batch_size: 8 batches of --eval_batch_size rows made the val set (and the threshold
    calibrated on its first batch) change with that flag, which a resume takes from its own command line."""
    tasks = _import_tasks()
    rng = np.random.default_rng([seed, _TASK_STREAM, 1])
    x, y = tasks.make_task_batch(rng, n_rows, seq_len, "val")
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n_rows, batch_size)]
