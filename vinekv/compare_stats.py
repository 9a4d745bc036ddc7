"""Statistics of a method comparison over seeds (pure functions on arrays).

Runs of different methods with the same seed share the training problems' order and the
sampling keys' seed, so methods are compared paired by seed: for per-seed measurements
``a [S]`` and ``b [S]``,

    d_s = a_s - b_s,    mean(d) +- t_{0.975, S-1} * std(d, ddof=1) / sqrt(S)

is the 95% confidence interval of the mean difference. A method's learning curve is the mean
over seeds at each evaluation (runs evaluate at the same update counts); "reaching" a target
means the first evaluation whose mean accuracy is at least the target, read in updates and in
the mean training seconds at that evaluation.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the ``level`` t-interval of ``values [S]`` (half-width NaN for S < 2)."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty [S] array, got shape {values.shape}")
    if values.size < 2:
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return float(values.mean()), float(half)


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the ``level`` t-interval of ``a - b``, paired by seed (``[S]`` each)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired measurements need the same [S] shape, got {a.shape} and {b.shape}")
    return mean_ci(a - b, level)


def curves(runs: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(updates [E], seconds [S, E], values [S, E])`` of ``metric`` over runs that evaluate at the
    same update counts (``run["curve"]``: dicts with ``updates``, ``train_seconds``, ``metric``)."""
    if not runs:
        raise ValueError("no runs")
    points = [[c["updates"] for c in r["curve"]] for r in runs]
    if any(p != points[0] for p in points):
        raise ValueError(f"runs evaluate at different update counts: {points}")
    seconds = np.array([[c["train_seconds"] for c in r["curve"]] for r in runs], np.float64)
    values = np.array([[c[metric] for c in r["curve"]] for r in runs], np.float64)
    return np.asarray(points[0]), seconds, values


def first_reaching(
    updates: np.ndarray, seconds: np.ndarray, mean_curve: np.ndarray, target: float
) -> tuple[int, float] | None:
    """``(updates, seconds)`` of the first evaluation (``[E]`` each) whose ``mean_curve`` value is
    ``>= target``, or None if none is."""
    hits = np.flatnonzero(np.asarray(mean_curve) >= target - 1e-12)
    if hits.size == 0:
        return None
    return int(updates[hits[0]]), float(seconds[hits[0]])
