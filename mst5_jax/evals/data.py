"""Finding, reading and fingerprinting the evaluation files.

Every reader returns the text exactly as stored, minus the line ending (``\\n`` or
``\\r\\n``) and minus a leading UTF-8 byte-order mark: no stripping, no Unicode
normalisation. Some STS17 lines carry stray spaces, and stripping them moves scores.

``str.splitlines`` is never used: it also splits on ``\\x0b``, ``\\x1c``, ``\\x85``,
``\\u2028`` and friends, which occur inside sentences of the multilingual files.

Each evaluator records the files it read through a `FileLog`, which turns into the
``"meta"`` entry of its result (paths, sizes, sha256, date, package versions).
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import os
import pathlib
import platform
import sys
from typing import Iterable, Optional

from mst5_jax.utils import fs
from mst5_jax.utils.files import read_lines, sha256_file  # noqa: F401  (re-exported for the evaluators)

PathLike = str | os.PathLike



def resolve_dataset_dir(data_dir: PathLike, subdir: str, marker: str) -> fs.AnyPath:
    """Return the folder that holds a dataset, given the data root or the folder itself.

    Args:
      data_dir: either the data root (holding ``subdir``) or the dataset folder itself.
      subdir: the dataset's folder under the data root, e.g. ``"tatoeba"`` or
        ``"chinese_sts/LCQMC"``.
      marker: a file name (relative to the dataset folder) whose presence identifies it.

    Raises:
      FileNotFoundError: naming every path tried.
    """
    root = fs.as_path(data_dir)
    parts = pathlib.PurePosixPath(subdir).parts
    # data root, then each shorter tail of subdir (e.g. chinese_sts/LCQMC, LCQMC), then data_dir.
    candidates = [root.joinpath(*parts[i:]) for i in range(len(parts))] + [root]
    for cand in candidates:
        if (cand / marker).is_file():
            return cand
    tried = ", ".join(str(c / marker) for c in candidates)
    raise FileNotFoundError(f"{subdir}: file {marker!r} not found; tried: {tried}")


def require_file(path: fs.AnyPath, what: str) -> fs.AnyPath:
    """Return ``path`` if it is a file, else raise FileNotFoundError naming it and ``what``."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: missing file {path}")
    return path


def read_tab_fields(path: PathLike, num_fields: int | None = None, skip_header: bool = False) -> list[list[str]]:
    """Split each line on tabs with no quote handling (csv.QUOTE_NONE semantics).

    Args:
      num_fields: if given, every line must have at least this many fields; a line with
        fewer raises ValueError naming the file and 1-based line number.
    """
    rows = []
    for lineno, line in enumerate(read_lines(path), start=1):
        if skip_header and lineno == 1:
            continue
        fields = line.split("\t")
        if num_fields is not None and len(fields) < num_fields:
            raise ValueError(f"{path}:{lineno}: expected >= {num_fields} tab-separated fields, got {len(fields)}")
        rows.append(fields)
    return rows


def read_csv_rows(path: PathLike, delimiter: str, skip_header: bool = False, num_fields: int | None = None) -> list[list[str]]:
    """Rows of a csv-quoted file (QUOTE_MINIMAL, as Python's csv.writer and pandas write them).

    Opened with ``newline=''`` so CRLF endings and newlines inside quoted fields are handled
    by the csv module, and with ``utf-8-sig`` so a BOM does not end up in the first field.
    """
    with fs.open_file(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if skip_header:
        rows = rows[1:]
    if num_fields is not None:
        for i, r in enumerate(rows):
            if len(r) < num_fields:
                raise ValueError(f"{path}: csv record {i + 1 + skip_header}: expected >= {num_fields} fields, got {len(r)}")
    return rows


def parse_float(text: str, path: PathLike, lineno: int) -> float:
    """float(text), or ValueError naming the file and 1-based line."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: expected a number, got {text!r}") from None


def package_versions() -> dict[str, Optional[str]]:
    """Python, numpy and mst5_jax versions, plus any model library already imported.

    Libraries are only reported, never imported here, so a bare-numpy evaluation stays light.
    """
    names = ["numpy", "scipy", "mst5_jax", "jax", "jaxlib", "flax", "torch", "transformers", "peft", "sentence_transformers"]
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in names:
        if name not in ("numpy", "mst5_jax") and name not in sys.modules:
            continue
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = getattr(sys.modules.get(name), "__version__", None)
    return out


class FileLog:
    """Records the data files an evaluator read, for its ``"meta"`` entry."""

    def __init__(self) -> None:
        self._paths: list[fs.AnyPath] = []

    def add(self, path: PathLike) -> fs.AnyPath:
        p = fs.as_path(path)
        if p not in self._paths:
            self._paths.append(p)
        return p

    def add_all(self, paths: Iterable[PathLike]) -> None:
        for p in paths:
            self.add(p)

    def meta(self, *, max_length: Optional[int] = None, batch_size: Optional[int] = None,
             device: Optional[str] = None, **extra) -> dict:
        """The ``"meta"`` dict: files with size and sha256, run settings, versions and UTC date."""
        meta = {
            "data_files": [
                {"path": fs.resolved(p), "bytes": fs.file_size(p), "sha256": sha256_file(p)} for p in self._paths
            ],
            "max_length": max_length,
            "batch_size": batch_size,
            "device": device,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(),
        }
        meta.update(extra)
        return meta

