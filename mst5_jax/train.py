"""`python -m mst5_jax.train --gin_file=xxl_lora.gin [--gin.MACRO=VALUE ...]`: the training run.

Data flows one way: task -> `tasks.pipeline.TripletIterator` (host-local numpy batches) ->
global arrays on the mesh -> the jitted step (`mst5_jax.training.train_step`) -> metrics.jsonl and
orbax checkpoints (`mst5_jax.training.run_checkpoints`).

Gin files are looked up by bare name anywhere under the repository's `gin/` tree (shipped
as `mst5_jax.gin_configs`); `include` lines resolve against that root. Every run config
defines the macros MODEL_DIR, TRAIN_STEPS, SCHEDULE_STEPS, BATCH_SIZE,
MIXTURE_OR_TASK_NAME, MAX_LENGTH, DATA_DIR, SEED, LOG_EVERY and CHECKPOINT_EVERY.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mst5_jax.core import partitioning
from mst5_jax.core.config import EncoderConfig
from mst5_jax.training.flops import model_flops_per_triplet
from mst5_jax.core.partitioning import MeshConfig
from mst5_jax.training.train_step import LossConfig
from mst5_jax.utils import paths

log = logging.getLogger("mst5_jax.train")


# ---------------------------------------------------------------------- configuration
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


@dataclasses.dataclass
class TrainConfig:
    """Everything one run needs. Gin binds these fields; `run(cfg)` executes them."""

    model_dir: str = ""
    model: str = "tiny"
    pretrained: Optional[str] = None
    model_overrides: dict = dataclasses.field(default_factory=dict)
    vocab: Optional[str] = None
    mixture_or_task_name: str = "mst5_xnli_cross"
    data_dir: Optional[str] = None
    max_length: int = 64
    batch_size: int = 32
    train_steps: int = 100
    schedule_steps: Optional[int] = None
    seed: int = 0
    lora: Any = None  # mst5_jax.core.lora.LoRAConfig, or None for full fine-tuning
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    partition_preset: str = "data_parallel"
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    dropout_rate: float = 0.0
    microbatch_size: Optional[int] = None
    gradcache_cache_layer_inputs: bool = False
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: Optional[int] = None
    eval_langs: Optional[Sequence[str]] = None
    eval_max_premises: Optional[int] = None
    eval_max_length: int = 64
    eval_batches: int = 2
    best_metric: Optional[str] = "xnli_avg_xx2en"
    heldout_eval: bool = False
    min_heldout_gain: float = 0.0
    peak_tflops: Optional[float] = None
    tensorboard: bool = False
    profile_steps: Optional[str] = None
    compilation_cache_dir: Optional[str] = None
    num_devices: Optional[int] = None  # for config checks (gin hardware files); not enforced at run time
    device_memory_gib: Optional[float] = None


def register_gin() -> None:
    """Registers the configurables and gin macros' helpers (idempotent)."""
    import gin

    if getattr(register_gin, "_done", False):
        return
    for cls in (TrainConfig, OptimizerConfig, LossConfig, MeshConfig):
        gin.external_configurable(cls, module="mst5_jax")
    import mst5_jax.core.lora  # noqa: F401  (registers LoRAConfig)
    import tasks  # noqa: F401  (registers tasks.configure)

    register_gin._done = True


# ---------------------------------------------------------------------- gin file lookup
def gin_root() -> pathlib.Path:
    """The `gin/` tree: the repository's, or the installed `mst5_jax.gin_configs` package."""
    repo = pathlib.Path(__file__).resolve().parent.parent / "gin"
    if repo.is_dir():
        return repo
    import importlib.resources

    return pathlib.Path(str(importlib.resources.files("mst5_jax.gin_configs")))


