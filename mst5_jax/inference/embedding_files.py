"""Embedding a text file into `.npy` files in resumable shards (`python -m mst5_jax.encode`).

Input: a UTF-8 text file, one sentence per line (the line ending, `\\n` or `\\r\\n`, and a
leading byte-order mark are removed and nothing else; only `\\n` splits lines), or JSON
Lines with ``field`` (a dotted path such as `meta.text` reaches nested objects).

Output, written in shards of ``shard_size`` sentences:
- `OUT.npy` (default): shards go to `OUT.npy.parts/`; when all are done they are streamed,
  one shard in memory at a time, into a temporary file renamed over `OUT.npy`, and the
  parts removed. An existing `OUT.npy` (with ``overwrite``) is replaced only then.
- sharded: `OUT/` keeps `shard_00000.npy`, `shard_00001.npy`, ... and `index.json`
  (`{"num_sentences", "dim", "dtype", "shards": [{"file", "start", "end"}], ...}`).

Resume: every shard is written atomically, and the parts folder holds a `manifest.json`
describing the job (model, input size and sha256 of its whole content, field, shard size,
max_length, normalisation, precision). Running the same job again skips finished shards;
a different job in the same place is an error that names the changed settings. A job that
fails before writing any shard removes the folder it created, so the corrected command
is not blocked.

Precision: float32 (default), float16, or the sign-bit "binary" / "ubinary" packings of
sentence-transformers (8 dimensions per byte). int8/uint8 scale by the value range of the
batch they are computed on, so they would differ from shard to shard; quantize the
finished float32 file instead.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from mst5_jax.inference.encoder import SentenceEncoder, quantize
from mst5_jax.utils.cli import UserError
from mst5_jax.utils.files import atomic_write, iter_lines, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.json"
PRECISIONS = ("float32", "float16", "binary", "ubinary")


@dataclasses.dataclass
class EncodeJob:
    """One `python -m mst5_jax.encode` job (the flags of the CLI, same names and defaults)."""

    model: str
    input: str
    output: str
    adapter: Optional[str] = None
    step: str = "latest"
    field: Optional[str] = None
    sharded: bool = False
    shard_size: int = 100_000
    chunk_size: int = 8192
    batch_size: int = 64
    max_length: int = 512
    dtype: str = "float32"
    normalize: bool = False
    precision: str = "float32"
    max_shards: Optional[int] = None
    overwrite: bool = False
    allow_empty: bool = False
    progress: bool = True


# ---------------------------------------------------------------------- input
def count_lines(path: pathlib.Path) -> int:
    """Lines in a file: `\\n` count, plus one for a last line without a newline."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


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
    for lineno, text in iter_lines(path):
        if field is None:
            yield text
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from e
        yield _get_field(obj, field, path, lineno)


def input_identity(path: pathlib.Path) -> dict:
    """Path, size and the sha256 of the whole content (streamed): any edit changes it."""
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


# ---------------------------------------------------------------------- shards
def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def _save_npy(path: pathlib.Path, arr: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, arr)


