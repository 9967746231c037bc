"""The localization part of ``report.html`` (:mod:`cxrflow.results.htmlreport`): a run's ``localize-*``
outputs (``cxrflow localize``'s ``localization.json``) as tables and heatmap galleries, leaving out, with
a one-line note, those made from a checkpoint the run no longer holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrflow.results.study import figure, read_json


def current_localizations(run: Path) -> tuple[list[tuple[Path, dict]], list[dict[str, Any]]]:
    """The ``localize-*`` outputs of a run made from the checkpoints it holds now, as (path, content),
    and the others as ``{"folder", "error", "stale"}``: unreadable, or (``stale``) made from a
    checkpoint the run no longer holds (:func:`cxrflow.results.localize.localization_status`)."""
    from cxrflow.results.localize import localization_status

    found, left_out = [], []
    for path in sorted(run.glob("localize-*/localization.json")):
        loc, why = read_json(path)
        if loc is None:
            left_out.append({"folder": str(path.parent), "error": f"{path.name} is {why}", "stale": False})
            continue
        stale = localization_status(path, loc)
        if stale is not None:
            left_out.append(
                {
                    "folder": str(path.parent),
                    "stale": True,
                    "error": f"Left out, not made from the checkpoint the run holds now: {stale}",
                }
            )
            continue
        found.append((path, loc))
    return found, left_out


def localization_parts(run: Path) -> list[dict[str, Any]]:
    """Every ``localize-*`` folder of a run (``cxrflow localize``'s ``localization.json``), as tables and galleries;
    one made from an older checkpoint is left out with a one-line note saying why."""
    found, parts = current_localizations(run)
    for path, loc in found:
        thresholds = sorted((loc.get("accuracy_iobb") or {}), key=float)
        iou = loc.get("accuracy_iou") or {}
        iou_thresholds = sorted(iou, key=float)
        names = [n for n in next(iter((loc.get("accuracy_iobb") or {}).values()), {}) if n != "overall"]
        base = (loc.get("baseline") or {}).get("accuracy_iobb") or {}
        n_boxes = dict(loc.get("n_boxes") or {})
        n_boxes.setdefault("overall", sum(v for v in n_boxes.values() if isinstance(v, int)) if n_boxes else None)
        rows = [
            {
                "name": n,
                "iobb": [(loc["accuracy_iobb"].get(t) or {}).get(n) for t in thresholds],
                "iou": [(iou.get(t) or {}).get(n) for t in iou_thresholds],
                "baseline": [(base.get(t) or {}).get(n) for t in thresholds],
                "n_boxes": n_boxes.get(n),
                "fp_per_image": (loc.get("fp_per_image") or {}).get(n),
            }
            for n in [*names, "overall"]
        ]
        figures = [
            figure(
                path.parent / name,
                f"Heatmaps of {loc.get('method', 'class activation')} with the annotated boxes ({name})",
            )
            for name in (loc.get("figures") or [])
        ]
        parts.append(
            {
                "folder": str(path.parent),
                "method": loc.get("method"),
                "split": loc.get("split"),
                "checkpoint": loc.get("checkpoint"),
                "thresholds": thresholds,
                "iou_thresholds": iou_thresholds,
                "rows": rows,
                "wang2017": loc.get("wang2017"),
                "unscored": len(loc.get("unscored") or []),
                "figures": figures,
            }
        )
    return sorted(parts, key=lambda part: part["folder"])
