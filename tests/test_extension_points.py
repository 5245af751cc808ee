"""Extension points: a new loss is one `register_loss` call, made here, in the test file only."""
import json

import jax
import numpy as np

from mst5_jax.core import losses
from mst5_jax.training import gin_utils, train_step
from mst5_jax.training.hooks import Hook
from mst5_jax.training.trainer import Trainer

TINY = ["MIN_HELDOUT_GAIN=0", "TrainConfig.heldout_eval=False", "MIXTURE_OR_TASK_NAME='mst5_xnli_cross'",
        "BATCH_SIZE=8", "MAX_LENGTH=16", "TRAIN_STEPS=3", "LOG_EVERY=1", "CHECKPOINT_EVERY=3",
        "TrainConfig.model_overrides={'d_model': 32, 'd_ff': 64, 'num_heads': 2, 'd_kv': 16, 'num_layers': 2}"]


def toy_mse_cosine(emb, group_ids, config):
    """MSE of cosines against targets 1 (anchor, positive) and 0 (anchor, hard negative)."""
    a, p, n = (losses.l2_normalize(emb[:, c]) for c in range(3))
    pos, neg = jax.numpy.sum(a * p, -1), jax.numpy.sum(a * n, -1)
    loss = 0.5 * (jax.numpy.mean((pos - 1.0) ** 2) + jax.numpy.mean(neg ** 2))
    return loss, {"pos_sim": jax.numpy.mean(pos)}


def numpy_toy_loss(emb: np.ndarray) -> float:
    """The same loss, brute force in float64, one triplet at a time."""
    pos_err, neg_err = [], []
    for a, p, n in emb.astype(np.float64):
        cos = lambda x, y: float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-12))
        pos_err.append((cos(a, p) - 1.0) ** 2)
        neg_err.append(cos(a, n) ** 2)
    return 0.5 * (sum(pos_err) / len(pos_err) + sum(neg_err) / len(neg_err))


class FirstBatchEmbeddings(Hook):
    """Embeds the first global batch with the weights before update 1 (dropout is 0)."""

    def before_step(self, trainer, step):
        if step == 1:
            ids = train_step.stack_columns(trainer.batch)
            emb = train_step.embed_microbatch(trainer.graphdef, trainer.state.params, trainer.frozen, ids, None)
            self.emb = np.asarray(jax.device_get(emb))


def test_toy_loss_trains(tmp_path):
    losses.register_loss("toy_mse_cosine", toy_mse_cosine, overwrite=True)
    cfg = gin_utils.parse_gin(["demo_cpu.gin"], [*TINY, f"MODEL_DIR='{tmp_path}'", "LossConfig.name='toy_mse_cosine'"])
    assert cfg.loss.name == "toy_mse_cosine"
    probe = FirstBatchEmbeddings()
    Trainer(cfg, hooks=[probe]).run()
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in recs)
    assert probe.emb.shape == (8, 3, 32)
    expected = numpy_toy_loss(probe.emb)
    np.testing.assert_allclose(recs[0]["loss"], expected, rtol=1e-5)
    # The contrastive default on the same embeddings is a different number (log(2N)-scale).
    default, _ = losses.batch_loss(probe.emb, None, losses.LossConfig(temperature=cfg.loss.temperature))
    assert abs(float(default) - expected) > 0.1


def test_unknown_loss_name_lists_the_registered_ones():
    import pytest

    with pytest.raises(KeyError, match=r"LossConfig.name='nope'.*contrastive"):
        losses.get_loss("nope")
