"""Load-test `python -m mst5_jax.serve` against its no-batching mode and offline encode.

    PYTHONPATH=. python benchmarks/serve_bench.py [--demo /tmp/mst5_demo_cpu] [--requests 128]
        [--concurrency 1,8,64] [--max_length 32] [--max_batch_tokens 1024] [--skip_demo] [--skip_small]

For each model (the demo run directory, if present, and a random mt5-small-shaped model
written to a temporary folder) it starts the real server twice (batching on, then
`--no_batching`), sends `--requests` single-sentence requests of Tatoeba lines at each
concurrency with an async httpx client, and encodes the same sentences offline with
`SentenceEncoder.encode` in this process. It prints a markdown table: sentences/s, p50/p99
latency, mean batch size (from /metrics), and the ratios the issue asks for at the highest
concurrency. The defaults keep a run on a 2-core CPU within about 5 minutes: 128 requests,
max_length 32 and a 1,024-token budget, so each server compiles 7 bucket shapes. Also `--pipeline`: the encode pipeline alone vs the old fixed-batch loop.
"""
import argparse
import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mst5_jax.inference.encoder import SentenceEncoder  # noqa: E402


def tatoeba_lines(n: int) -> list[str]:
    root = pathlib.Path(os.environ.get("MST5_DATA_DIR", REPO.parent / "shared" / "data")) / "tatoeba"
    out = []
    for f in sorted(root.rglob("tatoeba.*-eng.*")):
        out.extend(f.read_text(encoding="utf-8").split("\n")[:50])
        if len(out) >= n:
            break
    if not out:
        raise SystemExit(f"no Tatoeba files under {root}")
    return [s for s in out if s][:n]


