"""DATA_PIPELINE: training through seqio gives the numpy path's batches and losses, resumes
exactly, records which path ran, and samples mixtures by rate.

One in-process TensorFlow set-up for the module; tiny model (d_model 32, 2 layers), batch 8,
length 16, 4 steps.
"""
import json
import sys

import numpy as np
import pytest

from mst5_jax.training import gin_utils, trainer
from mst5_jax.training.hooks import Hook
from tasks import train_data as pipeline

TINY = ["MIN_HELDOUT_GAIN=0", "TrainConfig.heldout_eval=False", "MIXTURE_OR_TASK_NAME='mst5_xnli_cross'",
        "BATCH_SIZE=8", "MAX_LENGTH=16", "TRAIN_STEPS=4", "SCHEDULE_STEPS=4", "CHECKPOINT_EVERY=2", "LOG_EVERY=1",
        "TrainConfig.model_overrides={'d_model': 32, 'd_ff': 64, 'num_heads': 2, 'd_kv': 16, 'num_layers': 2}"]


class Record(Hook):
    """Keeps each step's global batch (numpy) and loss; optionally dies after step `crash_at`."""

    def __init__(self, crash_at=None):
        self.batches, self.losses, self.crash_at = {}, {}, crash_at

    def before_step(self, t, step):
        self.batches[step] = {k: np.asarray(v) for k, v in t.batch.items()}

    def after_step(self, t):
        self.losses[t.step] = float(t.metrics["loss"])
        if t.step == self.crash_at:
            raise RuntimeError("simulated crash")


def _run(model_dir, pipeline_name, *extra, hook=None):
    cfg = gin_utils.parse_gin(["demo_cpu.gin"], TINY + [f"MODEL_DIR='{model_dir}'",
                                                          f"DATA_PIPELINE='{pipeline_name}'", *extra])
    hook = hook or Record()
    t = trainer.Trainer(cfg, hooks=[hook])
    return t, hook, t.run()


def _metrics(model_dir):
    return [json.loads(l) for l in (model_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    for name in ("numpy", "seqio"):
        t, rec, summary = _run(root / name, name)
        out[name] = {"dir": root / name, "rec": rec, "summary": summary, "trainer": t}
    return out


def test_seqio_and_numpy_pipelines_train_identically(runs):
    np_run, sq_run = runs["numpy"], runs["seqio"]
    assert type(sq_run["trainer"].data).__name__ == "SeqioTripletIterator"
    assert type(np_run["trainer"].data).__name__ == "TripletIterator"
    for step in range(1, 5):
        for k, v in np_run["rec"].batches[step].items():
            np.testing.assert_array_equal(sq_run["rec"].batches[step][k], v, err_msg=f"step {step} {k}")
    a = np.array([np_run["rec"].losses[s] for s in range(1, 5)])
    b = np.array([sq_run["rec"].losses[s] for s in range(1, 5)])
    print(f"\nlosses numpy {a.tolist()}\nlosses seqio {b.tolist()}")
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    # the run records which path ran: run.json, the first metrics record, the summary
    for name, r in runs.items():
        assert json.loads((r["dir"] / "run.json").read_text())["data_pipeline"] == name
        recs = _metrics(r["dir"])
        assert recs[0]["step"] == 1 and recs[0]["data_pipeline"] == name
        assert all("data_pipeline" not in x for x in recs[1:])
        assert r["summary"]["data_pipeline"] == name


def test_seqio_resume_after_a_crash_equals_the_straight_run(runs, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, "seqio", hook=Record(crash_at=3))  # checkpoint at 2, step 3 computed then lost
    t, rec, _ = _run(tmp_path, "seqio")
    assert t.start_step == 2 and sorted(rec.losses) == [3, 4]
    losses = {r["step"]: r["loss"] for r in _metrics(tmp_path)}
    assert sorted(losses) == [1, 2, 3, 4]
    straight = runs["seqio"]["rec"].losses
    for step in range(1, 5):
        assert abs(losses[step] - straight[step]) <= 1e-6, (step, losses[step], straight[step])
    for step in (3, 4):
        for k, v in runs["seqio"]["rec"].batches[step].items():
            np.testing.assert_array_equal(rec.batches[step][k], v, err_msg=f"resumed step {step} {k}")


def test_seqio_mixture_samples_by_rate_and_resumes_exactly(runs, data_dir):
    from tasks import registry
    from tasks.seqio_tasks import SeqioTripletIterator

    vocab = runs["seqio"]["trainer"].vocab
    mix = "test_seqio_mono_en_de_zh"  # 3 equal-sized tasks: examples-proportional rates are uniform
    if mix not in registry.MIXTURES:
        registry.register_triplet_mixture(mix, [f"mst5_xnli_mono_{x}" for x in ("en", "de", "zh")])
    it = SeqioTripletIterator(mix, data_dir, vocab, 16, 8, 3, shard_index=1, num_shards=2)
    first = next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(30)]
    # which task each example came from: its anchor's tokens identify the language's text
    texts = {}
    for task in registry.MIXTURES[mix].task_names:
        anchors = list(dict.fromkeys(tr.anchor for tr in registry.get_triplets(task, "train", data_dir, 3)))
        for ids in it.tokenizer.encode_batch(anchors, max_length=16):
            texts.setdefault(tuple(ids), task)
    seen = {texts[tuple(row[row != 0])] for b in rest for row in b["anchor"]}
    assert seen == set(registry.MIXTURES[mix].task_names), seen  # 240 draws; a concatenation shows 1 task
    again = SeqioTripletIterator(mix, data_dir, vocab, 16, 8, 3, shard_index=1, num_shards=2)
    again.set_state(state)
    for i, b in enumerate(rest[:3]):
        got = next(again)
        for k in b:
            np.testing.assert_array_equal(got[k], b[k], err_msg=f"batch {i} after resume, {k}")
    with pytest.raises(ValueError, match="DATA_PIPELINE='numpy'"):
        again.set_state({"epoch": 0, "index": 1})  # a numpy-path state of a mixture
    assert first["group_id"].shape == (8,)


def test_pipeline_choice_and_the_missing_tensorflow_error(monkeypatch):
    assert pipeline.resolve_pipeline("numpy") == "numpy"
    assert pipeline.resolve_pipeline("auto") == "seqio"  # TF and seqio are installed here
    with pytest.raises(ValueError, match="DATA_PIPELINE='spark'"):
        pipeline.resolve_pipeline("spark")
    monkeypatch.setitem(sys.modules, "seqio", None)  # import seqio -> ImportError
    assert pipeline.resolve_pipeline("auto") == "numpy"
    with pytest.raises(ImportError, match=r"needs seqio.*\[tf\]"):
        pipeline.resolve_pipeline("seqio")
