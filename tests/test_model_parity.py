"""The Flax encoder equals HF PyTorch `MT5EncoderModel` / `T5EncoderModel` on random weights.

Relative error is max|a - b| / max|b| over the whole tensor (docs/PUBLIC_API.md), with HF as b.
"""
import numpy as np
import pytest

from hf_reference import hf_config, hf_forward, random_encoder, random_ids, rel_err, save_hf_dir
from mst5_jax.formats.huggingface import load_hf_weights
from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.model import relative_position_bucket

TINY_CONFIGS = {
    # odd head count, d_kv != d_model / heads
    "odd_heads": dict(d_model=30, d_ff=44, num_heads=3, d_kv=7, num_layers=2),
    # non-default buckets and max distance, sequences longer than max_distance
    "buckets": dict(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=3, num_buckets=16, max_distance=20),
    # T5 v1.0: ReLU feed-forward (wi, wo)
    "relu": dict(d_model=32, d_ff=48, num_heads=2, d_kv=16, num_layers=2, feed_forward_proj="relu", model_type="t5"),
    # one head, one layer, wide d_kv, tiny max distance
    "single_head": dict(d_model=16, d_ff=40, num_heads=1, d_kv=24, num_layers=1, num_buckets=8, max_distance=9),
}


@pytest.mark.parametrize("attention_impl", ["einsum", "dot_product"])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_configs_match_hf(name, attention_impl, tmp_path):
    hf = hf_config(vocab_size=300, **TINY_CONFIGS[name])
    torch_model = random_encoder(hf, seed=1)
    d = save_hf_dir(torch_model, tmp_path / "m")
    cfg = EncoderConfig.from_hf_json(d / "config.json", attention_impl=attention_impl)
    ours = load_hf_weights(d, cfg)
    ids, mask = random_ids(np.random.default_rng(3), batch=5, length=70, vocab=300)
    ref_hidden, ref_pooled = hf_forward(torch_model, ids, mask)
    hidden = np.asarray(ours.encoder(ids, mask))
    pooled = np.asarray(ours(ids, mask))
    err_h, err_p = rel_err(hidden, ref_hidden), rel_err(pooled, ref_pooled)
    print(f"{name} {attention_impl}: hidden rel_err={err_h:.2e} pooled rel_err={err_p:.2e}")
    assert err_h <= 1e-4 and err_p <= 1e-4


def test_relative_position_buckets_match_hf():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-700, 701)[None, :]
    for buckets, dist in ((32, 128), (16, 20), (8, 9), (64, 256), (32, 1000)):
        ref = T5Attention._relative_position_bucket(torch.as_tensor(rel), True, buckets, dist).numpy()
        ours = np.asarray(relative_position_bucket(rel, buckets, dist))
        np.testing.assert_array_equal(ours, ref)


@pytest.fixture(scope="module", params=["mt5-small", "mt5-base"])
def real_shape(request, tmp_path_factory):
    """A random HF model with the real mT5 shapes (vocab 250,112 included), saved once."""
    preset = EncoderConfig.preset(request.param)
    hf = hf_config(vocab_size=preset.vocab_size, d_model=preset.d_model, d_ff=preset.d_ff,
                   num_heads=preset.num_heads, d_kv=preset.d_kv, num_layers=preset.num_layers)
    torch_model = random_encoder(hf, seed=2)
    d = save_hf_dir(torch_model, tmp_path_factory.mktemp(request.param))
    return request.param, torch_model, d


def test_real_shapes_match_hf_fp32_and_bf16(real_shape):
    name, torch_model, d = real_shape
    ids, mask = random_ids(np.random.default_rng(0), batch=8, length=64, vocab=250_112)
    ref_hidden, ref_pooled = hf_forward(torch_model, ids, mask)

    ours = load_hf_weights(d, EncoderConfig.from_hf_json(d / "config.json"))
    hidden = np.asarray(ours.encoder(ids, mask))
    pooled = np.asarray(ours(ids, mask))
    err_h, err_p = rel_err(hidden, ref_hidden), rel_err(pooled, ref_pooled)
    print(f"{name} fp32: hidden rel_err={err_h:.2e} pooled rel_err={err_p:.2e}")
    assert err_h <= 1e-4 and err_p <= 1e-4
    del ours

    bf16 = load_hf_weights(d, EncoderConfig.from_hf_json(d / "config.json", dtype="bfloat16", param_dtype="bfloat16"))
    pooled16 = np.asarray(bf16(ids, mask), np.float64)
    cos = np.sum(pooled16 * ref_pooled, 1) / (np.linalg.norm(pooled16, axis=1) * np.linalg.norm(ref_pooled, axis=1))
    print(f"{name} bf16: min cosine to fp32 HF = {cos.min():.5f}")
    assert cos.min() >= 0.999
