"""The T5 / mT5 encoder in Flax NNX, plus sentence pooling.

Architecture (T5 v1.1 / mT5, and T5 v1.0 with `feed_forward="relu"`):

    ids [B, L] -> token_embedder -> dropout
      -> num_layers x Block(pre-norm self-attention, pre-norm feed-forward)
      -> final_norm -> dropout -> hidden [B, L, d_model]
      -> pool (masked mean by default, EOS included) -> [optional projection] -> [optional L2]

Details that differ from a textbook Transformer, all matching HF `T5EncoderModel`:
- No biases anywhere. RMS norm (no mean subtraction) with fp32 statistics, before each
  sublayer ("pre-norm"), and once more after the last layer.
- Attention logits are NOT scaled by 1/sqrt(d_kv): T5 folds that factor into the
  initialisation of the query projection instead.
- Position information is a learned bias on the attention logits, indexed by a bucketed
  relative distance (`relative_position_bucket`). It is computed once, from the first
  layer's table in HF checkpoints, and shared by every layer; here it is a single
  `relpos_bias` table owned by the encoder.

Layers are scanned: the per-layer parameters are stacked along a leading `layers` axis and
the forward pass is one `jax.lax.scan`, so xxl compiles one block, not 24. Parameter paths
(`nnx.state(model)` keys), with L = num_layers:

    encoder/token_embedder/embedding        [vocab, d_model]           (vocab, embed)
    encoder/relpos_bias/embedding           [buckets, heads]           (relpos_buckets, heads)
    encoder/layers/attention_norm/scale     [L, d_model]               (layers, embed)
    encoder/layers/attention/{q,k,v}/kernel [L, d_model, heads*d_kv]   (layers, embed, joined_kv)
    encoder/layers/attention/o/kernel       [L, heads*d_kv, d_model]   (layers, joined_kv, embed)
    encoder/layers/mlp_norm/scale           [L, d_model]               (layers, embed)
    encoder/layers/mlp/{wi_0,wi_1}/kernel   [L, d_model, d_ff]         (layers, embed, mlp)   gated
    encoder/layers/mlp/wi/kernel            [L, d_model, d_ff]         (layers, embed, mlp)   relu
    encoder/layers/mlp/wo/kernel            [L, d_ff, d_model]         (layers, mlp, embed)
    encoder/final_norm/scale                [d_model]                  (embed,)
    projection/kernel                       [d_model, projection_dim]  (embed, projection)  optional

LoRA (`mst5_jax.core.lora`) adds `lora_a` [.., in, r] and `lora_b` [.., r, out] next to a
`kernel`; `Linear` applies them when present. Kernels are stored [in, out], the
transpose of torch's `nn.Linear.weight`.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mst5_jax.core.config import EncoderConfig

Array = jax.Array


class LoRAParam(nnx.Param):
    """A LoRA factor. Trainable in LoRA mode; everything else of type `nnx.Param` is frozen."""


class LoRAScale(nnx.Variable):
    """The LoRA scaling (alpha/r or alpha/sqrt(r)) of one Linear, per layer when stacked.

    Not a parameter: never trained, never given to the optimizer. A layer whose scale is 0
    has no adapter (per-layer selection in a stacked layout).
    """


def _dtype(name: str):
    return jnp.dtype(name)


def _precision(dtype) -> Optional[jax.lax.Precision]:
    # JAX's default float32 matmul uses TF32 on GPUs (and bf16 passes on TPUs); the
    # reference is computed in true fp32, so fp32 runs ask for HIGHEST explicitly.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dropout(x: Array, rate: float, key: Optional[Array]) -> Array:
    """Inverted dropout. `key=None` (or rate 0) is the identity.

    Bits are drawn for the global shape of `x`, so results do not depend on how many
    devices the array is sharded over.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class RMSNorm(nnx.Module):
    """T5 layer norm: y = scale * x / sqrt(mean(x^2) + eps), statistics in fp32."""

    def __init__(self, dim: int, cfg: EncoderConfig):
        self.eps = cfg.layer_norm_epsilon
        self.dtype = cfg.dtype
        self.scale = nnx.Param(jnp.ones((dim,), _dtype(cfg.param_dtype)), logical_axes=("embed",))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (self.scale[...].astype(jnp.float32) * y).astype(self.dtype)


