"""Checkpoint manifests: what a committed step directory held, so restore can verify it.

After orbax commits a step (``checkpoints/<step>.orbax-checkpoint-tmp`` renamed to
``checkpoints/<step>``), `write(step_dir)` records every file below it in
``<step>/manifest.json``::

    {"format": "mst5-manifest/1", "step": 4, "total_bytes": 1623040, "hashed": true,
     "files": {"params/d/60c4...": {"size": 6308, "sha256": "9f2c..."}, ...}}

Paths are relative (POSIX), sizes in bytes. sha256 is recorded when the whole step is at
most `hash_limit_bytes()` (1 GiB by default, ``MST5_MANIFEST_HASH_LIMIT_BYTES``
overrides): LoRA-sized checkpoints (factors and their optimizer state) are hashed in full,
a full fine-tune of a large model gets sizes only, which catch truncation and missing
files at no cost.

`verify(step_dir)` lists what is wrong, each message naming the file. Training resumes
from `newest_verified_step`: the newest step that verifies; newer steps that do not are
moved aside to ``MODEL_DIR/checkpoints_rejected/<step>-<unix time>`` (never deleted) and a
warning names their bad files. A step without ``manifest.json`` (a crash between orbax's
commit and the manifest write) is not trusted for resume.

Step directories may be ``gs://`` URLs: files are listed, sized, hashed and moved through
`mst5_jax.utils.fs` (on GCS orbax marks a finished step with ``commit_success.txt`` instead
of a rename; a step it never finished has no manifest either, so resume skips it).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Iterable, Optional

from mst5_jax.utils import files as files_lib
from mst5_jax.utils import fs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "mst5-manifest/1"
HASH_LIMIT_ENV = "MST5_MANIFEST_HASH_LIMIT_BYTES"
DEFAULT_HASH_LIMIT = 1 << 30
REJECTED_DIR = "checkpoints_rejected"


class CheckpointIntegrityError(ValueError):
    """A checkpoint does not match its manifest; the message names the files."""


def hash_limit_bytes() -> int:
    """Steps up to this many bytes get sha256 per file; larger ones sizes only."""
    return int(os.environ.get(HASH_LIMIT_ENV, DEFAULT_HASH_LIMIT))


def _is_primary() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # jax not importable or not initialised: a single process
        return True


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _file_sizes(step_dir: fs.AnyPath) -> dict[str, int]:
    """{relative POSIX path: bytes} of every file below `step_dir`, sorted, manifests excluded
    (also an `atomic_write` temporary of one)."""
    return {rel: size for rel, size in fs.file_sizes(step_dir).items()
            if rel not in (MANIFEST, MANIFEST + ".tmp") and not rel.startswith(f".{MANIFEST}.")}


def build(step_dir: str | os.PathLike, hash_limit: Optional[int] = None) -> dict:
    """The manifest dict of `step_dir` (nothing is written)."""
    step_dir = fs.as_path(step_dir)
    sizes = _file_sizes(step_dir)
    total = sum(sizes.values())
    hashed = total <= (hash_limit_bytes() if hash_limit is None else hash_limit)
    entries = {}
    for rel, size in sizes.items():
        e: dict = {"size": size}
        if hashed:
            e["sha256"] = files_lib.sha256_file(step_dir / rel)
        entries[rel] = e
    step = int(step_dir.name) if step_dir.name.isdigit() else None
    return {"format": FORMAT, "step": step, "total_bytes": total, "hashed": hashed, "files": entries}


def write(step_dir: str | os.PathLike, hash_limit: Optional[int] = None) -> Optional[fs.AnyPath]:
    """Writes ``<step_dir>/manifest.json`` atomically (`mst5_jax.utils.files.atomic_write`);
    process 0 only.

    Call it after orbax has committed the step (`RunCheckpoints.save` returned). Returns
    the manifest path, or None on processes other than 0.
    """
    step_dir = fs.as_path(step_dir)
    if not _is_primary():
        return None
    if not step_dir.is_dir():
        raise FileNotFoundError(f"{step_dir}: no committed checkpoint to write a manifest for")
    data = build(step_dir, hash_limit)
    path = step_dir / MANIFEST
    files_lib.write_json_atomic(path, data, indent=1, sort_keys=True)
    log.info("wrote %s (%d files, %d bytes, sha256=%s)", path, len(data["files"]), data["total_bytes"],
             data["hashed"])
    return path


def verify(step_dir: str | os.PathLike, require_manifest: bool = True) -> list[str]:
    """What is wrong with `step_dir` against its manifest; [] when it verifies.

    Each message starts with the offending file's path. Checks: the manifest parses, every
    listed file exists with its size (and sha256 when recorded). Files not listed are
    ignored. Without a manifest: one problem when `require_manifest`, else [] (logged).
    """
    step_dir = fs.as_path(step_dir)
    path = step_dir / MANIFEST
    if not path.is_file():
        if require_manifest:
            return [f"{path}: missing (the step was committed by orbax but never verified; "
                    "a crash between the commit and the manifest write leaves this)"]
        log.warning("%s: no manifest; loading without verification", step_dir)
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {data.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"{path}: unreadable manifest ({e})"]
    problems = []
    present = fs.file_sizes(step_dir)
    for rel, entry in sorted(files.items()):
        p = step_dir / rel
        if ".." in pathlib.PurePosixPath(rel).parts or pathlib.PurePosixPath(rel).is_absolute():
            problems.append(f"{path}: entry {rel!r} is not a relative path inside the step")
            continue
        if rel not in present:
            problems.append(f"{p}: missing")
            continue
        size = present[rel]
        if size != entry.get("size"):
            problems.append(f"{p}: size {size} bytes, the manifest says {entry.get('size')}")
            continue
        if "sha256" in entry:
            digest = files_lib.sha256_file(p)
            if digest != entry["sha256"]:
                problems.append(f"{p}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}...")
    return problems


def committed_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
    """Step numbers of the committed (digit-named) step directories, ascending."""
    d = fs.as_path(checkpoints_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def newest_verified_step(checkpoints_dir: str | os.PathLike, steps: Optional[Iterable[int]] = None, *,
                         quarantine: bool = False, require_manifest: bool = True) -> Optional[int]:
    """The newest step in `steps` (default: every committed step) whose directory verifies.

    Newer steps that fail are logged with every problem (naming the files) and, with
    `quarantine`, moved to ``<checkpoints_dir>/../checkpoints_rejected/<step>-<time>`` so
    that orbax no longer sees them and the run can write that step again. Moving is done
    by process 0; all processes then meet at a barrier. Returns None when no step
    verifies (the caller starts from scratch; rejected steps are kept aside).
    """
    d = fs.as_path(checkpoints_dir)
    if quarantine:
        _barrier("mst5_manifest_verify")  # every process lists the steps before any is moved
    steps = sorted(committed_steps(d) if steps is None else steps, reverse=True)
    chosen = None
    rejected = []
    for step in steps:
        problems = verify(d / str(step), require_manifest=require_manifest)
        if not problems:
            chosen = step
            break
        rejected.append(step)
        log.warning("checkpoint step %d fails verification, falling back to an older step:\n  %s",
                    step, "\n  ".join(problems))
    if rejected and chosen is None:
        log.warning("%s: no checkpoint verifies (steps %s); starting from step 0", d, rejected)
    if quarantine:
        if rejected and _is_primary():
            target_root = d.parent / REJECTED_DIR
            target_root.mkdir(parents=True, exist_ok=True)
            for step in rejected:
                target = target_root / f"{step}-{int(time.time())}"
                fs.move(d / str(step), target)
                log.warning("moved the unverified checkpoint %s to %s", d / str(step), target)
        _barrier("mst5_manifest_quarantine")
    return chosen


def require_verified(step_dir: str | os.PathLike, require_manifest: bool = False) -> None:
    """Raises CheckpointIntegrityError naming the bad files when `step_dir` does not verify."""
    problems = verify(step_dir, require_manifest=require_manifest)
    if problems:
        raise CheckpointIntegrityError(f"{step_dir} does not match its manifest:\n  " + "\n  ".join(problems))
