"""seqio twins of the triplet tasks in `tasks.registry` (imported by ``import tasks`` when seqio is).

Each task's source is the registry's triplets (so every path gives the same triplets),
served by a `seqio.FunctionDataSource`:

* ``shuffle=False``: one epoch in canonical order (seqio repeats it for ``num_epochs``).
* ``shuffle=True``: the numpy epoch order of `tasks.pipeline.epoch_order` (seed from
  ``get_dataset(seed=...)``, 0 if None), epochs chained into one infinite stream. seqio
  does no shuffling of its own (the source declares internal shuffling). Inside
  `start_position(p)` the stream built starts at global position p (a resume seeks there
  instead of replaying).

Layout, per example, after the task's preprocessors (`seqio.preprocessors.tokenize`
without ``*_pretokenized`` copies, then `append_eos_after_trim`)::

    anchor, positive, negative: int32 [<= L]  (output features: rank 1, EOS 1, pad 0)
    group_id:                   int32 []       (passed through; not a seqio Feature)

One example per triplet. `TripletFeatureConverter` pads the three features to [L] and
passes ``group_id`` through, so ``seqio.get_dataset(..., batch_size=B)`` gives
[B, L] x 3 + [B], identical to `tasks.pipeline.TripletIterator` for the same task,
split, seed, vocabulary and shard. Per-host sharding is ``seqio.ShardInfo(index,
num_shards)`` (seqio shards the example stream). Mixtures are seqio Mixtures with
examples-proportional rates; seqio samples them, so their batches match the numpy
path (which concatenates) in distribution, not batch for batch. Their group ids get the
offsets of `registry.mixture_group_offsets`, as in the numpy concatenation.

`SeqioTripletIterator` is the training-side reader: `seqio.get_dataset` with a per-host
``ShardInfo``, batched into `tasks.pipeline.TripletIterator`'s layout, with the same
``get_state``/``set_state``.

The vocabulary is one lazily resolved `seqio.SentencePieceVocabulary`: the path comes
from `tasks.configure(vocab_path=...)` (gin), ``$MST5_VOCAB``, or the cached local model
(`mst5_jax.formats.vocab`), when a dataset is first built, not at import.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
from typing import Iterator, Optional

import numpy as np
import seqio
import tensorflow as tf

from tasks import registry, settings
from tasks.pipeline import FEATURES, epoch_order

log = logging.getLogger(__name__)


class LazySentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A SentencePieceVocabulary whose file is resolved at first use (see module docstring)."""

    def __init__(self):
        super().__init__(sentencepiece_model_file="<resolved at first use>", extra_ids=0)
        self._resolved: Optional[str] = None

    def _model_context(self):
        path = settings.resolve_vocab_path()
        if path != self._resolved:
            self._resolved = path
            self._sentencepiece_model_file = path
            self._model = None
        return super()._model_context()

    @property
    def sentencepiece_model_file(self) -> str:
        self._model_context()
        return self._sentencepiece_model_file

    def _encode_tf(self, s):
        """Python sentencepiece inside the graph, as the numpy path tokenizes.

        tf_text's SentencePiece build breaks ties between equal-score segmentations
        differently from the `sentencepiece` package (e.g. '....' as '.' + '...' or
        '...' + '.'), which would break the identical-batches guarantee.
        """
        if s.shape.rank != 0:
            return super()._encode_tf(s)
        sp = self.tokenizer

        def encode(text: bytes) -> np.ndarray:
            return np.asarray(sp.encode(text.decode("utf-8")), dtype=np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids


VOCABULARY = LazySentencePieceVocabulary()
OUTPUT_FEATURES = {name: seqio.Feature(vocabulary=VOCABULARY, add_eos=True, dtype=tf.int32, rank=1, required=True)
                   for name in FEATURES}


class TripletSeqioMixture(seqio.Mixture):
    """A seqio Mixture that keeps ``group_id`` (seqio drops non-feature fields otherwise) and
    offsets each task's group ids as the numpy concatenation does."""

    def get_dataset(self, *args, passthrough_features=None, **kwargs):
        self._offsets: dict = {}  # (split, seed) -> registry.mixture_group_offsets, for this call
        return super().get_dataset(*args, passthrough_features=list(passthrough_features or []) + ["group_id"],
                                   **kwargs)

    def get_task_dataset(self, task, output_feature_keys, sequence_length, split, use_cached, shuffle, seed,
                         *args, **kwargs):
        ds = super().get_task_dataset(task, output_feature_keys, sequence_length, split, use_cached, shuffle, seed,
                                      *args, **kwargs)
        key = (split, 0 if seed is None else int(seed))
        cache = self.__dict__.setdefault("_offsets", {})
        if key not in cache:
            cache[key] = registry.mixture_group_offsets(self.name, split, settings.resolve_data_dir(), key[1])
        offset = cache[key][task.name]
        if not offset:
            return ds
        return ds.map(lambda ex: {**ex, "group_id": ex["group_id"] + offset})


class TripletDataSource(seqio.FunctionDataSource):
    """A FunctionDataSource that shuffles internally (numpy, by epoch), so seqio does not."""

    @property
    def performs_internal_shuffling(self) -> bool:
        return True


_START_POSITION = 0


@contextlib.contextmanager
def start_position(position: int):
    """Shuffled task streams built inside this context start at global position `position`
    (= epoch * n + index in `tasks.pipeline.epoch_order` terms) instead of 0."""
    global _START_POSITION
    old, _START_POSITION = _START_POSITION, int(position)
    try:
        yield
    finally:
        _START_POSITION = old


def _stream(n: int, seed: int, start: int):
    first_epoch, first_index = divmod(start, n)
    for e in itertools.count(first_epoch):
        order = epoch_order(n, seed, e)
        yield from (int(i) for i in (order[first_index:] if e == first_epoch else order))


def _dataset_fn(name: str):
    def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
        seed = 0 if seed is None else int(seed)
        start = _START_POSITION  # read now: tf.data calls the generator later, outside the context
        triplets = registry.get_triplets(name, split, settings.resolve_data_dir(), seed)
        table = {f: tf.constant([getattr(t, f) for t in triplets], dtype=tf.string) for f in FEATURES}
        table["group_id"] = tf.constant(np.asarray([t.group_id for t in triplets], np.int32))
        n = len(triplets)
        if shuffle_files:
            order = tf.data.Dataset.from_generator(lambda: _stream(n, seed, start),
                                                   output_signature=tf.TensorSpec((), tf.int64))
        else:
            order = tf.data.Dataset.range(n)
        return order.map(lambda i: {k: tf.gather(v, i) for k, v in table.items()})
    dataset_fn.__name__ = f"{name}_dataset_fn"
    return dataset_fn


class TripletFeatureConverter(seqio.FeatureConverter):
    """Pads anchor/positive/negative to [L] and passes ``group_id`` (int32 []) through.

    Task features ``anchor``, ``positive``, ``negative``: int32 [<= L], EOS last. Model
    features: the same, right-padded with 0 to exactly [L]; plus the pass-through
    ``group_id``. Batched: [B, L] x 3 and [B]. No packing. seqio's pass-through API needs
    ``group_id`` in ``task_feature_lengths`` (its value is unused): use
    `triplet_feature_lengths(L)`.
    """

    TASK_FEATURES = {f: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for f in FEATURES}
    MODEL_FEATURES = {f: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for f in FEATURES}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, pack: bool = False, **kwargs):
        if pack:
            raise ValueError("TripletFeatureConverter does not pack: one example per triplet")
        kwargs.setdefault("passthrough_features",
                          {"group_id": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)})
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths) -> tf.data.Dataset:
        return seqio.utils.trim_and_pad_dataset(ds, {f: task_feature_lengths[f] for f in FEATURES})

    def get_model_feature_lengths(self, task_feature_lengths):
        return dict(task_feature_lengths)


