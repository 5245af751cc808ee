"""NLI rows to contrastive triplets, with mSimCSE's semantics (pure Python + numpy).

Every source (local XNLI files, XNLI-MT, TFDS, user files) is read into `NliRow`s; the
functions here turn them into `Triplet`s, so the same source gives the same triplets on
every path (numpy iterator or seqio).

Pairing (`pair_by_key`): one triplet per entailment row whose key also has a
contradiction row; the entailment hypothesis is the positive, the contradiction
hypothesis the hard negative. Several entailments or contradictions under one key are
paired in file order (first with first, ...); the unpaired ones are counted in
`PairingStats`. Neutral rows are ignored.

Keys:
* line-aligned multilingual files (`AlignedNli`: XNLI dev/test, XNLI-MT, TFDS xnli):
  the **English** row's premise, i.e. the English 3-row block for XNLI. Translated
  premises sometimes collide (ur dev has 829 distinct premises for 830 blocks); English
  blocks give exactly 830 dev and 1,670 test triplets in every language.
* unaligned files (KorNLI, user data): the premise text (`triplets_from_rows`).

`group_id` is the index of the key in order of first appearance: the English block
index for aligned data. Translations of one premise share it, so a loss can mask them as
false negatives.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Hashable, Iterable, Optional, Sequence

import numpy as np

from mst5_jax.datasets import xnli

log = logging.getLogger(__name__)

LABELS = ("entailment", "neutral", "contradiction")  # TFDS ClassLabel order
_LABEL_ALIASES = {"contradictory": "contradiction"}  # XNLI-MT and XTREME translate-train spell it so
XNLI_LANGUAGES = xnli.LANGUAGES


@dataclasses.dataclass(frozen=True)
class NliRow:
    """One NLI example. `line` is the 1-based line (or example) number in its source."""
    premise: str
    hypothesis: str
    label: str
    line: int


@dataclasses.dataclass(frozen=True)
class Triplet:
    """(anchor, positive, negative) texts, the group id, and the language of each text."""
    anchor: str
    positive: str
    negative: str
    group_id: int
    langs: tuple[str, str, str] = ("", "", "")


@dataclasses.dataclass
class PairingStats:
    keys: int = 0
    triplets: int = 0
    extra_entailments: int = 0
    extra_contradictions: int = 0
    keys_without_triplet: int = 0
    skipped_bad_rows: int = 0


def normalize_label(raw) -> Optional[str]:
    """'entailment' | 'neutral' | 'contradiction', or None for an unknown/missing label.

    Accepts TFDS ClassLabel ints (0, 1, 2; -1 means no gold label) and XNLI-MT's
    'contradictory'.
    """
    if isinstance(raw, (int, np.integer)):
        return LABELS[int(raw)] if 0 <= int(raw) < len(LABELS) else None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if not isinstance(raw, str):
        return None
    s = raw.strip().lower()
    s = _LABEL_ALIASES.get(s, s)
    return s if s in LABELS else None


def text_problem(s: Optional[str]) -> Optional[str]:
    """Why `s` is unusable as a sentence ('empty text', 'broken encoding'), or None."""
    if s is None or not s.strip():
        return "empty text"
    # Files are decoded with errors='surrogateescape': undecodable bytes become lone
    # surrogates. (A U+FFFD already in the text is valid UTF-8 and kept: XNLI test has 3 rows
    # per language in en/hi/ur with one, so dropping them would lose a triplet.)
    if any("\udc80" <= ch <= "\udcff" for ch in s):
        return "broken encoding"
    if "\x00" in s:  # a NUL byte: a binary or corrupt file, never text
        return "NUL byte"
    return None


class BadRows:
    """Counts skipped rows per reason and keeps the first few line numbers for the warning."""

    FIRST = 5

    def __init__(self, source: str):
        self.source = source
        self.by_reason: dict[str, list[int]] = {}
        self.counts: dict[str, int] = {}

    def add(self, line: int, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lines = self.by_reason.setdefault(reason, [])
        if len(lines) < self.FIRST:
            lines.append(line)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "; ".join(f"{n} {reason} (first at lines {self.by_reason[reason]})"
                         for reason, n in sorted(self.counts.items()))

    def report(self, rows_read: int) -> None:
        """Warns about skipped rows; raises ValueError when every row was bad."""
        if not self.total:
            return
        if rows_read and self.total >= rows_read:
            raise ValueError(f"{self.source}: every one of its {rows_read} rows is unusable: {self.summary()}")
        log.warning("%s: skipped %d of %d rows: %s", self.source, self.total, rows_read, self.summary())


def make_row(premise, hypothesis, label, line: int, bad: BadRows) -> Optional[NliRow]:
    """An `NliRow`, or None (recorded in `bad`) for empty/broken text or an unknown label."""
    for text in (premise, hypothesis):
        problem = text_problem(text)
        if problem:
            bad.add(line, problem)
            return None
    norm = normalize_label(label)
    if norm is None:
        bad.add(line, f"unknown label {label!r}" if len(repr(label)) < 40 else "unknown label")
        return None
    return NliRow(premise, hypothesis, norm, line)


def pair_by_key(keys: Sequence[Optional[Hashable]], labels: Sequence[Optional[str]]
                ) -> tuple[list[tuple[int, int, int]], PairingStats]:
    """Pairs entailment and contradiction rows that share a key.

    Args:
      keys: one key per row (None: the row is skipped).
      labels: one normalised label per row (None: skipped).
    Returns:
      ([(group_id, entailment_row, contradiction_row), ...] in key order then file
      order, stats). group_id is the key's index in order of first appearance.
    """
    groups: dict[Hashable, tuple[list[int], list[int]]] = {}
    stats = PairingStats()
    for i, (key, label) in enumerate(zip(keys, labels)):
        if key is None or label is None:
            stats.skipped_bad_rows += 1
            continue
        ents, cons = groups.setdefault(key, ([], []))
        if label == "entailment":
            ents.append(i)
        elif label == "contradiction":
            cons.append(i)
    out = []
    for gid, (ents, cons) in enumerate(groups.values()):
        out.extend((gid, e, c) for e, c in zip(ents, cons))
        stats.extra_entailments += max(0, len(ents) - len(cons))
        stats.extra_contradictions += max(0, len(cons) - len(ents))
        stats.keys_without_triplet += int(not (ents and cons))
    stats.keys = len(groups)
    stats.triplets = len(out)
    if stats.extra_entailments or stats.extra_contradictions:
        log.info("pairing: %d extra entailments and %d extra contradictions left unpaired",
                 stats.extra_entailments, stats.extra_contradictions)
    return out, stats


def triplets_from_rows(rows: Sequence[Optional[NliRow]], lang: str = "") -> tuple[list[Triplet], PairingStats]:
    """Triplets of an unaligned file, keyed by premise text (KorNLI, SNLI/MNLI, user data)."""
    index, stats = pair_by_key([r.premise if r else None for r in rows], [r.label if r else None for r in rows])
    return [Triplet(rows[e].premise, rows[e].hypothesis, rows[c].hypothesis, gid, (lang, lang, lang))
            for gid, e, c in index], stats


@dataclasses.dataclass
class AlignedNli:
    """Line-aligned multilingual NLI data: `rows[lang][i]` is row i in `lang` (None if bad)."""
    name: str
    rows: dict[str, list[Optional[NliRow]]]
    pivot: str = "en"

    def __post_init__(self):
        if self.pivot not in self.rows:
            raise ValueError(f"{self.name}: aligned data needs the pivot language {self.pivot!r}; "
                             f"found {sorted(self.rows)}")
        lengths = {lang: len(r) for lang, r in self.rows.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{self.name}: languages are not line-aligned (row counts {lengths})")

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.rows)

    def __len__(self) -> int:
        return len(self.rows[self.pivot])


def aligned_index(data: AlignedNli) -> tuple[list[tuple[int, int, int]], PairingStats]:
    """`pair_by_key` over the pivot (English) rows: keys are English premises (blocks)."""
    pivot = data.rows[data.pivot]
    return pair_by_key([r.premise if r else None for r in pivot], [r.label if r else None for r in pivot])


def _usable(data: AlignedNli, lang: str, i: int) -> Optional[NliRow]:
    """Row i in `lang` if present and its label agrees with the pivot's, else None."""
    row = data.rows[lang][i]
    pivot = data.rows[data.pivot][i]
    if row is None or pivot is None or row.label != pivot.label:
        return None
    return row


