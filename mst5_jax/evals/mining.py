"""Cosine similarity, k-nearest neighbours and LASER margin-ratio bitext mining, in numpy.

Conventions shared by every evaluator:
- Embeddings are cast to float32 and L2-normalised in float32 (`l2_normalize`).
- A cosine is the dot product of two such float32 vectors, accumulated in float64 and
  rounded to float32 (`cosine_matrix`). The float32 products are exact in float64, so
  identical rows give bit-identical scores whatever BLAS kernel ran, and "argmax ties go
  to the lowest index" is a real guarantee rather than luck.
- Neighbour lists are ordered by (descending cosine, ascending index).

Mining (Artetxe and Schwenk 2019, as used by LASER, XTREME and mSimCSE for BUCC):
  margin(x, y) = cos(x, y) / ((knn_mean(x) + knn_mean(y)) / 2)
with knn_mean(x) the mean cosine of x to its k nearest neighbours on the other side.
Each source sentence proposes its best-margin target among its k neighbours (forward),
each target its best source (backward); the union of both lists, sorted by margin, is
kept greedily 1-to-1. `knn_both` walks the similarity matrix in blocks of at most
``block_elems`` entries, so memory stays bounded for corpora of any size.
"""
from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_BLOCK_ELEMS = 1 << 22  # 4M float64 entries (32 MiB) per similarity block


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """[n, d] -> float32 [n, d] with unit rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [n, d], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def cosine_matrix(a_unit: np.ndarray, b_unit: np.ndarray) -> np.ndarray:
    """Cosines [n, m] (float32) between unit rows a [n, d] and b [m, d] (see module doc)."""
    return (a_unit.astype(np.float64) @ b_unit.astype(np.float64).T).astype(np.float32)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine [n] (float32) of raw embeddings a [n, d] and b [n, d]."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings differ in shape: {a.shape} vs {b.shape}")
    a64 = l2_normalize(a).astype(np.float64)
    b64 = l2_normalize(b).astype(np.float64)
    return np.einsum("ij,ij->i", a64, b64).astype(np.float32)


def top1(query_unit: np.ndarray, target_unit: np.ndarray) -> np.ndarray:
    """Index [n] of each query's most similar target; ties go to the lowest index."""
    return np.argmax(cosine_matrix(query_unit, target_unit), axis=1)


