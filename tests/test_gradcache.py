"""GradCache in mst5_jax.training.train_step: exact large-batch contrastive gradients in micro-batches.

References: the full-batch step (one pass, plain autodiff); plain autodiff through a
Python loop over the micro-batches with the same dropout keys, on one device; XLA's
compiled memory analysis; and sentence-transformers' `CachedMultipleNegativesRankingLoss`
on the HF PyTorch encoder with the same weights (float64, full fine-tuning).
"Agree" is ||a - b||_2 / ||b||_2 <= 1e-5 per leaf.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from hf_reference import hf_config, random_encoder, random_ids, save_hf_dir
from mst5_jax.core import losses
from mst5_jax.training import config_check
from mst5_jax.training import train_step as ts
from mst5_jax.formats.huggingface import hf_names, load_hf_weights
from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.lora import split_trainable
from mst5_jax.core.model import path_str
from mst5_jax.core.partitioning import MeshConfig, batch_sharding, logical_axis_rules, make_mesh
from test_train_step import LOSS, assert_agree, graphdef_with, make_batch, random_lora_model, rel_l2

TOL = 1e-5
B, MB = 16, 8  # 2 micro-batches of 8 triplets (m = 0: triplets 0, 2, 4, ...), each split over 8 devices
SHARDED = (MeshConfig(data=4, fsdp=2), "fsdp")


def to_host(state):
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def run_step(model, batch, mesh_cfg, preset, *, devices=None, graphdef=None, microbatch_size=None, mode="lora",
             seed=0, cache_layer_inputs=False):
    """(metrics, grads, updated params) of one step on host; sgd(momentum) trace == gradient."""
    opt = optax.sgd(0.1, momentum=0.9)
    mesh = make_mesh(mesh_cfg, devices)
    g, state, frozen, shardings = ts.init_train_state(model, opt, mesh, logical_axis_rules(preset), mode=mode,
                                                        seed=seed)
    step = ts.make_train_step(graphdef or g, opt, LOSS, mesh, shardings, microbatch_size=microbatch_size,
                              cache_layer_inputs=cache_layer_inputs)
    placed = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    new_state, metrics = step(state, frozen, placed)
    return ({k: float(v) for k, v in metrics.items()}, to_host(new_state.opt_state[0].trace),
            to_host(new_state.params))


@pytest.fixture(scope="module")
def model():
    return random_lora_model()


@pytest.fixture(scope="module")
def gradcache_no_dropout(model):
    return run_step(model, make_batch(5, b=B), *SHARDED, microbatch_size=MB)


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached_layer_inputs"])
def test_micro_batches_give_the_full_batch_gradient(model, gradcache_no_dropout, cached):
    want_metrics, want_grads, want_params = run_step(model, make_batch(5, b=B), *SHARDED)
    if cached:
        metrics, grads, params = run_step(model, make_batch(5, b=B), *SHARDED, microbatch_size=MB,
                                          cache_layer_inputs=True)
    else:
        metrics, grads, params = gradcache_no_dropout
    for k in ("loss", "accuracy", "pos_sim", "neg_sim", "hard_neg_sim", "grad_norm"):
        assert abs(metrics[k] - want_metrics[k]) <= TOL * max(abs(want_metrics[k]), 1e-3), (k, metrics, want_metrics)
    assert_agree(grads, want_grads, "GradCache grad")
    assert_agree(params, want_params, "GradCache updated param")


def test_dropout_keys_are_reused_and_independent_of_devices(model, gradcache_no_dropout):
    """With dropout 0.1, GradCache on 8 devices equals plain autodiff, on one device, through
    a loop that embeds micro-batch m (triplets m, m+k, ...) with key m of step 0: so step 3
    re-draws exactly the masks of step 1, and the bits do not depend on the mesh."""
    batch = make_batch(5, b=B)  # same batch as the dropout-free fixture
    graphdef = graphdef_with(dropout_rate=0.1)
    metrics, grads, _ = run_step(model, batch, *SHARDED, graphdef=graphdef, microbatch_size=MB, seed=7)

    _, params, frozen = split_trainable(model, "lora")
    k = B // MB
    keys = ts.dropout_keys(jax.random.key(7), jnp.int32(0), k)
    ids = ts.stack_columns({c: jnp.asarray(v) for c, v in batch.items()})

    def reference_loss(p):
        emb = jnp.zeros(ids.shape[:2] + (model.cfg.d_model,), jnp.float32)
        for m in range(k):
            emb = emb.at[m::k].set(ts.embed_microbatch(graphdef, p, frozen, ids[m::k], keys[m]))
        return losses.batch_loss(emb, jnp.asarray(batch["group_id"]), LOSS)[0]

    want_loss, want_grads = jax.jit(jax.value_and_grad(reference_loss))(params)
    assert abs(metrics["loss"] - float(want_loss)) <= TOL * abs(float(want_loss))
    assert_agree(grads, to_host(want_grads), "GradCache+dropout grad")
    # Dropout was really on: the loss differs from the dropout-free step on the same batch.
    assert abs(metrics["loss"] - gradcache_no_dropout[0]["loss"]) > 1e-3
    # Cached layer inputs: the backward rebuilds each block with its own layer key.
    cached_metrics, cached_grads, _ = run_step(model, batch, *SHARDED, graphdef=graphdef, microbatch_size=MB, seed=7,
                                               cache_layer_inputs=True)
    assert abs(cached_metrics["loss"] - float(want_loss)) <= TOL * abs(float(want_loss))
    assert_agree(cached_grads, to_host(want_grads), "cached GradCache+dropout grad")


def test_cached_layer_inputs_in_full_fine_tuning(model):
    """Trainable embedding table and position bias: the cached backward also returns the
    block stack's input and bias gradients."""
    batch = make_batch(6, b=B)
    _, want, _ = run_step(model, batch, *SHARDED, mode="full")
    _, got, _ = run_step(model, batch, *SHARDED, microbatch_size=MB, mode="full", cache_layer_inputs=True)
    assert {"encoder/token_embedder/embedding", "encoder/relpos_bias/embedding"} <= set(got)
    assert_agree(got, want, "cached GradCache full fine-tuning grad")


