"""HF checkpoint import/export: formats, round trip through transformers, bounded memory, errors."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hf_reference import hf_config, hf_forward, random_encoder, random_ids, rel_err, save_hf_dir
from mst5_jax.formats import huggingface
from mst5_jax.formats.huggingface import CheckpointError, load_hf_weights, save_hf
from mst5_jax.formats.safetensors import write_safetensors
from mst5_jax.core.config import EncoderConfig


@pytest.fixture(scope="module")
def torch_model():
    return random_encoder(hf_config(vocab_size=300, d_model=32, d_ff=48, num_heads=4, d_kv=8, num_layers=2), seed=5)


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_round_trip_through_transformers(fmt, torch_model, tmp_path):
    import transformers

    src = save_hf_dir(torch_model, tmp_path / "src", fmt)
    ours = load_hf_weights(src, EncoderConfig.from_hf_json(src / "config.json"))
    out = save_hf(ours, tmp_path / "out")
    reloaded = transformers.MT5EncoderModel.from_pretrained(out).float().eval()
    ids, mask = random_ids(np.random.default_rng(1), 4, 24, 300)
    ref_h, _ = hf_forward(torch_model, ids, mask)
    again_h, _ = hf_forward(reloaded, ids, mask)
    np.testing.assert_array_equal(again_h, ref_h)  # the exported weights are bit-identical
    ours_again = load_hf_weights(out, EncoderConfig.from_hf_json(out / "config.json"))
    assert rel_err(np.asarray(ours_again.encoder(ids, mask)), ref_h) <= 1e-4


def test_decoder_tensors_are_skipped_and_counted(tmp_path, caplog):
    import transformers

    full = transformers.MT5Model(hf_config(vocab_size=300, d_model=32, d_ff=48, num_heads=4, d_kv=8, num_layers=2))
    full.save_pretrained(tmp_path / "full")
    import logging

    with caplog.at_level(logging.INFO, logger="mst5_jax.formats.huggingface"):
        load_hf_weights(tmp_path / "full", EncoderConfig.from_hf_json(tmp_path / "full" / "config.json"))
    from safetensors import safe_open

    with safe_open(tmp_path / "full" / "model.safetensors", "np") as f:
        n_dec = sum(1 for k in f.keys() if k.startswith(("decoder.", "lm_head.")))
    assert f"skipped {n_dec} decoder/lm_head tensors" in caplog.text


def test_errors_name_the_problem(torch_model, tmp_path):
    d = save_hf_dir(torch_model, tmp_path / "m")
    cfg = EncoderConfig.from_hf_json(d / "config.json")
    with pytest.raises(CheckpointError, match=r"tensor encoder.block.0.layer.0.SelfAttention.[qkvo].weight has shape \(32, 32\), expected \(48, 32\)"):
        load_hf_weights(d, cfg.replace(num_heads=6))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_hf_weights(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="no such directory"):
        huggingface.resolve_model_dir(str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"shared.weight": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="must be a plain file name"):
        huggingface.weight_files(tmp_path / "bad")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        huggingface.weight_files(tmp_path / "trunc") and huggingface.TensorSource(tmp_path / "trunc")


def test_missing_tensor_is_named(torch_model, tmp_path):
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items() if "block.1.layer.1.DenseReluDense.wo" not in k}
    (tmp_path / "m").mkdir()
    write_safetensors(tmp_path / "m" / "model.safetensors", iter(sd.items()))
    torch_model.config.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"tensor encoder.block.1.layer.1.DenseReluDense.wo.weight is missing"):
        load_hf_weights(tmp_path / "m", EncoderConfig.from_hf_json(tmp_path / "m" / "config.json"))


# ------------------------------------------------------------------------- bounded memory
_MEASURE = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    from mst5_jax.formats.huggingface import load_hf_weights
    from mst5_jax.core.config import EncoderConfig
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    d = sys.argv[1]
    cfg = EncoderConfig.from_hf_json(os.path.join(d, "config.json"), dtype="bfloat16", param_dtype="bfloat16")
    # Runtime start-up is not the import's memory: start XLA's CPU client (thread pools,
    # allocator) and import torch (read .bin files) before the baseline.
    jax.block_until_ready(jax.device_put(np.zeros(1024, np.float32)))
    import torch
    # Reset the high-water mark: after fork+exec it still holds the parent's (pytest's) RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    model = load_hf_weights(d, cfg)
    jax.block_until_ready(jax.tree.leaves(model))
    print(json.dumps({"growth": status("VmHWM") - before}))
""")


