"""Which SentencePiece vocabulary the data pipeline uses (PUBLIC_API §4).

In order: the ``MST5_VOCAB`` environment variable (a path or ``gs://`` URL of a
SentencePiece model; gin can pass one explicitly to `tasks.configure`), else a small
SentencePiece model trained on the local XNLI training text (the XTREME
``xnli/test-*.tsv`` files, which offline runs train on) and cached in the git-ignored
``<repo>/.cache/vocab/<sha256 of those files>/spiece.model``. The cached model exists
because no pretrained mT5 vocabulary is on hand offline; which files and sentences form
"the XNLI training text" is `mst5_jax.datasets.xnli`'s to say (`train_sentencepiece`
itself takes any sentence stream); it has the mT5 id layout
(pad 0, EOS 1, unk 2, no BOS) so everything downstream is unchanged when the real
250k mT5 vocabulary is used instead.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
from typing import Iterable, Optional

import numpy as np

from mst5_jax.datasets import xnli
from mst5_jax.utils import paths
from mst5_jax.utils.files import atomic_write

log = logging.getLogger(__name__)

ENV_VAR = "MST5_VOCAB"
DEFAULT_CACHE_ROOT = paths.CACHE_DIR / "vocab"
# Small and quick: the CPU demo trains on it. 8000 pieces cover the 15 XNLI scripts.
VOCAB_SIZE = 8000
INPUT_SENTENCE_SIZE = 50_000  # of ~100k distinct sentences: ~50 s on 2 busy cores, once
RECIPE = "unigram-8000-sample50k-pcg64seed0-1thread"  # part of the cache key: a new recipe, a new model
CHARACTER_COVERAGE = 0.9995


def files_sha256(files: list[pathlib.Path]) -> str:
    """sha256 over the names and bytes of `files`, in the given order."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def sample_sentences(sentences: Iterable[str], size: int = INPUT_SENTENCE_SIZE, seed: int = 0) -> list[str]:
    """`size` of `sentences`, drawn without replacement by numpy's PCG64 with `seed`, in input order.

    SentencePiece's own sampler (``input_sentence_size`` + ``shuffle_input_sentence``) gave
    a different model on each run even with ``set_random_generator_seed``, so the demo's
    numbers moved between fresh clones; this sample is the same everywhere.
    """
    pool = list(sentences)
    if len(pool) <= size:
        return pool
    keep = np.sort(np.random.default_rng(seed).choice(len(pool), size=size, replace=False))
    return [pool[i] for i in keep]


def train_sentencepiece(sentences: Iterable[str], out_path: pathlib.Path, *,
                        vocab_size: Optional[int] = None) -> pathlib.Path:
    """Trains a unigram SentencePiece model on `sentences` with mT5's special ids; writes it atomically.

    Deterministic: the same sentences in the same order give the same bytes on every machine
    (one trainer thread: the EM statistics of several threads are summed in a varying order).
    Concurrent builders race harmlessly: the last complete file wins.
    """
    import sentencepiece as spm  # noqa: PLC0415

    vocab_size = vocab_size or VOCAB_SIZE
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_sentences(sentences)), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", character_coverage=CHARACTER_COVERAGE,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_path, "wb") as fh:
        fh.write(buf.getvalue())
    return out_path


def default_vocab_path(data_dir: Optional[str | os.PathLike], cache_root: Optional[str | os.PathLike] = None) -> str:
    """Path (or URL) of the SentencePiece model to use; see the module docstring.

    Args:
      data_dir: the data root (or its ``xnli/`` folder) holding ``test-<lang>.tsv``.
      cache_root: where cached models go; default ``<repo>/.cache/vocab``.
    Returns:
      ``$MST5_VOCAB`` if set, else the cached model's path (trained on first use, in about
      50 s on two cores).
    Raises:
      FileNotFoundError: no ``MST5_VOCAB`` and no local XNLI text; the message names both.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    files = xnli.training_files(data_dir) if data_dir is not None else []
    if not files:
        looked = "no data_dir given" if data_dir is None else (
            f"looked for test-*.tsv in {pathlib.Path(data_dir) / 'xnli'} and {pathlib.Path(data_dir)}")
        raise FileNotFoundError(
            f"No SentencePiece vocabulary: set {ENV_VAR} to a SentencePiece model path or gs:// URL "
            "(e.g. the mT5 spiece.model, or gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model), "
            f"or give a data_dir with the local XNLI files to build the cached vocabulary ({looked}).")
    root = pathlib.Path(cache_root) if cache_root is not None else DEFAULT_CACHE_ROOT
    path = root / f"{files_sha256(files)}-{RECIPE}" / "spiece.model"
    if path.is_file():
        log.info("Using the cached SentencePiece vocabulary %s (built from %d local XNLI files; "
                 "set %s to use another)", path, len(files), ENV_VAR)
        return str(path)
    log.warning("No %s set: training a %d-piece SentencePiece vocabulary on the local XNLI text "
                "(%s/test-*.tsv, %d files) into %s", ENV_VAR, VOCAB_SIZE, files[0].parent, len(files), path)
    train_sentencepiece(xnli.training_sentences(files), path)
    return str(path)
