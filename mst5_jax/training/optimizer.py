"""The optimizer of a run: `OptimizerConfig` -> an optax chain (clip, AdamW or Adafactor).

The learning rate warms up linearly from 0 over `warmup_steps`, then decays (linear,
cosine or constant) until `schedule_steps`, a horizon of its own (the SCHEDULE_STEPS
macro), so raising TRAIN_STEPS on a finished run continues the same curve. Weight decay
applies to matrices only (`decay_mask`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import optax


@dataclasses.dataclass
class OptimizerConfig:
    """optax optimizer and schedule: warmup, then linear/cosine decay over `schedule_steps`."""

    name: str = "adamw"  # adamw | adafactor
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    decay: str = "linear"  # linear | cosine | constant
    end_learning_rate_factor: float = 0.0
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 1.0
    b1: float = 0.9
    b2: float = 0.999


def make_schedule(o: OptimizerConfig, schedule_steps: int) -> optax.Schedule:
    """step (0-based count of completed updates) -> learning rate.

    Example: `make_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=20), 300)(19)`
    is 9.5e-4 (step 19 of a 20-step warmup from 0), and at step 300 the rate reaches
    `learning_rate * end_learning_rate_factor`.
    """
    decay_steps = max(schedule_steps - o.warmup_steps, 1)
    end = o.learning_rate * o.end_learning_rate_factor
    if o.decay == "linear":
        decay = optax.linear_schedule(o.learning_rate, end, decay_steps)
    elif o.decay == "cosine":
        decay = optax.cosine_decay_schedule(o.learning_rate, decay_steps, alpha=o.end_learning_rate_factor)
    elif o.decay == "constant":
        decay = optax.constant_schedule(o.learning_rate)
    else:
        raise ValueError(f"OptimizerConfig.decay={o.decay!r}: expected linear, cosine or constant")
    if o.warmup_steps <= 0:
        return decay
    warm = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    return optax.join_schedules([warm, decay], [o.warmup_steps])


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (ndim >= 2): not on norm scales or LoRA scales."""
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(o: OptimizerConfig, schedule_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (when `clip_norm`), then AdamW or Adafactor on `make_schedule`."""
    schedule = make_schedule(o, schedule_steps)
    parts = []
    if o.clip_norm:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    if o.name == "adamw":
        parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))
    elif o.name == "adafactor":
        parts.append(optax.adafactor(schedule, weight_decay_rate=o.weight_decay or None, weight_decay_mask=decay_mask))
    else:
        raise ValueError(f"OptimizerConfig.name={o.name!r}: expected adamw or adafactor")
    return optax.chain(*parts)
