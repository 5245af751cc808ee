"""mst5_jax.core.partitioning on the 8 fake CPU devices that conftest sets up: mesh wildcards and
errors, the rule presets, a sharded computation against numpy, host-local batches, and the
mT5-xxl FSDP memory check by abstract evaluation (nothing allocated)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mst5_jax.core.partitioning import (
    MeshConfig,
    abstract_mesh,
    batch_sharding,
    bytes_per_device,
    constrain,
    host_local_to_global,
    logical_axis_rules,
    logical_to_sharding,
    logical_to_spec,
    logical_to_spec_tree,
    make_mesh,
    optimizer_state_sharding,
)


def test_eight_fake_devices():
    assert jax.device_count() == 8


# ---------------------------------------------------------------- MeshConfig


@pytest.mark.parametrize(
    "cfg, n, expected",
    [
        (MeshConfig(), 8, (8, 1, 1)),
        (MeshConfig(data=-1, fsdp=2), 8, (4, 2, 1)),
        (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
        (MeshConfig(data=1, fsdp=1, tensor=-1), 8, (1, 1, 8)),
        (MeshConfig(data=1, fsdp=-1), 1, (1, 1, 1)),
        (MeshConfig(data=2, fsdp=4, tensor=1), 8, (2, 4, 1)),
        (MeshConfig(data=-1, fsdp=16), 256, (16, 16, 1)),
    ],
)
def test_wildcard_resolution(cfg, n, expected):
    assert cfg.resolve(n) == expected
    assert abstract_mesh(cfg, n).axis_sizes == expected


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MeshConfig(data=-1, fsdp=-1), "at most one axis may be -1"),
        (lambda: MeshConfig(data=0), "data=0"),
        (lambda: MeshConfig(data=-1, fsdp=3).resolve(8), "multiply to 3, which does not divide the 8 devices"),
        (lambda: MeshConfig(data=4, fsdp=4).resolve(8), "mesh has 16 devices, which exceeds the 8 devices"),
        (lambda: MeshConfig(data=2, fsdp=2).resolve(8), "mesh has 4 devices, which does not use all of the 8"),
        (lambda: make_mesh(MeshConfig(data=16)), "16 devices, which exceeds the 8"),
    ],
)
def test_mesh_config_errors_name_the_numbers(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_make_mesh_uses_the_given_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    sub = make_mesh(MeshConfig(fsdp=-1, data=1), devices=jax.devices()[4:])
    assert dict(sub.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert sorted(d.id for d in sub.devices.flat) == [4, 5, 6, 7]


# ---------------------------------------------------------------- rules

Q = ("layers", "embed", "joined_kv")
O = ("layers", "joined_kv", "embed")
WO = ("layers", "mlp", "embed")
LORA_A = ("layers", "embed", "lora_rank")
LORA_B = ("layers", "lora_rank", "joined_kv")
EMB = ("vocab", "embed")
BIAS = ("relpos_buckets", "heads")
ACT = ("batch", "length", "embed")
SHAPES = {Q: (4, 64, 48), O: (4, 48, 64), WO: (4, 96, 64), LORA_A: (4, 64, 8), LORA_B: (4, 8, 48),
          EMB: (1000, 64), BIAS: (32, 6), ACT: (16, 12, 64)}


@pytest.mark.parametrize(
    "preset, mesh_cfg, expected",
    [
        ("single", MeshConfig(data=1), {k: P(*(None,) * len(k)) for k in SHAPES}),
        ("data_parallel", MeshConfig(data=8),
         {k: P(*(None,) * len(k)) for k in SHAPES if k != ACT} | {ACT: P("data", None, None)}),
        ("fsdp", MeshConfig(data=1, fsdp=8),
         {Q: P(None, "fsdp", None), O: P(None, None, "fsdp"), WO: P(None, None, "fsdp"),
          LORA_A: P(None, "fsdp", None), LORA_B: P(None, None, "fsdp"), EMB: P(None, "fsdp"),
          BIAS: P(None, None), ACT: P("fsdp", None, None)}),
        ("fsdp", MeshConfig(data=4, fsdp=2),
         {Q: P(None, "fsdp", None), EMB: P(None, "fsdp"), BIAS: P(None, None),
          ACT: P(("data", "fsdp"), None, None)}),
        ("fsdp_tensor", MeshConfig(data=2, fsdp=2, tensor=2),
         {Q: P(None, "fsdp", "tensor"), O: P(None, "tensor", "fsdp"), WO: P(None, "tensor", "fsdp"),
          LORA_A: P(None, "fsdp", None), LORA_B: P(None, None, "tensor"), EMB: P("tensor", "fsdp"),
          BIAS: P(None, "tensor"), ACT: P(("data", "fsdp"), None, None)}),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_preset_specs(preset, mesh_cfg, expected):
    mesh = abstract_mesh(mesh_cfg, math.prod(mesh_cfg.as_tuple()))
    rules = logical_axis_rules(preset)
    for axes, spec in expected.items():
        got = logical_to_spec(axes, SHAPES[axes], mesh, rules)
        assert got == spec, (preset, axes, got, spec)


def test_indivisible_dims_fall_back_to_replication_or_the_next_rule():
    mesh = abstract_mesh(MeshConfig(data=1, fsdp=8), 8)
    rules = logical_axis_rules("fsdp")
    # embed=36 is not divisible by 8: the mlp fallback takes fsdp instead.
    assert logical_to_spec(WO, (4, 96, 36), mesh, rules) == P(None, "fsdp", None)
    # Nothing divides: replicated.
    assert logical_to_spec(Q, (4, 36, 12), mesh, rules) == P(None, None, None)
    # The batch falls back from (data, fsdp) to the axis that divides.
    mesh2 = abstract_mesh(MeshConfig(data=2, fsdp=4), 8)
    assert logical_to_spec(("batch",), (6,), mesh2, rules) == P("data")
    assert logical_to_spec(("batch",), (3,), mesh2, rules) == P(None)
    mesh3 = abstract_mesh(MeshConfig(data=3, fsdp=4), 12)
    assert logical_to_spec(("batch",), (8,), mesh3, rules) == P("fsdp")


def test_size_one_mesh_axes_leave_the_dim_to_later_rules():
    # fsdp_tensor preset on a mesh without tensor parallelism: LoRA B's joined_kv (no
    # "embed" in the array) still gets fsdp through its fallback rule.
    mesh = abstract_mesh(MeshConfig(data=4, fsdp=2, tensor=1), 8)
    assert logical_to_spec(LORA_B, (4, 8, 48), mesh, logical_axis_rules("fsdp_tensor")) == P(None, None, "fsdp")
    rules = (("embed", None),) + logical_axis_rules("fsdp")
    assert logical_to_spec(Q, (4, 64, 48), mesh, rules) == P(None, None, "fsdp")


def test_rule_errors():
    mesh = abstract_mesh(MeshConfig(), 8)
    with pytest.raises(ValueError, match="unknown partitioning preset 'zero3'"):
        logical_axis_rules("zero3")
    with pytest.raises(ValueError, match="rank 2"):
        logical_to_spec(("embed",), (4, 4), mesh, logical_axis_rules("fsdp"))
    with pytest.raises(ValueError, match="not in"):
        logical_to_spec(("embed",), (8,), mesh, (("embed", "model"),))


def test_trees_of_axes_flat_dicts_and_partition_specs():
    mesh = abstract_mesh(MeshConfig(data=2, fsdp=4), 8)
    axes = {"a": {"q": Q, "emb": P(*EMB)}, "b": (None, "mlp")}
    shapes = {"a": {"q": jax.ShapeDtypeStruct((4, 64, 48), jnp.float32), "emb": np.zeros((10, 8))},
              "b": jax.ShapeDtypeStruct((3, 8), jnp.bfloat16)}
    specs = logical_to_spec_tree(axes, shapes, mesh, logical_axis_rules("fsdp"))
    assert specs == {"a": {"q": P(None, "fsdp", None), "emb": P(None, "fsdp")}, "b": P(None, "fsdp")}


# ---------------------------------------------------------------- real computation


def test_sharded_computation_matches_numpy():
    """A tiny two-matmul "layer" with params sharded by fsdp_tensor rules and the batch over
    (data, fsdp), jitted with explicit in/out shardings, against numpy float64."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = logical_axis_rules("fsdp_tensor")
    rng = np.random.default_rng(0)
    params = {"wi": rng.normal(size=(16, 32)).astype(np.float32), "wo": rng.normal(size=(32, 16)).astype(np.float32)}
    axes = {"wi": ("embed", "mlp"), "wo": ("mlp", "embed")}
    p_shard = logical_to_sharding(axes, params, mesh, rules)
    assert p_shard["wi"].spec == P("fsdp", "tensor") and p_shard["wo"].spec == P("tensor", "fsdp")
    params = jax.device_put(params, p_shard)
    assert params["wi"].addressable_shards[0].data.shape == (8, 16)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    batch = host_local_to_global({"x": x}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
    assert batch["x"].addressable_shards[0].data.shape == (2, 16)

    def f(p, b):
        h = jnp.maximum(jnp.dot(b["x"], p["wi"], precision="highest"), 0.0)
        h = constrain(h, ("batch", "mlp"), mesh, rules)
        y = jnp.dot(h, p["wo"], precision="highest")
        # Gathered to replicated, as the loss needs the global batch's embeddings.
        return constrain(y, (None, None), mesh, rules)

    replicated = NamedSharding(mesh, P())
    step = jax.jit(f, in_shardings=(p_shard, {"x": batch_sharding(mesh, 2)}), out_shardings=replicated)
    y = step(params, batch)
    assert y.sharding.is_fully_replicated
    ref = np.maximum(x.astype(np.float64) @ params["wi"], 0) @ np.asarray(params["wo"], np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)


def test_host_local_to_global_errors_on_indivisible_batch():
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    with pytest.raises(ValueError, match=r"batch\['ids'\] has 12 rows .* 8 batch shards"):
        host_local_to_global({"ids": np.zeros((12, 5), np.int32)}, mesh)
    out = host_local_to_global({"ids": np.arange(32).reshape(16, 2)}, mesh)
    np.testing.assert_array_equal(np.asarray(out["ids"]), np.arange(32).reshape(16, 2))
    assert batch_sharding(mesh, 2).spec == P(("data", "fsdp"), None)


def test_optimizer_state_follows_param_sharding():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    rules = logical_axis_rules("fsdp")
    params = {"q": jax.ShapeDtypeStruct((2, 16, 8), jnp.float32), "norm": jax.ShapeDtypeStruct((2, 16), jnp.float32)}
    axes = {"q": ("layers", "embed", "joined_kv"), "norm": ("layers", "embed")}
    p_shard = logical_to_sharding(axes, params, mesh, rules)
    opt = optax.adamw(1e-3)
    state = jax.eval_shape(opt.init, params)
    s_shard = optimizer_state_sharding(opt, state, p_shard, mesh)
    adam = s_shard[0]
    assert adam.mu["q"].spec == P(None, "fsdp", None) and adam.nu["norm"].spec == P(None, "fsdp")
    assert adam.count.spec == P()
    # The shardings are usable: the real state is created directly sharded.
    real = jax.jit(opt.init, out_shardings=s_shard)(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    )
    assert real[0].mu["q"].addressable_shards[0].data.shape == (2, 4, 8)


# ---------------------------------------------------------------- mT5-xxl memory check

XXL_LAYERS, XXL_D, XXL_FF, XXL_VOCAB = 24, 4096, 10240, 250112
XXL_AXES_SHAPES = {
    "token_embedder": (("vocab", "embed"), (XXL_VOCAB, XXL_D)),
    "relpos_bias": (("relpos_buckets", "heads"), (32, 64)),
    "final_norm": (("embed",), (XXL_D,)),
    **{f"layers/{n}": (("layers", "embed", "joined_kv"), (XXL_LAYERS, XXL_D, XXL_D)) for n in "qkv"},
    "layers/o": (("layers", "joined_kv", "embed"), (XXL_LAYERS, XXL_D, XXL_D)),
    **{f"layers/{n}": (("layers", "embed", "mlp"), (XXL_LAYERS, XXL_D, XXL_FF)) for n in ("wi_0", "wi_1")},
    "layers/wo": (("layers", "mlp", "embed"), (XXL_LAYERS, XXL_FF, XXL_D)),
    **{f"layers/{n}": (("layers", "embed"), (XXL_LAYERS, XXL_D)) for n in ("attention_norm", "mlp_norm")},
}


def fsdp_memory_report(axes, abstract, num_devices=8, preset="fsdp", mesh_cfg=None):
    """(total bytes, per-device bytes, replicated bytes) by abstract evaluation."""
    mesh = abstract_mesh(mesh_cfg or MeshConfig(data=1, fsdp=-1), num_devices)
    shardings = logical_to_sharding(axes, abstract, mesh, logical_axis_rules(preset))
    nbytes = lambda x: math.prod(x.shape) * np.dtype(x.dtype).itemsize
    total = sum(nbytes(x) for x in jax.tree.leaves(abstract))
    replicated = sum(
        nbytes(x) for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)) if s.is_fully_replicated
    )
    return total, bytes_per_device(abstract, shardings), replicated


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xxl_fsdp_over_8_devices_by_abstract_evaluation(dtype):
    axes = {k: a for k, (a, _) in XXL_AXES_SHAPES.items()}
    # eval_shape: the "init" is traced, never run, so no 13 GB are allocated.
    abstract = jax.eval_shape(lambda: {k: jnp.zeros(s, dtype) for k, (_, s) in XXL_AXES_SHAPES.items()})
    total, per_device, replicated = fsdp_memory_report(axes, abstract)
    n_params = total // np.dtype(dtype).itemsize
    print(f"\nmT5-xxl encoder, {np.dtype(dtype).name}: {n_params / 1e9:.3f} B params, {total / 2**30:.2f} GiB; "
          f"FSDP x8 per device {per_device / 2**30:.3f} GiB; replicated {replicated} bytes")
    assert 5.5e9 < n_params < 5.8e9  # mT5-xxl's encoder: ~5.7 B parameters
    assert per_device <= total / 8 + replicated
    assert replicated < 1e-3 * total
    # Independent count: every dim with "embed" (or, failing that, one divisible dim) is
    # split 8 ways, the relative bias (32 x 64) is whole on every device.
    assert replicated == 32 * 64 * np.dtype(dtype).itemsize
    assert per_device == (total - replicated) // 8 + replicated


def test_xxl_from_the_model_module_matches_the_shape_table():
    """The same check on the real model's parameter tree (abstract, via nnx.eval_shape)."""
    from flax import nnx

    from mst5_jax.core import model
    from mst5_jax.core.config import EncoderConfig

    state = nnx.state(model.abstract_model(EncoderConfig.preset("mt5-xxl")))
    axes = model.logical_axes(state)
    abstract = {model.path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}
    assert sorted(abstract[k].shape for k in abstract) == sorted(s for _, s in XXL_AXES_SHAPES.values())
    total, per_device, replicated = fsdp_memory_report(axes, abstract)
    assert per_device <= total / 8 + replicated and replicated < 1e-3 * total
    # FSDP + tensor on 8 = 4 x 2: the matrices split 8 ways; the RMS norm scales (only
    # "embed", over fsdp) 4 ways and the relative bias ("heads" over tensor) 2 ways, so
    # nothing is replicated and the excess over total/8 stays tiny.
    total, per_device, replicated = fsdp_memory_report(
        axes, abstract, preset="fsdp_tensor", mesh_cfg=MeshConfig(data=1, fsdp=4, tensor=2)
    )
    assert replicated == 0 and per_device <= 1.0001 * total / 8
