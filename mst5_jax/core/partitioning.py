"""Where arrays live: the device mesh, logical axis rules and batch sharding.

Sharding lives here and only here. The model names the axes of every parameter with
*logical* names; a rule set maps those names to the axes of a 3-D device mesh
("data", "fsdp", "tensor"), t5x / maxtext style. Changing the parallelism of a run is a
change of `MeshConfig` and rule preset, never of model or step code.

Logical axis names (fixed by the model):
  parameters  "vocab" (embedding rows), "embed" (d_model), "joined_kv" (heads * d_kv:
              columns of q/k/v, rows of o), "mlp" (d_ff), "heads" (relative-bias
              columns), "relpos_buckets", "layers" (the leading, scanned axis of every
              per-layer parameter), "lora_rank" (r of LoRA A/B);
  activations "batch", "length" (and "embed" for the residual stream).

Mesh axes:
  "data"    pure data parallelism: parameters replicated, batch split.
  "fsdp"    the batch is split over it too, and parameters and optimizer state are split
            over it (ZeRO-3 / FSDP); XLA all-gathers each layer's weights when used.
  "tensor"  Megatron-style model parallelism of the attention heads and the MLP.

Example:
  >>> mesh = make_mesh(MeshConfig(data=-1, fsdp=2))          # 8 devices -> data=4, fsdp=2
  >>> rules = logical_axis_rules("fsdp")
  >>> shardings = logical_to_sharding(param_axes, abstract_params, mesh, rules)
  >>> params = jax.jit(init, out_shardings=shardings)(rng)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from mst5_jax.core.model import logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_MESH_AXES = ("data", "fsdp")

LogicalAxes = tuple[Optional[str], ...]
MeshAxes = Union[None, str, tuple[str, ...]]
Rules = tuple[tuple[str, MeshAxes], ...]
AnyMesh = Union[Mesh, AbstractMesh]


# ---------------------------------------------------------------------------- the mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "fsdp", "tensor") mesh axes.

    At most one size may be -1; it is resolved so that the product equals the device
    count. The default, MeshConfig(), is pure data parallelism over every device.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.as_tuple()
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"MeshConfig{sizes}: at most one axis may be -1 (a wildcard)")
        for name, s in zip(MESH_AXES, sizes):
            if s != -1 and s < 1:
                raise ValueError(f"MeshConfig: {name}={s}; sizes must be >= 1 or -1 (wildcard)")

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The (data, fsdp, tensor) sizes for `num_devices` devices, wildcard filled in.

        Raises ValueError, naming the numbers, when the fixed sizes do not divide or do
        not multiply to `num_devices`.
        """
        sizes = self.as_tuple()
        fixed = math.prod(s for s in sizes if s != -1)
        desc = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig({desc}): the fixed axes multiply to {fixed}, which does not "
                    f"divide the {num_devices} devices, so -1 cannot be resolved"
                )
            sizes = tuple(num_devices // fixed if s == -1 else s for s in sizes)
        elif fixed != num_devices:
            more = "exceeds" if fixed > num_devices else "does not use all of"
            raise ValueError(
                f"MeshConfig({desc}): the mesh has {fixed} devices, which {more} the "
                f"{num_devices} devices available; set one axis to -1 or fix the sizes"
            )
        return sizes  # type: ignore[return-value]


def make_mesh(mesh_config: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ("data", "fsdp", "tensor") `Mesh` over `devices` (default: all of jax.devices()).

    With devices=None the device order is topology-aware (`jax.make_mesh`), so "tensor",
    the last and fastest-varying axis, stays within a host / NVLink island.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_config.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def abstract_mesh(mesh_config: MeshConfig, num_devices: int) -> AbstractMesh:
    """The mesh's axis names and sizes without devices: enough to compute shardings and
    per-device shapes (`NamedSharding(abstract_mesh, spec).shard_shape(shape)`) for
    configuration checks, e.g. "does xxl fit on 8 GPUs", on a laptop."""
    shape = mesh_config.resolve(num_devices)
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# ---------------------------------------------------------------------------- rules

# Rules are ordered (logical name, mesh axes) pairs, applied in order: a rule assigns its
# mesh axes to a dimension with that logical name when the dimension is not yet assigned,
# none of the mesh axes is already used by another dimension of the same array, and the
# dimension's size is divisible by the product of the mesh axis sizes. Otherwise the next
# rule for that name is tried, and a dimension that no rule assigns is replicated. So
# several rules for one name are fallbacks, earlier rules have priority over later ones
# (not over earlier dimensions), and a dimension that does not divide is never sharded.
# A rule whose mesh axes all have size 1 is skipped; a rule (name, None) replicates the
# name explicitly and stops later rules for it.
# Names without a rule ("layers", "lora_rank", "relpos_buckets", "length") are replicated:
# the scanned "layers" axis must stay whole on every device.

_BATCH: Rules = (("batch", BATCH_MESH_AXES), ("batch", "data"), ("batch", "fsdp"))

_FSDP: Rules = (
    # "embed" is on every large matrix; the fallbacks cover arrays without it (LoRA B)
    # or where it does not divide.
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("joined_kv", "fsdp"),
    ("vocab", "fsdp"),
)

_TENSOR: Rules = (
    ("joined_kv", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
)

RULE_PRESETS: dict[str, Rules] = {
    # Everything replicated; "batch" still maps to (data, fsdp), which are size 1.
    "single": _BATCH,
    "data_parallel": _BATCH,
    "fsdp": _BATCH + _FSDP,
    "fsdp_tensor": _BATCH + _TENSOR + _FSDP,
}


def logical_axis_rules(preset: str) -> Rules:
    """The rule set named `preset`: "single", "data_parallel", "fsdp" or "fsdp_tensor".

    "batch" comes first in every preset, so an activation [batch, length, embed] keeps
    the batch split over (data, fsdp) and its "embed" replicated.
    """
    if preset not in RULE_PRESETS:
        raise ValueError(f"unknown partitioning preset {preset!r}; expected one of {sorted(RULE_PRESETS)}")
    return RULE_PRESETS[preset]


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(
    axes: Sequence[Optional[str]], shape: Sequence[int], mesh: AnyMesh, rules: Rules
) -> PartitionSpec:
    """The `PartitionSpec` of one array with logical `axes` and global `shape`.

    See the comment above `RULE_PRESETS` for how rules apply. Mesh axes of size 1 are
    never named in the result (they shard nothing).

    Example (mesh fsdp=8, rules "fsdp"):
      >>> logical_to_spec(("layers", "embed", "joined_kv"), (24, 4096, 4096), mesh, rules)
      PartitionSpec(None, 'fsdp', None)
    """
    axes, shape = tuple(axes), tuple(shape)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} have {len(axes)} names for a shape {shape} of rank {len(shape)}")
    known = set(mesh.axis_names)
    assigned: list[tuple[str, ...]] = [()] * len(axes)
    used: set[str] = set()
    done = [False] * len(axes)
    for name, mesh_axes in rules:
        unknown = set(_as_tuple(mesh_axes)) - known
        if unknown:
            raise ValueError(f"rule ({name!r}, {mesh_axes!r}) names mesh axes {sorted(unknown)} not in {mesh.axis_names}")
        target = tuple(a for a in _as_tuple(mesh_axes) if mesh.shape[a] > 1)
        if mesh_axes is not None and not target:
            continue  # only size-1 mesh axes: shards nothing, leave the dim to later rules
        for dim, logical in enumerate(axes):
            if done[dim] or logical != name:
                continue
            size = math.prod(mesh.shape[a] for a in target)
            if used.isdisjoint(target) and shape[dim] % size == 0:
                assigned[dim] = target
                used.update(target)
                done[dim] = True
    return PartitionSpec(*(None if not t else t[0] if len(t) == 1 else t for t in assigned))


def constrain(x: jax.Array, axes: Sequence[Optional[str]], mesh: AnyMesh, rules: Rules) -> jax.Array:
    """`with_sharding_constraint` by logical names, inside jit: e.g. keep activations
    [batch, length, embed] split over the batch, or gather embeddings to replicated
    (axes (None, None)) before the loss so every device sees the global batch."""
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_axes_leaf(x: Any) -> bool:
    """Logical axes are tuples (or PartitionSpecs) of names, which jax would otherwise
    treat as pytree nodes."""
    return isinstance(x, PartitionSpec) or (
        isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    )


def logical_to_spec_tree(axes_tree: Any, shapes_tree: Any, mesh: AnyMesh, rules: Rules) -> Any:
    """A pytree of `PartitionSpec`s, one per leaf.

    Args:
      axes_tree: pytree whose leaves are tuples of logical names (or `PartitionSpec`s of
        logical names, as flax's `get_partition_spec` gives), one per array dimension.
      shapes_tree: the same structure, with anything that has `.shape` at the leaves
        (arrays, `jax.ShapeDtypeStruct`s from `jax.eval_shape`).
    """

    def spec(axes, x):
        if not hasattr(x, "shape"):
            raise TypeError(f"logical_to_spec_tree: leaf {x!r} for axes {axes} has no .shape")
        return logical_to_spec(tuple(axes), x.shape, mesh, rules)

    return jax.tree.map(spec, axes_tree, shapes_tree, is_leaf=_is_axes_leaf)


def logical_to_sharding(axes_tree: Any, shapes_tree: Any, mesh: AnyMesh, rules: Rules) -> Any:
    """Like `logical_to_spec_tree`, with `NamedSharding(mesh, spec)` leaves, ready for
    `jax.jit(in_shardings=..., out_shardings=...)` or `jax.device_put`. With an
    `AbstractMesh`, the shardings only answer shape questions (`shard_shape`)."""
    specs = logical_to_spec_tree(axes_tree, shapes_tree, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def optimizer_state_sharding(
    optimizer: Any, abstract_opt_state: Any, param_shardings: Any, mesh: AnyMesh
) -> Any:
    """Shardings for an optax state: every per-parameter leaf (Adam's mu and nu, ...)
    takes its parameter's sharding; everything else (step counts, ...) is replicated.

    Args:
      optimizer: the `optax.GradientTransformation` that built the state.
      abstract_opt_state: `jax.eval_shape(optimizer.init, abstract_params)`.
      param_shardings: the parameters' shardings (same tree as the params).
    """
    import optax

    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


# ---------------------------------------------------------------------------- model and train state
def state_shardings(state: Any, mesh: AnyMesh, rules: Rules) -> Any:
    """`NamedSharding` per leaf of a model state (an `nnx.State`, trainable or frozen), from
    the model's logical axes (`mst5_jax.core.model.logical_axes`) and the rule set. Works on
    abstract states (`nnx.state(abstract_model(cfg))`) too."""
    axes = logical_axes(state)

    def one(path, x):
        name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        return NamedSharding(mesh, logical_to_spec(axes[name], x.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, state)


def train_state_shardings(params: Any, optimizer: Any, mesh: AnyMesh, rules: Rules) -> dict[str, Any]:
    """Shardings of a train state's fields, by field name ("step", "params", "opt_state",
    "rng"): parameters by rule, optimizer moments like their parameters, the step count and
    the key replicated. `params` may be abstract; `mst5_jax.training.train_step` wraps the
    dict in its `TrainState`."""
    param_sh = state_shardings(params, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    return {"step": replicated(mesh), "params": param_sh,
            "opt_state": optimizer_state_sharding(optimizer, abstract_opt, param_sh, mesh),
            "rng": replicated(mesh)}


def replicated(mesh: AnyMesh) -> NamedSharding:
    """Every device holds the whole array (metrics, the step count, the loss's embeddings)."""
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------------- batches


def batch_spec(ndim: int = 1) -> PartitionSpec:
    """Leading (batch) dim split over ("data", "fsdp"), the other `ndim - 1` dims whole."""
    return PartitionSpec(BATCH_MESH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: AnyMesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def batch_axis_sharding(mesh: AnyMesh, axis: int) -> NamedSharding:
    """Dimension `axis` split over ("data", "fsdp"), the dims before it whole: a GradCache
    stack [k, mb, ...] of micro-batches is split at axis 1, each micro-batch over every
    device."""
    return NamedSharding(mesh, PartitionSpec(*[None] * axis, BATCH_MESH_AXES))


def num_batch_shards(mesh: AnyMesh) -> int:
    """How many ways the batch dimension is split: data x fsdp."""
    return math.prod(mesh.shape[a] for a in BATCH_MESH_AXES)


def host_local_to_global(
    batch: Mapping[str, Any], mesh: Mesh, spec: Optional[PartitionSpec] = None
) -> dict[str, jax.Array]:
    """Turn this host's slice of the batch into global arrays (multi-host input pipelines).

    Each host loads only the rows whose shards live on its devices: with B global rows
    split into S batch shards, of which this host's devices hold k distinct ones, the
    host passes B * k / S rows. On one host the local batch is the global batch.

    Args:
      batch: name -> host-local array [local_rows, ...] (numpy or jax).
      mesh: the training mesh.
      spec: the global arrays' PartitionSpec; default `batch_spec(ndim)` per array, i.e.
        the leading dim over ("data", "fsdp").

    Returns:
      name -> global `jax.Array` [local_rows * S / k, ...] with sharding (mesh, spec).

    Raises:
      ValueError naming the key and the numbers, when local_rows is not a multiple of
      the k shards this host holds.
    """
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        if local.ndim == 0:
            raise ValueError(f"host_local_to_global: batch[{key!r}] is a scalar; batch arrays need a leading batch dim")
        s = batch_spec(local.ndim) if spec is None else spec
        sharding = NamedSharding(mesh, s)
        num_shards = _num_batch_shards(mesh, s)
        # Which of the num_shards row blocks this host's devices hold.
        probe = sharding.addressable_devices_indices_map((num_shards,) + (1,) * (local.ndim - 1))
        local_shards = len({idx[0].start or 0 for idx in probe.values()})
        if local.shape[0] % local_shards:
            raise ValueError(
                f"host_local_to_global: batch[{key!r}] has {local.shape[0]} rows on this host, "
                f"not divisible by the {local_shards} batch shards its devices hold "
                f"({num_shards} in all over mesh axes {_as_tuple(s[0]) if len(s) else ()}); "
                f"use a global batch size that is a multiple of {num_shards}"
            )
        global_shape = (local.shape[0] // local_shards * num_shards,) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def _num_batch_shards(mesh: AnyMesh, spec: PartitionSpec) -> int:
    """Into how many blocks `spec` splits the leading dim."""
    if not len(spec) or spec[0] is None:
        return 1
    return math.prod(mesh.shape[a] for a in _as_tuple(spec[0]))


# ---------------------------------------------------------------------------- accounting


def bytes_per_device(abstract_tree: Any, sharding_tree: Any) -> int:
    """Bytes that one device holds of the arrays in `abstract_tree` (ShapeDtypeStructs or
    arrays) sharded as `sharding_tree`; computed from shapes, nothing is allocated. For
    uneven shardings (not produced by the rules here) it is the largest shard."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize,
        abstract_tree,
        sharding_tree,
    )
    return int(sum(jax.tree.leaves(sizes)))
