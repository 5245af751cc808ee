"""Contrastive losses for sentence-embedding training (mSimCSE / m-ST5).

The loss sees embeddings only: it knows nothing about the model, the mesh or GradCache.

Adding a loss touches this file only (or, from outside, one `register_loss` call): a loss is
a function `(emb [B, C, D], group_ids int [B] | None, config: LossConfig) -> (loss, metrics)`
registered under a name; gin selects it with `LossConfig.name = 'NAME'`, and the train
step (`mst5_jax.training.train_step`) calls `batch_loss`, which looks the name up.
The train step hands it the embeddings of the *global* batch, so every anchor is scored
against every positive and hard negative of the step, whatever the number of devices.

Shapes: N = global batch (triplets), D = embedding width. Everything is computed in
float32 whatever the dtype of the embeddings (bf16 similarities at temperature 0.05 would
round logits by up to ~0.16).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp

# torch.nn.functional.normalize's eps, so cosines match sentence-transformers' cos_sim.
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||_2, 1e-12) over the last axis, in float32 ([..., D] -> [..., D])."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, _NORM_EPS)


def cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarities [N, M] between rows of a [N, D] and b [M, D], float32.

    Uses Precision.HIGHEST so that GPUs don't silently compute the float32 dot in TF32.
    """
    return jnp.matmul(l2_normalize(a), l2_normalize(b).T, precision=jax.lax.Precision.HIGHEST)


def false_negative_mask(group_ids: jax.Array) -> jax.Array:
    """Which in-batch pairs must not count as negatives: bool [N, N].

    mask[i, j] is True when j != i and group_ids[j] == group_ids[i], i.e. when example j
    is another paraphrase of the same source (the same XNLI premise in another language,
    a duplicate sentence, ...), so its positive is not a true negative for anchor i.
    The diagonal is always False: the example's own positive stays the label.

    Args:
      group_ids: int [N], any integers; equal ids mean "same meaning".
    """
    chex.assert_rank(group_ids, 1)
    same = group_ids[:, None] == group_ids[None, :]
    return same & ~jnp.eye(group_ids.shape[0], dtype=bool)


