"""mst5_jax.training.train_step on the 8 fake CPU devices: the same numbers on any mesh, global
in-batch negatives against a numpy reference, and remat policies.

The model is a tiny mT5 encoder with LoRA on every Linear and a NON-zero B (with B = 0
the gradient with respect to A is exactly zero and agreement would prove nothing),
float32, dropout 0 (tests/test_gradcache.py checks dropout across device counts). Gradients
are read from the first step of `optax.sgd(momentum=0.9)`, whose trace is exactly the
gradient. "Agree" is ||a - b||_2 / ||b||_2 <= 1e-5 per leaf.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mst5_jax.training import train_step as ts
from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.lora import LoRAConfig, apply_lora, split_trainable
from mst5_jax.core.model import abstract_model, path_str
from mst5_jax.core.partitioning import MeshConfig, batch_sharding, logical_axis_rules, make_mesh

TOL = 1e-5
B, L = 16, 12
CFG = EncoderConfig.preset("tiny", vocab_size=128, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2)
LORA = LoRAConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "wi_0", "wi_1", "wo"))
LOSS = ts.LossConfig(temperature=0.05)
MESHES = {
    "data=8": (MeshConfig(data=8), "data_parallel"),
    "data=4,fsdp=2": (MeshConfig(data=4, fsdp=2), "fsdp"),
    "data=2,fsdp=2,tensor=2": (MeshConfig(data=2, fsdp=2, tensor=2), "fsdp_tensor"),
}


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_batch(seed, b=B, length=L, vocab=CFG.vocab_size):
    """Triplets of token ids (EOS = 1 at each row's end, padding 0 after, lengths vary);
    positives share ~70% of their anchor's tokens, so pos_sim > neg_sim."""
    rng = np.random.default_rng(seed)
    tokens = lambda: rng.integers(2, vocab, size=(b, length)).astype(np.int32)
    anchor = tokens()
    columns = {"anchor": anchor, "positive": np.where(rng.random((b, length)) < 0.3, tokens(), anchor),
               "negative": tokens()}
    for ids in columns.values():
        for i, n in enumerate(rng.integers(3, length + 1, size=b)):
            ids[i, n - 1] = 1
            ids[i, n:] = 0
    return dict(columns, group_id=np.arange(b, dtype=np.int32))


def random_lora_model(cfg=CFG, seed=0):
    """The tiny model with LoRA on every Linear and random weights drawn in numpy (fast:
    no eager per-op init). Kernels and A ~ N(0, 1/fan_in), B ~ 0.3 N(0, 1) (non-zero),
    norm scales 1 + 0.2 N(0, 1), token embeddings N(0, 1), position bias 0.5 N(0, 1)."""
    model = abstract_model(cfg)
    apply_lora(model, LORA, 1)  # attaches lora_scale = alpha / r, which is kept
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, shape = path_str(path), var.get_value().shape
        z = rng.standard_normal(shape)
        if name.endswith("scale"):
            value = 1.0 + 0.2 * z
        elif name.endswith("relpos_bias/embedding"):
            value = 0.5 * z
        elif name.endswith("lora_b"):
            value = 0.3 * z
        elif name.endswith("token_embedder/embedding"):
            value = z
        else:  # kernels [.., in, out], lora_a [.., in, r]
            value = z / np.sqrt(shape[-2])
        var.set_value(jnp.asarray(value, jnp.float32))
    return model


@pytest.fixture(scope="module")
def model():
    return random_lora_model()


def graphdef_with(**changes):
    """The graphdef of the same LoRA model under another config (e.g. remat), cheaply."""
    a = abstract_model(CFG.replace(**changes))
    apply_lora(a, LORA, 1)
    return split_trainable(a, "lora")[0]


_STEPS = {}  # one compiled step per (mesh, graphdef): jit caches by function identity


def run_step(model, mesh_cfg, preset, batch, devices=None, graphdef=None, seed=0):
    """(metrics, grads, new params) of one step from the model's weights, on host."""
    opt = optax.sgd(0.1, momentum=0.9)
    mesh = make_mesh(mesh_cfg, devices)
    g, state, frozen, shardings = ts.init_train_state(model, opt, mesh, logical_axis_rules(preset), mode="lora",
                                                        seed=seed)
    cache_key = (mesh_cfg, preset, None if devices is None else len(devices), graphdef)
    if cache_key not in _STEPS:
        _STEPS[cache_key] = ts.make_train_step(graphdef or g, opt, LOSS, mesh, shardings)
    placed = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    new_state, metrics = _STEPS[cache_key](state, frozen, placed)
    grads = new_state.opt_state[0].trace  # sgd momentum after one step: trace == gradient
    to_host = lambda t: {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(t)}
    return {k: float(v) for k, v in metrics.items()}, to_host(grads), to_host(new_state.params)


@pytest.fixture(scope="module")
def single_device(model):
    return run_step(model, MeshConfig(1, 1, 1), "single", make_batch(0), devices=jax.devices()[:1])


def assert_agree(got, want, what):
    assert got.keys() == want.keys()
    for name in want:
        err = rel_l2(got[name], want[name])
        assert err <= TOL, f"{what} {name}: relative L2 error {err:.2e} > {TOL}"


def test_only_lora_factors_are_trainable(single_device):
    _, grads, params = single_device
    assert params and all(n.endswith(("lora_a", "lora_b")) for n in params), sorted(params)
    assert grads.keys() == params.keys()
    # Non-zero B makes A's gradient non-zero, so the comparisons below mean something.
    for name, g in grads.items():
        assert np.linalg.norm(g) > 1e-6, name


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_same_numbers_on_any_mesh(model, single_device, mesh_name):
    mesh_cfg, preset = MESHES[mesh_name]
    metrics, grads, params = run_step(model, mesh_cfg, preset, make_batch(0))
    want_metrics, want_grads, want_params = single_device
    assert metrics["is_finite"] == 1.0
    for k in ("loss", "accuracy", "pos_sim", "neg_sim", "hard_neg_sim", "grad_norm"):
        assert abs(metrics[k] - want_metrics[k]) <= TOL * max(abs(want_metrics[k]), 1e-3), (k, metrics, want_metrics)
    assert_agree(grads, want_grads, f"{mesh_name} grad")
    assert_agree(params, want_params, f"{mesh_name} updated param")


@pytest.mark.parametrize("remat", ["full", "dots", "residual"])
def test_remat_policies_give_identical_gradients(model, single_device, remat):
    metrics, grads, _ = run_step(model, MeshConfig(1, 1, 1), "single", make_batch(0), devices=jax.devices()[:1],
                                    graphdef=graphdef_with(remat=remat))
    assert abs(metrics["loss"] - single_device[0]["loss"]) <= TOL * abs(single_device[0]["loss"])
    assert_agree(grads, single_device[1], f"remat={remat} grad")


# ---------------------------------------------------------------- global negatives


def np_info_nce(a, p, n, pools):
    """Mean over anchors of the cross-entropy of [a.p_j | a.n_j] / tau over j in the anchor's
    pool (float64 loops). pools[i] is the set of rows anchor i is scored against."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    a, p, n = (unit(x.astype(np.float64)) for x in (a, p, n))
    losses = []
    for i in range(len(a)):
        logits = np.array([a[i] @ p[j] for j in pools[i]] + [a[i] @ n[j] for j in pools[i]]) / LOSS.temperature
        target = list(pools[i]).index(i)
        losses.append(np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[target])
    return float(np.mean(losses))


def test_negatives_come_from_every_device(model):
    """Copy positive 0 (device 0's shard) into row 9 (device 4's shard): anchor 0 now meets
    a near-copy of its own positive on another device. The step's loss moves exactly as
    the numpy InfoNCE over the whole global batch predicts, and not as per-device pools
    would."""
    mesh_cfg, preset = MESHES["data=8"]
    base = make_batch(1)
    moved = {k: v.copy() for k, v in base.items()}
    moved["positive"][9] = base["positive"][0]
    rows_per_device = B // 8
    global_pool = [range(B)] * B
    local_pool = [range(i - i % rows_per_device, i - i % rows_per_device + rows_per_device) for i in range(B)]

    embed = jax.jit(ts.embed_microbatch, static_argnums=0)
    g, params, frozen = split_trainable(model, "lora")
    key = ts.dropout_keys(jax.random.key(3), jnp.int32(0), 1)[0]
    losses, predicted, local = [], [], []
    for batch in (base, moved):
        metrics, _, _ = run_step(model, mesh_cfg, preset, batch, seed=3)
        # The embeddings the step saw, computed on one device.
        emb = np.asarray(embed(g, params, frozen, ts.stack_columns({k: jnp.asarray(v) for k, v in batch.items()}), key))
        losses.append(metrics["loss"])
        predicted.append(np_info_nce(emb[:, 0], emb[:, 1], emb[:, 2], global_pool))
        local.append(np_info_nce(emb[:, 0], emb[:, 1], emb[:, 2], local_pool))

    print(f"\nstep loss {losses}, numpy global pool {predicted}, per-device pools {local}")
    for got, want in zip(losses, predicted):
        assert abs(got - want) <= TOL * abs(want), (losses, predicted)
    change, want_change = losses[1] - losses[0], predicted[1] - predicted[0]
    assert abs(want_change) > 1e-3, "the move must matter for the test to mean anything"
    assert abs(change - want_change) <= 1e-3 * abs(want_change) + 1e-5, (change, want_change)
    # Per-device pools would give a clearly different loss.
    assert min(abs(l - g) for l, g in zip(local, predicted)) > 100 * TOL * abs(predicted[0])


# ---------------------------------------------------------------- numerics


def test_bf16_compute_keeps_fp32_trainable_params_and_loss(model, single_device):
    """bf16 compute and a bf16 frozen base: trainable params, their update and the loss stay
    float32, and the numbers stay close to the float32 step."""
    opt = optax.sgd(0.1, momentum=0.9)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    _, state, frozen, shardings = ts.init_train_state(model, opt, mesh, logical_axis_rules("single"), mode="lora",
                                                      frozen_dtype="bfloat16")
    kinds = {str(v.get_value().dtype) for _, v in nnx.to_flat_state(frozen) if isinstance(v, nnx.Param)}
    assert kinds == {"bfloat16"}
    step = ts.make_train_step(graphdef_with(dtype="bfloat16"), opt, LOSS, mesh, shardings)
    new_state, metrics = step(state, frozen, make_batch(0))
    assert {str(x.dtype) for x in jax.tree.leaves(new_state.params)} == {"float32"}
    assert metrics["loss"].dtype == jnp.float32 and float(metrics["is_finite"]) == 1.0
    want = single_device[0]["loss"]
    print(f"\nloss float32 {want:.5f}, bf16 compute {float(metrics['loss']):.5f}")
    assert abs(float(metrics["loss"]) - want) <= 0.05 * abs(want)
    grads = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(new_state.opt_state[0].trace)}
    cosines = {n: float(np.vdot(g, single_device[1][n]) / np.linalg.norm(g) / np.linalg.norm(single_device[1][n]))
               for n, g in grads.items()}
    print("gradient cosine bf16 vs float32, worst leaf:", min(cosines.values()))
    assert min(cosines.values()) > 0.95, cosines


def test_is_finite_flags_a_nan(model):
    broken = nnx.clone(model)
    lora_b = broken.encoder.layers.attention.q.lora_b
    lora_b.set_value(lora_b.get_value().at[0, 0, 0].set(jnp.nan))
    metrics, _, _ = run_step(broken, MeshConfig(1, 1, 1), "single", make_batch(0), devices=jax.devices()[:1])
    assert metrics["is_finite"] == 0.0
