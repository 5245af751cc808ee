"""Evaluate a sentence encoder on the standard benchmarks and print a markdown table.

    python -m mst5_jax.evaluate --model PATH [--adapter DIR] --tasks tatoeba,bucc,xsts \\
        --data_dir DIR --output results.json [--max_length 512] [--batch_size 64] \\
        [--dtype float32] [--reference ref.json]
    python -m mst5_jax.evaluate --encoder hash --tasks xsts --data_dir DIR --output r.json
    python -m mst5_jax.evaluate --compare a.json b.json

``--encoder hash`` scores the deterministic hashed character n-gram encoder
(`mst5_jax.evals.hash_encoder`), which needs no weights: for tests and as a floor.
``--tasks all`` runs every evaluator in `mst5_jax.evals.EVALUATORS`.

The output JSON is ``{"meta": {...}, "results": {task: result}}``; meta holds the model
and adapter paths with fingerprints, dtype, pooling, max_length, batch_size, device, date,
package versions and the command line. A reference JSON (``--reference``) is either such
a result file, a nested ``{task: {...}}`` dict of the same shape, or flat dotted keys
(``{"tatoeba.avg.tatoeba14": 84.1}``); its numbers appear as a column with the delta.

From Python, `run(tasks, encode, data_dir)` does the same for any encode callable.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from mst5_jax.evals import EVALUATORS, HashEncoder
from mst5_jax.evals.data import package_versions, sha256_file
from mst5_jax.utils import paths

Encode = Callable[[list[str]], np.ndarray]

DEFAULT_TASKS = ("tatoeba", "bucc", "xsts")
_FULL_HASH_LIMIT = 64 << 20  # files above this are fingerprinted by head + tail + size
_PARTIAL_BYTES = 8 << 20


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """"a,b" or ["a", "b"] or "all" -> validated task names (ValueError names the unknown ones)."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if names == ["all"]:
        return list(EVALUATORS)
    unknown = [t for t in names if t not in EVALUATORS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or names}; choose from {', '.join(EVALUATORS)} or 'all'")
    return names


def run(tasks: str | Sequence[str], encode: Encode, data_dir, *, max_length: Optional[int] = None,
        batch_size: Optional[int] = None, device: Optional[str] = None,
        task_kwargs: Optional[dict[str, dict]] = None, log=sys.stderr) -> dict:
    """Run evaluators by name; returns {task: result}. ``task_kwargs[task]`` adds arguments."""
    results = {}
    for task in parse_tasks(tasks):
        t0 = time.perf_counter()
        kwargs = dict((task_kwargs or {}).get(task, {}))
        results[task] = EVALUATORS[task](encode, data_dir, max_length=max_length, batch_size=batch_size,
                                         device=device, **kwargs)
        if log is not None:
            print(f"[evaluate] {task}: {time.perf_counter() - t0:.1f}s", file=log, flush=True)
    return results


# --- table ------------------------------------------------------------------------------------

def summary_rows(task: str, result: dict) -> list[tuple[str, str]]:
    """(row label, dotted key inside the result) for the numbers worth a table row."""
    rows: list[tuple[str, str]] = []
    if task == "tatoeba":
        rows += [(lang, f"per_lang.{lang}.mean") for lang in result.get("per_lang", {})]
        for avg in ("avg", "avg_present"):
            rows += [(f"{avg} {g}", f"{avg}.{g}") for g in result.get(avg, {})]
    elif task == "bucc":
        for lang in result.get("per_lang", {}):
            rows += [(f"{lang} F1 (oracle threshold)", f"per_lang.{lang}.f1"),
                     (f"{lang} F1 (threshold from other half)", f"per_lang.{lang}.heldout.f1_mean")]
            if "applied" in result["per_lang"][lang]:
                rows.append((f"{lang} F1 (given threshold)", f"per_lang.{lang}.applied.f1"))
        rows += [("avg", "avg"), ("avg_present", "avg_present")]
    elif task == "xsts":
        rows += [(t, f"per_track.{t}") for t in result.get("per_track", {})] + [("avg", "avg")]
        rows += [(f"extended {p}", f"extended.{p}") for p in result.get("extended", {})]
        if "avg_extended" in result:
            rows.append(("avg extended", "avg_extended"))
    elif task == "xnli_retrieval":
        rows += [(f"{xx}->en", f"xx2en.{xx}") for xx in result.get("xx2en", {})]
        rows += [("avg xx->en", "avg_xx2en"), ("avg all directions", "avg_all")]
    elif task == "jsick_retrieval":
        rows += [("en->ja", "en2ja"), ("ja->en", "ja2en"), ("mean", "mean")]
    else:
        rows.append(("spearman", "spearman"))
    return rows


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


# --- provenance -------------------------------------------------------------------------------

