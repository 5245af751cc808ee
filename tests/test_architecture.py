"""The layer map of docs/DEVELOPING.md, checked on the source: the import graph is acyclic
and every import points down the layers.

The graph is built with `ast` from every module under mst5_jax/ and tasks/, counting
imports inside functions too (a lazy import is still a dependency).
"""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Layer of each package, and the layers it may import. A module may also import modules of
# its own package.
LAYERS = {
    "mst5_jax.utils": "utils",
    "mst5_jax.datasets": "utils",
    "mst5_jax.evals": "evals",
    "mst5_jax.core": "core",
    "mst5_jax.formats": "formats",
    "mst5_jax.inference": "inference",
    "tasks": "data",
    "mst5_jax.training": "training",
    "mst5_jax.analysis": "analysis",
}
MAY_IMPORT = {
    "utils": {"utils"},
    "evals": {"utils"},
    "core": {"utils"},
    "formats": {"utils", "core"},
    "inference": {"utils", "core", "formats", "evals"},
    "data": {"utils", "formats"},
    "training": {"utils", "core", "formats", "inference", "evals", "data"},
    "analysis": {"utils", "evals"},
    "entry": {"utils", "core", "formats", "inference", "evals", "data", "training", "analysis", "entry"},
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    for prefix, layer in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "entry"  # mst5_jax itself and the `python -m mst5_jax.X` modules


def project_modules() -> dict[str, pathlib.Path]:
    files = [*REPO.joinpath("mst5_jax").rglob("*.py"), *REPO.joinpath("tasks").rglob("*.py")]
    return {module_name(p): p for p in files}


def imports_of(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """Project modules that `path` imports (`from pkg import mod` counts as pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    g = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
    # A package's __init__ is imported on the way to any of its modules; that edge is not a
    # dependency of the importing module on the package's other contents.
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}


def test_import_graph_is_acyclic():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_imports_point_down_the_layers():
    bad = []
    for m, deps in sorted(graph().items()):
        layer = layer_of(m)
        for d in sorted(deps):
            if layer_of(d) not in MAY_IMPORT[layer] | {layer}:
                bad.append(f"{m} ({layer}) imports {d} ({layer_of(d)})")
    assert not bad, "imports against the layer map (docs/DEVELOPING.md):\n" + "\n".join(bad)


def test_core_never_imports_formats_training_or_entry_points():
    for m, deps in graph().items():
        if layer_of(m) == "core":
            assert all(layer_of(d) in ("core", "utils") for d in deps), (m, deps)


def test_every_package_is_mapped():
    packages = {module_name(p.parent) for p in REPO.joinpath("mst5_jax").rglob("__init__.py")}
    unmapped = sorted(p for p in packages if p not in LAYERS and p != "mst5_jax" and p != "mst5_jax.gin_configs")
    assert not unmapped, f"packages with no layer in tests/test_architecture.py LAYERS: {unmapped}"


HARDWARE_KEYS = {"NUM_DEVICES", "DEVICE_MEMORY_GIB", "TrainConfig.mesh", "TrainConfig.partition_preset",
                 "TrainConfig.peak_tflops"}


def test_hardware_gin_files_say_only_hardware_things():
    """Mesh, device count and memory, peak FLOP/s; the recipe (remat, dtypes, batch) is the run file's."""
    files = sorted(REPO.joinpath("gin", "hardware").glob("*.gin"))
    assert files
    for f in files:
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key = line.split("=", 1)[0].strip()
            assert key in HARDWARE_KEYS or key.startswith("MeshConfig."), f"{f.name}:{lineno}: {key} is not hardware"
