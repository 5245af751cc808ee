"""seqio registration, seqio == numpy batches, and TFDS sources through tfds mock data.

One module-scoped TensorFlow set-up; TFDS is fed real XNLI rows in TFDS feature form, so
the TFDS path must reproduce the local path's triplets (random mock text would give none).
"""
import collections

import numpy as np
import pytest

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import tasks  # noqa: E402
from tasks import registry, settings, sources  # noqa: E402
from tasks.pipeline import TripletIterator  # noqa: E402
from tasks.seqio_tasks import TripletFeatureConverter, triplet_feature_lengths  # noqa: E402
from tasks.triplets import LABELS, XNLI_LANGUAGES, mono_triplets, triplets_from_rows  # noqa: E402


@pytest.fixture(scope="module")
def env(data_dir):
    from mst5_jax.formats.vocab import default_vocab_path
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MST5_VOCAB", raising=False)
        vocab = default_vocab_path(data_dir)
    settings.reset()
    settings.configure(data_dir=str(data_dir), vocab_path=vocab)
    yield {"vocab": vocab, "data_dir": data_dir}
    settings.reset()


def _get(name, L=16, B=4, **kw):
    args = dict(dataset_split="validation", shuffle=False, batch_size=B)
    args.update(kw)
    return seqio.get_dataset(name, triplet_feature_lengths(L), TripletFeatureConverter(), **args)


def test_every_task_with_local_data_builds(env):
    assert tasks.SEQIO_REGISTERED
    on_hand = [n for n in tasks.task_names() if n not in ("mst5_nli_en", "mst5_msimcse_cross_all")]
    for name in on_hand:
        provider = seqio.get_mixture_or_task(name)
        assert set(provider.output_features) == {"anchor", "positive", "negative"}
        batch = next(_get(name).as_numpy_iterator())
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            "anchor": ((4, 16), np.int32), "positive": ((4, 16), np.int32), "negative": ((4, 16), np.int32),
            "group_id": ((4,), np.int32)}, name
        for k in ("anchor", "positive", "negative"):
            lengths = (batch[k] != 0).sum(1)
            assert (batch[k][np.arange(4), lengths - 1] == 1).all(), (name, k)  # EOS last
    print(f"\nseqio get_dataset OK for {len(on_hand)} names")


@pytest.mark.parametrize("name,batches", [("mst5_nli_en_xnli", 110), ("mst5_xnli_cross", 12)])
def test_seqio_and_numpy_paths_give_identical_batches(env, name, batches):
    ds = _get(name, L=24, B=8, shuffle=True, seed=7, num_epochs=None, shard_info=seqio.ShardInfo(1, 2))
    it = TripletIterator(name, env["data_dir"], env["vocab"], 24, 8, 7, shard_index=1, num_shards=2,
                         split="validation")
    for i, (a, b) in enumerate(zip(ds.as_numpy_iterator(), it)):
        if i == batches:
            break
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} batch {i} {k}")


def _tfds_xnli_rows(data_dir, split):
    """Real XNLI rows in TFDS `xnli` feature form, in a shuffled order (as TFDS would)."""
    data = sources.read_xtreme_xnli(data_dir, split)
    n = len(data)
    order = np.random.default_rng(0).permutation(n)
    langs = list(XNLI_LANGUAGES)
    return {
        "premise": {lang: np.array([data.rows[lang][i].premise for i in order], dtype=object) for lang in langs},
        "hypothesis": {"language": np.array([langs] * n, dtype=object),
                       "translation": np.array([[data.rows[lang][i].hypothesis for lang in langs] for i in order],
                                               dtype=object)},
        "label": np.array([LABELS.index(data.rows["en"][i].label) for i in order], dtype=np.int64),
    }


def _tfds_pair_rows(data_dir, split):
    rows = sources.read_xtreme_xnli(data_dir, split).rows["en"]
    return {"premise": np.array([r.premise for r in rows], dtype=object),
            "hypothesis": np.array([r.hypothesis for r in rows], dtype=object),
            "label": np.array([LABELS.index(r.label) for r in rows], dtype=np.int64)}


@pytest.fixture(scope="module")
def tfds_mock(env):
    data_dir = env["data_dir"]
    feeds = {("xnli", "validation"): _tfds_xnli_rows(data_dir, "dev"),
             ("xnli", "test"): _tfds_xnli_rows(data_dir, "test"),
             ("snli", "train"): _tfds_pair_rows(data_dir, "dev"),        # stand-ins with real text
             ("multi_nli", "train"): _tfds_pair_rows(data_dir, "test")}
    calls = collections.Counter()

    def as_dataset_fn(self, split, *args, **kwargs):
        calls[(self.name, str(split))] += 1
        return tf.data.Dataset.from_tensor_slices(feeds[(self.name, str(split))])

    sources._read_tfds_xnli_cached.cache_clear()
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset_fn):
        yield calls
    sources._read_tfds_xnli_cached.cache_clear()  # mocked rows must not outlive the mock


def _key(ts):
    return sorted((t.anchor, t.positive, t.negative) for t in ts)


def test_tfds_xnli_gives_the_local_triplets(env, tfds_mock):
    local = {s: sources.read_xtreme_xnli(env["data_dir"], s) for s in ("dev", "test")}
    settings.configure(train_source="xnli_tfds")
    try:
        for split, local_split in (("validation", "dev"), ("train", "test")):
            for lang in ("en", "ur", "zh", "sw"):
                got = registry.get_triplets(f"mst5_xnli_mono_{lang}", split, env["data_dir"])
                assert _key(got) == _key(mono_triplets(local[local_split], lang)), (split, lang)
        assert tfds_mock[("xnli", "validation")] >= 1 and tfds_mock[("xnli", "test")] >= 1
    finally:
        settings.configure(train_source="xnli_local")


def test_nli_en_and_paper_mixture_through_tfds(env, tfds_mock):
    settings.configure(nli_en_source="tfds")
    got = registry.get_triplets("mst5_nli_en", "train", env["data_dir"])
    want = (triplets_from_rows(sources.read_xtreme_xnli(env["data_dir"], "dev").rows["en"])[0]
            + triplets_from_rows(sources.read_xtreme_xnli(env["data_dir"], "test").rows["en"])[0])
    assert _key(got) == _key(want) and len(got) == 830 + 1670
    assert len({t.group_id for t in got}) == 2500  # SNLI and MNLI groups do not collide
    batch = next(_get("mst5_nli_en", dataset_split="train").as_numpy_iterator())
    assert batch["anchor"].shape == (4, 16)
    mix = _get("mst5_msimcse_cross_all", dataset_split="train", shuffle=True, seed=1, num_epochs=None, B=64)
    b = next(mix.as_numpy_iterator())
    assert b["anchor"].shape == (64, 16) and b["group_id"].shape == (64,)
    assert tfds_mock[("snli", "train")] >= 1 and tfds_mock[("multi_nli", "train")] >= 1
