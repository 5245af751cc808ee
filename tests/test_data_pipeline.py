"""tasks.pipeline.TripletIterator: contents, epochs, sharding and resume (TF-free).

Token ids are checked against `sentencepiece` run directly on the raw XNLI text, not
against the pipeline's own tokenizer.
"""
import os

import numpy as np
import pytest
import sentencepiece as spm

from tasks import registry, settings
from tasks.pipeline import TripletIterator

TASK, SPLIT, N = "mst5_nli_en_xnli", "validation", 830


@pytest.fixture(scope="module")
def vocab_path(data_dir, cache_dir):
    from mst5_jax.formats.vocab import default_vocab_path
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MST5_VOCAB", raising=False)
        return default_vocab_path(data_dir)  # the demo's cached model: built once per checkout


def make(data_dir, vocab_path, **kw):
    args = dict(task_name=TASK, data_dir=data_dir, vocab_path=vocab_path, max_length=16, batch_size=8, seed=3,
                split=SPLIT)
    args.update(kw)
    return TripletIterator(**args)


def test_first_batch_against_sentencepiece(data_dir, vocab_path):
    it = make(data_dir, vocab_path)
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "anchor": ((8, 16), np.int32), "positive": ((8, 16), np.int32), "negative": ((8, 16), np.int32),
        "group_id": ((8,), np.int32)}
    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    triplets = registry.get_triplets(TASK, SPLIT, data_dir)
    order = np.random.default_rng([3, 0]).permutation(N)[:8]  # documented epoch order
    for field in ("anchor", "positive", "negative"):
        expected = np.zeros((8, 16), np.int32)
        for r, i in enumerate(order):
            ids = sp.encode(getattr(triplets[i], field))[:15] + [1]
            expected[r, : len(ids)] = ids
        np.testing.assert_array_equal(batch[field], expected)
    np.testing.assert_array_equal(batch["group_id"], [triplets[i].group_id for i in order])
    assert it.get_state() == {"epoch": 0, "index": 8}


def test_epochs_visit_every_example_once_in_a_new_order(data_dir, vocab_path):
    it = make(data_dir, vocab_path, batch_size=83)
    first = it.example_indices(N)
    second = it.example_indices(N)
    assert sorted(first) == list(range(N)) == sorted(second)
    assert not np.array_equal(first, second)
    assert it.get_state() == {"epoch": 2, "index": 0}


def test_hosts_partition_the_global_stream(data_dir, vocab_path):
    hosts = [make(data_dir, vocab_path, batch_size=5, shard_index=h, num_shards=3) for h in range(3)]
    single = make(data_dir, vocab_path, batch_size=15)
    for _ in range(60):  # 60 * 15 = 900 > 830: crosses an epoch boundary
        g = next(single)
        parts = [next(h) for h in hosts]
        for k in g:
            # host h's row j is global row 3 j + h
            stacked = np.stack([p[k] for p in parts], axis=1).reshape(g[k].shape)
            np.testing.assert_array_equal(stacked, g[k])


def test_resume_mid_epoch_and_across_epochs(data_dir, vocab_path):
    straight = make(data_dir, vocab_path, batch_size=64, shard_index=1, num_shards=2)
    reference = [next(straight) for _ in range(40)]  # 40 * 64 * 2 > 3 epochs
    for cut in (5, 13, 27):
        it = make(data_dir, vocab_path, batch_size=64, shard_index=1, num_shards=2)
        for _ in range(cut):
            next(it)
        state = it.get_state()
        resumed = make(data_dir, vocab_path, batch_size=64, shard_index=1, num_shards=2)
        resumed.set_state(state)
        for want in reference[cut: cut + 6]:
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match="belongs to host 0"):
        resumed.set_state({"epoch": 0, "index": 2})


def test_offline_vocab_error_names_both_options(tmp_path, monkeypatch):
    monkeypatch.delenv("MST5_VOCAB", raising=False)
    settings.reset()
    with pytest.raises(FileNotFoundError, match=r"MST5_VOCAB.*data_dir"):
        settings.resolve_vocab_path(data_dir=tmp_path)