def test_memory_is_bounded_by_the_micro_batch(model):
    """XLA's temp bytes at 4x the batch (fixed micro-batch) <= 1.25x the smaller case.
    (`memory_stats()` is None on CPU; the compiled memory analysis is what we have.)"""
    opt = optax.sgd(0.1)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    g, state, frozen, shardings = ts.init_train_state(model, opt, mesh, logical_axis_rules("single"), mode="lora")
    length, mb = 32, 8

    def temp_bytes(batch_size, microbatch_size, cached=False):
        step = ts.make_train_step(g, opt, LOSS, mesh, shardings, microbatch_size=microbatch_size,
                                  cache_layer_inputs=cached)
        batch = {c: jax.ShapeDtypeStruct((batch_size, length), jnp.int32) for c in ts.COLUMNS}
        batch["group_id"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        return step.lower(state, frozen, batch).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2 * mb, mb), temp_bytes(8 * mb, mb)
    print(f"\nGradCache temp bytes, micro-batch {mb}: batch {2 * mb}: {small:,}  batch {8 * mb}: {large:,} "
          f"(ratio {large / small:.3f})")
    assert large <= 1.25 * small

    # Cached layer inputs grow by exactly what `config_check` budgets for the 6 added
    # micro-batches: (num_layers + 1) x tokens x d_model x 4 bytes (float32 here).
    cached_small, cached_large = temp_bytes(2 * mb, mb, cached=True), temp_bytes(8 * mb, mb, cached=True)
    extra = config_check.cached_layer_input_bytes(model.cfg, 6 * mb, length)
    assert cached_large - cached_small == extra + (large - small)


# ---------------------------------------------------------------- sentence-transformers


class MeanPooledEncoder(torch.nn.Module):
    """HF encoder + masked mean (EOS included), in the shape sentence-transformers calls."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, features):
        hidden = self.encoder(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).last_hidden_state
        mask = features["attention_mask"][..., None].to(hidden.dtype)
        return {"sentence_embedding": (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)}


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached_layer_inputs"])
def test_gradients_equal_sentence_transformers_cached_mnrl(tmp_path, cached):
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    config = hf_config(vocab_size=128)
    torch_encoder = random_encoder(config, seed=3)
    hf_dir = save_hf_dir(torch_encoder, tmp_path / "hf")
    cfg = EncoderConfig.from_hf_json(hf_dir / "config.json")
    model = load_hf_weights(hf_dir, cfg)

    rng = np.random.default_rng(0)
    b, length = 8, 10
    batch = {c: random_ids(rng, b, length, config.vocab_size, min_len=2)[0] for c in ts.COLUMNS}
    batch["group_id"] = np.arange(b, dtype=np.int32)
    metrics, grads, _ = run_step(model, batch, MeshConfig(data=2), "data_parallel", devices=jax.devices()[:2],
                                 microbatch_size=2, mode="full", cache_layer_inputs=cached)

    reference = torch.nn.Sequential(MeanPooledEncoder(torch_encoder.double().train(False)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss_fn = CachedMultipleNegativesRankingLoss(reference, scale=1.0 / LOSS.temperature, mini_batch_size=2)
    features = [{"input_ids": torch.as_tensor(batch[c], dtype=torch.long),
                 "attention_mask": torch.as_tensor(batch[c] != 0, dtype=torch.long)} for c in ts.COLUMNS]
    loss = loss_fn(features, labels=None)
    loss.backward()
    assert abs(metrics["loss"] - loss.item()) <= TOL * abs(loss.item())

    torch_grads = {n: p.grad.numpy() for n, p in torch_encoder.named_parameters()}
    torch_grads.setdefault("shared.weight", torch_grads.get("encoder.embed_tokens.weight"))
    assert set(grads) == set(hf_names(cfg))
    for name, entries in hf_names(cfg).items():
        want = [torch_grads[t].T if transpose else torch_grads[t] for t, transpose in entries]
        want = np.stack(want) if name.startswith("encoder/layers/") else want[0]
        err = rel_l2(grads[name], want)
        assert err <= TOL, f"{name}: relative L2 error {err:.2e} against CachedMNRL"