def mono_triplets(data: AlignedNli, lang: str) -> list[Triplet]:
    """Monolingual triplets in `lang`, keyed by the English blocks."""
    if lang not in data.rows:
        raise KeyError(f"{data.name}: no language {lang!r}; languages are {list(data.languages)}")
    index, _ = aligned_index(data)
    out, skipped = [], 0
    for gid, e, c in index:
        re_, rc = _usable(data, lang, e), _usable(data, lang, c)
        if re_ is None or rc is None:
            skipped += 1
            continue
        out.append(Triplet(re_.premise, re_.hypothesis, rc.hypothesis, gid, (lang, lang, lang)))
    if skipped:
        log.warning("%s/%s: %d of %d triplets skipped (bad or mislabelled rows in %s)",
                    data.name, lang, skipped, len(index), lang)
    return out


def cross_language_draws(num_triplets: int, num_langs: int, seed: int) -> np.ndarray:
    """The cross-lingual recipe's random languages: int64 [num_triplets, num_langs, 2].

    `draws[t, a, 0]` is the positive's language and `draws[t, a, 1]` the negative's, for
    English triplet t with its premise in language a; each uniform over the languages and
    independent: `np.random.default_rng(seed).integers(0, num_langs, size=(T, L, 2))`.
    """
    return np.random.default_rng(seed).integers(0, num_langs, size=(num_triplets, num_langs, 2))


