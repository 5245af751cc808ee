"""A Google Cloud Storage emulator (`gcp-storage-emulator`, the JSON API) for tests.

`start_emulator()` serves an in-memory GCS on a free localhost port in a thread of the test
process, with one bucket. Tests then set only ``STORAGE_EMULATOR_HOST`` (as a
google-cloud-storage user would); `mst5_jax.utils.fs.configure` maps it onto gcsfs and
tensorstore. Subprocesses reach the same server through the inherited variable.
"""
from __future__ import annotations

import logging
import socket

BUCKET = "mst5-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator(bucket: str = BUCKET):
    """(server, "http://127.0.0.1:PORT"); call `server.stop()` when done."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    return server, f"http://127.0.0.1:{port}"
