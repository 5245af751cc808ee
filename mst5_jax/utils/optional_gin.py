"""gin-config is an extra: modules register configurables only when it is really installed.

Running from the source tree puts the repository root on sys.path, and its `gin/` folder
(configs, no `__init__.py`) then imports as an empty namespace package named `gin` where
gin-config is absent (the GPU image, the Python 3.12 check venv). `gin_or_none` tells the
two apart.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional


def gin_or_none() -> Optional[ModuleType]:
    """The gin-config module, or None when it is not installed."""
    try:
        import gin
    except ImportError:
        return None
    return gin if hasattr(gin, "external_configurable") else None
