"""LoRA maths: which weights get adapters, attaching them, what trains, merging.

One declarative `LoRAConfig` picks the adapted weights; `apply_lora` attaches the factors
to the model; `split_trainable` hands the train step the trainable part only, so gradients
and optimizer state exist for LoRA alone (or for every `nnx.Param` in full fine-tune mode).

    lcfg = LoRAConfig(rank=8, alpha=16, targets=("q", "v"))
    dry_run(model, lcfg)                       # prints matches, trainable count and fraction
    model = apply_lora(model, lcfg, rngs_or_seed=0)
    graphdef, trainable, frozen = split_trainable(model, "lora")
    grads = jax.grad(lambda t: loss(nnx.merge(graphdef, t, frozen)))(trainable)
    with merged(model):                        # W + s A B in the kernels, restored exactly on exit
        ...

PEFT adapter files (`adapter_config.json`, `adapter_model.safetensors`) are read and
written by `mst5_jax.formats.peft`; this module knows no file format.

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

import contextlib
import dataclasses
import logging
import math
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.model import LoRAParam, LoRAScale, SentenceModel, abstract_model, count_params

log = logging.getLogger(__name__)

Targets = Union[Sequence[str], str]

# peft's default targets for T5 / mT5 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = ("q", "v")


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
    targets: Targets = DEFAULT_TARGETS
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
    """Stacked Linear path -> (per-layer HF module names, d_in, d_out) for `cfg`.

    The HF names are the module names of transformers' `T5EncoderModel` / `MT5EncoderModel`,
    the names peft's `target_modules` match against (e.g. `encoder.block.3.layer.0.SelfAttention.q`;
    the FFN sits in `layer.1.DenseReluDense`). They are also the HF weight names without
    `.weight`: `mst5_jax.formats.huggingface.hf_names` builds the kernels' tensor names from
    this table, so the two cannot disagree.
    """
    layers = range(cfg.num_layers)
    ffn = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
    shapes = {"q": (cfg.d_model, cfg.inner_dim), "k": (cfg.d_model, cfg.inner_dim),
              "v": (cfg.d_model, cfg.inner_dim), "o": (cfg.inner_dim, cfg.d_model),
              "wi": (cfg.d_model, cfg.d_ff), "wi_0": (cfg.d_model, cfg.d_ff),
              "wi_1": (cfg.d_model, cfg.d_ff), "wo": (cfg.d_ff, cfg.d_model)}
    out = {}
    for p in "qkvo":
        hf = tuple(f"encoder.block.{i}.layer.0.SelfAttention.{p}" for i in layers)
        out[f"encoder/layers/attention/{p}"] = (hf, *shapes[p])
    for f in ffn:
        hf = tuple(f"encoder.block.{i}.layer.1.DenseReluDense.{f}" for i in layers)
        out[f"encoder/layers/mlp/{f}"] = (hf, *shapes[f])
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
def module_at(model: SentenceModel, path: str):
    """The submodule of `model` at a slash path such as `encoder/layers/attention/q`."""
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
        lin = module_at(model, path)
        if lin.lora_a is not None or getattr(lin, "lora_merged_a", None) is not None:
            out[path] = lin
    return out


def has_lora(model: SentenceModel) -> bool:
    """Whether `model` carries unmerged LoRA factors (`LoRAParam` variables).

    False for a plain base and for a model whose adapters are all merged (`merge`); what
    callers use to decide between saving a PEFT adapter, merging, or saving the base alone.
    """
    return bool(nnx.to_flat_state(nnx.state(model, LoRAParam)))


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
        lin = module_at(model, path)
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
        attach(lin, mp, a, b, lcfg.dropout)
    return model


def attach(lin, mp: ModulePlan, a: jax.Array, b: jax.Array, dropout_rate: float) -> None:
    """Sets the factors of one stacked Linear: `a` [L, in, r_max], `b` [L, r_max, out] (float32).

    `mp` gives the per-layer ranks, alphas and scales, which travel as metadata of the
    factors (see the module docstring); `dropout_rate` is peft's lora_dropout.
    """
    meta = dict(lora_ranks=mp.ranks, lora_alphas=mp.alphas, lora_rslora=mp.use_rslora)
    lin.lora_a = LoRAParam(a, logical_axes=(lin.axes[0], "lora_rank"), **meta)
    lin.lora_b = LoRAParam(b, logical_axes=("lora_rank", lin.axes[1]), **meta)
    lin.lora_scale = LoRAScale(jnp.asarray(mp.scales, jnp.float32))
    lin.lora_dropout = float(dropout_rate)


def recorded_plan(model: SentenceModel, path: str) -> ModulePlan:
    """The ModulePlan of the Linear at `path`, as recorded in its `lora_a` metadata."""
    lin = module_at(model, path)
    a = lin.lora_a if lin.lora_a is not None else lin.lora_merged_a
    meta = a.get_metadata()
    _, d_in, _ = a.shape
    d_out = (lin.lora_b if lin.lora_b is not None else lin.lora_merged_b).shape[-1]
    hf = linear_modules(model.cfg)[path][0]
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


def _merge_module(lin, keep_kernel: bool) -> None:
    kernel = lin.kernel[...]
    delta = _delta(lin.lora_a[...], lin.lora_b[...], lin.lora_scale[...])
    if keep_kernel or kernel.dtype != jnp.float32:
        lin.lora_merged_kernel = LoRAMerged(kernel, logical_axes=lin.axes)
    lin.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    lin.lora_merged_a = LoRAMerged(lin.lora_a[...], **lin.lora_a.get_metadata())
    lin.lora_merged_b = LoRAMerged(lin.lora_b[...], **lin.lora_b.get_metadata())
    lin.lora_merged_scale = LoRAMerged(lin.lora_scale[...])
    lin.lora_a = lin.lora_b = lin.lora_scale = None


def _unmerge_module(lin) -> None:
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


def merge(model: SentenceModel) -> SentenceModel:
    """Folds every adapter into its kernel (W += s A B) for inference; mutates and returns.

    The factors move to `LoRAMerged` variables so `unmerge` can undo it. A float32 kernel is
    restored by subtracting the same delta (exact to float32 rounding, not bit-for-bit); a
    bf16 kernel keeps its original copy, since rounding to bf16 cannot be inverted. To merge
    for a moment and get the very same kernels back, use `merged`.
    """
    mods = [m for m in lora_modules(model).values() if m.lora_a is not None]
    if not mods:
        raise LoRAError("merge: the model has no unmerged LoRA factors")
    for lin in mods:
        _merge_module(lin, keep_kernel=False)
    return model


def unmerge(model: SentenceModel) -> SentenceModel:
    """Undoes `merge`: restores the base kernels and the separate LoRA path; mutates and returns."""
    mods = [m for m in lora_modules(model).values() if getattr(m, "lora_merged_a", None) is not None]
    if not mods:
        raise LoRAError("unmerge: the model has no merged LoRA factors")
    for lin in mods:
        _unmerge_module(lin)
    return model


@contextlib.contextmanager
def merged(model: SentenceModel) -> Iterator[SentenceModel]:
    """Inside the block every unmerged adapter is folded into its kernel (W + s A B); on exit
    the model is exactly as before.

        with merged(encoder.model) as m:
            save_hf(m, out_dir)            # writes the merged weights

    The original kernel arrays are kept and put back (not recomputed by subtracting the
    delta), so every kernel is bit-identical afterwards, float32 and bfloat16 alike, and the
    modules get back their LoRA variables and lose the merge bookkeeping, even when the
    block raises. A model without unmerged LoRA factors is yielded unchanged.
    """
    done = []
    try:
        for lin in [m for m in lora_modules(model).values() if m.lora_a is not None]:
            before = set(vars(lin))
            _merge_module(lin, keep_kernel=True)
            done.append((lin, before))
        yield model
    finally:
        for lin, before in done:
            _unmerge_module(lin)
            for name in set(vars(lin)) - before:  # the merge bookkeeping added above
                delattr(lin, name)


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
