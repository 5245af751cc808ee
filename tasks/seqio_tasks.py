"""seqio twins of the triplet tasks in `tasks.registry` (imported by ``import tasks`` when seqio is).

Each task's source is the registry's triplets (so every path gives the same triplets),
served by a `seqio.FunctionDataSource`:

* ``shuffle=False``: one epoch in canonical order (seqio repeats it for ``num_epochs``).
* ``shuffle=True``: the numpy epoch order of `tasks.pipeline.epoch_order` (seed from
  ``get_dataset(seed=...)``, 0 if None), epochs chained into one infinite stream. seqio
  does no shuffling of its own (the source declares internal shuffling).

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
path (which concatenates) in distribution, not batch for batch.

The vocabulary is one lazily resolved `seqio.SentencePieceVocabulary`: the path comes
from `tasks.configure(vocab_path=...)` (gin), ``$MST5_VOCAB``, or the cached local model
(`mst5_jax.formats.vocab`), when a dataset is first built, not at import.
"""
from __future__ import annotations

import functools
import itertools
import logging
from typing import Optional

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
    """A seqio Mixture that keeps ``group_id`` (seqio drops non-feature fields otherwise)."""

    def get_dataset(self, *args, passthrough_features=None, **kwargs):
        return super().get_dataset(*args, passthrough_features=list(passthrough_features or []) + ["group_id"],
                                   **kwargs)


class TripletDataSource(seqio.FunctionDataSource):
    """A FunctionDataSource that shuffles internally (numpy, by epoch), so seqio does not."""

    @property
    def performs_internal_shuffling(self) -> bool:
        return True


def _dataset_fn(name: str):
    def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
        seed = 0 if seed is None else int(seed)
        triplets = registry.get_triplets(name, split, settings.resolve_data_dir(), seed)
        table = {f: tf.constant([getattr(t, f) for t in triplets], dtype=tf.string) for f in FEATURES}
        table["group_id"] = tf.constant(np.asarray([t.group_id for t in triplets], np.int32))
        n = len(triplets)
        if shuffle_files:
            order = tf.data.Dataset.from_generator(
                lambda: (int(i) for e in itertools.count() for i in epoch_order(n, seed, e)),
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


def register_all() -> None:
    """Registers every registry task and mixture with seqio, now and as they are added."""
    registry.add_listener(_register)