def _cross_entropy_on_diagonal(
    logits: jax.Array, valid: jax.Array, label_smoothing: float
) -> jax.Array:
    """Per-row cross-entropy [N] with label i for row i of logits [N, M] (M >= N).

    Columns where `valid` is False take no part in the softmax (logit -inf). With label
    smoothing eps, the target is (1 - eps) on column i plus eps spread uniformly over
    the row's valid columns (the diagonal included), as torch's `label_smoothing` does
    when every column is valid.
    """
    n = logits.shape[0]
    masked = jnp.where(valid, logits, -jnp.inf)
    log_probs = jax.nn.log_softmax(masked, axis=-1)
    nll = -jnp.diagonal(log_probs[:, :n])
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0.0:
        return nll
    num_valid = jnp.sum(valid, axis=-1).astype(jnp.float32)
    uniform = -jnp.sum(jnp.where(valid, log_probs, 0.0), axis=-1) / num_valid
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def contrastive_loss(
    anchor: jax.Array,
    positive: jax.Array,
    negative: Optional[jax.Array] = None,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    hard_negative_weight: float = 0.0,
    group_ids: Optional[jax.Array] = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """In-batch-negatives contrastive loss (InfoNCE) of m-ST5 / mSimCSE.

    For each anchor (the premise in one language), the matching positive (its entailed
    hypothesis, or its translation) must be more similar than every other positive in the
    batch and every hard negative (contradiction hypotheses) in the batch. With cosine
    similarity s(x, y) and temperature tau, the forward logits are the N x 2N matrix

        logits[i, j]     = s(anchor_i, positive_j) / tau          j < N
        logits[i, N + j] = s(anchor_i, negative_j) / tau          (only if negative given)
        logits[i, N + i] += hard_negative_weight                  (SimCSE's logit weight)

    and the loss is the mean over i of the cross-entropy with label i (the diagonal).
    Without negatives the matrix is N x N. This equals sentence-transformers'
    `MultipleNegativesRankingLoss(model, scale=1/tau)` on (anchor, positive[, negative]).

    Options:
      symmetric: the mean of the forward loss above and the backward loss, in which
        positive_i must pick anchor_i among all N anchors (no hard negatives):
        backward_logits[i, j] = s(positive_i, anchor_j) / tau. This is
        sentence-transformers' `MultipleNegativesRankingLoss(directions=("query_to_doc",
        "doc_to_query"), partition_mode="per_direction")` (formerly
        `MultipleNegativesSymmetricRankingLoss`). Useful for bitext/translation pairs,
        where retrieval runs in both directions.
      hard_negative_weight: w added to logit (i, N + i) only (each anchor's own hard
        negative), as in SimCSE's `hard_negative_weight`. It is added after the
        division by tau. 0 leaves the standard loss; ignored without negatives.
      group_ids: int [N]. For anchor i, the positive columns j != i with
        group_ids[j] == group_ids[i] are removed from the softmax (they are paraphrases
        of the label, not negatives); hard-negative columns are kept. In the symmetric
        loss the same pairs are removed from the backward softmax (anchor columns j != i
        of the same group). None masks nothing.
      label_smoothing: eps in [0, 1). The target puts 1 - eps on the label and eps
        uniformly over the row's unmasked columns (label included), which is torch's
        `cross_entropy(label_smoothing=eps)` when nothing is masked.

    All options may be Python numbers or traced scalars (e.g. a learned temperature);
    `symmetric` and the presence of `negative` / `group_ids` are static.

    Args:
      anchor: float [N, D], any dtype.
      positive: float [N, D]; positive[i] belongs to anchor[i].
      negative: float [N, D] or None; negative[i] is anchor[i]'s hard negative.

    Returns:
      (loss, metrics): loss is a float32 scalar. metrics are float32 scalars computed
      from the forward direction (after the mask and the hard-negative weight):
        "accuracy": fraction of anchors whose arg-max logit is their own positive
          (in-batch top-1; ties go to the lowest column, i.e. to in-batch positives
          before hard negatives).
        "pos_sim": mean cosine s(anchor_i, positive_i) over i.
        "neg_sim": mean cosine over all negative entries of the forward matrix: every
          unmasked s(anchor_i, positive_j), j != i, and every s(anchor_i, negative_j).
          0 if there are none (N = 1, no negatives).
        "hard_neg_sim" (only with negatives): mean cosine s(anchor_i, negative_i).

    When to use: training sentence encoders from (anchor, positive) pairs or
    (anchor, positive, hard negative) triplets, e.g. NLI triplets (m-ST5, SimCSE) or
    translation pairs. Large batches help: every other example is a negative, so build
    the batch globally (the train step gathers it across devices) and use GradCache to
    grow it beyond memory. Use group_ids when a batch may hold several copies of one
    meaning (the same premise in several languages).

    Example:
      >>> loss, metrics = contrastive_loss(anchor_emb, pos_emb, neg_emb, temperature=0.05)
    """
    chex.assert_rank(anchor, 2)
    chex.assert_equal_shape([anchor, positive] + ([] if negative is None else [negative]))
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"contrastive_loss: temperature must be > 0, got {temperature}")
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"contrastive_loss: label_smoothing must be in [0, 1), got {label_smoothing}")
    n = anchor.shape[0]
    if group_ids is not None:
        chex.assert_shape(group_ids, (n,))

    sim_pos = cosine_matrix(anchor, positive)  # [N, N]
    keep_pos = (
        jnp.ones((n, n), bool) if group_ids is None else ~false_negative_mask(group_ids)
    )
    if negative is None:
        sim, keep = sim_pos, keep_pos
        logits = sim / temperature
    else:
        sim_neg = cosine_matrix(anchor, negative)  # [N, N]
        sim = jnp.concatenate([sim_pos, sim_neg], axis=1)  # [N, 2N]
        keep = jnp.concatenate([keep_pos, jnp.ones((n, n), bool)], axis=1)
        logits = sim / temperature
        logits = logits.at[:, n:].add(hard_negative_weight * jnp.eye(n, dtype=jnp.float32))

    forward = _cross_entropy_on_diagonal(logits, keep, label_smoothing)
    if symmetric:
        # s(positive_i, anchor_j) = sim_pos[j, i]: the backward matrix is the transpose.
        backward = _cross_entropy_on_diagonal(sim_pos.T / temperature, keep_pos.T, label_smoothing)
        loss = jnp.mean(0.5 * (forward + backward))
    else:
        loss = jnp.mean(forward)

    is_negative = keep.at[:, :n].set(keep_pos & ~jnp.eye(n, dtype=bool))
    num_negative = jnp.sum(is_negative)
    predicted = jnp.argmax(jnp.where(keep, logits, -jnp.inf), axis=-1)
    metrics = {
        "accuracy": jnp.mean((predicted == jnp.arange(n)).astype(jnp.float32)),
        "pos_sim": jnp.mean(jnp.diagonal(sim_pos)),
        "neg_sim": jnp.sum(jnp.where(is_negative, sim, 0.0)) / jnp.maximum(num_negative, 1),
    }
    if negative is not None:
        metrics["hard_neg_sim"] = jnp.mean(jnp.diagonal(sim[:, n:]))
    return loss, metrics


