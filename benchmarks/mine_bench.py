"""Margin mining at scale on the CPU: time and peak memory per backend (a benchmark, not a test).

    nice python benchmarks/mine_bench.py                       # 100k x 100k, 768-d, all backends
    python benchmarks/mine_bench.py --n 20000 --backends exact # quicker

Each backend runs in its own subprocess (peak RSS cannot be reset inside one process), on
random unit vectors with `--planted` noisy translation pairs, and reports wall time, peak
resident memory (ru_maxrss, including the two embedding matrices) and how many planted
pairs the top of the list recovers. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data(n: int, d: int, planted: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    y = rng.standard_normal((n, d), dtype=np.float32)
    src = rng.choice(n, planted, replace=False)
    trg = rng.choice(n, planted, replace=False)
    y[trg] = x[src] + 0.8 * rng.standard_normal((planted, d), dtype=np.float32)
    return x, y, set(zip(src.tolist(), trg.tolist()))


def child(args) -> None:
    sys.path.insert(0, REPO)
    from mst5_jax import mine

    x, y, gold = data(args.n, args.d, args.planted)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    backend, _, index = args.backend.partition(":")
    pairs = mine.mine(x, y, k=4, backend=backend, faiss_index=index or "Flat", nprobe=args.nprobe)
    dt = time.perf_counter() - t0
    top = set(zip(pairs.src[: args.planted].tolist(), pairs.trg[: args.planted].tolist()))
    print(json.dumps({"backend": args.backend, "seconds": dt,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "rss_before_mining_gb": base_rss / 2**20, "pairs": len(pairs.score),
                      "planted_recovered": len(top & gold) / len(gold)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--planted", type=int, default=10_000)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--backends", default="exact,faiss:Flat,faiss:IVF1024,Flat")
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:
        child(args)
        return
    import faiss

    backends = [b for b in args.backends.replace("IVF1024,Flat", "IVF1024;Flat").split(",")]
    rows = []
    for b in backends:
        b = b.replace(";", ",")
        cmd = [sys.executable, __file__, "--backend", b, "--n", str(args.n), "--d", str(args.d),
               "--planted", str(args.planted), "--nprobe", str(args.nprobe)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n{args.n:,} x {args.n:,}, d={args.d}, k=4, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"numpy {np.__version__}, faiss {faiss.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| backend | time (s) | peak RSS (GB) | RSS before mining (GB) | planted pairs in top list |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['seconds']:.0f} | {r['peak_rss_gb']:.2f} | {r['rss_before_mining_gb']:.2f} "
              f"| {100 * r['planted_recovered']:.1f}% |")


if __name__ == "__main__":
    main()
