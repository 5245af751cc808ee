"""Multi-host start-up for `python -m mst5_jax.train`, with t5x's flag names.

One training run may span many processes (a TPU pod's workers, the nodes of a GPU job, or
N processes on one machine). Every process runs the same command; `jax.distributed` joins
them into one set of global devices, so the mesh, the global batch and the losses are
those of one process with the same total device count.

    --multiprocess                      jax.distributed.initialize() with cluster
                                        auto-detection: Cloud TPU pods, SLURM, Open MPI
    --coordinator_address=HOST:PORT \\
      --process_count=N --process_index=I   an explicit launch (implies --multiprocess)

`initialize(args)` must run before anything touches a jax device: the first device query
fixes the process's view of the world. `--initialization_timeout_s` bounds the wait for
every peer to join. When a peer dies, the others stop within about `--heartbeat_timeout_s`:
a collective with the dead peer fails at once (`exit_on_peer_failure` prints one clear line
and exits with `EXIT_PEER_FAILED`), and a process that is not in a collective is stopped by
JAX's coordination service ("the JAX distributed service detected fatal errors", SIGABRT)
when the peer's heartbeat times out. Either way the exit code is non-zero, so a scheduler
restarts the job; the same command on every process resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from typing import Iterator, Optional

import jax

from mst5_jax.utils.cli import UserError

log = logging.getLogger("mst5_jax.train")

EXIT_PEER_FAILED = 3
"""The exit code of a process whose collective with a dead peer failed."""
# Substrings of the JaxRuntimeError that a lost peer causes (gloo on CPU, the coordination
# service on any platform).
_PEER_FAILURE = ("Gloo", "gloo", "coordination service", "heartbeat", "Connection reset", "Connection closed",
                 "UNAVAILABLE")

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):(\d{1,5})$")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags, as a group of `parser`."""
    g = parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--multiprocess", action="store_true",
                   help="start jax.distributed before training; with no address below, the cluster "
                        "(Cloud TPU pod, SLURM, Open MPI) is detected from the environment")
    g.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="process 0's address and a free port, the same on every process (implies --multiprocess)")
    g.add_argument("--process_count", type=int, default=None, metavar="N",
                   help="number of processes in the run (implies --multiprocess)")
    g.add_argument("--process_index", type=int, default=None, metavar="I",
                   help="this process's index, 0..N-1; process 0 writes the run files and metrics "
                        "(implies --multiprocess)")
    g.add_argument("--initialization_timeout_s", type=int, default=300, metavar="S",
                   help="seconds to wait for every process to join before failing")
    g.add_argument("--heartbeat_timeout_s", type=int, default=100, metavar="S",
                   help="seconds without a heartbeat after which a process counts as dead and the others stop")


def requested(args: argparse.Namespace) -> bool:
    """Whether the flags ask for a multi-process run."""
    return bool(args.multiprocess or args.coordinator_address is not None or args.process_count is not None
                or args.process_index is not None)


def check_flags(args: argparse.Namespace) -> None:
    """Raises UserError naming the flag when a multi-host flag has a bad value."""
    addr = args.coordinator_address
    if addr is not None:
        m = _ADDRESS.match(addr)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise UserError(f"--coordinator_address={addr!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
    n, i = args.process_count, args.process_index
    if n is not None and n < 1:
        raise UserError(f"--process_count={n}: expected a positive number of processes")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise UserError(f"--process_index={i}: expected 0..{'N-1' if n is None else n - 1} "
                        f"(--process_count={n})")
    for flag in ("initialization_timeout_s", "heartbeat_timeout_s"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag}={getattr(args, flag)}: expected at least 1 second")


def initialize(args: argparse.Namespace) -> Optional[dict]:
    """Starts `jax.distributed` when the flags ask for it; returns {process_index,
    process_count, local_devices, global_devices}, or None for a single-process run.

    Must run before any jax device is touched (the CLI calls it right after parsing flags).
    """
    if not requested(args):
        return None
    check_flags(args)
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.process_count,
                                   process_id=args.process_index,
                                   initialization_timeout=args.initialization_timeout_s,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout_s)
    except (ValueError, RuntimeError) as e:  # jax's XlaRuntimeError is a RuntimeError
        given = ", ".join(f"--{k}={getattr(args, k)}" for k in ("coordinator_address", "process_count",
                                                                "process_index") if getattr(args, k) is not None)
        reason = str(e).strip().rstrip(".")[:500]
        raise UserError(
            f"jax.distributed.initialize failed ({given or 'cluster auto-detection'}): {reason}. "
            "Outside a TPU pod, SLURM or Open MPI job, pass --coordinator_address=HOST:PORT --process_count=N "
            "--process_index=I, the same address and count on every process; every process must start within "
            f"--initialization_timeout_s={args.initialization_timeout_s}") from e
    info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}
    log.info("jax.distributed: process %(process_index)d of %(process_count)d, %(local_devices)d local of "
             "%(global_devices)d devices", info)
    return info


@contextlib.contextmanager
def exit_on_peer_failure(info: Optional[dict]) -> Iterator[None]:
    """In a multi-process run (`info` from `initialize`), turns a collective that failed
    because a peer died into one line on stderr and `os._exit(EXIT_PEER_FAILED)`.

    `os._exit` skips JAX's exit-time shutdown barrier, which would wait for the dead peer
    and then abort with a C++ stack trace. Other errors, and every error of a
    single-process run, propagate unchanged.
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if info is None or not any(marker in text for marker in _PEER_FAILURE):
            raise
        first = text.strip().splitlines()[0][:400] if text.strip() else type(e).__name__
        print(f"python -m mst5_jax.train: error: process {info['process_index']} of {info['process_count']}: "
              f"a collective with another process failed ({first}); a peer process has probably died, see its "
              f"log. Every process stops (exit code {EXIT_PEER_FAILED}); run the same command on every process "
              "to resume from the latest checkpoint.", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_PEER_FAILED)
