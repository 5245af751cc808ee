"""mst5_jax.core.losses against sentence-transformers 6 (the loss, its symmetric variant and the
gradients, via torch autograd) and a brute-force float64 numpy reference (false-negative
mask, hard-negative weight, label smoothing, metrics)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers.sentence_transformer.losses import (
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)

from mst5_jax.core.losses import contrastive_loss, false_negative_mask

TAU = 0.05
N, D = 6, 16


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def triplet(seed, n=N, d=D):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)).astype(np.float32)
    # Positives near their anchors, so the loss is neither trivial nor saturated.
    p = (a + 2.0 * rng.normal(size=(n, d))).astype(np.float32)
    h = (a + 2.5 * rng.normal(size=(n, d))).astype(np.float32)
    return a, p, h


def st_loss(embeddings, **kwargs):
    """sentence-transformers' loss and d loss / d embeddings, via torch autograd (float64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cls = kwargs.pop("cls", MultipleNegativesRankingLoss)
        loss_fn = cls(torch.nn.Identity(), scale=1.0 / TAU, **kwargs)
    tensors = [torch.tensor(e, dtype=torch.float64, requires_grad=True) for e in embeddings]
    loss = loss_fn.compute_loss_from_embeddings(tensors, labels=None)
    loss.backward()
    return loss.item(), [t.grad.numpy() for t in tensors]


# ---------------------------------------------------------------- brute-force numpy reference


def np_cos(x, y):
    x = x.astype(np.float64) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = y.astype(np.float64) / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return x @ y.T


def np_row_ce(logits, valid, label, eps):
    """Cross-entropy of one row, looping over columns; invalid columns are dropped."""
    cols = [j for j in range(len(logits)) if valid[j]]
    z = np.array([logits[j] for j in cols])
    lse = np.log(np.sum(np.exp(z - z.max()))) + z.max()
    logp = {j: logits[j] - lse for j in cols}
    return -(1 - eps) * logp[label] - eps * np.mean([logp[j] for j in cols])


def np_reference(a, p, h=None, *, symmetric=False, w=0.0, groups=None, eps=0.0):
    n = len(a)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    s_ap, fwd, bwd = np_cos(a, p), [], []
    s_ah = np_cos(a, h) if h is not None else None
    correct, pos, negs, hard = 0, [], [], []
    for i in range(n):
        logits, valid = [], []
        for j in range(n):
            logits.append(s_ap[i, j] / TAU)
            valid.append(j == i or groups[j] != groups[i])
        if h is not None:
            for j in range(n):
                logits.append(s_ah[i, j] / TAU + (w if j == i else 0.0))
                valid.append(True)
        fwd.append(np_row_ce(logits, valid, i, eps))
        best = max((logits[j], -j) for j in range(len(logits)) if valid[j])
        correct += -best[1] == i
        pos.append(s_ap[i, i])
        negs += [s_ap[i, j] for j in range(n) if j != i and valid[j]]
        if h is not None:
            negs += list(s_ah[i])
            hard.append(s_ah[i, i])
        if symmetric:
            b_logits = [s_ap[j, i] / TAU for j in range(n)]
            b_valid = [j == i or groups[j] != groups[i] for j in range(n)]
            bwd.append(np_row_ce(b_logits, b_valid, i, eps))
    loss = np.mean([(f + b) / 2 for f, b in zip(fwd, bwd)]) if symmetric else np.mean(fwd)
    metrics = {"accuracy": correct / n, "pos_sim": np.mean(pos), "neg_sim": np.mean(negs) if negs else 0.0}
    if h is not None:
        metrics["hard_neg_sim"] = np.mean(hard)
    return loss, metrics


# ---------------------------------------------------------------- sentence-transformers


@pytest.mark.parametrize("with_negatives", [False, True])
def test_matches_multiple_negatives_ranking_loss(with_negatives):
    a, p, h = triplet(0)
    embs = [a, p, h] if with_negatives else [a, p]
    ref_loss, ref_grads = st_loss(embs)

    def f(*e):
        return contrastive_loss(*e, temperature=TAU)[0]

    loss = f(*embs)
    grads = jax.grad(f, argnums=tuple(range(len(embs))))(*embs)
    assert loss.dtype == jnp.float32
    assert rel_err(loss, ref_loss) <= 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-5


@pytest.mark.parametrize("with_negatives", [False, True])
def test_symmetric_matches_sentence_transformers(with_negatives):
    """ST 6 spells the symmetric loss as MNRL(directions=(q2d, d2q), per_direction); the
    deprecated MultipleNegativesSymmetricRankingLoss is the same thing, check both."""
    a, p, h = triplet(1)
    embs = [a, p, h] if with_negatives else [a, p]
    ref_loss, ref_grads = st_loss(
        embs, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"
    )
    old_loss, _ = st_loss(embs, cls=MultipleNegativesSymmetricRankingLoss)
    assert rel_err(old_loss, ref_loss) <= 1e-12

    def f(*e):
        return contrastive_loss(*e, temperature=TAU, symmetric=True)[0]

    grads = jax.grad(f, argnums=tuple(range(len(embs))))(*embs)
    assert rel_err(f(*embs), ref_loss) <= 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-5


def test_bfloat16_inputs_are_computed_in_float32():
    a, p, h = triplet(2)
    embs16 = [jnp.asarray(e, jnp.bfloat16) for e in (a, p, h)]
    # The reference sees exactly the bf16-rounded values, in float64.
    ref_loss, ref_grads = st_loss([np.asarray(e.astype(jnp.float32)) for e in embs16])
    loss, metrics = contrastive_loss(*embs16, temperature=TAU)
    assert loss.dtype == jnp.float32 and all(m.dtype == jnp.float32 for m in metrics.values())
    assert rel_err(loss, ref_loss) <= 1e-5
    grads = jax.grad(lambda *e: contrastive_loss(*e, temperature=TAU)[0], argnums=(0, 1, 2))(*embs16)
    assert all(g.dtype == jnp.bfloat16 for g in grads)  # cotangents come back in the input dtype


