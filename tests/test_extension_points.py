"""Extension points: a new loss or a new evaluator is one `register` call, made here, in the test file only."""
import json
import pathlib

import jax
import numpy as np
import pytest

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


PAIRS = [("a cat sat on the mat", "the cat sat on a mat"), ("a dog ran home", "un chien court"),
         ("hello world", "hello, world!")]


def toy_pairs(encode, data_dir, *, max_length=None, batch_size=None, device=None, scale=1.0, pairs_file=None):
    """Mean cosine x 100 x scale of the tab-separated pairs in `pairs_file` (default <data_dir>/toy/pairs.tsv)."""
    path = pathlib.Path(pairs_file or pathlib.Path(data_dir) / "toy" / "pairs.tsv")
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    a = encode([r[0] for r in rows])
    b = encode([r[1] for r in rows])
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    per_pair = [float(100 * scale * (x @ y)) for x, y in zip(a, b)]
    return {"per_pair": per_pair, "mean": float(np.mean(per_pair)), "meta": {"device": device}}


def brute_force_toy_score(emb_a: np.ndarray, emb_b: np.ndarray, scale: float) -> list[float]:
    """The toy score per pair in float64, one pair at a time."""
    out = []
    for x, y in zip(emb_a.astype(np.float64), emb_b.astype(np.float64)):
        out.append(100 * scale * sum(p * q for p, q in zip(x, y)) / (np.sqrt(x @ x) * np.sqrt(y @ y)))
    return out


@pytest.fixture
def toy_evaluator(tmp_path):
    from mst5_jax.evals import registry

    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in PAIRS), encoding="utf-8")
    registry.register(registry.Evaluator(
        "toy_pairs", toy_pairs, headline=lambda r: r["mean"],
        table_rows=lambda r: [("mean cosine", "mean")], defaults={"scale": 0.5}))
    yield tmp_path / "toy" / "pairs.tsv"
    registry.unregister("toy_pairs")
    assert "toy_pairs" not in registry.names()


def test_toy_evaluator_through_evaluate(tmp_path, capsys, toy_evaluator):
    from mst5_jax import evaluate
    from mst5_jax.evals.hash_encoder import hash_encode

    out = tmp_path / "r.json"
    rc = evaluate.main(["--encoder", "hash", "--tasks", "toy_pairs", "--data_dir", str(tmp_path),
                        "--output", str(out)])
    table = capsys.readouterr().out
    assert rc == 0

    # Brute force: the hash embeddings (evaluate's default --hash_dim 256), cosine in float64, loops.
    expected = brute_force_toy_score(hash_encode([a for a, _ in PAIRS], dim=256),
                                     hash_encode([b for _, b in PAIRS], dim=256), scale=0.5)
    result = json.loads(out.read_text())["results"]["toy_pairs"]
    np.testing.assert_allclose(result["per_pair"], expected, rtol=1e-5)
    np.testing.assert_allclose(result["mean"], np.mean(expected), rtol=1e-5)
    assert f"| toy_pairs | mean cosine | {result['mean']:.2f} |" in table


def test_toy_evaluator_is_the_training_runs_heldout_metric(tmp_path, toy_evaluator):
    from mst5_jax import SentenceEncoder

    run_dir = tmp_path / "run"
    cfg = gin_utils.parse_gin(["demo_cpu.gin"], [
        *TINY, f"MODEL_DIR='{run_dir}'", "TRAIN_STEPS=2", "CHECKPOINT_EVERY=2", "TrainConfig.heldout_eval=True",
        "TrainConfig.heldout_task='toy_pairs'", f"TrainConfig.heldout_task_kwargs={{'pairs_file': '{toy_evaluator}'}}"])
    summary = Trainer(cfg).run()
    enc = SentenceEncoder.from_pretrained(run_dir)
    expected = brute_force_toy_score(enc.encode([a for a, _ in PAIRS], max_length=cfg.eval_max_length),
                                     enc.encode([b for _, b in PAIRS], max_length=cfg.eval_max_length), scale=0.5)
    np.testing.assert_allclose(summary["heldout_after"], np.mean(expected), rtol=1e-4, atol=1e-4)
    assert json.loads((run_dir / "heldout_before.json").read_text())["toy_pairs"] == summary["heldout_before"]
