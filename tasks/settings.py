"""Process-wide choices of the task registry: data root, vocabulary and sources.

The registered seqio tasks read these at dataset-build time, not at import, so a run can
call `configure` after ``import tasks``: directly, or through gin
(``tasks.configure.train_source = 'xnli_mt'`` in a gin file, registered and applied by
`mst5_jax.training.gin_utils.register_gin` / `configure_tasks`).

Train sources for the XNLI-based tasks (``train_source``):
* ``"xnli_local"`` (default, offline): **the XNLI test files serve as train** and the dev
  files as validation (XTREME format, ``DATA_DIR/xnli``). XNLI-MT is not on hand offline.
* ``"xnli_mt"``: XNLI-MT-1.0 ``multinli.train.<lang>.tsv`` as train (mSimCSE's data, the
  paper recipe); validation is the local XNLI dev set.
* ``"xtreme_mt"``: TFDS ``xtreme_xnli`` train (XTREME's own translation, 392,570 rows);
  validation is TFDS ``xnli`` validation.
* ``"xnli_tfds"``: TFDS ``xnli`` test as train, validation as validation (the TFDS twin
  of ``xnli_local``).
* ``"xnli1_local"``: the original ``XNLI-1.0/xnli.{test,dev}.{jsonl,tsv}`` files.
A source that is missing is an error that names it; no source stands in for another.

``nli_en_source`` ("tfds" or "local") picks where ``mst5_nli_en`` reads SNLI + MultiNLI.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional

from mst5_jax.utils import paths
TRAIN_SOURCES = ("xnli_local", "xnli_mt", "xtreme_mt", "xnli_tfds", "xnli1_local")
NLI_EN_SOURCES = ("tfds", "local")


@dataclasses.dataclass
class Settings:
    data_dir: Optional[str] = None
    vocab_path: Optional[str] = None
    train_source: str = "xnli_local"
    nli_en_source: str = "tfds"
    tfds_data_dir: Optional[str] = None


_SETTINGS = Settings()


def configure(data_dir: Optional[str] = None, vocab_path: Optional[str] = None,
              train_source: Optional[str] = None, nli_en_source: Optional[str] = None,
              tfds_data_dir: Optional[str] = None) -> Settings:
    """Sets the given fields (None leaves a field as it is) and returns the settings."""
    if train_source is not None and train_source not in TRAIN_SOURCES:
        raise ValueError(f"train_source must be one of {TRAIN_SOURCES}, got {train_source!r}")
    if nli_en_source is not None and nli_en_source not in NLI_EN_SOURCES:
        raise ValueError(f"nli_en_source must be one of {NLI_EN_SOURCES}, got {nli_en_source!r}")
    for field, value in (("data_dir", data_dir), ("vocab_path", vocab_path), ("train_source", train_source),
                         ("nli_en_source", nli_en_source), ("tfds_data_dir", tfds_data_dir)):
        if value is not None:
            setattr(_SETTINGS, field, str(value))
    return _SETTINGS


def reset() -> None:
    """Back to the defaults (tests use this)."""
    global _SETTINGS
    _SETTINGS = Settings()


def get() -> Settings:
    return _SETTINGS


def resolve_data_dir(data_dir: Optional[os.PathLike] = None) -> pathlib.Path:
    """`data_dir`, else `configure`'s, else ``$MST5_DATA_DIR``, else ``<repo>/../shared/data``."""
    chosen = paths.resolve_data_dir(data_dir or _SETTINGS.data_dir)
    return pathlib.Path(chosen)


def resolve_vocab_path(vocab_path: Optional[str] = None, data_dir: Optional[os.PathLike] = None) -> str:
    """`vocab_path`, else `configure`'s (gin), else `mst5_jax.formats.vocab.default_vocab_path`."""
    if vocab_path or _SETTINGS.vocab_path:
        return str(vocab_path or _SETTINGS.vocab_path)
    from mst5_jax.formats.vocab import default_vocab_path  # noqa: PLC0415
    return default_vocab_path(resolve_data_dir(data_dir))