def fingerprint(path: Optional[str]) -> Optional[dict]:
    """Identify a model or adapter directory (or file) by the size and sha256 of its files.

    Files above 64 MiB are hashed on their first and last 8 MiB plus their size
    ("sha256_head_tail"), so multi-GB checkpoints are fingerprinted in seconds. A path that
    is not on disk (a hub id) gives {"path": path, "exists": False}.
    """
    if path is None:
        return None
    p = pathlib.Path(path)
    if not p.exists():
        return {"path": str(path), "exists": False}
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    entries = []
    for f in files:
        size = f.stat().st_size
        entry = {"file": str(f.relative_to(p)) if p.is_dir() else f.name, "bytes": size}
        if size <= _FULL_HASH_LIMIT:
            entry["sha256"] = sha256_file(f)
        else:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                h.update(fh.read(_PARTIAL_BYTES))
                fh.seek(size - _PARTIAL_BYTES)
                h.update(fh.read(_PARTIAL_BYTES))
            entry["sha256_head_tail"] = h.hexdigest()
        entries.append(entry)
    combined = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return {"path": str(p.resolve()), "exists": True, "combined_sha256": combined, "files": entries}


def _jax_device() -> Optional[str]:
    if "jax" not in sys.modules:
        return None
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def load_model_encoder(model: str, adapter: Optional[str], dtype: str):
    """SentenceEncoder.from_pretrained, imported lazily so `--encoder hash` needs no jax."""
    from mst5_jax.inference.encoder import SentenceEncoder

    return SentenceEncoder.from_pretrained(model, adapter=adapter, dtype=dtype)


def _pooling(enc) -> Optional[str]:
    for obj in (enc, getattr(enc, "config", None)):
        value = getattr(obj, "pooling", None)
        if isinstance(value, str):
            return value
    return None


# --- CLI --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mst5_jax.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF-format / sentence-transformers / project directory, or hub id")
    src.add_argument("--encoder", choices=["hash"], help="a built-in weight-free encoder instead of --model")
    src.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two result files side by side")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, or 'all' ({', '.join(EVALUATORS)})")
    p.add_argument("--data_dir", default=str(paths.default_data_dir()))
    p.add_argument("--output", help="where to write the results JSON")
    p.add_argument("--max_length", type=int, default=512, help="tokens per sentence (mSimCSE used 32)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hash_dim", type=int, default=256, help="width of --encoder hash")
    p.add_argument("--reference", help="JSON of reference numbers, shown beside the scores")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        a, b = (json.loads(pathlib.Path(f).read_text()) for f in args.compare)
        print(compare_table(a, b, names=(pathlib.Path(args.compare[0]).name, pathlib.Path(args.compare[1]).name)))
        return 0
    if not args.model and not args.encoder:
        build_parser().error("one of --model, --encoder or --compare is required")
    tasks = parse_tasks(args.tasks)
    reference = json.loads(pathlib.Path(args.reference).read_text()) if args.reference else None

    if args.encoder == "hash":
        enc = HashEncoder(dim=args.hash_dim)
        device, pooling = "cpu (numpy)", "signed hashed char 1-3-gram counts"
        max_length = batch_size = None  # the hash encoder has neither
    else:
        enc = load_model_encoder(args.model, args.adapter, args.dtype)
        device, pooling = _jax_device(), _pooling(enc)
        max_length, batch_size = args.max_length, args.batch_size

    def encode(sentences: list[str]) -> np.ndarray:
        if batch_size is None:
            return enc.encode(sentences)
        return enc.encode(sentences, batch_size=batch_size, max_length=max_length)

    results = run(tasks, encode, args.data_dir, max_length=max_length, batch_size=batch_size, device=device)
    meta = {
        "model": args.model if args.model else f"{args.encoder} (dim {args.hash_dim})",
        "model_fingerprint": fingerprint(args.model) if args.model else None,
        "adapter": args.adapter,
        "adapter_fingerprint": fingerprint(args.adapter),
        "dtype": args.dtype if args.model else "float32",
        "pooling": pooling,
        "max_length": max_length,
        "batch_size": batch_size,
        "device": device,
        "data_dir": str(pathlib.Path(args.data_dir).resolve()),
        "tasks": tasks,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    out = {"meta": meta, "results": _nan_to_none(results)}
    if args.output:
        path = pathlib.Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, ensure_ascii=False, allow_nan=False, default=_json_default))
    print(markdown_table(results, reference))
    return 0


def _nan_to_none(tree):
    """NaN (e.g. Spearman of a constant encoder) -> None, so the file is strict JSON."""
    if isinstance(tree, dict):
        return {k: _nan_to_none(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_nan_to_none(v) for v in tree]
    if isinstance(tree, float) and math.isnan(tree):
        return None
    return tree


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
