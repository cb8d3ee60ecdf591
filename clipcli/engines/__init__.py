"""Engines that compute image features for a run: `local` (pipeline.Session, this process) and `ray` (engines/ray.py,
a Ray cluster). This package only names them and loads the Ray engine on demand; it imports no ray itself."""

from __future__ import annotations

from types import ModuleType

from clipcli.errors import UsageError

RAY_INSTALL = "pip install 'clipcli[ray]'"
_EXTRA = ("ray", "pyarrow", "pandas")  # what the extra installs (ray[data] brings pandas)


def ray_engine() -> ModuleType:
    """The Ray engine module (clipcli.engines.ray); UsageError naming the extra when ray[data] or pyarrow is missing."""
    try:
        from clipcli.engines import ray
    except ImportError as err:
        missing = err.name or "ray"
        if missing.split(".")[0] not in _EXTRA:
            raise  # a module of ours: a bug, with its traceback
        raise UsageError(f"--engine ray needs Ray Data, which is not installed ({missing} is missing); "
                         f"{RAY_INSTALL}, or use --engine local") from None
    return ray
