"""One owner per run directory: `RunLock`, the file MODEL_DIR/.lock.

Process 0 of a run takes the lock before it reads or writes anything in MODEL_DIR and
releases it when the run ends (normally, on an error, or after a SIGTERM/SIGINT save). A
second trainer on the same MODEL_DIR refuses with `mst5_jax.utils.cli.UserError`, naming
the holder; the CLI prints that in one line and exits 2.

The lock is a small JSON file, created atomically with its content (written to a private
temporary file, then hard-linked to ``.lock``, which fails if ``.lock`` exists):

    {"host": "node-3", "pid": 41321, "proc_start": 8812345, "since": "2026-12-05T10:02:11Z",
     "command": "python -m mst5_jax.train --gin_file=xxl_lora.gin ..."}

A lock left by a process that died without releasing it (SIGKILL, OOM, power loss) is
*stale* when it names this host and a pid that is not alive, or a live pid whose start
time (``/proc/<pid>/stat``) differs from the recorded one (the pid was reused). A stale lock
is taken over with a warning. A lock from another host cannot be checked from here: the
message says to delete the file once that host's job is known to be gone.
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import pathlib
import socket
import sys
from typing import Optional

from mst5_jax.utils import fs
from mst5_jax.utils.cli import UserError

log = logging.getLogger("mst5_jax.train")

LOCK_FILE = ".lock"

_held: set[str] = set()  # lock paths this process holds now (a second Trainer here refuses too)


def _key(path) -> str:
    """One name per lock file: absolute for a local path, the URL for gs://."""
    return str(fs.absolute(path))


def _proc_start(pid: int) -> Optional[int]:
    """The start time of `pid` in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # field 22; the name in (...) may hold spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def describe(holder: dict) -> str:
    """``host H, pid P, since T (command C)`` for a lock's content."""
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
            f" (command: {holder.get('command') or '?'})")


class RunLock:
    """MODEL_DIR/.lock, held by this process from `acquire` to `release`.

    Example:
        lock = RunLock.acquire(model_dir)      # UserError if a live process holds it
        try:
            ...                                # train
        finally:
            lock.release()
    """

    def __init__(self, path: pathlib.Path, content: dict):
        self.path, self.content = path, content

    @classmethod
    def acquire(cls, model_dir: str | os.PathLike, command: Optional[str] = None) -> "RunLock":
        """Takes MODEL_DIR/.lock (taking over a stale one, with a warning).

        Raises:
          UserError: a live process (or this one, through another Trainer) holds the lock,
            or a process on another host does; the message names host, pid and start time.
        """
        path = fs.as_path(model_dir) / LOCK_FILE
        pid = os.getpid()
        content = {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
                   "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "command": command if command is not None else " ".join([sys.executable, *sys.argv])}
        for _ in range(3):  # a lost race against another taker of the same stale lock: look again
            if cls._create(path, content):
                _held.add(_key(path))
                lock = cls(path, content)
                atexit.register(lock.release)  # a Trainer built and never run still lets go at exit
                return lock
            holder = cls.read(path)
            if holder is None:
                continue  # released between our attempt and the read
            reason = cls._stale_reason(path, holder)
            if reason is None:
                raise UserError(
                    f"{path.parent} is in use by another trainer ({describe(holder)}); lock file {path}. "
                    "Wait for it to finish, or train into another MODEL_DIR. If that process is gone "
                    f"(e.g. a job on host {holder.get('host')} that was killed), delete {path} and rerun.")
            log.warning("%s: taking over a stale lock (%s): %s", path, reason, describe(holder))
            stale = path.with_name(f"{LOCK_FILE}.stale-{pid}")
            try:
                fs.move(path, stale)  # local: atomic, of two takers one moves it and the other retries
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
        raise UserError(f"{path}: could not take the run lock (it keeps changing hands); rerun")

    @staticmethod
    def _create(path: pathlib.Path, content: dict) -> bool:
        """Writes the lock with its content in one step; False if it exists.

        On gs:// the object is created with a generation precondition (`fs.create_object`):
        of two trainers racing for one MODEL_DIR, the store lets exactly one write it.
        """
        if fs.is_remote(path):
            return fs.create_object(path, (json.dumps(content) + "\n").encode())
        tmp = path.with_name(f"{LOCK_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(content) + "\n")
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(content) + "\n")
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def read(path: pathlib.Path) -> Optional[dict]:
        """The holder recorded in `path`, None when the file is gone; {} when unreadable."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _stale_reason(path: pathlib.Path, holder: dict) -> Optional[str]:
        """Why the lock is stale, or None while its holder may be alive."""
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return None
        pid = holder["pid"]
        if pid == os.getpid():
            # Ours: held by a live Trainer of this process (refuse), or left by one that was
            # built and never run or closed (stale).
            return None if _key(path) in _held else "left by this process"
        if not _pid_alive(pid):
            return f"pid {pid} is not running"
        recorded, now = holder.get("proc_start"), _proc_start(pid)
        if recorded is not None and now is not None and recorded != now:
            return f"pid {pid} now belongs to another process"
        return None

    def release(self) -> None:
        """Removes the lock if it is still ours (idempotent)."""
        key = _key(self.path)
        if key not in _held:
            return
        _held.discard(key)
        if self.read(self.path) == self.content:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("%s: the lock no longer holds this process's record; left as it is", self.path)