def test_label_smoothing_matches_torch_cross_entropy():
    a, p, h = triplet(3)
    logits = torch.tensor(np.concatenate([np_cos(a, p), np_cos(a, h)], 1) / TAU)
    ref = torch.nn.functional.cross_entropy(logits, torch.arange(N), label_smoothing=0.1).item()
    loss, _ = contrastive_loss(a, p, h, temperature=TAU, label_smoothing=0.1)
    assert rel_err(loss, ref) <= 1e-5


# ---------------------------------------------------------------- numpy reference


GROUPS = np.array([0, 1, 0, 2, 1, 0])


@pytest.mark.parametrize(
    "options",
    [
        dict(w=0.7),
        dict(w=-1.5),
        dict(groups=GROUPS),
        dict(groups=GROUPS, w=0.5, symmetric=True),
        dict(groups=GROUPS, eps=0.1),
        dict(groups=GROUPS, eps=0.2, symmetric=True, w=0.3),
    ],
    ids=str,
)
def test_options_match_numpy_reference(options):
    a, p, h = triplet(4)
    ref_loss, ref_metrics = np_reference(a, p, h, **options)
    loss, metrics = contrastive_loss(
        a,
        p,
        h,
        temperature=TAU,
        symmetric=options.get("symmetric", False),
        hard_negative_weight=options.get("w", 0.0),
        group_ids=None if "groups" not in options else jnp.asarray(options["groups"]),
        label_smoothing=options.get("eps", 0.0),
    )
    assert rel_err(loss, ref_loss) <= 1e-5
    assert set(metrics) == set(ref_metrics)
    for k in metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_mask_without_negatives_and_metrics_match_numpy():
    a, p, _ = triplet(5)
    ref_loss, ref_metrics = np_reference(a, p, None, groups=GROUPS, symmetric=True)
    loss, metrics = contrastive_loss(a, p, temperature=TAU, group_ids=GROUPS, symmetric=True)
    assert rel_err(loss, ref_loss) <= 1e-5
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_false_negative_mask_brute_force():
    g = np.array([3, 3, 7, 3, 7])
    expected = np.array([[i != j and g[i] == g[j] for j in range(5)] for i in range(5)])
    np.testing.assert_array_equal(false_negative_mask(jnp.asarray(g)), expected)


def test_all_same_group_leaves_only_hard_negatives_and_finite_grads():
    """Every in-batch positive masked: the softmax is over {own positive, all negatives}."""
    a, p, h = triplet(6)
    groups = np.zeros(N, int)
    ref_loss, _ = np_reference(a, p, h, groups=groups, eps=0.1)
    f = lambda a, p, h: contrastive_loss(a, p, h, temperature=TAU, group_ids=groups, label_smoothing=0.1)[0]
    assert rel_err(f(a, p, h), ref_loss) <= 1e-5
    grads = jax.grad(f, argnums=(0, 1, 2))(a, p, h)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert all(float(jnp.abs(g).max()) > 0 for g in grads)


def test_mask_and_weight_gradients_match_finite_differences_of_numpy_reference():
    """jax.grad of the masked, weighted, smoothed, symmetric loss vs central differences of
    the float64 numpy reference (on a tiny problem)."""
    a, p, h = triplet(7, n=4, d=3)
    groups = np.array([0, 1, 0, 1])
    opts = dict(groups=groups, w=0.4, eps=0.1, symmetric=True)

    def g_np(x, which):
        e = [a.astype(np.float64), p.astype(np.float64), h.astype(np.float64)]
        grad = np.zeros_like(e[which])
        for idx in np.ndindex(grad.shape):
            plus = [v.copy() for v in e]
            minus = [v.copy() for v in e]
            plus[which][idx] += 1e-6
            minus[which][idx] -= 1e-6
            grad[idx] = (np_reference(*plus, **opts)[0] - np_reference(*minus, **opts)[0]) / 2e-6
        return grad

    f = lambda a, p, h: contrastive_loss(
        a, p, h, temperature=TAU, symmetric=True, hard_negative_weight=0.4, group_ids=groups, label_smoothing=0.1
    )[0]
    grads = jax.grad(f, argnums=(0, 1, 2))(a, p, h)
    for which, g in enumerate(grads):
        assert rel_err(g, g_np(None, which)) <= 1e-4  # finite differences limit the precision


def test_jits_with_traced_options():
    a, p, h = triplet(9)
    ref_loss, ref_metrics = np_reference(a, p, h, groups=GROUPS, w=0.5, eps=0.1, symmetric=True)

    @jax.jit
    def f(a, p, h, groups, tau, w, eps):
        return contrastive_loss(
            a, p, h, temperature=tau, symmetric=True, hard_negative_weight=w, group_ids=groups, label_smoothing=eps
        )

    loss, metrics = f(a, p, h, GROUPS, TAU, 0.5, 0.1)
    assert rel_err(loss, ref_loss) <= 1e-5
    np.testing.assert_allclose(metrics["accuracy"], ref_metrics["accuracy"])


def test_rejects_bad_inputs():
    a, p, h = triplet(8)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(a, p, temperature=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        contrastive_loss(a, p, label_smoothing=1.0)
    with pytest.raises(AssertionError):
        contrastive_loss(a, p[:-1])