def find_gin_file(name: str, root: Optional[pathlib.Path] = None) -> pathlib.Path:
    """A path as given, or a bare name found anywhere under `gin/` (exactly once)."""
    p = pathlib.Path(name)
    if p.is_file():
        return p
    root = root or gin_root()
    if (root / name).is_file():
        return root / name
    matches = sorted(root.rglob(p.name))
    if not matches:
        raise FileNotFoundError(f"gin file {name!r}: not a path, and not found under {root}")
    if len(matches) > 1:
        raise ValueError(f"gin file {name!r} is ambiguous under {root}: " + ", ".join(map(str, matches)))
    return matches[0]


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> TrainConfig:
    """Parses files (in order) then `MACRO=VALUE` / `Configurable.param=VALUE` bindings."""
    import gin

    register_gin()
    gin.clear_config()
    root = gin_root()
    gin.add_config_file_search_path(str(root))
    files = [str(find_gin_file(f, root).absolute()) for f in gin_files]
    # gin tries an `include` path relative to the working directory before its search
    # paths, so a user folder named runs/ or models/ would shadow ours: parse from the root.
    cwd = os.getcwd()
    os.chdir(root)
    try:
        gin.parse_config_files_and_bindings(files, [], finalize_config=False)
        for b in bindings:  # `--gin.BATCHSIZE=16` would define a new macro that nothing reads
            name = b.split("=", 1)[0].strip()
            if name.isidentifier() and name.isupper():
                try:
                    gin.query_parameter(f"%{name}")
                except ValueError:
                    raise ValueError(f"--gin.{b.strip()}: {name} is not a macro of {', '.join(gin_files)} "
                                     "(misspelt? macros are defined in the gin files)") from None
        gin.parse_config_files_and_bindings([], list(bindings), finalize_config=False)
    finally:
        os.chdir(cwd)
    return gin.get_configurable(TrainConfig)()


# ---------------------------------------------------------------------- optimizer
def make_schedule(o: OptimizerConfig, schedule_steps: int) -> optax.Schedule:
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
    """Weight decay on matrices only: not on norm scales, biases tables or LoRA scales."""
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(o: OptimizerConfig, schedule_steps: int) -> optax.GradientTransformation:
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


# ---------------------------------------------------------------------- metrics sink
class MetricsWriter:
    """Appends one JSON object per line to MODEL_DIR/metrics.jsonl (flushed each write)."""

    def __init__(self, path: pathlib.Path, tensorboard: bool = False):
        self.path = path
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(path.parent / "tb"))
            except ImportError:
                log.warning("TensorBoard logging needs tensorboardX; writing metrics.jsonl only")

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the run
class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (save, then exit 0)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _resolve_data_dir(data_dir: Optional[str]) -> pathlib.Path:
    return paths.resolve_data_dir(data_dir)


def _encoder_config(cfg: TrainConfig, vocab_size: int) -> EncoderConfig:
    from mst5_jax.formats import huggingface

    numerics = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, dropout_rate=cfg.dropout_rate)
    if cfg.pretrained:
        d = huggingface.resolve_model_dir(cfg.pretrained)
        return EncoderConfig.from_hf_json(d / "config.json", **numerics, **cfg.model_overrides)
    return EncoderConfig.preset(cfg.model, **numerics, **{"vocab_size": vocab_size, **cfg.model_overrides})


def _parse_profile(spec: Optional[str]) -> Optional[tuple[int, int]]:
    if not spec:
        return None
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError as e:
        raise ValueError(f"--profile_steps={spec!r}: expected a:b, e.g. 10:15") from e
    return a, b


class HeldoutEval:
    """xnli_retrieval (mean xx->en top-1 over the 830 XNLI dev premises) with the current weights."""

    def __init__(self, cfg: TrainConfig, tokenizer, data_dir: pathlib.Path):
        self.cfg, self.tokenizer, self.data_dir = cfg, tokenizer, data_dir
        self._encoder = None

    def __call__(self, model) -> dict:
        from mst5_jax.inference.encoder import SentenceEncoder
        from mst5_jax.evals import xnli_retrieval

        if self._encoder is None:
            self._encoder = SentenceEncoder(model, self.tokenizer)
        else:
            self._encoder.update_weights(model)
        enc = self._encoder
        length = self.cfg.eval_max_length
        result = xnli_retrieval(lambda s: enc.encode(s, batch_size=128, max_length=length),
                                self.data_dir, langs=self.cfg.eval_langs, max_premises=self.cfg.eval_max_premises,
                                max_length=length)
        return {"xnli_avg_xx2en": result["avg_xx2en"], "xnli_avg_all": result["avg_all"]}


def _flat_leaves(tree: Any) -> list:
    return jax.tree.leaves(tree)


