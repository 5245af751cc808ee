"""The sharded training step: one `jax.jit` from a global batch of triplets to an update.

    batch {"anchor", "positive"[, "negative"]: int32 [B, L], "group_id": int32 [B]}
      -> embeddings of the whole global batch [B, C, D] (C = 2 or 3 columns)
      -> the configured loss over every embedding of the step (`mst5_jax.core.losses`,
         `LossConfig.name`; contrastive by default)
      -> gradients of the trainable partition only -> optax update

The state is split in two. `TrainState` holds what changes: the step, the trainable
parameters (LoRA factors, or every `nnx.Param` in full fine-tuning) in float32, their
optimizer state, and the base RNG key. The frozen parameters travel beside it, may be
bf16, are never differentiated and have no optimizer state.

Global in-batch negatives. The batch is split over the ("data", "fsdp") mesh axes, but
the loss is computed on the globally sharded embeddings, which are constrained to be
replicated first: every anchor is scored against every positive and hard negative of the
global batch, whatever the mesh. GSPMD inserts the all-gather (B x D floats, small).

GradCache (`microbatch_size` set; Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"). The exact large-batch gradient in bounded memory:
  1. embed every micro-batch without gradients (`lax.map`), giving [B, C, D];
  2. compute the loss and d loss / d embeddings on the full set;
  3. for each micro-batch, re-run the encoder under `jax.vjp` with the same dropout key
     and pull the cached embedding gradients back to the parameters, summing (`lax.scan`).
Only one micro-batch of activations is alive at a time. Plain gradient accumulation would
instead shrink the pool of negatives to one micro-batch. The passes live in
`mst5_jax.core.gradcache`, with the variant that keeps the block inputs of step 1.

Micro-batch layout. Micro-batch m (of k = B / microbatch_size) holds the triplets
m, m + k, m + 2k, ... (strided), so that with the batch split in contiguous blocks over
the devices every micro-batch is spread over every device and no data moves. Inside a
micro-batch the C columns are embedded in one encoder call on [mb * C, L] token ids,
triplet-major (anchor_0, positive_0, negative_0, anchor_1, ...). Without GradCache the
whole batch is one micro-batch (k = 1).

Dropout keys. Micro-batch m of step s uses `fold_in(fold_in(state.rng, s), m)` (see
`dropout_keys`), and the model draws its dropout bits for global shapes, so results do not
depend on the number of devices, and the GradCache re-forward in step 3 draws exactly the
masks of step 1.

Numerics. The compute dtype and the remat policy come from the model's `EncoderConfig`
(`dtype`, `remat`: none / full / dots / residual). Embeddings come out of pooling in
float32 and the loss is float32.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mst5_jax.core import gradcache
from mst5_jax.core.lora import split_trainable
from mst5_jax.core.losses import LossConfig, batch_loss
from mst5_jax.core.model import SentenceModel
from mst5_jax.core.partitioning import (
    AnyMesh,
    Rules,
    batch_axis_sharding,
    batch_sharding,
    num_batch_shards,
    replicated,
    state_shardings,
    train_state_shardings,
)

__all__ = ["LossConfig", "StepShardings", "TrainState", "init_train_state", "make_eval_step", "make_train_step",
           "loss_and_grads"]

COLUMNS = ("anchor", "positive", "negative")
Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """What one step changes. `params` is the trainable partition only (float32)."""

    step: jax.Array  # int32 scalar: completed optimizer updates
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # base key; each step folds in its step number

    @classmethod
    def create(cls, params: nnx.State, optimizer: optax.GradientTransformation, seed: int = 0) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   rng=jax.random.key(seed))


class StepShardings(NamedTuple):
    """Shardings of the step's arguments: a `TrainState` of shardings, and the frozen state's."""

    state: TrainState
    frozen: Any


# ---------------------------------------------------------------------- placement
def step_shardings(params: nnx.State, frozen: nnx.State, optimizer: optax.GradientTransformation, mesh: AnyMesh,
                   rules: Rules) -> StepShardings:
    """The step's shardings (`mst5_jax.core.partitioning` builds them); arguments may be abstract."""
    return StepShardings(TrainState(**train_state_shardings(params, optimizer, mesh, rules)),
                         state_shardings(frozen, mesh, rules))


