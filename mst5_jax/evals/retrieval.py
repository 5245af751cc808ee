"""Cross-lingual retrieval on parallel sets: XNLI premises (15 languages) and JSICK en-ja.

Unlike Tatoeba, a hit here is judged by text: a query is right when the retrieved target
text equals (one of) its gold translation text(s). This is what deduplicated or
many-to-many parallel sets need: two lines with the same text are the same answer.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from mst5_jax.datasets import xnli
from mst5_jax.evals.data import FileLog, require_file, resolve_dataset_dir
from mst5_jax.evals.metrics import mean_or_none
from mst5_jax.evals.mining import cosine_matrix, l2_normalize, top1
from mst5_jax.evals.sts import read_jsick

Encode = Callable[[list[str]], np.ndarray]

XNLI_LANGS = xnli.LANGUAGES


def load_xnli_premises(data_dir, lang: str, split: str = "dev") -> tuple[list[str], object]:
    """The premise of each 3-row block of ``<split>-<lang>.tsv`` (830 for dev, 1,670 for test).

    XNLI rows come in blocks of 3 (entailment, neutral, contradiction) sharing a premise,
    line-aligned across the 15 languages; block i's premise is row 3i's first column.
    Files are csv.writer output: CRLF endings and csv quoting, read with csv.reader.
    """
    folder = resolve_dataset_dir(data_dir, "xnli", "dev-en.tsv")
    path = require_file(folder / f"{split}-{lang}.tsv", f"xnli {lang} {split}")
    return xnli.premises(path), path


def _check_english_blocks(data_dir, split: str):
    """Raise unless every 3-row block of the English file shares one premise; return its path."""
    folder = resolve_dataset_dir(data_dir, "xnli", "dev-en.tsv")
    path = folder / f"{split}-en.tsv"
    rows = [fields for _, fields in xnli.read_records(path, errors="strict")]
    for b in range(0, len(rows), 3):
        if not rows[b][0] == rows[b + 1][0] == rows[b + 2][0]:
            raise ValueError(f"{path}: rows {b + 1}-{b + 3} do not share one premise; block layout broken")
    return path


def text_hits(query_emb: np.ndarray, target_emb: np.ndarray, targets: Sequence[str], gold: Sequence[set]) -> np.ndarray:
    """bool [n]: whether each query's cosine argmax target text is in its gold text set."""
    pred = top1(l2_normalize(query_emb), l2_normalize(target_emb))
    return np.array([targets[p] in g for p, g in zip(pred, gold)], dtype=bool)


def xnli_retrieval(
    encode: Encode,
    data_dir,
    langs: Optional[Sequence[str]] = None,
    max_premises: Optional[int] = None,
    *,
    split: str = "dev",
    max_length: Optional[int] = None,
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
) -> dict:
    """Top-1 retrieval of XNLI premises between every pair of languages.

    Each language's premises are encoded once (one ``encode`` call per language). For a
    source language s and target t, premise i of s queries the premises of t; it is a hit
    when the retrieved premise's text equals premise i's text in t.

    Args:
      langs: subset of `XNLI_LANGS` (default all 15).
      max_premises: use only the first N premises (cheap checks during training).
      split: "dev" (830 premises, the held-out set) or "test" (1,670).
    Returns:
      {"matrix": {src: {tgt: acc}} (diagonal included), "xx2en": {xx: acc},
       "avg_xx2en": mean over the non-English languages (null without "en"),
       "avg_all": mean over all ordered pairs src != tgt (210 for 15 languages),
       "langs", "n_premises", "split", "meta"}. Accuracies in percent.
    """
    langs = list(XNLI_LANGS if langs is None else langs)
    unknown = [l for l in langs if l not in XNLI_LANGS]
    if unknown:
        raise ValueError(f"xnli_retrieval: unknown languages {unknown}; expected a subset of {XNLI_LANGS}")
    log = FileLog()
    log.add(_check_english_blocks(data_dir, split))
    texts, embs = {}, {}
    for lang in langs:
        premises, path = load_xnli_premises(data_dir, lang, split)
        log.add(path)
        texts[lang] = premises[:max_premises] if max_premises is not None else premises
        embs[lang] = l2_normalize(np.asarray(encode(texts[lang])))
    n = {len(t) for t in texts.values()}
    if len(n) != 1:
        raise ValueError(f"xnli_retrieval: languages have different premise counts {dict((l, len(t)) for l, t in texts.items())}")
    matrix = {s: {} for s in langs}

    def accuracy(pred, target_texts):
        return float(100 * np.mean([target_texts[p] == g for p, g in zip(pred, target_texts)]))

    # One similarity matrix per unordered pair serves both directions (its transpose is exact:
    # see mining.cosine_matrix).
    for a, s in enumerate(langs):
        for t in langs[a:]:
            sim = cosine_matrix(embs[s], embs[t])
            matrix[s][t] = accuracy(np.argmax(sim, axis=1), texts[t])
            matrix[t][s] = accuracy(np.argmax(sim, axis=0), texts[s])
    matrix = {s: {t: matrix[s][t] for t in langs} for s in langs}
    xx2en = {s: matrix[s]["en"] for s in langs if s != "en"} if "en" in langs else {}
    off_diag = [matrix[s][t] for s in langs for t in langs if s != t]
    return {
        "matrix": matrix,
        "xx2en": xx2en,
        "avg_xx2en": mean_or_none(list(xx2en.values())) if "en" in langs else None,
        "avg_all": mean_or_none(off_diag),
        "langs": langs,
        "n_premises": n.pop(),
        "split": split,
        "meta": log.meta(max_length=max_length, batch_size=batch_size, device=device),
    }


def jsick_parallel(data_dir, split: str = "test") -> tuple[list[str], list[str], list[set], list[set], list]:
    """Deduplicated en-ja parallel sentences of JSICK, with many-to-many gold.

    Both sentence A and sentence B of each row give an (English, Japanese) pair.
    Returns (en texts, ja texts, gold ja texts per en text, gold en texts per ja text, files).
    """
    rows, files = read_jsick(data_dir, split)
    en2ja: dict[str, set] = {}
    ja2en: dict[str, set] = {}
    for r in rows:
        for side in ("A", "B"):
            en, ja = r[f"sentence_{side}_En"], r[f"sentence_{side}_Ja"]
            en2ja.setdefault(en, set()).add(ja)
            ja2en.setdefault(ja, set()).add(en)
    return list(en2ja), list(ja2en), list(en2ja.values()), list(ja2en.values()), files


def jsick_retrieval(encode: Encode, data_dir, split: str = "test", *, max_length: Optional[int] = None,
                    batch_size: Optional[int] = None, device: Optional[str] = None) -> dict:
    """en<->ja retrieval on JSICK's parallel side; a hit is any gold translation.

    Returns {"en2ja", "ja2en", "mean", "n_en", "n_ja", "split", "meta"}, accuracies in percent.
    """
    en, ja, gold_ja, gold_en, files = jsick_parallel(data_dir, split)
    log = FileLog()
    log.add_all(files)
    e_en, e_ja = np.asarray(encode(en)), np.asarray(encode(ja))
    en2ja = float(100 * text_hits(e_en, e_ja, ja, gold_ja).mean())
    ja2en = float(100 * text_hits(e_ja, e_en, en, gold_en).mean())
    return {"en2ja": en2ja, "ja2en": ja2en, "mean": (en2ja + ja2en) / 2, "n_en": len(en), "n_ja": len(ja),
            "split": split, "meta": log.meta(max_length=max_length, batch_size=batch_size, device=device)}
