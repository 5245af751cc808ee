"""`SentenceEncoder`: load a model, turn sentences into embeddings, save it back.

    enc = SentenceEncoder.from_pretrained("google/mt5-xxl", adapter="pkshatech/m-ST5")
    emb = enc.encode(["Hello", "Bonjour"])          # float32 [2, 4096]

Encoding sorts sentences by token length and runs them in a fixed set of bucket shapes
(batch_size x {16, 32, 64, ..., max_length}); each shape is compiled once and reused, the
last partial batch is padded rather than recompiled, and results come back in input order.

CLI: `python -m mst5_jax.encode --model PATH [--adapter DIR] --input FILE --output FILE.npy`.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mst5_jax.core import lora
from mst5_jax.core.config import ConfigError, EncoderConfig
from mst5_jax.core.model import SentenceModel
from mst5_jax.formats import huggingface, peft
from mst5_jax.utils import safety

log = logging.getLogger(__name__)

# What `SentenceEncoder.from_pretrained` raises for a bad model, adapter or config.json (user
# input, not a bug); each names the file and what was wrong, so CLIs print it without a traceback.
LOAD_ERRORS = (huggingface.CheckpointError, lora.LoRAError, ConfigError, safety.UnsafePathError)

MIN_BUCKET = 16


def bucket_lengths(max_length: int) -> list[int]:
    """Padded lengths used for encoding: powers of two from 16, capped by max_length."""
    out, n = [], MIN_BUCKET
    while n < max_length:
        out.append(n)
        n *= 2
    out.append(max_length)
    return out


def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


class SentenceEncoder:
    """A sentence encoder: tokenizer + `SentenceModel` (+ LoRA), with compiled bucket shapes.

    Attributes:
      model: the `SentenceModel` (an NNX module; LoRA factors, if any, live inside it).
      tokenizer: a `mst5_jax.formats.tokenizer.Tokenizer`.
      config: the model's `EncoderConfig`.
      compiled_shapes: the (batch, length) shapes compiled so far.
    """

    def __init__(self, model: SentenceModel, tokenizer: Any, *, source: Optional[str] = None,
                 adapter: Optional[str] = None, devices: Optional[Sequence[jax.Device]] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config: EncoderConfig = model.cfg
        self.source = source
        self.adapter = adapter
        self.devices = list(devices) if devices else jax.local_devices()[:1]
        self._compiled: dict[tuple[int, int], Callable] = {}
        self._graphdef = self._state = None
        self._refresh()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, adapter: Optional[str | os.PathLike] = None,
                        dtype: str = "float32", *, param_dtype: Optional[str] = None,
                        step: str | int = "latest", devices: Optional[Sequence[jax.Device]] = None,
                        **config_overrides: Any) -> "SentenceEncoder":
        """Loads an HF T5/mT5 directory or hub id, a sentence-transformers directory, or a run.

        Args:
          path: HF directory/hub id (`config.json`, a tokenizer, and safetensors, sharded
            safetensors or `pytorch_model.bin`), a sentence-transformers directory
            (`modules.json`), or a training run's MODEL_DIR.
          adapter: optional PEFT LoRA adapter directory (or hub id).
          dtype: compute dtype, "float32" or "bfloat16".
          param_dtype: storage dtype of the weights; defaults to `dtype`.
          step: for a training run, "latest", "best" or a step number.
          devices: devices to encode on (data parallel); default the first local device.
        """
        from mst5_jax.formats.tokenizer import Tokenizer

        param_dtype = param_dtype or dtype
        p = pathlib.Path(path).expanduser()
        if p.is_dir() and (p / "checkpoints").is_dir():
            from mst5_jax.training import run_checkpoints

            model, tok = run_checkpoints.load_run_model(p, step=step, dtype=dtype, param_dtype=param_dtype)
            return cls(model, tok, source=str(p), devices=devices)
        model_dir = huggingface.resolve_model_dir(path)
        safety.check_tree(model_dir)  # symlinks only inside model_dir or its hub cache repo
        if (model_dir / "modules.json").is_file():
            from mst5_jax.formats import st_format

            model, tok = st_format.load(model_dir, dtype=dtype, param_dtype=param_dtype, **config_overrides)
        else:
            cfg_path = model_dir / "config.json"
            if not cfg_path.is_file():
                raise huggingface.CheckpointError(f"{model_dir}: config.json is missing")
            cfg = EncoderConfig.from_hf_json(cfg_path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
            extra = {"projection/kernel": (huggingface.PROJECTION, True)} if cfg.projection_dim else None
            model = huggingface.load_hf_weights(model_dir, cfg, extra=extra)
            tok = Tokenizer.from_pretrained(model_dir)
        if adapter is not None:
            adapter_dir = huggingface.resolve_model_dir(adapter, allow_patterns=["adapter_*"])
            peft.load_peft_adapter(model, adapter_dir)
        return cls(model, tok, source=str(model_dir), adapter=None if adapter is None else str(adapter),
                   devices=devices)

    # ------------------------------------------------------------------ encoding
    def _refresh(self) -> None:
        """Re-splits the model (call after changing its weights in place)."""
        self._graphdef, self._state = nnx.split(self.model)
        if len(self.devices) > 1:
            mesh = jax.sharding.Mesh(np.array(self.devices), ("data",))
            self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
            self._state = jax.device_put(self._state, self._replicated)
        else:
            self._batch_sharding = None
        self._compiled.clear()

    def update_weights(self, model: SentenceModel) -> None:
        """Swaps in new weights of the same structure without recompiling (used during training)."""
        graphdef, state = nnx.split(model)
        if graphdef != self._graphdef:
            self.model = model
            self._refresh()
            return
        self.model = model
        self._state = state if len(self.devices) == 1 else jax.device_put(state, self._replicated)

    @property
    def compiled_shapes(self) -> list[tuple[int, int]]:
        return sorted(self._compiled)

    def _fn(self, batch: int, length: int) -> Callable:
        key = (batch, length)
        if key not in self._compiled:
            ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=self._batch_sharding)
            self._compiled[key] = (
                jax.jit(_forward, static_argnums=0).lower(self._graphdef, self._state, ids, ids).compile())
        return self._compiled[key]

    def tokenize(self, sentences: Sequence[str], max_length: int) -> list[list[int]]:
        return self.tokenizer.encode_batch(list(sentences), max_length=max_length)

    def encode(self, sentences: Sequence[str] | str, batch_size: int = 64, max_length: int = 512,
               normalize: bool = False, *, normalize_embeddings: Optional[bool] = None,
               show_progress_bar: bool = False, precision: str = "float32",
               convert_to_numpy: bool = True, **unused: Any) -> np.ndarray:
        """Embeds sentences. Returns float32 [n, d] (or quantized, see `precision`), input order.

        Args:
          sentences: a list of strings (a single string gives [d]).
          batch_size: sentences per compiled batch; rounded up to a multiple of the devices.
          max_length: tokens per sentence including EOS; longer input is truncated, with
            one warning per call.
          normalize / normalize_embeddings: L2-normalise the embeddings.
          show_progress_bar: a tqdm bar with sentences/s.
          precision: "float32", or "int8" / "uint8" / "binary" / "ubinary" quantized as
            sentence-transformers' `quantize_embeddings` does.
        """
        if unused:
            log.debug("encode: ignoring sentence-transformers options %s", sorted(unused))
        single = isinstance(sentences, str)
        if single:
            sentences = [sentences]
        if not isinstance(sentences, (list, tuple)):
            sentences = list(sentences)
        bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
        if bad:
            raise TypeError(f"encode expects strings; item {bad[0]} is {type(sentences[bad[0]]).__name__}"
                            f" ({len(bad)} non-string items)")
        if batch_size <= 0 or max_length <= 1:
            raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be positive (max_length >= 2)")
        n = len(sentences)
        dim = self.config.embedding_dim
        if n == 0:
            return np.zeros((0, dim), np.float32)
        ndev = len(self.devices)
        batch_size = -(-batch_size // ndev) * ndev
        ids = self.tokenize(sentences, max_length)
        truncated = getattr(self.tokenizer, "num_truncated", 0)
        if truncated:
            log.warning("encode: %d of %d sentences were truncated to max_length=%d tokens", truncated, n, max_length)
        buckets = bucket_lengths(max_length)
        order = sorted(range(n), key=lambda i: len(ids[i]), reverse=True)
        out = np.zeros((n, dim), np.float32)
        bar = _progress(n, show_progress_bar)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            longest = max(len(ids[i]) for i in idx)
            length = next(b for b in buckets if b >= longest)
            arr = np.zeros((batch_size, length), np.int32)
            for r, i in enumerate(idx):
                arr[r, : len(ids[i])] = ids[i]
            mask = np.zeros_like(arr)
            for r, i in enumerate(idx):
                mask[r, : len(ids[i])] = 1
            if self._batch_sharding is not None:
                arr = jax.device_put(arr, self._batch_sharding)
                mask = jax.device_put(mask, self._batch_sharding)
            emb = np.asarray(self._fn(batch_size, length)(self._state, arr, mask))
            out[idx] = emb[: len(idx)]
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        if normalize or normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        if precision != "float32":
            out = quantize(out, precision)
        return out[0] if single else out

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)] of float32 embeddings."""
        a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        return (a.astype(np.float32) @ b.astype(np.float32).T)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, out_dir: str | os.PathLike, *, format: str = "hf", merge_lora: bool = True,
                        dtype: Optional[str] = None) -> pathlib.Path:
        """Writes an HF directory (`format="hf"`) or a sentence-transformers one.

        With LoRA and `merge_lora=True` the adapter is folded into the saved weights (the
        in-memory model is left bit-identical, `mst5_jax.core.lora.merged`); with
        `merge_lora=False` the base goes to `out_dir` and the adapter to
        `out_dir/adapter` as a PEFT directory.
        """
        out = pathlib.Path(out_dir)
        if format == "sentence-transformers":
            from mst5_jax.formats import st_format

            return st_format.save(self, out, merge_lora=merge_lora)
        if format != "hf":
            raise ValueError(f"format={format!r}: expected 'hf' or 'sentence-transformers'")
        if lora.has_lora(self.model) and not merge_lora:
            huggingface.save_hf(self.model, out, dtype=dtype)
            peft.save_peft_adapter(self.model, out / "adapter", base_model_name_or_path=str(out))
        else:
            with lora.merged(self.model) as model:
                huggingface.save_hf(model, out, dtype=dtype)
        self.tokenizer.save(out)
        return out


def quantize(emb: np.ndarray, precision: str, ranges: Optional[np.ndarray] = None) -> np.ndarray:
    """sentence-transformers' `quantize_embeddings` semantics.

    int8/uint8: 256 buckets per dimension between `ranges` [2, d] (min and max rows;
    default: computed from `emb` itself). binary/ubinary: one bit per dimension (> 0),
    packed; "binary" is shifted by -128 into int8.
    """
    if precision in ("int8", "uint8"):
        if ranges is None:
            if emb.shape[0] < 2:
                raise ValueError(f"{precision} quantization needs ranges or at least 2 embeddings")
            ranges = np.vstack((emb.min(axis=0), emb.max(axis=0)))
        ranges = np.asarray(ranges, np.float32)
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        q = np.clip(np.floor((emb - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    if precision == "binary":
        return (np.packbits(emb > 0, axis=-1) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(emb > 0, axis=-1)
    raise ValueError(f"precision={precision!r}: expected float32, int8, uint8, binary or ubinary")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        log.warning("show_progress_bar needs tqdm")
        return None
    return tqdm(total=total, unit="sent", desc="encode")