def small_model(out: pathlib.Path) -> pathlib.Path:
    """A random mt5-small-shaped encoder (8 layers, d_model 512) with the demo's or a tiny vocab."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import cached_tiny_model_dir  # noqa: PLC0415
    from hf_reference import hf_config, random_encoder, save_hf_dir  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    tiny = cached_tiny_model_dir(REPO / ".cache" / "tests", pathlib.Path(os.environ["MST5_DATA_DIR"]))
    cfg = hf_config(model_type="mt5", feed_forward_proj="gated-gelu", vocab_size=300, d_model=512, d_ff=1024,
                    num_heads=6, d_kv=64, num_layers=8)
    save_hf_dir(random_encoder(cfg, seed=0), out)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny / name).is_file():
            shutil.copy(tiny / name, out / name)
    return out


class Server:
    def __init__(self, model, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
        self.proc = subprocess.Popen([sys.executable, "-m", "mst5_jax.serve", "--model", str(model), "--port",
                                      str(self.port), *extra], env=env, cwd=REPO, stderr=subprocess.DEVNULL)
        for _ in range(1800):
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"server for {model} exited with {self.proc.returncode}")
            time.sleep(0.5)
        raise SystemExit("server did not become healthy")

    def batches(self) -> tuple[float, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        vals = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("mst5_batch_sentences_")}
        return vals.get("mst5_batch_sentences_count", 0.0), vals.get("mst5_batch_sentences_sum", 0.0)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


async def load(url: str, sentences: list[str], concurrency: int) -> tuple[float, list[float]]:
    queue = list(enumerate(sentences))
    latencies: list[float] = []

    async def worker(client):
        while queue:
            _, s = queue.pop()
            t0 = time.perf_counter()
            r = await client.post("/v1/embeddings", json={"input": s, "encoding_format": "base64"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies


def bench_model(name, model, sentences, levels, max_length, max_batch_tokens, max_wait_ms):
    enc = SentenceEncoder.from_pretrained(model)
    enc.encode(sentences, max_length=max_length, max_batch_tokens=max_batch_tokens)  # compile
    t0 = time.perf_counter()
    enc.encode(sentences, max_length=max_length, max_batch_tokens=max_batch_tokens)
    offline = len(sentences) / (time.perf_counter() - t0)
    rows = [(name, "offline encode", "-", f"{offline:.1f}", "-", "-", "-")]
    rates = {}
    for mode, extra in (("batching", []), ("no batching", ["--no_batching"])):
        server = Server(model, "--max_length", str(max_length), "--max_batch_tokens", str(max_batch_tokens),
                        "--max_wait_ms", str(max_wait_ms), *extra)
        try:
            asyncio.run(load(server.url, sentences[:16], 4))  # warm the HTTP path
            for c in levels:
                n0, s0 = server.batches()
                secs, lat = asyncio.run(load(server.url, sentences, c))
                n1, s1 = server.batches()
                rate = len(sentences) / secs
                rates[(mode, c)] = rate
                mean_batch = f"{(s1 - s0) / (n1 - n0):.1f}" if n1 > n0 else "-"
                rows.append((name, f"server, {mode}", str(c), f"{rate:.1f}", f"{1e3 * np.percentile(lat, 50):.0f}",
                             f"{1e3 * np.percentile(lat, 99):.0f}", mean_batch))
        finally:
            server.stop()
    top = max(levels)
    ratios = (rates[("batching", top)] / rates[("no batching", top)], rates[("batching", top)] / offline)
    return rows, ratios


def bench_pipeline(model, sentences, max_length=128):
    """The encode pipeline vs the old loop (fixed 64-row batches, blocking copy after each)."""
    enc = SentenceEncoder.from_pretrained(model)
    ids = enc.tokenize(sentences, max_length)

    def old():
        from mst5_jax.inference.encoder import bucket_lengths, bucket_of  # noqa: PLC0415
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out = np.zeros((len(ids), enc.config.embedding_dim), np.float32)
        padded = 0
        for start in range(0, len(ids), 64):
            idx = order[start:start + 64]
            length = bucket_of(max(len(ids[i]) for i in idx), bucket_lengths(max_length))
            out[idx] = np.asarray(enc.dispatch([ids[i] for i in idx], 64, length))[: len(idx)]
            padded += 64 * length
        return out, padded

    ref, old_padded = old()
    new = enc.encode(sentences, max_length=max_length)
    t0 = time.perf_counter()
    ref, old_padded = old()
    t_old = time.perf_counter() - t0
    new = enc.encode(sentences, max_length=max_length)
    stats = enc.last_stats
    real = sum(len(x) for x in ids)
    err = float(np.abs(new - ref).max() / np.abs(ref).max())
    print(f"\nencode pipeline, {len(sentences)} Tatoeba lines, max_length {max_length}: old {len(sentences) / t_old:.1f} "
          f"sent/s (padding {1 - real / old_padded:.1%}), new {stats.sentences_per_s:.1f} sent/s "
          f"(padding {stats.padding_fraction:.1%}); ratio {t_old / stats.seconds:.2f}x; rel. difference {err:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", default="/tmp/mst5_demo_cpu")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--max_length", type=int, default=32)
    ap.add_argument("--max_batch_tokens", type=int, default=1024)
    ap.add_argument("--max_wait_ms", type=float, default=5.0, help="the batching server's --max_wait_ms")
    ap.add_argument("--skip_demo", action="store_true")
    ap.add_argument("--skip_small", action="store_true")
    ap.add_argument("--pipeline", type=int, default=0, help="also benchmark the encode pipeline on N lines")
    args = ap.parse_args()
    started = time.perf_counter()
    levels = [int(c) for c in args.concurrency.split(",")]
    sentences = tatoeba_lines(args.requests)
    models = []
    if not args.skip_demo:
        if pathlib.Path(args.demo).is_dir():
            models.append(("demo", args.demo))
        else:
            print(f"demo model missing: {args.demo} (run the README's demo command first)")
    tmp = tempfile.TemporaryDirectory()
    if not args.skip_small or args.pipeline:
        small = small_model(pathlib.Path(tmp.name) / "mt5_small_shape")
        if not args.skip_small:
            models.append(("mt5-small shape (random)", small))
    table = ["| model | mode | concurrency | sentences/s | p50 ms | p99 ms | mean batch |", "|---|---|---|---|---|---|---|"]
    for name, model in models:
        rows, (vs_nobatch, vs_offline) = bench_model(name, model, sentences, levels, args.max_length,
                                                     args.max_batch_tokens, args.max_wait_ms)
        table += ["| " + " | ".join(r) + " |" for r in rows]
        print(f"{name}: at concurrency {max(levels)} batching is {vs_nobatch:.2f}x no-batching "
              f"(goal >= 3x) and {vs_offline:.0%} of offline encode (goal >= 70%)", flush=True)
    print("\n".join(table))
    print(f"{len(sentences)} single-sentence requests per level, max_length {args.max_length}, "
          f"max_batch_tokens {args.max_batch_tokens}, max_wait_ms {args.max_wait_ms}; whole run {time.perf_counter() - started:.0f} s", flush=True)
    if args.pipeline:
        bench_pipeline(small, tatoeba_lines(args.pipeline))


if __name__ == "__main__":
    main()
