"""Readers that turn each NLI source into `NliRow`s / `AlignedNli` (TensorFlow only for TFDS).

Local files (no TensorFlow):
* `read_xtreme_xnli(data_dir, split)`: XTREME's per-language XNLI 1.0 files,
  ``xnli/{dev,test}-<lang>.tsv`` (csv.writer output: CRLF line endings, csv quoting).
  dev rows are ``premise, hypothesis, label``; test rows ``premise, hypothesis`` with
  the labels in ``xnli/test-labels.txt`` (one per line, aligned with every language).
* `read_xnli_mt(data_dir)`: XNLI-MT-1.0 ``multinli.train.<lang>.tsv`` (header
  ``premise hypo label``, 392,702 rows per language, 'contradictory' for contradiction),
  mSimCSE's training data, in ``XNLI-MT-1.0/multinli/``, ``xnli_mt/`` or `data_dir`.
* `read_xnli1(data_dir, split)`: the original ``XNLI-1.0/xnli.{dev,test}.{jsonl,tsv}``
  (one row per language and pairID).
* `read_nli_file(path, ...)`: any premise/hypothesis/label tsv or jsonl (KorNLI, SNLI and
  MNLI distribution files, user data).
TFDS (needs tensorflow-datasets): `read_tfds_xnli` (``xnli``: validation and test only;
``xtreme_xnli``: train, XTREME's own translation) and `read_tfds_nli` (``snli``,
``multi_nli``).

A missing local file raises FileNotFoundError naming every path looked for. Bad rows
(missing columns, unknown labels, empty text, broken encoding) are skipped with a
warning that counts them and gives the first line numbers; a file with no usable row is
an error. Loaded files are cached in memory per process.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import os
import pathlib
from typing import Iterator, Optional, Sequence

from mst5_jax.datasets import xnli
from mst5_jax.utils.files import read_tsv
from tasks.triplets import XNLI_LANGUAGES, AlignedNli, BadRows, NliRow, make_row

log = logging.getLogger(__name__)

XTREME_SPLITS = {"dev": "dev", "validation": "dev", "test": "test"}


def _find(candidates: Sequence[pathlib.Path], what: str) -> pathlib.Path:
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{what} not found; looked for: " + ", ".join(str(c) for c in candidates))


def _open_text(path: pathlib.Path):
    # surrogateescape keeps undecodable bytes visible to `text_problem` instead of crashing.
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


@functools.lru_cache(maxsize=8)
def _read_xtreme_xnli_cached(dirs: tuple[pathlib.Path, ...], split: str, langs: tuple[str, ...]) -> AlignedNli:
    labels: Optional[list[str]] = None
    labels_path = None
    if split == "test":
        labels_path = _find([d / "test-labels.txt" for d in dirs], "XNLI test labels (XTREME strips them from test-*.tsv)")
        with open(labels_path, encoding="utf-8") as f:
            labels = f.read().splitlines()
    rows: dict[str, list[Optional[NliRow]]] = {}
    for lang in langs:
        path = _find([d / f"{split}-{lang}.tsv" for d in dirs], f"XNLI {split} file for {lang!r}")
        bad = BadRows(str(path))
        out: list[Optional[NliRow]] = []
        n_cols = 3 if split == "dev" else 2
        for i, (line, fields) in enumerate(read_tsv(path)):
            if len(fields) != n_cols:
                bad.add(line, f"wrong column count (expected {n_cols})")
                out.append(None)
                continue
            if labels is not None:
                label = labels[i] if i < len(labels) else None
            else:
                label = fields[2]
            out.append(make_row(fields[0], fields[1], label, line, bad))
        if labels is not None and len(labels) != len(out):
            raise ValueError(f"{path} has {len(out)} rows but {labels_path} has {len(labels)} labels; "
                             "they must be line-aligned")
        bad.report(len(out))
        rows[lang] = out
    return AlignedNli(name=f"xtreme_xnli/{split}", rows=rows)


def read_xtreme_xnli(data_dir: os.PathLike, split: str, langs: Sequence[str] = XNLI_LANGUAGES) -> AlignedNli:
    """XTREME-format XNLI dev or test (``split`` 'dev'/'validation' or 'test'), all `langs`."""
    if split not in XTREME_SPLITS:
        raise ValueError(f"XNLI split must be one of {sorted(XTREME_SPLITS)}, got {split!r}")
    return _read_xtreme_xnli_cached(tuple(xnli.folders(data_dir)), XTREME_SPLITS[split], tuple(langs))


def xnli_mt_paths(data_dir: os.PathLike, lang: str) -> list[pathlib.Path]:
    root = pathlib.Path(data_dir)
    name = f"multinli.train.{lang}.tsv"
    return [root / "XNLI-MT-1.0" / "multinli" / name, root / "xnli_mt" / name, root / name]


@functools.lru_cache(maxsize=2)
def _read_xnli_mt_cached(root: pathlib.Path, langs: tuple[str, ...]) -> AlignedNli:
    rows = {}
    for lang in langs:
        path = _find(xnli_mt_paths(root, lang), f"XNLI-MT-1.0 train file for {lang!r} (source 'xnli_mt')")
        bad = BadRows(str(path))
        out: list[Optional[NliRow]] = []
        records = read_tsv(path, quoting=csv.QUOTE_NONE)
        header = next(records, (1, []))[1]
        if [h.strip() for h in header[:3]] != ["premise", "hypo", "label"]:
            raise ValueError(f"{path}:1: expected the header 'premise\\thypo\\tlabel', found {header!r}")
        for line, fields in records:
            if len(fields) < 3:
                bad.add(line, "missing columns")
                out.append(None)
                continue
            out.append(make_row(fields[0], fields[1], fields[2], line, bad))
        bad.report(len(out))
        rows[lang] = out
    return AlignedNli(name="xnli_mt/train", rows=rows)


def read_xnli_mt(data_dir: os.PathLike, langs: Sequence[str] = XNLI_LANGUAGES) -> AlignedNli:
    """XNLI-MT-1.0 machine-translated MultiNLI train, line-aligned over `langs`."""
    return _read_xnli_mt_cached(pathlib.Path(data_dir), tuple(langs))


def _aligned_from_pairs(name: str, examples: Iterator[tuple[object, int, str, str, str, object]],
                        langs: Sequence[str], bad: BadRows) -> AlignedNli:
    """Groups (pair_id, line, lang, premise, hypothesis, label) records into aligned rows."""
    order: dict[object, int] = {}
    table: dict[str, dict[int, NliRow]] = {lang: {} for lang in langs}
    n = 0
    for pair_id, line, lang, premise, hypothesis, label in examples:
        n += 1
        if lang not in table:
            continue
        idx = order.setdefault(pair_id, len(order))
        row = make_row(premise, hypothesis, label, line, bad)
        if row is not None:
            table[lang][idx] = row
    bad.report(n)
    return AlignedNli(name=name, rows={lang: [table[lang].get(i) for i in range(len(order))] for lang in langs})


def read_xnli1(data_dir: os.PathLike, split: str, langs: Sequence[str] = XNLI_LANGUAGES) -> AlignedNli:
    """The original XNLI-1.0 ``xnli.{dev,test}.jsonl`` (or ``.tsv``), grouped by pairID."""
    s = XTREME_SPLITS.get(split)
    if s is None:
        raise ValueError(f"XNLI split must be one of {sorted(XTREME_SPLITS)}, got {split!r}")
    root = pathlib.Path(data_dir)
    dirs = [root / "XNLI-1.0", root / "xnli", root]
    path = _find([d / f"xnli.{s}.{ext}" for d in dirs for ext in ("jsonl", "tsv")], f"XNLI-1.0 {s} file")
    bad = BadRows(str(path))

    def records():
        if path.suffix == ".jsonl":
            for line_no, d in _jsonl(path, bad):
                if d is not None:
                    yield (d.get("pairID"), line_no, d.get("language"), d.get("sentence1"),
                           d.get("sentence2"), d.get("gold_label"))
        else:
            recs = read_tsv(path, quoting=csv.QUOTE_NONE)
            header = next(recs)[1]
            col = {h: i for i, h in enumerate(header)}
            need = ("language", "gold_label", "sentence1", "sentence2", "pairID")
            if any(k not in col for k in need):
                raise ValueError(f"{path}:1: header must have columns {need}, found {header}")
            for line_no, fields in recs:
                if len(fields) < len(header):
                    bad.add(line_no, "missing columns")
                    continue
                yield (fields[col["pairID"]], line_no, fields[col["language"]], fields[col["sentence1"]],
                       fields[col["sentence2"]], fields[col["gold_label"]])

    return _aligned_from_pairs(f"xnli1/{s}", records(), langs, bad)


def _jsonl(path: pathlib.Path, bad: "BadRows"):
    """(line number, object) per line of a jsonl file; an undecodable line is counted in `bad`
    and yields (line number, None)."""
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError:
                bad.add(line_no, "not JSON")
                yield line_no, None


def read_nli_file(path: os.PathLike, *, premise: str | int = "sentence1", hypothesis: str | int = "sentence2",
                  label: str | int = "gold_label", header: bool = True,
                  quoting: int = csv.QUOTE_NONE) -> list[Optional[NliRow]]:
    """Rows of one unaligned NLI file: a tsv (columns by header name or index) or a jsonl.

    Defaults fit KorNLI and the SNLI/MultiNLI distribution files (``gold_label``,
    ``sentence1``, ``sentence2``; '-' gold labels are skipped as unknown).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NLI file not found: {path}")
    bad = BadRows(str(path))
    out: list[Optional[NliRow]] = []
    if path.suffix == ".jsonl":
        for line_no, d in _jsonl(path, bad):  # a broken line still counts as a row read
            out.append(None if d is None else make_row(d.get(premise), d.get(hypothesis), d.get(label), line_no, bad))
    else:
        recs = read_tsv(path, quoting=quoting)
        cols = [premise, hypothesis, label]
        if header:
            names = next(recs, (1, []))[1]
            missing = [c for c in cols if isinstance(c, str) and c not in names]
            if missing:
                raise ValueError(f"{path}:1: header {names} lacks the columns {missing}")
            cols = [names.index(c) if isinstance(c, str) else c for c in cols]
        for line_no, fields in recs:
            if len(fields) <= max(cols):
                bad.add(line_no, "missing columns")
                out.append(None)
                continue
            out.append(make_row(fields[cols[0]], fields[cols[1]], fields[cols[2]], line_no, bad))
    bad.report(len(out))
    return out


