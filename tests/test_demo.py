"""The README's main job: the CPU demo trains, passes its held-out threshold, and evaluates.

This is the one long test (a few minutes): it runs exactly the demo config, with only
MODEL_DIR moved to a temporary folder.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

from mst5_jax.training import gin_utils

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_demo_passes_its_threshold_and_evaluates(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    run_dir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "mst5_jax.train", "--gin_file=demo_cpu.gin",
                          f"--gin.MODEL_DIR='{run_dir}'"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    before = float(re.search(r"before training: ([0-9.]+)", out.stdout).group(1))
    after = float(re.search(r"after training: ([0-9.]+)", out.stdout).group(1))
    threshold = gin_utils.parse_gin(["demo_cpu.gin"], []).min_heldout_gain
    print(f"demo held-out xx->en: {before:.2f} -> {after:.2f} (threshold +{threshold})")
    assert threshold >= 3 and after - before >= threshold
    # The README prints the numbers a fresh clone prints: the run is deterministic.
    row = re.search(r"\| 830 XNLI dev premises, 14 directions \| ([0-9.]+) \| ([0-9.]+) \| \+([0-9.]+) points \|",
                    (REPO / "README.md").read_text())
    assert row, "README.md lost its demo table row"
    assert abs(before - float(row.group(1))) <= 0.01 and abs(after - float(row.group(2))) <= 0.01, (before, after, row.group(0))
    assert abs(float(row.group(3)) - 2 - threshold) <= 0.01 or threshold == 3  # frozen at the honest gain minus 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == gin_utils.parse_gin(["demo_cpu.gin"], []).train_steps

    result = tmp_path / "eval.json"
    ev = subprocess.run([sys.executable, "-m", "mst5_jax.evaluate", "--model", str(run_dir),
                         "--tasks", "xnli_retrieval,xsts", "--output", str(result)],
                        capture_output=True, text=True, env=env, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    scores = json.loads(result.read_text())
    assert "xnli_retrieval" in json.dumps(scores) and "|" in ev.stdout
