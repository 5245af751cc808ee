"""Local and ``gs://`` paths behind one API: every path the project reads or writes goes here.

- `as_path`: a `pathlib.Path` for a local path, an `etils.epath.Path` for a ``gs://`` URL.
  ``pathlib.Path("gs://b/x")`` collapses to ``gs:/b/x`` and ``.absolute()`` turns it into a
  local folder named ``gs:``; `as_path` is how a URL stays a URL.
- `is_remote`: whether a path or URL lives in cloud storage.
- `configure`: picks the backends, once per process, before the first ``gs://`` access.
  epath reads ``gs://`` through fsspec/gcsfs (``EPATH_USE_TF=false``: with TensorFlow
  installed epath would otherwise use ``tf.io.gfile``, which ignores the emulator), and
  `STORAGE_EMULATOR_HOST` (google-cloud-storage's variable, the one users set) is mapped
  onto every client the project uses:

  ====================  =====================================================
  client                 what it is told
  ====================  =====================================================
  gcsfs (epath, orbax)   endpoint from ``STORAGE_EMULATOR_HOST``, anonymous token,
                         no gRPC bucket-type probe
  tensorstore (orbax     ``TENSORSTORE_GCS_HTTP_URL`` = the emulator URL,
  array data)            ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (any value)
  ====================  =====================================================

  Without the emulator variable, gcsfs and tensorstore use Google's default credentials
  (``gcloud auth application-default login``, a service account, or the VM's metadata).
- `stage`: a ``gs://`` directory (or file) copied into a local cache for the loaders that
  need real files (safetensors is memory-mapped), refreshed when the objects change, the
  way a hub download is cached. A local path is passed through unchanged.
- `upload_dir`: a local folder's files copied under a ``gs://`` prefix.
- `absolute`, `file_sizes`, `move`: what a run directory needs beyond reading and writing
  files (an absolute MODEL_DIR, a checkpoint step's file list with sizes, moving a rejected
  step aside), for both kinds of path.

gcsfs is imported only when a ``gs://`` path is used (the ``[gcs]`` extra).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]
AnyPath = Union[pathlib.Path, epath.Path]

REMOTE_SCHEMES = ("gs://",)
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
TENSORSTORE_URL_ENV = "TENSORSTORE_GCS_HTTP_URL"
TENSORSTORE_TOKEN_ENV = "GOOGLE_AUTH_TOKEN_FOR_TESTING"

_configured: tuple | None = None
_exported: dict[str, str] = {}  # the variables `configure` set, so a new emulator replaces them


def is_remote(path: PathLike | None) -> bool:
    """True for a ``gs://`` URL (a str or an `epath.Path` of one)."""
    return path is not None and os.fspath(path).startswith(REMOTE_SCHEMES)


def as_path(path: PathLike) -> AnyPath:
    """`path` as an `epath.Path` when it is a ``gs://`` URL, else as an expanded `pathlib.Path`."""
    if is_remote(path):
        configure()
        return epath.Path(os.fspath(path))
    if isinstance(path, epath.Path) and not isinstance(path, pathlib.Path):
        return pathlib.Path(os.fspath(path))
    return pathlib.Path(path).expanduser()


def configure() -> None:
    """Points epath at gcsfs and maps `STORAGE_EMULATOR_HOST` onto gcsfs and tensorstore.

    Idempotent and cheap; called by `as_path` for every ``gs://`` path, and by the CLIs and
    `SentenceEncoder.from_pretrained` before they start. A changed emulator variable (a test
    starting a new emulator) drops the cached gcsfs clients so the next access uses it.
    An explicit ``TENSORSTORE_GCS_HTTP_URL`` or ``EPATH_USE_TF`` in the environment wins.
    """
    global _configured
    emulator = os.environ.get(EMULATOR_ENV, "")
    state = (emulator,)
    if state == _configured:
        return
    _export("EPATH_USE_TF", "false")
    # epath caches "is TensorFlow installed" (read with EPATH_USE_TF) at its first path of any
    # kind, e.g. orbax saving a local checkpoint before this process saw a gs:// path
    cached_tf_check = getattr(epath.gpath, "_is_tf_installed", None)
    if hasattr(cached_tf_check, "cache_clear"):
        cached_tf_check.cache_clear()
    url = (emulator if "://" in emulator else f"http://{emulator}") if emulator else None
    _export(TENSORSTORE_URL_ENV, url)
    _export(TENSORSTORE_TOKEN_ENV, "emulator" if emulator else None)
    # gcsfs's default client probes each bucket's type over gRPC, which an emulator of the
    # JSON API does not serve (a 60 s timeout per bucket); read before gcsfs is imported.
    _export("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false" if emulator else None)
    _set_gcsfs_options(emulator)
    _configured = state


