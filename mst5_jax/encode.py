"""`python -m mst5_jax.encode`: embed a text file or a JSONL field into `.npy`, resumably.

    python -m mst5_jax.encode --model PATH [--adapter DIR] --input corpus.txt --output corpus.npy
    python -m mst5_jax.encode --model PATH --input data.jsonl --field text --output emb/ --sharded

Sentences reach the model exactly as in the file, without the line ending. The output is
written in shards that a rerun of the same command resumes (`--max_shards N` stops after N
new shards); `mst5_jax.inference.embedding_files` describes the files, the manifest and
the resume rules. An existing output is replaced only with `--overwrite`, and only once the
new one is complete. An empty input is an error unless `--allow_empty`. All local devices
are used (data parallel), and a progress bar shows sentences/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from mst5_jax.inference.embedding_files import PRECISIONS, EncodeJob, encode_file, load_embeddings, read_sentences
from mst5_jax.utils import cli

__all__ = ["main", "load_embeddings", "read_sentences"]  # the latter two: docs/USING.md, mine

PROG = "python -m mst5_jax.encode"
EXAMPLE = ("python -m mst5_jax.encode --model PATH --input corpus.txt --output corpus.npy\n"
           "  python -m mst5_jax.encode --model PATH --input data.jsonl --field text --output emb/ --sharded")


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(PROG, __doc__, example=EXAMPLE)
    cli.add_model_flags(ap)
    ap.add_argument("--input", required=True, help="text file (one sentence per line) or JSON Lines with --field")
    ap.add_argument("--field", default=None, help="JSONL field holding the text (dotted path for nesting)")
    ap.add_argument("--output", required=True, help="OUT.npy, or a folder with --sharded")
    ap.add_argument("--sharded", action="store_true", help="keep shard_*.npy + index.json instead of one .npy")
    ap.add_argument("--shard_size", type=int, default=100_000, help="sentences per shard (the resume unit)")
    ap.add_argument("--chunk_size", type=int, default=8192,
                    help="sentences sorted and encoded together inside a shard (progress granularity)")
    ap.add_argument("--batch_size", type=int, default=64, help="sentences per batch")
    ap.add_argument("--max_length", type=int, default=512, help="tokens per sentence incl. EOS; longer is truncated")
    ap.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    ap.add_argument("--precision", default="float32", help=f"one of {PRECISIONS}")
    ap.add_argument("--max_shards", type=int, default=None, help="stop after writing this many new shards")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing finished OUT.npy")
    ap.add_argument("--allow_empty", action="store_true", help="an empty input gives a (0, dim) array")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    return ap


def _encode(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(EncodeJob)}
    options = {k: v for k, v in vars(args).items() if k in fields}
    encode_file(EncodeJob(**options, progress=not args.no_progress))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    cli.setup_logging(args.verbose)
    return cli.run(lambda: _encode(args), PROG, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
