"""What XLA makes of the LoRA training step, without running it: FLOPs and memory per remat policy.

    python benchmarks/xla_analysis.py --model mt5-xxl --batch 32 --length 64 \
        --remat none dots residual full [--microbatch 8] [--json out.json]

The step is the project's own (`train_step.make_train_step`: bf16 frozen base, fp32 LoRA
r=8 on q and v, AdamW, the full N x 2N loss), lowered with abstract arguments and compiled
for the local backend, so an xxl step can be examined on a CPU without 10 GiB of weights.

Per policy it prints:
  - `flops`: the matmul FLOPs of the differentiated program (every `dot_general` of the
    step's jaxpr, scans multiplied by their length, remat recompute included), divided by
    the model FLOPs of `flops.model_flops_per_triplet` (recompute not counted). 1.0 means
    no recompute; full remat of the forward adds about 0.5. (XLA's own cost analysis
    counts a while-loop body once, so it cannot see a scanned stack's FLOPs.)
  - `temp GiB`: XLA's temporary buffers (activations kept for the backward, workspaces),
    and `total GiB` = arguments + outputs + temporaries - donated aliases.

The FLOPs do not depend on the backend. The memory is the CPU compiler's fusion and
buffer assignment when run on a CPU, so only an estimate of the GPU peak
(`benchmarks/NOTES.md` compares both). On a CPU the default dtype is float32 (the
float32-slope method): XLA's CPU backend upcasts bf16 and would report 34-93 GiB for
an xxl step; `--dtype bfloat16` on a CPU prints a warning saying so.

Imports `mst5_jax`: installed, or `PYTHONPATH=.` from the repository root.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

from mst5_jax.core import lora  # noqa: E402
from mst5_jax.core.config import EncoderConfig  # noqa: E402
from mst5_jax.core.model import REMAT_POLICIES  # noqa: E402
from mst5_jax.training.flops import abstract_lora_step, matmul_flops, model_flops_per_triplet  # noqa: E402

GIB = 1024**3
LORA = lora.LoRAConfig(rank=8, alpha=16, targets=["q", "v"])


def analyse(cfg: EncoderConfig, batch: int, length: int, microbatch: int | None = None,
            cache_layer_inputs: bool = False) -> dict:
    """Compiles the LoRA step for `cfg` on abstract inputs and returns XLA's accounts of it."""
    step, args, lora_params = abstract_lora_step(cfg, LORA, batch, length, microbatch_size=microbatch,
                                                 cache_layer_inputs=cache_layer_inputs)
    flops = matmul_flops(step.trace(*args).jaxpr.jaxpr)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    model_flops = batch * model_flops_per_triplet(cfg, length, lora_params, full_finetune=False)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args[1]))
    return {
        "model": cfg.name, "batch": batch, "length": length, "remat": cfg.remat, "microbatch": microbatch,
        "cache_layer_inputs": cache_layer_inputs,
        "backend": jax.default_backend(), "jax": jax.__version__, "compile_s": round(compile_s, 1),
        "matmul_flops": flops, "model_flops": model_flops, "flops_ratio": flops / model_flops,
        "weights_gib": weights / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "total_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                      - mem.alias_size_in_bytes) / GIB,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mt5-xxl", help="an EncoderConfig preset")
    ap.add_argument("--num_layers", type=int, default=None,
                    help="override the layer count (FLOPs and per-layer memory scale linearly)")
    ap.add_argument("--batch", type=int, default=32, help="triplets per step")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="compute and frozen-weight dtype (default: float32 on a CPU, which avoids XLA's "
                         "bf16 upcasts, bfloat16 elsewhere)")
    ap.add_argument("--remat", nargs="+", default=list(REMAT_POLICIES) + ["none"], choices=list(REMAT_POLICIES) + ["none"])
    ap.add_argument("--microbatch", type=int, default=None, help="GradCache micro-batch (triplets)")
    ap.add_argument("--cache_layer_inputs", action="store_true", help="GradCache keeps the block inputs")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="append one JSON object per policy")
    args = ap.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    if args.dtype is None:
        args.dtype = "float32" if on_cpu else "bfloat16"
    if on_cpu and args.dtype == "bfloat16":
        print("WARNING: bfloat16 on a CPU: XLA upcasts bf16 to f32 here, so temp/total GiB are inflated "
              "(not a GPU estimate); use the default float32 on a CPU", file=sys.stderr)
    overrides = {} if args.num_layers is None else {"num_layers": args.num_layers}
    print(f"{'remat':>9} {'flops/model':>11} {'temp GiB':>9} {'total GiB':>9} {'compile s':>9}")
    for remat in args.remat:
        cfg = EncoderConfig.preset(args.model, dtype=args.dtype, param_dtype=args.dtype, remat=remat, **overrides)
        row = analyse(cfg, args.batch, args.length, args.microbatch, args.cache_layer_inputs)
        print(f"{remat:>9} {row['flops_ratio']:>11.3f} {row['temp_gib']:>9.2f} {row['total_gib']:>9.2f} "
              f"{row['compile_s']:>9.1f}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
