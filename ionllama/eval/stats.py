"""Confidence intervals for accuracies measured on n examples."""
from __future__ import annotations

import math


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial proportion (sensible at 0 %, 100 % and small n).
    n = 0 gives the uninformative (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} outside 0..n={n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamp the float noise at the ends so lo <= p <= hi holds exactly at 0 % and 100 %
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


def accuracy_record(correct: int, n: int) -> dict:
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": (correct / n) if n else None, "ci95": [lo, hi]}
