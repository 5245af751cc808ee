"""What a training run does around its steps, one small class per concern.

`mst5_jax.training.trainer.Trainer` owns the loop and calls, on every hook in order:

    on_start(trainer)              after the state is built and resumed, before step 1
    before_step(trainer, step)     before update `step` (1-based) is computed
    after_step(trainer)            after it; `trainer.step`, `.metrics`, `.log_now`,
                                   `.ckpt_now`, `.stopping` describe it
    on_save(trainer, step)         orbax committed step `step`; its manifest is not written
    on_end(trainer)                after the loop (also after a preemption)

Hooks here: `MetricsHook` (metrics.jsonl, optional TensorBoard, the log line with its ETA),
`HeldoutEvalHook` (held-out loss and any `encode -> {name: float}` evaluator),
`CheckpointHook` (orbax `RunCheckpoints`, manifests, quarantine and the run files),
`ProfileHook` (a jax.profiler trace of steps a..b) and `PreemptionHook` (SIGTERM/SIGINT ->
save, then stop). Fault injection for tests is `mst5_jax.training.faults.FaultHook`.
"""
from __future__ import annotations

import json
import logging
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx

from mst5_jax.core import partitioning
from mst5_jax.evals import registry
from mst5_jax.evals.report import flatten
from mst5_jax.formats import huggingface
from mst5_jax.inference.encoder import SentenceEncoder, truncation_summary
from mst5_jax.formats import manifest, run_dir
from mst5_jax.training.optimizer import make_schedule
from mst5_jax.utils import fs
from mst5_jax.utils.files import write_text_atomic

log = logging.getLogger("mst5_jax.train")

# encode(list of sentences) -> float32 [n, d]; an evaluator maps it to {metric: value}.
Encode = Callable[[list], np.ndarray]
Evaluator = Callable[[Encode], dict]


class Hook:
    """Does nothing at every event; subclasses override what they need."""

    def on_start(self, trainer) -> None:
        pass

    def before_step(self, trainer, step: int) -> None:
        pass

    def after_step(self, trainer) -> None:
        pass

    def on_save(self, trainer, step: int) -> None:
        pass

    def on_end(self, trainer) -> None:
        pass