def cross_triplets(data: AlignedNli, seed: int, langs: Optional[Sequence[str]] = None) -> list[Triplet]:
    """mSimCSE's cross-lingual triplets.

    For each English triplet t (in `aligned_index` order) and each language a of `langs`
    (in order), emits the premise in a, the positive in a language drawn for (t, a) and the
    negative in an independently drawn one (`cross_language_draws`). So there are
    len(langs) examples per English triplet, all with its group id. Examples whose rows are
    bad in a drawn language are skipped (the draws do not shift).
    """
    langs = tuple(langs or data.languages)
    index, _ = aligned_index(data)
    draws = cross_language_draws(len(index), len(langs), seed)
    out, skipped = [], 0
    for t, (gid, e, c) in enumerate(index):
        for a, la in enumerate(langs):
            lp, ln = langs[draws[t, a, 0]], langs[draws[t, a, 1]]
            ra, rp, rn = _usable(data, la, e), _usable(data, lp, e), _usable(data, ln, c)
            if ra is None or rp is None or rn is None:
                skipped += 1
                continue
            out.append(Triplet(ra.premise, rp.hypothesis, rn.hypothesis, gid, (la, lp, ln)))
    if skipped:
        log.warning("%s: %d cross-lingual examples skipped for bad rows", data.name, skipped)
    return out


def parallel_triplets(data: AlignedNli, seed: int, langs: Optional[Sequence[str]] = None) -> list[Triplet]:
    """Translation pairs from line-aligned files (not part of the paper's recipe).

    For each English block g (premise key, in order) and each language a: the anchor is
    g's premise in a; the positive is g's premise in a language b != a; the negative is
    the premise of another block g' != g, also in b (a random other sentence, since
    translation data has no hard negative). b and g' are drawn with
    `np.random.default_rng(seed)`: b = (a + 1 + r1) mod L with r1 in [0, L-1) and
    g' = (g + 1 + r2) mod G with r2 in [0, G-1), drawn as int64 [G, L, 2].
    """
    langs = tuple(langs or data.languages)
    pivot = data.rows[data.pivot]
    first_row: dict[str, int] = {}
    for i, r in enumerate(pivot):
        if r is not None and r.premise not in first_row:
            first_row[r.premise] = i
    rows = list(first_row.values())
    n_blocks, n_langs = len(rows), len(langs)
    if n_blocks < 2 or n_langs < 2:
        raise ValueError(f"{data.name}: parallel pairs need >= 2 premises and >= 2 languages")
    rng = np.random.default_rng(seed)
    r = np.stack([rng.integers(0, n_langs - 1, size=(n_blocks, n_langs)),
                  rng.integers(0, n_blocks - 1, size=(n_blocks, n_langs))], axis=-1)
    out = []
    for g, i in enumerate(rows):
        for a, la in enumerate(langs):
            lb = langs[(a + 1 + r[g, a, 0]) % n_langs]
            j = rows[(g + 1 + r[g, a, 1]) % n_blocks]
            ra, rb, rn = data.rows[la][i], data.rows[lb][i], data.rows[lb][j]
            if ra is None or rb is None or rn is None:
                continue
            out.append(Triplet(ra.premise, rb.premise, rn.premise, g, (la, lb, lb)))
    return out


def concat(parts: Iterable[tuple[str, list[Triplet]]]) -> list[Triplet]:
    """Concatenates (group_space, triplets) parts in order.

    Parts in the same group space (e.g. the XNLI languages of one split, whose group id is
    the English block index) keep their ids, so translations stay in one group; each new
    space is offset past all ids used so far.
    """
    out: list[Triplet] = []
    offsets: dict[str, int] = {}
    next_free = 0
    for space, part in parts:
        if space not in offsets:
            offsets[space] = next_free
        off = offsets[space]
        out.extend(dataclasses.replace(t, group_id=t.group_id + off) if off else t for t in part)
        next_free = max(next_free, off + 1 + max((t.group_id for t in part), default=-1))
    return out
