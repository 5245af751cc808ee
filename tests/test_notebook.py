"""The Colab notebook runs top to bottom in CI mode (tiny model, local files, no network).

It is executed with nbclient in a kernel whose spec, written to a temporary Jupyter path,
points at this interpreter (`sys.executable`), so the venv that runs the tests runs the
notebook too. CI mode comes from `MST5_CI_MODE=1`, read by the notebook's parameter cell.
"""
import json
import pathlib
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "mst5_colab_tpu.ipynb"


def test_notebook_has_a_parameter_cell_and_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "CI_MODE" in tagged[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"


@pytest.mark.slow
def test_notebook_runs_in_ci_mode(tmp_path, monkeypatch, data_dir):
    kernel_dir = tmp_path / "jupyter" / "kernels" / "mst5-test"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mst5 (tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MST5_CI_MODE", "1")
    monkeypatch.setenv("MST5_DATA_DIR", str(data_dir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("MST5_NO_SEQIO", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="mst5-test", timeout=170, resources={"metadata": {"path": str(REPO)}})
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    print(f"notebook ran in {elapsed:.1f} s")
    assert elapsed < 180

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.get("output_type") == "stream")
    assert "CI_MODE=True" in text
    assert "embedding shape: (6, 32)" in text
    assert "4 steps; loss" in text
    assert "| tatoeba | swh |" in text and "| xsts | avg |" in text
    assert "transformers + peft vs mst5_jax: relative error" in text
