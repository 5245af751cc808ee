"""Where things are by default: the repository, the data root, the caches.

Every default location is decided here, once. A path given explicitly (a flag, a gin
macro, a function argument) always wins over these defaults.
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

from mst5_jax.utils import fs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
"""The source tree (for an installed wheel: the site-packages folder above `mst5_jax/`)."""

DATA_DIR_ENV = "MST5_DATA_DIR"
CACHE_DIR = REPO_ROOT / ".cache"
"""Git-ignored caches: SentencePiece models, test fixtures, benchmark data."""


def default_data_dir() -> fs.AnyPath:
    """``$MST5_DATA_DIR`` (a folder or a ``gs://`` URL), else ``../shared/data`` beside the
    repository."""
    env = os.environ.get(DATA_DIR_ENV)
    return fs.as_path(env) if env else REPO_ROOT.parent / "shared" / "data"


def resolve_data_dir(data_dir: Optional[str | os.PathLike] = None) -> fs.AnyPath:
    """`data_dir` when given (a folder or a ``gs://`` URL), else `default_data_dir()`."""
    return fs.as_path(data_dir) if data_dir else default_data_dir()
