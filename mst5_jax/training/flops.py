"""FLOP accounting: the model FLOPs behind MFU, and the matmul FLOPs a traced program really does.

`model_flops_per_triplet` is the denominator convention of `docs/BENCHMARKS.md`:
forward + activation gradients + trainable weight gradients, recompute not counted.
`matmul_flops` counts what a differentiated, remat-transformed program executes, so the
ratio of the two is the recompute a remat policy costs (`benchmarks/xla_analysis.py`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.extend
import jax.numpy as jnp
import optax
from flax import nnx

from mst5_jax.core import lora
from mst5_jax.core import partitioning
from mst5_jax.training import train_step
from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.model import init_model

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


def abstract_lora_step(cfg: EncoderConfig, lora_config: Any, batch: int, length: int, *,
                       microbatch_size: Optional[int] = None, cache_layer_inputs: bool = False,
                       optimizer: Any = None) -> tuple[Callable, tuple, int]:
    """The jitted LoRA train step for `cfg` on one device, with abstract arguments: no weight
    is allocated, so an xxl step can be traced (`matmul_flops`) or compiled
    (`memory_analysis`) anywhere. Frozen weights in `cfg.param_dtype`, LoRA factors in
    float32, AdamW unless `optimizer` is given, the default `LossConfig`.

    Returns (step, args, number of LoRA parameters); `step.trace(*args)`, `step.lower(*args)`.
    """
    model = nnx.eval_shape(lambda: lora.apply_lora(init_model(cfg, 0), lora_config, 0))
    graphdef, params, frozen = lora.split_trainable(model, "lora")
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cfg.param_dtype)
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(), jax.devices()[:1])
    rules = partitioning.logical_axis_rules("single")
    optimizer = optimizer or optax.adamw(1e-4)
    shardings = train_step.step_shardings(params, frozen, optimizer, mesh, rules)
    state = jax.eval_shape(lambda p: train_step.TrainState.create(p, optimizer), params)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    step = train_step.make_train_step(graphdef, optimizer, train_step.LossConfig(), mesh, shardings,
                                      microbatch_size=microbatch_size, cache_layer_inputs=cache_layer_inputs)
    lora_params = sum(x.size for x in jax.tree.leaves(params))
    return step, (state, frozen, {"anchor": ids, "positive": ids, "negative": ids}), lora_params
