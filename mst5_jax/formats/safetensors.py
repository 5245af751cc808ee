"""safetensors files in and out, without torch or the safetensors package.

Layout (https://github.com/huggingface/safetensors, "Format"):

    8 bytes      N, little-endian uint64: the header length in bytes
    N bytes      JSON header: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
                               "__metadata__": {str: str} (optional)}
    data         every tensor's bytes, row-major; offsets are relative to the data start

`SafetensorsFile` validates the whole header when it opens a file, with the rules of the
safetensors library's own loader (`safe_open`): the header length fits in the file (and
in the library's 100 MB cap), every entry is a dict with a known dtype, a shape of
non-negative ints and two offsets; each tensor's byte size equals dtype x shape; sorted by
offset, the tensors tile the data section with no gap and no overlap, and the last one ends
exactly at the end of the file. Any failure is a `CheckpointError` that names the file (and
the tensor); nothing is allocated from an unchecked length.
"""
from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
from typing import Any, Iterable, Optional

import ml_dtypes
import numpy as np

from mst5_jax.utils.files import atomic_write

# The safetensors library refuses larger headers (`MAX_HEADER_SIZE` in its Rust loader).
MAX_HEADER_BYTES = 100_000_000

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match the config."""


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile:
    """A memory-mapped safetensors file; `get(name)` returns a zero-copy numpy view.

    Attributes:
      path: the file.
      header: tensor name -> {"dtype", "shape", "data_offsets"}, validated (see the module doc).
      metadata: the `__metadata__` dict, or {}.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._mmap = None
        self._file = open(self.path, "rb")
        try:
            self.header, self.metadata, self._offset = _read_header(self.path, self._file)
            if os.fstat(self._file.fileno()).st_size:
                self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only numpy view of the mapped file, in its stored dtype."""
        info = self.header[name]
        begin, _ = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64)) if info["shape"] else 1
        if count == 0:
            return np.zeros(info["shape"], DTYPES[info["dtype"]])
        arr = np.frombuffer(self._mmap, dtype=DTYPES[info["dtype"]], count=count, offset=self._offset + begin)
        return arr.reshape(info["shape"])

    def release(self, name: str) -> None:
        """Drops the pages of one tensor from memory (they are re-read from disk if needed)."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self.header[name]["data_offsets"]
        if end == begin:
            return
        page = mmap.PAGESIZE
        start = (self._offset + begin) // page * page
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, self._offset + end - start)
        except (OSError, ValueError):
            pass

    def close(self):
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still referenced (e.g. by a traceback); GC unmaps it
                pass
        self._file.close()


def _read_header(path: pathlib.Path, f) -> tuple[dict[str, dict], dict, int]:
    """(tensor entries, metadata, data start) of an open safetensors file; raises CheckpointError."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes; the 8-byte header length is missing)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise CheckpointError(f"{path}: not a safetensors file: the header length {n} exceeds the {size - 8} bytes "
                              "after it (truncated or not safetensors)")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {n} exceeds the safetensors limit of {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file: the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is a {type(metadata).__name__}, expected an object")
    data_start, data_size = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is a {type(info).__name__}, expected an object with "
                                  "dtype, shape and data_offsets")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise CheckpointError(f"{where}: header entry has no {', '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        nbytes = int(np.prod(shape, dtype=object) if shape else 1) * np.dtype(DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but dtype "
                                  f"{dtype} x shape {shape} needs {nbytes}")
        if offsets[1] > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {data_start + offsets[1]}, "
                                  f"the file has {size}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    expected, previous = 0, None
    for begin, end, name in spans:
        if begin < expected:
            raise CheckpointError(f"{path}: tensor {name} (bytes {begin}-{end} of the data) overlaps tensor "
                                  f"{previous}, which ends at {expected}")
        if begin > expected:
            raise CheckpointError(f"{path}: {begin - expected} unaccounted bytes before tensor {name} (data offset "
                                  f"{expected}); safetensors requires the tensors to be contiguous")
        expected, previous = end, name
    if expected != data_size:
        raise CheckpointError(f"{path}: {data_size - expected} bytes after the last tensor (data ends at "
                              f"{data_start + expected}, the file has {size})")
    return header, metadata, data_start


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: Optional[dict[str, str]] = None) -> None:
    """Writes (name, array) pairs as a safetensors file, atomically (`mst5_jax.utils.files.atomic_write`)."""
    path = pathlib.Path(path)
    items = list(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name, arr in items:
        if np.dtype(arr.dtype) not in _NAMES:
            raise CheckpointError(f"{path}: cannot write tensor {name} of dtype {arr.dtype} to safetensors")
        header[name] = {"dtype": _NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())