def english_nli_paths(data_dir: os.PathLike, corpus: str, split: str = "train") -> list[pathlib.Path]:
    """Where local SNLI ('snli') and MultiNLI ('multi_nli') distribution files are looked for."""
    root = pathlib.Path(data_dir)
    if corpus == "snli":
        return [root / d / f"snli_1.0_{split}.{ext}" for d in ("snli", "snli_1.0") for ext in ("jsonl", "txt")]
    if corpus == "multi_nli":
        return [root / d / f"multinli_1.0_{split}.{ext}" for d in ("multinli", "multinli_1.0")
                for ext in ("jsonl", "txt")]
    raise ValueError(f"unknown English NLI corpus {corpus!r} (expected 'snli' or 'multi_nli')")


def read_local_english_nli(data_dir: os.PathLike, corpus: str, split: str = "train") -> list[Optional[NliRow]]:
    """A local SNLI/MultiNLI split; FileNotFoundError names every path looked for."""
    path = _find(english_nli_paths(data_dir, corpus, split), f"local {corpus} {split} file")
    return read_nli_file(path)


# ----------------------------------------------------------------------------- TFDS
def _tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("TFDS sources need tensorflow-datasets (the [tf] extra); "
                          "use the local-file sources otherwise") from e
    return tfds


def _text(x) -> str:
    return x.decode("utf-8", errors="surrogateescape") if isinstance(x, bytes) else str(x)


