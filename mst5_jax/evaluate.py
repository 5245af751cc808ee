"""Evaluate a sentence encoder on the standard benchmarks and print a markdown table.

    python -m mst5_jax.evaluate --model PATH [--adapter DIR] --tasks tatoeba,bucc,xsts \\
        --data_dir DIR --output results.json [--max_length 512] [--batch_size 64] \\
        [--dtype float32] [--reference ref.json] [--overwrite]
    python -m mst5_jax.evaluate --encoder hash --tasks xsts --data_dir DIR --output r.json
    python -m mst5_jax.evaluate --compare a.json b.json

``--encoder hash`` scores the deterministic hashed character n-gram encoder
(`mst5_jax.evals.hash_encoder`), which needs no weights: for tests and as a floor.
``--tasks all`` runs every evaluator registered in `mst5_jax.evals.registry`.

The output JSON is ``{"meta": {...}, "results": {task: result}}``; it is rewritten
(atomically) as each task finishes, so a task that fails later loses nothing. Failed tasks
are listed at the end, in ``meta.failed_tasks``, and make the exit status 1. An existing
``--output`` is refused unless ``--overwrite``. From Python, `run(tasks, encode, data_dir)`
and `markdown_table(results)` (`mst5_jax.evals.runner` / `.report`) do the same.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import pathlib
import sys
import time
from typing import Optional, Sequence

from mst5_jax.evals import HashEncoder
from mst5_jax.evals.data import package_versions
from mst5_jax.evals.report import compare_table, markdown_table, to_json
from mst5_jax.evals.runner import DEFAULT_TASKS, parse_tasks, run, run_tasks
from mst5_jax.utils import cli, fs, paths
from mst5_jax.utils.cli import UserError
from mst5_jax.utils.files import model_files_fingerprint, write_text_atomic

__all__ = ["main", "run", "markdown_table", "compare_table", "parse_tasks"]
PROG = "python -m mst5_jax.evaluate"
EXAMPLE = ("python -m mst5_jax.evaluate --model PATH --tasks tatoeba,bucc,xsts --output results.json\n"
           "  python -m mst5_jax.evaluate --encoder hash --tasks xsts --output r.json\n"
           "  python -m mst5_jax.evaluate --compare a.json b.json")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(PROG, __doc__, example=EXAMPLE)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF-format / sentence-transformers / project directory, or hub id")
    src.add_argument("--encoder", choices=["hash"], help="a built-in weight-free encoder instead of --model")
    src.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two result files side by side")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task names, or 'all'")
    p.add_argument("--data_dir", default=str(paths.default_data_dir()), help="the evaluation data (docs/DATA.md)")
    p.add_argument("--output", help="where to write the results JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--max_length", type=int, default=512, help="tokens per sentence (mSimCSE used 32)")
    p.add_argument("--batch_size", type=int, default=64, help="sentences per batch")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--hash_dim", type=int, default=256, help="width of --encoder hash")
    p.add_argument("--reference", help="JSON of reference numbers, shown beside the scores")
    return p


def _evaluate(args, argv) -> int:
    if args.compare:
        a, b = (json.loads(pathlib.Path(f).read_text()) for f in args.compare)
        print(compare_table(a, b, names=(pathlib.Path(args.compare[0]).name, pathlib.Path(args.compare[1]).name)))
        return 0
    if not args.model and not args.encoder:
        raise UserError("one of --model, --encoder or --compare is required")
    tasks = parse_tasks(args.tasks)
    out_path = pathlib.Path(args.output) if args.output else None
    if out_path is not None and out_path.exists() and not args.overwrite:
        raise UserError(f"--output {out_path} exists; pass --overwrite to replace it, or choose another path")
    reference = json.loads(pathlib.Path(args.reference).read_text()) if args.reference else None

    if args.encoder == "hash":
        encode = HashEncoder(dim=args.hash_dim).encode
        device, pooling, max_length, batch_size = "cpu (numpy)", "signed hashed char 1-3-gram counts", None, None
    else:
        # Imported here so that `--encoder hash` and `--compare` run without JAX.
        from mst5_jax.inference.evaluation import load_for_evaluation

        loaded = load_for_evaluation(args.model, args.adapter, args.dtype, batch_size=args.batch_size,
                                     max_length=args.max_length)
        encode, device, pooling = loaded.encode, loaded.device, loaded.pooling
        max_length, batch_size = args.max_length, args.batch_size
    meta = {
        "model": args.model if args.model else f"{args.encoder} (dim {args.hash_dim})",
        "model_fingerprint": model_files_fingerprint(args.model) if args.model else None,
        "adapter": args.adapter, "adapter_fingerprint": model_files_fingerprint(args.adapter),
        "dtype": args.dtype if args.model else "float32", "pooling": pooling, "max_length": max_length,
        "batch_size": batch_size, "device": device, "data_dir": fs.resolved(args.data_dir),
        "tasks": tasks, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(), "argv": sys.argv[1:] if argv is None else [str(a) for a in argv],
    }
    done: dict = {}

    def save(task: Optional[str] = None, result: Optional[dict] = None, failures: Optional[dict] = None) -> None:
        if task is not None:
            done[task] = result
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out_path, to_json({"meta": dict(meta, failed_tasks=failures or {}), "results": done}))

    encode = _with_progress(encode)
    if max_length is not None:  # training's held-out metric uses TrainConfig.eval_max_length (64) instead
        print(f"{PROG}: encoding with max_length={max_length} tokens per sentence, batch_size={batch_size}",
              file=sys.stderr, flush=True)
    with contextlib.ExitStack() as stack:
        if args.model:  # one truncation warning per evaluate run, not one per language
            from mst5_jax.inference.encoder import truncation_summary

            stack.enter_context(truncation_summary(f"evaluate (max_length={max_length})"))
        results, failures = run_tasks(tasks, encode, args.data_dir, max_length=max_length, batch_size=batch_size,
                                      device=device, on_result=save, keep_going=True)
    if failures:
        save(failures=failures)
    print(markdown_table(results, reference))
    if failures:
        for task, why in failures.items():
            print(f"{PROG}: task {task} failed: {why}", file=sys.stderr)
        kept = f"; the {len(results)} finished task(s) are in {out_path}" if out_path is not None and results else ""
        print(f"{PROG}: {len(failures)} of {len(tasks)} task(s) failed{kept}", file=sys.stderr)
        return 1
    return 0


PROGRESS_EVERY_S = 30.0


def _with_progress(encode):
    """`encode` that shows progress, so a long task (Tatoeba: 112 languages, one encode call
    each) is not silent for minutes: a tqdm bar of sentences encoded on a terminal, else a
    log line every PROGRESS_EVERY_S seconds."""
    state = {"n": 0, "start": time.monotonic(), "last": time.monotonic()}
    bar = None
    if sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415 (the [eval] extra)

            bar = tqdm(unit="sent", desc="evaluate", file=sys.stderr)
        except ImportError:
            pass

    def wrapped(sentences):
        out = encode(sentences)
        state["n"] += len(sentences)
        if bar is not None:
            bar.update(len(sentences))
            return out
        now = time.monotonic()
        if now - state["last"] >= PROGRESS_EVERY_S:
            state["last"] = now
            print(f"[evaluate] {state['n']} sentences encoded in {now - state['start']:.0f}s", file=sys.stderr,
                  flush=True)
        return out

    return wrapped


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    cli.setup_logging(args.verbose)
    return cli.run(lambda: _evaluate(args, argv), PROG, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
