"""BUCC 2018 parallel-sentence mining, scored as LASER, XTREME and mSimCSE do.

Files (XTREME layout, which renames BUCC's "sample" split to ``dev`` and "training" to
``test``): ``<l>-en.<split>.<l>`` and ``<l>-en.<split>.en`` hold ``<id>\\t<sentence>``;
``<l>-en.<split>.gold`` holds ``<l-id>\\t<en-id>``.

Pipeline:
1. Each side is deduplicated by text (first occurrence order) and each distinct text is
   encoded once, as LASER and XTREME mine over texts.
2. `mining.mine_pairs`: margin ratio with k=4 neighbours in both directions, the union of
   forward and backward best candidates, kept greedily 1-to-1.
3. A mined text pair stands for every (l-id, en-id) pair with those texts, at its score
   (XTREME's ``bucc_eval``).
4. Oracle F1: the threshold that maximises F1 on the evaluated split itself (mSimCSE,
   XTREME). This flatters every model equally; it is what published tables report.
5. Honest variants:
   - ``heldout``: the source ids are split 50/50 with a seeded permutation; the threshold
     tuned on one half is applied to the other, both ways. Offline only the zh-en sample
     is complete, so this is the honest number we can compute.
   - ``thresholds={lang: t}``: apply a threshold tuned elsewhere (for example the ``dev``
     result's ``threshold``, applied with ``split="test"``); reported under ``applied``.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from mst5_jax.evals.data import FileLog, read_lines, resolve_dataset_dir
from mst5_jax.evals.metrics import mean_or_none
from mst5_jax.evals.mining import DEFAULT_BLOCK_ELEMS, apply_threshold, mine_pairs, optimal_threshold

Encode = Callable[[list[str]], np.ndarray]

BUCC_LANGS = ("de", "fr", "ru", "zh")


def bucc_paths(folder, lang: str, split: str) -> dict:
    stem = f"{lang}-en.{split}"
    return {"src": folder / f"{stem}.{lang}", "en": folder / f"{stem}.en", "gold": folder / f"{stem}.gold"}


def read_bucc_corpus(path) -> tuple[list[str], list[str]]:
    """(ids, sentences) of an ``<id>\\t<sentence>`` file; the sentence is kept verbatim."""
    ids, sents = [], []
    for lineno, line in enumerate(read_lines(path), start=1):
        if "\t" not in line:
            raise ValueError(f"{path}:{lineno}: expected '<id>\\t<sentence>', got {line[:80]!r}")
        i, s = line.split("\t", 1)
        ids.append(i)
        sents.append(s)
    return ids, sents


def read_bucc_gold(path) -> set[tuple[str, str]]:
    gold = set()
    for lineno, line in enumerate(read_lines(path), start=1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected '<src-id>\\t<en-id>', got {line[:80]!r}")
        gold.add((parts[0], parts[1]))
    return gold


def _dedup(sents: list[str]) -> tuple[list[str], list[list[int]]]:
    """Distinct texts in first-occurrence order, and the line indices of each."""
    where: dict[str, list[int]] = {}
    for i, s in enumerate(sents):
        where.setdefault(s, []).append(i)
    return list(where), list(where.values())


def mine_candidates(encode: Encode, src_ids, src_sents, en_ids, en_sents, k: int = 4,
                    block_elems: int = DEFAULT_BLOCK_ELEMS) -> dict[tuple[str, str], float]:
    """Mined (src-id, en-id) -> margin score, over distinct texts expanded back to ids."""
    src_u, src_lines = _dedup(src_sents)
    en_u, en_lines = _dedup(en_sents)
    mined = mine_pairs(np.asarray(encode(src_u)), np.asarray(encode(en_u)), k=k, block_elems=block_elems)
    cands: dict[tuple[str, str], float] = {}
    for s, t, score in zip(mined.src, mined.trg, mined.score):
        for i in src_lines[s]:
            for j in en_lines[t]:
                key = (src_ids[i], en_ids[j])
                cands[key] = max(float(score), cands.get(key, -np.inf))
    return cands


def _arrays(cands: Mapping[tuple[str, str], float], gold: set, keep_src: Optional[set] = None):
    items = [(p, s) for p, s in cands.items() if keep_src is None or p[0] in keep_src]
    scores = np.array([s for _, s in items], dtype=np.float64)
    correct = np.array([p in gold for p, _ in items], dtype=bool)
    return scores, correct


def heldout_split_scores(cands, gold, src_ids: Sequence[str], seed: int = 0) -> dict:
    """Tune the threshold on a seeded half of the source ids, apply it to the other half.

    Returns {"seed", "a_to_b": {...}, "b_to_a": {...}, "f1_mean"}, where each direction has
    the tuned threshold, precision, recall and F1 (percent) on the held-out half.
    """
    perm = np.random.default_rng(seed).permutation(sorted(set(src_ids)))
    halves = (set(perm[: len(perm) // 2].tolist()), set(perm[len(perm) // 2 :].tolist()))
    out = {"seed": seed}
    for name, tune, test in (("a_to_b", halves[0], halves[1]), ("b_to_a", halves[1], halves[0])):
        tune_gold = {g for g in gold if g[0] in tune}
        test_gold = {g for g in gold if g[0] in test}
        thr = optimal_threshold(*_arrays(cands, tune_gold, tune), len(tune_gold)).threshold
        res = apply_threshold(*_arrays(cands, test_gold, test), len(test_gold), thr).as_dict()
        out[name] = {**res, "num_gold": len(test_gold)}
    out["f1_mean"] = (out["a_to_b"]["f1"] + out["b_to_a"]["f1"]) / 2
    return out


def bucc(
    encode: Encode,
    data_dir,
    langs: Sequence[str] = BUCC_LANGS,
    *,
    split: str = "dev",
    k: int = 4,
    thresholds: Optional[Mapping[str, float]] = None,
    heldout_seed: int = 0,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
    max_length: Optional[int] = None,
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
) -> dict:
    """BUCC mining F1 (percent) per language, with the oracle threshold and honest variants.

    A language counts only when its corpus, English side and gold all exist; the others
    are listed in ``langs_missing``. ``avg`` (mean F1) is null unless every requested
    language was evaluated; ``avg_present`` is the mean over those that were.
    Returns {"per_lang": {l: {"f1", "precision", "recall", "threshold", "num_candidates",
    "num_gold", "heldout", ["applied"]}}, "avg", "avg_present", "langs_evaluated",
    "langs_missing", "meta"}.
    """
    folder = resolve_dataset_dir(data_dir, "bucc2018", "zh-en.dev.gold")
    log = FileLog()
    per_lang, missing = {}, []
    for lang in langs:
        paths = bucc_paths(folder, lang, split)
        if not all(p.is_file() for p in paths.values()):
            missing.append(lang)
            continue
        log.add_all(paths.values())
        src_ids, src_sents = read_bucc_corpus(paths["src"])
        en_ids, en_sents = read_bucc_corpus(paths["en"])
        gold = read_bucc_gold(paths["gold"])
        cands = mine_candidates(encode, src_ids, src_sents, en_ids, en_sents, k=k, block_elems=block_elems)
        scores, correct = _arrays(cands, gold)
        best = optimal_threshold(scores, correct, len(gold))
        entry = {
            "f1": best.f1, "precision": best.precision, "recall": best.recall, "threshold": best.threshold,
            "num_candidates": len(cands), "num_gold": len(gold),
            "heldout": heldout_split_scores(cands, gold, src_ids, seed=heldout_seed),
        }
        if thresholds is not None and lang in thresholds:
            entry["applied"] = apply_threshold(scores, correct, len(gold), float(thresholds[lang])).as_dict()
        per_lang[lang] = entry
    if not per_lang:
        tried = "; ".join(str(p) for lang in langs for p in bucc_paths(folder, lang, split).values())
        raise FileNotFoundError(f"bucc: no language has corpus, English side and gold; tried: {tried}")
    f1s = [per_lang[l]["f1"] for l in per_lang]
    return {
        "per_lang": per_lang,
        "avg": mean_or_none(f1s) if not missing else None,
        "avg_present": mean_or_none(f1s),
        "langs_evaluated": list(per_lang),
        "langs_missing": missing,
        "split": split,
        "meta": log.meta(max_length=max_length, batch_size=batch_size, device=device, k=k),
    }
