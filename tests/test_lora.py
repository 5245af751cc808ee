"""mst5_jax.core.lora and mst5_jax.formats.peft against peft 0.21 on random HF PyTorch encoders.

References: `peft.PeftModel` + masked mean pooling (embeddings), peft's own trainable
parameter count, peft's `merge_and_unload` (merged kernels), the HF torch state dict
(original kernels), optax's own state (sizes), and numpy (the dropout expectation).
Every adapter has a non-zero B (`init_lora_weights=False`) so the LoRA path matters.
"""
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file as load_torch_safetensors

from hf_reference import hf_config, hf_forward, random_encoder, random_ids, rel_err, save_hf_dir
from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.lora import (
    LoRAConfig,
    LoRAError,
    apply_lora,
    dry_run,
    has_lora,
    lora_filter,
    merge,
    merged,
    split_trainable,
    training_memory,
    trainable_filter,
    unmerge,
)
from mst5_jax.formats.huggingface import load_hf_weights
from mst5_jax.formats.peft import lora_config_from_peft, load_peft_adapter, save_peft_adapter
from mst5_jax.formats.safetensors import write_safetensors
from mst5_jax.core.model import LoRAParam, count_params, logical_axes, path_str

TOL = 1e-4
ALL_GATED = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


# ---------------------------------------------------------------------- helpers
def make_base(tmp: pathlib.Path, seed=0, **hf_kw):
    """(HF config, base directory) for a random fp32 encoder."""
    config = hf_config(**hf_kw)
    save_hf_dir(random_encoder(config, seed=seed), tmp / "base")
    return config, tmp / "base"


def ours(base_dir: pathlib.Path, **overrides):
    cfg = EncoderConfig.from_hf_json(base_dir / "config.json", **overrides)
    return load_hf_weights(base_dir, cfg)


def embed(model, ids, mask) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def peft_adapter(config, seed, out: pathlib.Path, **lora_kw):
    """A peft model on the seed-0 base with random A and B (init_lora_weights=False), saved to `out`."""
    base = random_encoder(config, seed=0)
    torch.manual_seed(seed + 100)
    pm = peft.get_peft_model(base,
                             peft.LoraConfig(init_lora_weights=False, **lora_kw))
    pm.eval()
    pm.save_pretrained(out)
    return pm


def batch(vocab=512, seed=0):
    return random_ids(np.random.default_rng(seed), 4, 12, vocab, min_len=3)


# ---------------------------------------------------------------------- parity with peft
PARITY_CASES = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q", "v"]),
    "qkvo_rslora": dict(r=8, lora_alpha=16, target_modules=["q", "k", "v", "o"], use_rslora=True),
    "all_linear_patterns": dict(
        r=2, lora_alpha=4, target_modules=ALL_GATED,
        rank_pattern={"wo": 4, r"encoder\.block\.1\.layer\.0\.SelfAttention\.q": 3}, alpha_pattern={"k": 3}),
    "regex_one_layer": dict(r=4, lora_alpha=6, target_modules=r".*block\.1\..*\.(q|v|wi_1)"),
    "layers_to_transform": dict(r=3, lora_alpha=5, target_modules=["q", "wo"], layers_to_transform=[0]),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_embeddings_match_peft(tmp_path, case):
    config, base_dir = make_base(tmp_path)
    pm = peft_adapter(config, 0, tmp_path / "adapter", **PARITY_CASES[case])
    ids, mask = batch()
    _, ref = hf_forward(pm, ids, mask)
    _, base_ref = hf_forward(random_encoder(config, seed=0), ids, mask)
    assert rel_err(ref, base_ref) > 1e-2, "the adapter must change the embeddings for the test to mean anything"

    model = load_peft_adapter(ours(base_dir), tmp_path / "adapter")
    emb = embed(model, ids, mask)
    assert emb.dtype == np.float32 and emb.shape == ref.shape
    assert rel_err(emb, ref) <= TOL, case

    # The dry run counts what peft counts.
    report = dry_run(model.cfg, lora_config_from_peft(json.loads((tmp_path / "adapter/adapter_config.json").read_text())),
                     print_fn=lambda s: None)
    trainable, total = pm.get_nb_trainable_parameters()
    assert (report["trainable"], report["total"]) == (trainable, total)