def _export(name: str, value: str | None) -> None:
    """Sets (or, for None, unsets) `name` unless the user set it: a value `configure` did not
    export itself is left alone."""
    current = os.environ.get(name)
    if current is not None and current != _exported.get(name):
        return
    if value is None:
        os.environ.pop(name, None)
        _exported.pop(name, None)
    else:
        os.environ[name] = _exported[name] = value


def _set_gcsfs_options(emulator: str) -> None:
    """fsspec's per-protocol defaults: the emulator takes an anonymous token (gcsfs reads
    `STORAGE_EMULATOR_HOST` for the endpoint itself)."""
    import fsspec.config  # noqa: PLC0415 (fsspec comes with etils' epath backends)

    for proto in ("gcs", "gs"):
        opts = fsspec.config.conf.setdefault(proto, {})
        # tensorstore and other processes write behind gcsfs's back: a cached listing would
        # hide their objects (orbax lists checkpoint folders to find the latest step).
        opts["use_listings_cache"] = False
        if emulator:
            opts["token"] = "anon"
        else:
            opts.pop("token", None)
    try:
        import gcsfs  # noqa: PLC0415 (the [gcs] extra)
    except ImportError:
        return
    gcsfs.GCSFileSystem.clear_instance_cache()
    from etils.epath import backend  # noqa: PLC0415

    # epath caches one filesystem object per protocol; drop it so the new options apply.
    cached = getattr(type(backend.fsspec_backend)._get_filesystem, "cache_clear", None)
    if cached is not None:
        cached()


def absolute(path: PathLike) -> AnyPath:
    """`as_path(path)`, made absolute when local (epath's ``absolute()`` would turn a URL into
    ``<cwd>/gs:/...``)."""
    p = as_path(path)
    return p if is_remote(p) else p.absolute()


def resolved(path: PathLike) -> str:
    """The absolute form of `path` for records: a URL as is, a local path resolved."""
    return os.fspath(path) if is_remote(path) else str(pathlib.Path(path).expanduser().resolve())


def file_size(path: PathLike) -> int:
    """Size of a file or gs:// object in bytes."""
    if is_remote(path):
        return int(_gcs().size(os.fspath(path)))
    return os.stat(path).st_size


def open_file(path: PathLike, mode: str = "rb"):
    """`open` for a local path, the gcsfs file object for a ``gs://`` URL (binary modes)."""
    if is_remote(path):
        return as_path(path).open(mode)
    return open(path, mode)


