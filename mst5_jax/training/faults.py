"""Fault injection for reliability tests: a `FaultHook` that breaks a run at exact points.

Production runs have no fault hook and nothing here runs. Tests either install one on an
in-process `Trainer` (`Trainer(cfg, hooks=[FaultHook("after_step@3")])`), or start the CLI
with ``MST5_FAULT`` set: `python -m mst5_jax.train` reads that variable once, at start-up
(`FaultHook.from_env`), and adds the hook; the training loop never reads the environment.

    MST5_FAULT=ckpt_before_finalize@4   # SIGKILL inside the step-4 save: orbax wrote its
                                        # temporary directory, the commit/rename has not run
    MST5_FAULT=ckpt_before_manifest@4   # SIGKILL after orbax committed step 4, before
                                        # manifest.json was written
    MST5_FAULT=ckpt_disk_full@4         # the step-4 save fails with OSError(ENOSPC) after its
                                        # data was written, before the commit (a failing writer)
    MST5_FAULT=after_step@3             # SIGKILL right after optimizer step 3 completes
    MST5_FAULT=sigterm_after_step@2     # a real SIGTERM to itself after step 2 (deterministic
                                        # preemption: the run saves at its next step, exits 75)
    MST5_FAULT=sigint_after_step@2      # the same with SIGINT (Ctrl-C)
    MST5_FAULT=poison_before_step@4     # every trainable weight becomes NaN before update 4
                                        # (the non-finite-loss check)

Several points may be given, comma-separated; ``point`` without ``@step`` fires at every
step. The ``ckpt_before_finalize`` and ``ckpt_disk_full`` points fire inside orbax's save:
the hook wraps orbax's `AtomicRenameTemporaryPath.finalize` (the rename that commits a
step directory ``<n>.orbax-checkpoint-tmp`` -> ``<n>``) when the run starts.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
from typing import Optional

import jax
import jax.numpy as jnp

from mst5_jax.training.hooks import Hook

log = logging.getLogger(__name__)

ENV_VAR = "MST5_FAULT"
KILL_POINTS = ("after_step", "ckpt_before_finalize", "ckpt_before_manifest")
ERROR_POINTS = ("ckpt_disk_full",)
SIGNAL_POINTS = {"sigterm_after_step": signal.SIGTERM, "sigint_after_step": signal.SIGINT}
STATE_POINTS = ("poison_before_step",)
POINTS = KILL_POINTS + ERROR_POINTS + tuple(SIGNAL_POINTS) + STATE_POINTS
_ORBAX_POINTS = ("ckpt_disk_full", "ckpt_before_finalize")

_active: Optional["FaultHook"] = None  # the hook orbax's wrapped commit reports to


def active(spec: str) -> dict[str, Optional[int]]:
    """Parses a fault spec: point -> step (None = every step).

    Raises:
      ValueError naming the bad entry, for an unknown point or a step that is not an int.
    """
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


class FaultHook(Hook):
    """Fires the points of `spec` (see the module docstring) during a run."""

    def __init__(self, spec: str):
        self.spec = spec
        self.table = active(spec)

    @classmethod
    def from_env(cls) -> Optional["FaultHook"]:
        """The hook ``MST5_FAULT`` asks for, or None when it is unset or empty."""
        spec = os.environ.get(ENV_VAR, "")
        return cls(spec) if spec.strip() else None

    def wants(self, point: str, step: Optional[int]) -> bool:
        return point in self.table and self.table[point] in (None, step)

    def fire(self, point: str, step: Optional[int]) -> None:
        """SIGKILL, SIGTERM, SIGINT or OSError(ENOSPC), if `point` is due at `step`."""
        if not self.wants(point, step):
            return
        if point in SIGNAL_POINTS:
            sig = SIGNAL_POINTS[point]
            log.warning("%s: %s to self at %s (step %s)", ENV_VAR, sig.name, point, step)
            os.kill(os.getpid(), sig)
        elif point in ERROR_POINTS:
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV_VAR}={point}@{step})")
        elif point in KILL_POINTS:
            log.warning("%s: SIGKILL at %s (step %s)", ENV_VAR, point, step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def install_orbax(self) -> bool:
        """Wraps orbax's step commit when a ``ckpt_*`` point inside it is asked for; returns
        whether this hook needs it. The wrapper is installed once per process and reports to
        the latest hook that asked."""
        global _active
        if not any(p in _ORBAX_POINTS for p in self.table):
            return False
        _active = self
        from orbax.checkpoint._src.path import atomicity

        cls = atomicity.AtomicRenameTemporaryPath
        if getattr(cls.finalize, "_mst5_fault_hook", False):
            return True
        original = cls.finalize

        async def finalize(self_, *args, **kwargs):
            final = self_.get_final()
            if _active is not None and final.name.isdigit():  # the step directory, not an item
                step = int(final.name)
                _active.fire("ckpt_disk_full", step)
                _active.fire("ckpt_before_finalize", step)
            return await original(self_, *args, **kwargs)

        finalize._mst5_fault_hook = True
        cls.finalize = finalize
        log.warning("%s=%s: fault hooks installed in orbax's checkpoint commit", ENV_VAR, self.spec)
        return True

    # ------------------------------------------------------------------ hook events
    def on_start(self, trainer) -> None:
        self.install_orbax()

    def before_step(self, trainer, step: int) -> None:
        if self.wants("poison_before_step", step):
            trainer.state = trainer.state.replace(params=jax.tree.map(lambda x: x * jnp.nan, trainer.state.params))

    def on_save(self, trainer, step: int) -> None:
        self.fire("ckpt_before_manifest", step)

    def after_step(self, trainer) -> None:
        self.fire("after_step", trainer.step)
        for point in SIGNAL_POINTS:
            self.fire(point, trainer.step)

    def on_end(self, trainer) -> None:
        global _active
        if _active is self:
            _active = None