def test_relu_t5_parity(tmp_path):
    config, base_dir = make_base(tmp_path, model_type="t5", feed_forward_proj="relu")
    pm = peft_adapter(config, 1, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q", "wi", "wo"],
                      use_rslora=True)
    ids, mask = batch()
    model = load_peft_adapter(ours(base_dir), tmp_path / "adapter")
    assert rel_err(embed(model, ids, mask), hf_forward(pm, ids, mask)[1]) <= TOL


def test_peft_04_bin_fixture_matches_peft_021_safetensors(tmp_path):
    """A peft-0.4-style adapter (torch.save .bin, 0.4-era keys, task_type null) loads like 0.21's."""
    config, base_dir = make_base(tmp_path)
    pm = peft_adapter(config, 2, tmp_path / "new", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q", "v"])
    old = tmp_path / "old"
    old.mkdir()
    tensors = load_torch_safetensors(str(tmp_path / "new/adapter_model.safetensors"))
    torch.save({k: v.float().contiguous() for k, v in tensors.items()}, old / "adapter_model.bin")
    (old / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "google/mt5-xxl", "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": 16, "lora_dropout": 0.1, "modules_to_save": None, "peft_type": "LORA", "r": 8,
        "revision": None, "target_modules": ["q", "v"], "task_type": None}))
    ids, mask = batch()
    from_new = embed(load_peft_adapter(ours(base_dir), tmp_path / "new"), ids, mask)
    from_old = embed(load_peft_adapter(ours(base_dir), old), ids, mask)
    np.testing.assert_array_equal(from_old, from_new)
    ref = hf_forward(pm, ids, mask)[1]
    assert rel_err(from_old, ref) <= TOL
    # peft itself reads the fixture the same way.
    pm_old = peft.PeftModel.from_pretrained(random_encoder(config, seed=0), str(old)).eval()
    assert rel_err(hf_forward(pm_old, ids, mask)[1], ref) <= 1e-6


# ---------------------------------------------------------------------- train, export, reload
ROUND_TRIPS = {
    "patterns": LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "wo"),
                           rank_pattern={"wo": 2, r"encoder\.block\.0\.layer\.0\.SelfAttention\.q": 3},
                           alpha_pattern={"v": 5.0}),
    "layer_subset_rslora": LoRAConfig(rank=4, alpha=6.0, targets=("k", "wi_1"), layers=(1,), use_rslora=True),
    "mixed_layers": LoRAConfig(rank=2, alpha=2.0, targets=r"encoder\.block\.(0\.layer\.0\.SelfAttention\.q|1\.layer\.1\.DenseReluDense\.wo)"),
}


