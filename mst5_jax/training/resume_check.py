"""What a resume may change: the new run's record against MODEL_DIR/run.json, field by field.

The run record (run.json) holds, besides what loading needs (`mst5_jax.formats.run_dir`),
the recipe: `optimizer.*`, `loss.*`, `batch_size`, `schedule_steps`, `task`, `seed`,
`max_length`. `check_resume(old, new, allowed)` sorts every field that differs into one
of three kinds:

- **structural**: shapes or meaning of the trained weights. `encoder_config.*` (except the
  kinds below), `mode` (LoRA vs full fine-tune), `lora.*`, `vocab_sha256`, and for LoRA the
  frozen base (`base.fingerprint`, `base.random_init`, `base.seed`). Any change refuses:
  one `UserError` lists every field old -> new and says to use a new MODEL_DIR.
- **recipe**: `optimizer.*`, `loss.*`, `batch_size`, `schedule_steps`, `task`, `seed`,
  `max_length`, `encoder_config.dtype`, `.param_dtype`, `.dropout_rate`. A change is
  accepted only when the gin macro ``ALLOW_RECIPE_CHANGES`` (`TrainConfig.allow_recipe_changes`)
  names the field or its group (``'optimizer.learning_rate'``, or ``'optimizer'`` for all
  of it); otherwise it refuses like a structural change. Accepted changes are appended
  to MODEL_DIR/run_history.jsonl (`append_history`).
- **free**: everything else (TRAIN_STEPS, which may be raised to continue a run;
  logging, checkpoint and eval intervals, which run.json does not record; `remat`,
  `attention_impl`; the vocabulary's and base's paths, whose contents are fingerprinted).

A field the old run.json does not record (written before the recipe was recorded) is
unknown: accepted with a warning and a history record.
"""
from __future__ import annotations

import datetime
import json
import logging
import pathlib
from typing import Any, Iterable, Sequence

from mst5_jax.utils import files, fs
from mst5_jax.utils.cli import UserError

log = logging.getLogger("mst5_jax.train")

HISTORY_FILE = "run_history.jsonl"
OPERATIVE_CONFIG = "operative_config.gin"

RECIPE_FIELDS = ("optimizer", "loss", "batch_size", "schedule_steps", "task", "seed", "max_length",
                 "encoder_config.dtype", "encoder_config.param_dtype", "encoder_config.dropout_rate")
"""Fields (or groups, by dotted prefix) a resume may change when ALLOW_RECIPE_CHANGES names them."""

FREE_FIELDS = ("train_steps", "vocab", "best_metric", "best_mode", "data_pipeline", "encoder_config.remat",
               "encoder_config.attention_impl", "encoder_config.scan_layers", "encoder_config.name", "base.path")
"""Fields a resume may always change (TRAIN_STEPS: below the resumed step is refused separately)."""

STRUCTURAL_FIELDS = ("encoder_config", "mode", "lora", "vocab_sha256", "base")
"""Everything else under these: refused. `base.*` only counts for LoRA runs (a full
fine-tune restores every weight from its checkpoint)."""

_MISSING = object()


def _under(field: str, groups: Iterable[str]) -> bool:
    return any(field == g or field.startswith(g + ".") for g in groups)


def kind(field: str, mode: str) -> str:
    """"free", "recipe" or "structural" for a dotted run.json field."""
    if _under(field, FREE_FIELDS):
        return "free"
    if _under(field, RECIPE_FIELDS):
        return "recipe"
    if field.startswith("base") and mode != "lora":
        return "free"
    if _under(field, STRUCTURAL_FIELDS):
        return "structural"
    return "free"


def diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, old, new) for every leaf that differs; dicts on both sides recurse."""
    if isinstance(old, dict) and isinstance(new, dict) or (old is _MISSING and isinstance(new, dict)):
        old = {k: _MISSING for k in new} if old is _MISSING else old  # an unrecorded group: each field unknown
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff(old.get(k, _MISSING), new.get(k, _MISSING), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [(prefix, old, new)]


def _show(v: Any) -> str:
    return "(not recorded)" if v is _MISSING else json.dumps(v)


def check_resume(old: dict, new: dict, allowed: Sequence[str], *, run_file: pathlib.Path, step: int,
                 train_steps: int) -> list[dict]:
    """The accepted changes of a resume at `step` (records for `append_history`).

    Args:
      old: run.json as recorded. new: this attempt's record (JSON values).
      allowed: ALLOW_RECIPE_CHANGES, field names or groups from `RECIPE_FIELDS`.
    Raises:
      UserError: an unknown name in `allowed`; TRAIN_STEPS below `step`; or one message
        listing every structural or not-allowed recipe change old -> new.
    """
    for a in allowed:
        if not (_under(a, RECIPE_FIELDS) or any(r.startswith(a + ".") for r in RECIPE_FIELDS)):
            raise UserError(f"ALLOW_RECIPE_CHANGES: {a!r} is not a recipe field; expected names or groups of "
                            f"{', '.join(RECIPE_FIELDS)} (e.g. 'optimizer.learning_rate')")
    if train_steps < step:
        raise UserError(f"TRAIN_STEPS={train_steps} is below step {step}, where the run in {run_file.parent} "
                        f"resumes; raise TRAIN_STEPS to continue it (or use a new MODEL_DIR)")
    mode = new.get("mode", old.get("mode"))
    refused, accepted = [], []
    for field, o, n in diff(old, json.loads(json.dumps(new, default=str))):
        k = kind(field, mode)
        if k == "free" or n is _MISSING:
            continue
        if field == "base.fingerprint" and k == "structural":
            if isinstance(o, str) and ":" not in o:
                continue  # a header-only record (older run.json): the trainer checks it by that rule
            old_path, new_path = (old.get("base") or {}).get("path"), (new.get("base") or {}).get("path")
            refused.append(f"base.fingerprint: the base weights in {new_path} are not the ones this LoRA run "
                           f"was trained on (from {old_path}; their content hash differs)")
            continue
        if o is _MISSING:
            log.warning("%s does not record %s: resuming with %s = %s unchecked", run_file, field, field, _show(n))
            accepted.append({"field": field, "old": None, "new": n, "note": "not recorded by the earlier run"})
        elif k == "recipe" and _under(field, allowed):
            accepted.append({"field": field, "old": o, "new": n})
        else:
            refused.append(f"{field}: {_show(o)} -> {_show(n)}" + (
                "" if k == "structural" else " (a recipe field: allow it with ALLOW_RECIPE_CHANGES)"))
    if refused:
        raise UserError(
            f"{run_file.parent} holds a run at step {step} whose config differs from this one "
            f"({run_file} -> now): " + "; ".join(refused) + ". Nothing was changed. Train this config into a "
            "new MODEL_DIR, or, for recipe fields only, name them in ALLOW_RECIPE_CHANGES "
            "(e.g. --gin.ALLOW_RECIPE_CHANGES=\"['optimizer.learning_rate']\").")
    for a in accepted:
        a["step"] = step
        log.warning("resume at step %d changes %s: %s -> %s", step, a["field"], _show(a["old"]), _show(a["new"]))
    return accepted


def append_history(model_dir: pathlib.Path, changes: Sequence[dict]) -> None:
    """Appends one JSON line per accepted change to MODEL_DIR/run_history.jsonl:
    {"time" (UTC ISO 8601), "step" (the resumed step), "field", "old", "new"[, "note"]}."""
    if not changes:
        return
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = fs.as_path(model_dir) / HISTORY_FILE
    old = path.read_text(encoding="utf-8") if path.exists() else ""  # objects cannot be appended to
    files.write_text_atomic(path, old + "".join(json.dumps({"time": now, **c}) + "\n" for c in changes))


def keep_operative_config(model_dir: pathlib.Path, text: str) -> pathlib.Path:
    """Writes this attempt's operative config next to the earlier ones, overwriting none:
    operative_config.gin for the first attempt, operative_config.<n>.gin for attempt n >= 2."""
    model_dir = fs.as_path(model_dir)
    n = 1
    while True:
        path = model_dir / (OPERATIVE_CONFIG if n == 1 else f"operative_config.{n}.gin")
        if fs.is_remote(path):  # an object store has no exclusive create; the run lock serialises writers
            if not path.exists():
                files.write_text_atomic(path, text)
                return path
            n += 1
            continue
        try:
            with open(path, "x", encoding="utf-8") as f:  # exclusive: never replaces an attempt's file
                f.write(text)
            return path
        except FileExistsError:
            n += 1

