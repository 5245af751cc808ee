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
kept greedily 1-to-1. `knn_both` walks the similarity matrix in float32 GEMM blocks of at
most ``block_elems`` entries, each computed once for both directions, and rescores only
the final candidates in float64, so memory stays bounded for corpora of any size and the
result is the one the float64 matrix gives.
"""
from __future__ import annotations

import dataclasses

import numpy as np



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


DEFAULT_BLOCK_ELEMS = 1 << 22  # 4M float32 similarities (16 MiB) per block
_GROUP = 16  # entries per group in the cheap k-th-largest lower bound (see `_block_candidates`)
_RESCORE_ROWS = 1 << 11  # candidate pairs rescored in float64 at once (2 x 2k x d x 8 bytes: cache-sized)


def _block_candidates(s: np.ndarray, lower: np.ndarray, k: int, eps: np.float32):
    """The entries of one similarity block s [r, m] that may be among their row's k largest.

    Args:
      s: float32 block (or a transposed view of one, for the other direction).
      lower: float32 [r], a lower bound of each row's k-th largest over the blocks seen so
        far (-inf at first); updated in place with this block.
      k, eps: neighbours per row and the float32 GEMM error bound (see `knn_both`).
    Returns:
      (rows, cols, values) of every entry >= lower - 2 eps, after the update.

    For blocks wider than k groups of `_GROUP`, the bound is the k-th largest of the group
    maxima (k distinct groups each hold an entry >= it), with groups of strided entries so
    each maximum is an elementwise max of contiguous slices; only groups whose maximum
    passes the threshold are then read entry by entry. So the block is read twice in all
    (the GEMM's write and one max pass), whatever k is.
    """
    r, m = s.shape
    g = m // _GROUP
    if g < k:  # a narrow block: its exact k-th largest (if it has k columns), one comparison
        if m >= k:
            np.maximum(lower, np.partition(s, m - k, axis=1)[:, m - k], out=lower)
        rows, cols = np.nonzero(s >= (lower - 2 * eps)[:, None])
        return rows, cols, s[rows, cols]
    gmax = s[:, : g * _GROUP].reshape(r, _GROUP, g).max(axis=1)  # gmax[i, c] = max_j s[i, j g + c]
    np.maximum(lower, np.partition(gmax, g - k, axis=1)[:, g - k], out=lower)
    thr = lower - 2 * eps
    gr, gc = np.nonzero(gmax >= thr[:, None])
    cols = (gc[:, None] + g * np.arange(_GROUP)[None, :]).ravel()
    rows = np.repeat(gr, _GROUP)
    if g * _GROUP < m:  # the last m - g _GROUP columns belong to no group: read them directly
        tr, tc = np.nonzero(s[:, g * _GROUP:] >= thr[:, None])
        rows, cols = np.concatenate([rows, tr]), np.concatenate([cols, tc + g * _GROUP])
    values = s[rows, cols]
    keep = values >= thr[rows]
    return rows[keep], cols[keep], values[keep]


def _finish_direction(q, t, v, lower, k, eps, q_unit, t_unit):
    """Exact top-k per query from float32 candidates (see `knn_both`).

    q, t: int64 [c] query / target indices of candidate pairs; v: float32 [c] their float32
    GEMM similarities; every pair with v >= (k-th largest v of its query) - 2 eps is present.
    lower: float32 [n_q], a lower bound of each query's k-th largest v (the blocks' final
    one), so candidates below lower - 2 eps are dropped before anything is sorted.
    Returns (sim [n_q, k] float32, ind [n_q, k] int64) in (descending cosine, ascending index)
    order, cosines as `cosine_matrix` computes them.
    """
    n_q = len(lower)
    keep = v >= lower[q] - 2 * eps
    q, t, v = q[keep], t[keep], v[keep]
    order = np.lexsort((-v, q))
    q, t, v = q[order], t[order], v[order]
    counts = np.bincount(q, minlength=n_q)
    if counts.min() < k:
        raise AssertionError(f"knn: a row has {counts.min()} < {k} candidates (internal error)")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    kth = v[starts + k - 1]  # each query's k-th largest float32 similarity
    keep = v >= kth[q] - 2 * eps
    q, t = q[keep], t[keep]
    exact = np.empty(len(q), np.float32)
    for c0 in range(0, len(q), _RESCORE_ROWS):
        a = q_unit[q[c0 : c0 + _RESCORE_ROWS]].astype(np.float64)
        b = t_unit[t[c0 : c0 + _RESCORE_ROWS]].astype(np.float64)
        exact[c0 : c0 + _RESCORE_ROWS] = np.einsum("cd,cd->c", a, b).astype(np.float32)
    order = np.lexsort((t, -exact, q))
    q, t, exact = q[order], t[order], exact[order]
    counts = np.bincount(q, minlength=n_q)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = (starts[:, None] + np.arange(k)[None, :])  # [n_q, k]
    return exact[pick], t[pick].astype(np.int64)


def knn_both(x_unit: np.ndarray, y_unit: np.ndarray, k: int, block_elems: int = DEFAULT_BLOCK_ELEMS):
    """Exact k nearest neighbours by cosine, in both directions, from one pass over the matrix.

    Each block of the similarity matrix is one float32 GEMM, computed once and read for both
    directions (x -> y along its rows, y -> x along its columns). A block keeps only the
    entries that can still be among a row's (column's) k best: those within 2 eps of a lower
    bound of its k-th largest, where eps bounds the float32 GEMM's error against the float64
    cosine (|error| <= d 2^-24 |x| |y| for any summation order, plus the float32 rounding).
    The survivors, about k per row per block, are cut to those within 2 eps of each row's
    final k-th largest and rescored in float64 (`cosine_matrix`'s definition), so neighbours,
    order and cosines are the same as sorting the full float64 matrix: an entry left out is
    at least 2 eps below k entries, so its exact cosine is strictly below the k-th best.

    Args:
      x_unit: [nx, d] unit rows. y_unit: [ny, d] unit rows.
      k: neighbours per row (clipped to the other side's size).
      block_elems: float32 similarities held at once (4 bytes each) besides the candidates:
        O((nx + ny) k) per block column/row, more where many entries tie at the k-th value.
    Returns:
      x2y_sim [nx, k] float32, x2y_ind [nx, k] int64, y2x_sim [ny, k], y2x_ind [ny, k];
      each row ordered by descending cosine, then ascending index.
    """
    x32 = np.ascontiguousarray(x_unit, dtype=np.float32)
    y32 = np.ascontiguousarray(y_unit, dtype=np.float32)
    nx, ny = len(x32), len(y32)
    if nx == 0 or ny == 0:
        raise ValueError(f"knn on an empty side: {nx} x {ny}")
    if x32.ndim != 2 or y32.ndim != 2 or x32.shape[1] != y32.shape[1]:
        raise ValueError(f"knn needs [n, d] rows of one width: got {x32.shape} and {y32.shape}")
    d = x32.shape[1]
    # The largest row norms (squared norms by einsum: a fraction of np.linalg.norm's time).
    scale = float(np.sqrt(np.einsum("ij,ij->i", x32, x32).max() * np.einsum("ij,ij->i", y32, y32).max()))
    # Twice the worst-case float32 dot-product error bound, plus float32 rounding of the result.
    eps = np.float32(2 * (d + 2) * 2.0**-24 * max(scale, 1.0) + 2.0**-23)
    kx, ky = min(k, ny), min(k, nx)
    side = max(1, int(np.sqrt(block_elems)))
    bx = min(nx, side)
    by = min(ny, max(1, block_elems // bx))
    run_x = np.full(nx, -np.inf, np.float32)  # lower bounds of each row's k-th largest so far
    run_y = np.full(ny, -np.inf, np.float32)
    cx, cy = [], []  # candidate (query, target, value) triples per direction
    for x0 in range(0, nx, bx):
        xs = x32[x0 : x0 + bx]
        for y0 in range(0, ny, by):
            s = xs @ y32[y0 : y0 + by].T  # [rx, ry] float32
            rx, ry = s.shape
            r, c, v = _block_candidates(s, run_x[x0 : x0 + rx], kx, eps)
            cx.append((r + x0, c + y0, v))
            c, r, v = _block_candidates(s.T, run_y[y0 : y0 + ry], ky, eps)
            cy.append((c + y0, r + x0, v))
    x2y = _finish_direction(*(np.concatenate(a) for a in zip(*cx)), run_x, kx, eps, x32, y32)
    y2x = _finish_direction(*(np.concatenate(a) for a in zip(*cy)), run_y, ky, eps, y32, x32)
    return (*x2y, *y2x)


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
