"""The evaluator registry: each evaluation task is described once, as an `Evaluator` record.

`python -m mst5_jax.evaluate` (its task list and markdown table), `python -m mst5_jax.study`
(the headline score it averages and the per-language rows it correlates) and the training
run's held-out evaluation all read these records; nothing else knows a task by name.

Adding an evaluator is one call, anywhere before the task is used::

    register(Evaluator("my_sts", my_sts_fn,
                       headline=lambda r: r["avg"],
                       table_rows=lambda r: [("avg", "avg")]))

`get(name)` of a name never registered raises a ValueError listing the known names: there
is no default task to fall back to.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from mst5_jax.evals.bucc import bucc
from mst5_jax.evals.retrieval import jsick_retrieval, xnli_retrieval
from mst5_jax.evals.sts import atec, bq, jsick, jsts, korsts, lcqmc, stsb_en, stsb_zh, xsts
from mst5_jax.evals.tatoeba import tatoeba

TableRows = list[tuple[str, str]]
"""(row label, dotted key inside the result), e.g. ("de", "per_lang.deu.mean")."""
LanguageRows = list[tuple[str, str, float]]
"""(row label, ISO 639-3 language, score) for every per-language number of a result."""

# ISO 639-1 -> the ISO 639-3 code this project uses (Tatoeba's file names; the paper's
# Tatoeba-14 pairs XNLI's sw with swh and zh with cmn).
ISO1_TO_3 = {
    "ar": "ara", "bg": "bul", "de": "deu", "el": "ell", "en": "eng", "es": "spa", "fr": "fra", "hi": "hin",
    "ru": "rus", "sw": "swh", "th": "tha", "tr": "tur", "ur": "urd", "vi": "vie", "zh": "cmn", "it": "ita",
    "nl": "nld", "ja": "jpn", "ko": "kor",
}


def _no_languages(result: dict) -> LanguageRows:
    return []


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One evaluation task.

    Attributes:
      name: the task name the CLIs use (``--tasks NAME``).
      fn: ``fn(encode, data_dir, *, max_length=None, batch_size=None, device=None, **kw) -> dict``,
        the public evaluator function (PUBLIC_API §3).
      headline: result -> the one number the study averages (None when not available).
      table_rows: result -> rows of the evaluate CLI's markdown table.
      languages: result -> per-language rows (study's gains analysis); none by default.
      defaults: keyword arguments passed to `fn` unless the caller gives them.
    """

    name: str
    fn: Callable[..., dict]
    headline: Callable[[dict], Optional[float]]
    table_rows: Callable[[dict], TableRows]
    languages: Callable[[dict], LanguageRows] = _no_languages
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, encode, data_dir, **kwargs) -> dict:
        return self.fn(encode, data_dir, **{**self.defaults, **kwargs})


_REGISTRY: dict[str, Evaluator] = {}


def register(evaluator: Evaluator, *, replace: bool = False) -> Evaluator:
    """Adds `evaluator`; a second record under the same name is a ValueError unless `replace`."""
    if evaluator.name in _REGISTRY and not replace:
        raise ValueError(f"evaluator {evaluator.name!r} is already registered; pass replace=True to redefine it")
    _REGISTRY[evaluator.name] = evaluator
    return evaluator


def unregister(name: str) -> None:
    """Removes a record (tests that register toy evaluators clean up with this)."""
    get(name)
    del _REGISTRY[name]


