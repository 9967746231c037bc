"""cxrflow: chest X-ray collections from raw images to an evaluated multi-label classifier.

The Python API (``cxrflow.load_model``, ``cxrflow.open_store``; see :mod:`cxrflow.results.api`)
is imported on first use, so ``import cxrflow`` stays light (no torch, pyarrow or pandas).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public names served lazily from :mod:`cxrflow.results.api`.
_API = ("load_model", "open_store", "Model", "Store", "Heatmap")
__all__ = ["Heatmap", "Model", "Store", "__version__", "load_model", "open_store"]

if TYPE_CHECKING:
    from cxrflow.results.api import Heatmap, Model, Store, load_model, open_store


def __getattr__(name: str) -> Any:
    if name in _API:
        from cxrflow.results import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cxrflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
