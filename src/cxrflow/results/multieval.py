"""``cxrflow evaluate --run RUN`` of a run trained on several stores: one evaluation per store.

Each store the run trained on (its config's ``stores``) is scored on the findings it labels, through
:func:`cxrflow.results.crosseval.evaluate_on_store`: the first store's evaluation goes to the run's
usual folder ``RUN/eval-<split>-<checkpoint>``, every other store's to
``RUN/eval-<store>-<split>-<checkpoint>``, as evaluations on another collection's store do. Each
store's thresholds and temperatures are fitted on that store's own val split (a split the run
validated on). Every store is checked before any is scored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cxrflow.atomic import read_json_object
from cxrflow.errors import CxrflowError
from cxrflow.runs import default_eval_dir, resolve_checkpoint


def trained_stores(run: str | os.PathLike) -> list[str]:
    """The stores of a run trained on several (from its config.json); empty for a run on one store."""
    path = Path(run) / "config.json"
    if not path.is_file():
        return []
    stores = read_json_object(path, "run config").get("stores") or []
    if not isinstance(stores, list) or not all(isinstance(s, str) for s in stores):
        raise CxrflowError("run config field 'stores' must be a list of store paths", path)
    return stores if len(stores) > 1 else []


def evaluate_on_trained_stores(
    run: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    out: str | os.PathLike | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """One evaluation per store of a multi-store ``run`` (see the module docstring); ``out`` replaces
    the first store's folder only. ``options`` go to :func:`evaluate_on_store` (n_boot, seed, device,
    batch_size, overwrite, uncertain)."""
    from cxrflow.data.store import read_manifest
    from cxrflow.results.crosseval import evaluate_on_store

    stores = trained_stores(run)
    if not stores:
        raise CxrflowError("the run was trained on one store; evaluate it without this option", run)
    name, _ = resolve_checkpoint(run, checkpoint)
    for store in stores:  # a store that moved or went is named before anything is scored
        try:
            read_manifest(store)
        except CxrflowError as exc:
            raise CxrflowError(
                f"{exc.message}; the run was trained on it. Evaluate the others one by one with --store",
                exc.path,
            ) from None
    first = Path(out) if out is not None else default_eval_dir(run, split, name)
    return [
        evaluate_on_store(run, store, checkpoint=checkpoint, split=split, out=first if i == 0 else None, **options)
        for i, store in enumerate(stores)
    ]