def _select_topk(values: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k entries first in (descending value, ascending index) order.

    Args:
      values: [r, m] float32. indices: [r, m] int64 global indices, distinct per row.
    Returns:
      (values [r, k'], indices [r, k']) sorted in that order, k' = min(k, m).
    """
    r, m = values.shape
    if m > k:
        # The k-th largest value, then everything above it plus the lowest-index ties.
        kth = -np.partition(-values, k - 1, axis=1)[:, k - 1 : k]
        keep = values >= kth
        for row in np.nonzero(keep.sum(axis=1) > k)[0]:
            # More ties at the k-th value than free slots: keep the lowest-index ties.
            at = np.nonzero(values[row] == kth[row, 0])[0]
            need = k - int((values[row] > kth[row, 0]).sum())
            keep[row, at[np.argsort(indices[row, at], kind="stable")[need:]]] = False
        rows, cols = np.nonzero(keep)
        values = values[rows, cols].reshape(r, k)
        indices = indices[rows, cols].reshape(r, k)
    order = np.lexsort((indices, -values), axis=-1)
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1)


def _merge(run_v, run_i, new_v, new_i, k):
    if run_v is None:
        return _select_topk(new_v, new_i, k)
    return _select_topk(np.concatenate([run_v, new_v], axis=1), np.concatenate([run_i, new_i], axis=1), k)


def knn_both(x_unit: np.ndarray, y_unit: np.ndarray, k: int, block_elems: int = DEFAULT_BLOCK_ELEMS):
    """k nearest neighbours by cosine, in both directions, in one blocked pass.

    Args:
      x_unit: [nx, d] unit rows. y_unit: [ny, d] unit rows.
      k: neighbours per row (clipped to the other side's size).
      block_elems: at most this many similarities are held at once (plus O((nx+ny) k)).
    Returns:
      x2y_sim [nx, k] float32, x2y_ind [nx, k] int64, y2x_sim [ny, k], y2x_ind [ny, k];
      each row ordered by descending cosine, then ascending index.
    """
    nx, ny = len(x_unit), len(y_unit)
    if nx == 0 or ny == 0:
        raise ValueError(f"knn on an empty side: {nx} x {ny}")
    side = max(1, int(np.sqrt(block_elems)))
    bx = min(nx, side)
    by = min(ny, max(1, block_elems // bx))
    x2y = [[None, None] for _ in range(0, nx, bx)]
    y2x = [[None, None] for _ in range(0, ny, by)]
    for xb, x0 in enumerate(range(0, nx, bx)):
        xs = x_unit[x0 : x0 + bx].astype(np.float64)
        for yb, y0 in enumerate(range(0, ny, by)):
            sim = (xs @ y_unit[y0 : y0 + by].astype(np.float64).T).astype(np.float32)
            rx, ry = sim.shape
            y_idx = np.broadcast_to(np.arange(y0, y0 + ry, dtype=np.int64), (rx, ry))
            x2y[xb] = list(_merge(*x2y[xb], sim, y_idx, k))
            x_idx = np.broadcast_to(np.arange(x0, x0 + rx, dtype=np.int64), (ry, rx))
            y2x[yb] = list(_merge(*y2x[yb], np.ascontiguousarray(sim.T), x_idx, k))
    x2y_sim = np.concatenate([b[0] for b in x2y])
    x2y_ind = np.concatenate([b[1] for b in x2y])
    y2x_sim = np.concatenate([b[0] for b in y2x])
    y2x_ind = np.concatenate([b[1] for b in y2x])
    return x2y_sim, x2y_ind, y2x_sim, y2x_ind


@dataclasses.dataclass(frozen=True)
class MinedPairs:
    """Greedy 1-to-1 mined pairs, sorted by descending margin score.

    src, trg: int64 [p] row indices into x and y. score: float64 [p] margin ratio.
    """

    src: np.ndarray
    trg: np.ndarray
    score: np.ndarray


def margin_candidates(x2y_sim, x2y_ind, y2x_sim, y2x_ind):
    """Margin-ratio scores of every (row, neighbour) candidate, both directions.

    Returns:
      fwd_scores [nx, k] float64 for (i, x2y_ind[i, j]); bwd_scores [ny, k] for (y2x_ind[i, j], i).
    """
    x_mean = x2y_sim.astype(np.float64).mean(axis=1)
    y_mean = y2x_sim.astype(np.float64).mean(axis=1)
    fwd = x2y_sim.astype(np.float64) / ((x_mean[:, None] + y_mean[x2y_ind]) / 2)
    bwd = y2x_sim.astype(np.float64) / ((y_mean[:, None] + x_mean[y2x_ind]) / 2)
    return fwd, bwd


def mine_pairs(x: np.ndarray, y: np.ndarray, k: int = 4, block_elems: int = DEFAULT_BLOCK_ELEMS) -> MinedPairs:
    """LASER "mine" mode with max retrieval: union of forward and backward best, greedy 1-to-1.

    Args:
      x: [nx, d] source embeddings (raw; normalised here). y: [ny, d] target embeddings.
      k: neighbourhood size of the margin (4 for BUCC, as LASER/XTREME/mSimCSE).
    Ties: argmax over a neighbour list takes the earliest (most similar, lowest index);
    the union is sorted by descending score with a stable sort, forward candidates
    (in source order) before backward ones (in target order).
    """
    xu, yu = l2_normalize(x), l2_normalize(y)
    return select_pairs(*knn_both(xu, yu, k, block_elems))


def select_pairs(x2y_sim: np.ndarray, x2y_ind: np.ndarray, y2x_sim: np.ndarray, y2x_ind: np.ndarray) -> MinedPairs:
    """Forward and backward best-margin candidates, their union sorted by score, greedy 1-to-1.

    Takes any neighbour search's k-NN lists ([n, k] cosines and indices, both directions),
    so the exact path (`knn_both`) and faiss (`mst5_jax.mine`) share one rule and tie order.
    """
    fwd, bwd = margin_candidates(x2y_sim, x2y_ind, y2x_sim, y2x_ind)
    fwd_j = np.argmax(fwd, axis=1)
    bwd_j = np.argmax(bwd, axis=1)
    nx, ny = len(x2y_sim), len(y2x_sim)
    src = np.concatenate([np.arange(nx), y2x_ind[np.arange(ny), bwd_j]])
    trg = np.concatenate([x2y_ind[np.arange(nx), fwd_j], np.arange(ny)])
    score = np.concatenate([fwd[np.arange(nx), fwd_j], bwd[np.arange(ny), bwd_j]])
    order = np.argsort(-score, kind="stable")
    used_src = np.zeros(nx, bool)
    used_trg = np.zeros(ny, bool)
    keep = []
    for i in order.tolist():
        s, t = src[i], trg[i]
        if not used_src[s] and not used_trg[t]:
            used_src[s] = used_trg[t] = True
            keep.append(i)
    keep = np.asarray(keep, dtype=np.int64)
    return MinedPairs(src=src[keep].astype(np.int64), trg=trg[keep].astype(np.int64), score=score[keep])


@dataclasses.dataclass(frozen=True)
class ThresholdResult:
    """Precision, recall and F1 (percent) of the candidates with score >= threshold."""

    threshold: float
    precision: float
    recall: float
    f1: float
    num_extracted: int
    num_correct: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def prf(num_extracted: int, num_correct: int, num_gold: int) -> tuple[float, float, float]:
    """(precision, recall, F1) in percent; 0 where undefined."""
    if num_correct == 0:
        return 0.0, 0.0, 0.0
    p = num_correct / num_extracted
    r = num_correct / num_gold
    return 100 * p, 100 * r, 100 * 2 * p * r / (p + r)


def apply_threshold(scores: np.ndarray, correct: np.ndarray, num_gold: int, threshold: float) -> ThresholdResult:
    """Score the candidates with ``score >= threshold`` against ``num_gold`` gold pairs.

    scores: float [c]; correct: bool [c], whether each candidate is a gold pair.
    """
    sel = np.asarray(scores) >= threshold
    n_ext, n_cor = int(sel.sum()), int(np.asarray(correct)[sel].sum())
    p, r, f = prf(n_ext, n_cor, num_gold)
    return ThresholdResult(float(threshold), p, r, f, n_ext, n_cor)


def optimal_threshold(scores: np.ndarray, correct: np.ndarray, num_gold: int) -> ThresholdResult:
    """The threshold with the highest F1 on these candidates (the "oracle" BUCC threshold).

    Only cuts between distinct score values are considered, so the reported F1 is the F1
    of exactly the set ``score >= threshold``. The threshold is the midpoint between the
    lowest kept score and the next lower one (LASER's convention), or the lowest score
    itself when everything is kept. Among equal F1s the highest threshold wins. With no
    correct candidate the F1 is 0 and the threshold is above every score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if len(scores) == 0 or not correct.any():
        top = float(scores.max()) + 1.0 if len(scores) else 0.0
        return apply_threshold(scores, correct, num_gold, top)
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    n_cor = np.cumsum(c)
    n_ext = np.arange(1, len(s) + 1)
    # A cut after position i is valid only where the next score is strictly lower.
    valid = np.append(s[1:] < s[:-1], True)
    f1 = np.where(valid & (n_cor > 0), 2 * n_cor / (n_ext + num_gold), -1.0)
    best = int(np.argmax(f1))
    thr = s[best]
    if best + 1 < len(s) and s[best + 1] < (s[best] + s[best + 1]) / 2:
        thr = (s[best] + s[best + 1]) / 2
    return apply_threshold(scores, correct, num_gold, float(thr))
