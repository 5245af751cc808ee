"""No tracked file names a path that exists only on one developer's machine.

A guide, a doc or a script that says `/work/...`, `/root/...`, `/home/alice/...`, `/Users/...`
or `C:\\Users\\...` works for its author only. Generic example paths such as `/tmp/run` are fine.
"""
import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
MACHINE_PATHS = re.compile(r"(?<![\w.~-])(/work/|/root/|/home/[A-Za-z0-9_.-]+/|/Users/|[A-Za-z]:\\\\?Users\\)")
SELF = pathlib.Path(__file__).resolve().relative_to(REPO).as_posix()  # holds the patterns themselves


def tracked_text_files() -> list[str]:
    """git's tracked files (the working tree's when there is no .git: every non-hidden file)."""
    if (REPO / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    else:
        names = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    return [n for n in names if n != SELF and (REPO / n).is_file()]


def test_no_machine_specific_absolute_paths():
    hits = []
    for name in tracked_text_files():
        data = (REPO / name).read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if MACHINE_PATHS.search(line):
                hits.append(f"{name}:{lineno}: {line.strip()[:120]}")
    assert not hits, ("machine-specific absolute paths (use a path relative to the repository, "
                      "e.g. ../shared/data, or a generic /tmp/... example):\n" + "\n".join(hits))


def test_the_pattern_catches_what_it_should():
    for bad in ("see /work/shared/PAPER.md", "cd /root/x", "/home/alice/data", "/Users/bob/m", r"C:\Users\x"):
        assert MACHINE_PATHS.search(bad), bad
    for fine in ("/tmp/mst5_run", "../shared/data", "~/data", "gs://b/work/x", "https://x.org/home/a/"):
        assert not MACHINE_PATHS.search(fine), fine
