"""`python -m mst5_jax.mine`: margin-ratio bitext mining between two monolingual corpora.

    python -m mst5_jax.mine --src de.txt --tgt en.txt --model PATH --output pairs.tsv --threshold 1.06
    python -m mst5_jax.mine --src de.txt --tgt en.txt --src_emb de.npy --tgt_emb en.npy --backend faiss

Scoring is LASER's margin ratio (Artetxe and Schwenk 2019), as in BUCC evaluation
(`mst5_jax.evals.mining`): margin(x, y) = cos(x, y) / ((knn_x + knn_y) / 2), knn_* the
mean cosine to the k nearest neighbours on the other side. Every source proposes its
best-margin target among its k neighbours, every target its best source; the union,
sorted by score, is kept greedily one-to-one.

Backends for the k-nearest-neighbour search, the only part that grows with nx x ny:
- `exact` (default): `mining.knn_both`, blocks of the similarity matrix (float64 dot
  products of float32 unit vectors), at most `--block_elems` similarities held at once.
  Memory is the two embedding matrices and their unit-normalised copies, plus
  O((nx + ny) k) plus one block: 100k x 100k 768-d peaks at 1.35 GB where the full
  similarity matrix would be 40 GB (float32); see docs/USING.md.
- `faiss`: a faiss index over each side (`--faiss_index`, a faiss factory string).
  "Flat" is exhaustive (the same result as `exact`: faiss proposes candidates, which are
  rescored exactly);
  "IVF<n>,Flat" or "HNSW32" are approximate and serve millions of lines
  (`--nprobe` trades speed for recall).

Output TSV, one pair per line, best first, with a header:
`score  src_line  tgt_line  src  tgt` (0-based line numbers in the input files).
`--threshold T` keeps pairs with score >= T. `--dedup` mines each distinct sentence
once (the first line holding it), so no text appears twice in the output.

Embeddings come from `--src_emb/--tgt_emb` (.npy, or a `python -m mst5_jax.encode
--sharded` folder) or are computed with `--model`.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time
from typing import Optional, Sequence

import numpy as np

from mst5_jax.evals import mining
from mst5_jax.utils.files import read_lines

log = logging.getLogger("mst5_jax.mine")

RESCORE_ELEMS = 1 << 22  # float64 candidate entries gathered at once when rescoring faiss hits (32 MiB)


# ---------------------------------------------------------------------- neighbour search
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
            raise RuntimeError(f"faiss index {index!r} returned fewer than {k_search} neighbours for some rows; "
                               "raise --nprobe or use a Flat index")
        # Rescore the candidates exactly as `mining.knn_both` does (float64 dot of float32
        # unit rows, rounded to float32), then keep the k best by (similarity, -index).
        sim = np.empty(ind.shape, np.float32)
        rows = max(1, RESCORE_ELEMS // (k_search * base.shape[1]))
        for r0 in range(0, len(queries), rows):
            q = queries[r0 : r0 + rows].astype(np.float64)
            cand = base[ind[r0 : r0 + rows]].astype(np.float64)  # [rows, k_search, d]
            sim[r0 : r0 + rows] = np.einsum("rd,rkd->rk", q, cand).astype(np.float32)
        ind = ind.astype(np.int64)
        order = np.lexsort((ind, -sim), axis=-1)[:, :kk]
        return np.take_along_axis(sim, order, 1), np.take_along_axis(ind, order, 1)

    x_unit = np.asarray(x_unit, np.float32)
    y_unit = np.asarray(y_unit, np.float32)
    x2y_sim, x2y_ind = search(y_unit, x_unit)
    y2x_sim, y2x_ind = search(x_unit, y_unit)
    return x2y_sim, x2y_ind, y2x_sim, y2x_ind


def mine(x: np.ndarray, y: np.ndarray, k: int = 4, backend: str = "exact",
         block_elems: int = mining.DEFAULT_BLOCK_ELEMS, faiss_index: str = "Flat", nprobe: int = 16
         ) -> mining.MinedPairs:
    """Margin-ratio mining of raw embeddings x [nx, d] against y [ny, d] (see module docstring)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"embeddings must be [n, d] with the same d: got {x.shape} and {y.shape}")
    xu, yu = mining.l2_normalize(x), mining.l2_normalize(y)
    if backend == "exact":
        knn = mining.knn_both(xu, yu, k, block_elems)
    elif backend == "faiss":
        knn = knn_faiss(xu, yu, k, faiss_index, nprobe)
    else:
        raise ValueError(f"backend={backend!r}: expected 'exact' or 'faiss'")
    return mining.select_pairs(*knn)


