"""A Google Cloud Storage emulator (`gcp-storage-emulator`, the JSON API) for tests.

`start_emulator()` serves an in-memory GCS on a free localhost port in a thread of the test
process, with one bucket. Tests then set only ``STORAGE_EMULATOR_HOST`` (as a
google-cloud-storage user would); `mst5_jax.utils.fs.configure` maps it onto gcsfs and
tensorstore. Subprocesses reach the same server through the inherited variable.

The emulator leaves out two parts of the object protocol that tensorstore's OCDBT driver
relies on for its manifest (a read-modify-write guarded by generations), so without them a
checkpoint commit fails now and then with "Malformed StorageGeneration". `start_emulator`
adds them, as documented for the JSON API:
- media downloads carry ``x-goog-generation`` and ``x-goog-metageneration`` headers;
- ``ifGenerationMatch`` (0: the object must not exist) and ``ifGenerationNotMatch`` are
  honoured on reads, uploads and deletes: 412 Precondition Failed, or 304 Not Modified for
  a read whose generation is unchanged. A write checks its precondition and completes under
  one lock, so conditional writes are atomic as on GCS (the server handles requests in
  threads).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
from http import HTTPStatus

BUCKET = "mst5-test"
_WRITES = threading.Lock()  # one conditional write at a time: check and write are one step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _object_name(request) -> str | None:
    if "object_id" in request.params:
        return request.params["object_id"]
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or data).get("name")
    return None


def _current_object(storage, bucket: str, name: str) -> dict | None:
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return storage.get_file_obj(bucket, name)
    except NotFound:
        return None


def _with_generations(handler, *, read: bool):
    """`handler` with the JSON API's generation preconditions and headers."""

    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
        with contextlib.nullcontext() if read else _WRITES:
            return checked(request, response, storage, *args, **kwargs)

    def checked(request, response, storage, *args, **kwargs):
        if "upload_id" in request.query:  # a later chunk: preconditions were checked at creation
            return handler(request, response, storage, *args, **kwargs)
        name = _object_name(request)
        obj = _current_object(storage, request.params["bucket_name"], name) if name else None
        current = None if obj is None else str(obj["generation"])
        match = request.query.get("ifGenerationMatch", [None])[0]
        not_match = request.query.get("ifGenerationNotMatch", [None])[0]
        if match is not None and not (read and current is None):
            if (match == "0" and current is not None) or (match != "0" and match != current):
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
        if read and not_match is not None and current is not None and not_match == current:
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        if read and obj is not None:
            response["x-goog-generation"] = current
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return handler(request, response, storage, *args, **kwargs)

    return wrapped


def _add_generation_protocol(server_module) -> None:
    objects = server_module.objects
    if getattr(objects, "_mst5_generations", False):
        return
    wrappers = {objects.get: _with_generations(objects.get, read=True),
                objects.download: _with_generations(objects.download, read=True),
                objects.insert: _with_generations(objects.insert, read=False),
                objects.delete: _with_generations(objects.delete, read=False)}
    server_module.HANDLERS = tuple((regex, {method: wrappers.get(fn, fn) for method, fn in table.items()})
                                   for regex, table in server_module.HANDLERS)
    objects._mst5_generations = True


def start_emulator(bucket: str = BUCKET):
    """(server, "http://127.0.0.1:PORT"); call `server.stop()` when done."""
    from gcp_storage_emulator import server as server_module

    _add_generation_protocol(server_module)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = free_port()
    server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    return server, f"http://127.0.0.1:{port}"