def sgd_train(model, ids, mask, steps=3, lr=0.5, seed=0):
    """A few plain SGD steps on the LoRA factors of a regression-to-random-target loss."""
    graphdef, trainable, frozen = split_trainable(model, "lora")
    target = jax.random.normal(jax.random.key(seed), (ids.shape[0], model.cfg.d_model))

    def loss(t):
        emb = nnx.merge(graphdef, t, frozen)(ids, mask)
        return jnp.mean((emb - target) ** 2)

    grad = jax.jit(jax.grad(loss))
    for _ in range(steps):
        trainable = jax.tree.map(lambda p, g: p - lr * g, trainable, grad(trainable))
    return nnx.merge(graphdef, trainable, frozen)


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_train_export_peft_reload(tmp_path, name):
    lcfg = ROUND_TRIPS[name]
    config, base_dir = make_base(tmp_path)
    ids, mask = batch()
    model = apply_lora(ours(base_dir), lcfg, rngs_or_seed=3)
    base_emb = embed(model, ids, mask)  # B = 0 at init: the base embeddings
    trained = sgd_train(model, jnp.asarray(ids), jnp.asarray(mask))
    emb = embed(trained, ids, mask)
    assert rel_err(emb, base_emb) > 1e-3, "training must move the embeddings"

    out = save_peft_adapter(trained, tmp_path / "export", base_model_name_or_path=str(base_dir))
    pm = peft.PeftModel.from_pretrained(random_encoder(config, seed=0), str(out)).eval()
    ref = hf_forward(pm, ids, mask)[1]
    assert rel_err(emb, ref) <= TOL
    # peft sees exactly the per-layer ranks and scalings that were configured.
    for mod_name, mod in pm.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in mod.r:
            i = int(re.search(r"block\.(\d+)\.", mod_name).group(1))
            path = {"SelfAttention": "attention", "DenseReluDense": "mlp"}[mod_name.split(".")[-2]]
            lin = getattr(getattr(trained.encoder.layers, path), mod_name.split(".")[-1])
            assert lin.lora_a.get_metadata()["lora_ranks"][i] == mod.r["default"]
            np.testing.assert_allclose(float(lin.lora_scale[...][i]), mod.scaling["default"], rtol=1e-6)

    reloaded = load_peft_adapter(ours(base_dir), out)
    assert rel_err(embed(reloaded, ids, mask), ref) <= TOL
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(trained, LoRAParam)),
                                  nnx.to_flat_state(nnx.state(reloaded, LoRAParam))):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(v1.get_value()), np.asarray(v2.get_value()))


# ---------------------------------------------------------------------- frozen base, optimizer state
def _padding_is_zero(model) -> int:
    """Checks rank padding / absent layers are exactly zero; returns how many entries were checked."""
    checked = 0
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        value = np.asarray(var.get_value())
        ranks = var.get_metadata()["lora_ranks"]
        for i, r in enumerate(ranks):
            pad = value[i, :, r:] if path[-1] == "lora_a" else value[i, r:, :]
            assert not pad.any(), f"{path_str(path)} layer {i}: padding beyond rank {r} is not zero"
            checked += pad.size
    return checked


def test_adamw_lora_only_bf16_base(tmp_path):
    config, base_dir = make_base(tmp_path)
    model = apply_lora(ours(base_dir, param_dtype="bfloat16"),
                       LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "wo"), rank_pattern={"wo": 2}, layers=(1,)),
                       rngs_or_seed=0)
    graphdef, trainable, frozen = split_trainable(model, "lora")
    frozen_before = jax.tree.map(lambda x: np.array(x), frozen)
    # Dtypes: bf16 frozen kernels, fp32 factors.
    for path, var in nnx.to_flat_state(frozen):
        if path[-1] == "kernel":
            assert var.get_value().dtype == jnp.bfloat16, path
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(trainable))

    ids, mask = (jnp.asarray(x) for x in batch())
    target = jax.random.normal(jax.random.key(1), (ids.shape[0], model.cfg.d_model))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(t, s):
        g = jax.grad(lambda t: jnp.mean((nnx.merge(graphdef, t, frozen)(ids, mask) - target) ** 2))(t)
        updates, s = tx.update(g, s, t)
        return optax.apply_updates(t, updates), s

    for _ in range(3):
        trainable, opt_state = step(trainable, opt_state)

    # Frozen base bit-identical.
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), np.asarray(b).view(np.uint8))
    # Optimizer state is LoRA-sized: mu and nu of A [L, d, r_max] and B [L, r_max, d] for q, v, wo, plus the count.
    d, d_ff, num_layers = 32, 64, 2
    lora_count = num_layers * (4 * (d + d) * 2 + 2 * (d_ff + d))
    assert count_params(trainable) == lora_count
    opt_floats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert opt_floats == 2 * lora_count
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    base_count = count_params(nnx.state(model, nnx.Param)) - lora_count
    assert opt_floats < base_count / 5
    # Layer 0 has no adapter and "wo" is padded from 4 to 2: both stay exactly zero under AdamW.
    trained = nnx.merge(graphdef, trainable, frozen)
    assert _padding_is_zero(trained) > 0
    assert np.abs(np.asarray(trained.encoder.layers.attention.q.lora_b[...][1])).max() > 0