def triplet_feature_lengths(max_length: int) -> dict[str, int]:
    """``task_feature_lengths`` for `TripletFeatureConverter`: L for the texts, 0 for group_id."""
    return {**{f: int(max_length) for f in FEATURES}, "group_id": 0}


def _num_train_examples(task: seqio.Task) -> float:
    return float(len(registry.get_triplets(task.name, "train", settings.resolve_data_dir(), 0)))


def _register(item) -> None:
    if isinstance(item, registry.TripletTask):
        if item.name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(item.name)
        seqio.TaskRegistry.add(
            item.name,
            source=TripletDataSource(_dataset_fn(item.name), splits=item.splits),
            output_features=OUTPUT_FEATURES,
            preprocessors=[
                functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                seqio.preprocessors.append_eos_after_trim,
            ],
            shuffle_buffer_size=None,
        )
    elif isinstance(item, registry.TripletMixture):
        if item.name in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.remove(item.name)
        seqio.MixtureRegistry.add(item.name, [(t, _num_train_examples) for t in item.task_names],
                                  mixture_cls=TripletSeqioMixture)


_REGISTERED = False


def register_all() -> None:
    """Registers every registry task and mixture with seqio, now and as they are added (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        registry.add_listener(_register)
        _REGISTERED = True


@contextlib.contextmanager
def _settings(data_dir: os.PathLike, vocab_path: str):
    """`settings.configure(data_dir, vocab_path)` while a dataset is built, then the old settings
    back: the source reads the data dir and the vocabulary resolves its file at build time."""
    saved = dict(vars(settings.get()))
    settings.configure(data_dir=str(data_dir), vocab_path=str(vocab_path))
    try:
        yield
    finally:
        settings.reset()
        settings.configure(**saved)


class SeqioTripletIterator:
    """`tasks.pipeline.TripletIterator`'s interface, read through `seqio.get_dataset`.

    Args: as `TripletIterator` (train split only); `vocab_path` must be a SentencePiece
    model file. Batches: the same layout, {"anchor", "positive", "negative": int32 [B, L],
    "group_id": int32 [B]}.

    Reading: ``seqio.get_dataset(name, ..., shuffle=True, seed=seed, num_epochs=None,
    shard_info=seqio.ShardInfo(shard_index, num_shards))`` with `TripletFeatureConverter`,
    then ``batch(B, drop_remainder=True)``. For a task this is the numpy iterator's stream,
    batch for batch. A mixture is sampled by seqio with its rates (seed `seed`).

    State: ``{"epoch", "index"}`` is the global position of this host's next example, as in
    `TripletIterator` (for a mixture: of the mixed stream, epoch length = `len(self)`), plus
    ``"pipeline": "seqio"``. `set_state` on a task rebuilds the dataset starting there
    (`start_position`, no replay); on a mixture it rebuilds from the start and skips the
    host's consumed examples (a replay through tokenization: exact, O(examples consumed)).
    """

    def __init__(self, task_name: str, data_dir: Optional[os.PathLike], vocab_path: str, max_length: int,
                 batch_size: int, seed: int, shard_index: int = 0, num_shards: int = 1):
        from mst5_jax.formats.tokenizer import Tokenizer  # noqa: PLC0415

        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
        self.task_name = task_name
        self.is_mixture = task_name in registry.MIXTURES
        if not self.is_mixture and task_name not in registry.TASKS:
            raise KeyError(f"unknown task or mixture {task_name!r}; registered: {registry.task_names()}")
        self.data_dir = settings.resolve_data_dir(data_dir)
        self.vocab_path = str(vocab_path)
        self.max_length, self.batch_size, self.seed = int(max_length), int(batch_size), int(seed)
        self.shard_index, self.num_shards = int(shard_index), int(num_shards)
        self.tokenizer = Tokenizer.from_pretrained(self.vocab_path)
        self._epoch_size = len(registry.get_triplets(task_name, "train", self.data_dir, self.seed))
        self._build(self.shard_index)
        log.info("%s/train through seqio (%s): %d triplets per epoch, host %d of %d, batch %d x %d", task_name,
                 "mixture, sampled by rate" if self.is_mixture else "task", self._epoch_size, shard_index,
                 num_shards, batch_size, max_length)

    def __len__(self) -> int:
        return self._epoch_size

    def _build(self, position: int) -> None:
        """The host's dataset from global position `position` (this host's next example)."""
        host0 = position - self.shard_index
        with _settings(self.data_dir, self.vocab_path), start_position(0 if self.is_mixture else host0):
            ds = seqio.get_dataset(self.task_name, triplet_feature_lengths(self.max_length),
                                   TripletFeatureConverter(), dataset_split="train", shuffle=True,
                                   num_epochs=None, seed=self.seed, verbose=False,
                                   shard_info=seqio.ShardInfo(index=self.shard_index, num_shards=self.num_shards))
        if self.is_mixture and host0:
            ds = ds.skip(host0 // self.num_shards)
        self._it: Iterator = ds.batch(self.batch_size, drop_remainder=True).prefetch(2).as_numpy_iterator()
        self._position = position

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._position += self.batch_size * self.num_shards
        return {k: np.asarray(batch[k]) for k in (*FEATURES, "group_id")}

    def get_state(self) -> dict:
        epoch, index = divmod(self._position, self._epoch_size)
        return {"epoch": int(epoch), "index": int(index), "pipeline": "seqio"}

    def set_state(self, state: dict) -> None:
        if self.is_mixture and state.get("pipeline") != "seqio":
            raise ValueError(f"data state {dict(state)} was saved by the {state.get('pipeline', 'numpy')} "
                             f"pipeline; mixture {self.task_name!r} is read in a different order under seqio "
                             "(sampled by rate), so it cannot resume there: resume with DATA_PIPELINE='numpy'")
        position = int(state["epoch"]) * self._epoch_size + int(state["index"])
        if position % self.num_shards != self.shard_index:
            raise ValueError(f"state {dict(state)} is global position {position}, which belongs to host "
                             f"{position % self.num_shards}, not host {self.shard_index} of {self.num_shards}")
        self._build(position)
