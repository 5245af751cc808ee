"""XNLI in one place: its 15 languages, where its files are, and how they are read.

`tasks/` (training triplets from XNLI dev/test), `mst5_jax.evals.retrieval`
(`xnli_retrieval` on the dev premises) and the cached SentencePiece vocabulary (trained on
the local XNLI text) all read XNLI through this module. It lives in `mst5_jax.datasets`, a
utils-level package, because `mst5_jax.evals` may import only utils-level modules and
`tasks/` and the formats layer must not be imported by them.

Files (XTREME layout, `docs/DATA.md`): ``xnli/{dev,test}-<lang>.tsv`` under the data root
(or the ``xnli/`` folder itself), csv.writer output with CRLF endings and csv quoting;
dev rows are (premise, hypothesis, label), test rows (premise, hypothesis) with the labels
in ``test-labels.txt``. Rows come in blocks of 3 (entailment, neutral, contradiction)
sharing a premise, line-aligned across the 15 languages.
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterator, Sequence

from mst5_jax.utils.files import distinct_texts, read_tsv

LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
"""ISO 639-1 codes of the 15 XNLI languages, in XNLI's order."""


def folders(data_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Where XNLI files may be: ``<data_dir>/xnli`` first, then `data_dir` itself."""
    root = pathlib.Path(data_dir)
    return [root / "xnli", root]


def split_file(data_dir: str | os.PathLike, split: str, lang: str) -> list[pathlib.Path]:
    """Candidate paths of ``<split>-<lang>.tsv`` (split "dev" or "test"), in lookup order."""
    return [d / f"{split}-{lang}.tsv" for d in folders(data_dir)]


def read_records(path: str | os.PathLike, errors: str = "surrogateescape") -> Iterator[tuple[int, list[str]]]:
    """(line where the record starts, fields) of one XNLI TSV file (csv quoting, CRLF)."""
    return read_tsv(path, errors=errors)


def premises(path: str | os.PathLike) -> list[str]:
    """The premise of each 3-row block of one ``<split>-<lang>.tsv`` (830 for dev, 1,670 for test).

    Raises ValueError naming the file and line for a row with fewer than 2 fields, or a
    row count that is not a whole number of blocks.
    """
    rows = []
    for line, fields in read_records(path, errors="strict"):
        if len(fields) < 2:
            raise ValueError(f"{path}:{line}: expected at least 2 tab-separated fields, got {len(fields)}")
        rows.append(fields)
    if len(rows) % 3:
        raise ValueError(f"{path}: {len(rows)} rows is not a whole number of 3-row premise blocks")
    return [rows[i][0] for i in range(0, len(rows), 3)]


def training_files(data_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The local XNLI training text: the sorted ``test-<lang>.tsv`` of the first folder that has them."""
    for d in folders(data_dir):
        files = sorted(d.glob("test-*.tsv"))
        if files:
            return files
    return []


def training_sentences(files: Sequence[pathlib.Path]) -> Iterator[str]:
    """Distinct premises and hypotheses of `files`, in file order (XNLI repeats each premise 3 times)."""
    return distinct_texts(files, columns=2)
