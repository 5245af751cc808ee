"""Independent references for tests: random HF PyTorch T5/mT5 encoders and their outputs.

Everything here goes through `transformers` and `torch` only, never through mst5_jax, so
tests compare the project against the PyTorch original.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional

import numpy as np


def hf_config(vocab_size=512, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2,
              feed_forward_proj="gated-gelu", num_buckets=32, max_distance=128, model_type="mt5"):
    import transformers

    cls = transformers.MT5Config if model_type == "mt5" else transformers.T5Config
    return cls(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_kv,
               num_layers=num_layers, num_decoder_layers=num_layers, feed_forward_proj=feed_forward_proj,
               relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance,
               dropout_rate=0.0, tie_word_embeddings=(model_type != "mt5"))


def random_encoder(config, seed: int = 0, norm_jitter: bool = True):
    """An `MT5EncoderModel`/`T5EncoderModel` with random weights, fp32, eval mode.

    Weights follow HF's own T5 initialisation (so activations stay in a realistic range),
    and the parts that initialisation leaves trivial are randomised too: RMS norm scales
    (1 + 0.2 N(0,1)) and the relative-position bias (0.5 N(0,1)), so that a bug in either
    cannot hide.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = transformers.MT5EncoderModel if config.model_type == "mt5" else transformers.T5EncoderModel
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and norm_jitter:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * torch.randn_like(p))
    return model


def save_hf_dir(model, out: pathlib.Path, fmt: str = "safetensors", max_shard_size: Optional[str] = None) -> pathlib.Path:
    """Writes an HF directory in one of: safetensors, sharded (safetensors index), bin."""
    import torch

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(out)
        assert (out / "model.safetensors").is_file()
    elif fmt == "sharded":
        model.save_pretrained(out, max_shard_size=max_shard_size or "20KB")
        assert (out / "model.safetensors.index.json").is_file()
    elif fmt == "bin":
        # transformers 5 writes safetensors even with safe_serialization=False.
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
        assert (out / "pytorch_model.bin").is_file()
    else:
        raise ValueError(fmt)
    return out


def hf_forward(model, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(last hidden state [B, L, D], masked-mean embedding [B, D]) from HF PyTorch, float32."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long)).last_hidden_state
        m = torch.as_tensor(mask, dtype=out.dtype)[..., None]
        pooled = (out * m).sum(1) / m.sum(1).clamp(min=1)
    return out.float().numpy(), pooled.float().numpy()


def random_ids(rng: np.random.Generator, batch: int, length: int, vocab: int, min_len: int = 1):
    """Token ids with EOS (1) at each row's end and padding (0) after; lengths vary."""
    lengths = rng.integers(min_len, length + 1, size=batch)
    lengths[0] = length  # one full row
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, n in enumerate(lengths):
        ids[i, : n - 1] = rng.integers(2, vocab, size=n - 1)
        ids[i, n - 1] = 1
        mask[i, :n] = 1
    return ids, mask


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
