"""Exact margin mining against plain faiss IndexFlatIP + numpy margin scoring (a benchmark, not a test).

    PYTHONPATH=. python benchmarks/mine_bench.py                    # 20k and 40k, 768-d, k=4, in-process
    PYTHONPATH=. python benchmarks/mine_bench.py --cli --sizes 40000 # through `python -m mst5_jax.mine`
    PYTHONPATH=. python benchmarks/mine_bench.py --ours_only --sizes 100000  # ours alone, with peak memory

Imports the package: install it (`pip install -e .`) or run with `PYTHONPATH=.` from the
repository root. Data: random unit vectors with `--planted` noisy translation pairs.

In-process mode times, for each size, `mst5_jax.evals.mining.mine_pairs` (float32 GEMM
blocks computed once for both directions, float64 rescoring of the final candidates)
against the baseline: `faiss.IndexFlatIP` searched in both directions (k=4) followed by
`select_pairs` (numpy margin scoring), alternating the order over `--repeats`, and
prints the best time of each and the ratio baseline / ours. It also checks the two give
the same pairs. `--cli` times the CLI end to end (start-up, loading .npy, writing the TSV)
with `--backend exact` against `--backend faiss --faiss_index Flat`.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from mst5_jax.evals import mining


def data(n: int, d: int, planted: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    y = rng.standard_normal((n, d), dtype=np.float32)
    src = rng.choice(n, planted, replace=False)
    trg = rng.choice(n, planted, replace=False)
    y[trg] = x[src] + 0.8 * rng.standard_normal((planted, d), dtype=np.float32)
    return x, y


def faiss_plain(x: np.ndarray, y: np.ndarray, k: int) -> mining.MinedPairs:
    """The baseline: IndexFlatIP both ways, then margin scoring in numpy."""
    import faiss

    xu, yu = mining.l2_normalize(x), mining.l2_normalize(y)
    ix, iy = faiss.IndexFlatIP(xu.shape[1]), faiss.IndexFlatIP(xu.shape[1])
    iy.add(yu)
    ix.add(xu)
    x2y_sim, x2y_ind = iy.search(xu, k)
    y2x_sim, y2x_ind = ix.search(yu, k)
    return mining.select_pairs(x2y_sim, x2y_ind.astype(np.int64), y2x_sim, y2x_ind.astype(np.int64))


def in_process(n: int, args) -> tuple[float, float]:
    x, y = data(n, args.d, min(args.planted, n // 2))
    best = {"ours": np.inf, "faiss": np.inf}
    for rep in range(args.repeats):
        for name in (("ours", "faiss") if rep % 2 == 0 else ("faiss", "ours")):
            t0 = time.perf_counter()
            pairs = mining.mine_pairs(x, y, k=args.k, precision=args.screen) if name == "ours" else faiss_plain(x, y, args.k)
            best[name] = min(best[name], time.perf_counter() - t0)
            if name == "ours":
                ours = pairs
            else:
                base = pairs
    same = float(np.mean(np.isin(ours.src * n + ours.trg, base.src * n + base.trg)))
    print(f"{n:,} x {n:,}: ours {best['ours']:.1f} s, faiss IndexFlatIP + numpy {best['faiss']:.1f} s, "
          f"ratio {best['faiss'] / best['ours']:.2f}x; pairs shared with the baseline {100 * same:.2f}%", flush=True)
    return best["ours"], best["faiss"]


def ours_only(n: int, args) -> tuple[float, float]:
    """`mining.mine_pairs` alone (no baseline), with the process's peak resident memory."""
    import resource  # noqa: PLC0415

    x, y = data(n, args.d, min(args.planted, n // 2))
    t0 = time.perf_counter()
    pairs = mining.mine_pairs(x, y, k=args.k, precision=args.screen)
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"{n:,} x {n:,}: ours {took:.1f} s, peak RSS {peak:.2f} GB (inputs {(x.nbytes + y.nbytes) / 2**30:.2f} GB), "
          f"{len(pairs.src):,} pairs", flush=True)
    return took, float("nan")


def cli(n: int, args) -> tuple[float, float]:
    x, y = data(n, args.d, min(args.planted, n // 2))
    with tempfile.TemporaryDirectory() as tmp:
        for name, emb in (("src", x), ("tgt", y)):
            np.save(os.path.join(tmp, f"{name}.npy"), emb)
            with open(os.path.join(tmp, f"{name}.txt"), "w") as f:
                f.writelines(f"{name} {i}\n" for i in range(n))
        times = {}
        for name, extra in (("exact", []), ("faiss", ["--backend", "faiss", "--faiss_index", "Flat"])):
            cmd = [sys.executable, "-m", "mst5_jax.mine", "--src", f"{tmp}/src.txt", "--tgt", f"{tmp}/tgt.txt",
                   "--src_emb", f"{tmp}/src.npy", "--tgt_emb", f"{tmp}/tgt.npy", "--output", f"{tmp}/{name}.tsv", *extra]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name] = time.perf_counter() - t0
    print(f"CLI {n:,} x {n:,}: exact {times['exact']:.1f} s, faiss Flat {times['faiss']:.1f} s, "
          f"ratio {times['faiss'] / times['exact']:.2f}x (start-up included)", flush=True)
    return times["exact"], times["faiss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20000,40000", help="comma-separated n (n x n mining)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--planted", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1, help="in-process: runs of each, best kept")
    ap.add_argument("--cli", action="store_true", help="time `python -m mst5_jax.mine` instead")
    ap.add_argument("--ours_only", action="store_true", help="time `mining.mine_pairs` alone, with peak memory")
    ap.add_argument("--screen", default="auto", choices=mining.SCREENS, help="our screening GEMM precision")
    args = ap.parse_args()
    import faiss

    # Both sides' libraries are loaded before any timing: faiss here, and the screening
    # GEMM's (torch, for bfloat16) by screening two rows.
    precision = mining.resolve_screen(args.screen)
    mining.screen(np.ones((2, args.d), np.float32), np.ones((2, args.d), np.float32), precision)
    print(f"d={args.d}, k={args.k}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"numpy {np.__version__}, faiss {faiss.__version__}, screening GEMM {precision}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        (cli if args.cli else ours_only if args.ours_only else in_process)(n, args)


if __name__ == "__main__":
    main()
