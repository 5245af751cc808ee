"""The run directory is owned (issue 16, CONTRACT §4): one trainer at a time, a resume that
may not change the run's shapes (or, without opt-in, its recipe), a base fingerprint that
covers the weight bytes, and operative configs kept per attempt.

Runs use the tiny config of tests/test_train.py (d_model 32, 2 layers, batch 8, length 16,
2-4 steps): in-process where only behaviour matters, through the CLI where the exit code,
the one-line message or the operative config is the point.
"""
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest

from fixtures_models import tiny_hf_model_dir  # noqa: F401
from test_train import _cfg, _cli, _losses

from mst5_jax.formats import run_dir
from mst5_jax.training import trainer
from mst5_jax.training.run_lock import LOCK_FILE, RunLock
from mst5_jax.utils import paths
from mst5_jax.utils.cli import EXIT_USER_ERROR, UserError


def _digest(d):
    """{relative path: sha256} of every file under d, hidden files included."""
    d = pathlib.Path(d)
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _steps_logged(model_dir):
    return [json.loads(l)["step"] for l in (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------- the lock
def test_lock_refuses_live_holders_and_takes_over_dead_ones(tmp_path, caplog):
    lock = RunLock.acquire(tmp_path, command="first")
    held = json.loads((tmp_path / LOCK_FILE).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["command"] == "first"
    with pytest.raises(UserError, match=rf"in use by another trainer \(host {socket.gethostname()}, "
                                        rf"pid {os.getpid()}, since {held['since']}"):
        RunLock.acquire(tmp_path)  # a second Trainer in this same process
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": sleeper.pid, "since": "2026-12-05T10:00:00Z", "command": "x"}))
        with pytest.raises(UserError, match=rf"pid {sleeper.pid}, since 2026-12-05T10:00:00Z"):
            RunLock.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "other-host", "pid": 1, "since": "t"}))
    with pytest.raises(UserError, match="host other-host, pid 1.*delete"):
        RunLock.acquire(tmp_path)  # another host's process cannot be checked from here

    dead = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "since": "t"}))
    with caplog.at_level(logging.WARNING):
        lock = RunLock.acquire(tmp_path)
    assert f"taking over a stale lock (pid {dead} is not running)" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary or stale files left


def test_second_trainer_refuses_and_leaves_the_first_untouched(tmp_path):
    first = trainer.Trainer(_cfg(tmp_path, "--gin.TRAIN_STEPS=2"))  # holds MODEL_DIR/.lock
    before = _digest(tmp_path)
    assert LOCK_FILE in before
    out = _cli(tmp_path, "--gin.TRAIN_STEPS=2", timeout=300)
    assert out.returncode == EXIT_USER_ERROR, out.stderr[-3000:]
    assert f"in use by another trainer (host {socket.gethostname()}, pid {os.getpid()}, since" in out.stderr
    assert "Traceback" not in out.stderr
    assert _digest(tmp_path) == before
    first.run()
    assert _steps_logged(tmp_path) == [1, 2]
    assert not (tmp_path / LOCK_FILE).exists()


