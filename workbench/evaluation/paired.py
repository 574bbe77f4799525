"""Statistics for comparing models on the same items: a mean with its interval, a paired bootstrap interval
of a per-item difference, and McNemar's exact test for paired right/wrong answers.

Two models scored on the same problems differ item by item much less than their scores' own spread suggests
(easy problems are easy for both), so a paired comparison detects differences that two overlapping
per-model intervals hide.
"""
import math

import numpy as np

from workbench.evaluation.table import Z95

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the same resamples in every run: a rerun reports the same interval


def mean_interval(values, z: float = Z95) -> dict:
    """{"mean", "low", "high", "n"}: the mean with its normal-approximation 95% interval (mean ± z·s/√n, s the
    sample standard deviation); the interval is NaN with fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": 1}
    half = z * float(x.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def paired_bootstrap(a, b, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95) -> dict:
    """{"difference", "low", "high", "n"}: the mean of a_i - b_i over paired items and its percentile bootstrap
    interval (items resampled with replacement, `resamples` times, from a fixed seed)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need two equal-length lists, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        return {"difference": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    d = a - b
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"difference": float(d.mean()), "low": float(low), "high": float(high), "n": n}


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair coin flips: twice the smaller tail, at most 1."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mcnemar_exact(a_correct, b_correct) -> dict:
    """McNemar's exact test of paired right/wrong answers: {"a_only", "b_only" (discordant pairs), "p", "n"}.

    Only the discordant items tell the models apart; under "equally good" each is a fair coin, so
    p = the two-sided binomial probability of a split at least as uneven as the one seen.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired answers need two equal-length lists, got {len(a_correct)} and {len(b_correct)}")
    a_only = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    b_only = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    return {"a_only": a_only, "b_only": b_only, "p": binomial_two_sided_p(a_only, a_only + b_only),
            "n": len(a_correct)}
