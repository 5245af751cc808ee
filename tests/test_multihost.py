"""Multi-host training from the CLI: N `python -m mst5_jax.train` processes on localhost.

Each process is the CLI itself, launched as on a cluster with
`--coordinator_address=localhost:PORT --process_count=N --process_index=I`, with its own
fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=D). JAX 0.10's CPU client
does cross-process collectives with gloo. Every configuration has 4 devices in total, so the
reference is ONE process with 4 devices, launched the same way without the multi-host flags.

Checked: 2 processes x 2 devices equal the reference (1e-4 relative) for steps 1-2; only
process 0 writes metrics.jsonl, with num_devices = 4; that 2-process run resumes as 4
processes x 1 device, and steps 3-4 equal the reference's; killing one process makes the
other exit non-zero with a clear error (`multiprocess.exit_on_peer_failure`, or JAX's
coordination-service abort) within a bound set by --heartbeat_timeout_s.
Timings: docs/RELIABILITY.md, "Multi-host".
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from mst5_jax.training import multiprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--gin_file=demo_cpu.gin", "--gin.MIN_HELDOUT_GAIN=0", "--gin.TrainConfig.heldout_eval=False",
        "--gin.MIXTURE_OR_TASK_NAME='mst5_xnli_cross'", "--gin.BATCH_SIZE=8", "--gin.MAX_LENGTH=16",
        "--gin.TrainConfig.model_overrides={'d_model': 32, 'd_ff': 64, 'num_heads': 2, 'd_kv': 16, 'num_layers': 2}",
        "--gin.CHECKPOINT_EVERY=2", "--gin.LOG_EVERY=1"]
TOTAL_DEVICES = 4
HEARTBEAT_S = 5
# A survivor stops within ~2 heartbeat periods of the kill; the bound is 3x that plus start-up slack
# for a busy 2-core CI machine.
EXIT_BOUND_S = 3 * (2 * HEARTBEAT_S) + 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launch(data_dir, cache_dir):
    jit_cache = cache_dir / "jax_compilation_cache_multihost"

    def start(model_dir, n, steps, *extra):
        """Starts the CLI as n processes of TOTAL_DEVICES / n devices (n=1: no multi-host
        flags); returns the Popen list, each with `.log_path` (its stderr)."""
        model_dir = pathlib.Path(model_dir)
        env = dict(os.environ, JAX_PLATFORMS="cpu", MST5_DATA_DIR=str(data_dir),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={TOTAL_DEVICES // n}")
        env.pop("MST5_FAULT", None)
        args = [*TINY, f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
                f"--compilation_cache_dir={jit_cache}", *extra]
        port = _free_port()
        procs = []
        for i in range(n):
            # both spellings of the flags a launcher may use: --flag=value and --flag value
            multi = ([] if n == 1 else [f"--coordinator_address=localhost:{port}", "--process_count", str(n),
                                        f"--process_index={i}", f"--heartbeat_timeout_s={HEARTBEAT_S}",
                                        "--initialization_timeout_s=120"])
            log_path = model_dir.parent / f"{model_dir.name}.n{n}.proc{i}.log"
            with open(log_path, "a") as err:
                p = subprocess.Popen([sys.executable, "-m", "mst5_jax.train", *args, *multi], env=env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=err, text=True)
            p.log_path = log_path
            procs.append(p)
        return procs

    def run(model_dir, n, steps, *extra, timeout=400):
        """Runs n processes to completion; returns the wall seconds."""
        t0 = time.perf_counter()
        procs = start(model_dir, n, steps, *extra)
        try:
            for p in procs:
                p.wait(timeout=max(t0 + timeout - time.perf_counter(), 1))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for i, p in enumerate(procs):
            assert p.returncode == 0, f"process {i} of {n}: rc={p.returncode}\n" + p.log_path.read_text()[-4000:]
        wall = time.perf_counter() - t0
        print(f"{n} process(es) x {TOTAL_DEVICES // n} devices, to step {steps}: {wall:.1f} s wall")
        return wall

    run.start = start
    return run


def _records(model_dir):
    return [json.loads(l) for l in (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(model_dir):
    recs = [r for r in _records(model_dir) if "loss" in r]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"{model_dir}: a step was written twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def _assert_losses_match(run, reference, steps):
    a, b = _losses(run), _losses(reference)
    assert sorted(a) == sorted(steps), (sorted(a), steps)
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-4), (s, a[s], b[s])


def _assert_every_process_wrote_its_shards(step_dir, n):
    """Orbax's OCDBT layout: each process writes its arrays under ocdbt.process_<i>/."""
    for item in ("params", "opt_state"):
        found = sorted(p.name for p in (step_dir / item).glob("ocdbt.process_*"))
        assert found == [f"ocdbt.process_{i}" for i in range(n)], (step_dir / item, found)


