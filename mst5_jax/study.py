"""`python -m mst5_jax.study`: the scaling study, from runs to a report folder with plots.

    python -m mst5_jax.study --sizes small,base,large,xl,xxl --setting cross \\
        --recipe xxl_lora.gin --tasks tatoeba,bucc,xsts --out study_cross
    python -m mst5_jax.study --runs small=/runs/s,xxl=/runs/x --setting cross --out study_cross
    python -m mst5_jax.study --sizes tiny-16,tiny-32,tiny-64 --setting cross --data local \\
        --recipe demo_cpu.gin --tasks xnli_retrieval,xsts --out /tmp/study    # CPU, minutes

For each size it trains (`mst5_jax.training.trainer.run`, resumed when MODEL_DIR already holds the
run) or takes an existing run / HF directory (`--runs`), evaluates every size with the same
tasks (`mst5_jax.evals.runner`), and writes the report that `mst5_jax.analysis.study`
describes (results.json, results.md, scaling.png, gains.png) to `--out`.

Sizes are mT5 names (`small`, ..., `xxl`: the recipe's gin file, then `mt5_<size>.gin`) or
`tiny-N`: the `tiny` preset with d_model N, d_ff 2N, heads N/16 (at least 1) of 16, 2 layers,
trained from random init (for CPU checks). `--setting` picks the training task: cross
(cross-lingual NLI), mono (monolingual NLI in every language) or en (English NLI); with
`--data paper` these are the paper's sets (XNLI-MT / SNLI+MNLI), with `--data local` the
offline XNLI files (`docs/DATA.md`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
from typing import Optional, Sequence

from mst5_jax.analysis import study
from mst5_jax.evals.data import package_versions
from mst5_jax.evals.report import to_json
from mst5_jax.evals.runner import parse_tasks, run
from mst5_jax.utils import cli, paths
from mst5_jax.utils.files import model_files_fingerprint, write_text_atomic


def train_config(size: study.Size, recipe: Sequence[str], setting: str, data: str, model_dir: pathlib.Path,
                 extra_bindings: Sequence[str]):
    """The parsed `TrainConfig` of one size (applies `tasks.configure`'s gin bindings too)."""
    from mst5_jax.training import gin_utils

    cfg = gin_utils.parse_gin([*recipe, *size.gin_files],
                              [*study.training_bindings(size, setting, data, model_dir), *extra_bindings])
    gin_utils.configure_tasks()
    return cfg


PROG = "python -m mst5_jax.study"
EXAMPLE = ("python -m mst5_jax.study --sizes tiny-16,tiny-32,tiny-64 --setting cross --data local "
           "--recipe demo_cpu.gin --tasks xnli_retrieval,xsts --out /tmp/study\n"
           "  (any --gin.MACRO=VALUE binding is applied to every size's training run, after its gin files)")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(PROG, __doc__, example=EXAMPLE)
    p.add_argument("--sizes", default="", help="comma-separated: small,base,large,xl,xxl or tiny-N")
    p.add_argument("--runs", default="", help="NAME=DIR,... existing runs / HF directories (not trained)")
    p.add_argument("--adapters", default="", help="NAME=DIR,... PEFT adapters for --runs entries")
    p.add_argument("--setting", choices=sorted(study.SETTING_TASKS), default="cross",
                   help="training task: cross-lingual NLI, monolingual NLI in every language, or English NLI")
    p.add_argument("--data", choices=["paper", "local"], default="paper",
                   help="paper: XNLI-MT / SNLI+MNLI; local: the offline XNLI files")
    p.add_argument("--recipe", action="append", default=None,
                   help="run gin file(s) every size starts from (default xxl_lora.gin); repeatable")
    p.add_argument("--tasks", default="tatoeba,bucc,xsts", help="evaluation tasks (mst5_jax.evaluate names)")
    p.add_argument("--task_kwargs", default="{}", help='JSON, e.g. {"xnli_retrieval": {"max_premises": 200}}')
    p.add_argument("--data_dir", default=str(paths.default_data_dir()), help="evaluation and training data")
    p.add_argument("--max_length", type=int, default=64, help="tokens per sentence at evaluation")
    p.add_argument("--batch_size", type=int, default=64, help="sentences per batch at evaluation")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype at evaluation")
    p.add_argument("--params", choices=["total", "non_embedding"], default="total",
                   help="encoder parameters on the x axis: with or without the embedding table")
    p.add_argument("--feature_sets", default=study.DEFAULT_FEATURE_SETS, help="lang2vec feature sets, '+'-joined")
    p.add_argument("--out", required=True, help="report folder (runs go to OUT/runs unless --runs)")
    p.add_argument("--dry_run", action="store_true",
                   help="parse every size's gin config and build it on an AbstractMesh; train nothing")
    return p


def _evaluate_size(name: str, path: str, adapter: Optional[str], args, tasks: list[str], task_kwargs: dict,
                   out: pathlib.Path) -> dict:
    """Loads one model, evaluates it (cached in OUT/eval/NAME.json), returns the size record."""
    from mst5_jax.inference.evaluation import load_for_evaluation

    loaded = load_for_evaluation(path, adapter, args.dtype, batch_size=args.batch_size, max_length=args.max_length)
    params = loaded.encoder.config.num_params(include_embedding=args.params == "total")
    record = {"name": name, "params": params, "path": str(path), "adapter": adapter}
    cache = out / "eval" / f"{name}.json"
    fp = model_files_fingerprint(path)
    key = {"path": str(path), "adapter": adapter, "tasks": tasks, "task_kwargs": task_kwargs,
           "max_length": args.max_length, "batch_size": args.batch_size, "dtype": args.dtype,
           "fingerprint": fp.get("combined_sha256")}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            print(f"[study] {name}: evaluation cached in {cache}", file=sys.stderr, flush=True)
            return dict(record, results=saved["results"])
    results = json.loads(to_json(run(tasks, loaded.encode, args.data_dir, max_length=args.max_length,
                                     batch_size=args.batch_size, device=loaded.device, task_kwargs=task_kwargs)))
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache, to_json({"key": key, "results": results, "versions": package_versions()}))
    return dict(record, results=results)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = cli.argv_list(argv)
    extra = [a[len("--gin."):] for a in argv if a.startswith("--gin.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--gin.")])
    cli.setup_logging(args.verbose)
    return cli.run(lambda: _study(args, argv, extra), PROG, debug=args.debug)


def _study(args: argparse.Namespace, argv: list[str], extra: list[str]) -> int:
    tasks = parse_tasks(args.tasks)
    try:
        task_kwargs = json.loads(args.task_kwargs)
    except json.JSONDecodeError as e:
        raise cli.UserError(f"--task_kwargs {args.task_kwargs!r} is not JSON ({e}); expected e.g. "
                            '\'{"xnli_retrieval": {"max_premises": 200}}\'') from None
    sizes = study.parse_sizes(args.sizes) if args.sizes else []
    runs = study.parse_named_paths(args.runs, "--runs")
    adapters = study.parse_named_paths(args.adapters, "--adapters")
    clash = [s.name for s in sizes if s.name in runs]
    if clash:
        raise cli.UserError(f"--sizes and --runs both name {clash}")
    unknown_adapters = [n for n in adapters if n not in runs]
    if unknown_adapters:
        raise cli.UserError(f"--adapters names {unknown_adapters}, which are not in --runs")
    if len(sizes) + len(runs) < 2:
        raise cli.UserError("a scaling study needs at least 2 sizes (--sizes and/or --runs)")
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
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "argv": argv}
    analysis = study.write_report(out, records, meta, feature_sets=args.feature_sets)
    print((out / "results.md").read_text(encoding="utf-8"))
    r2 = analysis["fit"]["r2"]
    print(f"[study] exponent {analysis['fit']['exponent']:.4f}, R^2 {'n/a' if r2 is None else f'{r2:.3f}'}; "
          f"report in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