def test_full_mode_and_filters(tmp_path):
    _, base_dir = make_base(tmp_path)
    model = ours(base_dir)
    with pytest.raises(LoRAError, match="nothing is trainable"):
        split_trainable(model, "lora")
    apply_lora(model, LoRAConfig(rank=2, targets=("q",)))
    _, lora, rest = split_trainable(model, "lora")
    _, full, rest_full = split_trainable(model, "full")
    n_lora = count_params(lora)
    assert n_lora == 2 * 2 * (32 + 32)
    assert count_params(full) == count_params(nnx.state(model, nnx.Param))
    assert count_params(full) == n_lora + sum(v.numel() for v in random_encoder(hf_config()).parameters())
    assert {path_str(p) for p, _ in nnx.to_flat_state(rest_full)} == {"encoder/layers/attention/q/lora_scale"}
    assert trainable_filter("lora") is lora_filter
    with pytest.raises(LoRAError, match="train mode"):
        trainable_filter("frozen")
    axes = logical_axes(lora)
    assert axes["encoder/layers/attention/q/lora_a"] == ("layers", "embed", "lora_rank")
    assert axes["encoder/layers/attention/q/lora_b"] == ("layers", "lora_rank", "joined_kv")


def test_peft_init_distribution(tmp_path):
    """init="peft": A ~ U(-1/sqrt(in), 1/sqrt(in)) like peft's kaiming_uniform_(a=sqrt(5)), B = 0."""
    config, base_dir = make_base(tmp_path)
    model = apply_lora(ours(base_dir), LoRAConfig(rank=8, targets=("wo",)), rngs_or_seed=0)
    a = np.asarray(model.encoder.layers.mlp.wo.lora_a[...])
    assert not np.asarray(model.encoder.layers.mlp.wo.lora_b[...]).any()
    torch.manual_seed(0)
    pm = peft.get_peft_model(random_encoder(config), peft.LoraConfig(r=8, target_modules=["wo"]))
    ref = torch.cat([m.lora_A["default"].weight.detach().flatten() for n, m in pm.named_modules()
                     if n.endswith("DenseReluDense.wo")]).numpy()
    assert np.abs(a).max() <= np.abs(ref).max() * 1.001 + 1e-7 and np.abs(a).max() > 0.95 / np.sqrt(64)
    np.testing.assert_allclose(a.std(), ref.std(), rtol=0.1)


# ---------------------------------------------------------------------- merge / unmerge
def test_merge_unmerge_fp32_against_peft(tmp_path):
    config, base_dir = make_base(tmp_path)
    pm = peft_adapter(config, 4, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_GATED,
                      rank_pattern={"wo": 2})
    model = load_peft_adapter(ours(base_dir), tmp_path / "adapter")
    ids, mask = batch()
    before = embed(model, ids, mask)
    merge(model)
    assert model.encoder.layers.attention.q.lora_a is None
    assert rel_err(embed(model, ids, mask), before) <= 1e-5
    # A merged model exports as a plain HF encoder that transformers loads with peft's embeddings.
    import transformers
    from mst5_jax.formats.huggingface import save_hf
    exported = transformers.MT5EncoderModel.from_pretrained(save_hf(model, tmp_path / "merged")).eval()
    assert rel_err(hf_forward(exported, ids, mask)[1], hf_forward(pm, ids, mask)[1]) <= TOL
    merged_ref = pm.merge_and_unload().state_dict()
    base_ref = random_encoder(config, seed=0).state_dict()
    for i in range(2):
        for name, lin in [("layer.0.SelfAttention.q", model.encoder.layers.attention.q),
                          ("layer.1.DenseReluDense.wo", model.encoder.layers.mlp.wo)]:
            want = merged_ref[f"encoder.block.{i}.{name}.weight"].numpy().T
            assert rel_err(np.asarray(lin.kernel[...][i]), want) <= 1e-6
    unmerge(model)
    for i in range(2):
        for name, lin in [("layer.0.SelfAttention.q", model.encoder.layers.attention.q),
                          ("layer.1.DenseReluDense.wi_1", model.encoder.layers.mlp.wi_1)]:
            assert rel_err(np.asarray(lin.kernel[...][i]), base_ref[f"encoder.block.{i}.{name}.weight"].numpy().T) <= 1e-6
    fresh = peft.PeftModel.from_pretrained(random_encoder(config, seed=0), str(tmp_path / "adapter")).eval()
    assert rel_err(embed(model, ids, mask), hf_forward(fresh, ids, mask)[1]) <= TOL
    with pytest.raises(LoRAError, match="no merged"):
        unmerge(model)


