"""Forward pass with each attention path on this machine (a benchmark, not a test).

    PYTHONPATH=. python benchmarks/attention_bench.py                 # mt5-small shape, 64 x 64 tokens, fp32
    PYTHONPATH=. python benchmarks/attention_bench.py --impls einsum,cudnn --dtype bfloat16   # on a GPU

Imports the package: install it (`pip install -e .`) or run with `PYTHONPATH=.` from the
repository root. Builds one randomly initialised encoder per `EncoderConfig.attention_impl`
(same seed, so the same weights), checks the outputs agree, then times the jitted
forward (`SentenceModel.__call__`, pooled embeddings) alternating the paths over
`--repeats` rounds and prints the median seconds per call and the ratio to `einsum`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.model import SentenceModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mt5-small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--impls", default="einsum,dot_product")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    impls = args.impls.split(",")
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 30000, size=(args.batch, args.length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[: args.batch // 2, args.length // 2 :] = 0  # half the rows padded: the mask path is exercised
    ids = np.where(mask > 0, ids, 0)
    fns, outs = {}, {}
    for impl in impls:
        cfg = EncoderConfig.preset(args.preset, dtype=args.dtype, attention_impl=impl)
        graphdef, state = nnx.split(SentenceModel(cfg, rngs=nnx.Rngs(0)))
        fwd = jax.jit(lambda st, i, m, g=graphdef: nnx.merge(g, st)(i, m))
        fns[impl] = (fwd, state)
        outs[impl] = np.asarray(fwd(state, ids, mask), np.float32)  # compile + warm-up
    for impl in impls[1:]:
        err = np.abs(outs[impl] - outs[impls[0]]).max() / np.abs(outs[impls[0]]).max()
        print(f"{impl} vs {impls[0]}: rel err {err:.1e}")
    times = {impl: [] for impl in impls}
    for r in range(args.repeats):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            fwd, state = fns[impl]
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(state, ids, mask))
            times[impl].append(time.perf_counter() - t0)
    base = statistics.median(times[impls[0]])
    print(f"{args.preset}, {args.batch} x {args.length} tokens, {args.dtype}, {jax.devices()[0].platform}, "
          f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    for impl in impls:
        med = statistics.median(times[impl])
        print(f"| {impl} | {1000 * med:.1f} ms | {base / med:.2f}x vs {impls[0]} |")


if __name__ == "__main__":
    main()
