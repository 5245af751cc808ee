"""The embedding HTTP server: OpenAI and text-embeddings-inference routes on a `Batcher`.

`create_app(encoder, settings)` returns a FastAPI app:

* ``POST /v1/embeddings``: OpenAI's shape. ``input`` is a string or a list of strings;
  ``encoding_format`` is ``float`` or ``base64`` (little-endian float32, what the official
  client decodes); ``dimensions`` is accepted only when it equals the model width.
* ``POST /embed``: text-embeddings-inference's shape, ``{"inputs": str | [str], "normalize":
  bool}`` -> a JSON array of embeddings.
* ``GET /health``: 200 once every bucket shape is compiled, 503 before.
* ``GET /metrics``: Prometheus text.

Errors are JSON, ``{"error": {"message", "type", "param", "code", "limit"?}}``: 400 bad input
or content type, 401 a missing/wrong API key, 413 a limit (``limit`` names it), 429 a full
queue (with ``Retry-After``), 500 an internal error of that request's batch only. The server
never opens a path taken from a request. FastAPI and uvicorn come with the ``[serve]`` extra;
`python -m mst5_jax.serve` says so when they are missing.
"""

import asyncio
import base64
import dataclasses
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from mst5_jax.inference.batcher import Batcher, Job, QueueFull
from mst5_jax.inference.encoder import SentenceEncoder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Server knobs (the CLI flags of `python -m mst5_jax.serve`)."""
    model_name: str = "mst5"
    max_length: int = 512
    max_batch_tokens: int = 8192
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    max_inputs: int = 2048
    max_input_chars: int = 100_000
    api_key: Optional[str] = None
    batching: bool = True

    def check(self) -> None:
        for name in ("max_length", "max_batch_tokens", "max_queue", "max_inputs", "max_input_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be >= 1")
        if self.max_length < 2:
            raise ValueError(f"--max_length={self.max_length}: must be >= 2 (room for EOS)")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max_wait_ms={self.max_wait_ms}: must be >= 0")
        if self.max_inputs > self.max_queue:
            raise ValueError(f"--max_inputs={self.max_inputs} exceeds --max_queue={self.max_queue}: "
                             "such a request could never be queued; raise --max_queue")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 limit: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.limit = status, message, param, limit
        self.code = code or {400: "invalid_request", 401: "invalid_api_key", 413: "limit_exceeded",
                             429: "queue_full", 503: "not_ready"}.get(status, "internal_error")
        self.headers = headers

    def body(self) -> dict:
        err = {"message": self.message, "type": "invalid_request_error" if self.status < 500 else "server_error",
               "param": self.param, "code": self.code}
        if self.limit is not None:
            err["limit"] = self.limit
        return {"error": err}


class _Metrics:
    def __init__(self):
        import prometheus_client as pc  # noqa: PLC0415 (optional: [serve] extra)

        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.requests = pc.Counter("mst5_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.sentences = pc.Counter("mst5_sentences", "Sentences embedded", registry=r)
        self.tokens = pc.Counter("mst5_tokens", "Tokens embedded (EOS included, after truncation)", registry=r)
        self.truncated = pc.Counter("mst5_truncated_sentences", "Sentences cut to max_length", registry=r)
        self.queue_depth = pc.Gauge("mst5_queue_depth", "Sentences waiting for a batch", registry=r)
        self.batch_size = pc.Histogram("mst5_batch_sentences", "Sentences per device batch", registry=r,
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))
        self.batch_seconds = pc.Histogram("mst5_batch_seconds", "Device time per batch", registry=r)
        self.latency = pc.Histogram("mst5_request_seconds", "Request latency, received to answered", ["route"],
                                    registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self._generate = pc.generate_latest
        self.content_type = pc.CONTENT_TYPE_LATEST

    def on_batch(self, sentences: int, rows: int, length: int, seconds: float) -> None:
        self.batch_size.observe(sentences)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return self._generate(self.registry)


def _inputs(body: Any, key: str, settings: ServeSettings) -> list[str]:
    """The list of input strings of a parsed body, or an ApiError saying what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object with {key!r}, got {type(body).__name__}")
    if key not in body:
        raise ApiError(400, f"missing field {key!r} (a string or a list of strings)", param=key)
    value = body[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ApiError(400, f"{key!r} must be a string or a list of strings, got {type(value).__name__}", param=key)
    if not items:
        raise ApiError(400, f"{key!r} is an empty list; send at least one string", param=key)
    if len(items) > settings.max_inputs:
        raise ApiError(413, f"{key!r} has {len(items)} items, more than max_inputs={settings.max_inputs}",
                       param=key, limit="max_inputs")
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise ApiError(400, f"{key}[{i}] is {type(s).__name__}, expected a string (token arrays are not "
                           "accepted)", param=key)
        if len(s) > settings.max_input_chars:
            raise ApiError(413, f"{key}[{i}] has {len(s)} characters, more than max_input_chars="
                           f"{settings.max_input_chars}", param=key, limit="max_input_chars")
    return items


class _Service:
    """The server's state and its request handlers; `create_app` wires them to routes."""

    ROUTES = ("/v1/embeddings", "/embed", "/health", "/metrics")

    def __init__(self, encoder: SentenceEncoder, settings: ServeSettings):
        settings.check()
        self.encoder, self.settings = encoder, settings
        self.metrics = _Metrics()
        self.batcher = Batcher(encoder, max_length=settings.max_length, max_batch_tokens=settings.max_batch_tokens,
                               max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                               on_batch=self.metrics.on_batch)
        self.ready = threading.Event()
        self.dim = encoder.config.embedding_dim

    def warm(self) -> None:
        """Compiles every bucket shape once; /health answers 200 from then on."""
        t0 = time.perf_counter()
        shapes = self.encoder.warmup(self.settings.max_length, self.settings.max_batch_tokens)
        log.info("serve: compiled %d bucket shapes in %.1f s; ready", len(shapes), time.perf_counter() - t0)
        self.ready.set()

    async def observe(self, request: Request, call_next):
        """Middleware: the API key check, request counts and latency, and a 500 for a handler's bug."""
        t0 = time.perf_counter()
        route = request.url.path if request.url.path in self.ROUTES else "other"
        if self.settings.api_key is not None and route in ("/v1/embeddings", "/embed", "/metrics"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode()):
                self.metrics.requests.labels(route, "401").inc()
                return JSONResponse(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'").body(),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            resp = await call_next(request)
        except Exception:
            log.exception("serve: unhandled error on %s", route)
            resp = JSONResponse(ApiError(500, "internal error").body(), status_code=500)
        self.metrics.requests.labels(route, str(resp.status_code)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return resp

    async def body(self, request: Request) -> Any:
        """The JSON body; 400 for a wrong content type or invalid JSON, 413 over the size limit."""
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(400, f"Content-Type must be application/json, got {ctype or 'none'!r}")
        limit = self.settings.max_inputs * (self.settings.max_input_chars * 6 + 8) + 4096
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(413, f"request body is {len(raw)} bytes, more than max_inputs x max_input_chars allows "
                           f"({limit})", limit="max_body_bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """float32 [n, d] embeddings of `texts` and their token count."""
        settings = self.settings
        ids, truncated = await run_in_threadpool(self.encoder.tokenizer.encode_batch_counted, texts,
                                                 settings.max_length)
        tokens = sum(len(x) for x in ids)
        if settings.batching:
            out = await self._batched(ids)
        else:
            out, _ = await run_in_threadpool(self.encoder.encode_ids, ids, settings.max_length,
                                             settings.max_batch_tokens)
        self.metrics.sentences.inc(len(texts))
        self.metrics.tokens.inc(tokens)
        self.metrics.truncated.inc(truncated)
        return out, tokens

    async def _batched(self, ids: list) -> np.ndarray:
        """Queues one request's token ids for the batching worker and waits for its rows."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(job: Job) -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(job))

        job = Job(ids, self.dim, done)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the queue is full ({e}); retry shortly", limit="max_queue",
                           headers={"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self.batcher.depth)
        try:
            await future
        except asyncio.CancelledError:  # the client went away: drop its queued sentences
            job.cancelled = True
            raise
        self.metrics.queue_depth.set(self.batcher.depth)
        if job.error is not None:
            log.error("serve: request failed in its batch: %r", job.error)
            raise ApiError(500, "internal error while encoding this request's batch")
        return job.out

    async def openai_embeddings(self, request: Request):
        """POST /v1/embeddings, OpenAI's request and response shape."""
        body = await self.body(request)
        texts = _inputs(body, "input", self.settings)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"encoding_format={fmt!r}: expected 'float' or 'base64'", param="encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != self.dim:
            raise ApiError(400, f"dimensions={dims!r}: this model only returns its full width, {self.dim}; "
                           "omit 'dimensions' or send it equal to the width", param="dimensions")
        model = body.get("model", self.settings.model_name)
        emb, tokens = await self.embed(texts)
        if fmt == "base64":
            rows = [base64.b64encode(e.astype("<f4").tobytes()).decode("ascii") for e in emb]
        else:
            rows = emb.tolist()
        return {"object": "list", "model": model if isinstance(model, str) else self.settings.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def tei_embed(self, request: Request):
        """POST /embed, text-embeddings-inference's shape: {"inputs": [...], "normalize": bool}."""
        body = await self.body(request)
        texts = _inputs(body, "inputs", self.settings)
        normalize = body.get("normalize", True)
        if not isinstance(normalize, bool):
            raise ApiError(400, f"normalize={normalize!r}: expected true or false", param="normalize")
        emb, _ = await self.embed(texts)
        if normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb.tolist()

    async def health(self):
        """GET /health: 503 while bucket shapes compile, then 200."""
        if not self.ready.is_set():
            return JSONResponse({"status": "warming up", "compiled_shapes": len(self.encoder.compiled_shapes)},
                                status_code=503, headers={"Retry-After": "1"})
        return {"status": "ok", "compiled_shapes": len(self.encoder.compiled_shapes),
                "devices": self.encoder.num_devices}

    async def prometheus(self):
        """GET /metrics, Prometheus text format."""
        self.metrics.queue_depth.set(self.batcher.depth)
        return Response(self.metrics.render(), media_type=self.metrics.content_type)


def create_app(encoder: SentenceEncoder, settings: ServeSettings, *, warm_in_background: bool = True):
    """The FastAPI app. Its lifespan compiles every bucket shape (then /health turns 200),
    runs the batching worker, and on shutdown lets queued work finish before returning."""
    service = _Service(encoder, settings)

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        warmer = threading.Thread(target=service.warm, name="mst5-warmup", daemon=True)
        warmer.start()
        if not warm_in_background:
            await run_in_threadpool(warmer.join)
        try:
            yield
        finally:
            await run_in_threadpool(service.batcher.stop)

    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    app = FastAPI(title="mst5_jax embeddings", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.ready = service.batcher, service.metrics, service.ready
    app.add_exception_handler(ApiError, api_error)
    app.middleware("http")(service.observe)
    app.add_api_route("/v1/embeddings", service.openai_embeddings, methods=["POST"])
    app.add_api_route("/embed", service.tei_embed, methods=["POST"])
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/metrics", service.prometheus, methods=["GET"])
    return app
