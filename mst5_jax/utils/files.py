"""Reading text, writing files atomically, and hashing content: one helper for each.

- `read_lines`: every text input the project reads line by line (evaluation files,
  sentences to encode or mine). One BOM policy: a UTF-8 byte-order mark at the start of the
  file is dropped, everything else on a line is kept byte for byte.
- `atomic_write`: every file the project writes that a reader may see half-written (run
  files, manifests, embeddings, results). The bytes go to a temporary file in the same
  folder, are fsynced, then renamed over the target, so a reader sees the old file or the
  new one, never a mix. A failure leaves the old file as it was and removes the temporary.
- `sha256_file`: the content hash of one file, streamed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import tempfile
from typing import IO, Any, Iterator, Union

PathLike = Union[str, os.PathLike]

BOM = "\ufeff"
_CHUNK = 1 << 22


def read_lines(path: PathLike) -> list[str]:
    """Lines of a UTF-8 text file without their ``\\n`` / ``\\r\\n`` ending and without a BOM.

    Only ``\\n`` splits lines (a lone ``\\r`` or U+2028 stays inside its line). A final line
    with no newline is kept; the empty string after a final newline is not.
    """
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if text.startswith(BOM):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


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
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
