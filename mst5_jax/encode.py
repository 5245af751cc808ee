"""`python -m mst5_jax.encode`: embed a text file or a JSONL field into `.npy`, resumably.

    python -m mst5_jax.encode --model PATH [--adapter DIR] --input corpus.txt --output corpus.npy
    python -m mst5_jax.encode --model PATH --input data.jsonl --field text --output emb/ --sharded

Input: a UTF-8 text file, one sentence per line (the line ending, `\\n` or `\\r\\n`, is
removed and nothing else; only `\\n` splits lines), or JSON Lines with `--field KEY`
(a dotted path such as `meta.text` reaches nested objects).

Output, written in shards of `--shard_size` sentences:
- `OUT.npy` (default): shards go to `OUT.npy.parts/`, and when all are done they are
  concatenated into `OUT.npy` (a memory map, one shard at a time) and the parts removed.
- `--sharded`: `OUT/` keeps `shard_00000.npy`, `shard_00001.npy`, ... and `index.json`
  (`{"num_sentences", "dim", "dtype", "shards": [{"file", "start", "end"}], ...}`).

Memory stays bounded: one shard of sentences and embeddings at a time (about
shard_size x (dim x 4 bytes + the sentence text)); the model's compiled bucket shapes
are reused across shards.

Resume: every shard is written to a temporary file and renamed into place, and the
parts folder holds a `manifest.json` describing the job (model, input size and head
hash, field, shard size, max_length, normalisation, precision). Running the same
command again skips finished shards; a different job in the same place is an error that
says which setting changed. `--max_shards N` stops after N new shards (for tests and for
splitting a long job into bounded sessions).

Precision: float32 (default), float16, or the sign-bit "binary" / "ubinary" packings of
sentence-transformers (8 dimensions per byte). int8/uint8 scale by the value range of
the batch they are computed on, so they would differ from shard to shard; quantize the
finished float32 file instead.

All local devices are used (data parallel), and a progress bar shows sentences/s.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np

log = logging.getLogger("mst5_jax.encode")

MANIFEST = "manifest.json"
INDEX = "index.json"
CLI_PRECISIONS = ("float32", "float16", "binary", "ubinary")
_HEAD_BYTES = 1 << 20


# ---------------------------------------------------------------------- input
def count_lines(path: pathlib.Path) -> int:
    """Lines in a file: `\\n` count, plus one for a last line without a newline."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _strip_eol(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
    return raw


