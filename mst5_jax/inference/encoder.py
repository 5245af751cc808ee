"""`SentenceEncoder`: load a model, turn sentences into embeddings, save it back.

    enc = SentenceEncoder.from_pretrained("google/mt5-xxl", adapter="pkshatech/m-ST5")
    emb = enc.encode(["Hello", "Bonjour"])          # float32 [2, 4096]

Encoding sorts sentences by token length and runs them in a fixed set of bucket shapes.
The bucket lengths are the powers of two from 16 and the points half-way between them
(16, 24, 32, 48, 64, 96, ..., max_length), so a sentence of more than 16 tokens is padded
by less than a third of its bucket. A bucket's batch holds `max_batch_tokens // length` rows
rounded down to the device count times a power of two, so short buckets take more
sentences. A batch never mixes buckets; the rest of a bucket runs as batches of a few
halvings of the full row count (`row_options`), padded only at the end to the smallest.
Each shape is compiled once (under a lock, so threads may share an encoder) and reused.
Batches are dispatched asynchronously: the device computes batch i+1 while the host copies
out batch i. Results come back in input order; `EncodeStats` reports
sentences/s and the padding fraction.

CLI: `python -m mst5_jax.encode --model PATH [--adapter DIR] --input FILE --output FILE.npy`.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import pathlib
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mst5_jax.core import lora
from mst5_jax.core.config import ConfigError, EncoderConfig
from mst5_jax.core.model import SentenceModel
from mst5_jax.formats import huggingface, peft, run_dir, st_format
from mst5_jax.formats.tokenizer import Tokenizer
from mst5_jax.utils import fs, safety

log = logging.getLogger(__name__)

# What `SentenceEncoder.from_pretrained` raises for a bad model, adapter or config.json (user
# input, not a bug); each names the file and what was wrong, so CLIs print it without a traceback.
LOAD_ERRORS = (huggingface.CheckpointError, lora.LoRAError, ConfigError, safety.UnsafePathError)

_truncation = threading.local()


@contextlib.contextmanager
def truncation_summary(what: str) -> Iterator[dict]:
    """Within the block, `SentenceEncoder.encode` calls (in this thread) count truncated
    sentences instead of warning once each; one warning sums them at the end. An evaluator
    that encodes per language then warns once, not 15 times.

    Yields the running counts {"truncated", "sentences", "max_length": set of lengths}.
    """
    counts = {"truncated": 0, "sentences": 0, "max_length": set()}
    outer = getattr(_truncation, "counts", None)
    _truncation.counts = counts
    try:
        yield counts
    finally:
        _truncation.counts = outer
        if outer is not None:  # nested: the outer block reports
            outer["truncated"] += counts["truncated"]
            outer["sentences"] += counts["sentences"]
            outer["max_length"] |= counts["max_length"]
        elif counts["truncated"]:
            log.warning("%s: %d of %d sentences were truncated to max_length=%s tokens", what, counts["truncated"],
                        counts["sentences"], "/".join(map(str, sorted(counts["max_length"]))))


MIN_BUCKET = 16
TOKENS_PER_SENTENCE = 128   # default token budget per batch = batch_size * this
MIN_ROWS = 8                # the smallest batch a partial batch is padded to (per bucket)


def bucket_lengths(max_length: int) -> list[int]:
    """Padded lengths used for encoding, capped by max_length: the powers of two from 16 and
    the points half-way between them (16, 24, 32, 48, 64, 96, 128, 192, ...).

    On 2,000 Tatoeba lines (about 23 tokens each) rounding each sentence up to its bucket
    pads 18% of the positions, against 30% with powers of two alone, for about twice the
    compiled shapes (benchmarks/encode_bench.py reports what a whole encode pads).
    """
    out, n = [], MIN_BUCKET
    while n < max_length:
        out.extend(b for b in (n, n + n // 2) if b < max_length)
        n *= 2
    out.append(max_length)
    return out


def batch_rows(length: int, max_batch_tokens: int, num_devices: int = 1) -> int:
    """Rows of a full batch of bucket `length`: the token budget's share, rounded down to the
    devices times a power of two when it holds at least MIN_ROWS (so that its halvings,
    `row_options`, reach MIN_ROWS), else to a multiple of the devices."""
    per_device = max(max_batch_tokens // length // num_devices, 1)
    if per_device * num_devices >= MIN_ROWS:
        per_device = 1 << (per_device.bit_length() - 1)
    return per_device * num_devices


def row_options(full_rows: int, num_devices: int = 1) -> list[int]:
    """Row counts a batch of one bucket may have, largest first: `full_rows` and its halvings.

    A partial batch is padded to the smallest option that holds it, so a lone request does
    not pay for a full batch, while each bucket keeps a handful of compiled shapes. Every
    option is a multiple of `num_devices` and at least min(full_rows, MIN_ROWS).
    """
    out, r = [full_rows], full_rows
    while r % 2 == 0 and r // 2 >= max(MIN_ROWS, num_devices) and (r // 2) % num_devices == 0:
        r //= 2
        out.append(r)
    return out


def bucket_of(num_tokens: int, buckets: Sequence[int]) -> int:
    """The smallest bucket length that holds `num_tokens`."""
    for b in buckets:
        if b >= num_tokens:
            return b
    raise ValueError(f"{num_tokens} tokens exceed the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    """What one `encode` call did. Tokens count EOS; padded tokens are rows x length summed."""
    sentences: int
    seconds: float
    real_tokens: int
    padded_tokens: int
    batches: int
    truncated: int

    @property
    def sentences_per_s(self) -> float:
        return self.sentences / self.seconds if self.seconds > 0 else float("inf")

    @property
    def padding_fraction(self) -> float:
        """Share of the computed token positions that were padding (0 = none)."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


