"""Whether a collection or a store is synthetic, recorded once in the store's manifest.

``cxrflow synth`` and the small format writers of :mod:`cxrflow.testing.synthformats` mark the folders
they write (``.cxrflow-synth.json``); the ETL copies that fact into the manifest as ``synthetic``,
and stores written directly (:mod:`cxrflow.testing.synthstore`) carry it too. Every table and figure
made from such a store says so, and nothing compares its results with published ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def synthetic_record(root: str | os.PathLike) -> dict[str, Any]:
    """``{"synthetic": {...}}`` when the collection at ``root`` (or the folder above it) was written by
    cxrflow's synthetic data generators, else ``{}``: the manifest entry the ETL adds."""
    from cxrflow.outputs import read_marker

    for folder in (Path(root), Path(root).parent):
        marker = read_marker(folder, "synth")
        if marker is not None:
            return {
                "synthetic": {"generator": marker.get("generator", "cxrflow synth"), "folder": str(folder.absolute())}
            }
    return {}


def is_synthetic(manifest: dict | None) -> bool:
    """True for a store made from synthetic data (its manifest says so)."""
    return (
        bool((manifest or {}).get("synthetic"))
        or ((manifest or {}).get("split") or {}).get("mode") == "synthetic-store"
    )