def run(cfg: TrainConfig) -> dict:
    """Trains as configured; resumes from MODEL_DIR when it holds a checkpoint.

    Returns a summary dict (final step, last metrics, held-out before/after when enabled).
    """
    from mst5_jax.formats import huggingface
    from mst5_jax.training import faults
    from mst5_jax.core import lora
    from mst5_jax.training import manifest
    from mst5_jax.training import run_checkpoints
    from mst5_jax.training import train_step
    from mst5_jax.core.model import init_model
    from mst5_jax.formats.tokenizer import Tokenizer
    from tasks.pipeline import TripletIterator

    if not cfg.model_dir:
        raise ValueError("MODEL_DIR is not set (TrainConfig.model_dir)")
    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
    faults.install()  # no-op unless a test sets MST5_FAULT
    primary = jax.process_index() == 0  # shared files (run.json, metrics, summary) are written once
    model_dir = pathlib.Path(cfg.model_dir).absolute()
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir = _resolve_data_dir(cfg.data_dir)
    schedule_steps = cfg.schedule_steps or cfg.train_steps
    mode = "full" if cfg.lora is None else "lora"

    # Mesh and batch layout.
    mesh = partitioning.make_mesh(cfg.mesh)
    rules = partitioning.logical_axis_rules(cfg.partition_preset)
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % data_shards:
        raise ValueError(f"BATCH_SIZE={cfg.batch_size} is not divisible by the data axes "
                         f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} = {data_shards})")
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"BATCH_SIZE={cfg.batch_size} is not divisible by {jax.process_count()} processes")
    host_batch = cfg.batch_size // jax.process_count()

    # Tokenizer and data.
    if cfg.vocab:
        vocab = cfg.vocab
    elif cfg.pretrained:
        vocab = str(huggingface.resolve_model_dir(cfg.pretrained))
    else:
        from mst5_jax.formats.vocab import default_vocab_path

        vocab = default_vocab_path(data_dir)
    data = TripletIterator(cfg.mixture_or_task_name, data_dir, vocab, cfg.max_length, host_batch, cfg.seed,
                           shard_index=jax.process_index(), num_shards=jax.process_count())
    tokenizer = data.tokenizer

    # Model: pretrained or random init, then LoRA.
    enc_cfg = _encoder_config(cfg, tokenizer.vocab_size)
    if cfg.pretrained:
        base_dir = huggingface.resolve_model_dir(cfg.pretrained)
        model = huggingface.load_hf_weights(base_dir, enc_cfg)
        base_info = {"path": str(base_dir), "fingerprint": run_checkpoints.fingerprint(base_dir)}
    else:
        model = init_model(enc_cfg, seed=cfg.seed)
        base_info = {"path": "base", "random_init": True}
    if mode == "lora":
        lora.apply_lora(model, cfg.lora, cfg.seed)
        print(lora.dry_run(model, cfg.lora), flush=True)
    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, lora.trainable_filter(mode))))

    optimizer = make_optimizer(cfg.optimizer, schedule_steps)
    frozen_dtype = cfg.param_dtype if mode == "lora" else None
    graphdef, state, frozen, shardings = train_step.init_train_state(
        model, optimizer, mesh, rules, mode=mode, seed=cfg.seed, frozen_dtype=frozen_dtype)
    del model
    step_fn = train_step.make_train_step(graphdef, optimizer, cfg.loss, mesh, shardings,
                                         microbatch_size=cfg.microbatch_size,
                                         cache_layer_inputs=cfg.gradcache_cache_layer_inputs)

    # Resume only from a step whose files match its manifest; newer steps that do not are
    # moved to MODEL_DIR/checkpoints_rejected/ (the warning names the bad files).
    manifest.newest_verified_step(model_dir / "checkpoints", quarantine=True)
    ckpt = run_checkpoints.RunCheckpoints(model_dir / "checkpoints", keep=cfg.keep_checkpoints,
                                            best_metric=cfg.best_metric if cfg.eval_every else None)
    metrics_path = model_dir / "metrics.jsonl"
    start = ckpt.latest_step() or 0
    if start:
        params, opt_state, meta = ckpt.restore(start, state.params.to_pure_dict(), _flat_leaves(state.opt_state))
        nnx.replace_by_pure_dict(state.params, params)
        opt_tree = jax.tree.unflatten(jax.tree.structure(state.opt_state), opt_state)
        state = state.replace(step=jnp.asarray(meta["step"], jnp.int32), opt_state=opt_tree,
                              params=jax.device_put(state.params, shardings.state.params))
        data.set_state(_host_data_state(meta["data"], len(data)))
        if primary:
            truncate_metrics(metrics_path, start)
        log.info("resumed %s at step %d", model_dir, start)
    elif primary:
        run_checkpoints.write_run_info(model_dir, {
            "encoder_config": dataclasses.asdict(enc_cfg), "mode": mode,
            "lora": None if cfg.lora is None else dataclasses.asdict(cfg.lora),
            "base": base_info, "task": cfg.mixture_or_task_name, "vocab": vocab,
            "best_metric": cfg.best_metric if cfg.eval_every else None, "best_mode": "max"})
        tokenizer.save(model_dir / "tokenizer")
        if mode == "lora" and not cfg.pretrained:
            base_model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state.params), frozen)
            huggingface.save_hf(base_model, model_dir / "base", dtype="float32")

    def current_model():
        params = jax.tree.map(lambda x: x.astype(enc_cfg.param_dtype) if mode == "full" else x, state.params)
        return nnx.merge(graphdef, params, frozen)

    eval_step = None
    if cfg.eval_every:
        eval_step = train_step.make_eval_step(graphdef, cfg.loss, mesh, shardings)
        valid = TripletIterator(cfg.mixture_or_task_name, data_dir, vocab, cfg.max_length, host_batch, cfg.seed,
                                shard_index=jax.process_index(), num_shards=jax.process_count(), split="validation")

    def heldout_loss() -> dict[str, float]:
        """Mean contrastive metrics over the first `eval_batches` validation batches."""
        valid.set_state({"epoch": 0, "index": jax.process_index()})
        totals: dict[str, float] = {}
        for _ in range(cfg.eval_batches):
            m = jax.device_get(eval_step(state.params, frozen, partitioning.host_local_to_global(next(valid), mesh)))
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.eval_batches
        return {f"eval_{k}": v for k, v in totals.items()}

    summary: dict[str, Any] = {"model_dir": str(model_dir), "start_step": start}
    heldout = HeldoutEval(cfg, tokenizer, data_dir) if (cfg.heldout_eval or cfg.eval_every) else None
    if cfg.heldout_eval and heldout is not None:
        # Measured once at step 0 and kept, so a resumed or re-run job compares against it.
        before_file = model_dir / "heldout_before.json"
        if start and before_file.is_file():
            before = json.loads(before_file.read_text())["xnli_avg_xx2en"]
        else:
            before = heldout(current_model())["xnli_avg_xx2en"]
            if primary:
                before_file.write_text(json.dumps({"step": 0, "xnli_avg_xx2en": before}) + "\n")
        summary["heldout_before"] = before
        print(f"held-out xnli_retrieval avg xx->en before training: {before:.2f}", flush=True)

    writer = MetricsWriter(metrics_path, tensorboard=cfg.tensorboard) if primary else _NullWriter()
    flops = model_flops_per_triplet(enc_cfg, cfg.max_length, n_lora, mode == "full")
    profile = _parse_profile(cfg.profile_steps)
    bar = _progress_bar(cfg.train_steps, start)
    last: dict[str, float] = {}
    t_last, step_last = time.perf_counter(), start
    finite = jnp.ones((), jnp.float32)
    with _Preemption() as preempt:
        step = start
        while step < cfg.train_steps:
            if profile and step + 1 == profile[0]:
                jax.profiler.start_trace(str(model_dir / "profile"))
            batch = partitioning.host_local_to_global(next(data), mesh)
            if os.environ.get("MST5_POISON_AT_STEP") == str(step + 1):  # test hook: non-finite weights
                state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
            state, metrics = step_fn(state, frozen, batch)
            step += 1
            finite = finite * metrics["is_finite"]
            if profile and step == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            stop = preempt.requested  # read once: a signal arriving later is handled next step
            log_now = step % cfg.log_every == 0 or step == cfg.train_steps
            ckpt_now = step % cfg.checkpoint_every == 0 or step == cfg.train_steps or stop
            if log_now or ckpt_now:
                if float(finite) < 1.0:
                    ckpt.close()
                    raise FloatingPointError(
                        f"non-finite loss or gradient at or before step {step} (since step {step_last}); "
                        f"the latest checkpoint ({ckpt.latest_step()}) is the last good one")
            if log_now:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt = (now - t_last) / max(step - step_last, 1)
                t_last, step_last = now, step
                rec = {"step": step, **{k: m[k] for k in ("loss", "accuracy", "pos_sim", "neg_sim", "grad_norm")
                                        if k in m},
                       "learning_rate": float(make_schedule(cfg.optimizer, schedule_steps)(step - 1)),
                       "step_time_s": dt, "triplets_per_sec": cfg.batch_size / dt,
                       "tokens_per_sec": cfg.batch_size * 3 * cfg.max_length / dt,
                       "num_devices": int(mesh.size),
                       "mfu": (flops * cfg.batch_size / dt / (cfg.peak_tflops * 1e12 * mesh.size)
                               if cfg.peak_tflops else None)}
                writer.write(rec)
                last = rec
                if bar is not None:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", tps=f"{rec['triplets_per_sec']:.1f}")
                else:
                    log.info("step %d loss %.4f acc %.3f %.1f triplets/s", step, m["loss"], m.get("accuracy", 0.0),
                             rec["triplets_per_sec"])
            eval_metrics = None
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.train_steps):
                eval_metrics = {**heldout_loss(), **heldout(current_model())}
                writer.write({"step": step, "eval": eval_metrics})
            if ckpt_now:
                try:
                    ckpt.save(step, state.params.to_pure_dict(), _flat_leaves(state.opt_state),
                              {"step": step, "data": data.get_state()}, metrics=eval_metrics)
                except Exception as e:
                    good = manifest.committed_steps(ckpt.directory)
                    raise OSError(
                        f"saving the step-{step} checkpoint under {ckpt.directory} failed "
                        f"({type(e).__name__}: {e}). Is the disk full? The last complete checkpoint, "
                        f"step {max(good) if good else None}, is untouched; free space and rerun to resume.") from e
                manifest.write(ckpt.directory / str(step))
            faults.maybe_fault("after_step", step)
            faults.maybe_fault("sigterm_after_step", step)
            if stop:
                log.warning("saved step %d after SIGTERM; exiting", step)
                summary["preempted"] = True
                break
    if bar is not None:
        bar.close()
    ckpt.close()
    summary.update(final_step=step, last=last)
    if cfg.heldout_eval and heldout is not None and not summary.get("preempted"):
        after = heldout(current_model())["xnli_avg_xx2en"]
        summary["heldout_after"] = after
        gain = after - summary["heldout_before"]
        print(f"held-out xnli_retrieval avg xx->en after training: {after:.2f} (gain {gain:+.2f} points)", flush=True)
        if cfg.min_heldout_gain and gain < cfg.min_heldout_gain:
            raise SystemExit(f"held-out metric rose by {gain:.2f} points, less than MIN_HELDOUT_GAIN="
                             f"{cfg.min_heldout_gain}")
    if primary:
        (model_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


class _NullWriter:
    """MetricsWriter stand-in on processes other than 0."""

    def write(self, record: dict) -> None:
        pass


def _host_data_state(saved: dict, epoch_size: int) -> dict:
    """This host's data position from a checkpoint's. The saved state is host 0's, i.e. the
    global position of the next global batch; host i of N starts i examples later, so a
    checkpoint restores on any process count."""
    position = int(saved["epoch"]) * epoch_size + int(saved["index"]) + jax.process_index()
    return {"epoch": position // epoch_size, "index": position % epoch_size}


def _progress_bar(total: int, start: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", desc="train")


# ---------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`--gin_file=F` (repeatable), `--gin.X=VALUE` (repeatable), `--profile_steps=a:b`."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    gin_files, bindings, rest = [], [], []
    for a in argv:
        if a.startswith("--gin_file="):
            gin_files.append(a.split("=", 1)[1])
        elif a.startswith("--gin."):
            bindings.append(a[len("--gin."):])
        else:
            rest.append(a)
    parser = argparse.ArgumentParser(prog="python -m mst5_jax.train")
    parser.add_argument("--profile_steps", default=None, help="a:b, write a jax.profiler trace of steps a..b")
    parser.add_argument("--compilation_cache_dir", default=None)
    parser.add_argument("--dry_run", action="store_true", help="parse the config and build it on an AbstractMesh")
    args = parser.parse_args(rest)
    if not gin_files:
        parser.error("at least one --gin_file is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Training reads data through the TF-free numpy path; skip seqio's TensorFlow import.
    os.environ.setdefault("MST5_NO_SEQIO", "1")
    cfg = parse_gin(gin_files, bindings)
    import tasks

    tasks.configure()  # applies gin bindings of tasks.configure (e.g. train_source='xnli_mt')
    if args.profile_steps:
        cfg.profile_steps = args.profile_steps
    if args.compilation_cache_dir:
        cfg.compilation_cache_dir = args.compilation_cache_dir
    import gin

    operative = gin.config_str()
    print(operative, flush=True)
    if args.dry_run:
        from mst5_jax.training import config_check

        print(json.dumps(config_check.check(cfg), indent=2))
        return 0
    pathlib.Path(cfg.model_dir).mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (pathlib.Path(cfg.model_dir) / "operative_config.gin").write_text(operative)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
