"""Crashes, preemption, a full disk and corruption: real subprocess runs of the training CLI.

Each case runs `python -m mst5_jax.train` on the tiny config of tests/test_train.py (batch
8, length 16, d_model 32, a checkpoint every 2 steps), breaks it at a seeded point
(`mst5_jax.training.faults`, ``MST5_FAULT``), restarts it, and compares the final parameters with
an uninterrupted 4-step run, leaf by leaf, to 1e-6. A persistent compilation cache keeps
each run to a few seconds after the first.

The CLI turns ``MST5_FAULT`` into a `mst5_jax.training.faults.FaultHook` once, at start-up;
the training loop only calls hooks (see docs/RELIABILITY.md).
"""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--gin_file=demo_cpu.gin", "--gin.MIN_HELDOUT_GAIN=0", "--gin.TrainConfig.heldout_eval=False",
        "--gin.MIXTURE_OR_TASK_NAME='mst5_xnli_cross'", "--gin.BATCH_SIZE=8", "--gin.MAX_LENGTH=16",
        "--gin.TrainConfig.model_overrides={'d_model': 32, 'd_ff': 64, 'num_heads': 2, 'd_kv': 16, 'num_layers': 2}",
        "--gin.CHECKPOINT_EVERY=2", "--gin.LOG_EVERY=1"]


@pytest.fixture(scope="module")
def cli(data_dir, cache_dir):
    jit_cache = cache_dir / "jax_compilation_cache_reliability"

    def run(model_dir, *extra, steps=4, fault=None, fsize_kib=None, timeout=300):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                   MST5_DATA_DIR=str(data_dir))
        env.pop("MST5_FAULT", None)
        if fault:
            env["MST5_FAULT"] = fault
        cmd = [sys.executable, "-m", "mst5_jax.train", *TINY, f"--gin.MODEL_DIR='{model_dir}'",
               f"--gin.TRAIN_STEPS={steps}", f"--compilation_cache_dir={jit_cache}", *extra]
        if fsize_kib is not None:  # RLIMIT_FSIZE in the child: writes past the limit fail with EFBIG
            cmd = ["bash", "-c", f'ulimit -f {int(fsize_kib)} && exec "$@"', "bash", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)

    return run


