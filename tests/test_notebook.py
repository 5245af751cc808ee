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


def _extras_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """Base dependencies and each extra's, as normalised distribution names (self-references expanded)."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[\s\[<>=!~;@]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    extras = {k: list(v) for k, v in project["optional-dependencies"].items()}
    resolved: dict[str, set[str]] = {}

    def resolve(extra: str) -> set[str]:
        if extra not in resolved:
            out: set[str] = set()
            for r in extras[extra]:
                m = re.match(r"mst5_jax\[(.+)\]", r)
                out |= set().union(*(resolve(e.strip()) for e in m.group(1).split(","))) if m else names([r])
            resolved[extra] = out
        return resolved[extra]

    return names(project["dependencies"]), {e: resolve(e) for e in extras}


def test_install_cell_covers_every_import():
    """Every module the notebook imports comes from the extras its install cell names."""
    import ast
    import importlib.metadata
    import re

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    installs = re.findall(r"mst5_jax\[([a-z0-9_,]+)\]", "\n".join(code))
    assert installs, "the notebook has no `pip install mst5_jax[...]` cell"
    base, extras = _extras_requirements()
    allowed = set(base)
    for group in installs:
        for extra in group.split(","):
            assert extra in extras, f"install cell names extra [{extra}], which pyproject.toml lacks"
            allowed |= extras[extra]
    dist_of = importlib.metadata.packages_distributions()
    missing = []
    for src in code:
        for node in ast.walk(ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%"))))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for mod in mods:
                top = mod.split(".")[0]
                if mod == "mst5_jax.train" or mod.startswith("mst5_jax.training"):
                    top = "gin"  # training parses gin configs: it needs gin-config installed
                elif top in sys.stdlib_module_names or top in ("mst5_jax", "tasks"):
                    continue
                dists = {d.lower().replace("_", "-") for d in dist_of.get(top, [top])}
                if not dists & allowed:
                    missing.append(f"{mod} (from {sorted(dists)})")
    assert not missing, f"imported by the notebook but not installed by mst5_jax[{','.join(installs)}]: {missing}"