class SentenceEncoder:
    """A sentence encoder: tokenizer + `SentenceModel` (+ LoRA), with compiled bucket shapes.

    Attributes:
      model: the `SentenceModel` (an NNX module; LoRA factors, if any, live inside it).
      tokenizer: a `mst5_jax.formats.tokenizer.Tokenizer`.
      config: the model's `EncoderConfig`.
      compiled_shapes: the (batch, length) shapes compiled so far.
      last_stats: the `EncodeStats` of the latest finished `encode` call (informational; a
        caller sharing the encoder between threads should use `encode_ids`, which returns
        its own stats).
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
        self._compile_lock = threading.Lock()
        self.last_stats: Optional[EncodeStats] = None
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
            (`modules.json`), or a training run's MODEL_DIR. Any of the directories may be
            a ``gs://`` URL (`STORAGE_EMULATOR_HOST` redirects to an emulator); a model
            directory is staged into ``.cache/gcs`` first (`mst5_jax.utils.fs.stage`).
          adapter: optional PEFT LoRA adapter directory (or hub id, or ``gs://`` URL).
          dtype: compute dtype, "float32" or "bfloat16".
          param_dtype: storage dtype of the weights; defaults to `dtype`.
          step: for a training run, "latest", "best" or a step number.
          devices: devices to encode on (data parallel); default the first local device.
        """
        param_dtype = param_dtype or dtype
        p = fs.as_path(path)
        if p.is_dir() and (p / "checkpoints").is_dir():
            model, tok = run_dir.load_run_model(p, step=step, dtype=dtype, param_dtype=param_dtype)
            return cls(model, tok, source=str(p), devices=devices)
        model_dir = huggingface.resolve_model_dir(path)
        safety.check_tree(model_dir)  # symlinks only inside model_dir or its hub cache repo
        if (model_dir / "modules.json").is_file():
            model, tok = st_format.load(model_dir, dtype=dtype, param_dtype=param_dtype, **config_overrides)
        else:
            cfg_path = model_dir / "config.json"
            if not cfg_path.is_file():
                run = next((d for d in model_dir.absolute().parents[:3] if (d / "run.json").is_file()), None)
                if run is not None:  # e.g. MODEL_DIR/checkpoints or one of its step folders
                    raise huggingface.CheckpointError(
                        f"{model_dir}: config.json is missing; this folder is inside the training run {run}: "
                        f"pass the run folder itself ({run}; choose the step with --step latest|best|N)")
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
        with self._compile_lock:
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
        with self._compile_lock:
            return sorted(self._compiled)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def _fn(self, batch: int, length: int) -> Callable:
        key = (batch, length)
        fn = self._compiled.get(key)
        if fn is None:
            with self._compile_lock:  # two threads must not both compile (or race the dict)
                fn = self._compiled.get(key)
                if fn is None:
                    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=self._batch_sharding)
                    fn = jax.jit(_forward, static_argnums=0).lower(self._graphdef, self._state, ids, ids).compile()
                    self._compiled[key] = fn
        return fn

    def batch_shapes(self, max_length: int, max_batch_tokens: int) -> list[tuple[int, int]]:
        """Every (rows, length) shape `encode_ids` may run for these settings."""
        return [(rows, length) for length in bucket_lengths(max_length)
                for rows in row_options(batch_rows(length, max_batch_tokens, self.num_devices), self.num_devices)]

    def warmup(self, max_length: int, max_batch_tokens: int) -> list[tuple[int, int]]:
        """Compiles every shape of `batch_shapes` now (a server calls this before it is ready)."""
        shapes = self.batch_shapes(max_length, max_batch_tokens)
        for rows, length in shapes:
            self._fn(rows, length)
        return shapes

    def tokenize(self, sentences: Sequence[str], max_length: int) -> list[list[int]]:
        return self.tokenizer.encode_batch(list(sentences), max_length=max_length)

    def dispatch(self, rows_ids: Sequence[Sequence[int]], rows: int, length: int) -> jax.Array:
        """Starts the forward pass of one padded batch and returns without waiting.

        Args:
          rows_ids: at most `rows` token-id lists, each at most `length` long.
          rows, length: the batch shape (one of `batch_shapes`).
        Returns:
          A float32 device array [rows, d]; row r is the embedding of rows_ids[r] (rows past
          len(rows_ids) are padding). `np.asarray` on it waits for the result.
        """
        arr = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), np.int32)
        for r, row in enumerate(rows_ids):
            arr[r, : len(row)] = row
            mask[r, : len(row)] = 1
        if self._batch_sharding is not None:
            arr = jax.device_put(arr, self._batch_sharding)
            mask = jax.device_put(mask, self._batch_sharding)
        return self._fn(rows, length)(self._state, arr, mask)

    def encode_ids(self, ids: Sequence[Sequence[int]], max_length: int, max_batch_tokens: int,
                   progress: Optional[Callable[[int], Any]] = None) -> tuple[np.ndarray, EncodeStats]:
        """Embeds already-tokenised sentences: float32 [n, d] in input order, and the stats.

        Sentences are sorted by length (longest first) and grouped by bucket. Each bucket runs
        as full batches of `batch_rows(bucket, max_batch_tokens)` rows, then its rest as the
        largest `row_options` that fit, the last padded up to the smallest option; so at most
        MIN_ROWS - 1 rows of a bucket are padding. Each batch is dispatched before the
        previous one is copied out, so host and device overlap. `progress(k)` is called
        with the number of rows each finished batch delivered.
        """
        t0 = time.perf_counter()
        n, dim = len(ids), self.config.embedding_dim
        out = np.zeros((n, dim), np.float32)
        buckets = bucket_lengths(max_length)
        lengths = np.fromiter((len(x) for x in ids), np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        # Where each bucket's run of the sorted sentences ends (lengths are non-increasing).
        descending = -lengths[order]
        run_end = {b: int(np.searchsorted(descending, -lo, side="left")) for lo, b in zip([0] + buckets[:-1], buckets)}
        in_flight: collections.deque = collections.deque()
        real = int(lengths.sum())
        padded = batches = start = 0
        while start < n:
            length = bucket_of(int(lengths[order[start]]), buckets)
            options = row_options(batch_rows(length, max_batch_tokens, self.num_devices), self.num_devices)
            left = run_end[length] - start  # sentences of this bucket not yet batched
            rows = next((r for r in options if r <= left), options[-1])
            idx = order[start:start + min(rows, left)]
            in_flight.append((idx, self.dispatch([ids[i] for i in idx], rows, length)))
            if len(in_flight) > 1:  # keep one batch on the device while this one is copied out
                done_idx, emb = in_flight.popleft()
                out[done_idx] = np.asarray(emb)[: len(done_idx)]
                if progress is not None:
                    progress(len(done_idx))
            padded += rows * length
            batches += 1
            start += len(idx)
        while in_flight:
            done_idx, emb = in_flight.popleft()
            out[done_idx] = np.asarray(emb)[: len(done_idx)]
            if progress is not None:
                progress(len(done_idx))
        stats = EncodeStats(sentences=n, seconds=time.perf_counter() - t0, real_tokens=real,
                            padded_tokens=padded, batches=batches, truncated=0)
        return out, stats

    def encode(self, sentences: Sequence[str] | str, batch_size: int = 64, max_length: int = 512,
               normalize: bool = False, *, normalize_embeddings: Optional[bool] = None,
               show_progress_bar: bool = False, precision: str = "float32",
               convert_to_numpy: bool = True, max_batch_tokens: Optional[int] = None,
               **unused: Any) -> np.ndarray:
        """Embeds sentences. Returns float32 [n, d] (or quantized, see `precision`), input order.

        Args:
          sentences: a list of strings (a single string gives [d]).
          batch_size: sets the default token budget per batch, `batch_size * 128` tokens
            (so a 128-token bucket runs `batch_size` rows, a 16-token bucket 8x as many).
          max_length: tokens per sentence including EOS; longer input is truncated, with
            one warning per call.
          normalize / normalize_embeddings: L2-normalise the embeddings.
          show_progress_bar: a tqdm bar with sentences/s.
          precision: "float32", or "int8" / "uint8" / "binary" / "ubinary" quantized as
            sentence-transformers' `quantize_embeddings` does.
          max_batch_tokens: the token budget per batch (rows x bucket length); overrides
            the default from `batch_size`.
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
        budget = max_batch_tokens if max_batch_tokens is not None else batch_size * TOKENS_PER_SENTENCE
        if budget < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} must be positive")
        n = len(sentences)
        dim = self.config.embedding_dim
        if n == 0:
            return np.zeros((0, dim), np.float32)
        t0 = time.perf_counter()
        ids, truncated = self.tokenizer.encode_batch_counted(list(sentences), max_length=max_length)
        summary = getattr(_truncation, "counts", None)
        if summary is not None:
            summary["truncated"] += truncated
            summary["sentences"] += n
            summary["max_length"].add(max_length)
        elif truncated:
            log.warning("encode: %d of %d sentences were truncated to max_length=%d tokens", truncated, n, max_length)
        bar = _progress(n, show_progress_bar)
        out, stats = self.encode_ids(ids, max_length, budget, progress=None if bar is None else bar.update)
        if bar is not None:
            bar.close()
        self.last_stats = stats = dataclasses.replace(stats, seconds=time.perf_counter() - t0, truncated=truncated)
        log.debug("encode: %d sentences in %.3f s (%.1f sentences/s), %d batches, padding %.1f%%",
                  n, stats.seconds, stats.sentences_per_s, stats.batches, 100 * stats.padding_fraction)
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
                        dtype: Optional[str] = None) -> fs.AnyPath:
        """Writes an HF directory (`format="hf"`) or a sentence-transformers one.

        With LoRA and `merge_lora=True` the adapter is folded into the saved weights (the
        in-memory model is left bit-identical, `mst5_jax.core.lora.merged`); with
        `merge_lora=False` the base goes to `out_dir` and the adapter to
        `out_dir/adapter` as a PEFT directory. A ``gs://`` `out_dir` is written to a local
        temporary folder first, then uploaded file by file.
        """
        if fs.is_remote(out_dir):
            with tempfile.TemporaryDirectory(prefix="mst5-save-") as tmp:
                self.save_pretrained(tmp, format=format, merge_lora=merge_lora, dtype=dtype)
                fs.upload_dir(tmp, out_dir)
            return fs.as_path(out_dir)
        out = pathlib.Path(out_dir)
        if format == "sentence-transformers":
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