def _ok(out):
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _params(model_dir, step):
    """Flat {path: np.ndarray} of a committed step's params, read with orbax directly."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(pathlib.Path(model_dir) / "checkpoints" / str(step) / "params")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_params(a_dir, b_dir, step=4):
    a, b = _params(a_dir, step), _params(b_dir, step)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


def _tree_digest(d):
    """{relative path: sha256} of every file under d (byte-identity check)."""
    d = pathlib.Path(d)
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _steps(model_dir):
    return sorted(int(p.name) for p in (pathlib.Path(model_dir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def straight(cli, tmp_path_factory):
    """The uninterrupted reference: 4 steps, checkpoints at 2 and 4."""
    d = tmp_path_factory.mktemp("straight")
    _ok(cli(d))
    assert _steps(d) == [2, 4]
    return d


@pytest.fixture(scope="module")
def at_step2(cli, tmp_path_factory):
    """A run stopped cleanly at step 2 (same schedule: SCHEDULE_STEPS is fixed in demo_cpu.gin)."""
    d = tmp_path_factory.mktemp("at2") / "run"
    _ok(cli(d, steps=2))
    assert _steps(d) == [2]
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------- SIGKILL
def test_sigkill_after_step_1_before_any_checkpoint_restarts_from_scratch(cli, straight, tmp_path):
    out = cli(tmp_path, fault="after_step@1")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists() or _steps(tmp_path) == []
    _ok(cli(tmp_path))
    _assert_same_params(tmp_path, straight)


def test_sigkill_between_orbax_temp_write_and_commit(cli, straight, tmp_path):
    out = cli(tmp_path, fault="ckpt_before_finalize@4")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    ck = tmp_path / "checkpoints"
    tmp_dirs = [p.name for p in ck.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert _steps(tmp_path) == [2] and tmp_dirs, sorted(p.name for p in ck.iterdir())
    assert any((ck / tmp_dirs[0] / "params").rglob("*")), "the temporary step was written before the kill"
    out = _ok(cli(tmp_path))
    assert "resumed" in out.stderr and "at step 2" in out.stderr
    assert _steps(tmp_path) == [2, 4]
    assert not [p for p in ck.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    _assert_same_params(tmp_path, straight)


def test_sigkill_between_commit_and_manifest_falls_back_to_verified_step(cli, straight, tmp_path):
    out = cli(tmp_path, fault="ckpt_before_manifest@4")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert _steps(tmp_path) == [2, 4] and not (tmp_path / "checkpoints" / "4" / "manifest.json").exists()
    out = _ok(cli(tmp_path))
    assert "checkpoint step 4 fails verification" in out.stderr and "manifest.json: missing" in out.stderr
    assert "at step 2" in out.stderr
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_rejected").iterdir()] == ["4"]
    _assert_same_params(tmp_path, straight)


# ------------------------------------------------------------------------- SIGTERM
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_stop_signal_saves_exits_preempted_and_restart_continues(cli, straight, tmp_path, signame):
    # A real SIGTERM or SIGINT, sent by the process to itself after step 2 (deterministic
    # timing): the loop notices it at step 3, saves step 3 (off the every-2 schedule) and
    # exits with EXIT_PREEMPTED (75), so a scheduler sees an unfinished run.
    from mst5_jax.utils.cli import EXIT_PREEMPTED

    out = cli(tmp_path, steps=6, fault=f"{signame.lower()}_after_step@2")
    assert out.returncode == EXIT_PREEMPTED == 75, out.stderr[-3000:]
    assert f"{signame} received" in out.stderr
    assert _steps(tmp_path) == [2, 3]
    assert not (tmp_path / ".lock").exists()  # released on the way out
    out = _ok(cli(tmp_path))
    assert "at step 3" in out.stderr
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    _assert_same_params(tmp_path, straight)


# ------------------------------------------------------------------------- full disk
def test_full_disk_rlimit_fsize_clear_error_last_checkpoint_untouched(cli, straight, at_step2, tmp_path):
    run = _copy(at_step2, tmp_path / "run")
    before = _tree_digest(run / "checkpoints" / "2")
    biggest = max(p.stat().st_size for p in (run / "checkpoints" / "2").rglob("*") if p.is_file())
    assert biggest > 64 * 1024  # the next checkpoint cannot be written under a 64 KiB file limit
    out = cli(run, fsize_kib=64)  # `ulimit -f 64` (RLIMIT_FSIZE) in the child only
    print(*[l for l in out.stderr.splitlines() if "saving the step" in l], sep="\n")
    assert out.returncode != 0
    assert "saving the step-4 checkpoint" in out.stderr, out.stderr[-4000:]
    assert "last complete checkpoint, step 2, is untouched" in out.stderr
    assert _steps(run) == [2]
    assert _tree_digest(run / "checkpoints" / "2") == before
    # With space again, the rerun resumes from step 2 and ends where the straight run did.
    _ok(cli(run))
    _assert_same_params(run, straight)


def test_full_disk_failing_writer_hook(cli, at_step2, tmp_path):
    run = _copy(at_step2, tmp_path / "run")
    before = _tree_digest(run / "checkpoints" / "2")
    out = cli(run, fault="ckpt_disk_full@4")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "No space left on device" in out.stderr and "saving the step-4 checkpoint" in out.stderr
    assert _steps(run) == [2]
    assert _tree_digest(run / "checkpoints" / "2") == before


# ------------------------------------------------------------------------- corruption
def test_corrupt_checkpoint_is_named_and_restore_falls_back(cli, straight, tmp_path):
    run = _copy(straight, tmp_path / "run")
    data_files = sorted((run / "checkpoints" / "4" / "params").rglob("d/*"), key=lambda p: -p.stat().st_size)
    victim = data_files[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the sha256 can tell
    victim.write_bytes(bytes(raw))
    out = _ok(cli(run))
    assert "checkpoint step 4 fails verification" in out.stderr
    assert f"{victim}: sha256" in out.stderr, out.stderr[-4000:]
    assert "at step 2" in out.stderr
    rejected = list((run / "checkpoints_rejected").iterdir())
    assert len(rejected) == 1 and rejected[0].name.startswith("4-")
    _assert_same_params(run, straight)


def test_loading_a_run_verifies_the_step(straight, tmp_path):
    # NEEDS the proposed edit to train_checkpoints.load_run_model.
    from mst5_jax.inference.encoder import SentenceEncoder
    from mst5_jax.formats.manifest import CheckpointIntegrityError

    run = _copy(straight, tmp_path / "run")
    victim = sorted((run / "checkpoints" / "4" / "opt_state").rglob("d/*"))[0]
    victim.write_bytes(victim.read_bytes()[:-1])
    with pytest.raises(CheckpointIntegrityError, match=f"{victim}: size"):
        SentenceEncoder.from_pretrained(run, step=4)
    sents = ["A man is playing a guitar.", "Un homme joue de la guitare."]
    latest = SentenceEncoder.from_pretrained(run).encode(sents)  # falls back to step 2
    np.testing.assert_array_equal(latest, SentenceEncoder.from_pretrained(straight, step=2).encode(sents))


# ------------------------------------------------------------------------- manifest unit tests
@pytest.fixture
def step_dir(tmp_path):
    d = tmp_path / "checkpoints" / "7"
    (d / "params" / "d").mkdir(parents=True)
    (d / "params" / "d" / "a").write_bytes(os.urandom(5000))
    (d / "params" / "_METADATA").write_text('{"x": 1}')
    (d / "meta").mkdir()
    (d / "meta" / "metadata").write_text('{"step": 7}')
    return d


def test_manifest_round_trip_and_independent_hashes(step_dir):
    from mst5_jax.formats import manifest

    path = manifest.write(step_dir)
    import json

    data = json.loads(path.read_text())
    assert data["step"] == 7 and data["hashed"] is True
    for rel, e in data["files"].items():
        raw = (step_dir / rel).read_bytes()
        assert e == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert sorted(data["files"]) == ["meta/metadata", "params/_METADATA", "params/d/a"]
    assert manifest.verify(step_dir) == []


@pytest.mark.parametrize("damage, expect", [
    ("flip", "sha256"), ("truncate", "size 4999 bytes, the manifest says 5000"), ("delete", "missing")])
def test_manifest_names_the_bad_file(step_dir, damage, expect):
    from mst5_jax.formats import manifest

    manifest.write(step_dir)
    f = step_dir / "params" / "d" / "a"
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[10] ^= 1
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        f.write_bytes(bytes(raw[:-1]))
    else:
        f.unlink()
    problems = manifest.verify(step_dir)
    assert len(problems) == 1 and problems[0].startswith(str(f)) and expect in problems[0], problems
    with pytest.raises(manifest.CheckpointIntegrityError, match="params/d/a"):
        manifest.require_verified(step_dir)


def test_manifest_sizes_only_above_the_hash_limit(step_dir):
    from mst5_jax.formats import manifest

    manifest.write(step_dir, hash_limit=100)  # a "full fine-tune" sized step: sizes only
    f = step_dir / "params" / "d" / "a"
    raw = bytearray(f.read_bytes())
    raw[0] ^= 1
    f.write_bytes(bytes(raw))
    assert manifest.verify(step_dir) == []  # documented: same-size corruption is not caught
    f.write_bytes(bytes(raw[:100]))
    assert "size 100 bytes" in manifest.verify(step_dir)[0]


def test_manifest_missing_or_unreadable(step_dir):
    from mst5_jax.formats import manifest

    assert "manifest.json: missing" in manifest.verify(step_dir)[0]
    assert manifest.verify(step_dir, require_manifest=False) == []
    (step_dir / "manifest.json").write_text("{not json")
    assert "unreadable manifest" in manifest.verify(step_dir)[0]
    (step_dir / "manifest.json").write_text('{"format": "mst5-manifest/1", "files": {"../../x": {"size": 1}}}')
    assert "not a relative path" in manifest.verify(step_dir)[0]


def test_newest_verified_step_quarantines_newer_bad_steps(step_dir):
    from mst5_jax.formats import manifest

    ck = step_dir.parent
    manifest.write(step_dir)
    good9 = _copy(step_dir, ck / "9")
    manifest.write(good9)
    bad12 = _copy(step_dir, ck / "12")
    manifest.write(bad12)
    (bad12 / "meta" / "metadata").write_text('{"step": 8}')
    (ck / "12.orbax-checkpoint-tmp").mkdir()  # not a committed step: ignored
    assert manifest.committed_steps(ck) == [7, 9, 12]
    assert manifest.newest_verified_step(ck) == 9  # read-only by default
    assert manifest.committed_steps(ck) == [7, 9, 12]
    assert manifest.newest_verified_step(ck, quarantine=True) == 9
    assert manifest.committed_steps(ck) == [7, 9]
    assert [p.name.split("-")[0] for p in (ck.parent / "checkpoints_rejected").iterdir()] == ["12"]
    for s in (7, 9):
        (ck / str(s) / "manifest.json").unlink()
    assert manifest.newest_verified_step(ck, quarantine=True) is None  # nothing verifies: start over
    assert manifest.committed_steps(ck) == []


def test_fault_spec_parsing():
    from mst5_jax.training import faults

    assert faults.active("after_step@3, ckpt_before_finalize") == {"after_step": 3, "ckpt_before_finalize": None}
    with pytest.raises(ValueError, match="unknown fault point 'nope'"):
        faults.active("nope@1")
    with pytest.raises(ValueError, match="must be an integer"):
        faults.active("after_step@x")
    os.environ.pop("MST5_FAULT", None)
    assert faults.FaultHook.from_env() is None  # production: no hook, nothing fires
    assert faults.FaultHook("after_step@3").install_orbax() is False  # orbax untouched without a ckpt_* point
    hook = faults.FaultHook("after_step@3")
    assert hook.wants("after_step", 3) and not hook.wants("after_step", 2)
    hook.fire("after_step", 2)  # not due: returns
    with pytest.raises(OSError, match="No space left on device"):
        faults.FaultHook("ckpt_disk_full").fire("ckpt_disk_full", 7)  # no @step: due at every step