class Linear(nnx.Module):
    """Bias-free dense layer, kernel [in, out], with optional LoRA factors.

    When `lora_a` [in, r] and `lora_b` [r, out] are present (set by `mst5_jax.core.lora`),
    y = x W + (dropout(x) A B) * lora_scale, as peft computes it: dropout acts only on the
    input of A. The LoRA path runs in the compute dtype.
    """

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], cfg: EncoderConfig, std: float, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        self.axes = axes
        init = jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32) * std
        self.kernel = nnx.Param(init.astype(_dtype(cfg.param_dtype)), logical_axes=axes)
        # Declared as data (not static) so `mst5_jax.core.lora` can attach variables later.
        self.lora_a: Optional[LoRAParam] = nnx.data(None)
        self.lora_b: Optional[LoRAParam] = nnx.data(None)
        self.lora_scale: Optional[LoRAScale] = nnx.data(None)
        self.lora_dropout = 0.0

    def __call__(self, x: Array, lora_dropout_key: Optional[Array] = None) -> Array:
        prec = _precision(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype), precision=prec)
        if self.lora_a is not None:
            xl = dropout(x, self.lora_dropout, lora_dropout_key)
            a = self.lora_a[...].astype(self.dtype)
            b = self.lora_b[...].astype(self.dtype)
            scale = self.lora_scale[...].astype(self.dtype)
            y = y + jnp.dot(jnp.dot(xl, a, precision=prec), b, precision=prec) * scale
        return y


def relative_position_bucket(relative_position: Array, num_buckets: int, max_distance: int) -> Array:
    """Maps signed distances (key - query) to bidirectional T5 buckets, int32 in [0, num_buckets).

    Half the buckets hold positive distances. Within each half, distances below
    num_buckets/4 get their own bucket; larger ones share logarithmically wider buckets up
    to max_distance, beyond which all distances share the last bucket. The float32 log
    mirrors HF/Mesh TF exactly so bucket edges agree bit for bit.
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).astype(jnp.int32) * half
    n = jnp.abs(relative_position)
    max_exact = half // 2
    is_small = n < max_exact
    n_safe = jnp.maximum(n, 1).astype(jnp.float32)  # log(0) is never selected, but must not be NaN
    large = max_exact + (
        jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, half - 1)
    return buckets + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
    """Learned per-head bias on attention logits, indexed by relative-position bucket."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        init = jax.random.normal(rngs.params(), (self.num_buckets, cfg.num_heads), jnp.float32) * cfg.d_model**-0.5
        self.embedding = nnx.Param(init.astype(_dtype(cfg.param_dtype)), logical_axes=("relpos_buckets", "heads"))

    def __call__(self, q_len: int, k_len: int) -> Array:
        """Returns the bias [1, heads, q_len, k_len] in float32."""
        rel = jnp.arange(k_len, dtype=jnp.int32)[None, :] - jnp.arange(q_len, dtype=jnp.int32)[:, None]
        buckets = relative_position_bucket(rel, self.num_buckets, self.max_distance)
        values = jnp.take(self.embedding[...].astype(jnp.float32), buckets, axis=0)  # [q, k, H]
        return jnp.transpose(values, (2, 0, 1))[None]