# ---------------------------------------------------------------------- the loss registry
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which registered loss the step applies (`name`), and its options.

    Attributes:
      name: a key of the registry (`register_loss`); "contrastive" is `contrastive_loss`.
      temperature: tau; logits are cosine / tau.
      symmetric: also the backward (positive -> anchor) loss, averaged.
      hard_negative_weight: SimCSE's additive weight on each anchor's own hard negative.
      mask_false_negatives: pass `batch["group_id"]` as `group_ids` (same-group positives
        are not negatives).
      label_smoothing: eps in [0, 1).
      use_hard_negatives: use `batch["negative"]` when present.
    """

    name: str = "contrastive"
    temperature: float = 0.05
    symmetric: bool = False
    hard_negative_weight: float = 0.0
    mask_false_negatives: bool = False
    label_smoothing: float = 0.0
    use_hard_negatives: bool = True


# (emb float [B, C, D] with columns anchor, positive[, negative]; group_ids int [B] or None;
#  the LossConfig) -> (float32 scalar loss, {name: float32 scalar} metrics)
LossFn = Callable[[jax.Array, Optional[jax.Array], LossConfig], tuple[jax.Array, dict[str, jax.Array]]]
_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str, fn: LossFn, *, overwrite: bool = False) -> LossFn:
    """Makes `fn` selectable as `LossConfig(name=name)` (gin: `LossConfig.name = 'name'`).

    `fn(emb, group_ids, config)` receives the embeddings of the whole global batch
    float [B, C, D] (C = 2 columns anchor, positive, or 3 with the hard negative), the
    batch's `group_id` int [B] (None when `config.mask_false_negatives` is False) and the
    `LossConfig`; it returns (loss, metrics), float32 scalars. It runs inside the jitted
    step, so it must be traceable. Returns `fn`, so it can decorate.

    Raises:
      ValueError when `name` is taken and `overwrite` is False.
    """
    if name in _LOSSES and not overwrite and _LOSSES[name] is not fn:
        raise ValueError(f"register_loss: a loss named {name!r} is already registered; pass overwrite=True")
    _LOSSES[name] = fn
    return fn


def get_loss(name: str) -> LossFn:
    """The loss registered as `name`; the error lists the registered names."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"LossConfig.name={name!r}: no such loss; registered: {sorted(_LOSSES)}") from None


def batch_loss(emb: jax.Array, group_ids: Optional[jax.Array], config: LossConfig
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The configured loss on embeddings [B, C, D]; `group_ids` are passed only when
    `config.mask_false_negatives` asks for them."""
    return get_loss(config.name)(emb, group_ids if config.mask_false_negatives else None, config)


def contrastive_objective(emb: jax.Array, group_ids: Optional[jax.Array], config: LossConfig
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`contrastive_loss` on embeddings [B, C, D] (columns anchor, positive[, negative])."""
    negative = emb[:, 2] if emb.shape[1] > 2 else None
    return contrastive_loss(
        emb[:, 0], emb[:, 1], negative,
        temperature=config.temperature, symmetric=config.symmetric,
        hard_negative_weight=config.hard_negative_weight, group_ids=group_ids,
        label_smoothing=config.label_smoothing)


register_loss("contrastive", contrastive_objective)
