"""Evaluation results as tables and strict JSON.

The rows of each task come from its registry record (`Evaluator.table_rows`); a result
file is ``{"meta": {...}, "results": {task: result}}``. A reference (a result file, a
nested ``{task: {...}}`` dict, or flat dotted keys such as ``{"tatoeba.avg.tatoeba14": 84.1}``)
adds a reference column and the delta.
"""
from __future__ import annotations

import json
import math
from typing import Optional

import numpy as np

from mst5_jax.evals import registry


def summary_rows(task: str, result: dict) -> list[tuple[str, str]]:
    """(row label, dotted key inside the result) for the numbers worth a table row."""
    return registry.get(task).table_rows(result)


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """Nested dicts -> {"a.b.c": leaf}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)


def _delta(a, b) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return f"{b - a:+.2f}"
    return ""


def _reference_map(reference) -> dict:
    if reference is None:
        return {}
    if isinstance(reference, dict) and "results" in reference:
        reference = reference["results"]
    return {k: v for k, v in flatten(reference).items() if not k.split(".")[1:2] == ["meta"]}


def markdown_table(results: dict, reference: Optional[dict] = None) -> str:
    """Markdown table of `summary_rows` for each task, with reference and delta columns if given."""
    ref = _reference_map(reference)
    lines = ["| task | metric | score |" + (" reference | delta |" if ref else ""),
             "|---|---|---:|" + ("---:|---:|" if ref else "")]
    for task, result in results.items():
        flat = flatten(result)
        for label, key in summary_rows(task, result):
            v = flat.get(key)
            line = f"| {task} | {label} | {_fmt(v)} |"
            if ref:
                r = ref.get(f"{task}.{key}")
                line += f" {_fmt(r) if r is not None else ''} | {_delta(r, v)} |"
            lines.append(line)
    return "\n".join(lines)


def compare_table(a: dict, b: dict, names: tuple[str, str] = ("a", "b")) -> str:
    """Two result files' ``results`` side by side, with delta = b - a."""
    ra, rb = a.get("results", a), b.get("results", b)
    lines = [f"| task | metric | {names[0]} | {names[1]} | delta |", "|---|---|---:|---:|---:|"]
    for task in list(ra) + [t for t in rb if t not in ra]:
        rows = summary_rows(task, ra.get(task, {}))
        rows += [r for r in summary_rows(task, rb.get(task, {})) if r not in rows]
        fa, fb = flatten(ra.get(task, {})), flatten(rb.get(task, {}))
        for label, key in rows:
            va, vb = fa.get(key), fb.get(key)
            lines.append(f"| {task} | {label} | {_fmt(va)} | {_fmt(vb)} | {_delta(va, vb)} |")
    return "\n".join(lines)


def nan_to_none(tree):
    """NaN (e.g. Spearman of a constant encoder) -> None, so the file is strict JSON."""
    if isinstance(tree, dict):
        return {k: nan_to_none(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [nan_to_none(v) for v in tree]
    if isinstance(tree, float) and math.isnan(tree):
        return None
    return tree


def json_default(obj):
    """`json.dumps(default=...)` for numpy scalars."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def to_json(doc) -> str:
    """Strict JSON text of a results document (NaN -> null, numpy scalars -> numbers)."""
    return json.dumps(nan_to_none(doc), indent=1, ensure_ascii=False, allow_nan=False, default=json_default)
