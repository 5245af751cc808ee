"""PEFT LoRA adapter directories in and out (`adapter_config.json` + `adapter_model.*`).

    model = load_peft_adapter(load_hf_weights(base_dir, cfg), adapter_dir)
    save_peft_adapter(model, out_dir, base_model_name_or_path=str(base_dir))

A peft adapter for T5/mT5 names each tensor after the HF module it adapts:
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r], with
`<module>` as in `mst5_jax.core.lora.linear_modules` (the HF weight names of
`mst5_jax.formats.huggingface.hf_names` without `.weight`). The config is resolved as peft
resolves it (`lora_config_from_peft`, then `mst5_jax.core.lora.plan_lora`); the factors
become the stacked, rank-padded `lora_a` [L, in, r_max] / `lora_b` [L, r_max, out] of the core.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import re
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mst5_jax.core.lora import (DEFAULT_TARGETS, LoRAConfig, LoRAError, attach, linear_modules, lora_modules,
                                module_at, plan_lora, recorded_plan)
from mst5_jax.core.model import SentenceModel
from mst5_jax.formats.safetensors import CheckpointError, SafetensorsFile, write_safetensors
from mst5_jax.utils import safety
from mst5_jax.utils.files import write_json_atomic

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


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
        targets = DEFAULT_TARGETS
    layers = peft_cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(targets, str) and layers:
        raise LoRAError(f"{source}: layers_to_transform cannot be used with a regex target_modules (peft refuses it too)")
    _check_types(peft_cfg, source)
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


def _number_ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(peft_cfg: Mapping[str, Any], source: str) -> None:
    """JSON types of the supported keys, each error naming the key (peft writes these types)."""
    checks = {
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        "lora_alpha": (_number_ok, "a number"),
        "lora_dropout": (lambda v: v is None or _number_ok(v), "a number"),
        "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
        "target_modules": (lambda v: v is None or isinstance(v, str)
                           or (isinstance(v, list) and all(isinstance(t, str) for t in v)), "a string or a list of strings"),
        "exclude_modules": (lambda v: v is None or isinstance(v, str)
                            or (isinstance(v, list) and all(isinstance(t, str) for t in v)), "a string or a list of strings"),
        "layers_to_transform": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))
                                or (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)),
                                "an integer or a list of integers"),
        "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(
            isinstance(r, int) and not isinstance(r, bool) for r in v.values())), "an object of integers"),
        "alpha_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_number_ok(a) for a in v.values())),
                          "an object of numbers"),
    }
    for key, (ok, expected) in checks.items():
        if key in peft_cfg and not ok(peft_cfg[key]):
            raise LoRAError(f"{source}: {key}={peft_cfg[key]!r} must be {expected}")


# ---------------------------------------------------------------------- PEFT in
def _read_adapter_tensors(adapter_dir: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    st, binf = adapter_dir / ADAPTER_SAFETENSORS, adapter_dir / ADAPTER_BIN
    if st.is_file():
        f = SafetensorsFile(st)
        try:
            return st, _finite(st, {k: np.array(f.get(k), dtype=np.float32) for k in f.keys()})
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
        return binf, _finite(binf, {k: v.detach().float().numpy() for k, v in sd.items()})
    raise CheckpointError(f"{adapter_dir}: no adapter weights (looked for {ADAPTER_SAFETENSORS}, {ADAPTER_BIN})")


def _finite(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`tensors`, after refusing any NaN or Inf (it would make every embedding NaN), as base weights are."""
    for k, v in tensors.items():
        if not np.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k} contains NaN or Inf")
    return tensors


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
    safety.check_tree(adapter_dir)  # symlinks only inside adapter_dir or its hub cache repo
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a peft adapter directory)")
    try:
        peft_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(peft_cfg, dict):
        raise CheckpointError(f"{cfg_path}: a JSON {type(peft_cfg).__name__}, expected an object of peft settings")
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
        attach(module_at(model, path), mp, jnp.asarray(a), jnp.asarray(b), lcfg.dropout)
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
    plans = {p: recorded_plan(model, p) for p in mods}
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
    write_json_atomic(out / ADAPTER_CONFIG, config, sort_keys=True)
    return out