class Attention(nnx.Module):
    """Multi-head self-attention without 1/sqrt(d) scaling; softmax in fp32."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.inner_dim
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.dtype, self.rate = cfg.dtype, cfg.dropout_rate
        self.impl = cfg.attention_impl
        # HF T5 init: the query absorbs the missing 1/sqrt(d_kv).
        self.q = Linear(d, inner, ("embed", "joined_kv"), cfg, (d * cfg.d_kv) ** -0.5, rngs)
        self.k = Linear(d, inner, ("embed", "joined_kv"), cfg, d**-0.5, rngs)
        self.v = Linear(d, inner, ("embed", "joined_kv"), cfg, d**-0.5, rngs)
        self.o = Linear(inner, d, ("joined_kv", "embed"), cfg, inner**-0.5, rngs)

    def __call__(self, x: Array, bias: Array, keys: Optional[Array]) -> Array:
        """x [B, L, d_model]; bias [B or 1, H, L, L] fp32 (position + padding mask)."""
        b, length, _ = x.shape
        k_q, k_k, k_v, k_o, k_w = _split(keys, 5)
        split = lambda t: t.reshape(b, length, self.num_heads, self.d_kv)
        q = split(self.q(x, k_q))
        k = split(self.k(x, k_k))
        v = split(self.v(x, k_v))
        if self.impl == "einsum" or (self.rate > 0 and k_w is not None):
            # The fused paths have no dropout on the attention weights: training with
            # dropout always takes the explicit einsum path.
            out = self._einsum_attention(q, k, v, bias, k_w)
        else:
            out = self._fused_attention(q, k, v, bias)
        return self.o(out.reshape(b, length, self.num_heads * self.d_kv), k_o)

    def _einsum_attention(self, q: Array, k: Array, v: Array, bias: Array, k_w: Optional[Array]) -> Array:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_precision(self.dtype),
                            preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits + bias, axis=-1)
        weights = dropout(weights, self.rate, k_w).astype(self.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=_precision(self.dtype))

    def _fused_attention(self, q: Array, k: Array, v: Array, bias: Array) -> Array:
        """`jax.nn.dot_product_attention` with the T5 bias and no 1/sqrt(d) scaling (scale=1).

        "cudnn" asks for the cuDNN flash kernel (bf16/fp16 on a recent NVIDIA GPU; JAX raises
        where it is unsupported); "dot_product" lets JAX pick (XLA on CPU). The bias is cast to
        the compute dtype for cuDNN, with the padding value clipped to that dtype's range.
        """
        implementation = "cudnn" if self.impl == "cudnn" else None
        if implementation == "cudnn":
            bias = jnp.maximum(bias, jnp.finfo(self.dtype).min).astype(self.dtype)
        with jax.default_matmul_precision("highest" if jnp.dtype(self.dtype) == jnp.float32 else "default"):
            return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, implementation=implementation)


class FeedForward(nnx.Module):
    """Gated-GELU (wi_0, wi_1, wo; tanh-approximate GELU) or ReLU (wi, wo)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.gated = cfg.gated
        self.act = jax.nn.relu if cfg.feed_forward.endswith("relu") else (lambda t: jax.nn.gelu(t, approximate=True))
        self.rate = cfg.dropout_rate
        if self.gated:
            self.wi_0 = Linear(d, f, ("embed", "mlp"), cfg, d**-0.5, rngs)
            self.wi_1 = Linear(d, f, ("embed", "mlp"), cfg, d**-0.5, rngs)
        else:
            self.wi = Linear(d, f, ("embed", "mlp"), cfg, d**-0.5, rngs)
        self.wo = Linear(f, d, ("mlp", "embed"), cfg, f**-0.5, rngs)

    def __call__(self, x: Array, keys: Optional[Array]) -> Array:
        k0, k1, k_h, k_o = _split(keys, 4)
        if self.gated:
            h = self.act(self.wi_0(x, k0)) * self.wi_1(x, k1)
        else:
            h = self.act(self.wi(x, k0))
        h = dropout(h, self.rate, k_h)
        return self.wo(h, k_o)


class Block(nnx.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + FF(Norm(x))."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.rate = cfg.dropout_rate
        self.attention_norm = RMSNorm(cfg.d_model, cfg)
        self.attention = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg)
        self.mlp = FeedForward(cfg, rngs)

    def __call__(self, x: Array, bias: Array, key: Optional[Array]) -> Array:
        k_attn, k_d1, k_ff, k_d2 = _split(key, 4)
        x = x + dropout(self.attention(self.attention_norm(x), bias, k_attn), self.rate, k_d1)
        x = checkpoint_name(x, "residual_mid")
        x = x + dropout(self.mlp(self.mlp_norm(x), k_ff), self.rate, k_d2)
        return x


def _split(key: Optional[Array], n: int) -> tuple:
    if key is None:
        return (None,) * n
    return tuple(jax.random.split(key, n))


REMAT_POLICIES = {
    # "full": keep only each layer's input (the scan carry); recompute the whole block.
    "full": jax.checkpoint_policies.nothing_saveable,
    # "dots": keep matmul outputs without batch dims (weights-side), recompute the rest.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # "residual": keep the layer input and the mid-block residual stream only.
    "residual": jax.checkpoint_policies.save_only_these_names("residual_mid"),
}


