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
kept greedily 1-to-1. `knn_both` walks the similarity matrix in GEMM blocks of at most
``block_elems`` entries, each computed once for both directions in a screening precision
(bfloat16 where the CPU multiplies it natively, float32 otherwise), keeps every entry
within the GEMM's proven error bound of a row's k best, and rescores only those in
float64, so memory stays bounded for corpora of any size and the result is the one the
float64 matrix gives, whatever the screening precision.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ContextManager, NamedTuple

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


DEFAULT_BLOCK_ELEMS = 1 << 22  # 4M similarities (16 MiB as float32) per block
SCREENS = ("auto", "float32", "bfloat16")  # `knn_both`'s screening GEMM precisions
_GROUP = 16  # entries per group in the cheap k-th-largest lower bound (see `_block_candidates`)
_RESCORE_ROWS = 1 << 11  # candidate pairs rescored in float64 at once (2 x 2k x d x 4 bytes gathered)


class Screen(NamedTuple):
    """A screening GEMM for `knn_both`.

    ``gemm(xs, ys)`` is the float32 block of approximate cosines s between rows ``x[xs]`` and
    ``y[ys]`` (two slices). Each is within ``abs_err + rel_err |s|`` of the cosine c that
    `cosine_matrix` gives. A screen whose GEMM can run on one core per caller says how many
    `workers` to run it on, and `one_core` limits its library to one thread meanwhile; the
    float32 screen leaves threads to the BLAS (one worker).
    """

    precision: str
    gemm: Callable[[slice, slice], np.ndarray]
    abs_err: float
    rel_err: float
    workers: int = 1  # threads `knn_both` runs strips of blocks on, each GEMM on one core ...
    one_core: Callable[[], ContextManager] = contextlib.nullcontext  # ... while this is entered

    def floor(self, lower: np.ndarray) -> np.ndarray:
        """The smallest screened value whose cosine may reach a row's k best, given `lower`
        [r] float32, a lower bound of the row's k-th largest screened value.

        k entries have s >= lower, so cosines >= L = lower - abs_err - rel_err |lower| (the
        bound is monotone in s); an entry's cosine is at most s + abs_err + rel_err |s|, so
        it can reach L only if s >= the returned value (rounded down, so float32
        comparisons keep every such entry).
        """
        v = np.asarray(lower, np.float64)
        low = v - 2 * self.abs_err - (self.rel_err * np.abs(v) if self.rel_err else 0.0)  # L - abs_err
        t = np.where(low >= 0, low / (1 + self.rel_err), low / (1 - self.rel_err))
        return (t - 2.0**-22 - 2.0**-22 * np.abs(t)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _native_bf16_gemm() -> bool:
    """Whether torch is installed and this CPU has bfloat16 dot-product instructions
    (x86 AVX512_BF16 or AMX-BF16, Arm BF16), so a bfloat16 GEMM runs at about twice the
    float32 rate. Read from /proc/cpuinfo (Linux); elsewhere, False."""
    try:
        if importlib.util.find_spec("torch") is None:
            return False
    except (ImportError, ValueError):  # a blocked or half-imported torch
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# Multiply-adds from which "auto" screens in bfloat16 although torch is not imported yet:
# importing it takes about 1.3 s on the 2-core EPYC, what the bfloat16 GEMM saves on about
# 2^38 of them (17k x 17k x 768); below that, and without bfloat16 units, float32 is faster.
BF16_MIN_MACS = 2**38


def resolve_screen(precision: str = "auto", macs: float = float("inf")) -> str:
    """`knn_both`'s screening precision for `macs` multiply-adds (nx ny d). "auto" is
    "bfloat16" where `_native_bf16_gemm` and either torch is already imported or the work
    is at least `BF16_MIN_MACS`; else "float32". Both give the same neighbours and cosines;
    only the speed differs."""
    if precision not in SCREENS:
        raise ValueError(f"screen precision {precision!r}: expected one of {', '.join(SCREENS)}")
    if precision == "auto":
        worth_it = "torch" in sys.modules or macs >= BF16_MIN_MACS
        return "bfloat16" if worth_it and _native_bf16_gemm() else "float32"
    return precision


def _row_norm_max(a: np.ndarray, minus: np.ndarray | None = None) -> float:
    """max_i ||a_i|| (or ||a_i - minus_i||), rounded up past float32 summation error."""
    c = a if minus is None else a - minus
    best = np.einsum("ij,ij->i", c, c).max(initial=np.float32(0))
    return float(np.sqrt(float(best) * (1 + (a.shape[1] + 2) * 2.0**-23)))


def _float32_screen(x32: np.ndarray, y32: np.ndarray) -> Screen:
    """float32 blocks (numpy BLAS). Any float32 dot of length d, in any summation order, is
    within d 2^-24 |x| |y| of the exact one (the products are exact in float64, and each of
    at most d roundings adds 2^-24 of a partial sum); the bound is doubled for margin, plus
    the float32 rounding of the reference cosine."""
    d = x32.shape[1]
    scale = _row_norm_max(x32) * _row_norm_max(y32)
    err = 2 * (d + 2) * 2.0**-24 * max(scale, 1.0) + 2.0**-23
    return Screen("float32", lambda xs, ys: x32[xs] @ y32[ys].T, err, 0.0)


def _bfloat16_screen(x32: np.ndarray, y32: np.ndarray) -> Screen:
    """bfloat16 blocks (torch; oneDNN on x86): x and y rounded once to bfloat16 (x', y'),
    multiplied with float32 accumulation, each result t rounded to bfloat16 (nearest, as
    oneDNN's converters do). With norms taken as each side's largest row, the error against
    the exact x . y, in any summation order, is at most
      |x - x'| |y| + |x'| |y - y'|       (input rounding; the residuals are measured)
      + 2 (d + 2) 2^-24 |x'| |y'|       (float32 accumulation, doubled for margin;
                                        bfloat16 products are exact in float32)
      + d 2^-120                        (denormals flushed to zero, if the unit does)
      + 2^-23                           (the float32 rounding of the reference cosine)
    and, relative to the result, 2^-8 |t| <= 2^-8 / (1 - 2^-8) |s| (bfloat16 keeps 8
    significant bits). For unit rows the absolute part is about 0.003 (float32: 1e-4), so
    more candidates reach the float64 rescoring, at twice the GEMM rate.
    `tests/test_evals_mining.py` checks the bound against float64 on this machine's GEMM."""
    import torch  # noqa: PLC0415 (optional: only where `resolve_screen` chose it or a caller asked)

    d = x32.shape[1]
    xb, yb = torch.from_numpy(x32).to(torch.bfloat16), torch.from_numpy(y32).to(torch.bfloat16)

    def norms(a32: np.ndarray, ab, chunk: int = 1 << 16) -> tuple[float, float, float]:
        """(max |a|, max |a'|, max |a - a'|) over rows, a' = ab in float32 (exact), by row
        chunks so no float32 copy of a whole side is held."""
        out = np.zeros(3)
        for r0 in range(0, len(a32), chunk):
            a, ar = a32[r0 : r0 + chunk], ab[r0 : r0 + chunk].float().numpy()
            out = np.maximum(out, [_row_norm_max(a), _row_norm_max(ar), _row_norm_max(a, minus=ar)])
        return tuple(out.tolist())

    (_, nxr, rx), (ny, nyr, ry) = norms(x32, xb), norms(y32, yb)  # x - x' is exact in float32
    abs_err = rx * ny + nxr * ry + 2 * (d + 2) * 2.0**-24 * nxr * nyr + d * 2.0**-120 + 2.0**-23
    rel_err = 2.0**-8 / (1 - 2.0**-8)

    def gemm(xs: slice, ys: slice) -> np.ndarray:
        return torch.mm(xb[xs], yb[ys].T).float().numpy()

    @contextlib.contextmanager
    def one_core():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    return Screen("bfloat16", gemm, abs_err * (1 + 2.0**-20), rel_err * (1 + 2.0**-20),
                  workers=torch.get_num_threads(), one_core=one_core)


def screen(x32: np.ndarray, y32: np.ndarray, precision: str = "auto") -> Screen:
    """The screening GEMM `knn_both` uses for float32 rows x [nx, d] and y [ny, d]."""
    macs = float(len(x32)) * len(y32) * x32.shape[1]
    return (_bfloat16_screen if resolve_screen(precision, macs) == "bfloat16" else _float32_screen)(x32, y32)


def _merge_top(top: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Updates top [r, k] in place to the k largest of each row of [top, values]; returns its
    smallest per row. When the values of top and those of `values` belong to distinct
    entries, so do the kept ones, and the smallest is a lower bound of the row's k-th largest."""
    k = top.shape[1]
    merged = np.concatenate([top, values], axis=1)
    top[:] = np.partition(merged, merged.shape[1] - k, axis=1)[:, -k:]
    return top.min(axis=1)


def _block_candidates(s: np.ndarray, top: np.ndarray, scr: Screen):
    """The entries of one similarity block s [r, m] that may be among their row's k largest.

    Args:
      s: float32 block (or a transposed view of one, for the other direction).
      top: float32 [r, k], values of k distinct entries per row from the blocks seen so far
        (-inf at first), so its row minimum bounds the row's k-th largest from below;
        updated in place with this block.
      scr: the screen that computed s (its error bound).
    Returns:
      (rows, cols, values) of every entry >= scr.floor(row minimum of top), after the update.

    For blocks wider than k groups of `_GROUP`, the block contributes its k largest group
    maxima (k distinct entries), with groups of strided entries so each maximum is an
    elementwise max of contiguous slices; only groups whose maximum passes the threshold are
    then read entry by entry. So the block is read twice in all (the GEMM's write and one
    max pass), whatever k is. Carrying k values across blocks, not one, makes the bound
    the row's running k-th largest, so later blocks pass few entries.
    """
    r, m = s.shape
    k = top.shape[1]
    g = m // _GROUP
    if g < k:  # a narrow block: its own k largest entries (all of them if fewer), one comparison
        thr = scr.floor(_merge_top(top, np.partition(s, m - k, axis=1)[:, m - k :] if m > k else s))
        rows, cols = np.nonzero(s >= thr[:, None])
        return rows, cols, s[rows, cols]
    gmax = s[:, : g * _GROUP].reshape(r, _GROUP, g).max(axis=1)  # gmax[i, c] = max_j s[i, j g + c]
    thr = scr.floor(_merge_top(top, np.partition(gmax, g - k, axis=1)[:, g - k :]))
    gr, gc = np.nonzero(gmax >= thr[:, None])
    cols = (gc[:, None] + g * np.arange(_GROUP)[None, :]).ravel()
    rows = np.repeat(gr, _GROUP)
    if g * _GROUP < m:  # the last m - g _GROUP columns belong to no group: read them directly
        tr, tc = np.nonzero(s[:, g * _GROUP:] >= thr[:, None])
        rows, cols = np.concatenate([rows, tr]), np.concatenate([cols, tc + g * _GROUP])
    values = s[rows, cols]
    keep = values >= thr[rows]
    return rows[keep], cols[keep], values[keep]


def _finish_direction(q, t, v, lower, k, scr, q_unit, t_unit):
    """Exact top-k per query from float32 candidates (see `knn_both`).

    q, t: int64 [c] query / target indices of candidate pairs; v: float32 [c] their screened
    similarities; every pair with v >= scr.floor(k-th largest v of its query) is present.
    lower: float32 [n_q], a lower bound of each query's k-th largest v (the blocks' final
    one), so candidates below scr.floor(lower) are dropped before anything is sorted.
    Returns (sim [n_q, k] float32, ind [n_q, k] int64) in (descending cosine, ascending index)
    order, cosines as `cosine_matrix` computes them.
    """
    n_q = len(lower)
    keep = v >= scr.floor(lower)[q]
    q, t, v = q[keep], t[keep], v[keep]
    order = np.lexsort((-v, q))
    q, t, v = q[order], t[order], v[order]
    counts = np.bincount(q, minlength=n_q)
    if counts.min() < k:
        raise AssertionError(f"knn: a row has {counts.min()} < {k} candidates (internal error)")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    kth = v[starts + k - 1]  # each query's k-th largest float32 similarity
    keep = v >= scr.floor(kth)[q]
    q, t = q[keep], t[keep]
    exact = np.empty(len(q), np.float32)
    for c0 in range(0, len(q), _RESCORE_ROWS):
        a, b = q_unit[q[c0 : c0 + _RESCORE_ROWS]], t_unit[t[c0 : c0 + _RESCORE_ROWS]]
        exact[c0 : c0 + _RESCORE_ROWS] = np.einsum("cd,cd->c", a, b, dtype=np.float64).astype(np.float32)
    order = np.lexsort((t, -exact, q))
    q, t, exact = q[order], t[order], exact[order]
    counts = np.bincount(q, minlength=n_q)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = (starts[:, None] + np.arange(k)[None, :])  # [n_q, k]
    return exact[pick], t[pick].astype(np.int64)


def knn_both(x_unit: np.ndarray, y_unit: np.ndarray, k: int, block_elems: int = DEFAULT_BLOCK_ELEMS,
             precision: str = "auto"):
    """Exact k nearest neighbours by cosine, in both directions, from one pass over the matrix.

    Each block of the similarity matrix is one screening GEMM (`screen`), computed once and
    read for both directions (x -> y along its rows, y -> x along its columns). A block keeps
    only the entries that can still be among a row's (column's) k best: those at or above
    `Screen.floor` of a lower bound of its k-th largest, a margin that is the GEMM's proven
    error bound twice. The survivors, a few per row per block, are cut against each row's
    final k-th largest and rescored in float64 (`cosine_matrix`'s definition), so
    neighbours, order and cosines are the same as sorting the full float64 matrix: an entry
    left out has an exact cosine strictly below k others, whatever the screening precision.

    Args:
      x_unit: [nx, d] unit rows. y_unit: [ny, d] unit rows.
      k: neighbours per row (clipped to the other side's size).
      block_elems: similarities held at once (4 bytes each) besides the candidates:
        O((nx + ny) k) per block column/row, more where many entries tie at the k-th value.
      precision: the screening GEMM, one of `SCREENS` (see `resolve_screen`); the result
        does not depend on it.
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
    scr = screen(x32, y32, precision)
    kx, ky = min(k, ny), min(k, nx)
    side = max(1, int(np.sqrt(block_elems)))
    bx = min(nx, side, -(-nx // scr.workers))  # at least one strip of rows per worker
    by = min(ny, max(1, block_elems // bx))
    top_x = np.full((nx, kx), -np.inf, np.float32)  # per row, k distinct entries' values so far

    def prune(triples: list, top: np.ndarray, first: int = 0) -> tuple:
        """One (query, target, value) triple of arrays: those still above their query's floor,
        with top the [., k] values of queries first, first + 1, ..."""
        q, t, v = (np.concatenate(a) for a in zip(*triples))
        keep = v >= scr.floor(top.min(axis=1))[q - first]
        return q[keep], t[keep], v[keep]

    def strips(first: int):
        """One worker's share: every `workers`-th strip of bx rows, against all of y. Rows of
        a strip belong to this worker alone; column bounds are its own (merged below). After
        each strip, candidates that its bounds have overtaken are dropped (memory stays
        O((nx + ny) k) rather than growing with the number of blocks)."""
        top_y = np.full((ny, ky), -np.inf, np.float32)
        cx, cy = [], []  # candidate (query, target, value) triples per direction
        for x0 in range(first * bx, nx, scr.workers * bx):
            strip = []
            for y0 in range(0, ny, by):
                s = scr.gemm(slice(x0, x0 + bx), slice(y0, y0 + by))  # [rx, ry] float32
                rx, ry = s.shape
                r, c, v = _block_candidates(s, top_x[x0 : x0 + rx], scr)
                strip.append((r + x0, c + y0, v))
                c, r, v = _block_candidates(s.T, top_y[y0 : y0 + ry], scr)
                cy.append((c + y0, r + x0, v))
            cx.append(prune(strip, top_x[x0 : x0 + bx], x0))
            cy = [prune(cy, top_y)]
        return top_y, cx, cy

    with scr.one_core(), ThreadPoolExecutor(scr.workers) as pool:  # numpy and the GEMM release the GIL
        shares = list(pool.map(strips, range(min(scr.workers, -(-nx // bx)))))
        # Workers saw disjoint rows of x, so their column tops are distinct entries: merge them.
        low_y = _merge_top(np.full((ny, ky), -np.inf, np.float32), np.concatenate([t for t, _, _ in shares], axis=1))
        cx = [c for _, share, _ in shares for c in share]
        cy = [c for _, _, share in shares for c in share]
        x2y = pool.submit(_finish_direction, *(np.concatenate(a) for a in zip(*cx)), top_x.min(axis=1), kx, scr,
                          x32, y32)
        y2x = pool.submit(_finish_direction, *(np.concatenate(a) for a in zip(*cy)), low_y, ky, scr, y32, x32)
        x2y, y2x = x2y.result(), y2x.result()
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


def mine_pairs(x: np.ndarray, y: np.ndarray, k: int = 4, block_elems: int = DEFAULT_BLOCK_ELEMS,
               precision: str = "auto") -> MinedPairs:
    """LASER "mine" mode with max retrieval: union of forward and backward best, greedy 1-to-1.

    Args:
      x: [nx, d] source embeddings (raw; normalised here). y: [ny, d] target embeddings.
      k: neighbourhood size of the margin (4 for BUCC, as LASER/XTREME/mSimCSE).
      block_elems, precision: `knn_both`'s memory bound and screening GEMM (no effect on the result).
    Ties: argmax over a neighbour list takes the earliest (most similar, lowest index);
    the union is sorted by descending score with a stable sort, forward candidates
    (in source order) before backward ones (in target order).
    """
    xu, yu = l2_normalize(x), l2_normalize(y)
    return select_pairs(*knn_both(xu, yu, k, block_elems, precision))


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
