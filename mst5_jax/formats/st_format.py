"""sentence-transformers directories in and out (`SentenceEncoder` calls these).

A sentence-transformers (ST) model directory lists its pipeline in `modules.json`. The
ST5 / m-ST5 pipelines this project reads and writes are

    modules.json                 [Transformer, Pooling, (Dense), (Normalize)]
    config.json, model.safetensors | pytorch_model.bin, tokenizer files
                                 the T5/mT5 encoder (module path "" or "0_Transformer")
    sentence_bert_config.json    {"max_seq_length": .., "do_lower_case": false}
    1_Pooling/config.json        mean | cls | max pooling (legacy `pooling_mode_*_tokens`
                                 booleans or the newer `pooling_mode` string)
    2_Dense/config.json          in_features, out_features, bias=false, Identity activation
    2_Dense/model.safetensors | pytorch_model.bin
                                 `linear.weight` [out, in] (torch layout)
    3_Normalize/                 L2 normalisation (no files needed)

which is the layout of the released `sentence-transformers/sentence-t5-*` checkpoints (T5
v1.0 encoder, mean pooling, bias-free Dense, Normalize) and what ST 6.2 writes. The
Dense maps onto `SentenceModel.projection` (kernel [in, out] = `linear.weight`.T) and
Normalize onto `EncoderConfig.normalize`.

`save` writes module types and configs in the legacy spelling
(`sentence_transformers.models.*`, `pooling_mode_mean_tokens`), which every ST release
from 2.x to 6.x loads, and the Dense weights as safetensors.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

from mst5_jax import __version__
from mst5_jax.core import lora
from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.model import Linear, SentenceModel
from mst5_jax.formats import huggingface
from mst5_jax.formats.safetensors import write_safetensors
from mst5_jax.formats.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MODULES_JSON = "modules.json"
ST_CONFIG = "sentence_bert_config.json"
DENSE_WEIGHT = "linear.weight"
IDENTITY = "torch.nn.modules.linear.Identity"
_POOLING_FROM_ST = {"mean": "mean", "cls": "first", "max": "max"}
_POOLING_TO_LEGACY = {"mean": "pooling_mode_mean_tokens", "first": "pooling_mode_cls_token",
                      "max": "pooling_mode_max_tokens"}
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}


class STFormatError(huggingface.CheckpointError):
    """A sentence-transformers directory this project cannot represent exactly."""


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise STFormatError(f"{path}: missing") from e
    except json.JSONDecodeError as e:
        raise STFormatError(f"{path}: not valid JSON ({e})") from e


def _kind(module_type: str) -> str:
    """'Transformer' | 'Pooling' | 'Dense' | 'Normalize' | other class name, from a modules.json type."""
    return module_type.rsplit(".", 1)[-1]


def _pooling_mode(cfg: dict, where: pathlib.Path) -> str:
    """This project's pooling name for a 1_Pooling/config.json (either spelling)."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = [m for k, m in _LEGACY_POOLING_KEYS.items() if cfg.get(k)]
        mode = modes[0] if len(modes) == 1 else (tuple(modes) if modes else "mean")
    if isinstance(mode, (list, tuple)):
        mode = tuple(mode)
        if len(mode) == 1:
            mode = mode[0]
    if isinstance(mode, tuple) or mode not in _POOLING_FROM_ST:
        raise STFormatError(f"{where}: pooling {mode!r} is not supported (mean, cls or max, one at a time)")
    if cfg.get("include_prompt") is False:
        log.warning("%s: include_prompt=false only matters with prompts, which this encoder does not add", where)
    return _POOLING_FROM_ST[mode]