class Embedder(nnx.Module):
    """The input embedding table [vocab, d_model] (untied in mT5; HF init std 1.0)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32)
        self.embedding = nnx.Param(init.astype(_dtype(cfg.param_dtype)), logical_axes=("vocab", "embed"))


class Encoder(nnx.Module):
    """The T5 encoder stack. `__call__` returns the last hidden state [B, L, d_model]."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.token_embedder = Embedder(cfg, rngs)
        self.relpos_bias = RelativePositionBias(cfg, rngs)
        self.layers = _stacked_blocks(cfg, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
                 dropout_key: Optional[Array] = None) -> Array:
        x, bias, layer_keys, k_final = self.prepare(input_ids, attention_mask, dropout_key)
        return self.finish(self.run_layers(x, bias, layer_keys), k_final)

    # The three stages of `__call__`, public so that GradCache's cached-layer-inputs mode
    # (`mst5_jax.core.gradcache`) can keep the layer inputs and run the backward layer by layer.
    def prepare(self, input_ids: Array, attention_mask: Optional[Array], dropout_key: Optional[Array]
                ) -> tuple[Array, Array, Optional[Array], Optional[Array]]:
        """Token embeddings x [B, L, d_model], the attention bias [B, H, L, L] fp32, the
        per-layer dropout keys [num_layers] (or None) and the final dropout key."""
        cfg = self.cfg
        if attention_mask is None:
            attention_mask = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        _, length = input_ids.shape
        k_emb, k_layers, k_final = _split(dropout_key, 3)
        x = jnp.take(self.token_embedder.embedding[...], input_ids, axis=0).astype(cfg.dtype)
        x = dropout(x, cfg.dropout_rate, k_emb)
        # Padding keys get the most negative float32, as HF adds finfo(dtype).min.
        pad_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        bias = self.relpos_bias(length, length) + pad_bias  # [B, H, L, L] fp32
        layer_keys = None if k_layers is None else jax.random.split(k_layers, cfg.num_layers)
        return x, bias, layer_keys, k_final

    def run_layers(self, x: Array, bias: Array, layer_keys: Optional[Array], *, keep_inputs: bool = False):
        """The block stack as one `lax.scan` (remat per `cfg.remat`). With `keep_inputs`,
        also returns every block's input, [num_layers, B, L, d_model]."""
        cfg = self.cfg
        graphdef, layer_state = nnx.split(self.layers)

        def body(h, xs):
            state, key = xs
            return nnx.merge(graphdef, state)(h, bias, key), (h if keep_inputs else None)

        if cfg.remat != "none" and not keep_inputs:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        x, inputs = jax.lax.scan(body, x, (layer_state, layer_keys))
        return (x, inputs) if keep_inputs else x

    def finish(self, x: Array, k_final: Optional[Array]) -> Array:
        """The final norm (and dropout) after the last block."""
        return dropout(self.final_norm(x), self.cfg.dropout_rate, k_final)


def _stacked_blocks(cfg: EncoderConfig, rngs: nnx.Rngs) -> Block:
    """num_layers Blocks whose parameters are stacked along a leading layer axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> Block:
        return Block(cfg, r)

    return make(rngs)


def pool(hidden: Array, mask: Array, mode: str = "mean") -> Array:
    """Sentence pooling in fp32. hidden [B, L, D], mask [B, L] (1 = token) -> [B, D].

    "mean": masked mean over tokens (EOS included, as it is a non-pad token);
    "first": the first token; "max": masked max.
    """
    h = hidden.astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    if mode == "mean":
        return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    if mode == "first":
        return h[:, 0]
    if mode == "max":
        return jnp.max(jnp.where(m > 0, h, -jnp.inf), axis=1)
    raise ValueError(f"unknown pooling {mode!r}: expected mean, first or max")


class SentenceModel(nnx.Module):
    """Encoder + pooling (+ optional bias-free projection and L2 normalisation)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.projection = (
            Linear(cfg.d_model, cfg.projection_dim, ("embed", "projection"), cfg.replace(dtype="float32"),
                   cfg.d_model**-0.5, rngs)
            if cfg.projection_dim else None
        )

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
                 dropout_key: Optional[Array] = None) -> Array:
        """ids [B, L] int32, mask [B, L] -> sentence embeddings [B, embedding_dim] float32."""
        if attention_mask is None:
            attention_mask = (input_ids != self.cfg.pad_token_id).astype(jnp.int32)
        return self.head(self.encoder(input_ids, attention_mask, dropout_key=dropout_key), attention_mask)

    def head(self, hidden: Array, attention_mask: Array) -> Array:
        """Last hidden state [B, L, d_model] -> pooled (projected, normalised) embeddings."""
        emb = pool(hidden, attention_mask, self.cfg.pooling)
        if self.projection is not None:
            emb = self.projection(emb)
        if self.cfg.normalize:
            emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        return emb


# ---------------------------------------------------------------------- construction helpers
def init_model(cfg: EncoderConfig, seed: int = 0) -> SentenceModel:
    """A randomly initialised model (HF T5 initialisation scheme)."""
    return SentenceModel(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: EncoderConfig) -> SentenceModel:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and paths without allocating."""
    return nnx.eval_shape(lambda: SentenceModel(cfg, rngs=nnx.Rngs(params=0)))


def path_str(path: tuple) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def logical_axes(state: Any) -> dict[str, tuple[str, ...]]:
    """Maps each parameter path ("encoder/layers/attention/q/kernel") to its logical axes.

    Parameters under `encoder/layers` get the leading "layers" axis of the scan.
    """
    out = {}
    for path, var in nnx.to_flat_state(state):
        name = path_str(path)
        axes = tuple(var.get_metadata().get("logical_axes", ()))
        if name.startswith("encoder/layers/"):
            axes = ("layers",) + axes
        shape = getattr(var.get_value(), "shape", ())
        if len(axes) != len(shape):
            raise ValueError(f"parameter {name}: logical axes {axes} do not match shape {shape}")
        out[name] = axes
    return out


def count_params(state: Any) -> int:
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(state))
