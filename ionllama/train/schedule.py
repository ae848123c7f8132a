"""Training phases and the learning-rate schedule, both pure functions of the global step (so a
resumed run needs no scheduler state beyond the plan itself).

Global steps [0, E) train the entropy model (phase 'entropy'), [E, E + M - J) the main model with the
entropy model frozen ('main'), the last J steps everything together at lr x joint_lr_scale ('joint').
Models without an entropy model have E = J = 0: only 'main'."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


DEFAULT_MIN_LR_RATIO = 0.1  # the cosine's end, as a fraction of the peak (--min_lr_ratio)


def warmup_cosine(t: int, total: int, warmup: int, min_ratio: float = DEFAULT_MIN_LR_RATIO) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to min_ratio at the last step (total - 1)."""
    if warmup > 0 and t < warmup:
        return (t + 1) / warmup
    progress = min(1.0, (t - warmup) / max(1, total - 1 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class PhasePlan:
    entropy_steps: int
    max_steps: int  # main + joint
    joint_steps: int
    lr: float
    entropy_lr: float
    warmup_steps: int
    joint_lr_scale: float = 0.1
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO

    def __post_init__(self):
        self.joint_steps = min(self.joint_steps, self.max_steps)

    @property
    def total(self) -> int:
        return self.entropy_steps + self.max_steps

    @property
    def main_steps(self) -> int:
        return self.max_steps - self.joint_steps

    def phase_of(self, step: int) -> str:
        if step < self.entropy_steps:
            return "entropy"
        if step < self.entropy_steps + self.main_steps:
            return "main"
        return "joint"

    def lr_at(self, step: int) -> float:
        phase = self.phase_of(step)
        if phase == "entropy":
            w = min(self.warmup_steps, max(1, self.entropy_steps // 10))
            return self.entropy_lr * warmup_cosine(step, self.entropy_steps, w, self.min_lr_ratio)
        if phase == "main":
            w = min(self.warmup_steps, max(1, self.main_steps // 2))
            return self.lr * warmup_cosine(step - self.entropy_steps, self.main_steps, w, self.min_lr_ratio)
        return self.lr * self.joint_lr_scale

    def state_dict(self) -> dict:
        return asdict(self)