def init_train_state(model: SentenceModel, optimizer: optax.GradientTransformation, mesh: AnyMesh, rules: Rules,
                     *, mode: str = "lora", seed: int = 0, frozen_dtype: Optional[str] = None
                     ) -> tuple[nnx.GraphDef, TrainState, nnx.State, StepShardings]:
    """Splits `model` into trainable / frozen (`mst5_jax.core.lora.split_trainable`) and places both.

    Trainable parameters are cast to float32; frozen `nnx.Param`s to `frozen_dtype` when
    given (e.g. "bfloat16" for a LoRA run's base). Returns (graphdef, state, frozen,
    shardings), ready for `make_train_step(graphdef, ..., shardings)`.
    """
    graphdef, params, frozen = split_trainable(model, mode)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    if frozen_dtype is not None:
        frozen = _cast_params(frozen, frozen_dtype)
    shardings = step_shardings(params, frozen, optimizer, mesh, rules)
    params = jax.device_put(params, shardings.state.params)
    state = jax.jit(lambda p: TrainState.create(p, optimizer, seed), out_shardings=shardings.state)(params)
    return graphdef, state, jax.device_put(frozen, shardings.frozen), shardings


def _cast_params(state: nnx.State, dtype: str) -> nnx.State:
    flat = [(p, v.replace(v.get_value().astype(dtype)) if isinstance(v, nnx.Param) else v)
            for p, v in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


# ---------------------------------------------------------------------- pieces of the step
def dropout_keys(rng: jax.Array, step: jax.Array, num_microbatches: int) -> jax.Array:
    """The dropout keys [k] of one step: key m = fold_in(fold_in(rng, step), m)."""
    step_key = jax.random.fold_in(rng, step)
    return jax.vmap(lambda m: jax.random.fold_in(step_key, m))(jnp.arange(num_microbatches))


def stack_columns(batch: Batch, use_negatives: bool = True) -> jax.Array:
    """int32 [B, C, L]: anchor, positive (and negative) token ids side by side.

    Columns of different lengths are right-padded with 0 (pad), which changes nothing: pad
    keys are masked, T5's position bias is relative and pooling skips pads.
    """
    names = [c for c in COLUMNS if c in batch and (c != "negative" or use_negatives)]
    if names[:2] != ["anchor", "positive"]:
        raise KeyError(f"train step: the batch needs 'anchor' and 'positive' token ids; got keys {sorted(batch)}")
    length = max(batch[c].shape[1] for c in names)
    cols = [jnp.pad(batch[c], ((0, 0), (0, length - batch[c].shape[1]))) for c in names]
    return jnp.stack(cols, axis=1).astype(jnp.int32)


def embed_microbatch(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, ids: jax.Array,
                     key: jax.Array) -> jax.Array:
    """Sentence embeddings float32 [mb, C, D] of token ids [mb, C, L], in one encoder call
    on [mb * C, L] (triplet-major). Pad id 0 is masked; EOS (id 1) counts as a token."""
    model = nnx.merge(graphdef, params, frozen)
    emb = model(*gradcache.flat_ids(model, ids), dropout_key=key)
    return emb.reshape(*ids.shape[:2], -1)


def to_microbatches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]; micro-batch m holds rows m, m + k, m + 2k, ..."""
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def from_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of `to_microbatches`: [k, B/k, ...] -> [B, ...] in the original row order."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def loss_and_grads(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, batch: Batch, keys: jax.Array,
                   loss_config: Any, *, microbatch_size: Optional[int] = None, mesh: Optional[AnyMesh] = None,
                   param_shardings: Any = None, cache_layer_inputs: bool = False
                   ) -> tuple[jax.Array, dict[str, jax.Array], nnx.State]:
    """(loss, metrics, d loss / d params) for one global batch; call inside `jax.jit`.

    Args:
      batch: see the module docstring; [B, L] ids sharded over ("data", "fsdp").
      keys: the dropout keys [k] of the k micro-batches (`dropout_keys`); k = 1 without
        GradCache.
      microbatch_size: None for one pass over the whole batch; otherwise GradCache with
        micro-batches of that many triplets (must divide B).
      mesh: when given, embeddings are replicated before the loss and micro-batches are
        kept split over ("data", "fsdp").
      param_shardings: when given, the GradCache gradient accumulator is kept sharded
        like the parameters (FSDP).
      cache_layer_inputs: GradCache keeps every block's input from its first pass and
        rebuilds one block at a time in the backward (`mst5_jax.core.gradcache`): the FLOPs of
        one full-remat step instead of an extra forward, for num_layers x tokens x d_model
        of memory.
    """
    ids = stack_columns(batch, loss_config.use_hard_negatives)
    group_ids = batch.get("group_id")
    b = ids.shape[0]
    k = 1 if microbatch_size is None else b // microbatch_size
    if microbatch_size is not None and (microbatch_size <= 0 or b % microbatch_size):
        raise ValueError(f"train step: microbatch_size={microbatch_size} must divide the global batch of {b} triplets")
    if keys.shape != (k,):
        raise ValueError(f"train step: got dropout keys of shape {keys.shape}, expected ({k},) for {k} micro-batch(es)")

    def gathered(x):
        return x if mesh is None else jax.lax.with_sharding_constraint(x, replicated(mesh))

    def objective(emb):
        return batch_loss(gathered(emb), group_ids, loss_config)

    embed = lambda p, x, key: embed_microbatch(graphdef, p, frozen, x, key)

    if k == 1:
        def full_loss(p):
            return objective(embed(p, ids, keys[0]))

        (loss, metrics), grads = jax.value_and_grad(full_loss, has_aux=True)(params)
        return loss, metrics, grads

    micro = to_microbatches(ids, k)  # [k, mb, C, L]
    if mesh is not None:
        shards = num_batch_shards(mesh)
        if microbatch_size % shards:
            raise ValueError(f"train step: microbatch_size={microbatch_size} is not a multiple of the {shards} "
                             f"batch shards of the mesh ({dict(mesh.shape)}); every micro-batch is split over them")
        micro = jax.lax.with_sharding_constraint(micro, batch_axis_sharding(mesh, 1))

    def constrain_batch(x, axis):
        return x if mesh is None else jax.lax.with_sharding_constraint(x, batch_axis_sharding(mesh, axis))

    def constrain_params(tree):
        return tree if param_shardings is None else jax.lax.with_sharding_constraint(tree, param_shardings)

    return gradcache.gradcache(embed, graphdef, params, frozen, micro, keys, objective, from_microbatches,
                               cache_layer_inputs=cache_layer_inputs, constrain_batch=constrain_batch,
                               constrain_params=constrain_params)


# ---------------------------------------------------------------------- the step
def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, loss_config: Any,
                    mesh: AnyMesh, shardings: StepShardings, microbatch_size: Optional[int] = None,
                    cache_layer_inputs: bool = False
                    ) -> Callable[[TrainState, nnx.State, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted step `(state, frozen, batch) -> (state, metrics)`; `state` is donated.

    Args:
      graphdef: from `init_train_state` / `split_trainable`.
      optimizer: the optax transformation that built `state.opt_state`.
      loss_config: a `mst5_jax.core.losses.LossConfig`; its `name` picks the registered loss.
      mesh: the ("data", "fsdp", "tensor") mesh; the batch is split over (data, fsdp).
      shardings: the state's and the frozen parameters' shardings (`init_train_state`).
      microbatch_size: None, or GradCache micro-batches of that many triplets.
      cache_layer_inputs: GradCache keeps the block inputs of its first pass (see
        `loss_and_grads`).

    Metrics (float32 scalars, replicated; the loss is that of the batch that produced this
    update) and the loss's own metrics (the contrastive loss: accuracy, pos_sim, neg_sim, and
    hard_neg_sim with negatives), grad_norm (global L2 norm of the trainable gradient), and is_finite
    (1.0 when loss and gradient norm are finite, else 0.0; the update is applied anyway,
    wrap the optimizer in `optax.apply_if_finite` to skip such steps).
    """
    def step(state: TrainState, frozen: nnx.State, batch: Batch):
        k = 1 if microbatch_size is None else max(batch["anchor"].shape[0] // microbatch_size, 1)
        keys = dropout_keys(state.rng, state.step, k)
        loss, metrics, grads = loss_and_grads(graphdef, state.params, frozen, batch, keys, loss_config,
                                              microbatch_size=microbatch_size, mesh=mesh,
                                              param_shardings=shardings.state.params,
                                              cache_layer_inputs=cache_layer_inputs)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                       is_finite=(jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(shardings.state, shardings.frozen, batch_sharding(mesh, 1)),
                   out_shardings=(shardings.state, replicated(mesh)), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, loss_config: Any, mesh: AnyMesh, shardings: StepShardings
                   ) -> Callable[[nnx.State, nnx.State, Batch], dict[str, jax.Array]]:
    """The jitted held-out step `(params, frozen, batch) -> metrics`: no dropout, no gradient.

    Metrics are those of the configured loss (contrastive: loss, accuracy, pos_sim, neg_sim,
    ...) over the whole global batch, like the training step's.
    """
    def evaluate(params: nnx.State, frozen: nnx.State, batch: Batch):
        ids = stack_columns(batch, loss_config.use_hard_negatives)
        emb = embed_microbatch(graphdef, params, frozen, ids, None)
        emb = jax.lax.with_sharding_constraint(emb, replicated(mesh))
        loss, metrics = batch_loss(emb, batch.get("group_id"), loss_config)
        return dict(metrics, loss=loss)

    return jax.jit(evaluate, in_shardings=(shardings.state.params, shardings.frozen, batch_sharding(mesh, 1)),
                   out_shardings=replicated(mesh))