def read_modules(model_dir: pathlib.Path) -> dict[str, Any]:
    """Parses modules.json and the module configs into a plain description.

    Returns:
      {"transformer_dir": Path, "pooling": str, "dense_dir": Path | None,
       "dense": {"in": int, "out": int} | None, "normalize": bool, "max_seq_length": int | None}
    Raises:
      STFormatError naming the file and module for anything without an exact equivalent
      (a Dense with bias or activation, two Dense layers, unknown modules, lower-casing).
    """
    modules = _read_json(model_dir / MODULES_JSON)
    if not isinstance(modules, list) or not modules:
        raise STFormatError(f"{model_dir / MODULES_JSON}: expected a non-empty list of modules")
    modules = sorted(modules, key=lambda m: m.get("idx", 0))
    out: dict[str, Any] = {"transformer_dir": None, "pooling": "mean", "dense_dir": None, "dense": None,
                           "normalize": False, "max_seq_length": None}
    seen_pooling = False
    for m in modules:
        kind, sub = _kind(m.get("type", "")), m.get("path", "")
        d = model_dir / sub
        where = f"{model_dir / MODULES_JSON} module {m.get('idx')} ({m.get('type')})"
        if kind == "Transformer":
            if out["transformer_dir"] is not None:
                raise STFormatError(f"{where}: a second Transformer module")
            out["transformer_dir"] = d
            cfg_path = d / ST_CONFIG
            st_cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
            if st_cfg.get("do_lower_case"):
                raise STFormatError(f"{cfg_path}: do_lower_case=true is not supported (lower-case the input yourself)")
            out["max_seq_length"] = st_cfg.get("max_seq_length")
        elif kind == "Pooling":
            out["pooling"] = _pooling_mode(_read_json(d / "config.json"), d / "config.json")
            seen_pooling = True
        elif kind == "Dense":
            if out["dense"] is not None:
                raise STFormatError(f"{where}: more than one Dense module; only one bias-free projection is supported")
            dcfg = _read_json(d / "config.json")
            if dcfg.get("bias", True):
                raise STFormatError(f"{d / 'config.json'}: Dense with bias=true is not supported (the projection is bias-free)")
            act = dcfg.get("activation_function", "torch.nn.modules.activation.Tanh")
            if act != IDENTITY:
                raise STFormatError(f"{d / 'config.json'}: Dense activation {act!r} is not supported (expected {IDENTITY})")
            if dcfg.get("use_residual"):
                raise STFormatError(f"{d / 'config.json'}: Dense use_residual=true is not supported")
            out["dense_dir"] = d
            out["dense"] = {"in": int(dcfg["in_features"]), "out": int(dcfg["out_features"])}
        elif kind == "Normalize":
            out["normalize"] = True
        else:
            raise STFormatError(f"{where}: module type {kind!r} is not supported (Transformer, Pooling, Dense, Normalize)")
    if out["transformer_dir"] is None:
        raise STFormatError(f"{model_dir / MODULES_JSON}: no Transformer module")
    if not seen_pooling:
        raise STFormatError(f"{model_dir / MODULES_JSON}: no Pooling module")
    return out


def load(model_dir: str | os.PathLike, dtype: str = "float32", param_dtype: Optional[str] = None,
         **overrides: Any) -> tuple[SentenceModel, Any]:
    """Reads a sentence-transformers directory into (SentenceModel, Tokenizer).

    Args:
      model_dir: the directory holding `modules.json`.
      dtype / param_dtype: compute and storage dtypes (the projection computes in float32).
      overrides: `EncoderConfig` fields to override (after those the modules imply).
    Returns:
      The model (pooling, projection and normalisation as the modules say) and the
      tokenizer of the Transformer module's directory.
    """
    model_dir = pathlib.Path(model_dir)
    desc = read_modules(model_dir)
    tdir: pathlib.Path = desc["transformer_dir"]
    st_fields = dict(pooling=desc["pooling"], normalize=desc["normalize"], projection_dim=None)
    st_fields.update({k: overrides.pop(k) for k in list(overrides) if k in st_fields})
    cfg = EncoderConfig.from_hf_json(tdir / "config.json", dtype=dtype, param_dtype=param_dtype or dtype,
                                     **st_fields, **overrides)
    model = huggingface.load_hf_weights(tdir, cfg)
    if desc["dense"] is not None:
        dense = desc["dense"]
        if dense["in"] != cfg.d_model:
            raise STFormatError(f"{desc['dense_dir'] / 'config.json'}: in_features={dense['in']} but the encoder's "
                                f"d_model is {cfg.d_model}")
        attach_projection(model, _read_dense_weight(desc["dense_dir"], dense))
    if desc["max_seq_length"]:
        log.info("%s: sentence-transformers truncates at max_seq_length=%d; pass encode(max_length=%d) to match",
                 model_dir, desc["max_seq_length"], desc["max_seq_length"])
    return model, Tokenizer.from_pretrained(tdir)


def _read_dense_weight(dense_dir: pathlib.Path, dense: dict) -> np.ndarray:
    """`linear.weight` [out, in] from 2_Dense/model.safetensors or pytorch_model.bin."""
    source = huggingface.TensorSource(dense_dir)
    try:
        if DENSE_WEIGHT not in source:
            raise STFormatError(f"{dense_dir}: no tensor {DENSE_WEIGHT} (found {source.keys()})")
        w = np.array(source.get(DENSE_WEIGHT), dtype=np.float32)
    finally:
        source.close()
    if w.shape != (dense["out"], dense["in"]):
        raise STFormatError(f"{dense_dir}: {DENSE_WEIGHT} has shape {w.shape}, expected "
                            f"({dense['out']}, {dense['in']}) from its config.json")
    return w