@pytest.fixture(scope="module")
def base_shaped_checkpoints(tmp_path_factory):
    """A synthetic mt5-base-shaped fp32 checkpoint in safetensors, sharded and .bin form."""
    import torch

    cfg = EncoderConfig.preset("mt5-base")
    root = tmp_path_factory.mktemp("base_ckpt")
    rng = np.random.default_rng(0)
    tensors = {}
    for name, entries in huggingface.hf_names(cfg).items():
        for tname, transpose in entries:
            if name.endswith("embedding") and "token" in name:
                shape = (cfg.vocab_size, cfg.d_model)
            elif name.endswith("relpos_bias/embedding"):
                shape = (cfg.relative_attention_num_buckets, cfg.num_heads)
            elif name.endswith("scale"):
                shape = (cfg.d_model,)
            elif "/o/" in name or "/wo/" in name:
                shape = (cfg.d_model, cfg.inner_dim if "/o/" in name else cfg.d_ff)
            else:
                shape = (cfg.inner_dim if "attention" in name else cfg.d_ff, cfg.d_model)
            tensors[tname] = rng.standard_normal(shape, dtype=np.float32) if np.prod(shape) < 1e6 else np.full(shape, 0.01, np.float32)
    hf = cfg.to_hf_dict()
    dirs = {}
    for fmt in ("safetensors", "sharded", "bin"):
        d = root / fmt
        d.mkdir()
        (d / "config.json").write_text(json.dumps(hf))
        if fmt == "safetensors":
            write_safetensors(d / "model.safetensors", iter(tensors.items()))
        elif fmt == "sharded":
            names = list(tensors)
            shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                      "model-00002-of-00002.safetensors": names[len(names) // 2:]}
            for fname, keys in shards.items():
                write_safetensors(d / fname, ((k, tensors[k]) for k in keys))
            (d / "model.safetensors.index.json").write_text(json.dumps(
                {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
        else:
            torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, d / "pytorch_model.bin")
            assert (d / "pytorch_model.bin").is_file()
        dirs[fmt] = d
    largest_tensor = max(v.nbytes for v in tensors.values())
    return cfg, dirs, largest_tensor


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_import_memory_is_bounded(fmt, base_shaped_checkpoints):
    cfg, dirs, largest_tensor = base_shaped_checkpoints
    d = dirs[fmt]
    largest_file = max(f.stat().st_size for f in d.iterdir() if f.suffix in (".safetensors", ".bin"))
    bound = cfg.num_params() * 2 + largest_file + largest_tensor + 256 * 2**20
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(d)], capture_output=True, text=True, env=env, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    print(f"{fmt}: peak RSS growth {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
    assert growth < bound


def test_sharded_import_transposes_shard_locally(torch_model, tmp_path):
    """Kernels placed with a sharding come out equal to the unsharded import, with that sharding."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mst5_jax.core.model import path_str

    d = save_hf_dir(torch_model, tmp_path / "m")
    cfg = EncoderConfig.from_hf_json(d / "config.json")
    plain = load_hf_weights(d, cfg)
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
    # Stacked kernels [layer, in, out]: both matrix axes sharded, so the swap must move the spec too.
    shardings = {n: NamedSharding(mesh, P(None, "data", "model")) for n, v in flat.items() if v.ndim == 3}
    shardings["encoder/token_embedder/embedding"] = NamedSharding(mesh, P("data"))
    sharded = load_hf_weights(d, cfg, shardings=shardings)
    got = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
    assert got.keys() == flat.keys()
    for name, value in got.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[name]), err_msg=name)
        if name in shardings:
            assert value.sharding == shardings[name], name
    assert any(n.endswith("/kernel") for n in shardings)
