"""Scalar metrics shared by the evaluators: Spearman correlation and top-1 retrieval."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mst5_jax.evals.mining import l2_normalize, top1


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks [n] (float64), ties sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # Start index of each run of equal values, and the run each sorted element is in.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho x 100: the Pearson correlation of average ranks. NaN if a side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if len(ra) != len(rb):
        raise ValueError(f"spearman: lengths differ ({len(ra)} vs {len(rb)})")
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float(100 * (ra * rb).sum() / denom) if denom > 0 else float("nan")


def top1_accuracy(query: np.ndarray, target: np.ndarray) -> float:
    """Percent of queries i whose cosine argmax among the targets is row i."""
    if len(query) != len(target):
        raise ValueError(f"top1_accuracy: {len(query)} queries vs {len(target)} targets")
    pred = top1(l2_normalize(query), l2_normalize(target))
    return float(100 * np.mean(pred == np.arange(len(query))))


def mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the values, or None if the list is empty or holds a None."""
    if len(values) == 0 or any(v is None for v in values):
        return None
    return float(np.mean(values))
