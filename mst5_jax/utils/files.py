"""Reading text, writing files atomically, and hashing content: one helper for each.

- `read_lines`: every text input the project reads line by line (evaluation files,
  sentences to encode or mine). One BOM policy: a UTF-8 byte-order mark at the start of the
  file is dropped, everything else on a line is kept byte for byte.
- `atomic_write`: every file the project writes that a reader may see half-written (run
  files, manifests, embeddings, results). The bytes go to a temporary file in the same
  folder, are fsynced, then renamed over the target, so a reader sees the old file or the
  new one, never a mix. A failure leaves the old file as it was and removes the temporary.
  A ``gs://`` target is staged in a local temporary file and uploaded as one object on
  success (a GCS object write is atomic), so the same guarantee holds.

Every reader here also takes a ``gs://`` URL (through `mst5_jax.utils.fs`).
- `sha256_file`: the content hash of one file, streamed.
- `read_tsv` / `distinct_texts`: tab-separated files in csv.writer's dialect (XNLI, STS).
- `model_files_fingerprint`: the identity of a model or adapter directory (its files' sizes
  and hashes), recorded next to evaluation results.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import IO, Any, Iterator, Sequence, Union

from mst5_jax.utils import fs

PathLike = Union[str, os.PathLike]

BOM = "\ufeff"
_CHUNK = 1 << 22

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # XNLI-MT has fields above csv's 128 KiB default


def iter_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file, streamed, with `read_lines`' policy.

    Memory stays at one line. Invalid UTF-8 is a ValueError naming the file and line.
    """
    with fs.open_file(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e})") from e
            if lineno == 1 and text.startswith(BOM):
                text = text[1:]
            yield lineno, text


def read_lines(path: PathLike) -> list[str]:
    """Lines of a UTF-8 text file without their ``\\n`` / ``\\r\\n`` ending and without a BOM.

    Only ``\\n`` splits lines (a lone ``\\r`` or U+2028 stays inside its line). A final line
    with no newline is kept; the empty string after a final newline is not.
    """
    return [text for _, text in iter_lines(path)]


def fsync_dir(directory: PathLike) -> None:
    """Makes a rename inside `directory` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Opens a temporary sibling of `path` for writing; on success renames it over `path`.

    `mode` is ``"w"`` (text) or ``"wb"`` (bytes). On an exception the temporary is removed
    and `path` keeps its old content (or stays absent).

    Example:
      with atomic_write(out / "run.json") as f:
          json.dump(info, f)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode={mode!r}: expected 'w' or 'wb'")
    if fs.is_remote(path):
        with _remote_atomic_write(path, mode, encoding) as f:
            yield f
        return
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _remote_atomic_write(url: PathLike, mode: str, encoding: str | None) -> Iterator[IO[Any]]:
    """`atomic_write` for gs://: a local temporary, uploaded as one object on success."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        if mode == "wb":
            yield tmp
        else:
            text = io.TextIOWrapper(tmp, encoding=encoding)
            yield text
            text.flush()
            text.detach()
        tmp.seek(0)
        with fs.as_path(url).open("wb") as out:
            shutil.copyfileobj(tmp, out, _CHUNK)


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path: PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """`obj` as indented JSON plus a final newline (``indent=2`` unless given)."""
    dumps_kwargs.setdefault("indent", 2)
    write_text_atomic(path, json.dumps(obj, **dumps_kwargs) + "\n")


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of the whole content of `path`, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with fs.open_file(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


_FULL_HASH_LIMIT = 64 << 20  # files above this are fingerprinted by head + tail + size
_PARTIAL_BYTES = 8 << 20


def model_files_fingerprint(path: PathLike | None) -> dict | None:
    """Identify a model or adapter directory (or file) by the size and sha256 of its files.

    Files above 64 MiB are hashed on their first and last 8 MiB plus their size
    ("sha256_head_tail"), so multi-GB checkpoints are fingerprinted in seconds. A path that
    is not on disk (a hub id) gives {"path": path, "exists": False}; None gives None.
    Returns {"path", "exists": True, "combined_sha256", "files": [{"file", "bytes", hash}]}.
    """
    if path is None:
        return None
    p = pathlib.Path(path)
    if not p.exists():
        return {"path": str(path), "exists": False}
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    entries = []
    for f in files:
        size = f.stat().st_size
        entry: dict[str, Any] = {"file": str(f.relative_to(p)) if p.is_dir() else f.name, "bytes": size}
        if size <= _FULL_HASH_LIMIT:
            entry["sha256"] = sha256_file(f)
        else:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                h.update(fh.read(_PARTIAL_BYTES))
                fh.seek(size - _PARTIAL_BYTES)
                h.update(fh.read(_PARTIAL_BYTES))
            entry["sha256_head_tail"] = h.hexdigest()
        entries.append(entry)
    combined = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return {"path": str(p.resolve()), "exists": True, "combined_sha256": combined, "files": entries}


def read_tsv(path: PathLike, *, quoting: int = csv.QUOTE_MINIMAL,
             errors: str = "surrogateescape") -> Iterator[tuple[int, list[str]]]:
    """(line where the record starts, fields) of a tab-separated file in csv.writer's dialect.

    csv quoting lets a quoted field span lines; ``errors="surrogateescape"`` keeps
    undecodable bytes visible to the caller's checks instead of raising.
    """
    # utf-8-sig: the one BOM policy of this module (a leading BOM is dropped).
    with fs.open_file(path, "rb") as raw, \
            io.TextIOWrapper(raw, encoding="utf-8-sig", errors=errors, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=quoting)
        start = 1
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1


def distinct_texts(files: Sequence[PathLike], columns: int = 2) -> Iterator[str]:
    """The distinct non-empty texts of the first `columns` fields of TSV `files`, in file order.

    Undecodable bytes become U+FFFD. This is the sentence stream the cached SentencePiece
    vocabularies are trained on.
    """
    seen: set[str] = set()
    for f in files:
        for _, row in read_tsv(f, errors="replace"):
            for text in row[:columns]:
                if text and text not in seen:
                    seen.add(text)
                    yield text