def read_tfds_xnli(name: str, split: str, data_dir: Optional[str] = None,
                   langs: Sequence[str] = XNLI_LANGUAGES) -> AlignedNli:
    """See `_read_tfds_xnli_cached`; loaded once per process and arguments."""
    return _read_tfds_xnli_cached(name, split, data_dir, tuple(langs))


@functools.lru_cache(maxsize=4)
def _read_tfds_xnli_cached(name: str, split: str, data_dir: Optional[str], langs: tuple[str, ...]) -> AlignedNli:
    """TFDS ``xnli`` (validation/test) or ``xtreme_xnli`` (train), one aligned row per example.

    TFDS features: premise {lang: text}, hypothesis {language: [..], translation: [..]},
    label (ClassLabel entailment/neutral/contradiction).
    """
    tfds = _tfds()
    ds = _tfds_load(tfds, name, split, data_dir)
    bad = BadRows(f"tfds:{name}/{split}")

    def records():
        for i, ex in enumerate(tfds.as_numpy(ds)):
            prem = {_text(k): _text(v) for k, v in ex["premise"].items()}
            hyp = dict(zip((_text(x) for x in ex["hypothesis"]["language"]),
                           (_text(x) for x in ex["hypothesis"]["translation"])))
            for lang in langs:
                yield i, i + 1, lang, prem.get(lang), hyp.get(lang), int(ex["label"])

    return _aligned_from_pairs(f"tfds:{name}/{split}", records(), langs, bad)


def _tfds_load(tfds, name: str, split: str, data_dir: Optional[str]):
    """`tfds.load` without downloading; a missing dataset names itself, its split and data_dir."""
    try:
        return tfds.load(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} is not available "
                                f"(data_dir={data_dir}): {e}") from e


def read_tfds_nli(name: str, split: str = "train", data_dir: Optional[str] = None) -> list[Optional[NliRow]]:
    """TFDS ``snli`` or ``multi_nli`` rows (label -1, i.e. no gold label, is skipped)."""
    tfds = _tfds()
    ds = _tfds_load(tfds, name, split, data_dir)
    bad = BadRows(f"tfds:{name}/{split}")
    out = [make_row(_text(ex["premise"]), _text(ex["hypothesis"]), int(ex["label"]), i + 1, bad)
           for i, ex in enumerate(tfds.as_numpy(ds))]
    bad.report(len(out))
    return out
