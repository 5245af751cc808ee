"""Tatoeba bitext retrieval (LASER v1 test set, 112 languages paired with English).

For each language xxx the files ``tatoeba.xxx-eng.xxx`` and ``tatoeba.xxx-eng.eng`` are
line-aligned translations. A query in one language retrieves, by cosine argmax, among
all the lines of the other file; it is a hit when the retrieved line has the query's
own line index (the LASER/XTREME convention: duplicate texts at other lines count as
misses). Accuracy is in percent, for xx->en and en->xx.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from mst5_jax.evals.data import FileLog, read_lines, resolve_dataset_dir
from mst5_jax.evals.metrics import mean_or_none, top1_accuracy

Encode = Callable[[list[str]], np.ndarray]

LANGS_112 = tuple(
    "afr amh ang ara arq arz ast awa aze bel ben ber bos bre bul cat cbk ceb ces cha cmn cor csb cym "
    "dan deu dsb dtp ell epo est eus fao fin fra fry gla gle glg gsw heb hin hrv hsb hun hye ido ile "
    "ina ind isl ita jav jpn kab kat kaz khm kor kur kzj lat lfn lit lvs mal mar max mhr mkd mon nds "
    "nld nno nob nov oci orv pam pes pms pol por ron rus slk slv spa sqi srp swe swg swh tam tat tel "
    "tgl tha tuk tur tzl uig ukr urd uzb vie war wuu xho yid yue zsm".split()
)
# The 14 XNLI languages other than English (mSimCSE's Tatoeba-14).
TATOEBA14 = tuple("ara bul cmn deu ell fra hin rus spa swh tha tur urd vie".split())
# The XTREME subset (Tatoeba-36).
TATOEBA36 = TATOEBA14 + tuple(
    "afr ben est eus fin heb hun ind ita jav jpn kat kaz kor mal mar nld pes por tam tel tgl".split()
)


def tatoeba_paths(folder, lang: str):
    return folder / f"tatoeba.{lang}-eng.{lang}", folder / f"tatoeba.{lang}-eng.eng"


def load_tatoeba(data_dir, lang: str) -> tuple[list[str], list[str]]:
    """(xx sentences, English sentences), line-aligned, exactly as in the files."""
    folder = resolve_dataset_dir(data_dir, "tatoeba", "tatoeba.afr-eng.afr")
    xx_path, en_path = tatoeba_paths(folder, lang)
    for p in (xx_path, en_path):
        if not p.is_file():
            raise FileNotFoundError(f"tatoeba {lang}: missing file {p}")
    xx, en = read_lines(xx_path), read_lines(en_path)
    if len(xx) != len(en):
        raise ValueError(f"tatoeba {lang}: {xx_path} has {len(xx)} lines but {en_path} has {len(en)}")
    return xx, en


def tatoeba(
    encode: Encode,
    data_dir,
    langs: Optional[Sequence[str]] = None,
    *,
    max_length: Optional[int] = None,
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
) -> dict:
    """Tatoeba accuracy in both directions, per language, with the 14/36/all averages.

    Args:
      encode: list of sentences -> [n, d] embeddings.
      data_dir: the data root or the ``tatoeba/`` folder.
      langs: ISO 639-3 codes; default all 112. A language whose files are absent is listed
        in ``langs_missing`` and makes every average that needs it null.
      max_length, batch_size, device: recorded in ``meta`` only.
    Returns:
      {"per_lang": {xxx: {"xx2en", "en2xx", "mean", "n"}}, "avg": {"tatoeba14", "tatoeba36",
      "all" (the 112)}, "avg_present": {same keys, over the evaluated languages only},
      "langs_evaluated", "langs_missing", "meta"}. Scores in percent.
    """
    folder = resolve_dataset_dir(data_dir, "tatoeba", "tatoeba.afr-eng.afr")
    langs = list(LANGS_112 if langs is None else langs)
    log = FileLog()
    per_lang, missing = {}, []
    for lang in langs:
        xx_path, en_path = tatoeba_paths(folder, lang)
        if not (xx_path.is_file() and en_path.is_file()):
            missing.append(lang)
            continue
        xx, en = load_tatoeba(folder, lang)
        log.add_all([xx_path, en_path])
        x_emb, e_emb = np.asarray(encode(xx)), np.asarray(encode(en))
        a, b = top1_accuracy(x_emb, e_emb), top1_accuracy(e_emb, x_emb)
        per_lang[lang] = {"xx2en": a, "en2xx": b, "mean": (a + b) / 2, "n": len(xx)}
    if not per_lang:
        raise FileNotFoundError(f"tatoeba: none of {langs} found under {folder}")

    def group_mean(group, partial):
        vals = [per_lang[l]["mean"] if l in per_lang else None for l in group]
        if partial:
            vals = [v for v in vals if v is not None]
        return mean_or_none(vals)

    groups = {"tatoeba14": TATOEBA14, "tatoeba36": TATOEBA36, "all": LANGS_112}
    return {
        "per_lang": per_lang,
        "avg": {name: group_mean(g, partial=False) for name, g in groups.items()},
        "avg_present": {name: group_mean(g, partial=True) for name, g in groups.items()},
        "langs_evaluated": list(per_lang),
        "langs_missing": missing,
        "meta": log.meta(max_length=max_length, batch_size=batch_size, device=device),
    }
