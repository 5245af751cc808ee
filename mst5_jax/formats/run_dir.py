"""The run directory format: run.json, the orbax steps under MODEL_DIR/checkpoints, and loading a run.

A run directory looks like:

    MODEL_DIR/
      run.json            encoder config, mode (lora | full), LoRA config, base reference
      base/               a random-init base, saved once (HF format); absent for real bases
      tokenizer/          the run's tokenizer files
      operative_config.gin
      metrics.jsonl
      checkpoints/<step>/ orbax items: params (trainable only), opt_state, meta (JSON)

With LoRA only the LoRA factors are checkpointed; the frozen base is referenced by path
plus a fingerprint (config, shard index and the sha256 of every weight file's bytes, cached
by file identity), which is checked on resume and on load. Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-write never leaves a step that looks finished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mst5_jax.utils import files, fs, paths
from mst5_jax.utils.files import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


# ---------------------------------------------------------------------- base fingerprint
FINGERPRINT_VERSION = "content-sha256/1"
"""Prefix of `fingerprint` values. run.json files written before the content hash hold a
bare hex digest (`header_fingerprint`); they are still checked, by that weaker rule."""

FINGERPRINT_CACHE = "weight_hashes.json"


def _is_weight_file(f: pathlib.Path) -> bool:
    return f.suffix in (".safetensors", ".bin")


def _fingerprinted(d: pathlib.Path) -> list[pathlib.Path]:
    return [f for f in sorted(d.iterdir()) if f.is_file() and (
        _is_weight_file(f) or f.name.endswith(".index.json") or f.name == "config.json")]


def content_sha256(path: pathlib.Path, cache_dir: Optional[str | os.PathLike] = None) -> str:
    """sha256 of a weight file's bytes, cached by file identity.

    The cache (``<cache_dir>/weight_hashes.json``, default `mst5_jax.utils.paths.CACHE_DIR`)
    maps an absolute path to {size, mtime_ns, inode, sha256}; a file whose size, mtime or
    inode changed is hashed again. Hashing streams the file (about 1 s per GB on one core);
    a resume of a run on an unchanged base then costs a stat per file.
    """
    cache_file = pathlib.Path(cache_dir if cache_dir is not None else paths.CACHE_DIR) / FINGERPRINT_CACHE
    st = path.stat()
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    key = str(path.absolute())
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key) if isinstance(cache, dict) else None
    if isinstance(hit, dict) and all(hit.get(k) == v for k, v in ident.items()) and "sha256" in hit:
        return hit["sha256"]
    digest = sha256_file(path)
    if path.stat().st_mtime_ns != st.st_mtime_ns:  # written while we read: do not cache
        return digest
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = {**ident, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, cache)
    except OSError as e:  # a read-only cache only costs speed
        log.debug("weight hash cache %s not written: %s", cache_file, e)
    return digest


def fingerprint(model_dir: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None) -> str:
    """The identity of an HF weights directory: `FINGERPRINT_VERSION` + ":" + the sha256 of
    config.json, the shard index and the full bytes of every weight file (by name).

    Weight-file hashes are cached by file identity (`content_sha256`), so only the first
    call on a base reads its weights.
    """
    d = pathlib.Path(model_dir)
    h = hashlib.sha256()
    for f in _fingerprinted(d):
        h.update(f.name.encode() + b"\0")
        h.update((content_sha256(f, cache_dir) if _is_weight_file(f) else hashlib.sha256(f.read_bytes()).hexdigest())
                 .encode())
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


def header_fingerprint(model_dir: str | os.PathLike) -> str:
    """The pre-content fingerprint (config, index/header bytes, file sizes): it misses a
    same-shape weight swap. Kept only to check run.json files that recorded it."""
    d = pathlib.Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.suffix in (".safetensors", ".bin") or f.name.endswith((".index.json",)) or f.name == "config.json":
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix in (".json",):
                h.update(f.read_bytes())
            elif f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    h.update(fh.read(min(n, 1 << 24)))
    return h.hexdigest()


class BaseChangedError(ValueError):
    """A LoRA run's frozen base weights are not the ones the run was trained on."""


def check_base(base_dir: str | os.PathLike, recorded: Optional[str], run_file: str | os.PathLike) -> None:
    """Refuses a base directory whose fingerprint differs from the one `run_file` recorded.

    Raises:
      BaseChangedError naming the base directory and the run file.
    """
    if not recorded:
        return
    legacy = not recorded.startswith(FINGERPRINT_VERSION + ":")
    now = header_fingerprint(base_dir) if legacy else fingerprint(base_dir)
    if legacy:
        log.warning("%s records a header-only base fingerprint: a same-shape weight change in %s is not "
                    "detectable for this run", run_file, base_dir)
    if now != recorded:
        raise BaseChangedError(
            f"{base_dir}: the base weights changed since the run started (their fingerprint differs from the "
            f"one in {run_file}). A LoRA run needs the exact base it was trained on: restore those weights, "
            "or train the new base into a new MODEL_DIR.")


