"""Shared test set-up.

XLA_FLAGS must be set before jax is imported anywhere, so that sharding tests see 8 fake CPU
devices. Subprocess tests inherit it; the ones that need another device count set it
explicitly.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "tests"


def data_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MST5_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The real shared datasets. Missing data fails in CI (CI=true) and skips elsewhere."""
    root = data_root()
    if not (root / "xnli").is_dir():
        msg = f"shared data not found at {root} (set MST5_DATA_DIR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def cache_dir() -> pathlib.Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR
