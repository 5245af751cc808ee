"""`python -m mst5_jax.train --gin_file=xxl_lora.gin [--gin.MACRO=VALUE ...]`: the training CLI.

Parses flags and gin (`mst5_jax.training.gin_utils`), builds
`mst5_jax.training.trainer.Trainer` (which locks MODEL_DIR and checks a resume against
run.json), keeps this attempt's operative config (operative_config.gin, then
operative_config.<n>.gin; `mst5_jax.training.resume_check.keep_operative_config`) and runs it.
Exit codes: 0 done; 2 a user error (a bad flag or config, a MODEL_DIR held by another
trainer, a resume that changes the run), printed in one line; `EXIT_PREEMPTED` (75) saved
after SIGTERM or SIGINT, rerun to resume. `--dry_run` builds the config on an
AbstractMesh of the hardware file's device count and prints the per-device memory
(`mst5_jax.training.config_check`) instead. A test-only fault (``MST5_FAULT``,
`mst5_jax.training.faults`) is read here once, at start-up. `--multiprocess` (or
`--coordinator_address/--process_count/--process_index`) starts `jax.distributed` first
(`mst5_jax.training.multiprocess`); only process 0 then writes the run files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from mst5_jax.training import config_check, multiprocess, resume_check
from mst5_jax.training.faults import FaultHook
from mst5_jax.training.gin_utils import config_str, configure_tasks, parse_gin
from mst5_jax.utils import cli

__all__ = ["main", "parse_gin"]

PROG = "python -m mst5_jax.train"
EXAMPLE = """python -m mst5_jax.train --gin_file=demo_cpu.gin
  python -m mst5_jax.train --gin_file xxl_lora.gin --gin.MODEL_DIR="'/runs/xxl'" --gin.TRAIN_STEPS=100 --dry_run
  python -m mst5_jax.train --gin_file=xxl_lora_tpu_pod.gin --multiprocess      # on every worker of a pod
  python -m mst5_jax.train --gin_file=demo_cpu.gin --coordinator_address=localhost:8476 \\
      --process_count=2 --process_index=0                                    # and --process_index=1

VALUE is a gin literal: strings are quoted (--gin.MODEL_DIR="'/tmp/run'"), numbers are not
(--gin.BATCH_SIZE=64). Gin files are found by path or by bare name anywhere under the
repository's gin/ tree: runs/ (demo_cpu.gin, base_full_finetune.gin, xxl_lora.gin, ...),
models/ and hardware/."""


def _macro_help() -> str:
    """The macros every run config defines (gin/runs/_common.gin), for --help."""
    try:
        from mst5_jax.training.gin_utils import common_macros

        return ", ".join(common_macros())
    except (ImportError, OSError):  # --help still works without gin-config or the gin tree
        return "MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, ... (gin/runs/_common.gin)"


def parser() -> argparse.ArgumentParser:
    p = cli.parser(PROG, __doc__, example=EXAMPLE)
    p.add_argument("--gin_file", action="append", default=[], metavar="NAME.gin", required=True,
                   help="a gin file, by path or by bare name under gin/ (repeatable, parsed in order); "
                        "--gin_file X and --gin_file=X both work")
    p.add_argument("--gin.MACRO", dest="_gin_help", metavar="VALUE", default=None,
                   help="--gin.MACRO=VALUE or --gin.Configurable.param=VALUE: a gin binding, applied after "
                        f"the files (repeatable). MACRO is one of {_macro_help()}")
    p.add_argument("--dry_run", action="store_true",
                   help="parse the config, build it on an AbstractMesh and print per-device memory; train nothing")
    p.add_argument("--profile_steps", default=None, metavar="A:B",
                   help="write a jax.profiler trace of steps A..B to MODEL_DIR/profile")
    p.add_argument("--compilation_cache_dir", default=None, help="a persistent JAX compilation cache folder")
    multiprocess.add_flags(p)
    return p


def split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`--gin.X=V` bindings as `X=V`, the other arguments): argparse cannot take dotted flags."""
    bindings, rest = [], []
    for a in argv:
        (bindings.append(a[len("--gin."):]) if a.startswith("--gin.") else rest.append(a))
    return bindings, rest


def main(argv: Optional[Sequence[str]] = None) -> int:
    bindings, rest = split_gin_bindings(cli.argv_list(argv))
    args = parser().parse_args(rest)
    cli.setup_logging(args.verbose)
    return cli.run(lambda: _train(args, bindings), PROG, debug=args.debug)


def _train(args: argparse.Namespace, bindings: list[str]) -> int:
    distributed = None
    if not args.dry_run:  # before anything touches a device; a dry run uses an AbstractMesh only
        distributed = multiprocess.initialize(args)
    # Gin parsing imports `tasks`: keep TensorFlow out of that (and out of --dry_run). The
    # trainer imports seqio itself when DATA_PIPELINE resolves to it; a user's own
    # MST5_NO_SEQIO=1 stays and makes 'auto' read through numpy.
    user_no_seqio = "MST5_NO_SEQIO" in os.environ
    os.environ.setdefault("MST5_NO_SEQIO", "1")
    cfg = parse_gin(args.gin_file, bindings)
    configure_tasks()  # applies tasks.configure bindings (e.g. train_source='xnli_mt')
    cfg.profile_steps = args.profile_steps or cfg.profile_steps
    cfg.compilation_cache_dir = args.compilation_cache_dir or cfg.compilation_cache_dir
    operative = config_str()
    print(operative, flush=True)
    if args.dry_run:
        print(json.dumps(config_check.check(cfg), indent=2))
        return 0
    from mst5_jax.training.trainer import Trainer  # imports `tasks`: after MST5_NO_SEQIO is set

    if not user_no_seqio:
        os.environ.pop("MST5_NO_SEQIO", None)

    fault = FaultHook.from_env()
    try:
        trainer = Trainer(cfg, hooks=[fault] if fault else [])  # locks MODEL_DIR, checks a resume
    except KeyError as e:  # the task registry's "unknown task or mixture 'x'; registered: [...]"
        if "unknown task" in str(e):
            raise cli.UserError(f"MIXTURE_OR_TASK_NAME: {e.args[0]}") from e
        raise
    try:
        if trainer.primary:
            resume_check.keep_operative_config(trainer.model_dir, operative)
    except BaseException:
        trainer.release_lock()
        raise
    with multiprocess.exit_on_peer_failure(distributed):
        summary = trainer.run()
    return cli.EXIT_PREEMPTED if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
