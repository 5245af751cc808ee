"""What every `python -m mst5_jax.X` command shares: errors, logging and outputs.

- A user's mistake (a bad flag, path, config, data or weights) is raised as `UserError`
  (or one of the error classes listed in `USER_ERRORS`) and printed as one or two lines on
  stderr: what is wrong, what was expected, and the fix. The exit code is `EXIT_USER_ERROR`.
  A traceback appears only with ``--debug``, or for an internal bug.
- Logging has one format everywhere; third-party INFO lines (absl, orbax, jax's backend
  probing) are hidden unless ``--verbose``.
- Outputs are never destroyed: `check_output` refuses an existing output without
  ``--overwrite`` and an output that is also an input; writers then go through
  `mst5_jax.utils.files.atomic_write`, so an old output is replaced only once the new one is
  complete.

Example:
  def main(argv=None):
      parser = cli.parser("python -m mst5_jax.encode", __doc__, example="...")
      ...
      return cli.run(lambda: _main(args), debug=args.debug)
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import warnings
from typing import Callable, Iterable, Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
EXIT_PREEMPTED = 75
"""`python -m mst5_jax.train` after a SIGTERM or SIGINT: the step was saved, the run is not
finished; rerun the same command to resume. EX_TEMPFAIL of sysexits.h ("try again later"),
so a scheduler tells it from success (0), a user error (2) and a crash (1 or a signal)."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS = ("absl", "orbax", "jax._src.distributed", "tensorflow", "h5py",
                 "urllib3", "httpx", "filelock", "huggingface_hub")
BACKEND_PROBING_LOGGERS = ("jax._src.xla_bridge", "jax._src.cloud_tpu_init")


class UserError(Exception):
    """A mistake the user can fix. The message says what, what was expected, and how to fix it."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError, FileExistsError)
"""Errors printed without a traceback. The project raises ValueError (and subclasses such
as the weight-format errors) for bad input, with messages that name the value and the fix."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default and keeps the description's and epilog's line breaks."""


def parser(prog: str, description: Optional[str], example: Optional[str] = None) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared flags (``--debug``, ``--verbose``) and an example."""
    p = argparse.ArgumentParser(prog=prog, description=(description or "").strip().split("\n\n")[0],
                                epilog=f"example:\n  {example}" if example else None, formatter_class=HelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument("--verbose", action="store_true", help="show third-party INFO logs (absl, orbax, jax)")
    return p


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """``--model`` (required), ``--adapter``, ``--step`` and ``--dtype``: what a command that
    loads one `SentenceEncoder.from_pretrained` model takes."""
    p.add_argument("--model", required=True, help="HF, sentence-transformers or training-run directory, or hub id")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory")
    p.add_argument("--step", default="latest", help="for a training run: latest, best or a step number")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")


def setup_logging(verbose: bool = False) -> None:
    """One log format for every command; third-party chatter only with ``--verbose``.

    Python warnings go through logging too (logger ``py.warnings``), so they share the format.
    Without ``--verbose``, JAX's backend probing is quiet below ERROR: its "a TPU/GPU may be
    present ... falling back to cpu" and libtpu warnings (``jax._src.xla_bridge`` and
    ``jax._src.cloud_tpu_init``) say nothing the CLIs' own "encoding on N device(s): cpu"
    lines do not.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.captureWarnings(True)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for name in BACKEND_PROBING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        warnings.filterwarnings("ignore", module=r"jax\._src\.cloud_tpu_init")


def run(body: Callable[[], Optional[int]], prog: str, debug: bool = False) -> int:
    """Calls `body`, turning user errors into a short message and `EXIT_USER_ERROR`."""
    try:
        return int(body() or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {error_text(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SystemExit as e:  # argparse-style `raise SystemExit("message")` from library code
        if debug or not isinstance(e.code, str):
            raise
        print(f"{prog}: error: {e.code}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def error_text(e: BaseException) -> str:
    """The message of `e`, with the file name for OS errors that carry one."""
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e.args[-1] if e.args else ""):
        return f"{e.strerror or e}: {e.filename}"
    return str(e) or type(e).__name__


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (existing or not)."""
    pa, pb = pathlib.Path(a), pathlib.Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def check_output(output: str | os.PathLike, inputs: Iterable[Optional[str | os.PathLike]] = (),
                 overwrite: bool = False, flag: str = "--output") -> pathlib.Path:
    """Refuses an output that is also an input, or that exists without ``--overwrite``."""
    out = pathlib.Path(output)
    for src in inputs:
        if src is not None and same_file(out, src):
            raise UserError(f"{flag} {out} is also an input ({src}); choose another output path")
    if out.exists() and not overwrite:
        raise UserError(f"{flag} {out} exists; pass --overwrite to replace it (it is replaced only once the "
                        "new output is complete), or choose another path")
    if not out.parent.is_dir():
        raise UserError(f"{flag} {out}: folder {out.parent} does not exist; create it first")
    return out


def argv_list(argv: Optional[Sequence[str]]) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
