"""`python -m mst5_jax.serve`: an OpenAI-compatible embedding server with dynamic batching.

    python -m mst5_jax.serve --model PATH [--adapter DIR] [--dtype float32] [--host 127.0.0.1]
        [--port 8080] [--max_length 512] [--max_batch_tokens 8192] [--max_wait_ms 5]
        [--max_queue 4096] [--max_inputs 2048] [--max_input_chars 100000] [--api_key KEY]
        [--no_batching]

Routes, limits and error answers: `mst5_jax/inference/server.py` and docs/SERVING.md.
All local devices are used: each batch is sharded over a data mesh. SIGTERM (or Ctrl-C)
stops accepting connections, finishes the requests in flight, and exits 0. A bad flag or
model path is a one-line error and exit code 2 (`mst5_jax.utils.cli`).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional, Sequence

import jax

from mst5_jax.inference.encoder import SentenceEncoder
from mst5_jax.utils import cli

log = logging.getLogger("mst5_jax.serve")

PROG = "python -m mst5_jax.serve"
EXAMPLE = ("python -m mst5_jax.serve --model google/mt5-xxl --adapter pkshatech/m-ST5 --dtype bfloat16 "
           "--port 8080\n  curl -s localhost:8080/v1/embeddings -H 'Content-Type: application/json' "
           "-d '{\"input\": [\"Hello\", \"Bonjour\"]}'")


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(PROG, __doc__, example=EXAMPLE)
    cli.add_model_flags(ap)
    ap.add_argument("--model_name", default=None, help="name reported when a request names no model; "
                    "None: the --model folder's name")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    ap.add_argument("--port", type=int, default=8080, help="TCP port")
    ap.add_argument("--max_length", type=int, default=512, help="tokens per input incl. EOS; longer is truncated")
    ap.add_argument("--max_batch_tokens", type=int, default=8192, help="token budget of one device batch")
    ap.add_argument("--max_wait_ms", type=float, default=5.0, help="longest wait for a batch to fill")
    ap.add_argument("--max_queue", type=int, default=4096, help="sentences queued at most; beyond: 429")
    ap.add_argument("--max_inputs", type=int, default=2048, help="inputs per request at most; beyond: 413")
    ap.add_argument("--max_input_chars", type=int, default=100_000, help="characters per input; beyond: 413")
    ap.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY'; None: $MST5_API_KEY "
                    "if set (kept out of this help), else no key")
    ap.add_argument("--no_batching", action="store_true", help="encode each request on arrival (a baseline)")
    return ap


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: PLC0415 (optional: [serve] extra)

        from mst5_jax.inference.server import ServeSettings, create_app  # noqa: PLC0415 (needs fastapi)
    except ImportError as e:
        raise cli.UserError(f"{e}; install the server extra: pip install -e '.[serve]'") from None
    settings = ServeSettings(
        model_name=args.model_name or os.path.basename(os.path.normpath(args.model)),
        max_length=args.max_length, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_inputs=args.max_inputs, max_input_chars=args.max_input_chars,
        api_key=args.api_key or os.environ.get("MST5_API_KEY") or None, batching=not args.no_batching)
    settings.check()
    step = int(args.step) if args.step.isdigit() else args.step
    encoder = SentenceEncoder.from_pretrained(args.model, adapter=args.adapter, dtype=args.dtype, step=step,
                                              devices=jax.local_devices())
    app = create_app(encoder, settings)
    log.info("serve: %s on %d device(s), http://%s:%d (batching %s)", args.model, encoder.num_devices,
             args.host, args.port, "on" if settings.batching else "off")
    # uvicorn catches SIGTERM, drains, then re-raises the signal it caught; a Python handler
    # in place before it starts turns that re-raise into a no-op, so a drained exit is 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=60)
    log.info("serve: drained and stopped")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    cli.setup_logging(args.verbose)
    return cli.run(lambda: _serve(args), PROG, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