# ---------------------------------------------------------------------- run metadata
def write_run_info(model_dir: str | os.PathLike, info: dict) -> None:
    files.write_json_atomic(fs.as_path(model_dir) / RUN_FILE, info, default=str)


def read_run_info(model_dir: str | os.PathLike) -> dict:
    path = fs.as_path(model_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a training run directory (run.json is missing)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------- the manager
class RunCheckpoints:
    """Saves and restores (params, opt_state, meta) for one run; keeps the last N and the best.

    Args:
      directory: MODEL_DIR/checkpoints.
      keep: how many of the latest steps to keep.
      best_metric: a key of the metrics passed to `save`; the best step is kept too.
      best_mode: "max" or "min".
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2, best_metric: Optional[str] = None,
                 best_mode: str = "max", async_save: bool = False):
        from orbax.checkpoint import checkpoint_managers as cm

        self.directory = fs.absolute(directory)
        self.best_metric = best_metric
        policies = [cm.LatestN(n=keep)]
        if best_metric:
            policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=(best_mode == "max"), n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step() if self.best_metric else None

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict, metrics: Optional[dict] = None) -> None:
        """Writes one step; blocks until it is committed (renamed into place)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            metrics = None
        self.manager.save(step, args=args, metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, params_target: Any, opt_state_target: Any = None) -> tuple[Any, Any, dict]:
        """Restores (params, opt_state or None, meta) into the structure/sharding of the targets."""
        items = dict(params=ocp.args.StandardRestore(_abstract(params_target)), meta=ocp.args.JsonRestore())
        if opt_state_target is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_target))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out.get("opt_state") if opt_state_target is not None else None, out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(tree: Any) -> Any:
    def f(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, np.ndarray):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x
    return jax.tree.map(f, tree)


# ---------------------------------------------------------------------- loading a run's model
def load_run_model(model_dir: str | os.PathLike, step: str | int = "latest", dtype: str = "float32",
                   param_dtype: Optional[str] = None):
    """(SentenceModel, Tokenizer) of a committed checkpoint of a run ("latest", "best" or a step)."""
    from mst5_jax.formats import huggingface
    from mst5_jax.core.config import EncoderConfig
    from mst5_jax.core.model import abstract_model
    from mst5_jax.formats.tokenizer import Tokenizer

    model_dir = fs.absolute(model_dir)
    info = read_run_info(model_dir)
    cfg_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    cfg = EncoderConfig(**{k: v for k, v in info["encoder_config"].items() if k in cfg_fields})
    cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype or dtype, dropout_rate=0.0, remat="none")
    mngr = RunCheckpoints(model_dir / "checkpoints", keep=1 << 30, best_metric=info.get("best_metric"),
                          best_mode=info.get("best_mode", "max"))
    try:
        if step == "latest":
            chosen = mngr.latest_step()
        elif step == "best":
            chosen = mngr.best_step()
            if chosen is None:
                raise FileNotFoundError(f"{model_dir}: no best checkpoint (the run has no best metric)")
        else:
            chosen = int(step)
            if chosen not in mngr.all_steps():
                raise FileNotFoundError(f"{model_dir}: no checkpoint at step {chosen}; have {mngr.all_steps()}")
        from mst5_jax.formats import manifest

        if step == "latest" and chosen is not None:
            chosen = manifest.newest_verified_step(mngr.directory, mngr.all_steps(), require_manifest=False)
        elif chosen is not None:
            manifest.require_verified(mngr.directory / str(chosen), require_manifest=False)
        if chosen is None:
            raise FileNotFoundError(f"{model_dir}/checkpoints: no committed checkpoint"
                                    " (or none that matches its manifest; see the warnings)")
        if info["mode"] == "lora":
            base = info["base"]
            base_dir = model_dir / base["path"] if base.get("random_init") else base["path"]
            base_dir = huggingface.resolve_model_dir(base_dir)
            check_base(base_dir, base.get("fingerprint"), model_dir / RUN_FILE)
            model = huggingface.load_hf_weights(base_dir, cfg)
            from mst5_jax.core import lora

            lora.apply_lora(model, lora.LoRAConfig(**info["lora"]), 0)
            trainable_filter = lora.trainable_filter("lora")
        else:
            model = abstract_model(cfg)
            trainable_filter = nnx.Param
        graphdef, trainable, rest = nnx.split(model, trainable_filter, ...)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32) if hasattr(x, "shape") else x,
                              trainable.to_pure_dict())
        params, _, _ = mngr.restore(chosen, target)
        nnx.replace_by_pure_dict(trainable, params)
        trainable = jax.tree.map(lambda x: x.astype(cfg.param_dtype) if info["mode"] == "full" else x, trainable)
        model = nnx.merge(graphdef, trainable, rest)
    finally:
        mngr.close()
    tok = Tokenizer.from_pretrained(model_dir / "tokenizer")
    log.info("loaded %s step %d", model_dir, chosen)
    return model, tok
