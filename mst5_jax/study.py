"""`python -m mst5_jax.study`: the scaling study, from runs to a report folder with plots.

    python -m mst5_jax.study --sizes small,base,large,xl,xxl --setting cross \\
        --recipe xxl_lora.gin --tasks tatoeba,bucc,xsts --out study_cross
    python -m mst5_jax.study --runs small=/runs/s,xxl=/runs/x --setting cross --out study_cross
    python -m mst5_jax.study --sizes tiny-16,tiny-32,tiny-64 --setting cross --data local \\
        --recipe demo_cpu.gin --tasks xnli_retrieval,xsts --out /tmp/study    # CPU, minutes

For each size it trains (`mst5_jax.training.trainer.run`, resumed when MODEL_DIR already holds the
run) or takes an existing run / HF directory (`--runs`), evaluates every size with the same
tasks (`mst5_jax.evaluate.run`), and writes to `--out`:

* `results.json` / `results.md`: every score per size, task and language; the average
  score per size; the power-law fit; the per-language gains with resource class and
  typological distance, and the languages missing from either table.
* `scaling.png`: average score against encoder parameters (log x) with the fitted power law
  score = c * N^k, its exponent k and R^2 (of the straight line in log-log space).
* `gains.png`: per-language gain (largest minus smallest size, in points) against (a) the
  Joshi et al. (2020) resource class (`docs/data/joshi2020_classes.csv`) and (b) the
  cosine distance from English of lang2vec 1.1.2 URIEL vectors (`--feature_sets`).

Sizes are mT5 names (`small`, ..., `xxl`: the recipe's gin file, then `mt5_<size>.gin`) or
`tiny-N`: the `tiny` preset with d_model N, d_ff 2N, heads N/16 (at least 1) of 16, 2 layers,
trained from random init (for CPU checks). `--setting` picks the training task: cross
(cross-lingual NLI), mono (monolingual NLI in every language) or en (English NLI); with
`--data paper` these are the paper's sets (XNLI-MT / SNLI+MNLI), with `--data local` the
offline XNLI files (`docs/DATA.md`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np
from mst5_jax.training import gin_utils
from mst5_jax.utils import paths

REPO_ROOT = paths.REPO_ROOT
RESOURCE_TABLE = REPO_ROOT / "docs" / "data" / "joshi2020_classes.csv"
DEFAULT_FEATURE_SETS = "syntax_knn+phonology_knn+inventory_knn"
MT5_SIZES = ("small", "base", "large", "xl", "xxl")

# Training task of each setting: (paper data, offline local XNLI files).
SETTING_TASKS = {
    "cross": ("mst5_msimcse_cross_all", "mst5_xnli_cross"),
    "mono": ("mst5_xnli_mono", "mst5_xnli_mono"),
    "en": ("mst5_nli_en", "mst5_nli_en_xnli"),
}

# ISO 639-1 -> the ISO 639-3 code this project uses (Tatoeba's file names; PAPER.md's
# Tatoeba-14 pairs XNLI's sw with swh and zh with cmn).
ISO1_TO_3 = {
    "ar": "ara", "bg": "bul", "de": "deu", "el": "ell", "en": "eng", "es": "spa", "fr": "fra", "hi": "hin",
    "ru": "rus", "sw": "swh", "th": "tha", "tr": "tur", "ur": "urd", "vi": "vie", "zh": "cmn", "it": "ita",
    "nl": "nld", "ja": "jpn", "ko": "kor",
}


# ---------------------------------------------------------------------- sizes and runs
@dataclasses.dataclass
class Size:
    """One point of the study: a name, and how to get its model."""

    name: str
    gin_files: list[str] = dataclasses.field(default_factory=list)
    bindings: list[str] = dataclasses.field(default_factory=list)
    run_dir: Optional[str] = None  # an existing run / HF directory (no training)
    adapter: Optional[str] = None


def tiny_overrides(width: int) -> dict:
    """`tiny-N`: d_model N, d_ff 2N, N/16 heads (>= 1) of d_kv 16, 2 layers."""
    if width < 8:
        raise ValueError(f"tiny-{width}: d_model must be at least 8")
    return {"d_model": width, "d_ff": 2 * width, "num_heads": max(1, width // 16), "d_kv": 16, "num_layers": 2}


def parse_sizes(spec: str) -> list[Size]:
    """"small,base" / "tiny-16,tiny-32" -> [Size]; an unknown name is a ValueError naming it."""
    sizes = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name in MT5_SIZES:
            sizes.append(Size(name, gin_files=[f"mt5_{name}.gin"]))
        elif name.startswith("tiny-") and name[5:].isdigit():
            sizes.append(Size(name, gin_files=["tiny.gin"],
                              bindings=[f"TrainConfig.model_overrides = {tiny_overrides(int(name[5:]))!r}"]))
        else:
            raise ValueError(f"--sizes: unknown size {name!r}; expected one of {', '.join(MT5_SIZES)} or tiny-N")
    if len({s.name for s in sizes}) != len(sizes):
        raise ValueError(f"--sizes {spec!r} names a size twice")
    return sizes


def parse_named_paths(spec: Optional[str], flag: str) -> dict[str, str]:
    """"a=/x,b=/y" -> {"a": "/x", "b": "/y"}."""
    out = {}
    for item in (s.strip() for s in (spec or "").split(",") if s.strip()):
        if "=" not in item:
            raise ValueError(f"{flag}: {item!r} is not NAME=PATH")
        name, path = item.split("=", 1)
        out[name.strip()] = path.strip()
    return out


def training_bindings(size: Size, setting: str, data: str, model_dir: pathlib.Path) -> list[str]:
    """Gin bindings the study adds for one size (the user's --gin.X=V come after these)."""
    if setting not in SETTING_TASKS:
        raise ValueError(f"--setting {setting!r}: expected one of {', '.join(SETTING_TASKS)}")
    task = SETTING_TASKS[setting][0 if data == "paper" else 1]
    binds = [f"MODEL_DIR = {str(model_dir)!r}", f"MIXTURE_OR_TASK_NAME = {task!r}", *size.bindings]
    if data == "local":
        binds.append("tasks.configure.train_source = 'xnli_local'")
    return binds


def train_config(size: Size, recipe: Sequence[str], setting: str, data: str, model_dir: pathlib.Path,
                 extra_bindings: Sequence[str]):
    """The parsed `TrainConfig` of one size (applies `tasks.configure`'s gin bindings too)."""
    cfg = gin_utils.parse_gin([*recipe, *size.gin_files],
                              [*training_bindings(size, setting, data, model_dir), *extra_bindings])
    gin_utils.configure_tasks()
    return cfg


# ---------------------------------------------------------------------- scores
def headline(task: str, result: dict) -> Optional[float]:
    """The one number of a task's result that the study averages (None if not available)."""
    if task == "tatoeba":
        for group in ("tatoeba36", "tatoeba14", "all"):
            if result.get("avg", {}).get(group) is not None:
                return result["avg"][group]
        return result.get("avg_present", {}).get("all")
    if task == "bucc":
        return result.get("avg") if result.get("avg") is not None else result.get("avg_present")
    if task == "xnli_retrieval":
        return result.get("avg_xx2en") if result.get("avg_xx2en") is not None else result.get("avg_all")
    if task == "jsick_retrieval":
        return result.get("mean")
    return result.get("avg", result.get("spearman"))


def language_of_track(track: str) -> str:
    """An STS track or language pair -> its non-English language (English for en-en), ISO 639-3."""
    parts = [p for p in track.split("-") if len(p) == 2]
    other = [p for p in parts if p != "en"]
    return ISO1_TO_3.get(other[0], other[0]) if other else "eng"


def per_language(task: str, result: dict) -> list[tuple[str, str, float]]:
    """(row label, ISO 639-3 language, score) for every per-language number of a result."""
    rows = []
    if task == "tatoeba":
        rows = [(lang, lang, v["mean"]) for lang, v in result.get("per_lang", {}).items()]
    elif task == "xnli_retrieval":
        rows = [(f"{xx}->en", ISO1_TO_3.get(xx, xx), v) for xx, v in result.get("xx2en", {}).items()]
    elif task == "bucc":
        rows = [(f"{l}-en", ISO1_TO_3.get(l, l), v["f1"]) for l, v in result.get("per_lang", {}).items()]
    elif task == "xsts":
        rows = [(t, language_of_track(t), v) for t, v in result.get("per_track", {}).items()]
        rows += [(f"{p} (extended)", language_of_track(p), v) for p, v in result.get("extended", {}).items()]
    elif task == "jsick_retrieval":
        rows = [("en->ja", "jpn", result.get("en2ja")), ("ja->en", "jpn", result.get("ja2en"))]
    return [(label, lang, float(v)) for label, lang, v in rows if v is not None]


def language_means(task: str, result: dict) -> dict[str, float]:
    """{language: mean of its rows} for one task's result."""
    groups: dict[str, list[float]] = {}
    for _, lang, v in per_language(task, result):
        groups.setdefault(lang, []).append(v)
    return {lang: float(np.mean(v)) for lang, v in groups.items()}


# ---------------------------------------------------------------------- the fit
def fit_power_law(params: Sequence[float], scores: Sequence[float]) -> dict:
    """Least-squares fit of score = c * N^k as a line in log-log space.

    Args:
      params: N, encoder parameters per size (> 0).
      scores: the average score per size (> 0; percent or Spearman x 100).
    Returns:
      {"coefficient": c, "exponent": k, "r2": R^2 of log(score) on log(N), "n_points"}.
      R^2 is null with fewer than 3 sizes (a line through 2 points fits exactly).
    """
    n = np.asarray(params, np.float64)
    y = np.asarray(scores, np.float64)
    if n.shape != y.shape or n.ndim != 1 or len(n) < 2:
        raise ValueError(f"fit_power_law: need >= 2 (params, score) pairs of equal length, got {n.shape}, {y.shape}")
    bad = [(float(a), float(b)) for a, b in zip(n, y) if not (a > 0 and b > 0)]
    if bad:
        raise ValueError(f"fit_power_law: a power law needs positive params and scores; got (N, score) {bad}")
    x, ly = np.log(n), np.log(y)
    k, logc = np.polyfit(x, ly, 1)
    resid = ly - (k * x + logc)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = None if len(n) < 3 or ss_tot == 0 else 1.0 - float(np.sum(resid**2)) / ss_tot
    return {"coefficient": float(math.exp(logc)), "exponent": float(k), "r2": r2, "n_points": int(len(n))}


# ---------------------------------------------------------------------- resource classes
def load_resource_classes(path: os.PathLike = RESOURCE_TABLE) -> dict[str, int]:
    """{ISO 639-3: Joshi et al. (2020) class 0-5} from the committed CSV (comment lines '#')."""
    path = pathlib.Path(path)
    lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip() and not l.startswith("#")]
    out = {}
    for i, row in enumerate(csv.DictReader(lines)):
        try:
            out[row["iso639_3"]] = int(row["joshi_class"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: data row {i + 1} {row}: expected iso639_3 and an integer joshi_class") from e
    return out


# ---------------------------------------------------------------------- typological distance
# lang2vec 1.1.2's feature sets stored in .npz files: name -> (file, source, feature prefix).
L2V_FEATURE_SETS = {
    "syntax_wals": ("features.npz", "WALS", "S_"),
    "phonology_wals": ("features.npz", "WALS", "P_"),
    "syntax_sswl": ("features.npz", "SSWL", "S_"),
    "syntax_ethnologue": ("features.npz", "ETHNO", "S_"),
    "phonology_ethnologue": ("features.npz", "ETHNO", "P_"),
    "inventory_ethnologue": ("features.npz", "ETHNO", "INV_"),
    "inventory_phoible_aa": ("features.npz", "PHOIBLE_AA", "INV_"),
    "inventory_phoible_gm": ("features.npz", "PHOIBLE_GM", "INV_"),
    "inventory_phoible_saphon": ("features.npz", "PHOIBLE_SAPHON", "INV_"),
    "inventory_phoible_spa": ("features.npz", "PHOIBLE_SPA", "INV_"),
    "inventory_phoible_ph": ("features.npz", "PHOIBLE_PH", "INV_"),
    "inventory_phoible_ra": ("features.npz", "PHOIBLE_RA", "INV_"),
    "inventory_phoible_upsid": ("features.npz", "PHOIBLE_UPSID", "INV_"),
    "syntax_knn": ("feature_predictions.npz", "predicted", "S_"),
    "phonology_knn": ("feature_predictions.npz", "predicted", "P_"),
    "inventory_knn": ("feature_predictions.npz", "predicted", "INV_"),
    "syntax_average": ("feature_averages.npz", "avg", "S_"),
    "phonology_average": ("feature_averages.npz", "avg", "P_"),
    "inventory_average": ("feature_averages.npz", "avg", "INV_"),
    "fam": ("family_features.npz", "FAM", ""),
    "geo": ("geocoord_features.npz", "GEOCOORDS", ""),
}


def lang2vec_data_dir() -> pathlib.Path:
    """The installed lang2vec wheel's data folder, found without importing lang2vec.lang2vec
    (which imports pkg_resources, gone from setuptools >= 81)."""
    spec = importlib.util.find_spec("lang2vec")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("typological distance needs lang2vec==1.1.2 (pip install 'mst5_jax[eval]')")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"


def lang2vec_features(langs: Sequence[str], feature_sets: str = DEFAULT_FEATURE_SETS,
                      data_dir: Optional[os.PathLike] = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """URIEL vectors as lang2vec's `get_features(langs, feature_sets)` builds them.

    `feature_sets` joins named sets with "+" (concatenation, as lang2vec). Codes are ISO
    639-3 (or 639-1, mapped with the wheel's letter_codes.json). Returns ({lang: float64
    [n_features], NaN where the database has no value (-1)}, [langs not in URIEL]).
    """
    data_dir = pathlib.Path(data_dir) if data_dir else lang2vec_data_dir()
    letter_codes = json.loads((data_dir / "letter_codes.json").read_text())
    parts = [p.strip() for p in feature_sets.split("+") if p.strip()]
    unknown = [p for p in parts if p not in L2V_FEATURE_SETS]
    if unknown or not parts:
        raise ValueError(f"feature sets {unknown or feature_sets!r}: choose '+'-joined names from {sorted(L2V_FEATURE_SETS)}")
    cache: dict[str, Any] = {}
    blocks: dict[str, list[np.ndarray]] = {l: [] for l in langs}
    missing: set[str] = set()
    for part in parts:
        file, source, prefix = L2V_FEATURE_SETS[part]
        db = cache.setdefault(file, np.load(data_dir / file))
        db_langs = {l: i for i, l in enumerate(db["langs"].tolist())}
        feat_idx = [i for i, f in enumerate(db["feats"].tolist()) if f.startswith(prefix)]
        src_idx = int(np.where(db["sources"] == source)[0][0])
        for lang in langs:
            code = letter_codes.get(lang, lang)
            if code not in db_langs:
                missing.add(lang)
                continue
            v = db["data"][db_langs[code], feat_idx, src_idx].astype(np.float64)
            blocks[lang].append(np.where(v == -1.0, np.nan, v))
    vectors = {l: np.concatenate(b) for l, b in blocks.items() if l not in missing}
    return vectors, sorted(missing)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """1 - cos(a, b) over the features both vectors have (NaN = missing); None if none."""
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if not both.any() or na == 0 or nb == 0:
        return None
    return float(1.0 - np.dot(a, b) / (na * nb))


def typological_distances(langs: Sequence[str], feature_sets: str = DEFAULT_FEATURE_SETS,
                          reference: str = "eng") -> tuple[dict[str, float], list[str]]:
    """{lang: cosine distance of its lang2vec vector from `reference`'s}, [missing langs]."""
    vectors, missing = lang2vec_features(sorted(set(langs) | {reference}), feature_sets)
    if reference in missing:
        raise ValueError(f"reference language {reference!r} is not in lang2vec's URIEL data")
    out = {}
    for lang in langs:
        if lang in vectors:
            d = cosine_distance(vectors[lang], vectors[reference])
            if d is None:
                missing.append(lang)
            else:
                out[lang] = d
    return out, sorted(set(missing) & set(langs))


# ---------------------------------------------------------------------- analysis
def gains(size_results: Sequence[dict]) -> list[dict]:
    """Per (task, language): score of the largest size minus the smallest (by params), points."""
    ordered = sorted(size_results, key=lambda r: r["params"])
    small, large = ordered[0], ordered[-1]
    out = []
    for task, res in large["results"].items():
        lo = language_means(task, small["results"].get(task, {}))
        for lang, hi in language_means(task, res).items():
            if lang in lo:
                out.append({"task": task, "lang": lang, "gain": hi - lo[lang], "small": lo[lang], "large": hi})
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rho (scipy), or None with fewer than 3 points or a constant side."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def analyse(size_results: Sequence[dict], feature_sets: str = DEFAULT_FEATURE_SETS,
            resource_table: os.PathLike = RESOURCE_TABLE) -> dict:
    """Average score per size, the power-law fit, per-language gains with covariates.

    Args:
      size_results: [{"name", "params", "results": {task: evaluator result}}], >= 2 sizes.
    Returns the JSON-ready analysis (see module docstring).
    """
    if len(size_results) < 2:
        raise ValueError(f"a scaling study needs at least 2 sizes, got {len(size_results)}")
    ordered = sorted(size_results, key=lambda r: r["params"])
    tasks = list(ordered[0]["results"])
    averages = []
    for r in ordered:
        heads = {t: headline(t, r["results"][t]) for t in tasks}
        missing = [t for t, v in heads.items() if v is None]
        if missing:
            raise ValueError(f"size {r['name']}: tasks {missing} have no headline score to average")
        averages.append({"name": r["name"], "params": r["params"], "per_task": heads,
                         "avg": float(np.mean(list(heads.values())))})
    fit = fit_power_law([a["params"] for a in averages], [a["avg"] for a in averages])
    g = gains(ordered)
    langs = sorted({x["lang"] for x in g})
    classes = load_resource_classes(resource_table)
    distances, typo_missing = typological_distances(langs, feature_sets)
    for x in g:
        x["resource_class"] = classes.get(x["lang"])
        x["distance"] = distances.get(x["lang"])
    correlations = {}
    for task in sorted({x["task"] for x in g}):
        pts = [x for x in g if x["task"] == task]
        rc = [x for x in pts if x["resource_class"] is not None]
        td = [x for x in pts if x["distance"] is not None]
        correlations[task] = {
            "gain_vs_resource_class": spearman([x["resource_class"] for x in rc], [x["gain"] for x in rc]),
            "gain_vs_distance": spearman([x["distance"] for x in td], [x["gain"] for x in td]),
        }
    return {
        "sizes": averages,
        "fit": fit,
        "gains": g,
        "gain_from": ordered[0]["name"],
        "gain_to": ordered[-1]["name"],
        "spearman": correlations,
        "feature_sets": feature_sets,
        "resource_table": str(pathlib.Path(resource_table).name),
        "missing": {"resource_class": [l for l in langs if l not in classes], "typology": typo_missing},
    }


# ---------------------------------------------------------------------- report
def _f(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown_report(size_results: Sequence[dict], analysis: dict, meta: dict) -> str:
    """results.md: averages and fit, every per-language score, gains, missing languages."""
    ordered = sorted(size_results, key=lambda r: r["params"])
    names = [r["name"] for r in ordered]
    fit = analysis["fit"]
    lines = [f"# Scaling study: setting `{meta.get('setting')}`", "",
             f"Tasks: {', '.join(meta.get('tasks', []))}. Date: {meta.get('date')}.", "",
             "## Average score per size", "",
             "| size | encoder params | " + " | ".join(analysis["sizes"][0]["per_task"]) + " | average |",
             "|---|---:|" + "---:|" * (len(analysis["sizes"][0]["per_task"]) + 1)]
    for a in analysis["sizes"]:
        lines.append(f"| {a['name']} | {a['params']:,} | " + " | ".join(_f(v) for v in a["per_task"].values())
                     + f" | {_f(a['avg'])} |")
    lines += ["", f"Power law: average = {fit['coefficient']:.4g} x N^{fit['exponent']:.4f} "
              f"(R^2 = {_f(fit['r2'], 3)} in log-log space, {fit['n_points']} sizes). See `scaling.png`.", "",
              "## Scores per task and language", "",
              "| task | row | language | " + " | ".join(names) + " |", "|---|---|---|" + "---:|" * len(names)]
    for task in ordered[0]["results"]:
        per_size = [{label: (lang, v) for label, lang, v in per_language(task, r["results"][task])} for r in ordered]
        for label, (lang, _) in per_size[-1].items():
            vals = [_f(p.get(label, (None, None))[1]) for p in per_size]
            lines.append(f"| {task} | {label} | {lang} | " + " | ".join(vals) + " |")
    lines += ["", f"## Gain from {analysis['gain_from']} to {analysis['gain_to']} (points)", "",
              f"Resource class: Joshi et al. (2020), `docs/data/{analysis['resource_table']}`. Distance: cosine "
              f"distance from English of lang2vec 1.1.2 `{analysis['feature_sets']}` vectors. See `gains.png`.", "",
              "| task | language | gain | resource class | distance from English |", "|---|---|---:|---:|---:|"]
    for x in sorted(analysis["gains"], key=lambda x: (x["task"], -x["gain"])):
        rc = "n/a" if x["resource_class"] is None else str(x["resource_class"])
        lines.append(f"| {x['task']} | {x['lang']} | {x['gain']:+.2f} | {rc} | {_f(x['distance'], 3)} |")
    lines += ["", "Spearman correlation of gain with each covariate (per task):", "",
              "| task | gain vs resource class | gain vs distance |", "|---|---:|---:|"]
    for task, c in analysis["spearman"].items():
        lines.append(f"| {task} | {_f(c['gain_vs_resource_class'], 3)} | {_f(c['gain_vs_distance'], 3)} |")
    miss = analysis["missing"]
    lines += ["", "Languages missing (listed, not imputed): "
              f"resource class: {', '.join(miss['resource_class']) or 'none'}; "
              f"typology: {', '.join(miss['typology']) or 'none'}.", ""]
    return "\n".join(lines)


def write_report(out_dir: os.PathLike, size_results: Sequence[dict], meta: dict,
                 feature_sets: str = DEFAULT_FEATURE_SETS, resource_table: os.PathLike = RESOURCE_TABLE) -> dict:
    """Writes results.json, results.md, scaling.png and gains.png; returns the analysis."""
    from mst5_jax import evaluate
    from mst5_jax.analysis import plots

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analysis = analyse(size_results, feature_sets, resource_table)
    per_lang_rows = [{"size": r["name"], "task": t, "row": label, "lang": lang, "score": v}
                     for r in size_results for t, res in r["results"].items() for label, lang, v in per_language(t, res)]
    doc = {"meta": meta, "analysis": analysis, "per_language": per_lang_rows,
           "sizes": [{k: v for k, v in r.items()} for r in size_results]}
    (out / "results.json").write_text(json.dumps(evaluate._nan_to_none(doc), indent=1, ensure_ascii=False,
                                                 allow_nan=False, default=evaluate._json_default))
    (out / "results.md").write_text(markdown_report(size_results, analysis, meta), encoding="utf-8")
    title = f"setting: {meta.get('setting')}; tasks: {', '.join(meta.get('tasks', []))}"
    plots.scaling_plot(analysis["sizes"], analysis["fit"], out / "scaling.png", title=title)
    plots.gain_plot(analysis, out / "gains.png", title=title)
    return analysis


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mst5_jax.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="", help="comma-separated: small,base,large,xl,xxl or tiny-N")
    p.add_argument("--runs", default="", help="NAME=DIR,... existing runs / HF directories (not trained)")
    p.add_argument("--adapters", default="", help="NAME=DIR,... PEFT adapters for --runs entries")
    p.add_argument("--setting", choices=sorted(SETTING_TASKS), default="cross")
    p.add_argument("--data", choices=["paper", "local"], default="paper",
                   help="paper: XNLI-MT / SNLI+MNLI; local: the offline XNLI files")
    p.add_argument("--recipe", action="append", default=None,
                   help="run gin file(s) every size starts from (default xxl_lora.gin); repeatable")
    p.add_argument("--tasks", default="tatoeba,bucc,xsts", help="evaluation tasks (mst5_jax.evaluate names)")
    p.add_argument("--task_kwargs", default="{}", help='JSON, e.g. {"xnli_retrieval": {"max_premises": 200}}')
    p.add_argument("--data_dir", default=str(paths.default_data_dir()))
    p.add_argument("--max_length", type=int, default=64, help="tokens per sentence at evaluation")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--params", choices=["total", "non_embedding"], default="total",
                   help="encoder parameters on the x axis: with or without the embedding table")
    p.add_argument("--feature_sets", default=DEFAULT_FEATURE_SETS, help="lang2vec feature sets, '+'-joined")
    p.add_argument("--out", required=True, help="report folder (runs go to OUT/runs unless --runs)")
    p.add_argument("--dry_run", action="store_true",
                   help="parse every size's gin config and build it on an AbstractMesh; train nothing")
    return p


def _evaluate_size(name: str, path: str, adapter: Optional[str], args, tasks: list[str], task_kwargs: dict,
                   out: pathlib.Path) -> dict:
    """Loads one model, evaluates it (cached in OUT/eval/NAME.json), returns the size record."""
    from mst5_jax import evaluate
    from mst5_jax.inference.encoder import SentenceEncoder
    from mst5_jax.evals.data import package_versions

    enc = SentenceEncoder.from_pretrained(path, adapter=adapter, dtype=args.dtype)
    params = enc.config.num_params(include_embedding=args.params == "total")
    cache = out / "eval" / f"{name}.json"
    key = {"path": str(path), "adapter": adapter, "tasks": tasks, "task_kwargs": task_kwargs,
           "max_length": args.max_length, "batch_size": args.batch_size, "dtype": args.dtype,
           "fingerprint": evaluate.fingerprint(path)["combined_sha256"] if pathlib.Path(path).exists() else None}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            print(f"[study] {name}: evaluation cached in {cache}", file=sys.stderr, flush=True)
            return {"name": name, "params": params, "path": str(path), "adapter": adapter, "results": saved["results"]}

    def encode(sentences: list[str]) -> np.ndarray:
        return enc.encode(sentences, batch_size=args.batch_size, max_length=args.max_length)

    results = evaluate._nan_to_none(evaluate.run(tasks, encode, args.data_dir, max_length=args.max_length,
                                                 batch_size=args.batch_size, device=evaluate._jax_device(),
                                                 task_kwargs=task_kwargs))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "results": results, "versions": package_versions()},
                                default=evaluate._json_default))
    return {"name": name, "params": params, "path": str(path), "adapter": adapter, "results": results}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = [a[len("--gin."):] for a in argv if a.startswith("--gin.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--gin.")])
    from mst5_jax import evaluate

    tasks = evaluate.parse_tasks(args.tasks)
    task_kwargs = json.loads(args.task_kwargs)
    sizes = parse_sizes(args.sizes) if args.sizes else []
    runs = parse_named_paths(args.runs, "--runs")
    adapters = parse_named_paths(args.adapters, "--adapters")
    clash = [s.name for s in sizes if s.name in runs]
    if clash:
        raise SystemExit(f"--sizes and --runs both name {clash}")
    unknown_adapters = [n for n in adapters if n not in runs]
    if unknown_adapters:
        raise SystemExit(f"--adapters names {unknown_adapters}, which are not in --runs")
    if len(sizes) + len(runs) < 2:
        raise SystemExit("a scaling study needs at least 2 sizes (--sizes and/or --runs)")
    recipe = args.recipe or ["xxl_lora.gin"]
    out = pathlib.Path(args.out)
    os.environ.setdefault("MST5_NO_SEQIO", "1")

    if args.dry_run:
        from mst5_jax.training import config_check

        for size in sizes:
            cfg = train_config(size, recipe, args.setting, args.data, out / "runs" / size.name, extra)
            report = config_check.check(cfg)
            print(f"[study] {size.name}: task {cfg.mixture_or_task_name}, {report['num_devices']} devices, "
                  f"mesh {report['mesh']}, {report['total_gib']:.2f} GiB per device", flush=True)
        return 0

    from mst5_jax.training import trainer  # imports `tasks`: after MST5_NO_SEQIO is set

    records = []
    for size in sizes:
        run_dir = out / "runs" / size.name
        cfg = train_config(size, recipe, args.setting, args.data, run_dir, extra)
        print(f"[study] training {size.name} -> {run_dir}", file=sys.stderr, flush=True)
        trainer.run(cfg)
        records.append(_evaluate_size(size.name, str(run_dir), None, args, tasks, task_kwargs, out))
    for name, path in runs.items():
        records.append(_evaluate_size(name, path, adapters.get(name), args, tasks, task_kwargs, out))
    meta = {"setting": args.setting, "data": args.data, "recipe": recipe, "tasks": tasks, "task_kwargs": task_kwargs,
            "max_length": args.max_length, "params": args.params, "gin_bindings": extra,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": argv}
    analysis = write_report(out, records, meta, feature_sets=args.feature_sets)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"[study] exponent {analysis['fit']['exponent']:.4f}, R^2 {_f(analysis['fit']['r2'], 3)}; "
          f"report in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
