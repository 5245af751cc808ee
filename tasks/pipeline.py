"""TensorFlow-free triplet batches: task -> triplets -> token ids -> numpy batches.

Batch layout (the same as `tasks.seqio_tasks.TripletFeatureConverter` gives, batched)::

    {"anchor":   int32 [B, L],   # token ids, EOS (1) last, right-padded with 0
     "positive": int32 [B, L],
     "negative": int32 [B, L],
     "group_id": int32 [B]}      # English block index; translations share it

with B the per-host batch and L = max_length. A text longer than L keeps its first L-1
pieces and then EOS.

Order. The task's triplets (canonical order) form one epoch; epoch e visits them in the
order ``np.random.default_rng([seed, e]).permutation(n)`` (`epoch_order`). Epochs follow
each other as one infinite global stream; host `shard_index` of `num_shards` takes global
positions ``shard_index, shard_index + num_shards, ...`` (what seqio's ``ShardInfo`` does
with ``ds.shard``), and each batch is the host's next B examples, so a batch may span an
epoch boundary. The state ``{"epoch", "index"}`` is the global position of the host's
next example; `set_state` seeks there directly (no replay).
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Optional

import numpy as np

from tasks import registry, settings
from tasks.triplets import Triplet

log = logging.getLogger(__name__)

FEATURES = ("anchor", "positive", "negative")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) that epoch `epoch` visits: int64 [n]."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def tokenize_triplets(triplets: list[Triplet], tokenizer, max_length: int) -> dict[str, list[list[int]]]:
    """Token ids (EOS last, at most `max_length`) of each text field; logs the truncations."""
    out: dict[str, list[list[int]]] = {}
    truncated = 0
    for field in FEATURES:
        texts = [getattr(t, field) for t in triplets]
        unique = list(dict.fromkeys(texts))  # premises repeat: tokenize each text once
        ids, cut = tokenizer.encode_batch_counted(unique, max_length=max_length)
        truncated += cut
        table = dict(zip(unique, ids))
        out[field] = [table[t] for t in texts]
    if truncated:
        log.warning("%d distinct texts were truncated to max_length=%d tokens", truncated, max_length)
    return out


class TripletIterator:
    """Infinite iterator of per-host triplet batches for a registered task or mixture.

    Args:
      task_name: a name from `tasks.registry` (e.g. ``mst5_xnli_cross``).
      data_dir: data root (None: ``$MST5_DATA_DIR`` / settings).
      vocab_path: SentencePiece model or HF tokenizer directory (None: `settings.resolve_vocab_path`).
      max_length: L, tokens per text including EOS.
      batch_size: B, examples per host batch.
      seed: drives the recipe's random choices (cross-lingual languages) and the epoch order.
      shard_index, num_shards: this host's shard.
      split: ``train`` or ``validation``.
    """

    def __init__(self, task_name: str, data_dir: Optional[os.PathLike], vocab_path: Optional[str],
                 max_length: int, batch_size: int, seed: int, shard_index: int = 0, num_shards: int = 1,
                 split: str = "train"):
        from mst5_jax.formats.tokenizer import Tokenizer  # noqa: PLC0415

        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.task_name = task_name
        self.split = registry.normalize_split(split)
        self.data_dir = settings.resolve_data_dir(data_dir)
        self.seed = int(seed)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.shard_index, self.num_shards = int(shard_index), int(num_shards)
        self.examples: list[Triplet] = registry.get_triplets(task_name, self.split, self.data_dir, self.seed)
        self.tokenizer = Tokenizer.from_pretrained(settings.resolve_vocab_path(vocab_path, self.data_dir))
        self.tokenized = tokenize_triplets(self.examples, self.tokenizer, self.max_length)
        self._group_ids = np.asarray([t.group_id for t in self.examples], dtype=np.int32)
        self._position = self.shard_index  # global position of this host's next example
        self._order_cache: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        log.info("%s/%s: %d triplets per epoch, host %d of %d, batch %d x %d", task_name, self.split,
                 len(self.examples), shard_index, num_shards, batch_size, max_length)

    def __len__(self) -> int:
        """Triplets per epoch (all hosts together)."""
        return len(self.examples)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(len(self.examples), self.seed, epoch))
        return self._order_cache[1]

    def example_indices(self, count: int) -> np.ndarray:
        """Indices into `examples` of this host's next `count` examples (advances the state)."""
        n = len(self.examples)
        out = np.empty(count, dtype=np.int64)
        for k in range(count):
            epoch, index = divmod(self._position, n)
            out[k] = self._order(epoch)[index]
            self._position += self.num_shards
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self.example_indices(self.batch_size)
        batch = {f: self.tokenizer.pad([self.tokenized[f][i] for i in idx], self.max_length) for f in FEATURES}
        batch["group_id"] = self._group_ids[idx]
        return batch

    def get_state(self) -> dict[str, int]:
        epoch, index = divmod(self._position, len(self.examples))
        return {"epoch": int(epoch), "index": int(index)}

    def set_state(self, state: dict) -> None:
        position = int(state["epoch"]) * len(self.examples) + int(state["index"])
        if position % self.num_shards != self.shard_index:
            raise ValueError(f"state {dict(state)} is global position {position}, which belongs to host "
                             f"{position % self.num_shards}, not host {self.shard_index} of {self.num_shards}")
        self._position = position

