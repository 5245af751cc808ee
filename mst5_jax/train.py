"""`python -m mst5_jax.train --gin_file=xxl_lora.gin [--gin.MACRO=VALUE ...]`: the training CLI.

Parses flags and gin (`mst5_jax.training.gin_utils`), writes MODEL_DIR/operative_config.gin
and runs `mst5_jax.training.trainer.Trainer`. `--dry_run` builds the config on an
AbstractMesh of the hardware file's device count and prints the per-device memory
(`mst5_jax.training.config_check`) instead. A test-only fault (``MST5_FAULT``,
`mst5_jax.training.faults`) is read here once, at start-up.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from typing import Optional, Sequence

import jax

from mst5_jax.training import config_check
from mst5_jax.training.faults import FaultHook
from mst5_jax.training.gin_utils import config_str, configure_tasks, parse_gin

__all__ = ["main", "parse_gin"]

EXAMPLE = """example:
  python -m mst5_jax.train --gin_file=demo_cpu.gin
  python -m mst5_jax.train --gin_file xxl_lora.gin --gin.MODEL_DIR="'/runs/xxl'" --gin.TRAIN_STEPS=100 --dry_run

VALUE is a gin literal: strings are quoted, numbers are not. Gin files are found by bare
name anywhere under the repository's gin/ tree."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag, and the example epilog as written."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mst5_jax.train", epilog=EXAMPLE, formatter_class=_HelpFormatter)
    p.add_argument("--gin_file", action="append", default=[], metavar="NAME.gin", required=True,
                   help="a gin file, by path or by bare name under gin/ (repeatable, parsed in order)")
    p.add_argument("--gin.MACRO", dest="_gin_help", metavar="VALUE", default=None,
                   help="--gin.MACRO=VALUE or --gin.Configurable.param=VALUE: a gin binding, "
                        "applied after the files (repeatable)")
    p.add_argument("--dry_run", action="store_true",
                   help="parse the config, build it on an AbstractMesh and print per-device memory; train nothing")
    p.add_argument("--profile_steps", default=None, metavar="A:B",
                   help="write a jax.profiler trace of steps A..B to MODEL_DIR/profile")
    p.add_argument("--compilation_cache_dir", default=None, help="a persistent JAX compilation cache folder")
    return p


def split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`--gin.X=V` bindings as `X=V`, the other arguments): argparse cannot take dotted flags."""
    bindings, rest = [], []
    for a in argv:
        (bindings.append(a[len("--gin."):]) if a.startswith("--gin.") else rest.append(a))
    return bindings, rest


def main(argv: Optional[Sequence[str]] = None) -> int:
    bindings, rest = split_gin_bindings(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(rest)
    # force: an import may already have configured the root logger (at WARNING, bare format)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
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
    pathlib.Path(cfg.model_dir).mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (pathlib.Path(cfg.model_dir) / "operative_config.gin").write_text(operative)
    Trainer(cfg, hooks=[fault] if fault else []).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