# ---------------------------------------------------------------------- metrics
class MetricsWriter:
    """Appends one JSON object per line to MODEL_DIR/metrics.jsonl (flushed each write).

    A GCS object cannot be appended to: on ``gs://`` the file's text is kept here and the
    whole object is rewritten at each record (one small upload per logged step)."""

    def __init__(self, path: fs.AnyPath, tensorboard: bool = False):
        self.path = path
        self._remote_text: Optional[str] = None
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(path.parent / "tb"))
            except ImportError:
                log.warning("TensorBoard logging needs tensorboardX; writing metrics.jsonl only")

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if fs.is_remote(self.path):
            if self._remote_text is None:
                self._remote_text = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
            self._remote_text += line
            write_text_atomic(self.path, self._remote_text)
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """Drops records after `last_step` (the steps of a crashed run that are recomputed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    write_text_atomic(path, "".join(l + "\n" for l in keep))


class MetricsHook(Hook):
    """Every `log_every` steps (and the last): one metrics.jsonl record, and a log line (or a
    progress bar on a terminal) with the loss, throughput and the ETA of the run.

    Record fields: step, loss, accuracy, pos_sim, neg_sim, grad_norm (those the loss
    reports), learning_rate, step_time_s (mean over the steps since the last record),
    triplets_per_sec, tokens_per_sec (3 texts of max_length per triplet), num_devices, mfu
    (model FLOP/s over `peak_tflops` x devices; None without peak_tflops). The first
    record a trainer writes also has data_pipeline ("seqio" or "numpy": what read the data).
    Only process 0 writes.
    """

    def __init__(self, path: pathlib.Path, tensorboard: bool = False, primary: bool = True):
        self.path = path
        self.writer = MetricsWriter(path, tensorboard) if primary else None
        self.primary = primary
        self.last: dict = {}
        self._bar = None

    def write(self, record: dict) -> None:
        if self.writer is not None:
            self.writer.write(record)

    def on_start(self, trainer) -> None:
        # Also from step 0 (killed before the first checkpoint, or every step quarantined):
        # the steps after the resumed one are recomputed, so their old records go.
        if self.primary:
            truncate_metrics(self.path, trainer.start_step)
        self._t, self._step = time.perf_counter(), trainer.start_step
        self._first = True
        self._bar = _progress_bar(trainer.cfg.train_steps, trainer.start_step)

    def after_step(self, trainer) -> None:
        if not trainer.log_now:
            return
        cfg, step = trainer.cfg, trainer.step
        m = {k: float(v) for k, v in jax.device_get(trainer.metrics).items()}
        now = time.perf_counter()
        dt = (now - self._t) / max(step - self._step, 1)
        self._t, self._step = now, step
        rec = {"step": step, **{k: m[k] for k in ("loss", "accuracy", "pos_sim", "neg_sim", "grad_norm") if k in m},
               "learning_rate": float(make_schedule(cfg.optimizer, cfg.horizon)(step - 1)),
               "step_time_s": dt, "triplets_per_sec": cfg.batch_size / dt,
               "tokens_per_sec": cfg.batch_size * 3 * cfg.max_length / dt,
               "num_devices": int(trainer.mesh.size),
               "mfu": (trainer.flops_per_triplet * cfg.batch_size / dt / (cfg.peak_tflops * 1e12 * trainer.mesh.size)
                       if cfg.peak_tflops else None)}
        if self._first:
            rec["data_pipeline"] = getattr(trainer, "data_pipeline", "numpy")
            self._first = False
        self.write(rec)
        self.last = rec
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{m['loss']:.4f}", tps=f"{rec['triplets_per_sec']:.1f}")
        else:
            eta = dt * (cfg.train_steps - step)
            log.info("step %d/%d loss %.4f acc %.3f %.1f triplets/s, ETA %s", step, cfg.train_steps, m["loss"],
                     m.get("accuracy", 0.0), rec["triplets_per_sec"], _hms(eta))

    def on_end(self, trainer) -> None:
        if self._bar is not None:
            self._bar.close()
        trainer.summary["last"] = self.last


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _progress_bar(total: int, start: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", desc="train")


# ---------------------------------------------------------------------- held-out evaluation
def registered_evaluator(task: str, data_dir: pathlib.Path, max_length: int, **kwargs: Any) -> Evaluator:
    """Task `task` of the evaluator registry (`mst5_jax.evals.registry`) as a held-out evaluator.

    Returns `encode -> metrics`: ``{task: the record's headline}`` plus ``{"task/KEY": value}``
    for each row of its table (KEY the dotted key inside the result, e.g.
    ``xnli_retrieval/avg_all``). An unknown task is the registry's error, listing the known ones.
    """
    record = registry.get(task)

    def evaluate(encode: Encode) -> dict:
        result = record(encode, data_dir, max_length=max_length, **kwargs)
        flat = flatten(result)
        rows = {f"{task}/{key}": flat[key] for _, key in record.table_rows(result) if isinstance(flat.get(key), float)}
        return {task: record.headline(result), **rows}

    return evaluate


class HeldoutEvalHook(Hook):
    """Scores the current weights with `evaluator(encode)`, where `encode` is a
    `SentenceEncoder` of the model (batch 128, `max_length` tokens).

    - `heldout_eval` (the CPU demo): the headline metric `metric` before training (measured
      at step 0 and kept in MODEL_DIR/heldout_before.json, so a resumed run compares against
      it) and after; the run fails when it rose by less than `min_gain` points (0: no check).
    - `eval_every` steps: the loss's metrics on `eval_batches` validation batches, prefixed
      "eval_", plus the evaluator's; written to metrics.jsonl as {"step", "eval"} and handed
      to the checkpoint (best-step tracking).
    """

    def __init__(self, evaluator: Evaluator, *, max_length: int = 64, metric: str = "xnli_retrieval",
                 heldout_eval: bool = False, min_gain: float = 0.0, eval_every: Optional[int] = None,
                 eval_batches: int = 2, valid_data: Any = None, write: Callable[[dict], None] = lambda r: None):
        self.evaluator, self.max_length, self.metric = evaluator, max_length, metric
        self.heldout_eval, self.min_gain = heldout_eval, min_gain
        self.eval_every, self.eval_batches, self.valid, self.write = eval_every, eval_batches, valid_data, write
        self._encoder = None
        self._eval_step = None

    def score(self, model) -> dict:
        if self._encoder is None:
            self._encoder = SentenceEncoder(model, self.tokenizer)
        else:
            self._encoder.update_weights(model)
        enc, length = self._encoder, self.max_length
        with truncation_summary(f"held-out eval (max_length={length})"):  # one warning, not one per language
            return self.evaluator(lambda s: enc.encode(s, batch_size=128, max_length=length))

    def on_start(self, trainer) -> None:
        self.tokenizer = trainer.tokenizer
        if self.eval_every:
            self._eval_step = trainer.make_eval_step()
        if not self.heldout_eval:
            return
        before_file = trainer.model_dir / "heldout_before.json"
        if trainer.start_step and before_file.is_file():
            before = json.loads(before_file.read_text())[self.metric]
        else:
            before = self.score(trainer.current_model())[self.metric]
            if trainer.primary:
                before_file.write_text(json.dumps({"step": 0, self.metric: before}) + "\n")
        trainer.summary["heldout_before"] = before
        print(f"held-out {self.metric} (max_length {self.max_length}) before training: {before:.2f}", flush=True)

    def heldout_loss(self, trainer) -> dict:
        """Mean loss metrics over the first `eval_batches` validation batches."""
        self.valid.set_state({"epoch": 0, "index": jax.process_index()})
        totals: dict = {}
        for _ in range(self.eval_batches):
            batch = partitioning.host_local_to_global(next(self.valid), trainer.mesh)
            m = jax.device_get(self._eval_step(trainer.state.params, trainer.frozen, batch))
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.eval_batches
        return {f"eval_{k}": v for k, v in totals.items()}

    def after_step(self, trainer) -> None:
        step = trainer.step
        if self.eval_every and (step % self.eval_every == 0 or step == trainer.cfg.train_steps):
            trainer.eval_metrics = {**self.heldout_loss(trainer), **self.score(trainer.current_model())}
            self.write({"step": step, "eval": trainer.eval_metrics})

    def on_end(self, trainer) -> None:
        if not self.heldout_eval or trainer.summary.get("preempted"):
            return
        after = self.score(trainer.current_model())[self.metric]
        trainer.summary["heldout_after"] = after
        gain = after - trainer.summary["heldout_before"]
        print(f"held-out {self.metric} (max_length {self.max_length}) after training: {after:.2f} "
              f"(gain {gain:+.2f} points)", flush=True)
        if self.min_gain and gain < self.min_gain:
            raise SystemExit(f"held-out metric rose by {gain:.2f} points, less than MIN_HELDOUT_GAIN={self.min_gain}")


# ---------------------------------------------------------------------- checkpoints
class CheckpointHook(Hook):
    """The run directory's files, written together.

    Checkpoints (orbax `RunCheckpoints`) go under MODEL_DIR/checkpoints/<step>/, every
    `every` steps, at the last step and on preemption; each committed step then gets its
    `manifest.json` (sizes and hashes, `mst5_jax.formats.manifest`). A resume starts only
    from a step that matches its manifest: newer steps that do not are moved to
    MODEL_DIR/checkpoints_rejected/ (`quarantine`). A fresh run writes run.json, the
    tokenizer and, for LoRA on a random base, the base weights (MODEL_DIR/base).
    """

    def __init__(self, model_dir: pathlib.Path, every: int, keep: int = 2, best_metric: Optional[str] = None):
        self.model_dir, self.every = model_dir, every
        self.directory = model_dir / "checkpoints"
        manifest.newest_verified_step(self.directory, quarantine=True)
        self.ckpt = run_dir.RunCheckpoints(self.directory, keep=keep, best_metric=best_metric)

    def latest_step(self) -> Optional[int]:
        return self.ckpt.latest_step()

    def restore(self, step: int, params: Any, opt_state_leaves: list) -> tuple[Any, list, dict]:
        """(params pure dict, optimizer state leaves, meta) of committed step `step`."""
        return self.ckpt.restore(step, params, opt_state_leaves)

    def write_run_files(self, trainer, info: dict) -> None:
        """run.json, the tokenizer and (LoRA on a random base) the base model: a fresh run's files."""
        run_dir.write_run_info(self.model_dir, info)
        trainer.tokenizer.save(self.model_dir / "tokenizer")
        if trainer.cfg.mode == "lora" and not trainer.cfg.pretrained:
            base = nnx.merge(trainer.graphdef, jax.tree.map(lambda x: x, trainer.state.params), trainer.frozen)
            huggingface.save_hf(base, self.model_dir / "base", dtype="float32")

    def after_step(self, trainer) -> None:
        if not trainer.ckpt_now:
            return
        step, state = trainer.step, trainer.state
        try:
            self.ckpt.save(step, state.params.to_pure_dict(), jax.tree.leaves(state.opt_state),
                           {"step": step, "data": trainer.data.get_state()}, metrics=trainer.eval_metrics)
        except Exception as e:
            good = manifest.committed_steps(self.directory)
            raise OSError(
                f"saving the step-{step} checkpoint under {self.directory} failed "
                f"({type(e).__name__}: {e}). Is the disk full, or the path not writable? The last complete "
                f"checkpoint, step {max(good) if good else None}, is untouched; fix the cause and rerun to resume.") from e
        trainer.call_hooks("on_save", step)
        manifest.write(self.directory / str(step))

    def close(self) -> None:
        self.ckpt.close()

    def on_end(self, trainer) -> None:
        self.close()


# ---------------------------------------------------------------------- profiling, preemption
class ProfileHook(Hook):
    """A jax.profiler trace of updates a..b (inclusive) under MODEL_DIR/profile."""

    def __init__(self, spec: str, directory: pathlib.Path):
        try:
            self.first, self.last = (int(x) for x in spec.split(":"))
        except ValueError as e:
            raise ValueError(f"--profile_steps={spec!r}: expected a:b, e.g. 10:15") from e
        self.directory = directory

    def before_step(self, trainer, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))

    def after_step(self, trainer) -> None:
        if trainer.step == self.last:
            jax.block_until_ready(trainer.state)
            jax.profiler.stop_trace()


class PreemptionHook(Hook):
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) -> `trainer.stop_requested`.

    The trainer reads the flag once after each update: that step is checkpointed, then the
    loop ends with `summary["preempted"]`, and the CLI exits with
    `mst5_jax.utils.cli.EXIT_PREEMPTED` (75), so a scheduler sees an unfinished run and can
    requeue it. Handlers are restored at the end.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._old: dict = {}

    def on_start(self, trainer) -> None:
        def handle(signum, frame):
            log.warning("%s received: saving a checkpoint and exiting", signal.Signals(signum).name)
            trainer.stop_requested = True

        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, handle)
            except ValueError:  # not the main thread: no signal handling
                pass

    def on_end(self, trainer) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