def stage(url: PathLike, cache_root: PathLike) -> pathlib.Path:
    """A local copy of a ``gs://`` directory or file, kept in sync under `cache_root`.

    The loaders need real files (safetensors is memory-mapped; a tokenizer is re-saved from
    its files), so a remote model is staged like a hub download: into
    ``cache_root/<sha256(url)[:16]>/<name>``. Each object is fetched again only when its
    generation (or etag, or size) changed since the last staging, and local files whose
    object is gone are removed. Files are replaced by rename, so a concurrent reader sees
    whole files. A local `url` is returned as a path, unchanged.

    Raises:
      FileNotFoundError: the URL names neither an object nor a non-empty prefix.
    """
    if not is_remote(url):
        return pathlib.Path(url).expanduser()
    url = os.fspath(url).rstrip("/")
    gcs = _gcs()
    key = url.removeprefix("gs://")
    if gcs.isfile(url):
        infos = {pathlib.PurePosixPath(key).name: gcs.info(url)}
        single = True
    else:
        infos = {k.removeprefix(key + "/"): info for k, info in gcs.find(url, detail=True).items()
                 if k.startswith(key + "/")}
        single = False
        if not infos:
            raise FileNotFoundError(f"{url}: no such gs:// object, and no files under this prefix")
    slot = pathlib.Path(cache_root) / hashlib.sha256(url.encode()).hexdigest()[:16]
    root = slot if single else slot / pathlib.PurePosixPath(key).name
    root.mkdir(parents=True, exist_ok=True)
    record_path = slot / ".gcs_versions.json"
    try:
        record = json.loads(record_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        record = {}
    versions = {}
    for rel, info in sorted(infos.items()):
        version = str(info.get("generation") or info.get("etag") or info.get("md5Hash") or "") + f":{info['size']}"
        dst = root / rel
        if record.get(rel) != version or not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
            try:
                with os.fdopen(fd, "wb") as out, gcs.open(url if single else f"{url}/{rel}", "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
                os.replace(tmp, dst)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        versions[rel] = version
    if not single:
        for f in root.rglob("*"):
            if f.is_file() and f.relative_to(root).as_posix() not in versions:
                f.unlink()
    record_path.write_text(json.dumps(versions, indent=1, sort_keys=True))
    return root / next(iter(infos)) if single else root


def list_files(directory: PathLike) -> list[str]:
    """Every file under `directory`, recursively, as sorted posix paths relative to it.

    (epath's ``rglob`` refuses gs://, and its ``walk`` drops the scheme.)
    """
    if not is_remote(directory):
        d = pathlib.Path(directory)
        return sorted(f.relative_to(d).as_posix() for f in d.rglob("*") if f.is_file())
    url = os.fspath(directory).rstrip("/")
    prefix = url.removeprefix("gs://") + "/"
    return sorted(k.removeprefix(prefix) for k in _gcs().find(url) if k.startswith(prefix))


def file_sizes(directory: PathLike) -> dict[str, int]:
    """{relative posix path: size in bytes} of every file under `directory`, recursively
    (one listing request for ``gs://``)."""
    if not is_remote(directory):
        d = pathlib.Path(directory)
        return {f.relative_to(d).as_posix(): f.stat().st_size for f in sorted(d.rglob("*")) if f.is_file()}
    url = os.fspath(directory).rstrip("/")
    prefix = url.removeprefix("gs://") + "/"
    found = _gcs().find(url, detail=True)
    return {k.removeprefix(prefix): int(info["size"]) for k, info in sorted(found.items()) if k.startswith(prefix)}


def move(src: PathLike, dst: PathLike) -> None:
    """Moves a file or directory; for ``gs://`` every object under `src` is copied to `dst`,
    then deleted (GCS has no rename)."""
    if is_remote(src) != is_remote(dst):
        raise ValueError(f"move {os.fspath(src)} -> {os.fspath(dst)}: both must be local or both gs://")
    if is_remote(src):
        # copy + delete: gcsfs's mv tries the moveTo API first, and its retries on a server
        # without it (the emulator, some regions) cost ~30 s before the same fallback
        gcs = _gcs()
        gcs.copy(os.fspath(src).rstrip("/"), os.fspath(dst).rstrip("/"), recursive=True)
        gcs.rm(os.fspath(src).rstrip("/"), recursive=True)
    else:
        shutil.move(os.fspath(src), os.fspath(dst))


def create_object(url: PathLike, data: bytes) -> bool:
    """Writes the ``gs://`` object `url` whole, only if no object has that name; False (and
    nothing written) if one does. One request with ``ifGenerationMatch=0``, a precondition
    the server checks, so of two writers racing for one name exactly one succeeds."""
    try:
        _gcs().pipe_file(os.fspath(url), data, mode="create")
    except FileExistsError:  # gcsfs's answer to 412 Precondition Failed
        return False
    return True


def _gcs():
    """The fsspec filesystem epath uses for gs:// (configured by `configure`)."""
    import fsspec  # noqa: PLC0415

    configure()
    return fsspec.filesystem("gcs")


def upload_dir(local_dir: PathLike, dest: PathLike) -> None:
    """Copies every file under `local_dir` to the same relative path under `dest`.

    Each object is written whole (a GCS object write is atomic: readers see the old object
    or the new one).
    """
    local_dir = pathlib.Path(local_dir)
    out = as_path(dest)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            target = out / f.relative_to(local_dir).as_posix()
            with f.open("rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
