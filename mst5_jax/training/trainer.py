"""The training loop: `Trainer(cfg).run()` builds a run from its `TrainConfig` and steps it.

Data flows one way: task -> `tasks.pipeline.TripletIterator` or, under DATA_PIPELINE
seqio, `tasks.seqio_tasks.SeqioTripletIterator` (host-local numpy batches, the same for a task) ->
global arrays on the mesh -> the jitted step (`mst5_jax.training.train_step`) -> hooks
(`mst5_jax.training.hooks`: metrics.jsonl, orbax checkpoints, held-out evaluation,
profiling, preemption). The trainer owns the state and the order of events; everything
around a step is a hook, so a test or a new feature adds a hook instead of editing the loop.

    trainer = Trainer(cfg)                 # mesh, data, model, state, step; resumes MODEL_DIR
    summary = trainer.run()                # steps 1..TRAIN_STEPS (from the resumed step)
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mst5_jax.core import lora, partitioning
from mst5_jax.core.model import init_model
from mst5_jax.formats import huggingface
from mst5_jax.formats.vocab import default_vocab_path
from mst5_jax.formats import run_dir
from mst5_jax.training import train_step
from mst5_jax.training.flops import model_flops_per_triplet
from mst5_jax.training.hooks import (
    CheckpointHook,
    Evaluator,
    HeldoutEvalHook,
    Hook,
    MetricsHook,
    PreemptionHook,
    ProfileHook,
    registered_evaluator,
)
from mst5_jax.training import resume_check
from mst5_jax.training.optimizer import make_optimizer
from mst5_jax.training.run_lock import RunLock
from mst5_jax.training.run_config import TrainConfig, encoder_config
from mst5_jax.utils import files, fs, paths
from tasks.pipeline import TripletIterator
from tasks.train_data import make_train_iterator

log = logging.getLogger("mst5_jax.train")


class Trainer:
    """One run: builds everything in `__init__` (resuming MODEL_DIR when it holds a
    verified checkpoint), then `run()` steps to `cfg.train_steps`.

    Args:
      cfg: the run's `TrainConfig`.
      hooks: extra hooks, called after the built-in ones (e.g. a
        `mst5_jax.training.faults.FaultHook` in tests).
      evaluator: the held-out evaluator, `encode -> {metric: value}`; default: the registered
        evaluator `cfg.heldout_task` (`hooks.registered_evaluator`), whose headline is the metric.

    State the hooks read: `step`, `batch` (the global batch of the update in progress),
    `state` (`train_step.TrainState`), `frozen`, `metrics`
    (this update's, on device), `log_now`, `ckpt_now`, `stopping`, `eval_metrics`, `mesh`,
    `data`, `tokenizer`, `model_dir`, `summary`, and `current_model()`.
    """

    def __init__(self, cfg: TrainConfig, hooks: Sequence[Hook] = (), evaluator: Optional[Evaluator] = None):
        if not cfg.model_dir:
            raise ValueError("MODEL_DIR is not set (TrainConfig.model_dir)")
        if cfg.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
        self.cfg = cfg
        self.primary = jax.process_index() == 0  # shared files (run.json, metrics, summary) are written once
        self.model_dir = fs.absolute(cfg.model_dir)  # a gs:// URL stays one
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = paths.resolve_data_dir(cfg.data_dir)
        self.stop_requested = False
        self.eval_metrics: Optional[dict] = None
        # The run directory has one owner: nothing in it is read or written before the lock.
        self.lock = RunLock.acquire(self.model_dir) if self.primary else None
        try:
            self._build_mesh()
            self._build_data()
            self._build_model_and_state()
            self.checkpoints = CheckpointHook(self.model_dir, cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                                              best_metric=cfg.best_metric_name if cfg.eval_every else None)
            self.start_step = self._resume()
        except BaseException:
            self.release_lock()
            raise
        self.summary: dict[str, Any] = {"model_dir": str(self.model_dir), "start_step": self.start_step,
                                        "data_pipeline": self.data_pipeline}
        self.metrics_hook = MetricsHook(self.model_dir / "metrics.jsonl", cfg.tensorboard, self.primary)
        self.hooks: list[Hook] = [PreemptionHook()]
        if cfg.profile_steps:
            self.hooks.append(ProfileHook(cfg.profile_steps, self.model_dir / "profile"))
        self.hooks.append(self.metrics_hook)
        if cfg.heldout_eval or cfg.eval_every:
            evaluator = evaluator or registered_evaluator(cfg.heldout_task, self.data_dir, cfg.eval_max_length,
                                                          **cfg.heldout_task_kwargs)
            self.hooks.append(HeldoutEvalHook(
                evaluator, max_length=cfg.eval_max_length, metric=cfg.heldout_task, heldout_eval=cfg.heldout_eval,
                min_gain=cfg.min_heldout_gain, eval_every=cfg.eval_every, eval_batches=cfg.eval_batches,
                valid_data=self._validation_data() if cfg.eval_every else None, write=self.metrics_hook.write))
        self.hooks += [self.checkpoints, *hooks]

    # ------------------------------------------------------------------ building
    def _build_mesh(self) -> None:
        cfg = self.cfg
        self.mesh = partitioning.make_mesh(cfg.mesh)
        self.rules = partitioning.logical_axis_rules(cfg.partition_preset)
        data_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.batch_size % data_shards:
            raise ValueError(f"BATCH_SIZE={cfg.batch_size} is not divisible by the data axes "
                             f"(data={self.mesh.shape['data']} x fsdp={self.mesh.shape['fsdp']} = {data_shards})")
        if cfg.batch_size % jax.process_count():
            raise ValueError(f"BATCH_SIZE={cfg.batch_size} is not divisible by {jax.process_count()} processes")
        self.host_batch = cfg.batch_size // jax.process_count()

    def _build_data(self) -> None:
        cfg = self.cfg
        if cfg.vocab:
            self.vocab = cfg.vocab
        elif cfg.pretrained:
            self.vocab = str(huggingface.resolve_model_dir(cfg.pretrained))
        else:
            self.vocab = default_vocab_path(self.data_dir)
        self.data, self.data_pipeline = make_train_iterator(
            cfg.data_pipeline, cfg.mixture_or_task_name, self.data_dir, self.vocab, cfg.max_length, self.host_batch,
            cfg.seed, shard_index=jax.process_index(), num_shards=jax.process_count())
        log.info("data pipeline: %s (DATA_PIPELINE=%r)", self.data_pipeline, cfg.data_pipeline)
        self.tokenizer = self.data.tokenizer

    def _iterator(self, split: str) -> TripletIterator:
        cfg = self.cfg
        return TripletIterator(cfg.mixture_or_task_name, self.data_dir, self.vocab, cfg.max_length, self.host_batch,
                               cfg.seed, shard_index=jax.process_index(), num_shards=jax.process_count(), split=split)

    def _validation_data(self) -> TripletIterator:
        return self._iterator("validation")

    def _build_model_and_state(self) -> None:
        """Pretrained weights or random init, then LoRA; the sharded state and the jitted step."""
        cfg = self.cfg
        self.encoder_config = enc = encoder_config(cfg, self.tokenizer.vocab_size)
        if cfg.pretrained:
            base_dir = huggingface.resolve_model_dir(cfg.pretrained)
            model = huggingface.load_hf_weights(base_dir, enc)
            # a gs:// base is recorded by its URL, not by this machine's staged copy
            self.base_info = {"path": cfg.pretrained if fs.is_remote(cfg.pretrained) else str(base_dir),
                              "fingerprint": run_dir.fingerprint(base_dir)}
        else:
            model = init_model(enc, seed=cfg.seed)
            # A LoRA resume rebuilds this frozen base from the seed: the seed is part of it.
            self.base_info = {"path": "base", "random_init": True, "seed": cfg.seed}
        if cfg.mode == "lora":
            lora.apply_lora(model, cfg.lora, cfg.seed)
            print(lora.dry_run(model, cfg.lora), flush=True)
        n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, lora.trainable_filter(cfg.mode))))
        self.flops_per_triplet = model_flops_per_triplet(enc, cfg.max_length, n_lora, cfg.mode == "full")
        self.optimizer = make_optimizer(cfg.optimizer, cfg.horizon)
        frozen_dtype = enc.param_dtype if cfg.mode == "lora" else None
        self.graphdef, self.state, self.frozen, self.shardings = train_step.init_train_state(
            model, self.optimizer, self.mesh, self.rules, mode=cfg.mode, seed=cfg.seed, frozen_dtype=frozen_dtype)
        del model
        self.step_fn = train_step.make_train_step(self.graphdef, self.optimizer, cfg.loss, self.mesh, self.shardings,
                                                  microbatch_size=cfg.microbatch_size,
                                                  cache_layer_inputs=cfg.gradcache_cache_layer_inputs)

    def make_eval_step(self):
        """The jitted held-out step `(params, frozen, batch) -> metrics` of this run."""
        return train_step.make_eval_step(self.graphdef, self.cfg.loss, self.mesh, self.shardings)

    def run_info(self) -> dict:
        """This run's record (run.json): what loading needs, plus the recipe a resume is
        checked against (`mst5_jax.training.resume_check`)."""
        cfg = self.cfg
        return {
            "encoder_config": dataclasses.asdict(self.encoder_config), "mode": cfg.mode,
            "lora": None if cfg.lora is None else dataclasses.asdict(cfg.lora),
            "base": self.base_info, "task": cfg.mixture_or_task_name, "vocab": self.vocab,
            "vocab_sha256": self.tokenizer.fingerprint(), "data_pipeline": self.data_pipeline,
            "best_metric": cfg.best_metric_name if cfg.eval_every else None, "best_mode": "max",
            "optimizer": dataclasses.asdict(cfg.optimizer), "loss": dataclasses.asdict(cfg.loss),
            "batch_size": cfg.batch_size, "schedule_steps": cfg.horizon, "seed": cfg.seed,
            "max_length": cfg.max_length, "train_steps": cfg.train_steps}

    def _check_resume(self, start: int) -> list[dict]:
        """Refuses (UserError, nothing written) a resume that changes the run's shapes or,
        unless ALLOW_RECIPE_CHANGES names them, its recipe; returns the accepted changes."""
        run_file = self.model_dir / run_dir.RUN_FILE
        old = run_dir.read_run_info(self.model_dir)
        new = self.run_info()
        recorded = (old.get("base") or {}).get("fingerprint")
        if self.cfg.mode == "lora" and self.cfg.pretrained and recorded and ":" not in recorded:
            run_dir.check_base(self.base_info["path"], recorded, run_file)  # a header-only record
        return resume_check.check_resume(old, new, self.cfg.allow_recipe_changes, run_file=run_file, step=start,
                                         train_steps=self.cfg.train_steps)

    def _resume(self) -> int:
        """Restores the newest verified checkpoint (returns its step) or writes a fresh run's files (0)."""
        ckpt = self.checkpoints
        start = ckpt.latest_step() or 0
        if start:
            changes = self._check_resume(start)
            state = self.state
            params, opt_state, meta = ckpt.restore(start, state.params.to_pure_dict(), jax.tree.leaves(state.opt_state))
            nnx.replace_by_pure_dict(state.params, params)
            opt_tree = jax.tree.unflatten(jax.tree.structure(state.opt_state), opt_state)
            self.state = state.replace(step=jnp.asarray(meta["step"], jnp.int32), opt_state=opt_tree,
                                       params=jax.device_put(state.params, self.shardings.state.params))
            self.data.set_state(host_data_state(meta["data"], len(self.data)))
            log.info("resumed %s at step %d", self.model_dir, start)
            if self.primary:
                resume_check.append_history(self.model_dir, changes)
                run_dir.write_run_info(self.model_dir, self.run_info())  # the next resume compares with this one
        elif self.primary:
            ckpt.write_run_files(self, self.run_info())
        return start

    def release_lock(self) -> None:
        """Gives up MODEL_DIR/.lock (idempotent; `run` calls it when it returns or raises)."""
        if self.lock is not None:
            self.lock.release()

    def current_model(self) -> nnx.Module:
        """The model with the current weights (full fine-tuning: cast to the model's param_dtype)."""
        dtype, full = self.encoder_config.param_dtype, self.cfg.mode == "full"
        params = jax.tree.map(lambda x: x.astype(dtype) if full else x, self.state.params)
        return nnx.merge(self.graphdef, params, self.frozen)

    # ------------------------------------------------------------------ the loop
    def _restore_signals(self) -> None:
        for h in self.hooks:
            if isinstance(h, PreemptionHook):
                h.on_end(self)

    def call_hooks(self, event: str, *args) -> None:
        for h in self.hooks:
            getattr(h, event)(self, *args)

    def run(self) -> dict:
        """Steps to `cfg.train_steps`; returns the summary (final step, last metrics record,
        held-out before/after when enabled, preempted) and writes it to summary.json."""
        cfg = self.cfg
        finite = jnp.ones((), jnp.float32)
        self.step = self.start_step
        try:
            self.call_hooks("on_start")
            while self.step < cfg.train_steps:
                self.batch = partitioning.host_local_to_global(next(self.data), self.mesh)
                self.call_hooks("before_step", self.step + 1)
                self.state, self.metrics = self.step_fn(self.state, self.frozen, self.batch)
                self.step += 1
                finite = finite * self.metrics["is_finite"]
                self.stopping = self.stop_requested  # read once: a later signal is handled next step
                self.log_now = self.step % cfg.log_every == 0 or self.step == cfg.train_steps
                self.ckpt_now = self.step % cfg.checkpoint_every == 0 or self.step == cfg.train_steps or self.stopping
                self.eval_metrics = None
                if (self.log_now or self.ckpt_now) and float(finite) < 1.0:
                    raise FloatingPointError(
                        f"non-finite loss or gradient at or before step {self.step}; the latest checkpoint "
                        f"({self.checkpoints.latest_step()}) is the last good one")
                self.call_hooks("after_step")
                if self.stopping:
                    log.warning("saved step %d after a stop signal; exiting", self.step)
                    self.summary["preempted"] = True
                    break
        except BaseException:
            self.checkpoints.close()
            self._restore_signals()
            self.release_lock()
            raise
        self.summary["final_step"] = self.step
        try:
            try:
                for h in reversed(self.hooks):  # checkpoints close before the final evaluation
                    if not isinstance(h, PreemptionHook):
                        h.on_end(self)
            finally:
                self._restore_signals()
            if self.primary:
                files.write_json_atomic(self.model_dir / "summary.json", self.summary, default=str)
        finally:
            self.release_lock()
        return self.summary


def host_data_state(saved: dict, epoch_size: int) -> dict:
    """This host's data position from a checkpoint's. The saved state is host 0's, i.e. the
    global position of the next global batch; host i of N starts i examples later, so a
    checkpoint restores on any process count."""
    position = int(saved["epoch"]) * epoch_size + int(saved["index"]) + jax.process_index()
    return {**saved, "epoch": position // epoch_size, "index": position % epoch_size}


def run(cfg: TrainConfig, hooks: Sequence[Hook] = (), evaluator: Optional[Evaluator] = None) -> dict:
    """`Trainer(cfg, hooks, evaluator).run()`: trains as configured, resuming MODEL_DIR."""
    return Trainer(cfg, hooks, evaluator).run()
