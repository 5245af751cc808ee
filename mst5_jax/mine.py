"""`python -m mst5_jax.mine`: margin-ratio bitext mining between two monolingual corpora.

    python -m mst5_jax.mine --src de.txt --tgt en.txt --model PATH --output pairs.tsv --threshold 1.06
    python -m mst5_jax.mine --src de.txt --tgt en.txt --src_emb de.npy --tgt_emb en.npy --backend faiss

Scoring, backends and tie rules: `mst5_jax.evals.mining` and `mst5_jax.inference.mining`.
`exact` (default) gives the result of the full float64 similarity matrix while holding at
most `--block_elems` similarities at once per worker thread (`--screen` picks the GEMM that
screens them); `faiss` with `--faiss_index Flat` gives
the same pairs, IVF/HNSW indexes are approximate. Timings: docs/USING.md.

Output TSV, one pair per line, best first, with a header:
`score  src_line  tgt_line  src  tgt` (0-based line numbers in the input files).
`--threshold T` keeps pairs with score >= T. `--dedup` mines each distinct sentence
once (the first line holding it), so no text appears twice in the output. The output is
written to a temporary file and renamed when complete; an existing output is refused
unless `--overwrite`, and an output that is one of the inputs is always refused.

Embeddings come from `--src_emb/--tgt_emb` (.npy, or a `python -m mst5_jax.encode
--sharded` folder; float, 2-D, one row per line, finite) or are computed with `--model`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from mst5_jax.evals import mining
from mst5_jax.inference import mining as corpus_mining
from mst5_jax.utils import cli
from mst5_jax.utils.files import read_lines

log = logging.getLogger("mst5_jax.mine")


PROG = "python -m mst5_jax.mine"
EXAMPLE = ("python -m mst5_jax.mine --src de.txt --tgt en.txt --model PATH --output pairs.tsv --threshold 1.06\n"
           "  python -m mst5_jax.mine --src de.txt --tgt en.txt --src_emb de.npy --tgt_emb en.npy --output pairs.tsv")


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(PROG, __doc__, example=EXAMPLE)
    ap.add_argument("--src", required=True, help="source text file, one sentence per line")
    ap.add_argument("--tgt", required=True, help="target text file, one sentence per line")
    ap.add_argument("--output", required=True, help="TSV of mined pairs")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output (once the new one is complete)")
    ap.add_argument("--model", help="encoder (HF, sentence-transformers or run directory) when embeddings are not given")
    ap.add_argument("--adapter", help="PEFT LoRA adapter directory")
    ap.add_argument("--src_emb", help=".npy (or --sharded folder) of the source embeddings, line-aligned")
    ap.add_argument("--tgt_emb", help=".npy (or --sharded folder) of the target embeddings, line-aligned")
    ap.add_argument("--k", type=int, default=4, help="margin neighbourhood size (4 as in LASER/BUCC)")
    ap.add_argument("--threshold", type=float, default=None, help="keep pairs with margin score >= this")
    ap.add_argument("--dedup", action="store_true", help="mine each distinct sentence once")
    ap.add_argument("--backend", default="exact", choices=("exact", "faiss"),
                    help="exact: blocked brute force (float64 scores); faiss: an index (--faiss_index)")
    ap.add_argument("--block_elems", type=int, default=mining.DEFAULT_BLOCK_ELEMS,
                    help="exact backend: float32 similarities held at once (4 bytes each, plus the candidates)")
    ap.add_argument("--screen", default="auto", choices=mining.SCREENS,
                    help="exact backend: precision of the screening GEMM (auto: bfloat16 where the CPU has "
                         "bfloat16 dot instructions and torch is installed); the pairs do not depend on it")
    ap.add_argument("--faiss_index", default="Flat", help="faiss factory string, e.g. Flat, IVF4096,Flat, HNSW32")
    ap.add_argument("--nprobe", type=int, default=16, help="faiss IVF indexes: lists searched per query")
    ap.add_argument("--batch_size", type=int, default=64, help="sentences per batch when encoding with --model")
    ap.add_argument("--max_length", type=int, default=512, help="tokens per sentence when encoding with --model")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar while encoding")
    return ap


def _check_output(args) -> None:
    out = os.path.realpath(args.output)
    for flag in ("src", "tgt", "src_emb", "tgt_emb"):
        given = getattr(args, flag)
        if given and os.path.realpath(given) == out:
            raise cli.UserError(f"--output {args.output} is the --{flag} input; choose another output path")
    if os.path.exists(out) and not args.overwrite:
        raise cli.UserError(f"--output {args.output} exists; pass --overwrite to replace it")


def _embeddings(path: Optional[str], lines: list[str], encoder, args) -> np.ndarray:
    if path:
        from mst5_jax.encode import load_embeddings

        try:
            return corpus_mining.check_embeddings(load_embeddings(path), path, len(lines))
        except corpus_mining.EmbeddingError as e:
            raise cli.UserError(str(e)) from None
    if encoder is None:
        raise cli.UserError("pass --model, or --src_emb and --tgt_emb")
    return encoder.encode(lines, batch_size=args.batch_size, max_length=args.max_length,
                          show_progress_bar=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    cli.setup_logging(args.verbose)
    return cli.run(lambda: _mine(args), PROG, debug=args.debug)


def _mine(args: argparse.Namespace) -> int:
    _check_output(args)
    src_lines, tgt_lines = read_lines(args.src), read_lines(args.tgt)
    encoder = None
    if args.model and not (args.src_emb and args.tgt_emb):
        import jax

        from mst5_jax.inference.encoder import SentenceEncoder

        encoder = SentenceEncoder.from_pretrained(args.model, adapter=args.adapter, devices=jax.local_devices())
    x = _embeddings(args.src_emb, src_lines, encoder, args)
    y = _embeddings(args.tgt_emb, tgt_lines, encoder, args)
    if x.shape[1] != y.shape[1]:
        raise cli.UserError(f"embedding widths differ: {args.src_emb or 'source'} has {x.shape[1]}, "
                         f"{args.tgt_emb or 'target'} has {y.shape[1]}")
    src_keep = corpus_mining.dedup(src_lines) if args.dedup else np.arange(len(src_lines))
    tgt_keep = corpus_mining.dedup(tgt_lines) if args.dedup else np.arange(len(tgt_lines))
    if args.dedup:
        log.info("dedup: %d -> %d source, %d -> %d target sentences", len(src_lines), len(src_keep),
                 len(tgt_lines), len(tgt_keep))
        x, y = x[src_keep], y[tgt_keep]
    t0 = time.time()
    pairs = corpus_mining.mine(x, y, k=args.k, backend=args.backend, block_elems=args.block_elems,
                               faiss_index=args.faiss_index, nprobe=args.nprobe, precision=args.screen)
    pairs = mining.MinedPairs(src=src_keep[pairs.src], trg=tgt_keep[pairs.trg], score=pairs.score)
    n = corpus_mining.write_tsv(args.output, pairs, src_lines, tgt_lines, args.threshold)
    log.info("mined %d x %d in %.1f s (%s); wrote %d of %d pairs%s to %s", len(src_keep), len(tgt_keep),
             time.time() - t0, args.backend, n, len(pairs.score),
             "" if args.threshold is None else f" with score >= {args.threshold}", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
