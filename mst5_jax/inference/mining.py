"""Corpus mining around `mst5_jax.evals.mining`: the faiss backend, embedding checks, dedup
and the TSV writer used by `python -m mst5_jax.mine`.

Scoring is LASER's margin ratio (`mst5_jax.evals.mining`). Backends for the k-nearest-
neighbour search, the only part that grows with nx x ny:
- `exact`: `evals.mining.knn_both`, GEMM blocks (bfloat16 or float32, `precision`) computed
  once for both directions, final candidates rescored in float64 (the result of the full
  float64 matrix, whatever the precision).
- `faiss`: a faiss index over each side (a faiss factory string). "Flat" is exhaustive
  (faiss proposes candidates, rescored exactly, so the result equals `exact`); "IVF<n>,Flat"
  or "HNSW32" are approximate and serve millions of lines (`nprobe` trades speed for recall).
"""
from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import numpy as np

from mst5_jax.evals import mining
from mst5_jax.utils.files import atomic_write

RESCORE_ELEMS = 1 << 22  # float32 candidate entries gathered at once when rescoring faiss hits (16 MiB)
_CHECK_ROWS = 1 << 16  # rows scanned at once for NaN/Inf (memory-mapped inputs stay lazy)


class EmbeddingError(ValueError):
    """An embedding file that cannot be mined as it is (the message names the file)."""


def check_embeddings(emb: np.ndarray, path: str, n_lines: Optional[int] = None) -> np.ndarray:
    """Validates one side's embeddings before mining; returns them as float32 [n, d].

    Refuses: packed binary ("binary"/"ubinary", integer or bool dtype) embeddings, since the
    margin ratio needs cosines (re-encode with --precision float32, or unpack with
    ``np.unpackbits(e, axis=1) * 2.0 - 1``); any non-floating dtype; anything not 2-D; a
    row count different from `n_lines`; NaN or Inf (naming the first bad row, 0-based).
    """
    if emb.dtype.kind in "uib":
        raise EmbeddingError(
            f"{path}: dtype {emb.dtype} looks like packed binary ('binary'/'ubinary') embeddings; margin mining "
            "needs float cosines: re-encode with --precision float32, or unpack them first with "
            "np.unpackbits(e, axis=1) * 2.0 - 1")
    if emb.dtype.kind != "f":
        raise EmbeddingError(f"{path}: dtype {emb.dtype} is not a floating-point type (expected float16/32/64)")
    if emb.ndim != 2:
        raise EmbeddingError(f"{path}: shape {emb.shape} is not 2-D [n_sentences, dim]")
    if n_lines is not None and len(emb) != n_lines:
        raise EmbeddingError(f"{path}: {len(emb)} embeddings for {n_lines} lines")
    for r0 in range(0, len(emb), _CHECK_ROWS):
        bad = ~np.isfinite(np.asarray(emb[r0 : r0 + _CHECK_ROWS])).all(axis=1)
        if bad.any():
            row = r0 + int(np.argmax(bad))
            raise EmbeddingError(f"{path}: row {row} (0-based) holds NaN or Inf; "
                                 f"{int(bad.sum())} bad rows in rows {r0}..{r0 + len(bad) - 1}")
    return np.asarray(emb, dtype=np.float32)


