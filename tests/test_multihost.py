"""Multi-host training on one machine: N processes, `jax.distributed` over localhost, gloo.

Each process is a real `python -m mst5_jax.train`-equivalent (`train.main`) with one CPU
device, started after `jax.distributed.initialize(coordinator_address="localhost:PORT",
num_processes=N, process_id=i, heartbeat_timeout_seconds=10)`. JAX 0.10's CPU client does
cross-process collectives with gloo (`jax_cpu_collectives_implementation`, default
"gloo"). Each process builds only its shard of every global batch (`TripletIterator` with
shard_index=i, num_shards=N, then `host_local_to_global`).

Checked: losses equal the single-process run with the same global batch (1e-5 relative);
a checkpoint written by 2 processes resumes in 1 and the other way round; killing one
process makes the other exit with an error within 2 x the heartbeat timeout.

Needs the lead's train.py integration (process-0-only metrics/run files and the
per-host data position on resume; see docs/RELIABILITY.md).
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--gin_file=demo_cpu.gin", "--gin.MIN_HELDOUT_GAIN=0", "--gin.TrainConfig.heldout_eval=False",
        "--gin.MIXTURE_OR_TASK_NAME='mst5_xnli_cross'", "--gin.BATCH_SIZE=8", "--gin.MAX_LENGTH=16",
        "--gin.TrainConfig.model_overrides={'d_model': 32, 'd_ff': 64, 'num_heads': 2, 'd_kv': 16, 'num_layers': 2}",
        "--gin.CHECKPOINT_EVERY=2", "--gin.LOG_EVERY=1"]
HEARTBEAT_S = 10

WORKER = r"""
import sys, jax
port, n, i = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if n > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=n, process_id=i,
                               heartbeat_timeout_seconds=%d, initialization_timeout=120)
assert jax.process_count() == n and jax.device_count() == n, (jax.process_count(), jax.device_count())
from mst5_jax import train
sys.exit(train.main(sys.argv[4:]))
""" % HEARTBEAT_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launch(data_dir, cache_dir):
    jit_cache = cache_dir / "jax_compilation_cache_multihost"

    def start(model_dir, n, steps, *extra, log_dir=None):
        """Starts n processes; returns the Popen list (stderr to log files under log_dir)."""
        port = _free_port()
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                   MST5_DATA_DIR=str(data_dir))
        env.pop("MST5_FAULT", None)
        args = [*TINY, f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
                f"--compilation_cache_dir={jit_cache}", *extra]
        log_dir = pathlib.Path(log_dir or model_dir).parent
        procs = []
        for i in range(n):
            err = open(log_dir / f"{pathlib.Path(model_dir).name}.proc{i}.log", "w")
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(n), str(i), *args],
                                          env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, text=True))
            procs[-1].log_path = err.name
        return procs

    def run(model_dir, n, steps, *extra, timeout=240):
        procs = start(model_dir, n, steps, *extra)
        deadline = time.time() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise
        for i, p in enumerate(procs):
            assert p.returncode == 0, f"process {i}: " + pathlib.Path(p.log_path).read_text()[-4000:]
        return procs

    run.start = start
    return run


def _losses(model_dir):
    recs = [json.loads(l) for l in (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert len(steps) == len(set(steps)), f"duplicate metric records: {steps}"  # process 0 writes alone
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, recs


@pytest.fixture(scope="module")
def single(launch, tmp_path_factory):
    """The single-process reference: global batch 8, 4 steps, checkpoints at 2 and 4."""
    d = tmp_path_factory.mktemp("single") / "run"
    launch(d, 1, 4)
    return d


@pytest.fixture(scope="module")
def two_at_2(launch, tmp_path_factory):
    d = tmp_path_factory.mktemp("two") / "run"
    launch(d, 2, 2)
    return d


def _assert_losses_match(a_dir, b_dir, steps):
    a, _ = _losses(a_dir)
    b, _ = _losses(b_dir)
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a[s], b[s])


def test_two_processes_match_one(single, two_at_2):
    _, recs = _losses(two_at_2)
    assert {r["num_devices"] for r in recs} == {2}
    _assert_losses_match(two_at_2, single, (1, 2))
    assert sorted(int(p.name) for p in (two_at_2 / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert (two_at_2 / "checkpoints" / "2" / "manifest.json").is_file()


def test_four_processes_match_one(launch, single, tmp_path):
    d = tmp_path / "run"
    launch(d, 4, 2, timeout=300)
    _assert_losses_match(d, single, (1, 2))


def test_two_process_checkpoint_resumes_in_one(launch, single, two_at_2, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(two_at_2, d)
    launch(d, 1, 4)
    _assert_losses_match(d, single, (1, 2, 3, 4))


def test_one_process_checkpoint_resumes_in_two(launch, single, tmp_path):
    d = tmp_path / "run"
    launch(d, 1, 2)
    launch(d, 2, 4)
    _assert_losses_match(d, single, (1, 2, 3, 4))


@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_process_makes_the_others_exit_not_hang(launch, tmp_path, victim):
    d = tmp_path / "run"
    procs = launch.start(d, 2, 100000, "--gin.CHECKPOINT_EVERY=100000")
    metrics = d / "metrics.jsonl"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert all(p.poll() is None for p in procs), [pathlib.Path(p.log_path).read_text()[-2000:] for p in procs]
            time.sleep(0.2)
        assert metrics.is_file(), "the run never got going"
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.time()
        survivor = procs[1 - victim]
        try:
            rc = survivor.wait(timeout=2 * HEARTBEAT_S + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {1 - victim} still running {time.time() - t0:.0f} s after process {victim} died")
        elapsed = time.time() - t0
        log = pathlib.Path(survivor.log_path).read_text()
        print(f"process {1 - victim} exited rc={rc} {elapsed:.1f} s after process {victim} was killed; "
              f"last log line: {log.strip().splitlines()[-1][:300]}")
        assert rc != 0
        assert elapsed <= 2 * HEARTBEAT_S
        assert "JAX distributed service detected fatal errors" in log or "Gloo" in log, log[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