def _shard_done(path: pathlib.Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return arr.shape[0] == rows


def _manifest_conflict(parts: pathlib.Path, job: dict) -> Optional[str]:
    """None if `parts` holds no manifest or this job's; else the message naming what changed."""
    path = parts / MANIFEST
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    changed = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
    if not changed:
        return None
    return (f"{path}: an earlier job with different settings wrote here ({', '.join(changed)} changed: "
            f"{ {k: old.get(k) for k in changed} } -> { {k: job.get(k) for k in changed} }).")


def _postprocess(emb: np.ndarray, precision: str) -> np.ndarray:
    if precision == "float32":
        return emb.astype(np.float32, copy=False)
    if precision == "float16":
        return emb.astype(np.float16)
    return quantize(emb, precision)


def concatenate_shards(parts: pathlib.Path, files: Sequence[str], out: pathlib.Path) -> tuple[int, ...]:
    """Streams the shards, in order, into one `.npy` (atomically; one shard in memory)."""
    shapes = [np.load(parts / f, mmap_mode="r").shape for f in files]
    dtype = np.load(parts / files[0], mmap_mode="r").dtype
    total = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": total}
    with atomic_write(out, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        for name in files:
            f.write(np.ascontiguousarray(np.load(parts / name, mmap_mode="r")).tobytes())
    return total


def load_embeddings(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """A `.npy` file, or a sharded folder (its index.json) concatenated in order."""
    p = pathlib.Path(path)
    if p.is_dir():
        index_path = p / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{p}: no {INDEX} (an unfinished --sharded job?)")
        index = json.loads(index_path.read_text())
        return np.concatenate([np.load(p / s["file"]) for s in index["shards"]])
    return np.load(p, mmap_mode="r" if mmap else None)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="sent", desc="encode")


# ---------------------------------------------------------------------- the job
def _check(job: EncodeJob) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    inp, out = pathlib.Path(job.input), pathlib.Path(job.output)
    if not inp.is_file():
        raise UserError(f"--input {inp}: no such file")
    if out.resolve() == inp.resolve():
        raise UserError(f"--output {out} is the --input file; choose another output path")
    if job.shard_size <= 0 or job.chunk_size <= 0:
        raise UserError(f"--shard_size {job.shard_size} and --chunk_size {job.chunk_size} must be positive")
    if not job.sharded and out.suffix != ".npy":
        raise UserError(f"--output {out}: expected a .npy file (or pass --sharded for a folder of shards)")
    if job.precision not in PRECISIONS:
        raise UserError(f"--precision {job.precision}: expected one of {PRECISIONS} (int8/uint8 depend on "
                        "the batch they are computed on; quantize the finished float32 file instead)")
    if job.field is None and inp.suffix in (".jsonl", ".ndjson"):
        raise UserError(f"--input {inp} looks like JSON Lines: pass --field KEY")
    parts = out if job.sharded else out.with_name(out.name + ".parts")
    return inp, out, parts


def encode_file(job: EncodeJob) -> dict:
    """Runs (or resumes) `job`; returns {"done": bool, "shards": total, "written": new shards}.

    Raises UserError for a bad input, output or job conflict (the message names it).
    """
    inp, out, parts = _check(job)
    if not job.sharded and out.is_file() and not (parts / MANIFEST).is_file() and not job.overwrite:
        raise UserError(f"--output {out} exists (and no unfinished job is there); pass --overwrite to redo it")
    n = count_lines(inp)
    if n == 0 and not job.allow_empty:
        raise UserError(f"--input {inp} is empty; pass --allow_empty to write a (0, dim) array")
    num_shards = max(1, -(-n // job.shard_size))
    manifest = {
        "input": input_identity(inp), "field": job.field, "num_sentences": n, "shard_size": job.shard_size,
        "model": str(job.model), "adapter": None if job.adapter is None else str(job.adapter),
        "step": str(job.step), "dtype": job.dtype, "max_length": job.max_length,
        "normalize": bool(job.normalize), "precision": job.precision,
    }
    conflict = _manifest_conflict(parts, manifest)
    if conflict and job.overwrite and not job.sharded:
        log.warning("%s; --overwrite: discarding that unfinished job", conflict)
        shutil.rmtree(parts)
    elif conflict:
        raise UserError(conflict + " Delete the folder or choose another --output.")

    def rows_of(i: int) -> int:
        return min(job.shard_size, n - i * job.shard_size) if n else 0

    created = not parts.exists()
    written = 0
    try:
        parts.mkdir(parents=True, exist_ok=True)
        todo = [i for i in range(num_shards) if not _shard_done(parts / shard_name(i), rows_of(i))]
        log.info("%s: %d sentences in %d shards of %d; %d already done", inp, n, num_shards, job.shard_size,
                 num_shards - len(todo))
        if todo:
            devices = jax.local_devices()
            enc = SentenceEncoder.from_pretrained(job.model, adapter=job.adapter, dtype=job.dtype, step=job.step,
                                                  devices=devices)
            write_json_atomic(parts / MANIFEST, manifest)
            log.info("encoding on %d device(s): %s", len(devices), devices[0].platform)
            written = _encode_shards(job, enc, inp, parts, n, num_shards, set(todo), rows_of)
    except BaseException:
        if created and parts.is_dir() and not any(parts.glob("shard_*.npy")):
            shutil.rmtree(parts, ignore_errors=True)
        raise

    files = [shard_name(i) for i in range(num_shards)]
    missing = [f for i, f in enumerate(files) if not _shard_done(parts / f, rows_of(i))]
    if missing:
        log.info("stopped with %d of %d shards done; run the same command again to resume",
                 num_shards - len(missing), num_shards)
        return {"done": False, "shards": num_shards, "written": written}
    first = np.load(parts / files[0], mmap_mode="r")
    index = dict(manifest, dim=int(first.shape[1]), dtype=str(first.dtype),
                 shards=[{"file": f, "start": i * job.shard_size, "end": min(n, (i + 1) * job.shard_size)}
                         for i, f in enumerate(files)])
    if job.sharded:
        write_json_atomic(parts / INDEX, index)
        log.info("wrote %d shards and %s", num_shards, parts / INDEX)
    else:
        shape = concatenate_shards(parts, files, out)
        shutil.rmtree(parts)
        log.info("wrote %s %s %s", out, shape, index["dtype"])
    return {"done": True, "shards": num_shards, "written": written}


def _encode_shards(job: EncodeJob, enc: SentenceEncoder, inp: pathlib.Path, parts: pathlib.Path, n: int,
                   num_shards: int, todo: set[int], rows_of) -> int:
    """Encodes the shards in `todo` (reading the input once, in order); returns how many it wrote."""
    bar = _progress(n, job.progress)
    if bar is not None:
        bar.update(n - sum(rows_of(i) for i in todo))
    written, t0, encoded = 0, time.time(), 0
    sentences = read_sentences(inp, job.field)
    for i in range(num_shards):
        chunk = [next(sentences) for _ in range(rows_of(i))]
        if i not in todo:
            continue
        if job.max_shards is not None and written >= job.max_shards:
            break
        embs = []
        for start in range(0, len(chunk), job.chunk_size):
            part = chunk[start : start + job.chunk_size]
            embs.append(enc.encode(part, batch_size=job.batch_size, max_length=job.max_length,
                                   normalize=job.normalize))
            encoded += len(part)
            if bar is not None:
                bar.update(len(part))
        emb = np.concatenate(embs) if embs else np.zeros((0, enc.config.embedding_dim), np.float32)
        _save_npy(parts / shard_name(i), _postprocess(emb, job.precision))
        written += 1
    if bar is not None:
        bar.close()
    dt = time.time() - t0
    log.info("encoded %d sentences in %.1f s (%.0f sentences/s), %d shard(s) written", encoded, dt,
             encoded / max(dt, 1e-9), written)
    return written
