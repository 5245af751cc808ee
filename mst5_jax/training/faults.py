"""Fault injection for reliability tests: seeded kill points chosen by an environment variable.

Production runs leave ``MST5_FAULT`` unset and nothing here does anything (`install` returns
without touching orbax, `maybe_fault` is a dict lookup). Tests set it on a child training
process to crash it at an exact point:

    MST5_FAULT=ckpt_before_finalize@4   # SIGKILL inside the step-4 save: orbax wrote its
                                        # temporary directory, the commit/rename has not run
    MST5_FAULT=ckpt_before_manifest@4   # SIGKILL after orbax committed step 4, before
                                        # manifest.json was written
    MST5_FAULT=ckpt_disk_full@4         # the step-4 save fails with OSError(ENOSPC) after its
                                        # data was written, before the commit (a failing writer)
    MST5_FAULT=after_step@3             # SIGKILL right after optimizer step 3 completes
    MST5_FAULT=sigterm_after_step@2     # a real SIGTERM to itself after step 2 (deterministic
                                        # preemption: the run saves at its next step, exits 0)

Several points may be given, comma-separated; ``point`` without ``@step`` fires at every
step. `install()` wraps orbax's `AtomicRenameTemporaryPath.finalize` (the rename that
commits a step directory ``<n>.orbax-checkpoint-tmp`` -> ``<n>``) so the ``ckpt_*`` points
can fire inside orbax's save.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
from typing import Optional

log = logging.getLogger(__name__)

ENV_VAR = "MST5_FAULT"
KILL_POINTS = ("after_step", "ckpt_before_finalize", "ckpt_before_manifest")
ERROR_POINTS = ("ckpt_disk_full",)
SIGTERM_POINTS = ("sigterm_after_step",)
POINTS = KILL_POINTS + ERROR_POINTS + SIGTERM_POINTS


def active(spec: Optional[str] = None) -> dict[str, Optional[int]]:
    """Parses ``MST5_FAULT`` (or `spec`): point -> step (None = every step).

    Raises:
      ValueError naming the bad entry, for an unknown point or a step that is not an int.
    """
    spec = os.environ.get(ENV_VAR, "") if spec is None else spec
    out: dict[str, Optional[int]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        point, _, step = entry.partition("@")
        if point not in POINTS:
            raise ValueError(f"{ENV_VAR}={spec!r}: unknown fault point {point!r}; expected one of {POINTS}")
        try:
            out[point] = int(step) if step else None
        except ValueError as e:
            raise ValueError(f"{ENV_VAR}={spec!r}: step in {entry!r} must be an integer") from e
    return out


def maybe_fault(point: str, step: Optional[int] = None) -> None:
    """Fires `point` if ``MST5_FAULT`` names it (for this `step`): SIGKILL, SIGTERM, or OSError(ENOSPC)."""
    if not os.environ.get(ENV_VAR):
        return
    table = active()
    if point not in table or (table[point] is not None and table[point] != step):
        return
    if point in SIGTERM_POINTS:
        log.warning("%s: SIGTERM to self at %s (step %s)", ENV_VAR, point, step)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if point in ERROR_POINTS:
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV_VAR}={point}@{step})")
    log.warning("%s: SIGKILL at %s (step %s)", ENV_VAR, point, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> bool:
    """Hooks the ``ckpt_*`` points into orbax when ``MST5_FAULT`` asks for one; idempotent.

    Returns True when a hook is installed (i.e. a test asked for one).
    """
    table = active()
    if not any(p.startswith("ckpt_before_finalize") or p == "ckpt_disk_full" for p in table):
        return False
    from orbax.checkpoint._src.path import atomicity

    cls = atomicity.AtomicRenameTemporaryPath
    if getattr(cls.finalize, "_mst5_fault_hook", False):
        return True
    original = cls.finalize

    async def finalize(self, *args, **kwargs):
        final = self.get_final()
        if final.name.isdigit():  # the step directory, not an item (params/, opt_state/, meta/)
            step = int(final.name)
            maybe_fault("ckpt_disk_full", step)
            maybe_fault("ckpt_before_finalize", step)
        return await original(self, *args, **kwargs)

    finalize._mst5_fault_hook = True
    cls.finalize = finalize
    log.warning("%s=%s: fault hooks installed in orbax's checkpoint commit", ENV_VAR, os.environ.get(ENV_VAR))
    return True