# ---------------------------------------------------------------------- text and files
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
    """Writes `score src_line tgt_line src tgt` rows (tabs in text become spaces); returns the count."""
    keep = np.ones(len(pairs.score), bool) if threshold is None else pairs.score >= threshold
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("score\tsrc_line\ttgt_line\tsrc\ttgt\n")
        for s, i, j in zip(pairs.score[keep], pairs.src[keep], pairs.trg[keep]):
            f.write(f"{s:.6f}\t{i}\t{j}\t{_tsv_field(src_lines[i])}\t{_tsv_field(tgt_lines[j])}\n")
            n += 1
    return n


def _embeddings(path: Optional[str], lines: list[str], encoder, args) -> np.ndarray:
    if path:
        from mst5_jax.encode import load_embeddings

        emb = np.asarray(load_embeddings(path), dtype=np.float32)
        if len(emb) != len(lines):
            raise SystemExit(f"{path}: {len(emb)} embeddings for {len(lines)} lines")
        return emb
    if encoder is None:
        raise SystemExit("pass --model, or --src_emb and --tgt_emb")
    return encoder.encode(lines, batch_size=args.batch_size, max_length=args.max_length,
                          show_progress_bar=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mst5_jax.mine", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="source text file, one sentence per line")
    ap.add_argument("--tgt", required=True, help="target text file, one sentence per line")
    ap.add_argument("--output", required=True, help="TSV of mined pairs")
    ap.add_argument("--model", help="encoder (HF, sentence-transformers or run directory) when embeddings are not given")
    ap.add_argument("--adapter", help="PEFT LoRA adapter directory")
    ap.add_argument("--src_emb", help=".npy (or --sharded folder) of the source embeddings, line-aligned")
    ap.add_argument("--tgt_emb", help=".npy (or --sharded folder) of the target embeddings, line-aligned")
    ap.add_argument("--k", type=int, default=4, help="margin neighbourhood size (4 as in LASER/BUCC)")
    ap.add_argument("--threshold", type=float, default=None, help="keep pairs with margin score >= this")
    ap.add_argument("--dedup", action="store_true", help="mine each distinct sentence once")
    ap.add_argument("--backend", default="exact", choices=("exact", "faiss"))
    ap.add_argument("--block_elems", type=int, default=mining.DEFAULT_BLOCK_ELEMS,
                    help="exact backend: similarities held at once (memory = 8 bytes x this, plus the top-k)")
    ap.add_argument("--faiss_index", default="Flat", help="faiss factory string, e.g. Flat, IVF4096,Flat, HNSW32")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--no_progress", action="store_true")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    src_lines, tgt_lines = read_lines(args.src), read_lines(args.tgt)
    encoder = None
    if args.model and not (args.src_emb and args.tgt_emb):
        import jax

        from mst5_jax.inference.encoder import SentenceEncoder

        encoder = SentenceEncoder.from_pretrained(args.model, adapter=args.adapter, devices=jax.local_devices())
    x = _embeddings(args.src_emb, src_lines, encoder, args)
    y = _embeddings(args.tgt_emb, tgt_lines, encoder, args)
    src_keep = dedup(src_lines) if args.dedup else np.arange(len(src_lines))
    tgt_keep = dedup(tgt_lines) if args.dedup else np.arange(len(tgt_lines))
    if args.dedup:
        log.info("dedup: %d -> %d source, %d -> %d target sentences", len(src_lines), len(src_keep),
                 len(tgt_lines), len(tgt_keep))
    t0 = time.time()
    pairs = mine(x[src_keep] if args.dedup else x, y[tgt_keep] if args.dedup else y, k=args.k, backend=args.backend, block_elems=args.block_elems,
                 faiss_index=args.faiss_index, nprobe=args.nprobe)
    pairs = mining.MinedPairs(src=src_keep[pairs.src], trg=tgt_keep[pairs.trg], score=pairs.score)
    n = write_tsv(pathlib.Path(args.output), pairs, src_lines, tgt_lines, args.threshold)
    log.info("mined %d x %d in %.1f s (%s); wrote %d of %d pairs%s to %s", len(src_keep), len(tgt_keep),
             time.time() - t0, args.backend, n, len(pairs.score),
             "" if args.threshold is None else f" with score >= {args.threshold}", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
