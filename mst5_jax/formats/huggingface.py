"""Hugging Face checkpoints in and out: safetensors (single or sharded) and pytorch_model.bin.

Import streams one tensor at a time: safetensors files are memory-mapped and validated by
`mst5_jax.formats.safetensors` (no torch needed, bf16 included); `.bin` files go through
`torch.load(mmap=True, weights_only=True)`. Each target parameter is assembled on the host
in its final dtype (per-layer tensors written into one stacked buffer), placed on its
devices with its sharding, and released before the next one, so a 51.7 GB fp32 mt5-xxl
`.bin` (encoder, decoder and lm_head) never needs a second full copy in memory.

Kernels cross in torch's [out, in] layout and are transposed on the devices, where each
shard transposes locally (the placement uses the target sharding with its last two axes
swapped): numpy's strided 2-byte copy runs at 0.1-0.5 GB/s, which for xxl's 9.3 GB of
kernels would be minutes of host time in both directions (`benchmarks/NOTES.md`).

HF name -> parameter path (kernels are the transpose of torch's `weight`):

    shared.weight | encoder.embed_tokens.weight              -> encoder/token_embedder/embedding
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                             -> encoder/relpos_bias/embedding
    encoder.block.{i}.layer.0.layer_norm.weight              -> encoder/layers/attention_norm/scale[i]
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight -> encoder/layers/attention/{q,k,v,o}/kernel[i]
    encoder.block.{i}.layer.1.layer_norm.weight              -> encoder/layers/mlp_norm/scale[i]
    encoder.block.{i}.layer.1.DenseReluDense.{wi,wi_0,wi_1,wo}.weight
                                                             -> encoder/layers/mlp/{...}/kernel[i]
    encoder.final_layer_norm.weight                          -> encoder/final_norm/scale

`decoder.*` and `lm_head.*` are skipped and counted in the log.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.lora import linear_modules
from mst5_jax.core.model import SentenceModel, abstract_model, path_str
from mst5_jax.formats.safetensors import CheckpointError, SafetensorsFile, write_safetensors
from mst5_jax.utils import fs, paths, safety

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# The optional bias-free sentence projection, stored [out, in] like a torch Linear. transformers
# ignores it (an unexpected key); `SentenceEncoder.from_pretrained` reads it when the config
# has `mst5_jax.projection_dim`.
PROJECTION = "projection.weight"

# ---------------------------------------------------------------------- locating files
def resolve_model_dir(path: str | os.PathLike, allow_patterns: Optional[list[str]] = None) -> pathlib.Path:
    """A local directory as is, a ``gs://`` directory staged into ``.cache/gcs`` (see
    `mst5_jax.utils.fs.stage`), or a hub id downloaded to the HF cache (needs the network)."""
    if fs.is_remote(path):
        if not fs.as_path(path).is_dir():
            raise CheckpointError(f"{os.fspath(path)}: no such gs:// directory (no objects under this prefix)")
        return fs.stage(path, paths.CACHE_DIR / "gcs")
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a model directory, got a file")
    name = str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: no such directory (and not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download
        return pathlib.Path(snapshot_download(name, allow_patterns=allow_patterns or [
            "*.json", "*.model", "*.safetensors", "pytorch_model.bin", "*.txt", "1_Pooling/*", "2_Dense/*"]))
    except Exception as e:  # offline, unknown repo, auth
        raise CheckpointError(f"{name}: not a local directory, and the hub download failed: {e}") from e


def weight_files(model_dir: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
    """("safetensors" | "bin", files) for a directory, preferring safetensors.

    Every file must resolve inside `model_dir` or its hub cache repository (symlink policy,
    `mst5_jax.utils.safety`)."""
    kind, files = _weight_files(model_dir)
    for f in files:
        safety.resolve_inside(f, model_dir)
    return kind, files


def _weight_files(model_dir: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
    d = pathlib.Path(model_dir)
    if (d / SAFETENSORS).is_file():
        return "safetensors", [d / SAFETENSORS]
    for index_name, kind in ((SAFETENSORS_INDEX, "safetensors"), (TORCH_BIN_INDEX, "bin")):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
            files = []
            for shard in sorted(set(weight_map.values())):
                if "/" in shard or "\\" in shard or shard in ("..", ".") or not shard:
                    raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file name")
                f = d / shard
                if not f.is_file():
                    raise CheckpointError(f"{index}: shard {shard} is missing from {d}")
                files.append(f)
            return kind, files
    if (d / TORCH_BIN).is_file():
        return "bin", [d / TORCH_BIN]
    raise CheckpointError(
        f"{d}: no weights found (looked for {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN}, {TORCH_BIN_INDEX})")


# ---------------------------------------------------------------------- tensor readers
class TensorSource:
    """Random access to the tensors of an HF weights directory, one tensor at a time."""

    def __init__(self, model_dir: pathlib.Path):
        self.kind, self.files = weight_files(model_dir)
        self._where: dict[str, Any] = {}
        self._handles = []
        for f in self.files:
            if self.kind == "safetensors":
                h = SafetensorsFile(f)
                for k in h.keys():
                    self._where[k] = h
            else:
                import torch  # only to read .bin files

                try:
                    h = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:
                    raise CheckpointError(f"{f}: could not read as a torch state dict ({e})") from e
                if not isinstance(h, dict):
                    raise CheckpointError(f"{f}: expected a state dict, got {type(h).__name__}")
                for k in h:
                    self._where[k] = h
            self._handles.append(h)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        h = self._where[name]
        if isinstance(h, SafetensorsFile):
            return h.get(name)
        t = h[name]
        import torch

        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def release(self, name: str) -> None:
        h = self._where.get(name)
        if isinstance(h, SafetensorsFile):
            h.release(name)

    def close(self):
        for h in self._handles:
            if isinstance(h, SafetensorsFile):
                h.close()
        self._handles.clear()
        self._where.clear()


# ---------------------------------------------------------------------- name mapping
def hf_names(cfg: EncoderConfig) -> dict[str, list[tuple[str, bool]]]:
    """Parameter path -> list of (HF tensor name, transpose), one per layer for stacked params.

    The kernels' names are the HF module names of `mst5_jax.core.lora.linear_modules` plus
    `.weight` (the names peft adapters refer to, `mst5_jax.formats.peft`).
    """
    layers = range(cfg.num_layers)
    blk = "encoder.block.{}.layer.{}"
    m: dict[str, list[tuple[str, bool]]] = {
        "encoder/token_embedder/embedding": [("shared.weight", False)],
        "encoder/relpos_bias/embedding": [("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False)],
        "encoder/final_norm/scale": [("encoder.final_layer_norm.weight", False)],
        "encoder/layers/attention_norm/scale": [(blk.format(i, 0) + ".layer_norm.weight", False) for i in layers],
        "encoder/layers/mlp_norm/scale": [(blk.format(i, 1) + ".layer_norm.weight", False) for i in layers],
    }
    for path, (modules, _, _) in linear_modules(cfg).items():
        m[f"{path}/kernel"] = [(f"{name}.weight", True) for name in modules]
    return m


_ALIASES = {"shared.weight": ("encoder.embed_tokens.weight",)}


def _skipped(name: str) -> bool:
    return name.startswith(("decoder.", "lm_head."))


# ---------------------------------------------------------------------- import
def load_hf_weights(
    model_dir: str | os.PathLike,
    cfg: EncoderConfig,
    shardings: Optional[dict[str, jax.sharding.Sharding]] = None,
    extra: Optional[dict[str, tuple[str, bool]]] = None,
) -> SentenceModel:
    """Builds a `SentenceModel` from the weights in `model_dir`, in `cfg.param_dtype`.

    Args:
      model_dir: an HF directory (see `weight_files`).
      cfg: the architecture; every shape is checked against it.
      shardings: optional parameter path -> sharding; default is the first device.
      extra: extra parameter path -> (tensor name, transpose) read from the same files
        (used for a sentence-transformers projection stored in its own file).
    Returns:
      The model, with every parameter placed and no host copy kept.
    """
    model_dir = pathlib.Path(model_dir)
    source = TensorSource(model_dir)
    try:
        abstract = abstract_model(cfg)
        graphdef, state = nnx.split(abstract)
        names = hf_names(cfg)
        used: set[str] = set()
        flat = dict((path_str(p), (p, v)) for p, v in nnx.to_flat_state(state))
        target_dtype = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(np.float32)
        leaves = {}
        for name, (path, var) in flat.items():
            if name == "projection/kernel":
                continue
            shape = tuple(var.get_value().shape)
            entries = names.get(name)
            if entries is None:
                raise CheckpointError(f"{model_dir}: no HF tensor mapping for parameter {name}")
            transpose = _transposed(entries)
            host = np.empty(_swap_last_two(shape) if transpose else shape, target_dtype)
            stacked = len(entries) > 1 or name.startswith("encoder/layers/")
            for i, (tname, _) in enumerate(entries):
                tname = _find(source, tname, model_dir)
                used.add(tname)
                t = source.get(tname)
                if not (np.issubdtype(t.dtype, np.floating) or t.dtype == ml_dtypes.bfloat16):
                    raise CheckpointError(f"{model_dir}: tensor {tname} has dtype {t.dtype}; expected a floating "
                                          "dtype (float32, float16, bfloat16 or float64)")
                want = shape[1:] if stacked else shape
                want = _swap_last_two(want) if transpose else want
                if tuple(t.shape) != tuple(want):
                    raise CheckpointError(
                        f"{model_dir}: tensor {tname} has shape {tuple(t.shape)}, expected {tuple(want)} for config "
                        f"(d_model={cfg.d_model}, d_ff={cfg.d_ff}, heads={cfg.num_heads}, d_kv={cfg.d_kv}, "
                        f"vocab={cfg.vocab_size})")
                _copy_released(host[i] if stacked else host, t, lambda: source.release(tname))
                if not _all_finite(host[i] if stacked else host):
                    raise CheckpointError(f"{model_dir}: tensor {tname} contains NaN or Inf")
                del t
                source.release(tname)
            sharding = (shardings or {}).get(name)
            if transpose:
                leaves[name] = _transpose_on_device(_place(host, _swapped_sharding(sharding, host.ndim)), sharding)
            else:
                leaves[name] = _place(host, sharding)
            del host
        for name, (tname, transpose) in (extra or {}).items():
            t = source.get(_find(source, tname, model_dir))
            leaves[name] = _place(np.ascontiguousarray((t.T if transpose else t).astype(target_dtype)),
                                  (shardings or {}).get(name))
        missing = [n for n in flat if n not in leaves]
        if missing:
            raise CheckpointError(f"{model_dir}: no tensor found for parameters {missing}")
        skipped = [k for k in source.keys() if _skipped(k)]
        unused = [k for k in source.keys() if k not in used and not _skipped(k)
                  and k not in ("encoder.embed_tokens.weight", "shared.weight")
                  and "relative_attention_bias" not in k]
        log.info("loaded %d encoder tensors from %s (%s); skipped %d decoder/lm_head tensors",
                 len(used), model_dir, source.kind, len(skipped))
        if unused:
            log.warning("%s: %d tensors were not used: %s", model_dir, len(unused), unused[:5])
        for name, (path, var) in flat.items():
            var.set_value(leaves[name])
        return nnx.merge(graphdef, state)
    finally:
        source.close()


def _all_finite(a: np.ndarray, chunk: int = 1 << 22) -> bool:
    """No NaN/Inf in `a`, checked in chunks of 4M elements (bounded temporary memory)."""
    flat = a.reshape(-1)
    return all(bool(np.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.size, chunk))


_CHUNK_BYTES = 64 << 20


def _copy_released(dst: np.ndarray, src: np.ndarray, release: Callable[[], None]) -> None:
    """dst[...] = src (cast), in ~64 MiB pieces of rows, dropping the source's pages after each.

    `src` is a memory-mapped tensor: copying piece by piece keeps only one piece of the file
    resident, so a 768 MB embedding costs 64 MB, not 768.
    """
    n = src.shape[0] if src.ndim else 1
    step = max(_CHUNK_BYTES // max(src.nbytes // max(n, 1), 1), 1)
    if src.ndim == 0 or n <= step:
        np.copyto(dst, src, casting="unsafe")
        release()
        return
    for r in range(0, n, step):
        np.copyto(dst[r:r + step], src[r:r + step], casting="unsafe")
        release()


def _transposed(entries: list[tuple[str, bool]]) -> bool:
    """Whether a parameter's HF tensors are stored transposed (kernels: torch's [out, in])."""
    return all(t for _, t in entries)


def _swap_last_two(shape: tuple) -> tuple:
    return (*shape[:-2], shape[-1], shape[-2])


def _swapped_sharding(sharding: Optional[jax.sharding.Sharding], ndim: int) -> Optional[jax.sharding.Sharding]:
    """`sharding` for the array with its last two axes swapped (so the transpose is shard-local)."""
    if sharding is None or sharding.is_fully_replicated:
        return sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        raise TypeError(f"kernel shardings must be NamedSharding or fully replicated, got {sharding}")
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*_swap_last_two(spec)))


def _swap_axes(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


@functools.lru_cache(maxsize=None)
def _swap_jit(sharding: Optional[jax.sharding.Sharding]) -> Callable:
    return jax.jit(_swap_axes) if sharding is None else jax.jit(_swap_axes, out_shardings=sharding)


def _transpose_on_device(x: jax.Array, sharding: Optional[jax.sharding.Sharding]) -> jax.Array:
    """x with its last two axes swapped, computed where x lives, placed with `sharding`."""
    return _swap_jit(sharding)(x)


def _find(source: TensorSource, name: str, model_dir) -> str:
    if name in source:
        return name
    for alias in _ALIASES.get(name, ()):
        if alias in source:
            return alias
    raise CheckpointError(f"{model_dir}: tensor {name} is missing" +
                          (f" (also looked for {', '.join(_ALIASES[name])})" if name in _ALIASES else ""))


def _place(host: np.ndarray, sharding: Optional[jax.sharding.Sharding]) -> jax.Array:
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


# ---------------------------------------------------------------------- export
def hf_state_dict(model: SentenceModel, dtype: Optional[str] = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy array) for the encoder, one tensor at a time (kernels transposed)."""
    cfg = model.cfg
    flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for name, entries in hf_names(cfg).items():
        value = flat[name].get_value()
        if _transposed(entries):  # to torch's [out, in], on the devices (see the module doc)
            value = _transpose_on_device(value, None)
        value = np.asarray(jax.device_get(value))
        if dtype is not None:
            value = value.astype(np.float32 if dtype == "float32" else ml_dtypes.bfloat16)
        stacked = len(entries) > 1 or name.startswith("encoder/layers/")
        for i, (tname, _) in enumerate(entries):
            yield tname, value[i] if stacked else value


def save_hf(model: SentenceModel, out_dir: str | os.PathLike, dtype: Optional[str] = None) -> fs.AnyPath:
    """Writes `config.json` + `model.safetensors` that `MT5EncoderModel.from_pretrained` loads.

    A ``gs://`` `out_dir` is written to a local temporary folder, then uploaded."""
    if fs.is_remote(out_dir):
        with tempfile.TemporaryDirectory(prefix="mst5-save-hf-") as tmp:
            save_hf(model, tmp, dtype)
            fs.upload_dir(tmp, out_dir)
        return fs.as_path(out_dir)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = dtype or cfg.param_dtype
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tensors = hf_state_dict(model, dtype)
    if model.projection is not None:  # sentence-t5's Dense, kept beside the encoder (see `PROJECTION`)
        kernel = np.asarray(jax.device_get(model.projection.kernel[...]))
        if dtype is not None:
            kernel = kernel.astype(np.float32 if dtype == "float32" else ml_dtypes.bfloat16)
        tensors = itertools.chain(tensors, [(PROJECTION, np.ascontiguousarray(kernel.T))])
    write_safetensors(out / SAFETENSORS, tensors, metadata={"format": "pt"})
    return out