# ------------------------------------------------------------------------- resume checks
def test_resume_refuses_changes_then_accepts_allowed_recipe_changes(tmp_path):
    first = _cli(tmp_path, "--gin.TRAIN_STEPS=2", timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(tmp_path)
    wider = ("--gin.TrainConfig.model_overrides="
             "{'d_model': 48, 'd_ff': 64, 'num_heads': 2, 'd_kv': 16, 'num_layers': 2}")
    out = _cli(tmp_path, "--gin.TRAIN_STEPS=4", wider, "--gin.OptimizerConfig.learning_rate=0.01",
               "--gin.BATCH_SIZE=16", timeout=300)
    assert out.returncode == EXIT_USER_ERROR, out.stderr[-3000:]
    errors = [l for l in out.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for change in ("encoder_config.d_model: 32 -> 48", "optimizer.learning_rate: 0.001 -> 0.01",
                   "batch_size: 8 -> 16", "new MODEL_DIR"):
        assert change in errors[0], errors[0]
    assert _digest(tmp_path) == before  # run.json, operative config, metrics, checkpoints

    out = _cli(tmp_path, "--gin.TRAIN_STEPS=4", "--gin.OptimizerConfig.learning_rate=0.01", "--gin.LOG_EVERY=2",
               "--gin.ALLOW_RECIPE_CHANGES=['optimizer.learning_rate']", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    history = [json.loads(l) for l in (tmp_path / "run_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["field"], h["old"], h["new"]) for h in history] == [
        (2, "optimizer.learning_rate", 0.001, 0.01)]
    assert json.loads((tmp_path / "run.json").read_text())["optimizer"]["learning_rate"] == 0.01
    first_config = (tmp_path / "operative_config.gin").read_bytes()
    assert hashlib.sha256(first_config).hexdigest() == before["operative_config.gin"]  # kept, not rewritten
    assert "OptimizerConfig.learning_rate = 0.01" in (tmp_path / "operative_config.2.gin").read_text()
    assert _steps_logged(tmp_path) == [1, 2, 4]


def test_lora_setup_changes_refuse_in_one_message(tmp_path):
    lora = ["--gin.TrainConfig.lora=@LoRAConfig()", "--gin.LoRAConfig.rank=4", "--gin.LoRAConfig.alpha=8",
            "--gin.LoRAConfig.targets=['q', 'v']"]
    trainer.run(_cfg(tmp_path, "--gin.TRAIN_STEPS=2", *lora))
    before = _digest(tmp_path)
    with pytest.raises(UserError) as e:
        trainer.Trainer(_cfg(tmp_path, "--gin.TRAIN_STEPS=4", *lora[:1], "--gin.LoRAConfig.rank=8",
                             "--gin.LoRAConfig.alpha=8", "--gin.LoRAConfig.targets=['q', 'v', 'wo']"))
    msg = str(e.value)
    assert "lora.rank: 4 -> 8" in msg and 'lora.targets: ["q", "v"] -> ["q", "v", "wo"]' in msg, msg
    with pytest.raises(UserError) as e:
        trainer.Trainer(_cfg(tmp_path, "--gin.TRAIN_STEPS=4"))  # full fine-tune instead of LoRA
    assert 'mode: "lora" -> "full"' in str(e.value) and '"rank": 4' in str(e.value) and "} -> null" in str(e.value)
    with pytest.raises(UserError, match=r"base.seed: 0 -> 1"):  # the random frozen base comes from the seed
        trainer.Trainer(_cfg(tmp_path, "--gin.TRAIN_STEPS=4", *lora, "--gin.SEED=1",
                             "--gin.ALLOW_RECIPE_CHANGES=['seed']"))
    with pytest.raises(UserError, match="TRAIN_STEPS=1 is below step 2"):
        trainer.Trainer(_cfg(tmp_path, "--gin.TRAIN_STEPS=1", *lora))
    with pytest.raises(UserError, match="'learning_rate' is not a recipe field.*optimizer.learning_rate"):
        trainer.Trainer(_cfg(tmp_path, "--gin.TRAIN_STEPS=4", *lora, "--gin.ALLOW_RECIPE_CHANGES=['learning_rate']"))
    assert _digest(tmp_path) == before
    trainer.run(_cfg(tmp_path, "--gin.TRAIN_STEPS=3", *lora))  # raising TRAIN_STEPS is always allowed
    assert _steps_logged(tmp_path) == [1, 2, 3] and not (tmp_path / "run_history.jsonl").exists()


def test_old_run_json_without_the_recipe_resumes_with_a_warning(tmp_path, caplog):
    trainer.run(_cfg(tmp_path, "--gin.TRAIN_STEPS=2"))
    info = json.loads((tmp_path / "run.json").read_text())
    for k in ("optimizer", "loss", "batch_size", "schedule_steps", "seed", "max_length", "train_steps",
              "vocab_sha256"):
        info.pop(k)
    (tmp_path / "run.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        trainer.run(_cfg(tmp_path, "--gin.TRAIN_STEPS=3"))
    assert "does not record optimizer.learning_rate" in caplog.text
    fields = {json.loads(l)["field"] for l in (tmp_path / "run_history.jsonl").read_text().splitlines()}
    assert {"optimizer.learning_rate", "batch_size", "seed", "vocab_sha256"} <= fields
    assert "optimizer" in json.loads((tmp_path / "run.json").read_text())  # recorded from now on


# ------------------------------------------------------------------------- base fingerprint
def _flip_tensor_bytes(path: pathlib.Path) -> str:
    """Reverses the element order of the largest tensor in a safetensors file, in place: same header,
    shapes and size, other weights. Returns the tensor's name."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    a, b = (8 + n + o for o in header[name]["data_offsets"])
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}[header[name]["dtype"]]
    raw[a:b] = np.frombuffer(bytes(raw[a:b]), np.uint8).reshape(-1, itemsize)[::-1].tobytes()  # element order
    path.write_bytes(bytes(raw))
    return name


def test_same_shape_base_swap_refuses_resume_and_load(tiny_hf_model_dir, tmp_path):  # noqa: F811
    base = shutil.copytree(tiny_hf_model_dir, tmp_path / "base")
    run = tmp_path / "run"
    lora = ["--gin.TrainConfig.model_overrides={}", f"--gin.TrainConfig.pretrained='{base}'",
            "--gin.TrainConfig.lora=@LoRAConfig()", "--gin.LoRAConfig.rank=4", "--gin.LoRAConfig.alpha=8",
            "--gin.LoRAConfig.targets=['q', 'v']"]
    trainer.run(_cfg(run, "--gin.TRAIN_STEPS=2", *lora))
    weights = base / "model.safetensors"
    cache = json.loads((paths.CACHE_DIR / run_dir.FINGERPRINT_CACHE).read_text())[str(weights.absolute())]
    assert cache["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()  # the cache holds the true hash
    assert cache["size"] == weights.stat().st_size and cache["inode"] == weights.stat().st_ino

    header_before, before = run_dir.header_fingerprint(base), _digest(run)
    _flip_tensor_bytes(weights)
    assert run_dir.header_fingerprint(base) == header_before  # the old check would have missed it
    with pytest.raises(UserError, match=rf"base.fingerprint: the base weights in {base} are not the ones"):
        trainer.Trainer(_cfg(run, "--gin.TRAIN_STEPS=4", *lora))
    assert _digest(run) == before
    from mst5_jax.inference.encoder import SentenceEncoder

    with pytest.raises(run_dir.BaseChangedError, match=rf"{base}: the base weights changed"):
        SentenceEncoder.from_pretrained(run)
    _flip_tensor_bytes(weights)  # the original bytes again (a new mtime: hashed again, not cached)
    emb = SentenceEncoder.from_pretrained(run).encode(["a small test"])
    assert emb.shape == (1, 32) and np.isfinite(emb).all()


def test_legacy_header_fingerprint_is_still_checked(tiny_hf_model_dir, tmp_path):  # noqa: F811
    base = shutil.copytree(tiny_hf_model_dir, tmp_path / "base")
    recorded = run_dir.header_fingerprint(base)
    run_dir.check_base(base, recorded, tmp_path / "run.json")
    (base / "config.json").write_text((base / "config.json").read_text().replace('"d_ff": 64', '"d_ff": 64 '))
    with pytest.raises(run_dir.BaseChangedError, match=str(base)):
        run_dir.check_base(base, recorded, tmp_path / "run.json")


# ------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("kill_after, resumes_at", [(1, 0), (3, 2)])
def test_metrics_hold_each_step_once_after_kill_and_resume(tmp_path, kill_after, resumes_at):
    import signal

    out = _cli(tmp_path, "--gin.TRAIN_STEPS=4", env_extra={"MST5_FAULT": f"after_step@{kill_after}"}, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert _steps_logged(tmp_path) == list(range(1, kill_after + 1))
    assert (tmp_path / LOCK_FILE).is_file()  # SIGKILL: nothing released it
    out = _cli(tmp_path, "--gin.TRAIN_STEPS=4", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "taking over a stale lock" in out.stderr and "is not running" in out.stderr
    assert ("resumed" in out.stderr) == bool(resumes_at)
    assert _steps_logged(tmp_path) == [1, 2, 3, 4]
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]
    assert not (tmp_path / LOCK_FILE).exists()
