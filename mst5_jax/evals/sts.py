"""Semantic textual similarity: Spearman x 100 of pair cosines against gold scores.

Every loader returns a `Pairs` (sentence1 list, sentence2 list, gold floats) with the text
exactly as in the file. Quirks handled per file (see ../shared/data/README.md):
- STS17: inputs ``s1\\ts2``, gold one float per line; track 6 (tr-en) has 500 input lines
  of which the gold scores the first 250.
- STS-B (English) and KorSTS: tab-separated with no csv quoting (a field may start with a
  literal ``"``); STS-B has no header and some lines carry 2 extra trailing fields, so
  the columns are taken by position (4 score, 5 sentence1, 6 sentence2).
- JSTS: JSON lines. JSICK: tab-separated with a header, Japanese columns by name.
- BQ: comma-separated csv with quoting and a UTF-8 BOM; ATEC_CCKS: tab-separated csv with
  quoting; LCQMC and Chinese STS-B: plain tab-separated. The Chinese pair sets (LCQMC,
  BQ, ATEC) have 0/1 labels; their score is the Spearman of cosine against the label
  (C-MTEB convention).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional

import numpy as np

from mst5_jax.evals.data import (FileLog, parse_float, read_csv_rows, read_lines, read_tab_fields,
                                 require_file, resolve_dataset_dir)
from mst5_jax.evals.metrics import mean_or_none, spearman
from mst5_jax.evals.mining import paired_cosine

Encode = Callable[[list[str]], np.ndarray]


@dataclasses.dataclass
class Pairs:
    """n sentence pairs with gold similarity scores."""

    s1: list[str]
    s2: list[str]
    gold: list[float]

    def __len__(self) -> int:
        return len(self.gold)


def pair_spearman(encode: Encode, pairs: Pairs) -> float:
    """Spearman x 100 between cosine(encode(s1), encode(s2)) and the gold scores.

    Both sides go through one ``encode`` call (s1 then s2), so batches are full.
    """
    emb = np.asarray(encode(pairs.s1 + pairs.s2))
    n = len(pairs)
    return spearman(paired_cosine(emb[:n], emb[n:]), pairs.gold)


# --- STS17 -------------------------------------------------------------------------------

# track name in results -> (file track id, language pair in the file name)
STS17_TRACKS = {
    "ar-ar": ("1", "ar-ar"),
    "ar-en": ("2", "ar-en"),
    "es-es": ("3", "es-es"),
    "es-en": ("4a", "es-en"),
    "es-en-wmt": ("4b", "es-en"),
    "en-en": ("5", "en-en"),
    "tr-en": ("6", "tr-en"),
}
STS17_EXTENDED = ("en-de", "fr-en", "it-en", "nl-en")


def load_sts17_track(data_dir, track: str) -> tuple[Pairs, list]:
    """Pairs of one STS17 track (a key of `STS17_TRACKS`), and the files read."""
    folder = resolve_dataset_dir(data_dir, "sts17", "STS2017.gs/STS.gs.track5.en-en.txt")
    num, lp = STS17_TRACKS[track]
    inp = require_file(folder / "STS2017.eval.v1.1" / f"STS.input.track{num}.{lp}.txt", f"sts17 {track}")
    gs = require_file(folder / "STS2017.gs" / f"STS.gs.track{num}.{lp}.txt", f"sts17 {track}")
    gold = [parse_float(t, gs, i) for i, t in enumerate(read_lines(gs), start=1)]
    rows = read_tab_fields(inp, num_fields=2)
    # Track 6 ships 500 input lines; the gold scores the first 250 (README of the data).
    if len(rows) < len(gold) or (len(rows) != len(gold) and track != "tr-en"):
        raise ValueError(f"sts17 {track}: {inp} has {len(rows)} lines but {gs} has {len(gold)} scores")
    rows = rows[: len(gold)]
    return Pairs([r[0] for r in rows], [r[1] for r in rows], gold), [inp, gs]


def load_sts17_extended(data_dir, pair: str) -> tuple[Pairs, list]:
    folder = resolve_dataset_dir(data_dir, "sts17", "STS2017.gs/STS.gs.track5.en-en.txt")
    path = require_file(folder / "STS2017-extended" / f"STS.{pair}.txt", f"sts17 extended {pair}")
    rows = read_tab_fields(path, num_fields=3)
    return Pairs([r[0] for r in rows], [r[1] for r in rows],
                 [parse_float(r[2], path, i) for i, r in enumerate(rows, start=1)]), [path]


def xsts(encode: Encode, data_dir, *, extended: bool = True, max_length: Optional[int] = None,
         batch_size: Optional[int] = None, device: Optional[str] = None) -> dict:
    """SemEval-2017 STS, 7 tracks, Spearman x 100.

    Returns {"per_track": {track: rho}, "avg": mean of the 7, "extended": {en-de, fr-en,
    it-en, nl-en} (STS2017-extended; fr/it/nl are machine translations, hence apart),
    "avg_extended", "meta"}.
    """
    log = FileLog()
    per_track = {}
    for track in STS17_TRACKS:
        pairs, files = load_sts17_track(data_dir, track)
        log.add_all(files)
        per_track[track] = pair_spearman(encode, pairs)
    out = {"per_track": per_track, "avg": mean_or_none(list(per_track.values()))}
    if extended:
        ext = {}
        for pair in STS17_EXTENDED:
            pairs, files = load_sts17_extended(data_dir, pair)
            log.add_all(files)
            ext[pair] = pair_spearman(encode, pairs)
        out["extended"] = ext
        out["avg_extended"] = mean_or_none(list(ext.values()))
    out["meta"] = log.meta(max_length=max_length, batch_size=batch_size, device=device)
    return out


# --- single-set STS loaders -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Table:
    """A pair set stored one pair per row, columns by position."""

    folder: str  # under the data dir (resolve_dataset_dir)
    file: str  # with "{split}"
    s1: int
    s2: int
    score: int
    num_fields: int
    header: bool = False
    csv_delimiter: Optional[str] = None  # csv quoting with this delimiter; None: plain tabs


_TABLES = {
    "stsb_en": _Table("stsbenchmark", "sts-{split}.csv", 5, 6, 4, num_fields=7),
    "korsts": _Table("kornlu/KorSTS", "sts-{split}.tsv", 5, 6, 4, num_fields=7, header=True),
    "stsb_zh": _Table("chinese_sts/STS-B", "STS-B.{split}.data", 0, 1, 2, num_fields=3),
    "lcqmc": _Table("chinese_sts/LCQMC", "{split}.txt", 0, 1, 2, num_fields=3),
    "bq": _Table("chinese_sts/BQ_corpus", "{split}.csv", 0, 1, 2, num_fields=3, header=True, csv_delimiter=","),
    "atec": _Table("chinese_sts/ATEC_CCKS", "{split}.csv", 0, 1, 2, num_fields=3, header=True, csv_delimiter="\t"),
}


def _load_table(name: str, data_dir, split: str) -> tuple[Pairs, list]:
    t = _TABLES[name]
    folder = resolve_dataset_dir(data_dir, t.folder, t.file.format(split="test"))
    path = require_file(folder / t.file.format(split=split), f"{name} {split}")
    if t.csv_delimiter is None:
        rows = read_tab_fields(path, num_fields=t.num_fields, skip_header=t.header)
    else:
        rows = read_csv_rows(path, delimiter=t.csv_delimiter, skip_header=t.header, num_fields=t.num_fields)
    first = 2 if t.header else 1
    return Pairs([r[t.s1] for r in rows], [r[t.s2] for r in rows],
                 [parse_float(r[t.score], path, i) for i, r in enumerate(rows, start=first)]), [path]


def _table_loader(name: str) -> Callable[..., tuple[Pairs, list]]:
    def load(data_dir, split: str = "test") -> tuple[Pairs, list]:
        return _load_table(name, data_dir, split)

    t = _TABLES[name]
    load.__name__ = load.__qualname__ = f"load_{name}"
    load.__doc__ = f"{name}: (Pairs, [path]) from <data_dir>/{t.folder}/{t.file}."
    return load


load_stsb_en = _table_loader("stsb_en")
load_korsts = _table_loader("korsts")
load_stsb_zh = _table_loader("stsb_zh")
load_lcqmc = _table_loader("lcqmc")
load_bq = _table_loader("bq")
load_atec = _table_loader("atec")


def load_jsts(data_dir, split: str = "valid") -> tuple[Pairs, list]:
    folder = resolve_dataset_dir(data_dir, "jsts", "valid-v1.3.json")
    path = require_file(folder / f"{split}-v1.3.json", f"jsts {split}")
    s1, s2, gold = [], [], []
    for lineno, line in enumerate(read_lines(path), start=1):
        try:
            row = json.loads(line)
            s1.append(row["sentence1"])
            s2.append(row["sentence2"])
            gold.append(float(row["label"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: bad JSTS record ({e})") from None
    return Pairs(s1, s2, gold), [path]


def read_jsick(data_dir, split: str = "test") -> tuple[list[dict], list]:
    """JSICK rows as dicts keyed by the header, no quote handling."""
    folder = resolve_dataset_dir(data_dir, "jsick", "test.tsv")
    path = require_file(folder / f"{split}.tsv", f"jsick {split}")
    rows = read_tab_fields(path)
    header = rows[0]
    for lineno, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise ValueError(f"{path}:{lineno}: expected {len(header)} fields, got {len(r)}")
    return [dict(zip(header, r)) for r in rows[1:]], [path]


def load_jsick(data_dir, split: str = "test") -> tuple[Pairs, list]:
    rows, files = read_jsick(data_dir, split)
    return Pairs([r["sentence_A_Ja"] for r in rows], [r["sentence_B_Ja"] for r in rows],
                 [parse_float(r["relatedness_score_Ja"], files[0], i) for i, r in enumerate(rows, start=2)]), files


def _single_set(name: str, loader, default_split: str):
    def evaluate(encode: Encode, data_dir, split: str = default_split, *, max_length: Optional[int] = None,
                 batch_size: Optional[int] = None, device: Optional[str] = None) -> dict:
        pairs, files = loader(data_dir, split)
        log = FileLog()
        log.add_all(files)
        rho = pair_spearman(encode, pairs)
        # "avg" repeats the score so every STS-style result has one, as xsts does.
        return {"spearman": rho, "avg": rho, "n": len(pairs), "split": split,
                "meta": log.meta(max_length=max_length, batch_size=batch_size, device=device)}

    evaluate.__name__ = evaluate.__qualname__ = name
    evaluate.__doc__ = (f"{name}: Spearman x 100 of cosine vs gold on the {default_split!r} split by default.\n\n"
                        f"Returns {{'spearman', 'avg' (the same number), 'n', 'split', 'meta'}}. Loader: `{loader.__name__}`.")
    return evaluate


jsts = _single_set("jsts", load_jsts, "valid")
jsick = _single_set("jsick", load_jsick, "test")
stsb_zh = _single_set("stsb_zh", load_stsb_zh, "test")
korsts = _single_set("korsts", load_korsts, "test")
stsb_en = _single_set("stsb_en", load_stsb_en, "test")
lcqmc = _single_set("lcqmc", load_lcqmc, "test")
bq = _single_set("bq", load_bq, "test")
atec = _single_set("atec", load_atec, "test")
