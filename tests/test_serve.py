"""`python -m mst5_jax.serve` (PUBLIC_API §4c): the real server in a subprocess, on a free port.

Reference: offline `SentenceEncoder.encode` of the same sentences (itself tested against HF
PyTorch in test_encode.py). Servers use the tiny model, max_length 32 and a small token
budget, so warm-up compiles only a few shapes.
"""
import asyncio
import base64
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401
from hf_reference import rel_err
from mst5_jax.inference.encoder import SentenceEncoder

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_LENGTH = 32
START_TIMEOUT_S = 600  # warm-up compiles ~5 shapes; a busy 2-core CI box takes ~30-60 s
WORDS = ["alpha", "beta", "gamma", "delta", "x", "Bonjour", "le", "monde", "über", "日本語"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The server in a subprocess; `health_seen` lists the /health status codes seen while starting.

    `launcher`: a script to run instead of `-m mst5_jax.serve` (tests/serve_with_faults.py).
    """

    def __init__(self, model_dir, *extra, devices=1, launcher=None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_seen: list[int] = []
        env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        entry = [str(launcher)] if launcher else ["-m", "mst5_jax.serve"]
        cmd = [sys.executable, *entry, "--model", str(model_dir), "--port", str(self.port),
               "--max_length", str(MAX_LENGTH), "--max_batch_tokens", "512", *extra]
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited early:\n" + "".join(self.log)
            try:
                self.health_seen.append(httpx.get(self.url + "/health", timeout=5).status_code)
                if self.health_seen[-1] == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("server not healthy in time:\n" + "".join(self.log))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def offline(tiny_hf_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_hf_model_dir)
    return lambda sents: enc.encode(sents, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def sharded_server(tiny_hf_model_dir):
    """Batching on, 8 fake CPU devices: every batch is sharded over a data mesh."""
    server = Server(tiny_hf_model_dir, "--max_wait_ms", "20", "--max_inputs", "64", "--max_input_chars", "2000",
                    devices=8)
    yield server
    assert server.stop() == 0


def _sentences(rng, n):
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(1, 45, size=n)]


def test_openai_client_equals_offline_encode(sharded_server, offline, tiny_hf_model_dir):
    import openai

    client = openai.OpenAI(base_url=sharded_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    sents = _sentences(np.random.default_rng(0), 10) + ["", "a very long sentence " * 30]
    ref = offline(sents)
    # Without encoding_format the client asks for base64 and decodes it itself.
    for kw in ({"encoding_format": "float"}, {}):
        resp = client.embeddings.create(model="tiny", input=sents, **kw)
        assert resp.model == "tiny" and [d.index for d in resp.data] == list(range(len(sents)))
        got = np.asarray([d.embedding for d in resp.data], np.float32)
        assert got.shape == ref.shape and rel_err(got, ref) <= 1e-6
        assert resp.usage.prompt_tokens == resp.usage.total_tokens == \
            sum(min(len(x), MAX_LENGTH) for x in _token_ids(tiny_hf_model_dir, sents))
    single = client.embeddings.create(model="tiny", input=sents[0])
    assert rel_err(np.asarray(single.data[0].embedding, np.float32), ref[0]) <= 1e-6
    # The raw base64 payload is little-endian float32, independent of the client's decoding.
    raw = httpx.post(sharded_server.url + "/v1/embeddings", timeout=60,
                     json={"input": sents[:2], "encoding_format": "base64"}).json()
    dec = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]])
    assert rel_err(dec, ref[:2]) <= 1e-6


def _token_ids(model_dir, sents):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [tok(s)["input_ids"] for s in sents]


def test_64_concurrent_clients_equal_offline_encode(sharded_server, offline):
    rng = np.random.default_rng(1)
    requests = [_sentences(rng, int(rng.integers(1, 9))) for _ in range(64)]
    ref = offline([s for r in requests for s in r])

    async def run():
        async with httpx.AsyncClient(base_url=sharded_server.url, timeout=300) as client:
            async def one(k, sents):
                if k % 2:
                    r = await client.post("/embed", json={"inputs": sents, "normalize": False})
                    return r.status_code, r.json()
                r = await client.post("/v1/embeddings", json={"input": sents, "model": "m"})
                return r.status_code, [d["embedding"] for d in r.json()["data"]] if r.status_code == 200 else r.text
            return await asyncio.gather(*(one(k, s) for k, s in enumerate(requests)))

    results = asyncio.run(run())
    assert [status for status, _ in results] == [200] * 64, [r for r in results if r[0] != 200][:3]
    got = np.asarray([e for _, embs in results for e in embs], np.float32)
    assert got.shape == ref.shape and rel_err(got, ref) <= 1e-6
    metrics = httpx.get(sharded_server.url + "/metrics", timeout=60).text
    batches = _metric(metrics, "mst5_batch_sentences_count")
    assert _metric(metrics, "mst5_sentences_total") >= len(ref) and 0 < batches < len(ref)
    print(f"\n{len(ref)} sentences of 64 concurrent requests ran in {batches:.0f} batches")
    for name in ("mst5_tokens_total", "mst5_queue_depth", "mst5_truncated_sentences_total",
                 "mst5_request_seconds_bucket", "mst5_batch_seconds_bucket"):
        assert name in metrics


def _metric(text, name):
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_normalize_and_bad_input(sharded_server, offline):
    url = sharded_server.url
    ref = offline(["hello world"])
    emb = np.asarray(httpx.post(url + "/embed", json={"inputs": "hello world"}, timeout=60).json(), np.float32)
    assert rel_err(emb, ref / np.linalg.norm(ref)) <= 1e-6  # TEI normalises by default
    cases = [
        ("/v1/embeddings", {"json": {"input": []}}, 400, "empty list"),
        ("/v1/embeddings", {"json": {"input": ["ok", 3]}}, 400, "input[1] is int"),
        ("/v1/embeddings", {"json": {"input": [[1, 2]]}}, 400, "input[0] is list"),
        ("/v1/embeddings", {"json": {"model": "m"}}, 400, "missing field 'input'"),
        ("/v1/embeddings", {"content": b'{"input": ["a"', "headers": {"content-type": "application/json"}},
         400, "not valid JSON"),
        ("/v1/embeddings", {"content": b'{"input": "a"}', "headers": {"content-type": "text/plain"}},
         400, "Content-Type must be application/json"),
        ("/v1/embeddings", {"json": {"input": "a", "dimensions": 7}}, 400, "full width, 32"),
        ("/v1/embeddings", {"json": {"input": "a", "encoding_format": "int8"}}, 400, "encoding_format"),
        ("/v1/embeddings", {"json": {"input": ["a"] * 65}}, 413, "max_inputs=64"),
        ("/embed", {"json": {"inputs": ["a" * 2001]}}, 413, "max_input_chars=2000"),
        ("/embed", {"json": {"inputs": ["a"], "normalize": "yes"}}, 400, "normalize"),
        ("/embed", {"json": ["a"]}, 400, "JSON object"),
    ]
    for path, kw, status, text in cases:
        r = httpx.post(url + path, timeout=60, **kw)
        assert r.status_code == status, (path, kw, r.status_code, r.text)
        assert text in r.json()["error"]["message"], (text, r.text)
    r = httpx.post(url + "/v1/embeddings", json={"input": ["a"] * 65}, timeout=60)
    assert r.json()["error"]["limit"] == "max_inputs"
    # ...and the server still serves.
    again = httpx.post(url + "/v1/embeddings", json={"input": "hello world", "dimensions": 32}, timeout=60)
    assert again.status_code == 200
    assert rel_err(np.asarray(again.json()["data"][0]["embedding"], np.float32), ref[0]) <= 1e-6


def test_queue_full_429_recovers_drains_on_sigterm_and_checks_api_key(tiny_hf_model_dir, offline):
    # A long max_wait keeps requests queued, so the queue is observably full.
    server = Server(tiny_hf_model_dir, "--max_wait_ms", "3000", "--max_queue", "6", "--max_inputs", "6",
                    "--api_key", "s3cret")
    try:
        url, auth = server.url, {"Authorization": "Bearer s3cret"}
        assert httpx.post(url + "/embed", json={"inputs": ["a"]}, timeout=60).status_code == 401
        assert httpx.post(url + "/embed", json={"inputs": ["a"]}, timeout=60,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/health", timeout=60).status_code == 200  # health needs no key
        sents = ["one two", "three", "four five six", "seven"]
        results = {}

        def post(name, body):
            results[name] = httpx.post(url + "/embed", json=body, headers=auth, timeout=120)

        first = threading.Thread(target=post, args=("first", {"inputs": sents, "normalize": False}))
        first.start()
        time.sleep(1.0)  # the 4 sentences now wait (up to 3 s) for their batch
        over = httpx.post(url + "/embed", json={"inputs": ["x", "y", "z"]}, headers=auth, timeout=60)
        assert over.status_code == 429 and over.headers["Retry-After"] == "1"
        assert over.json()["error"]["limit"] == "max_queue"
        first.join(timeout=120)
        assert results["first"].status_code == 200
        assert rel_err(np.asarray(results["first"].json(), np.float32), offline(sents)) <= 1e-6
        assert httpx.post(url + "/embed", json={"inputs": ["x", "y", "z"]}, headers=auth,
                          timeout=60).status_code == 200  # recovered
        # SIGTERM while a request waits in the queue: it is answered, then the server exits 0.
        last = threading.Thread(target=post, args=("last", {"inputs": sents, "normalize": False}))
        last.start()
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        last.join(timeout=120)
        assert results["last"].status_code == 200
        assert rel_err(np.asarray(results["last"].json(), np.float32), offline(sents)) <= 1e-6
        assert server.proc.wait(timeout=120) == 0, "".join(server.log)
    finally:
        server.stop()


def test_health_503_while_warming_then_failed_batch_is_500_only_for_it_and_disconnect_is_harmless(
        tiny_hf_model_dir, offline):
    """tests/serve_with_faults.py slows each compile and fails any batch holding its POISON sentence."""
    from serve_with_faults import POISON

    shapes = SentenceEncoder.from_pretrained(tiny_hf_model_dir).batch_shapes(MAX_LENGTH, 512)
    # A 2 s max_wait keeps requests sent within it in one batch per bucket.
    server = Server(tiny_hf_model_dir, "--max_wait_ms", "2000", launcher=REPO / "tests" / "serve_with_faults.py")
    try:
        url = server.url
        # Warm-up: 503 (with Retry-After) until every bucket shape compiled, then 200.
        assert 503 in server.health_seen and server.health_seen[-1] == 200, server.health_seen
        health = httpx.get(url + "/health", timeout=60).json()
        assert health["status"] == "ok" and health["compiled_shapes"] == len(shapes) > 1

        # One failing batch: its requests get 500; a request in another bucket's batch, sent
        # while the failing one waited, gets its correct embeddings; the server keeps serving.
        short, long = ["alpha beta"], [" ".join(WORDS * 3)]  # buckets 16 and 32
        results = {}

        def post(name, inputs, timeout=120):
            try:
                results[name] = httpx.post(url + "/embed", json={"inputs": inputs, "normalize": False},
                                           timeout=timeout)
            except httpx.TimeoutException as e:
                results[name] = e

        threads = [threading.Thread(target=post, args=args) for args in
                   (("poison", [POISON, "hello"]), ("same_batch", short), ("other_batch", long))]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join(timeout=120)
        assert results["poison"].status_code == 500, results["poison"].text
        assert results["poison"].json()["error"]["code"] == "internal_error"
        assert results["same_batch"].status_code == 500  # it shared the failed batch
        assert results["other_batch"].status_code == 200, results["other_batch"].text
        assert rel_err(np.asarray(results["other_batch"].json(), np.float32), offline(long)) <= 1e-6
        assert "injected failure" in "".join(server.log)

        # A client that hangs up while its sentences wait does not poison the batch it was in.
        kept = ["gamma delta", "Bonjour le monde"]
        threads = [threading.Thread(target=post, args=("gone", ["alpha x", "beta"], 0.5)),
                   threading.Thread(target=post, args=("kept", kept))]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(timeout=120)
        assert isinstance(results["gone"], httpx.TimeoutException)
        assert results["kept"].status_code == 200, results["kept"].text
        assert rel_err(np.asarray(results["kept"].json(), np.float32), offline(kept)) <= 1e-6

        again = httpx.post(url + "/v1/embeddings", json={"input": short}, timeout=120)
        assert again.status_code == 200
        assert rel_err(np.asarray(again.json()["data"][0]["embedding"], np.float32), offline(short)) <= 1e-6
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_no_batching_mode_equals_offline_encode(tiny_hf_model_dir, offline):
    server = Server(tiny_hf_model_dir, "--no_batching")
    try:
        rng = np.random.default_rng(2)
        requests = [_sentences(rng, int(rng.integers(1, 6))) for _ in range(8)]

        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
                return await asyncio.gather(*(client.post("/embed", json={"inputs": r, "normalize": False})
                                              for r in requests))

        for req, resp in zip(requests, asyncio.run(run())):
            assert resp.status_code == 200, resp.text
            assert rel_err(np.asarray(resp.json(), np.float32), offline(req)) <= 1e-6
        metrics = httpx.get(server.url + "/metrics", timeout=60).text
        assert _metric(metrics, "mst5_batch_sentences_count") == 0  # the batcher never ran
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_cli_bad_model_is_one_line_exit_2_and_help_shows_defaults_and_example(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    missing = tmp_path / "no_such_model"
    bad = subprocess.run([sys.executable, "-m", "mst5_jax.serve", "--model", str(missing)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert lines[0].startswith("python -m mst5_jax.serve: error:") and str(missing) in lines[0]
    helped = subprocess.run([sys.executable, "-m", "mst5_jax.serve", "--help"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0
    assert "(default: 8192)" in helped.stdout and "(default: 127.0.0.1)" in helped.stdout
    assert "example:" in helped.stdout and "/v1/embeddings" in helped.stdout
