"""Checks a run config against its hardware without devices: `python -m mst5_jax.train --dry_run`.

The config is built on a `jax.sharding.AbstractMesh` of the hardware file's device count
(NUM_DEVICES); parameter and optimizer-state shardings come from the same rules the run
uses, so the per-device bytes below are what the run would place, not a guess. Activations
are an estimate (documented in `activation_bytes`).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from mst5_jax.core import lora, partitioning
from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.model import abstract_model
from mst5_jax.training.optimizer import make_optimizer
from mst5_jax.training.run_config import TrainConfig
from mst5_jax.training.run_config import encoder_config as run_encoder_config

GIB = 2**30


def encoder_config(cfg: TrainConfig) -> EncoderConfig:
    """The run's EncoderConfig from its preset and overrides (the pretrained directory may
    be remote or absent: a dry run reads nothing)."""
    return run_encoder_config(cfg, read_pretrained=False)


def activation_bytes(enc: EncoderConfig, triplets_per_device: int, length: int, remat: str) -> int:
    """Estimated peak activation bytes of one device's (micro-)batch, 3 texts per triplet.

    Per layer and token the block keeps, in the compute dtype: the residual input (d_model),
    q/k/v/o (4 x heads*d_kv), the FFN hidden states (2-3 x d_ff) and attention
    probabilities (heads x length, fp32). "full"/"residual" remat keep only the residual
    stream per layer plus one layer's working set; "dots" keeps the matmul outputs.
    "cached_inputs" is GradCache with cached layer inputs: one block rebuilt and
    differentiated at a time (the inputs themselves: `cached_layer_input_bytes`).
    """
    tokens = 3 * triplets_per_device * length
    item = _itemsize(enc)
    working = tokens * (enc.d_model + 4 * enc.inner_dim + (3 if enc.gated else 2) * enc.d_ff) * item
    working += tokens * enc.num_heads * length * 4 * 2
    if remat == "cached_inputs":
        return 2 * working
    if remat in ("full", "residual"):
        return enc.num_layers * tokens * enc.d_model * item * (2 if remat == "residual" else 1) + 2 * working
    if remat == "dots":
        return enc.num_layers * tokens * (enc.d_model + 4 * enc.inner_dim + 3 * enc.d_ff) * item + working
    return enc.num_layers * working + working


def cached_layer_input_bytes(enc: EncoderConfig, triplets_per_device: int, length: int) -> int:
    """What GradCache with cached layer inputs keeps for the whole step: every block's
    input and the last block's output, (num_layers + 1) x tokens x d_model in the compute
    dtype (`mst5_jax.core.gradcache`)."""
    return (enc.num_layers + 1) * 3 * triplets_per_device * length * enc.d_model * _itemsize(enc)


def _itemsize(enc: EncoderConfig) -> int:
    return 2 if enc.dtype == "bfloat16" else 4


def check(cfg: TrainConfig) -> dict[str, Any]:
    """Per-device bytes of the run on its own hardware; raises if it does not fit or divide."""

    num_devices = cfg.num_devices or 1
    data, fsdp, tensor = cfg.mesh.resolve(num_devices)
    mesh = partitioning.abstract_mesh(cfg.mesh, num_devices)
    data_shards = data * fsdp
    if cfg.batch_size % data_shards:
        raise ValueError(f"BATCH_SIZE={cfg.batch_size} is not divisible by the data axes "
                         f"(data={data} x fsdp={fsdp} = {data_shards})")
    if cfg.microbatch_size and cfg.batch_size % cfg.microbatch_size:
        raise ValueError(f"BATCH_SIZE={cfg.batch_size} is not divisible by microbatch_size={cfg.microbatch_size}")
    enc = encoder_config(cfg)
    rules = partitioning.logical_axis_rules(cfg.partition_preset)
    mode = "full" if cfg.lora is None else "lora"

    def build():
        m = abstract_model(enc)
        if mode == "lora":
            lora.apply_lora(m, cfg.lora, 0)
        return m

    model = nnx.eval_shape(build) if mode == "lora" else abstract_model(enc)
    graphdef, trainable, frozen = lora.split_trainable(model, mode)
    trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), trainable)
    t_sh = partitioning.state_shardings(trainable, mesh, rules)
    f_sh = partitioning.state_shardings(frozen, mesh, rules)
    opt = make_optimizer(cfg.optimizer, cfg.schedule_steps or cfg.train_steps)
    abstract_opt = jax.eval_shape(opt.init, trainable)
    o_sh = partitioning.optimizer_state_sharding(opt, abstract_opt, t_sh, mesh)
    per_dev = {
        "frozen_params": partitioning.bytes_per_device(frozen, f_sh),
        "trainable_params": partitioning.bytes_per_device(trainable, t_sh),
        "gradients": partitioning.bytes_per_device(trainable, t_sh),
        "optimizer_state": partitioning.bytes_per_device(abstract_opt, o_sh),
    }
    per_device_batch = (cfg.microbatch_size or cfg.batch_size) // data_shards or 1
    cached = bool(cfg.microbatch_size and cfg.gradcache_cache_layer_inputs)
    per_dev["activations_estimate"] = activation_bytes(enc, per_device_batch, cfg.max_length,
                                                       "cached_inputs" if cached else enc.remat)
    if cached:
        per_dev["gradcache_layer_inputs"] = cached_layer_input_bytes(enc, cfg.batch_size // data_shards or 1,
                                                                     cfg.max_length)
    total = sum(per_dev.values())
    report = {
        "num_devices": num_devices,
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "per_device_gib": {k: v / GIB for k, v in per_dev.items()},
        "total_gib": total / GIB,
        "device_memory_gib": cfg.device_memory_gib,
    }
    if cfg.device_memory_gib and total > cfg.device_memory_gib * GIB:
        raise ValueError(f"the run needs {total / GIB:.1f} GiB per device, more than the "
                         f"{cfg.device_memory_gib} GiB of DEVICE_MEMORY_GIB: {report['per_device_gib']}")
    return report