def attach_projection(model: SentenceModel, weight_out_in: np.ndarray) -> SentenceModel:
    """Gives `model` a bias-free projection with torch-layout weight [out, in] (in place)."""
    d_out, d_in = weight_out_in.shape
    cfg = model.cfg.replace(projection_dim=int(d_out))
    lin = Linear(d_in, d_out, ("embed", "projection"), cfg.replace(dtype="float32"), 1.0, nnx.Rngs(params=0))
    lin.kernel.set_value(jax.device_put(np.ascontiguousarray(weight_out_in.T).astype(cfg.param_dtype)))
    model.projection = nnx.data(lin)
    model.cfg = cfg
    return model


# ---------------------------------------------------------------------- saving
def save(encoder, out_dir: str | os.PathLike, *, merge_lora: bool = True, max_seq_length: int = 512,
         dtype: Optional[str] = None) -> pathlib.Path:
    """Writes `encoder` as a sentence-transformers directory that `SentenceTransformer(out)` loads.

    The Transformer module sits in the root (config.json, model.safetensors, tokenizer
    files), followed by Pooling, a Dense when the model has a projection, and Normalize
    when `config.normalize` is set. LoRA is merged into the written weights, and the
    encoder's own kernels are left bit-identical (`mst5_jax.core.lora.merged`).

    Args:
      encoder: a `SentenceEncoder`.
      out_dir: the directory to write (created).
      merge_lora: must be True when the model has LoRA factors: the format has no place
        for an unmerged adapter (use `save_pretrained(format="hf", merge_lora=False)`).
      max_seq_length: written to sentence_bert_config.json (ST truncates there).
      dtype: storage dtype of the written weights (default: the model's).
    """
    out = pathlib.Path(out_dir)
    model: SentenceModel = encoder.model
    if lora.has_lora(model) and not merge_lora:
        raise ValueError("the sentence-transformers format stores merged weights; pass merge_lora=True, or save "
                         "format='hf' with merge_lora=False to keep the adapter separate")
    with lora.merged(model):  # the encoder's kernels come back bit-identical
        return _write(encoder, out, max_seq_length, dtype)


def _write(encoder, out: pathlib.Path, max_seq_length: int, dtype: Optional[str]) -> pathlib.Path:
    model: SentenceModel = encoder.model
    cfg: EncoderConfig = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    hf = cfg.replace(projection_dim=None, normalize=False).to_hf_dict()
    hf["torch_dtype"] = dtype or cfg.param_dtype
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    write_safetensors(out / huggingface.SAFETENSORS, huggingface.hf_state_dict(model, dtype), metadata={"format": "pt"})
    encoder.tokenizer.save(out)
    _write_json(out / ST_CONFIG, {"max_seq_length": int(max_seq_length), "do_lower_case": False})
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    pool_dir = out / "1_Pooling"
    pool_dir.mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": cfg.d_model}
    pooling.update({k: False for k in _LEGACY_POOLING_KEYS})
    pooling[_POOLING_TO_LEGACY[cfg.pooling]] = True
    pooling["include_prompt"] = True
    _write_json(pool_dir / "config.json", pooling)
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if model.projection is not None:
        dense_dir = out / "2_Dense"
        dense_dir.mkdir(exist_ok=True)
        kernel = np.asarray(jax.device_get(model.projection.kernel.get_value()), np.float32)  # [in, out]
        _write_json(dense_dir / "config.json", {"in_features": int(kernel.shape[0]), "out_features": int(kernel.shape[1]),
                                                "bias": False, "activation_function": IDENTITY})
        weight = np.ascontiguousarray(kernel.T)
        if (dtype or cfg.param_dtype) == "bfloat16":
            import ml_dtypes

            weight = weight.astype(ml_dtypes.bfloat16)
        write_safetensors(dense_dir / huggingface.SAFETENSORS, iter([(DENSE_WEIGHT, weight)]), metadata={"format": "pt"})
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if cfg.normalize:
        idx = len(modules)
        (out / f"{idx}_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    _write_json(out / MODULES_JSON, modules)
    _write_json(out / "config_sentence_transformers.json",
                {"__version__": {"mst5_jax": __version__}, "prompts": {}, "default_prompt_name": None,
                 "similarity_fn_name": "cosine"})
    return out


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
