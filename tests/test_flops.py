"""FLOP accounting: the jaxpr matmul counter, and what each remat policy recomputes."""
import jax
import jax.numpy as jnp
import pytest

from mst5_jax.core import lora
from mst5_jax.core.config import EncoderConfig
from mst5_jax.training.flops import abstract_lora_step, matmul_flops, model_flops_per_triplet


def test_matmul_counter_counts_scans_and_conds():
    w = jnp.ones((6, 8, 16))

    def f(x):
        def body(h, wi):
            return h, jnp.einsum("bi,io->bo", h, wi[:, :8])
        _, ys = jax.lax.scan(body, x, w)
        big = jax.lax.cond(x.sum() > 0, lambda: x @ jnp.ones((8, 32)), lambda: jnp.zeros((4, 32)))
        return ys, big

    jaxpr = jax.jit(f).trace(jnp.ones((4, 8))).jaxpr.jaxpr
    assert matmul_flops(jaxpr) == 6 * 2 * 4 * 8 * 8 + 2 * 4 * 32 * 8

    def g(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ jnp.ones((8, 8)), c[1] + 1), (x, 0))

    with pytest.raises(ValueError, match="no static trip count"):
        matmul_flops(jax.jit(g).trace(jnp.ones((4, 8))).jaxpr.jaxpr)


CFG = EncoderConfig.preset("tiny", vocab_size=64, d_model=32, d_ff=48, num_heads=4, d_kv=8, num_layers=3)
RANK = 4


def _step_flops(remat: str, batch: int = 4, length: int = 16, microbatch=None, cache=False) -> float:
    step, args, _ = abstract_lora_step(CFG.replace(remat=remat), lora.LoRAConfig(rank=RANK, targets=["q", "v"]),
                                       batch, length, microbatch_size=microbatch, cache_layer_inputs=cache)
    return matmul_flops(step.trace(*args).jaxpr.jaxpr)


def test_remat_policies_recompute_what_they_say():
    batch, length = 4, 16
    tokens = 3 * batch * length
    d, f, inner, layers = CFG.d_model, CFG.d_ff, CFG.inner_dim, CFG.num_layers
    lora_params = layers * 2 * (d * RANK + RANK * inner)
    model = batch * model_flops_per_triplet(CFG, length, lora_params, full_finetune=False)
    none, dots, residual, full = (_step_flops(r, batch, length) for r in ("none", "dots", "residual", "full"))
    # Without recompute the program does the model FLOPs plus what the convention leaves
    # out: the LoRA forward products, the attention backward's second product, the loss's
    # similarity matmuls; less layer 0's input gradients (the embedding is frozen). Here,
    # with r=4 against d_model=32, that is +9%; for xxl at r=8 it is +0.2%.
    assert 1.0 < none / model < 1.15
    # "dots" keeps every weight-side matmul output, so only the q.k logits (a batched
    # product) are rebuilt for the softmax backward.
    assert dots - none == layers * tokens * 2 * length * inner
    # Full remat rebuilds each block's forward in the backward, except `wo`, whose output
    # only feeds the next layer's input (already saved as the scan carry): frozen kernels
    # need no saved input for their gradient.
    per_token = 2 * (3 * d * inner + inner * d + 2 * d * f) + 2 * 2 * length * inner + 2 * 2 * (d * RANK + RANK * inner)
    assert full - none == layers * tokens * per_token
    # "residual" also keeps the mid-block residual, so neither the attention-output
    # projection `o` nor the weights.v product that feeds it is rebuilt.
    assert full - residual == layers * tokens * (2 * inner * d + 2 * length * inner)


def test_gradcache_with_cached_layer_inputs_costs_one_full_remat_step():
    """Plain GradCache pays a whole extra forward; keeping the block inputs of its first
    pass brings it to the FLOPs of one full-remat step over the whole batch."""
    batch, length = 8, 16
    full = _step_flops("full", batch, length)
    forward = full - _step_flops("none", batch, length)  # what full remat rebuilds
    plain = _step_flops("full", batch, length, microbatch=4)
    cached = _step_flops("none", batch, length, microbatch=4, cache=True)
    assert cached == _step_flops("full", batch, length, microbatch=4, cache=True)  # the policy plays no part
    # No more than full remat: the cached backward rebuilds the same blocks. (It is 4% less
    # here, a constant that does not grow with depth: layer 0, whose input needs no gradient.)
    assert 0.95 * full <= cached <= full
    assert plain - cached > forward  # at least the rebuilt forward, plus wo's share