def _bits(model) -> dict:
    """Every variable's raw bytes (uint8 view), so a comparison is bit-for-bit, -0.0 and NaN included."""
    return {p: np.asarray(v.get_value()).view(np.uint8).copy() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_merged_context_against_peft_and_restores_every_bit(tmp_path, param_dtype):
    config, base_dir = make_base(tmp_path)
    pm = peft_adapter(config, 6, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q", "v", "wo"])
    model = load_peft_adapter(ours(base_dir, param_dtype=param_dtype), tmp_path / "adapter")
    graphdef, before = nnx.split(model)[0], _bits(model)
    ids, mask = batch()
    emb = embed(model, ids, mask)
    merged_ref = pm.merge_and_unload().state_dict()
    tol = 1e-6 if param_dtype == "float32" else 1e-2  # bf16 keeps 8 mantissa bits
    with merged(model) as m:
        assert m is model and not has_lora(model)
        for i in range(2):
            want = merged_ref[f"encoder.block.{i}.layer.0.SelfAttention.q.weight"].numpy().T
            got = np.asarray(model.encoder.layers.attention.q.kernel[...][i], np.float32)
            assert rel_err(got, want) <= tol
    assert has_lora(model) and nnx.split(model)[0] == graphdef
    after = _bits(model)
    assert after.keys() == before.keys()
    for p in before:
        np.testing.assert_array_equal(after[p], before[p], err_msg=path_str(p))
    np.testing.assert_array_equal(embed(model, ids, mask), emb)
    with pytest.raises(RuntimeError, match="boom"):  # an error inside the block restores too
        with merged(model):
            raise RuntimeError("boom")
    assert has_lora(model) and all(np.array_equal(v, before[p]) for p, v in _bits(model).items())


def test_merged_without_lora_is_a_no_op(tmp_path):
    _, base_dir = make_base(tmp_path)
    model = ours(base_dir)
    before = _bits(model)
    with merged(model) as m:
        assert m is model and not has_lora(model)
    assert all(np.array_equal(v, before[p]) for p, v in _bits(model).items())


def test_merge_unmerge_bf16_restores_original(tmp_path):
    config, base_dir = make_base(tmp_path)
    peft_adapter(config, 5, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q", "v", "wo"])
    model = load_peft_adapter(ours(base_dir, param_dtype="bfloat16"), tmp_path / "adapter")
    originals = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                 if p[-1] == "kernel"}
    merge(model)
    changed = [p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if p[-1] == "kernel" and not np.array_equal(np.asarray(v.get_value()), originals[p])]
    assert len(changed) == 3
    with pytest.raises(LoRAError, match="merged"):
        save_peft_adapter(model, tmp_path / "nope")
    unmerge(model)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if p[-1] == "kernel":
            assert v.get_value().dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(v.get_value()).view(np.uint16), originals[p].view(np.uint16))


def test_lora_dropout_acts_on_input_of_a_only():
    """E[y] over dropout masks equals x W + x A B s (numpy), and B = 0 leaves x W exactly."""
    from mst5_jax.core.model import Linear, LoRAScale
    cfg = EncoderConfig(vocab_size=16, d_model=8, d_ff=8, num_heads=2, d_kv=4, num_layers=1)
    lin = Linear(8, 6, ("embed", "mlp"), cfg, 0.3, nnx.Rngs(params=0))
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 8)).astype(np.float32), np.asarray(lin.kernel[...])
    a, b = rng.normal(size=(8, 2)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
    lin.lora_a, lin.lora_b = LoRAParam(jnp.zeros((8, 2))), LoRAParam(jnp.zeros((2, 6)))
    lin.lora_scale, lin.lora_dropout = LoRAScale(jnp.asarray(1.5)), 0.5
    np.testing.assert_array_equal(np.asarray(lin(jnp.asarray(x), jax.random.key(0))),
                                  np.asarray(lin(jnp.asarray(x))))
    lin.lora_a[...], lin.lora_b[...] = jnp.asarray(a), jnp.asarray(b)
    graphdef, state = nnx.split(lin)
    ys = jax.vmap(lambda k: nnx.merge(graphdef, state)(jnp.asarray(x), k))(jax.random.split(jax.random.key(1), 4000))
    want = x.astype(np.float64) @ w + 1.5 * (x.astype(np.float64) @ a @ b)
    assert rel_err(np.asarray(ys).mean(0), want) < 0.05
    assert np.asarray(ys).std(0).max() > 0.1  # the masks differ between keys


# ---------------------------------------------------------------------- refusals
def _adapter_with(tmp_path, **config_changes):
    config, base_dir = make_base(tmp_path)
    peft_adapter(config, 6, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q", "v"])
    p = tmp_path / "adapter/adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(config_changes)
    p.write_text(json.dumps(cfg))
    return base_dir, tmp_path / "adapter"


@pytest.mark.parametrize("key,value", [
    ("use_dora", True), ("lora_bias", True), ("bias", "all"), ("modules_to_save", ["pooler"]),
    ("trainable_token_indices", [3]), ("target_parameters", ["encoder.x.weight"]),
    ("layer_replication", [[0, 1]]), ("layers_pattern", "layers"), ("some_future_math_key", 0.5)])
def test_refused_config_keys_are_named(tmp_path, key, value):
    base_dir, adapter = _adapter_with(tmp_path, **{key: value})
    with pytest.raises(LoRAError, match=re.escape(key)):
        load_peft_adapter(ours(base_dir), adapter)


def test_ignored_keys_and_defaults_load(tmp_path):
    base_dir, adapter = _adapter_with(tmp_path, task_type="FEATURE_EXTRACTION", init_lora_weights="gaussian",
                                      inference_mode=False, revision="v2", runtime_config={"ephemeral": True},
                                      auto_mapping={"base_model_class": "X"}, some_future_flag=None,
                                      another_future_list=[])
    model = load_peft_adapter(ours(base_dir), adapter)
    assert model.encoder.layers.attention.v.lora_a is not None


def test_decoder_adapter_refused_with_count(tmp_path):
    import transformers
    config = hf_config()
    torch.manual_seed(0)
    full = transformers.MT5Model(config).eval()
    pm = peft.get_peft_model(full, peft.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    keys = load_torch_safetensors(str(tmp_path / "adapter/adapter_model.safetensors")).keys()
    n_decoder = sum(k.startswith("base_model.model.decoder.") for k in keys)
    assert n_decoder == 2 * 4 * 2  # 2 layers x (self-attention q, v; cross-attention q, v) x (A, B)
    _, base_dir = make_base(tmp_path)
    with pytest.raises(LoRAError, match=rf"\b{n_decoder} adapter tensors target the decoder"):
        load_peft_adapter(ours(base_dir), tmp_path / "adapter")


def test_unexpected_missing_and_misshapen_tensors_are_named(tmp_path):
    base_dir, adapter = _adapter_with(tmp_path)
    st = adapter / "adapter_model.safetensors"
    tensors = {k: v.numpy() for k, v in load_torch_safetensors(str(st)).items()}
    extra = "base_model.model.encoder.block.0.layer.0.SelfAttention.k.lora_A.weight"
    write_safetensors(st, iter({**tensors, extra: np.zeros((2, 32), np.float32)}.items()))
    with pytest.raises(LoRAError, match=re.escape(extra)):
        load_peft_adapter(ours(base_dir), adapter)
    gone = "base_model.model.encoder.block.1.layer.0.SelfAttention.v.lora_B.weight"
    write_safetensors(st, iter({k: v for k, v in tensors.items() if k != gone}.items()))
    with pytest.raises(LoRAError, match=re.escape(gone)):
        load_peft_adapter(ours(base_dir), adapter)
    bad = "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"
    write_safetensors(st, iter({**tensors, bad: np.zeros((3, 32), np.float32)}.items()))
    with pytest.raises(LoRAError, match=re.escape(bad) + r".*\(3, 32\), expected \(2, 32\)"):
        load_peft_adapter(ours(base_dir), adapter)


def test_filter_matching_nothing_is_an_error(tmp_path):
    cfg = EncoderConfig.preset("tiny")
    for lcfg in (LoRAConfig(targets=("query", "value")), LoRAConfig(targets=r"encoder\.block\.9\..*")):
        with pytest.raises(LoRAError, match="match no Linear"):
            dry_run(cfg, lcfg, print_fn=lambda s: None)
    with pytest.raises(LoRAError, match="outside"):
        dry_run(cfg, LoRAConfig(targets=("q",), layers=(5,)), print_fn=lambda s: None)
    base_dir, adapter = _adapter_with(tmp_path, target_modules=["query"])
    with pytest.raises(LoRAError, match="match no Linear"):
        load_peft_adapter(ours(base_dir), adapter)


# ---------------------------------------------------------------------- dry run, memory, gin
def test_dry_run_output():
    lines = []
    report = dry_run(EncoderConfig.preset("tiny"), LoRAConfig(rank=4, targets=("q", "wo"), rank_pattern={"wo": 2},
                                                              layers=(1,)), print_fn=lines.append)
    text = "\n".join(lines)
    assert "encoder/layers/attention/q/lora_a [2, 64, 4]" in text and "encoder/layers/mlp/wo" in text
    assert report["trainable"] == 4 * (64 + 64) + 2 * (128 + 64)
    assert "trainable%" in text and f"{report['trainable']:,}" in text


def test_memory_at_xxl_bf16_base_r8_qv():
    cfg = EncoderConfig.preset("mt5-xxl")
    mem = training_memory(cfg, LoRAConfig(rank=8, alpha=16, targets=("q", "v")))
    assert mem["base_params"] == cfg.num_params()
    assert mem["lora_params"] == 24 * 2 * 8 * (4096 + 4096)
    assert mem["base_bytes"] == 2 * cfg.num_params()
    assert mem["optimizer_bytes"] == 2 * 4 * mem["lora_params"]
    assert mem["total_bytes"] == 2 * cfg.num_params() + 16 * mem["lora_params"]


def test_gin_configurable_and_core_imports_without_gin():
    import gin

    from mst5_jax.training import gin_utils

    gin_utils.register_gin()  # the one place gin registrations live
    gin.clear_config()

    @gin.configurable
    def _lora_holder(lora=gin.REQUIRED):
        return lora

    try:
        gin.parse_config("_lora_holder.lora = @LoRAConfig()\nLoRAConfig.rank = 4\nLoRAConfig.targets = ['q', 'k']")
        got = _lora_holder()
        assert isinstance(got, LoRAConfig) and got.rank == 4 and list(got.targets) == ["q", "k"]
    finally:
        gin.clear_config()
    code = ("import sys; sys.modules['gin'] = None; sys.modules['torch'] = None; "
            "import mst5_jax.core.lora as l; print(l.LoRAConfig().rank)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "8", out.stderr[-2000:]
