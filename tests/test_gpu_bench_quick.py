"""benchmarks/gpu_bench.py --quick on the CPU: every kind of row runs end to end.

The GPU run happens in another session with a few minutes of device time, so this test
is what keeps an import error or a broken worker from wasting them. It runs a subset of
the sections (the prep, both parity workers, a GradCache train step and the end-to-end
encode) within about a minute on two busy cores; `python benchmarks/gpu_bench.py --quick`
runs all of them (docs/BENCHMARKS.md).

The parity rows compare this project against HF transformers + peft in torch (the
independent reference); the test recomputes their cosines from the saved arrays with
numpy rather than trusting the script's own arithmetic.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_bench.py"
sys.path.insert(0, str(REPO / "benchmarks"))


def _env():
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(out, work, data_dir, *extra):
    cmd = [sys.executable, str(SCRIPT), "--quick", "--sections", "xxl_fwd,gradcache,e2e", "--out", str(out),
           "--work", str(work), "--data-dir", str(data_dir), "--budget", "200", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "gpu_bench.jsonl").read_text().splitlines() if line.strip()]
    return {"out": out, "work": work, "rows": rows, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_dir):
    return _run(tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work"), data_dir)


def _one(rows, **kw):
    found = [r for r in rows if all(r.get(k) == v for k, v in kw.items())]
    assert len(found) == 1, (kw, [(r.get("section"), r.get("side"), r.get("status")) for r in rows])
    return found[0]


def test_every_row_ran(quick_run):
    rows = quick_run["rows"]
    bad = [(r["section"], r.get("side"), r["status"]) for r in rows if r["status"] not in ("ok", "pass")]
    assert not bad, bad
    for section, side in [("matmul", "ours"), ("matmul", "ref"), ("encode", "ours"), ("encode", "ref"),
                          ("gradcache", "ours"), ("e2e", "ours")]:
        _one(rows, section=section, side=side)
    assert {r["framework"] for r in rows if r["section"] == "encode"} == {"jax", "torch"}
    assert len([r for r in rows if r["section"] == "parity"]) == 2


def test_timings_are_positive(quick_run):
    timed = [r for r in quick_run["rows"] if r["section"] in ("matmul", "encode", "gradcache", "e2e")]
    assert len(timed) == 6
    for r in timed:
        assert r["time_s"] > 0 and r["value"] > 0, r
    gc = _one(quick_run["rows"], section="gradcache")
    assert gc["microbatch"] == 4 and gc["batch"] == 8 and np.isfinite(gc["loss"])
    e2e = _one(quick_run["rows"], section="e2e")
    assert e2e["sentences"] == 600 and e2e["tokens"] > e2e["sentences"]


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_parity_rows_pass_and_match_the_saved_arrays(quick_run):
    rows, parity = quick_run["rows"], quick_run["work"] / "parity"
    ours, ref = np.load(parity / "xxl-ours.npz"), np.load(parity / "xxl-ref.npz")

    emb_row = _one(rows, section="parity", config="xxl embeddings, 4 sentences x 16")
    per_row = [_cos(x, y) for x, y in zip(ours["embeddings"], ref["embeddings"])]
    assert emb_row["status"] == "pass" and min(per_row) >= 0.999
    assert emb_row["value"] == pytest.approx(min(per_row), abs=1e-9)
    assert ours["embeddings"].shape == ref["embeddings"].shape == (4, 64)

    grad_row = _one(rows, section="parity", config="xxl step-1 LoRA gradients (B non-zero), 4 triplets x 16")
    keys = ["q.lora_A", "q.lora_B", "v.lora_A", "v.lora_B"]
    assert sorted(k for k in ref.files if "lora" in k) == keys
    for k in keys:  # peft layouts: A [L, r, in], B [L, out, r]; every factor gets a gradient
        assert ours[k].shape == ref[k].shape
        assert np.abs(ref[k]).max() > 0 and np.abs(ours[k]).max() > 0
    total = _cos(np.concatenate([ours[k].ravel() for k in keys]), np.concatenate([ref[k].ravel() for k in keys]))
    assert grad_row["status"] == "pass" and total >= 0.99
    assert grad_row["value"] == pytest.approx(total, abs=1e-9)
    assert float(ours["loss"]) == pytest.approx(float(ref["loss"]), rel=2e-2)


def test_outputs_and_table(quick_run):
    out = quick_run["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu_bench.jsonl", "gpu_bench.md", "gpu_bench_summary.json", "workers.log"])
    table = (out / "gpu_bench.md").read_text()
    assert "| section | side | config | status |" in table and "| parity |" in table
    assert "| section | side | config | status |" in quick_run["stdout"]
    summary = json.loads((out / "gpu_bench_summary.json").read_text())
    assert summary["peak_tflops"] > 0 and summary["ratios"]["encode_xxl"] > 0


def test_resume_reruns_only_unfinished_jobs(quick_run, tmp_path, data_dir):
    """A second call on a warm machine: finished jobs are copied, not rerun; parity is recomputed."""
    first = {(r["section"], r["side"], r["config"]): r for r in quick_run["rows"]}
    again = _run(tmp_path, quick_run["work"], data_dir, "--resume")
    rows = again["rows"]
    workers_log = (tmp_path / "workers.log").read_text()
    assert "prep---prep.log" in workers_log and "fwd.log" not in workers_log and "e2e.log" not in workers_log
    resumed = [r for r in rows if r.get("resumed")]
    # the torch matmul belongs to the reference's fwd job; ours is measured again by the prep job
    assert {(r["section"], r["side"]) for r in resumed} == {
        ("parity-arrays", "ours"), ("parity-arrays", "ref"), ("encode", "ours"), ("encode", "ref"),
        ("matmul", "ref"), ("gradcache", "ours"), ("e2e", "ours")}
    assert [r["side"] for r in rows if r["section"] == "matmul" and not r.get("resumed")] == ["ours"]
    for r in resumed:
        assert r.get("value") == first[(r["section"], r["side"], r["config"])].get("value")
    assert [r["status"] for r in rows if r["section"] == "parity"] == ["pass", "pass"]
    assert "from an earlier run (--resume)" in (tmp_path / "gpu_bench.md").read_text()

    # A fresh machine: no work folder, the first call's rows carried in; parity rows are copied too.
    fresh = _run(tmp_path / "out2", tmp_path / "work2", data_dir, "--resume", str(quick_run["out"] / "gpu_bench.jsonl"))
    parity = [r for r in fresh["rows"] if r["section"] == "parity"]
    assert [(r["status"], r.get("resumed")) for r in parity] == [("pass", True), ("pass", True)]
    assert {r["value"] for r in parity} == {r["value"] for r in quick_run["rows"] if r["section"] == "parity"}
    assert not (tmp_path / "work2" / "parity").exists()


def test_oom_and_timeouts_become_rows(tmp_path, monkeypatch):
    """An OOM inside a worker is a row "OOM at N"; a worker past its cap is killed and recorded."""
    import argparse
    import time

    import _bench_common as common
    import gpu_bench

    rows = common.RowWriter(tmp_path / "rows.jsonl")

    def oom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.5GiB")

    assert common.guarded(rows, "32 triplets", oom, section="xxl_step", side="ours") is None
    (row,) = common.read_rows(tmp_path / "rows.jsonl")
    assert row["status"] == "OOM at 32 triplets" and "RESOURCE_EXHAUSTED" in row["error"]

    fake = tmp_path / "workers"
    fake.mkdir()
    (fake / "_bench_jax.py").write_text("import time\ntime.sleep(60)\n")  # a worker that never finishes
    monkeypatch.setattr(gpu_bench, "HERE", fake)
    spec = {"suite": "quick", "quick": True}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    args = argparse.Namespace(quick=True, budget=100.0, resume=False)
    runner = gpu_bench.Runner(args, spec, tmp_path, tmp_path, deadline=time.time() + 100)
    job = gpu_bench.Job("xxl_step", "jax", "step", "ours", "a job past its cap", {"model": "xxl"}, cap_s=1.0,
                        min_s=0.0)
    runner.run(job)
    row = common.read_rows(tmp_path / "gpu_bench.jsonl")[-1]
    assert row["config"] == "a job past its cap" and row["status"].startswith("timeout after 1 s")
    runner.deadline = time.time()
    runner.run(job)
    assert common.read_rows(tmp_path / "gpu_bench.jsonl")[-1]["status"].startswith("skipped: budget")
