"""`TrainConfig`: everything one training run needs, as data.

Gin binds these fields (`mst5_jax.training.gin_utils.parse_gin`); `Trainer(cfg).run()`
(`mst5_jax.training.trainer`) executes them. The model is a preset or a pretrained
directory plus `model_overrides`: `EncoderConfig` fields that replace the preset's or the
`config.json`'s. Gin binds `EncoderConfig` directly (`EncoderConfig.remat = 'full'`, as t5x
binds its network config); `parse_gin` folds those bindings into `model_overrides`, so the
run config holds one set of model overrides and never a copy of dtype, param_dtype, remat
or dropout_rate.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from mst5_jax.core.config import EncoderConfig
from mst5_jax.core.losses import LossConfig
from mst5_jax.core.partitioning import MeshConfig
from mst5_jax.formats import huggingface
from mst5_jax.training.optimizer import OptimizerConfig


@dataclasses.dataclass
class TrainConfig:
    """Everything one run needs. Gin binds these fields; `Trainer(cfg).run()` executes them.

    Model: `model` (a preset name) or `pretrained` (an HF directory or hub id), then
    `model_overrides` ({EncoderConfig field: value}: sizes for random init, and the recipe's
    numerics dtype / param_dtype / remat / dropout_rate). `lora` is a
    `mst5_jax.core.lora.LoRAConfig`, or None for full fine-tuning.
    Hardware: `mesh`, `partition_preset`, and, for `--dry_run`'s checks only,
    `num_devices`, `device_memory_gib` and `peak_tflops` (per device, for MFU).
    Intervals are in optimizer steps; `schedule_steps` defaults to `train_steps`.
    `allow_recipe_changes` (macro ALLOW_RECIPE_CHANGES) names the recipe fields a resume may
    change (`mst5_jax.training.resume_check`).
    """

    model_dir: str = ""
    model: str = "tiny"
    pretrained: Optional[str] = None
    model_overrides: dict = dataclasses.field(default_factory=dict)
    vocab: Optional[str] = None
    mixture_or_task_name: str = "mst5_xnli_cross"
    data_pipeline: str = "auto"  # 'auto' | 'seqio' | 'numpy': `tasks.train_data.resolve_pipeline`
    data_dir: Optional[str] = None
    max_length: int = 64
    batch_size: int = 32
    train_steps: int = 100
    schedule_steps: Optional[int] = None
    seed: int = 0
    allow_recipe_changes: Sequence[str] = ()
    lora: Any = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    partition_preset: str = "data_parallel"
    microbatch_size: Optional[int] = None
    gradcache_cache_layer_inputs: bool = False
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: Optional[int] = None
    heldout_task: str = "xnli_retrieval"  # any name in mst5_jax.evals.registry; its headline is the metric
    heldout_task_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. {'langs': [...], 'max_premises': 830}
    eval_max_length: int = 64
    eval_batches: int = 2
    best_metric: Optional[str] = None  # a key of the eval metrics; None: the held-out task's headline
    heldout_eval: bool = False
    min_heldout_gain: float = 0.0
    peak_tflops: Optional[float] = None
    tensorboard: bool = False
    profile_steps: Optional[str] = None
    compilation_cache_dir: Optional[str] = None
    num_devices: Optional[int] = None  # for config checks (gin hardware files); not enforced at run time
    device_memory_gib: Optional[float] = None

    @property
    def best_metric_name(self) -> str:
        """The eval metric that picks the best checkpoint."""
        return self.best_metric or self.heldout_task

    @property
    def mode(self) -> str:
        """"full" (every weight trains) or "lora"."""
        return "full" if self.lora is None else "lora"

    @property
    def horizon(self) -> int:
        """The learning-rate schedule's length in steps (SCHEDULE_STEPS, else TRAIN_STEPS)."""
        return self.schedule_steps or self.train_steps


def encoder_config(cfg: TrainConfig, vocab_size: Optional[int] = None, read_pretrained: bool = True) -> EncoderConfig:
    """The run's `EncoderConfig`: the pretrained `config.json` (when `read_pretrained`) or the
    preset, then `cfg.model_overrides`. `vocab_size` (the tokenizer's) sizes a random-init
    preset; an override wins over it."""
    if cfg.pretrained and read_pretrained:
        d = huggingface.resolve_model_dir(cfg.pretrained)
        if not (d / "config.json").is_file():
            raise ValueError(f"TrainConfig.pretrained={cfg.pretrained!r}: {d / 'config.json'} is missing; pass a "
                             "Hugging Face model folder (config.json, weights and tokenizer) or a hub id")
        return EncoderConfig.from_hf_json(d / "config.json", **cfg.model_overrides)
    sized = {} if vocab_size is None else {"vocab_size": vocab_size}
    return EncoderConfig.preset(cfg.model, **{**sized, **cfg.model_overrides})
