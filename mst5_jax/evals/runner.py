"""Running registered evaluators by name on one `encode` callable.

`run` returns ``{task: result}``. With ``on_result``, each task's result is handed over
as soon as that task finishes (the evaluate CLI rewrites its output file there), and with
``keep_going`` a task that raises is recorded in the returned failures instead of losing
the tasks that already finished.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from mst5_jax.evals import registry

Encode = Callable[[list[str]], np.ndarray]

DEFAULT_TASKS = ("tatoeba", "bucc", "xsts")


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """"a,b" or ["a", "b"] or "all" -> validated task names (ValueError names the unknown ones)."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if names == ["all"]:
        return registry.names()
    unknown = [t for t in names if t not in registry.names()]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or names}; choose from {', '.join(registry.names())} or 'all'")
    return names


def run_tasks(tasks: str | Sequence[str], encode: Encode, data_dir, *, max_length: Optional[int] = None,
              batch_size: Optional[int] = None, device: Optional[str] = None,
              task_kwargs: Optional[dict[str, dict]] = None, log=sys.stderr,
              on_result: Optional[Callable[[str, dict], None]] = None,
              keep_going: bool = False) -> tuple[dict, dict[str, str]]:
    """Runs each task; returns ({task: result}, {failed task: "ExceptionType: message"}).

    Without `keep_going` the first failing task's exception propagates.
    """
    results: dict = {}
    failures: dict[str, str] = {}
    for task in parse_tasks(tasks):
        t0 = time.perf_counter()
        kwargs = dict((task_kwargs or {}).get(task, {}))
        try:
            result = registry.get(task)(encode, data_dir, max_length=max_length, batch_size=batch_size,
                                        device=device, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported per task, the others still run
            if not keep_going:
                raise
            failures[task] = f"{type(e).__name__}: {e}"
            if log is not None:
                print(f"[evaluate] {task}: FAILED after {time.perf_counter() - t0:.1f}s: {failures[task]}",
                      file=log, flush=True)
            continue
        results[task] = result
        if log is not None:
            print(f"[evaluate] {task}: {time.perf_counter() - t0:.1f}s", file=log, flush=True)
        if on_result is not None:
            on_result(task, result)
    return results, failures


def run(tasks: str | Sequence[str], encode: Encode, data_dir, **kwargs) -> dict:
    """Run evaluators by name; returns {task: result}. ``task_kwargs[task]`` adds arguments."""
    return run_tasks(tasks, encode, data_dir, **kwargs)[0]