def knn_faiss(x_unit: np.ndarray, y_unit: np.ndarray, k: int, index: str = "Flat", nprobe: int = 16,
              train_size: int = 100_000, seed: int = 0):
    """k nearest neighbours by inner product in both directions with faiss.

    Args:
      x_unit: [nx, d] float32 unit rows. y_unit: [ny, d] float32 unit rows.
      k: neighbours per row (clipped to the other side's size).
      index: a faiss index factory string ("Flat", "IVF1024,Flat", "HNSW32", ...).
      nprobe: lists visited per query for IVF indexes.
      train_size: at most this many rows (sampled with `seed`) train an index that needs it.
    Returns:
      x2y_sim [nx, k] float32, x2y_ind [nx, k] int64, y2x_sim [ny, k], y2x_ind [ny, k],
      rows ordered by descending similarity, ties by ascending index (as `mining.knn_both`).
      faiss proposes max(2k, k + 8) candidates per row; their similarities are recomputed
      exactly as `knn_both` computes them, so a Flat index gives the same neighbours and
      bit-identical scores, and an approximate index gives exact scores for what it finds.
    """
    import faiss

    def search(base: np.ndarray, queries: np.ndarray):
        kk = min(k, len(base))
        k_search = min(len(base), max(2 * kk, kk + 8))
        idx = faiss.index_factory(base.shape[1], index, faiss.METRIC_INNER_PRODUCT)
        if not idx.is_trained:
            rng = np.random.default_rng(seed)
            sample = base if len(base) <= train_size else base[np.sort(rng.choice(len(base), train_size, replace=False))]
            idx.train(np.ascontiguousarray(sample))
        try:
            faiss.ParameterSpace().set_index_parameter(idx, "nprobe", nprobe)
        except RuntimeError:  # not an IVF index
            pass
        idx.add(np.ascontiguousarray(base))
        _, ind = idx.search(np.ascontiguousarray(queries), k_search)
        if (ind < 0).any():
            advice = ("(an exhaustive index should not do this: check the embeddings for NaN)"
                      if index.strip().lower() == "flat" else "; raise --nprobe or use --faiss_index Flat")
            raise RuntimeError(f"faiss index {index!r} returned fewer than {k_search} neighbours for some rows {advice}")
        # Rescore the candidates exactly as `mining.knn_both` does (float64 dot of float32
        # unit rows, rounded to float32), then keep the k best by (similarity, -index).
        sim = np.empty(ind.shape, np.float32)
        rows = max(1, RESCORE_ELEMS // (k_search * base.shape[1]))
        for r0 in range(0, len(queries), rows):
            cand = base[ind[r0 : r0 + rows]]  # [rows, k_search, d]
            sim[r0 : r0 + rows] = np.einsum("rd,rkd->rk", queries[r0 : r0 + rows], cand, dtype=np.float64)
        ind = ind.astype(np.int64)
        order = np.lexsort((ind, -sim), axis=-1)[:, :kk]
        return np.take_along_axis(sim, order, 1), np.take_along_axis(ind, order, 1)

    x_unit = np.asarray(x_unit, np.float32)
    y_unit = np.asarray(y_unit, np.float32)
    x2y_sim, x2y_ind = search(y_unit, x_unit)
    y2x_sim, y2x_ind = search(x_unit, y_unit)
    return x2y_sim, x2y_ind, y2x_sim, y2x_ind


def mine(x: np.ndarray, y: np.ndarray, k: int = 4, backend: str = "exact",
         block_elems: int = mining.DEFAULT_BLOCK_ELEMS, faiss_index: str = "Flat", nprobe: int = 16,
         precision: str = "auto") -> mining.MinedPairs:
    """Margin-ratio mining of raw embeddings x [nx, d] against y [ny, d] (see module docstring)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"embeddings must be [n, d] with the same d: got {x.shape} and {y.shape}")
    xu, yu = mining.l2_normalize(x), mining.l2_normalize(y)
    if backend == "exact":
        knn = mining.knn_both(xu, yu, k, block_elems, precision)
    elif backend == "faiss":
        knn = knn_faiss(xu, yu, k, faiss_index, nprobe)
    else:
        raise ValueError(f"backend={backend!r}: expected 'exact' or 'faiss'")
    return mining.select_pairs(*knn)


def dedup(lines: Sequence[str]) -> np.ndarray:
    """Indices [u] of the first occurrence of each distinct line, in order."""
    first: dict[str, int] = {}
    for i, s in enumerate(lines):
        first.setdefault(s, i)
    return np.fromiter(first.values(), dtype=np.int64, count=len(first))


def _tsv_field(s: str) -> str:
    return s.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def write_tsv(path: pathlib.Path, pairs: mining.MinedPairs, src_lines: Sequence[str], tgt_lines: Sequence[str],
              threshold: Optional[float] = None) -> int:
    """Writes `score src_line tgt_line src tgt` rows (tabs in text become spaces); returns the count.

    Written to a temporary sibling and renamed, so `path` is either its old content or complete.
    """
    keep = np.ones(len(pairs.score), bool) if threshold is None else pairs.score >= threshold
    n = 0
    with atomic_write(path) as f:
        f.write("score\tsrc_line\ttgt_line\tsrc\ttgt\n")
        for s, i, j in zip(pairs.score[keep], pairs.src[keep], pairs.trg[keep]):
            f.write(f"{s:.6f}\t{i}\t{j}\t{_tsv_field(src_lines[i])}\t{_tsv_field(tgt_lines[j])}\n")
            n += 1
    return n
