"""GradCache with cached layer inputs: the large-batch gradient for the FLOPs of full remat.

Plain GradCache (`mst5_jax.training.train_step.loss_and_grads`) embeds every micro-batch twice: once
without gradients, for the loss, and once more under `jax.vjp`, to pull the embedding
gradients back. With the per-layer recompute of the backward that is about 2 + 2 + 1.6 + 2
= 7.6·N FLOPs per token, against 5.6·N for one full-remat step on the whole batch (`wo`'s
output is never rebuilt: see `tests/test_flops.py`).

This mode keeps what full remat keeps, the input of every block, from the first pass:

  1. embed each micro-batch without gradients (`lax.map`) and keep its block inputs
     [num_layers, mb * C, L, d_model] in the compute dtype;
  2. loss and d loss / d embeddings on the full set, as in plain GradCache;
  3. per micro-batch, one VJP through the head and the embedding lookup, and through the
     block stack a custom VJP whose forward is free (the cached output) and whose backward
     walks the layers in reverse, rebuilding one block at a time from its cached input.

Steps 1 + 3 then cost 2 + 1.6 + 2 = 5.6·N per token, as one full-remat step does, and the
gradient is the same function of the same numbers. The price is memory: the cached block
inputs and the last block's output are (num_layers + 1) x tokens x d_model in the compute
dtype, 39.3 MB per triplet of 3 x 64 tokens for mt5-xxl in bf16 (37.5 GiB at 1024
triplets), about what full remat would keep for the whole batch; the rest stays bounded by
one micro-batch (`config_check.cached_layer_input_bytes` budgets it).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
_LAYERS = ("encoder", "layers")


def _subtree(state: nnx.State, path: tuple[str, ...]) -> nnx.State:
    node = state
    for k in path:
        if k not in node:
            return nnx.State({})
        node = node[k]
    return node


def _has(state: nnx.State, path: tuple[str, ...]) -> bool:
    return bool(jax.tree.leaves(_subtree(state, path)))


def flat_ids(model, ids: Array) -> tuple[Array, Array]:
    """ids [mb, C, L] -> ([mb * C, L] triplet-major, its mask: 1 where not the pad id)."""
    mb, c, length = ids.shape
    flat = ids.reshape(mb * c, length)
    return flat, (flat != model.cfg.pad_token_id).astype(jnp.int32)


def embed_keeping_inputs(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, ids: Array,
                         key: Array) -> tuple[Array, Array, Array]:
    """Step 1 for one micro-batch of ids [mb, C, L]: (embeddings float32 [mb, C, D],
    block inputs [num_layers, mb * C, L, d_model], last block output [mb * C, L, d_model])."""
    model = nnx.merge(graphdef, params, frozen)
    flat, mask = flat_ids(model, ids)
    x, bias, layer_keys, k_final = model.encoder.prepare(flat, mask, key)
    out, inputs = model.encoder.run_layers(x, bias, layer_keys, keep_inputs=True)
    emb = model.head(model.encoder.finish(out, k_final), mask)
    return emb.reshape(*ids.shape[:2], -1), inputs, out


def grads_from_cache(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, ids: Array, key: Array,
                     inputs: Array, out: Array, emb_grad: Array) -> nnx.State:
    """Step 3 for one micro-batch: d loss / d params, given its cached block inputs and
    output and the cached embedding gradients [mb, C, D]."""
    encoder_params = _subtree(params, ("encoder",))
    # The block stack's input and bias need cotangents only when something before them
    # trains (the embedding table, the position bias): not in LoRA on the blocks.
    grad_x = _has(encoder_params, ("token_embedder",))
    grad_bias = _has(encoder_params, ("relpos_bias",))

    def forward(p):
        model = nnx.merge(graphdef, p, frozen)
        flat, mask = flat_ids(model, ids)
        x, bias, layer_keys, k_final = model.encoder.prepare(flat, mask, key)
        stack = _cached_stack(nnx.graphdef(model.encoder.layers), grad_x, grad_bias)
        h = stack(_subtree(p, _LAYERS), _subtree(frozen, _LAYERS), x, bias, layer_keys, inputs, out)
        return model.head(model.encoder.finish(h, k_final), mask).reshape(emb_grad.shape)

    _, vjp = jax.vjp(forward, params)
    (grads,) = vjp(emb_grad)
    return grads


def _index(tree: Any, i: Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _cached_stack(layer_graphdef: nnx.GraphDef, grad_x: bool, grad_bias: bool) -> Callable:
    """stack(trainable, frozen, x, bias, keys, inputs, out) -> out, whose VJP rebuilds
    block i from inputs[i], last to first, and returns the trainable blocks' gradients
    (plus x's and the bias's when asked for)."""

    def block_vjp(trainable, frozen, inputs, keys, bias, i, dh, need_dh):
        lt, lf, h_in = _index(trainable, i), _index(frozen, i), inputs[i]
        key = None if keys is None else keys[i]

        def block(t, h, b):
            return nnx.merge(layer_graphdef, t, lf)(h, b, key)

        if need_dh and grad_bias:
            _, vjp = jax.vjp(block, lt, h_in, bias)
            return vjp(dh)
        if need_dh:
            _, vjp = jax.vjp(lambda t, h: block(t, h, bias), lt, h_in)
            return (*vjp(dh), None)
        if grad_bias:
            _, vjp = jax.vjp(lambda t, b: block(t, h_in, b), lt, bias)
            dt, db = vjp(dh)
            return dt, None, db
        _, vjp = jax.vjp(lambda t: block(t, h_in, bias), lt)
        return (*vjp(dh), None, None)

    @jax.custom_vjp
    def stack(trainable, frozen, x, bias, keys, inputs, out):
        return out

    def fwd(trainable, frozen, x, bias, keys, inputs, out):
        return out, (trainable, frozen, bias, keys, inputs)

    def bwd(res, g):
        trainable, frozen, bias, keys, inputs = res
        num_layers = inputs.shape[0]
        # Layer 0's input gradient is only needed when x trains: peel it off otherwise.
        first = 0 if grad_x else 1

        def body(carry, i):
            dh, dbias = carry
            dt, dh_in, db = block_vjp(trainable, frozen, inputs, keys, bias, i, dh, need_dh=True)
            return (dh_in, dbias + db if grad_bias else dbias), dt

        dbias0 = jnp.zeros_like(bias) if grad_bias else None
        (dh, dbias), dts = jax.lax.scan(body, (g, dbias0), jnp.arange(first, num_layers), reverse=True)
        if not grad_x:
            dt0, _, db0 = block_vjp(trainable, frozen, inputs, keys, bias, jnp.int32(0), dh, need_dh=False)
            dts = jax.tree.map(lambda a, rest: jnp.concatenate([a[None], rest]), dt0, dts)
            dbias = dbias + db0 if grad_bias else None
            dh = None
        return dts, None, dh, dbias, None, None, None

    stack.defvjp(fwd, bwd)
    return stack


def gradcache(embed: Callable[[nnx.State, Array, Array], Array], graphdef: nnx.GraphDef, params: nnx.State,
              frozen: nnx.State, micro: Array, keys: Array, objective: Callable[[Array], tuple[Array, dict]],
              merge_microbatches: Callable[[Array], Array], *, cache_layer_inputs: bool = False,
              constrain_batch: Callable[[Array, int], Array] = lambda x, axis: x,
              constrain_params: Callable[[Any], Any] = lambda tree: tree) -> tuple[Array, dict, nnx.State]:
    """(loss, metrics, grads) of the whole batch from micro-batches micro [k, mb, C, L].

    Args:
      embed: `(params, ids [mb, C, L], key)` -> embeddings [mb, C, D] (plain mode).
      objective: embeddings [B, C, D] -> (loss, metrics).
      merge_microbatches: [k, mb, ...] -> [B, ...] in the batch's row order.
      cache_layer_inputs: keep the block inputs of the first pass (module docstring);
        otherwise plain GradCache, which re-embeds each micro-batch under `jax.vjp`.
      constrain_batch: `(x, axis)` -> x with axis `axis` split over the batch shards.
      constrain_params: a params-shaped tree -> the same, sharded like the parameters.
    """
    if cache_layer_inputs:
        def first_pass(ids, key):
            emb, inputs, out = embed_keeping_inputs(graphdef, params, frozen, ids, key)
            return emb, (constrain_batch(inputs, 1), constrain_batch(out, 0))

        def micro_grads(ids, key, cache, g):
            return grads_from_cache(graphdef, params, frozen, ids, key, *cache, g)
    else:
        def first_pass(ids, key):
            return embed(params, ids, key), ()

        def micro_grads(ids, key, cache, g):
            _, vjp = jax.vjp(lambda p: embed(p, ids, key), params)
            return vjp(g)[0]

    # 1. Embeddings of every micro-batch, no gradients kept (and, cached, the block inputs).
    emb, cache = jax.lax.map(lambda xs: first_pass(*xs), (micro, keys))  # emb [k, mb, C, D]
    # 2. The loss on the full set, and its gradient with respect to the embeddings.
    (loss, metrics), emb_grad = jax.value_and_grad(lambda e: objective(merge_microbatches(e)), has_aux=True)(emb)

    # 3. Per micro-batch, the gradients the cached embedding gradients pull back, summed.
    def accumulate(acc, xs):
        ids, key, c, g = xs
        return constrain_params(jax.tree.map(jnp.add, acc, micro_grads(ids, key, c, g))), None

    grads, _ = jax.lax.scan(accumulate, constrain_params(jax.tree.map(jnp.zeros_like, params)),
                            (micro, keys, cache, emb_grad))
    return loss, metrics, grads
