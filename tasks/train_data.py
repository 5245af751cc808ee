"""Which pipeline a training run reads through: the gin macro DATA_PIPELINE.

`make_train_iterator` returns `tasks.pipeline.TripletIterator` (numpy, TF-free) or
`tasks.seqio_tasks.SeqioTripletIterator` (``seqio.get_dataset`` with a per-host ShardInfo);
for a task both give the same batches (docs/DATA.md). TensorFlow is imported only when
seqio is chosen.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from tasks.pipeline import TripletIterator

log = logging.getLogger(__name__)

PIPELINES = ("auto", "seqio", "numpy")


def seqio_missing() -> list[str]:
    """The packages the seqio pipeline needs that do not import here ([] when it can run)."""
    missing = []
    for module in ("tensorflow", "seqio"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing


def resolve_pipeline(choice: str) -> str:
    """``'seqio'`` or ``'numpy'`` for the gin macro DATA_PIPELINE (`choice`).

    ``'auto'`` is seqio when TensorFlow and seqio import, else numpy (the TF-free GPU image);
    with ``MST5_NO_SEQIO=1`` in the environment (no TensorFlow import wanted) it is numpy.
    ``'seqio'`` without them is an error naming the missing packages and the ``[tf]`` extra.
    """
    if choice not in PIPELINES:
        raise ValueError(f"DATA_PIPELINE={choice!r}: expected one of {PIPELINES}")
    if choice == "numpy":
        return "numpy"
    if choice == "auto" and os.environ.get("MST5_NO_SEQIO", "") in ("1", "true", "True"):
        log.info("DATA_PIPELINE='auto' with MST5_NO_SEQIO set: reading through the numpy pipeline")
        return "numpy"
    missing = seqio_missing()
    if not missing:
        return "seqio"
    if choice == "seqio":
        raise ImportError(f"DATA_PIPELINE='seqio' needs {' and '.join(missing)}, which do not import here: "
                          "pip install -e '.[tf]', or set --gin.DATA_PIPELINE=\"'numpy'\" (or 'auto')")
    log.info("DATA_PIPELINE='auto': %s not installed; reading through the numpy pipeline", ", ".join(missing))
    return "numpy"


def seqio_vocab_file(vocab_path: str) -> Optional[str]:
    """The SentencePiece model the seqio pipeline tokenizes with: `vocab_path` itself, or its
    ``spiece.model`` when it is a directory (None when it has none)."""
    p = str(vocab_path)
    if os.path.isdir(p):
        p = os.path.join(p, "spiece.model")
        return p if os.path.isfile(p) else None
    return p


def make_train_iterator(pipeline: str, task_name: str, data_dir: Optional[os.PathLike], vocab_path: str,
                        max_length: int, batch_size: int, seed: int, shard_index: int = 0,
                        num_shards: int = 1):
    """(the train-split batch iterator, the pipeline that serves it: 'seqio' | 'numpy').

    `pipeline` is DATA_PIPELINE (`resolve_pipeline`). The seqio one is
    `tasks.seqio_tasks.SeqioTripletIterator` (same batches as `TripletIterator` for a task);
    it needs a SentencePiece vocabulary, so 'auto' with a tokenizer.json-only vocabulary
    reads through numpy.
    """
    chosen = resolve_pipeline(pipeline)
    spm = seqio_vocab_file(vocab_path) if chosen == "seqio" else None
    if chosen == "seqio" and spm is None:
        if pipeline == "seqio":
            raise FileNotFoundError(f"DATA_PIPELINE='seqio' tokenizes with a SentencePiece model, and the "
                                    f"vocabulary {vocab_path} has no spiece.model: set TrainConfig.vocab to one, "
                                    "or use DATA_PIPELINE='numpy'")
        log.info("DATA_PIPELINE='auto': vocabulary %s has no spiece.model; reading through numpy", vocab_path)
        chosen = "numpy"
    if chosen == "numpy":
        return TripletIterator(task_name, data_dir, vocab_path, max_length, batch_size, seed,
                               shard_index=shard_index, num_shards=num_shards), "numpy"
    from tasks import seqio_tasks  # noqa: PLC0415  (TensorFlow: only on this path)

    seqio_tasks.register_all()
    return seqio_tasks.SeqioTripletIterator(task_name, data_dir, spm, max_length, batch_size, seed,
                                            shard_index=shard_index, num_shards=num_shards), "seqio"