def _get_field(obj, field: str, path: pathlib.Path, lineno: int) -> str:
    value = obj
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"{path}:{lineno}: no field {field!r} (missing key {key!r})")
        value = value[key]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def read_sentences(path: pathlib.Path, field: Optional[str] = None) -> Iterator[str]:
    """Sentences of a text file (one per line) or of a JSONL field, streamed in order."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = _strip_eol(raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e})") from e
            if field is None:
                yield text
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from e
            yield _get_field(obj, field, path, lineno)


def _input_identity(path: pathlib.Path) -> dict:
    """Size and sha256 of the first MiB: cheap, and catches a swapped or edited input."""
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "head_sha256": head}


# ---------------------------------------------------------------------- shards
def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def _save_atomic(path: pathlib.Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: pathlib.Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _shard_done(path: pathlib.Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return arr.shape[0] == rows


def _check_manifest(parts: pathlib.Path, job: dict) -> None:
    path = parts / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
        if changed:
            raise SystemExit(
                f"{path}: an earlier job with different settings wrote here ({', '.join(changed)} changed: "
                f"{ {k: old.get(k) for k in changed} } -> { {k: job.get(k) for k in changed} }). "
                "Delete the folder or choose another --output.")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, job)


def _postprocess(emb: np.ndarray, precision: str) -> np.ndarray:
    if precision == "float32":
        return emb.astype(np.float32, copy=False)
    if precision == "float16":
        return emb.astype(np.float16)
    from mst5_jax.inference.encoder import quantize

    return quantize(emb, precision)


def concatenate_shards(parts: pathlib.Path, files: Sequence[str], out: pathlib.Path) -> tuple[int, ...]:
    """Writes the shards, in order, into one `.npy` through a memory map (one shard in memory)."""
    shapes = [np.load(parts / f, mmap_mode="r").shape for f in files]
    dtype = np.load(parts / files[0], mmap_mode="r").dtype
    total = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
    tmp = out.with_name(out.name + ".tmp")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=total)
    row = 0
    for f in files:
        arr = np.load(parts / f, mmap_mode="r")
        mm[row : row + len(arr)] = arr
        row += len(arr)
    mm.flush()
    del mm
    os.replace(tmp, out)
    return total


# ---------------------------------------------------------------------- the job
def run(args: argparse.Namespace) -> int:
    import jax

    from mst5_jax.inference.encoder import SentenceEncoder, _progress

    inp = pathlib.Path(args.input)
    if not inp.is_file():
        raise SystemExit(f"--input {inp}: no such file")
    out = pathlib.Path(args.output)
    parts = out if args.sharded else out.with_name(out.name + ".parts")
    if not args.sharded and out.suffix != ".npy":
        raise SystemExit(f"--output {out}: expected a .npy file (or pass --sharded for a folder of shards)")
    if args.precision not in CLI_PRECISIONS:
        raise SystemExit(f"--precision {args.precision}: expected one of {CLI_PRECISIONS} (int8/uint8 depend on "
                         "the batch they are computed on; quantize the finished float32 file instead)")
    field = args.field
    if field is None and inp.suffix in (".jsonl", ".ndjson"):
        raise SystemExit(f"--input {inp} looks like JSON Lines: pass --field KEY")
    if not args.sharded and out.is_file() and not (parts / MANIFEST).is_file():
        if not args.overwrite:
            raise SystemExit(f"--output {out} exists (and no unfinished job is there); pass --overwrite to redo it")
        out.unlink()

    n = count_lines(inp)
    num_shards = max(1, -(-n // args.shard_size))
    job = {
        "input": _input_identity(inp), "field": field, "num_sentences": n, "shard_size": args.shard_size,
        "model": str(args.model), "adapter": None if args.adapter is None else str(args.adapter),
        "step": str(args.step), "dtype": args.dtype, "max_length": args.max_length,
        "normalize": bool(args.normalize), "precision": args.precision,
    }
    _check_manifest(parts, job)
    todo = [i for i in range(num_shards)
            if not _shard_done(parts / shard_name(i), min(args.shard_size, n - i * args.shard_size) if n else 0)]
    log.info("%s: %d sentences in %d shards of %d; %d already done", inp, n, num_shards, args.shard_size,
             num_shards - len(todo))

    if todo:
        devices = jax.local_devices()
        enc = SentenceEncoder.from_pretrained(args.model, adapter=args.adapter, dtype=args.dtype, step=args.step,
                                              devices=devices)
        log.info("encoding on %d device(s): %s", len(devices), devices[0].platform)
        bar = _progress(n, not args.no_progress)
        if bar is not None:
            bar.update(n - sum(min(args.shard_size, n - i * args.shard_size) for i in todo))
        written, t0, encoded = 0, time.time(), 0
        todo_set = set(todo)
        sentences = read_sentences(inp, field)
        for i in range(num_shards):
            rows = min(args.shard_size, n - i * args.shard_size) if n else 0
            chunk = [next(sentences) for _ in range(rows)]
            if i not in todo_set:
                continue
            if args.max_shards is not None and written >= args.max_shards:
                break
            embs = []
            for start in range(0, rows, args.chunk_size):
                part = chunk[start : start + args.chunk_size]
                embs.append(enc.encode(part, batch_size=args.batch_size, max_length=args.max_length,
                                       normalize=args.normalize))
                encoded += len(part)
                if bar is not None:
                    bar.update(len(part))
            emb = np.concatenate(embs) if embs else np.zeros((0, enc.config.embedding_dim), np.float32)
            _save_atomic(parts / shard_name(i), _postprocess(emb, args.precision))
            written += 1
        if bar is not None:
            bar.close()
        dt = time.time() - t0
        log.info("encoded %d sentences in %.1f s (%.0f sentences/s), %d shard(s) written", encoded, dt,
                 encoded / max(dt, 1e-9), written)

    files = [shard_name(i) for i in range(num_shards)]
    missing = [f for i, f in enumerate(files)
               if not _shard_done(parts / f, min(args.shard_size, n - i * args.shard_size) if n else 0)]
    if missing:
        log.info("stopped with %d of %d shards done; run the same command again to resume", num_shards - len(missing),
                 num_shards)
        return 0
    first = np.load(parts / files[0], mmap_mode="r")
    index = dict(job, dim=int(first.shape[1]), dtype=str(first.dtype),
                 shards=[{"file": f, "start": i * args.shard_size, "end": min(n, (i + 1) * args.shard_size)}
                         for i, f in enumerate(files)])
    if args.sharded:
        _write_json_atomic(parts / INDEX, index)
        log.info("wrote %d shards and %s", num_shards, parts / INDEX)
    else:
        shape = concatenate_shards(parts, files, out)
        shutil.rmtree(parts)
        log.info("wrote %s %s %s", out, shape, index["dtype"])
    return 0


def load_embeddings(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """A `.npy` file, or a `--sharded` folder (its index.json) concatenated in order."""
    p = pathlib.Path(path)
    if p.is_dir():
        index_path = p / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{p}: no {INDEX} (an unfinished --sharded job?)")
        index = json.loads(index_path.read_text())
        return np.concatenate([np.load(p / s["file"]) for s in index["shards"]])
    return np.load(p, mmap_mode="r" if mmap else None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mst5_jax.encode", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF, sentence-transformers or training-run directory, or hub id")
    ap.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory")
    ap.add_argument("--step", default="latest", help="for a training run: latest, best or a step number")
    ap.add_argument("--input", required=True, help="text file (one sentence per line) or JSON Lines with --field")
    ap.add_argument("--field", default=None, help="JSONL field holding the text (dotted path for nesting)")
    ap.add_argument("--output", required=True, help="OUT.npy, or a folder with --sharded")
    ap.add_argument("--sharded", action="store_true", help="keep shard_*.npy + index.json instead of one .npy")
    ap.add_argument("--shard_size", type=int, default=100_000, help="sentences per shard (the resume unit)")
    ap.add_argument("--chunk_size", type=int, default=8192,
                    help="sentences sorted and encoded together inside a shard (progress granularity)")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    ap.add_argument("--precision", default="float32", help=f"one of {CLI_PRECISIONS}")
    ap.add_argument("--max_shards", type=int, default=None, help="stop after writing this many new shards")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing finished OUT.npy")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.shard_size <= 0 or args.chunk_size <= 0:
        raise SystemExit("--shard_size and --chunk_size must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from mst5_jax.inference.encoder import LOAD_ERRORS

    try:
        return run(args)
    except LOAD_ERRORS as e:
        print(f"encode: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
