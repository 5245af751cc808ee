"""LoRA: which weights get adapters, what trains, merging, and PEFT adapters in and out.

One declarative `LoRAConfig` picks the adapted weights; `apply_lora` attaches the factors
to the model; `split_trainable` hands the train step the trainable part only, so gradients
and optimizer state exist for LoRA alone (or for every `nnx.Param` in full fine-tune mode).

    lcfg = LoRAConfig(rank=8, alpha=16, targets=("q", "v"))
    dry_run(model, lcfg)                       # prints matches, trainable count and fraction
    model = apply_lora(model, lcfg, rngs_or_seed=0)
    graphdef, trainable, frozen = split_trainable(model, "lora")
    grads = jax.grad(lambda t: loss(nnx.merge(graphdef, t, frozen)))(trainable)

Paths. Layers are scanned (`mst5_jax.core.model`), so each targeted `Linear` holds one stacked
kernel [L, in, out] and gets, beside it:

    encoder/layers/attention/{q,k,v,o}/lora_a      [L, in, r]   (layers, <kernel in axis>, lora_rank)
    encoder/layers/attention/{q,k,v,o}/lora_b      [L, r, out]  (layers, lora_rank, <kernel out axis>)
    encoder/layers/attention/{q,k,v,o}/lora_scale  [L]          (layers,)
    encoder/layers/mlp/{wi_0,wi_1,wi,wo}/lora_{a,b,scale}        likewise

Targets are matched per layer, against two spellings of each layer's module name: the
unrolled path `encoder/layers/{i}/attention/q` (what an unrolled layout would store; the
foundation only builds the scanned one, `EncoderConfig.scan_layers` is always True) and the
Hugging Face module name `encoder.block.{i}.layer.0.SelfAttention.q`
(`encoder.block.{i}.layer.1.DenseReluDense.wo` for the FFN), so that peft's
`target_modules`, `rank_pattern` and `alpha_pattern` mean exactly what they mean in peft:

- a list (or tuple) of names suffix-matches: `"q"` matches `...SelfAttention.q` and
  `.../attention/q`; `"attention/q"` and `"SelfAttention.q"` work too;
- a string is a regex that must match a whole name (`re.fullmatch`), e.g.
  `r"encoder\\.block\\.(0|1)\\.layer\\.0\\.SelfAttention\\.(q|v)"`, or
  `"encoder/layers/attention/(q|v)"` (the stacked path: every layer);
- `layers` keeps only those layer indices (peft's `layers_to_transform`);
- `rank_pattern` / `alpha_pattern` keys are regexes tried in order against the end of the
  name, as peft's `get_pattern_key` does (`(.*\\.)?(key)$`).

Per-layer ranks in a stacked layout. A and B are padded to the largest rank of the module;
layer i with rank r_i keeps A[i, :, r_i:] = 0 and B[i, r_i:, :] = 0, and a layer without an
adapter has scale 0 and zero factors. Padding stays exactly zero under training: the
gradient of A's column j is x^T g B[j, :]^T s and the gradient of B's row j is
(x A[:, j])^T g s, both zero when the other factor's row/column is zero or s = 0, and
Adam(W)'s update of a parameter whose gradients were always zero is zero. The true ranks
and alphas travel as metadata of `lora_a` (`lora_ranks`, `lora_alphas`, `lora_rslora`), so
export writes exactly the adapter that was configured.

Scaling is alpha / r, or alpha / sqrt(r) with `use_rslora` (peft's definitions). The
LoRA factors are float32 whatever the base's `param_dtype`, so a bf16 frozen base trains
fp32 adapters with fp32 optimizer state.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mst5_jax.formats.huggingface import CheckpointError, SafetensorsFile, hf_names, write_safetensors
from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.model import LoRAParam, LoRAScale, SentenceModel, abstract_model, count_params, path_str

log = logging.getLogger(__name__)

Targets = Union[Sequence[str], str]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# peft's default targets for T5 / mT5 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
PEFT_DEFAULT_TARGETS = ("q", "v")


class LoRAError(ValueError):
    """A LoRA configuration or adapter that cannot be applied as asked."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which Linear weights get LoRA factors, and how they are scaled and initialised.

    Attributes:
      rank: r, the inner width of A [in, r] and B [r, out].
      alpha: lora_alpha; scaling = alpha / r (or alpha / sqrt(r) with use_rslora).
      dropout: dropout rate on the input of A during training (peft's lora_dropout).
      targets: module names (list: suffix match) or one regex (string: full match); see
        the module docstring.
      use_rslora: rank-stabilised scaling alpha / sqrt(r).
      layers: optional layer indices to adapt (peft's layers_to_transform); None = all.
      rank_pattern: {regex: r} overriding `rank` for matching modules (first match wins).
      alpha_pattern: {regex: alpha} overriding `alpha` likewise.
      exclude: module names (list: suffix match) or a regex (string) never adapted.
      init: "peft" (A kaiming-uniform, bound 1/sqrt(in), as torch/peft; B zero) or
        "gaussian" (A normal with std 1/r, B zero: peft's init_lora_weights="gaussian").
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Targets = PEFT_DEFAULT_TARGETS
    use_rslora: bool = False
    layers: Optional[Sequence[int]] = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    exclude: Optional[Targets] = None
    init: str = "peft"

    def __post_init__(self):
        if self.rank <= 0:
            raise LoRAError(f"LoRAConfig.rank={self.rank} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRAConfig.dropout={self.dropout} must be in [0, 1)")
        if self.init not in ("peft", "gaussian"):
            raise LoRAError(f"LoRAConfig.init={self.init!r}: expected 'peft' or 'gaussian'")
        if not self.targets:
            raise LoRAError("LoRAConfig.targets is empty: a filter that matches nothing would freeze everything")
        for k, r in self.rank_pattern.items():
            if int(r) <= 0:
                raise LoRAError(f"LoRAConfig.rank_pattern[{k!r}]={r} must be positive")
        if isinstance(self.targets, str) and self.layers is not None:
            raise LoRAError("LoRAConfig.layers cannot be combined with a regex `targets` (as in peft); "
                            "put the layer indices in the regex")

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


# ---------------------------------------------------------------------- matching
@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """The adapter of one stacked Linear: per-layer rank (0 = none), alpha and scale."""

    path: str                    # "encoder/layers/attention/q"
    hf_names: tuple[str, ...]    # per layer: "encoder.block.{i}.layer.0.SelfAttention.q"
    d_in: int
    d_out: int
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    use_rslora: bool

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(0.0 if r == 0 else (a / math.sqrt(r) if self.use_rslora else a / r)
                     for r, a in zip(self.ranks, self.alphas))

    @property
    def num_params(self) -> int:
        """True trainable count (sum of r_i * (in + out)), padding excluded."""
        return sum(r * (self.d_in + self.d_out) for r in self.ranks)

    @property
    def stored_params(self) -> int:
        """What the padded arrays hold: L * r_max * (in + out)."""
        return len(self.ranks) * self.max_rank * (self.d_in + self.d_out)


def linear_modules(cfg: EncoderConfig) -> dict[str, tuple[tuple[str, ...], int, int]]:
    """Stacked Linear path -> (per-layer HF module names, d_in, d_out) for `cfg`."""
    out = {}
    shapes = {"q": (cfg.d_model, cfg.inner_dim), "k": (cfg.d_model, cfg.inner_dim),
              "v": (cfg.d_model, cfg.inner_dim), "o": (cfg.inner_dim, cfg.d_model),
              "wi": (cfg.d_model, cfg.d_ff), "wi_0": (cfg.d_model, cfg.d_ff),
              "wi_1": (cfg.d_model, cfg.d_ff), "wo": (cfg.d_ff, cfg.d_model)}
    for name, entries in hf_names(cfg).items():
        if name.startswith("encoder/layers/") and name.endswith("/kernel"):
            module = name[: -len("/kernel")]
            hf = tuple(t[: -len(".weight")] for t, _ in entries)
            out[module] = (hf,) + shapes[module.rsplit("/", 1)[1]]
    return out


def _unrolled(path: str, i: int) -> str:
    return path.replace("encoder/layers/", f"encoder/layers/{i}/", 1)


def _names_match(spec: Targets, path: str, hf: str, i: int) -> bool:
    """peft's target_modules rule, over both spellings of layer i's module name."""
    names = (hf, _unrolled(path, i))
    if isinstance(spec, str):
        return any(re.fullmatch(spec, n) for n in names + (path,))
    for t in spec:
        if hf == t or hf.endswith("." + t) or any(n == t or n.endswith("/" + t) for n in names[1:] + (path,)):
            return True
    return False


def _pattern_value(pattern: Mapping[str, Any], path: str, hf: str, i: int, default):
    """peft's get_pattern_key: the first key matching the end of the name wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", hf) or re.match(rf"(.*/)?({key})$", _unrolled(path, i)):
            return value
    return default


def plan_lora(cfg: EncoderConfig, lcfg: LoRAConfig) -> dict[str, ModulePlan]:
    """Resolves `lcfg` against the model's Linear modules; raises if nothing matches."""
    modules = linear_modules(cfg)
    if lcfg.layers is not None:
        bad = [i for i in lcfg.layers if not 0 <= int(i) < cfg.num_layers]
        if bad:
            raise LoRAError(f"LoRAConfig.layers={list(lcfg.layers)}: indices {bad} are outside "
                            f"0..{cfg.num_layers - 1}")
    plan = {}
    for path, (hf, d_in, d_out) in modules.items():
        ranks, alphas = [], []
        for i, name in enumerate(hf):
            hit = _names_match(lcfg.targets, path, name, i)
            if hit and lcfg.layers is not None:
                hit = i in set(int(j) for j in lcfg.layers)
            if hit and lcfg.exclude:
                hit = not _names_match(lcfg.exclude, path, name, i)
            ranks.append(int(_pattern_value(lcfg.rank_pattern, path, name, i, lcfg.rank)) if hit else 0)
            alphas.append(float(_pattern_value(lcfg.alpha_pattern, path, name, i, lcfg.alpha)) if hit else 0.0)
        if any(ranks):
            plan[path] = ModulePlan(path, hf, d_in, d_out, tuple(ranks), tuple(alphas), lcfg.use_rslora)
    if not plan:
        examples = [f"{p} / {hf[0]}" for p, (hf, _, _) in modules.items()]
        raise LoRAError(
            f"LoRA targets {lcfg.targets!r} (layers={lcfg.layers}, exclude={lcfg.exclude!r}) match no Linear "
            f"module; that would silently freeze the whole model. Candidates (layer 0): {examples}")
    return plan


# ---------------------------------------------------------------------- attaching
def _module(model: SentenceModel, path: str):
    obj = model
    for part in path.split("/"):
        obj = getattr(obj, part)
    return obj


def _key(rngs_or_seed) -> jax.Array:
    if isinstance(rngs_or_seed, nnx.Rngs):
        return rngs_or_seed.params()
    if isinstance(rngs_or_seed, (int, np.integer)):
        return jax.random.key(int(rngs_or_seed))
    return rngs_or_seed


def _rank_mask(ranks: Sequence[int], r_max: int) -> np.ndarray:
    """[L, r_max] float32: 1 where column j < r_i."""
    return (np.arange(r_max)[None, :] < np.asarray(ranks)[:, None]).astype(np.float32)


def lora_modules(model: SentenceModel) -> dict[str, Any]:
    """Path -> Linear for every Linear that carries LoRA factors (merged or not)."""
    out = {}
    for path in linear_modules(model.cfg):
        lin = _module(model, path)
        if lin.lora_a is not None or getattr(lin, "lora_merged_a", None) is not None:
            out[path] = lin
    return out


def apply_lora(model: SentenceModel, lcfg: LoRAConfig, rngs_or_seed: Union[int, jax.Array, nnx.Rngs] = 0
               ) -> SentenceModel:
    """Attaches fp32 LoRA factors to every matched Linear (mutates and returns `model`).

    A [L, in, r_max] is initialised per `lcfg.init` in the layers that have an adapter
    (zero elsewhere and beyond each layer's rank), B [L, r_max, out] is zero, and
    `lora_scale` [L] holds each layer's scaling (0 = no adapter).
    """
    if lora_modules(model):
        raise LoRAError("the model already has LoRA factors on "
                        f"{sorted(lora_modules(model))}; load or apply onto a fresh model")
    plan = plan_lora(model.cfg, lcfg)
    key = _key(rngs_or_seed)
    for k, (path, mp) in zip(jax.random.split(key, len(plan)), plan.items()):
        lin = _module(model, path)
        num_layers, d_in, d_out = lin.kernel.shape
        r_max = mp.max_rank
        if lcfg.init == "peft":
            # torch kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in]: U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (num_layers, d_in, r_max), jnp.float32, -bound, bound)
        else:
            std = jnp.asarray([1.0 / r if r else 0.0 for r in mp.ranks], jnp.float32)[:, None, None]
            a = jax.random.normal(k, (num_layers, d_in, r_max), jnp.float32) * std
        a = a * jnp.asarray(_rank_mask(mp.ranks, r_max))[:, None, :]
        b = jnp.zeros((num_layers, r_max, d_out), jnp.float32)
        _attach(lin, mp, a, b, lcfg.dropout)
    return model


def _attach(lin, mp: ModulePlan, a: jax.Array, b: jax.Array, dropout_rate: float) -> None:
    meta = dict(lora_ranks=mp.ranks, lora_alphas=mp.alphas, lora_rslora=mp.use_rslora)
    lin.lora_a = LoRAParam(a, logical_axes=(lin.axes[0], "lora_rank"), **meta)
    lin.lora_b = LoRAParam(b, logical_axes=("lora_rank", lin.axes[1]), **meta)
    lin.lora_scale = LoRAScale(jnp.asarray(mp.scales, jnp.float32))
    lin.lora_dropout = float(dropout_rate)


def _plan_of(path: str, lin) -> ModulePlan:
    """The ModulePlan recorded in a Linear's `lora_a` metadata."""
    a = lin.lora_a if lin.lora_a is not None else lin.lora_merged_a
    meta = a.get_metadata()
    num_layers, d_in, _ = a.shape
    d_out = (lin.lora_b if lin.lora_b is not None else lin.lora_merged_b).shape[-1]
    hf = tuple(f"layer{i}" for i in range(num_layers))
    return ModulePlan(path, hf, d_in, d_out, tuple(meta["lora_ranks"]), tuple(meta["lora_alphas"]),
                      bool(meta["lora_rslora"]))


# ---------------------------------------------------------------------- partitioning
lora_filter = nnx.OfType(LoRAParam)
"""The nnx filter of trainable LoRA factors (`nnx.state(model, lora_filter)`)."""

TRAIN_MODES = ("lora", "full")


def trainable_filter(mode: str) -> nnx.filterlib.Filter:
    """`lora_filter` in "lora" mode; every `nnx.Param` (LoRA included) in "full" mode.

    LoRAScale and other non-Param variables are never trainable.
    """
    if mode == "lora":
        return lora_filter
    if mode == "full":
        return nnx.Param
    raise LoRAError(f"train mode {mode!r}: expected one of {TRAIN_MODES}")


def split_trainable(model: SentenceModel, mode: str = "lora") -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable_state, frozen_state); `nnx.merge(graphdef, trainable, frozen)` rebuilds.

    Differentiate and optimise `trainable_state` only: the frozen base then has no
    gradient buffers and no optimizer state. In "lora" mode a model without LoRA factors
    is an error rather than an empty (silently frozen) trainable set.
    """
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(mode), ...)
    if not jax.tree_util.tree_leaves(trainable):
        raise LoRAError(f"split_trainable(mode={mode!r}): nothing is trainable"
                        + (" (no LoRA factors: call apply_lora or load_peft_adapter first)" if mode == "lora" else ""))
    return graphdef, trainable, frozen


# ---------------------------------------------------------------------- dry run
def dry_run(model_or_cfg: Union[SentenceModel, EncoderConfig], lcfg: LoRAConfig,
            print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Prints what `lcfg` would adapt; returns {"matched", "trainable", "total", "fraction"}.

    Nothing is allocated (a config is resolved through `abstract_model`). "trainable" is
    the true LoRA parameter count (padding excluded); "total" is base + LoRA, so the
    fraction is the one peft's `print_trainable_parameters` reports.
    """
    cfg = model_or_cfg if isinstance(model_or_cfg, EncoderConfig) else model_or_cfg.cfg
    plan = plan_lora(cfg, lcfg)
    base = count_params(nnx.state(abstract_model(cfg), nnx.Param))
    trainable = sum(mp.num_params for mp in plan.values())
    total = base + trainable
    matched = {}
    print_fn(f"LoRA dry run: targets={lcfg.targets!r} rank={lcfg.rank} alpha={lcfg.alpha} "
             f"rslora={lcfg.use_rslora} layers={lcfg.layers}")
    for path, mp in plan.items():
        layers = [i for i, r in enumerate(mp.ranks) if r]
        ranks = sorted(set(r for r in mp.ranks if r))
        matched[path] = {"layers": layers, "ranks": list(mp.ranks), "alphas": list(mp.alphas),
                         "a_shape": [len(mp.ranks), mp.d_in, mp.max_rank],
                         "b_shape": [len(mp.ranks), mp.max_rank, mp.d_out], "params": mp.num_params}
        print_fn(f"  {path}/lora_a {matched[path]['a_shape']}  lora_b {matched[path]['b_shape']}  "
                 f"layers {_ranges(layers)}  r {ranks}  params {mp.num_params:,}")
    stored = sum(mp.stored_params for mp in plan.values())
    print_fn(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
             + (f"  (stored with rank padding: {stored:,})" if stored != trainable else ""))
    return {"matched": matched, "trainable": trainable, "stored": stored, "total": total,
            "fraction": trainable / total}


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "-"
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


# ---------------------------------------------------------------------- merge / unmerge
class LoRAMerged(nnx.Variable):
    """A merged adapter's factors, scale and (bf16 bases) original kernel, kept for unmerge."""


def _delta(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """scale[l] * A[l] @ B[l] in float32: [L, in, out]."""
    return jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale.astype(jnp.float32)[:, None, None]


def merge(model: SentenceModel) -> SentenceModel:
    """Folds every adapter into its kernel (W += s A B) for inference; mutates and returns.

    The factors move to `LoRAMerged` variables so `unmerge` can undo it. A float32 kernel is
    restored by subtracting the same delta; a bf16 kernel keeps its original copy, since
    rounding to bf16 cannot be inverted.
    """
    mods = {p: m for p, m in lora_modules(model).items() if m.lora_a is not None}
    if not mods:
        raise LoRAError("merge: the model has no unmerged LoRA factors")
    for lin in mods.values():
        kernel = lin.kernel[...]
        delta = _delta(lin.lora_a[...], lin.lora_b[...], lin.lora_scale[...])
        if kernel.dtype != jnp.float32:
            lin.lora_merged_kernel = LoRAMerged(kernel, logical_axes=lin.axes)
        lin.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        lin.lora_merged_a = LoRAMerged(lin.lora_a[...], **lin.lora_a.get_metadata())
        lin.lora_merged_b = LoRAMerged(lin.lora_b[...], **lin.lora_b.get_metadata())
        lin.lora_merged_scale = LoRAMerged(lin.lora_scale[...])
        lin.lora_a = lin.lora_b = lin.lora_scale = None
    return model


def unmerge(model: SentenceModel) -> SentenceModel:
    """Undoes `merge`: restores the base kernels and the separate LoRA path; mutates and returns."""
    mods = {p: m for p, m in lora_modules(model).items() if getattr(m, "lora_merged_a", None) is not None}
    if not mods:
        raise LoRAError("unmerge: the model has no merged LoRA factors")
    for lin in mods.values():
        a, b, s = lin.lora_merged_a, lin.lora_merged_b, lin.lora_merged_scale[...]
        original = getattr(lin, "lora_merged_kernel", None)
        if original is not None:
            lin.kernel.set_value(original[...])
            lin.lora_merged_kernel = None
        else:
            lin.kernel.set_value(lin.kernel[...] - _delta(a[...], b[...], s))
        lin.lora_a = LoRAParam(a[...], **a.get_metadata())
        lin.lora_b = LoRAParam(b[...], **b.get_metadata())
        lin.lora_scale = LoRAScale(s)
        lin.lora_merged_a = lin.lora_merged_b = lin.lora_merged_scale = None
    return model


# ---------------------------------------------------------------------- PEFT config keys
# Keys that change the forward math and are implemented here.
PEFT_SUPPORTED = frozenset({
    "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out",
    "lora_dropout", "layers_to_transform", "layers_pattern", "exclude_modules"})
# Keys that do not change the forward math: ignored whatever their value.
PEFT_IGNORED = frozenset({
    "init_lora_weights", "inference_mode", "auto_mapping", "revision", "base_model_name_or_path", "task_type",
    "peft_type", "runtime_config", "peft_version", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "ensure_weight_tying",
    "enable_lora", "merge_weights"})
# Keys that change the math and are not implemented: refused unless at their default.
PEFT_REFUSED_DEFAULTS: dict[str, Any] = {
    "use_dora": False, "lora_bias": False, "bias": "none", "modules_to_save": None,
    "trainable_token_indices": None, "target_parameters": None, "layer_replication": None,
    "use_qalora": False, "alora_invocation_tokens": None, "arrow_config": None, "use_bdlora": None,
    "kasa_config": None, "monteclora_config": None, "velora_config": None}


def _is_default_value(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (list, dict, str, tuple)) and len(v) == 0)


def lora_config_from_peft(peft_cfg: Mapping[str, Any], source: str = ADAPTER_CONFIG) -> LoRAConfig:
    """A `LoRAConfig` from a peft `adapter_config.json` dict; refuses what it cannot honour.

    Supported: r, lora_alpha, target_modules, rank_pattern, alpha_pattern, use_rslora,
    fan_in_fan_out (peft resets it to False for torch.nn.Linear, as T5 uses), lora_dropout,
    layers_to_transform (with layers_pattern unset or "block"), exclude_modules.
    Ignored: `PEFT_IGNORED`. Refused by name: any key of `PEFT_REFUSED_DEFAULTS` away from
    its default, and any unknown key with a non-default (non-empty, non-false) value.
    """
    problems = []
    for k, v in peft_cfg.items():
        if k in PEFT_SUPPORTED or k in PEFT_IGNORED:
            continue
        if k in PEFT_REFUSED_DEFAULTS:
            default = PEFT_REFUSED_DEFAULTS[k]
            if not (v == default or (default is None and _is_default_value(v))):
                problems.append(f"{k}={v!r} (only {default!r} is supported)")
        elif not _is_default_value(v):
            problems.append(f"{k}={v!r} (unknown key; only an empty/false value is accepted)")
    pattern = peft_cfg.get("layers_pattern")
    if pattern not in (None, "", [], "block", ["block"]):
        problems.append(f"layers_pattern={pattern!r} (only 'block', T5's layer list, is supported)")
    if problems:
        raise LoRAError(f"{source}: unsupported adapter settings: " + "; ".join(problems))
    if peft_cfg.get("fan_in_fan_out"):
        warnings.warn(f"{source}: fan_in_fan_out=True is ignored for T5's torch.nn.Linear layers, as peft does")
    targets = peft_cfg.get("target_modules")
    if targets is None:
        targets = PEFT_DEFAULT_TARGETS
    layers = peft_cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(targets, str) and layers:
        raise LoRAError(f"{source}: layers_to_transform cannot be used with a regex target_modules (peft refuses it too)")
    try:
        return LoRAConfig(
            rank=int(peft_cfg.get("r", 8)), alpha=float(peft_cfg.get("lora_alpha", 8)),
            dropout=float(peft_cfg.get("lora_dropout", 0.0) or 0.0),
            targets=targets if isinstance(targets, str) else tuple(targets),
            use_rslora=bool(peft_cfg.get("use_rslora", False)),
            layers=tuple(layers) if layers else None,
            rank_pattern=dict(peft_cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(peft_cfg.get("alpha_pattern") or {}),
            exclude=peft_cfg.get("exclude_modules") or None)
    except LoRAError as e:
        raise LoRAError(f"{source}: {e}") from e


# ---------------------------------------------------------------------- PEFT in
def _read_adapter_tensors(adapter_dir: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    st, binf = adapter_dir / ADAPTER_SAFETENSORS, adapter_dir / ADAPTER_BIN
    if st.is_file():
        f = SafetensorsFile(st)
        try:
            return st, {k: np.array(f.get(k), dtype=np.float32) for k in f.keys()}
        finally:
            f.close()
    if binf.is_file():
        import torch  # only to read .bin files

        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{binf}: could not read as a torch state dict ({e})") from e
        if not isinstance(sd, dict):
            raise CheckpointError(f"{binf}: expected a state dict, got {type(sd).__name__}")
        return binf, {k: v.detach().float().numpy() for k, v in sd.items()}
    raise CheckpointError(f"{adapter_dir}: no adapter weights (looked for {ADAPTER_SAFETENSORS}, {ADAPTER_BIN})")


_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def load_peft_adapter(model: SentenceModel, adapter_dir: str | os.PathLike) -> SentenceModel:
    """Loads a peft LoRA directory onto an imported HF base (mutates and returns `model`).

    The directory holds `adapter_config.json` and `adapter_model.safetensors` (peft >= 0.6)
    or `adapter_model.bin` (older peft, read with `torch.load(weights_only=True)`). Tensor
    names are `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight`
    [out, r]. The config is resolved exactly as peft would (`lora_config_from_peft`,
    `plan_lora`), and the file must hold exactly the tensors that plan expects, with the
    expected shapes: decoder tensors are refused with their count, any other extra or
    missing tensor by name.
    """
    adapter_dir = pathlib.Path(adapter_dir)
    from mst5_jax.utils import safety

    safety.check_tree(adapter_dir)  # symlinks only inside adapter_dir or its hub cache repo
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a peft adapter directory)")
    try:
        peft_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    lcfg = lora_config_from_peft(peft_cfg, str(cfg_path))
    weights_path, tensors = _read_adapter_tensors(adapter_dir)

    decoder = [k for k in tensors if _strip(k).startswith(("decoder.", "lm_head."))]
    if decoder:
        raise LoRAError(f"{weights_path}: {len(decoder)} adapter tensors target the decoder "
                        f"(e.g. {decoder[0]}); only encoder adapters can be loaded onto this encoder")
    plan = plan_lora(model.cfg, lcfg)
    by_module: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    unknown = []
    for k, v in tensors.items():
        m = _KEY_RE.match(k)
        if m is None:
            unknown.append(k)
        else:
            by_module[m.group("module")][m.group("ab")] = v
    expected = {}
    for path, mp in plan.items():
        for i, (name, r) in enumerate(zip(mp.hf_names, mp.ranks)):
            if r:
                expected[name] = (path, i, r)
    unexpected = unknown + [f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in by_module if n not in expected
                            for ab in sorted(by_module[n])]
    if unexpected:
        raise LoRAError(f"{weights_path}: tensors not expected from {cfg_path.name} "
                        f"(target_modules={lcfg.targets!r}): {sorted(unexpected)[:8]}"
                        + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    missing = [f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in expected for ab in "AB"
               if ab not in by_module.get(n, {})]
    if missing:
        raise LoRAError(f"{weights_path}: tensors missing for the modules {cfg_path.name} targets: "
                        f"{missing[:8]}" + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    if lora_modules(model):
        raise LoRAError(f"{adapter_dir}: the model already has LoRA factors; load onto a fresh base")
    for path, mp in plan.items():
        num_layers, r_max = len(mp.ranks), mp.max_rank
        a = np.zeros((num_layers, mp.d_in, r_max), np.float32)
        b = np.zeros((num_layers, r_max, mp.d_out), np.float32)
        for i, (name, r) in enumerate(zip(mp.hf_names, mp.ranks)):
            if not r:
                continue
            ta, tb = by_module[name]["A"], by_module[name]["B"]
            for t, want, ab in ((ta, (r, mp.d_in), "A"), (tb, (mp.d_out, r), "B")):
                if tuple(t.shape) != want:
                    raise LoRAError(f"{weights_path}: tensor {PEFT_PREFIX}{name}.lora_{ab}.weight has shape "
                                    f"{tuple(t.shape)}, expected {want} (r={r}, d_in={mp.d_in}, d_out={mp.d_out})")
            a[i, :, :r] = ta.T
            b[i, :r, :] = tb.T
        _attach(_module(model, path), mp, jnp.asarray(a), jnp.asarray(b), lcfg.dropout)
    log.info("loaded peft adapter %s: %d tensors on %d modules", adapter_dir, len(tensors), len(plan))
    return model


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


# ---------------------------------------------------------------------- PEFT out
def _short_name(hf: str) -> str:
    return hf.rsplit(".", 1)[1]


def peft_adapter_config(model: SentenceModel, base_model_name_or_path: Optional[str] = None) -> dict[str, Any]:
    """The `adapter_config.json` dict that reproduces the model's adapters in peft.

    The most common (rank, alpha) become `r` / `lora_alpha`; every other layer's values
    go to `rank_pattern` / `alpha_pattern` under its escaped full module name. When every
    adapted module type covers the same layers, `target_modules` is the short names (plus
    `layers_to_transform` for a subset); otherwise it lists full module names.
    """
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("save_peft_adapter: the model has no LoRA factors")
    if any(getattr(m, "lora_merged_a", None) is not None for m in mods.values()):
        raise LoRAError("save_peft_adapter: the adapters are merged; call unmerge(model) first")
    hf_by_path = {p: hf for p, (hf, _, _) in linear_modules(model.cfg).items()}
    plans = {p: dataclasses.replace(_plan_of(p, m), hf_names=hf_by_path[p]) for p, m in mods.items()}
    rslora = {mp.use_rslora for mp in plans.values()}
    if len(rslora) != 1:
        raise LoRAError("save_peft_adapter: modules mix rslora and plain scaling, which one peft config cannot say")
    entries = [(name, r, a) for mp in plans.values() for name, r, a in zip(mp.hf_names, mp.ranks, mp.alphas) if r]
    r0 = collections.Counter(r for _, r, _ in entries).most_common(1)[0][0]
    a0 = collections.Counter(a for _, _, a in entries).most_common(1)[0][0]
    rank_pattern = {re.escape(n): r for n, r, _ in entries if r != r0}
    alpha_pattern = {re.escape(n): _number(a) for n, _, a in entries if a != a0}
    layer_sets = {tuple(i for i, r in enumerate(mp.ranks) if r) for mp in plans.values()}
    num_layers = model.cfg.num_layers
    layers_to_transform = None
    if len(layer_sets) == 1:
        targets: Any = sorted({_short_name(mp.hf_names[0]) for mp in plans.values()})
        (layers,) = layer_sets
        if len(layers) != num_layers:
            layers_to_transform = list(layers)
    else:
        targets = sorted(n for n, _, _ in entries)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": r0, "lora_alpha": _number(a0), "lora_dropout": _dropout_of(mods),
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": rslora.pop(), "layers_to_transform": layers_to_transform, "layers_pattern": None,
        "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
        "use_dora": False, "exclude_modules": None,
    }


def _number(x: float) -> float | int:
    """Integral alphas as ints, as peft configs usually spell them."""
    return int(x) if float(x).is_integer() else float(x)


def _dropout_of(mods: Mapping[str, Any]) -> float:
    rates = {float(m.lora_dropout) for m in mods.values()}
    return rates.pop() if len(rates) == 1 else max(rates)


def save_peft_adapter(model: SentenceModel, out_dir: str | os.PathLike,
                      base_model_name_or_path: Optional[str] = None) -> pathlib.Path:
    """Writes `adapter_config.json` + `adapter_model.safetensors` (float32) that
    `peft.PeftModel.from_pretrained(MT5EncoderModel, out_dir)` and `load_peft_adapter` load.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = peft_adapter_config(model, base_model_name_or_path)
    hf_by_path = {p: hf for p, (hf, _, _) in linear_modules(model.cfg).items()}
    tensors = []
    for path, lin in lora_modules(model).items():
        a = np.asarray(jax.device_get(lin.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(lin.lora_b[...]), np.float32)
        ranks = lin.lora_a.get_metadata()["lora_ranks"]
        for i, (name, r) in enumerate(zip(hf_by_path[path], ranks)):
            if r:
                tensors.append((f"{PEFT_PREFIX}{name}.lora_A.weight", np.ascontiguousarray(a[i, :, :r].T)))
                tensors.append((f"{PEFT_PREFIX}{name}.lora_B.weight", np.ascontiguousarray(b[i, :r, :].T)))
    write_safetensors(out / ADAPTER_SAFETENSORS, iter(tensors), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


# ---------------------------------------------------------------------- memory
def training_memory(cfg: EncoderConfig, lcfg: LoRAConfig, base_dtype: str = "bfloat16",
                    lora_dtype: str = "float32", optimizer_slots: int = 2) -> dict[str, int]:
    """Bytes held by parameters, gradients and optimizer state for LoRA training (no activations).

    The frozen base has no gradient and no optimizer state; the LoRA factors (as stored,
    with rank padding) have one gradient and `optimizer_slots` moments (2 for Adam/AdamW).
    Counts come from `abstract_model`, so nothing is allocated.
    """
    plan = plan_lora(cfg, lcfg)
    base = count_params(nnx.state(abstract_model(cfg), nnx.Param))
    lora = sum(mp.stored_params for mp in plan.values())
    bb, lb = jnp.dtype(base_dtype).itemsize, jnp.dtype(lora_dtype).itemsize
    out = {"base_params": base, "lora_params": lora, "base_bytes": base * bb, "lora_bytes": lora * lb,
           "grad_bytes": lora * lb, "optimizer_bytes": optimizer_slots * lora * lb}
    out["total_bytes"] = out["base_bytes"] + out["lora_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    return out
