"""FLOP accounting: the model FLOPs behind MFU, and the matmul FLOPs a traced program really does.

`model_flops_per_triplet` is the denominator convention of `docs/BENCHMARKS.md` (issue 9):
forward + activation gradients + trainable weight gradients, recompute not counted.
`matmul_flops` counts what a differentiated, remat-transformed program executes, so the
ratio of the two is the recompute a remat policy costs (`benchmarks/xla_analysis.py`).
"""
from __future__ import annotations

import jax.extend

from mst5_jax.config import EncoderConfig

_JAXPRS = (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)


def model_flops_per_triplet(cfg: EncoderConfig, length: int, lora_params: int, full_finetune: bool,
                            texts: int = 3) -> float:
    """Model FLOPs of one training triplet (recompute not counted).

    2·N·tokens forward + 2·N·tokens activation gradients (+ 2·N·tokens weight gradients in
    full fine-tuning, or the LoRA weight-gradient FLOPs, 2·P_lora·tokens).
    """
    n = cfg.num_params(include_embedding=False)
    tokens = texts * length
    attn = 2 * 2 * cfg.num_layers * length * cfg.inner_dim * tokens  # QK^T and AV, fwd
    fwd = 2 * n * tokens + attn
    bwd = fwd + (2 * n * tokens if full_finetune else 2 * lora_params * tokens)
    return float(fwd + bwd)


def matmul_flops(jaxpr: jax.extend.core.Jaxpr, dce: bool = True) -> float:
    """2 x M x N x K summed over every `dot_general` of `jaxpr` and its sub-jaxprs.

    Scan bodies count `length` times, the costlier `cond` branch once; a `while` loop has no
    static trip count and raises. Use on `jax.jit(f).trace(*args).jaxpr.jaxpr`. With `dce`,
    equations whose results are never used are dropped first, as XLA drops them (a
    `jax.vjp` inside a custom backward computes a primal output nobody reads).
    """
    if dce:
        jaxpr = _dce(jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            k = 1
            for d in lhs_contract:
                k *= eqn.invars[0].aval.shape[d]
            total += 2.0 * eqn.outvars[0].aval.size * k
            continue
        subs = [v for v in eqn.params.values() if isinstance(v, _JAXPRS)]
        subs += [b for v in eqn.params.values() if isinstance(v, tuple) for b in v if isinstance(b, _JAXPRS)]
        counts = [matmul_flops(getattr(b, "jaxpr", b), dce=False) for b in subs]
        if eqn.primitive.name == "while" and any(counts):
            raise ValueError("a while loop with matmuls has no static trip count; its FLOPs cannot be counted")
        if eqn.primitive.name == "cond":
            total += max(counts, default=0.0)
        else:
            total += (eqn.params["length"] if eqn.primitive.name == "scan" else 1) * sum(counts)
    return total


def _dce(jaxpr: jax.extend.core.Jaxpr) -> jax.extend.core.Jaxpr:
    # JAX's own dead-code elimination (recursing into scans and calls); it has no public
    # name, so a JAX without it counts the program as traced.
    try:
        from jax._src.interpreters.partial_eval import dce_jaxpr
    except ImportError:  # pragma: no cover
        return jaxpr
    return dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]
