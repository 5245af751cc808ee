"""Which files the loaders may open: the symlink policy (see docs/RELIABILITY.md, "Trust").

Trusted: gin files and the paths the user names (a model, adapter, tokenizer or run
directory, a data directory). Not trusted: what those directories point to. A file found
inside a user-named directory is opened only if its real path (all symlinks resolved) is

* inside the real path of that directory, or
* inside the same Hugging Face hub cache repository (``.../models--owner--name/``):
  the hub stores ``snapshots/<rev>/<file>`` as a symlink to ``../../blobs/<sha256>``.

So a downloaded or shared model directory cannot make the loader read, say,
``~/.ssh/id_rsa`` or another repository's files through a planted symlink. The named
directory itself may be a symlink (the user named it). Shard names from an index file
must be plain file names (no ``/``, ``\\``, ``..``), checked in `plain_file_name`.
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional


class UnsafePathError(ValueError):
    """A file resolves outside the directory it was found in (a symlink escape)."""


def hub_repo_root(path: str | os.PathLike) -> Optional[pathlib.Path]:
    """The ``models--owner--name`` (or ``datasets--``/``spaces--``) folder of an HF hub
    cache path, or None when `path` is not inside one."""
    p = pathlib.Path(os.path.abspath(path))
    for parent in (p, *p.parents):
        if parent.name.startswith(("models--", "datasets--", "spaces--")) and (parent / "snapshots").is_dir():
            return parent
    return None


def allowed_roots(root: str | os.PathLike) -> list[pathlib.Path]:
    """Real paths a file found under `root` may resolve into (see the module docstring)."""
    root = pathlib.Path(root).expanduser()
    roots = [pathlib.Path(os.path.realpath(root))]
    for candidate in (root, roots[0]):
        hub = hub_repo_root(candidate)
        if hub is not None:
            real = pathlib.Path(os.path.realpath(hub))
            if real not in roots:
                roots.append(real)
    return roots


def _inside(p: pathlib.Path, root: pathlib.Path) -> bool:
    return p == root or root in p.parents


def resolve_inside(path: str | os.PathLike, root: str | os.PathLike) -> pathlib.Path:
    """The real path of `path` (a file found under the user-named directory `root`).

    Raises:
      UnsafePathError naming the file, where it resolves to and the allowed roots, when a
      symlink takes it outside them.
    """
    path = pathlib.Path(path).expanduser()
    real = pathlib.Path(os.path.realpath(path))
    roots = allowed_roots(root)
    if not any(_inside(real, r) for r in roots):
        raise UnsafePathError(
            f"{path}: resolves to {real}, outside the directory you named ({roots[0]})"
            + (f" and its hub cache repository ({roots[1]})" if len(roots) > 1 else "")
            + "; symlinks are followed only inside those. Copy the file in if you trust it.")
    return real


def check_tree(root: str | os.PathLike) -> None:
    """Applies `resolve_inside` to every symlink under `root` (files and folders)."""
    root = pathlib.Path(root).expanduser()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = pathlib.Path(dirpath) / name
            if p.is_symlink():
                resolve_inside(p, root)


def plain_file_name(name: str, source: str = "") -> str:
    """`name` if it is a plain file name (no directory part, not ``.``/``..``), else ValueError."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or "\x00" in name:
        raise UnsafePathError(f"{source}: file name {name!r} must be a plain file name (no '/', '\\\\' or '..')")
    return name
