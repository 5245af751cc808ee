"""Model configuration: one frozen dataclass for every T5-family encoder size.

`EncoderConfig` describes the encoder (architecture, dtype policy, pooling). It is built
from a named preset (`EncoderConfig.preset("mt5-xxl")`) or from a Hugging Face
`config.json` (`EncoderConfig.from_hf_dict`), and turns back into one (`to_hf_dict`), so
imported checkpoints and exported directories agree on every field.

Families:
- mT5 and T5 v1.1: gated-GELU feed-forward (`wi_0`, `wi_1`, `wo`), untied embeddings.
- T5 v1.0 (t5-small ... t5-11b, and the released sentence-t5-* checkpoints): ReLU
  feed-forward (`wi`, `wo`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal, Optional

FeedForward = Literal["gated-gelu", "relu", "gated-relu", "gelu"]
Pooling = Literal["mean", "first", "max"]

MT5_VOCAB = 250_112
T5_VOCAB = 32_128


class ConfigError(ValueError):
    """A `config.json` that cannot describe a T5-family encoder; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture and numerics of a T5-family encoder.

    Attributes:
      vocab_size: rows of the input embedding table.
      d_model: width of the residual stream.
      d_ff: hidden width of the feed-forward block.
      num_heads: attention heads.
      d_kv: width of one head; need not equal d_model / num_heads.
      num_layers: encoder blocks.
      feed_forward: "gated-gelu" (mT5, T5 v1.1) or "relu" (T5 v1.0).
      relative_attention_num_buckets / relative_attention_max_distance: the T5 relative
        position bias, bidirectional.
      layer_norm_epsilon: RMS norm epsilon.
      dropout_rate: dropout on embeddings, sublayer outputs, attention weights and the
        feed-forward hidden state (HF T5 semantics). 0 disables it.
      dtype: compute dtype ("float32" or "bfloat16").
      param_dtype: storage dtype of the (frozen) weights.
      scan_layers: always True in this project; kept explicit because parameter paths
        depend on it (see `mst5_jax.core.model`).
      remat: "none", "full", "dots" (save matmul outputs) or "residual" (save only the
        per-layer residual stream).
      pooling: sentence pooling over the last hidden state ("mean" includes EOS).
      projection_dim: optional bias-free Dense after pooling (sentence-t5), None for m-ST5.
      normalize: L2-normalise the sentence embedding (sentence-t5), False for m-ST5.
      pad_token_id / eos_token_id: token conventions of the T5 vocabularies.
      attention_impl: "einsum" (explicit logits, bias and softmax), "dot_product"
        (`jax.nn.dot_product_attention`, XLA's choice of kernel) or "cudnn" (its cuDNN
        flash kernel, GPU only, bf16). All compute the same function; see
        benchmarks/attention_bench.py for the measured speeds. Training with dropout always
        uses "einsum" (the fused kernels have no attention-weight dropout).
    """

    vocab_size: int = MT5_VOCAB
    d_model: int = 512
    d_ff: int = 1024
    num_heads: int = 6
    d_kv: int = 64
    num_layers: int = 8
    feed_forward: FeedForward = "gated-gelu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    pooling: Pooling = "mean"
    projection_dim: Optional[int] = None
    normalize: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    name: str = "custom"
    attention_impl: str = "einsum"

    def __post_init__(self):
        if self.attention_impl not in ("einsum", "dot_product", "cudnn"):
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected einsum, dot_product or cudnn")
        if self.feed_forward not in ("gated-gelu", "relu", "gated-relu", "gelu"):
            raise ValueError(f"feed_forward={self.feed_forward!r}: expected gated-gelu, relu, gated-relu or gelu")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: expected float32 or bfloat16 (T5 overflows in float16)")
        if self.param_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"param_dtype={self.param_dtype!r}: expected float32 or bfloat16")
        if self.remat not in ("none", "full", "dots", "residual"):
            raise ValueError(f"remat={self.remat!r}: expected none, full, dots or residual")
        if self.pooling not in ("mean", "first", "max"):
            raise ValueError(f"pooling={self.pooling!r}: expected mean, first or max")
        if not self.scan_layers:
            raise ValueError("scan_layers=False is not supported: layers are always scanned (stacked layer axis)")
        for f in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f}={getattr(self, f)} must be positive")

    # ------------------------------------------------------------------ derived sizes
    @property
    def gated(self) -> bool:
        return self.feed_forward.startswith("gated")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def embedding_dim(self) -> int:
        """Width of the sentence embedding."""
        return self.projection_dim or self.d_model

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact encoder parameter count (the projection is not counted)."""
        attn = 4 * self.d_model * self.inner_dim
        ffn = (3 if self.gated else 2) * self.d_model * self.d_ff
        per_layer = attn + ffn + 2 * self.d_model
        total = self.num_layers * per_layer + self.d_model  # + final norm
        total += self.relative_attention_num_buckets * self.num_heads
        if include_embedding:
            total += self.vocab_size * self.d_model
        return total

    def replace(self, **changes: Any) -> "EncoderConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "EncoderConfig":
        """A named size: mt5-{small,base,large,xl,xxl}, t5-v1_1-*, t5-{small,...,11b}, tiny."""
        key = name.split("/")[-1].lower()
        if key not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key], name=key, **overrides)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json", **overrides: Any) -> "EncoderConfig":
        """Reads a transformers T5/MT5 `config.json` dict; refuses other architectures.

        Every key this reads is type-checked first; an error names `source` and the key,
        e.g. `config.json: "d_model" is "32" (str); expected a positive integer`.
        """
        _check_hf_types(hf, source)
        model_type = hf.get("model_type")
        if model_type not in ("t5", "mt5", "umt5"):
            raise ConfigError(f"{source}: model_type={model_type!r} is not a T5-family encoder (expected t5 or mt5)")
        if model_type == "umt5":
            raise ConfigError(f"{source}: umT5 has a per-layer position bias, which this encoder does not implement")
        missing = [k for k in ("d_model", "d_ff", "num_heads", "d_kv", "num_layers", "vocab_size") if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing keys {missing}")
        ff = hf.get("feed_forward_proj", "relu")
        act = ff.split("-")[-1]
        if act not in ("relu", "gelu"):
            raise ConfigError(f"{source}: feed_forward_proj={ff!r} is not supported (relu, gated-gelu)")
        kw = dict(
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            d_ff=hf["d_ff"],
            num_heads=hf["num_heads"],
            d_kv=hf["d_kv"],
            num_layers=hf["num_layers"],
            feed_forward=ff,
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
            eos_token_id=hf.get("eos_token_id", 1) if hf.get("eos_token_id") is not None else 1,
            name=hf.get("_name_or_path", "custom") or "custom",
        )
        mst5 = hf.get("mst5_jax", {})
        for k in ("pooling", "projection_dim", "normalize"):
            if k in mst5:
                kw[k] = mst5[k]
        kw.update(overrides)
        try:
            return cls(**kw)
        except ValueError as e:  # a value of the right type but out of range, e.g. pooling="avg"
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike, **overrides: Any) -> "EncoderConfig":
        with open(path, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(hf, source=str(path), **overrides)

    def to_hf_dict(self) -> dict:
        """A transformers `config.json` for `MT5EncoderModel` / `T5EncoderModel`."""
        is_mt5 = self.vocab_size == MT5_VOCAB or self.gated
        return {
            "architectures": ["MT5EncoderModel" if is_mt5 else "T5EncoderModel"],
            "model_type": "mt5" if is_mt5 else "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "d_kv": self.d_kv,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_layers,
            "feed_forward_proj": self.feed_forward,
            "dense_act_fn": "gelu_new" if "gelu" in self.feed_forward else "relu",
            "is_gated_act": self.gated,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout_rate": self.dropout_rate,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.pad_token_id,
            "tie_word_embeddings": not is_mt5,
            "is_encoder_decoder": True,
            "use_cache": False,
            "mst5_jax": {"pooling": self.pooling, "projection_dim": self.projection_dim, "normalize": self.normalize},
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# config.json key -> (check, what was expected). JSON numbers arrive as int or float, and a
# bool is not a number here even though Python's bool subclasses int.
_HF_TYPES: dict[str, tuple[Any, str]] = {
    **{k: (lambda v: _is_int(v) and v > 0, "a positive integer")
       for k in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance")},
    **{k: (lambda v: v is None or (_is_int(v) and v >= 0), "a non-negative integer or null")
       for k in ("pad_token_id", "eos_token_id")},
    "layer_norm_epsilon": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                           "a positive number"),
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "feed_forward_proj": (lambda v: isinstance(v, str), "a string such as \"gated-gelu\" or \"relu\""),
    "_name_or_path": (lambda v: v is None or isinstance(v, str), "a string"),
    "mst5_jax": (lambda v: isinstance(v, dict), "an object"),
}
_MST5_TYPES: dict[str, tuple[Any, str]] = {
    "pooling": (lambda v: isinstance(v, str), "a string"),
    "projection_dim": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null"),
    "normalize": (lambda v: isinstance(v, bool), "true or false"),
}


def _check_hf_types(hf: Any, source: str) -> None:
    """Raises ValueError naming `source` and the first key whose JSON type is wrong."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: a JSON {type(hf).__name__}, expected an object of config keys")
    for table, where, d in ((_HF_TYPES, "", hf), (_MST5_TYPES, "mst5_jax.", hf.get("mst5_jax"))):
        if not isinstance(d, dict):
            continue
        for key, (ok, expected) in table.items():
            if key in d and not ok(d[key]):
                raise ConfigError(f"{source}: \"{where}{key}\" is {json.dumps(d[key])} ({type(d[key]).__name__}); "
                                 f"expected {expected}")


def _mt5(d_model, d_ff, heads, layers):
    return EncoderConfig(vocab_size=MT5_VOCAB, d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=64, num_layers=layers)


def _t5_v11(d_model, d_ff, heads, layers):
    return EncoderConfig(vocab_size=T5_VOCAB, d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=64, num_layers=layers)


def _t5_v10(d_model, d_ff, heads, layers, d_kv=64):
    return EncoderConfig(vocab_size=T5_VOCAB, d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=d_kv,
                         num_layers=layers, feed_forward="relu")


PRESETS: dict[str, EncoderConfig] = {
    # mT5 (google/mt5-*): sizes from the official config.json files.
    "mt5-small": _mt5(512, 1024, 6, 8),
    "mt5-base": _mt5(768, 2048, 12, 12),
    "mt5-large": _mt5(1024, 2816, 16, 24),
    "mt5-xl": _mt5(2048, 5120, 32, 24),
    "mt5-xxl": _mt5(4096, 10240, 64, 24),
    # T5 v1.1 (google/t5-v1_1-*): same architecture, English vocab.
    "t5-v1_1-small": _t5_v11(512, 1024, 6, 8),
    "t5-v1_1-base": _t5_v11(768, 2048, 12, 12),
    "t5-v1_1-large": _t5_v11(1024, 2816, 16, 24),
    "t5-v1_1-xl": _t5_v11(2048, 5120, 32, 24),
    "t5-v1_1-xxl": _t5_v11(4096, 10240, 64, 24),
    # T5 v1.0 (t5-*), the architecture of sentence-transformers/sentence-t5-*.
    "t5-small": _t5_v10(512, 2048, 8, 6),
    "t5-base": _t5_v10(768, 3072, 12, 12),
    "t5-large": _t5_v10(1024, 4096, 16, 24),
    "t5-3b": _t5_v10(1024, 16384, 32, 24, d_kv=128),
    "t5-11b": _t5_v10(1024, 65536, 128, 24, d_kv=128),
    # Tests, the CPU demo.
    "tiny": EncoderConfig(vocab_size=1024, d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2),
}