@pytest.fixture(scope="module")
def reference(launch, tmp_path_factory):
    """ONE process with TOTAL_DEVICES devices, straight to step 4."""
    d = tmp_path_factory.mktemp("one_process") / "run"
    launch(d, 1, 4)
    return d


@pytest.fixture(scope="module")
def two_processes(launch, tmp_path_factory):
    """2 processes x 2 devices, to step 2 (a checkpoint at 2)."""
    d = tmp_path_factory.mktemp("two_processes") / "run"
    launch(d, 2, 2)
    return d


def test_two_processes_equal_one_and_only_process_0_writes(reference, two_processes):
    _assert_losses_match(two_processes, reference, (1, 2))
    recs = _records(two_processes)
    assert {r["num_devices"] for r in recs} == {TOTAL_DEVICES}
    # Process 1 wrote no run file: each one is there once, from process 0.
    for name in ("run.json", "operative_config.gin", "summary.json", "tokenizer"):
        assert (two_processes / name).exists(), name
    assert json.loads((two_processes / "summary.json").read_text())["final_step"] == 2
    assert (two_processes / "checkpoints" / "2" / "manifest.json").is_file()
    _assert_every_process_wrote_its_shards(two_processes / "checkpoints" / "2", 2)
    logs = [two_processes.parent / f"run.n2.proc{i}.log" for i in (0, 1)]
    assert "process 0 of 2" in logs[0].read_text() and "process 1 of 2" in logs[1].read_text()


def test_two_process_run_resumes_as_four_processes(launch, reference, two_processes, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(two_processes, d)
    launch(d, 4, 4)
    _assert_losses_match(d, reference, (1, 2, 3, 4))
    recs = [r for r in _records(d) if r["step"] > 2]
    assert {r["num_devices"] for r in recs} == {TOTAL_DEVICES}
    _assert_every_process_wrote_its_shards(d / "checkpoints" / "4", 4)


@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_process_makes_the_other_exit_within_a_bound(launch, tmp_path, victim):
    d = tmp_path / "run"
    procs = launch.start(d, 2, 100000, "--gin.CHECKPOINT_EVERY=100000")
    metrics = d / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert all(p.poll() is None for p in procs), [p.log_path.read_text()[-2000:] for p in procs]
            time.sleep(0.2)
        assert metrics.is_file(), "the run never got going"
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.time()
        survivor = procs[1 - victim]
        try:
            rc = survivor.wait(timeout=EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {1 - victim} still running {time.time() - t0:.0f} s after process {victim} died")
        elapsed = time.time() - t0
        log = survivor.log_path.read_text()
        print(f"process {1 - victim} exited rc={rc} {elapsed:.1f} s after process {victim} was killed; "
              f"last log line: {log.strip().splitlines()[-1][:300]}")
        assert rc != 0
        assert elapsed <= EXIT_BOUND_S
        # Either the failed collective's one-line error (exit code 3) or, when the survivor was
        # not in a collective, the coordination service's abort once the heartbeat timed out.
        clear = "a collective with another process failed" in log and rc == multiprocess.EXIT_PEER_FAILED
        assert clear or "JAX distributed service detected fatal errors" in log, (rc, log[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("flags, expected", [
    (["--process_count=2", "--process_index=2", "--coordinator_address=localhost:1"],
     "--process_index=2: expected 0..1"),
    (["--coordinator_address", "localhost", "--process_count=2", "--process_index=0"],
     "--coordinator_address='localhost': expected HOST:PORT"),
    (["--multiprocess"], "jax.distributed.initialize failed (cluster auto-detection)"),
])
def test_bad_multihost_flags_are_one_line_errors(flags, expected, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    for k in [k for k in env if k.startswith(("SLURM_", "OMPI_", "TPU_"))]:
        env.pop(k)  # no cluster for auto-detection to find
    out = subprocess.run([sys.executable, "-m", "mst5_jax.train", *TINY, f"--gin.MODEL_DIR='{tmp_path}'", *flags],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_help_documents_the_multihost_flags():
    out = subprocess.run([sys.executable, "-m", "mst5_jax.train", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    for flag in ("--multiprocess", "--coordinator_address", "--process_count", "--process_index",
                 "--initialization_timeout_s", "--heartbeat_timeout_s"):
        assert flag in out.stdout, flag