def get(name: str) -> Evaluator:
    """The record of task `name`; an unknown name is a ValueError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown evaluation task {name!r}; known tasks: {', '.join(_REGISTRY)}") from None


def names() -> list[str]:
    """Registered task names, in registration order."""
    return list(_REGISTRY)


def registry() -> Mapping[str, Evaluator]:
    """The live name -> record mapping (read-only by convention; use `register`)."""
    return _REGISTRY


# ------------------------------------------------------------------ the project's evaluators
def _first_present(*values):
    return next((v for v in values if v is not None), None)


def language_of_track(track: str) -> str:
    """An STS track or language pair -> its non-English language (English for en-en), ISO 639-3."""
    parts = [p for p in track.split("-") if len(p) == 2]
    other = [p for p in parts if p != "en"]
    return ISO1_TO_3.get(other[0], other[0]) if other else "eng"


def _tatoeba_rows(r: dict) -> TableRows:
    rows = [(lang, f"per_lang.{lang}.mean") for lang in r.get("per_lang", {})]
    for avg in ("avg", "avg_present"):
        rows += [(f"{avg} {g}", f"{avg}.{g}") for g in r.get(avg, {})]
    return rows


def _tatoeba_headline(r: dict) -> Optional[float]:
    for group in ("tatoeba36", "tatoeba14", "all"):
        if r.get("avg", {}).get(group) is not None:
            return r["avg"][group]
    return r.get("avg_present", {}).get("all")


def _bucc_rows(r: dict) -> TableRows:
    rows = []
    for lang, v in r.get("per_lang", {}).items():
        rows += [(f"{lang} F1 (oracle threshold)", f"per_lang.{lang}.f1"),
                 (f"{lang} F1 (threshold from other half)", f"per_lang.{lang}.heldout.f1_mean")]
        if "applied" in v:
            rows.append((f"{lang} F1 (given threshold)", f"per_lang.{lang}.applied.f1"))
    return rows + [("avg", "avg"), ("avg_present", "avg_present")]


def _xsts_rows(r: dict) -> TableRows:
    rows = [(t, f"per_track.{t}") for t in r.get("per_track", {})] + [("avg", "avg")]
    rows += [(f"extended {p}", f"extended.{p}") for p in r.get("extended", {})]
    if "avg_extended" in r:
        rows.append(("avg extended", "avg_extended"))
    return rows


def _xsts_languages(r: dict) -> LanguageRows:
    rows = [(t, language_of_track(t), v) for t, v in r.get("per_track", {}).items()]
    return rows + [(f"{p} (extended)", language_of_track(p), v) for p, v in r.get("extended", {}).items()]


def _present(rows) -> LanguageRows:
    return [(label, lang, float(v)) for label, lang, v in rows if v is not None]


register(Evaluator(
    "tatoeba", tatoeba, headline=_tatoeba_headline, table_rows=_tatoeba_rows,
    languages=lambda r: _present((lang, lang, v["mean"]) for lang, v in r.get("per_lang", {}).items())))
register(Evaluator(
    "bucc", bucc, headline=lambda r: _first_present(r.get("avg"), r.get("avg_present")), table_rows=_bucc_rows,
    languages=lambda r: _present((f"{l}-en", ISO1_TO_3.get(l, l), v["f1"]) for l, v in r.get("per_lang", {}).items())))
register(Evaluator("xsts", xsts, headline=lambda r: r.get("avg"), table_rows=_xsts_rows,
                   languages=lambda r: _present(_xsts_languages(r))))
register(Evaluator(
    "xnli_retrieval", xnli_retrieval, headline=lambda r: _first_present(r.get("avg_xx2en"), r.get("avg_all")),
    table_rows=lambda r: [(f"{xx}->en", f"xx2en.{xx}") for xx in r.get("xx2en", {})]
    + [("avg xx->en", "avg_xx2en"), ("avg all directions", "avg_all")],
    languages=lambda r: _present((f"{xx}->en", ISO1_TO_3.get(xx, xx), v) for xx, v in r.get("xx2en", {}).items())))
register(Evaluator(
    "jsick_retrieval", jsick_retrieval, headline=lambda r: r.get("mean"),
    table_rows=lambda r: [("en->ja", "en2ja"), ("ja->en", "ja2en"), ("mean", "mean")],
    languages=lambda r: _present([("en->ja", "jpn", r.get("en2ja")), ("ja->en", "jpn", r.get("ja2en"))])))

# Single-pair STS-style sets: one Spearman x 100 each.
for _name, _fn in (("jsts", jsts), ("jsick", jsick), ("stsb_zh", stsb_zh), ("korsts", korsts),
                   ("stsb_en", stsb_en), ("lcqmc", lcqmc), ("bq", bq), ("atec", atec)):
    register(Evaluator(_name, _fn, headline=lambda r: r.get("spearman"),
                       table_rows=lambda r: [("spearman", "spearman")]))
del _name, _fn
