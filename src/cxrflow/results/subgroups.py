"""The subgroup audit inside ``cxrflow evaluate``: attributes from the store, ``subgroups.csv``, forest plots.

:func:`store_attributes` reads the store's ``age``, ``sex`` and ``view`` of the evaluated images (no
pixels); :func:`audit_evaluation` runs :func:`cxrflow.results.audit.run_audit` with the evaluation's
operating thresholds and bootstrap, writes ``subgroups.csv`` and one forest plot per attribute
(``subgroups-<attribute>.png``) into the evaluation folder and returns the summary for
``metrics.json["audit"]``. :func:`plot_forest` draws one attribute: AUC and 95% interval per group
and finding, the whole split's AUC as a line, flagged gaps marked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxrflow.names import printable
from cxrflow.results.audit import ANY, CSV_NAME, make_attributes, run_audit

#: Store columns the audit reads.
ATTRIBUTE_COLUMNS = ("age", "sex", "view")


def data_words(manifest: dict | None) -> str:
    """What a title adds after a model's name: " (synthetic data)" for a synthetic store, else nothing."""
    from cxrflow.data.synthetic import is_synthetic

    return " (synthetic data)" if is_synthetic(manifest) else ""


def store_attributes(
    store: str | os.PathLike, size: int, split: str, image_ids: Sequence[str]
) -> dict[str, np.ndarray]:
    """``{"age", "sex", "view"}`` of ``image_ids`` (in that order) from one store partition; an id
    not in the store gets unknown values (age -1, sex and view None)."""
    import pyarrow.dataset as ds

    from cxrflow.data.store import split_dir

    table = ds.dataset(split_dir(store, size, split), format="parquet").to_table(
        columns=["image_id", *ATTRIBUTE_COLUMNS]
    )
    where = {image_id: i for i, image_id in enumerate(table.column("image_id").to_pylist())}
    index = np.array([where.get(str(i), -1) for i in image_ids], dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for name in ATTRIBUTE_COLUMNS:
        values = np.array(table.column(name).to_pylist() + [None], dtype=object)
        out[name] = values[index]  # -1 picks the trailing None
    out["age"] = np.array([-1 if a is None else int(a) for a in out["age"]], dtype=np.int64)
    return out


def attach_attributes(
    store, size: int, split: str, evaluated: dict, validation: dict, metrics: dict, manifest: dict, what: str
) -> str:
    """Add the store's ``age``, ``sex`` and ``view`` to both prediction dicts (they go into the
    predictions files), record in ``metrics`` whether the store is synthetic, and return ``what``
    (the model's name in titles) with " (synthetic data)" added for a synthetic store."""
    for part, part_split in ((evaluated, split), (validation, "val")):  # one dict when the split is val
        part.update(store_attributes(store, size, part_split, part["image_id"]))
    metrics["synthetic"] = bool(data_words(manifest))
    return what + data_words(manifest)


def audit_evaluation(
    folder: Path,
    evaluated: dict[str, Any],
    label_names: Sequence[str],
    metrics: dict[str, Any],
    *,
    fpr: float = 0.2,
    what: str = "",
) -> dict[str, Any]:
    """Audit one evaluation (``evaluated`` holds ``age``, ``sex``, ``view`` per image); write
    ``subgroups.csv`` and the forest plots into ``folder``; return ``metrics.json["audit"]``."""
    from cxrflow.atomic import write_text_atomic
    from cxrflow.results.audit import csv_text

    attributes, skipped = make_attributes(evaluated["age"], evaluated["sex"], evaluated["view"])
    boot = metrics.get("bootstrap") or {}
    thresholds = [
        math.nan if (metrics.get("threshold") or {}).get(n) is None else metrics["threshold"][n] for n in label_names
    ]
    known = evaluated.get("known") if metrics.get("excluded_unknown") else None
    result = run_audit(
        evaluated["labels"], evaluated["probs"], evaluated["patient_id"], label_names, attributes, thresholds,
        known=known, n_boot=int(boot.get("n_boot", 1000)), seed=int(boot.get("seed", 0)), fpr=fpr, skipped=skipped,
    )  # fmt: skip
    summary = result["summary"]
    write_text_atomic(folder / CSV_NAME, csv_text(result["rows"]))
    figures = []
    for attribute in summary["attributes"]:
        name = f"subgroups-{attribute.replace(' x ', '-')}.png"
        split = metrics.get("split", "test")
        fig = plot_forest(
            result["rows"], attribute, summary["overall_auc"], title=f"AUC by {attribute}, {what}, {split} split"
        )
        fig.savefig(folder / name, dpi=100)
        figures.append({"attribute": attribute, "file": name})
    summary["figures"] = figures
    return summary


def ensemble_audit(fpr: float = 0.2):
    """The subgroup audit of an ensemble, as :func:`cxrflow.modelling.ensemble.build_ensemble` calls it
    (``audit=``) before writing the ensemble's files: each image's ``age``, ``sex`` and ``view`` from its
    first member's predictions (the store's values, as that evaluation recorded them; else from the
    store), the audit into the folder and ``metrics["audit"]``. Returns what figure titles add
    (" (synthetic data)" for a synthetic store)."""

    def audit(folder: Path, evaluated: dict, validation: dict, names: Sequence[str], metrics: dict) -> str:
        words = _ensemble_attributes(evaluated, validation, metrics)
        if words is None:
            metrics["audit"] = None
            metrics["audit_note"] = ("no subgroup audit: the members' predictions carry no age, sex and view and "
                                     f"the store {metrics.get('store')} cannot be read")  # fmt: skip
            return ""
        what = f"{metrics.get('model')} of {len(metrics.get('members') or [])} runs{words}"
        metrics["audit"] = audit_evaluation(folder, evaluated, names, metrics, fpr=fpr, what=what)
        return words

    return audit


def _ensemble_attributes(evaluated: dict, validation: dict, metrics: dict) -> str | None:
    """Add ``age``, ``sex`` and ``view`` to the ensemble's predictions; the title words, or None when
    neither the first member's predictions nor the store give them."""
    import pyarrow.parquet as pq

    from cxrflow.data.store import read_manifest
    from cxrflow.errors import CxrflowError
    from cxrflow.runs import PREDICTIONS_NAME, VAL_PREDICTIONS_NAME

    first = Path(str((metrics.get("members") or [{}])[0].get("eval")))
    try:
        manifest = read_manifest(metrics.get("store") or "")
    except CxrflowError:
        manifest = None
    for part, name in ((evaluated, PREDICTIONS_NAME), (validation, VAL_PREDICTIONS_NAME)):
        try:
            table = pq.read_table(first / name, columns=["image_id", *ATTRIBUTE_COLUMNS])
        except (OSError, KeyError, ValueError):
            table = None
        if table is not None:
            where = {image_id: i for i, image_id in enumerate(table.column("image_id").to_pylist())}
            rows = np.array([where[i] for i in part["image_id"]])
            part.update({c: np.array(table.column(c).to_pylist(), dtype=object)[rows] for c in ATTRIBUTE_COLUMNS})
            part["age"] = np.array([-1 if a is None else int(a) for a in part["age"]], dtype=np.int64)
        elif manifest is not None:
            size = int((metrics.get("members") or [{}])[0].get("size") or min(map(int, manifest.get("sizes") or [0])))
            split = metrics.get("split", "test") if part is evaluated else "val"
            part.update(store_attributes(metrics["store"], size, split, part["image_id"]))
        else:
            return None
    from cxrflow.data.synthetic import is_synthetic

    metrics["synthetic"] = bool(metrics.get("synthetic")) or is_synthetic(manifest)
    return " (synthetic data)" if metrics["synthetic"] else ""


def format_audit(audit: dict[str, Any] | None) -> str:
    """A few lines for the terminal: how many gaps were tested and flagged (each in words), what was skipped."""
    if not audit:
        return "subgroup audit: skipped (--no-audit)"
    gaps = audit["gaps"]
    lines = [f"subgroup audit ({', '.join(audit['attributes'])}): {gaps['flagged']} of {gaps['tests']} gaps flagged"
             f" (simultaneous {100 * (gaps['level'] or 0.95):.2f}% intervals); {audit['file']}"]  # fmt: skip
    lines += [f"  {f['text']}" for f in audit["flagged"]]
    lines += [f"  not audited by {name}: {why}" for name, why in audit["skipped"].items()]
    return "\n".join(map(printable, lines))  # finding and group names are data: never terminal controls


def plot_forest(
    rows: Sequence[dict[str, Any]],
    attribute: str,
    overall: dict[str, float | None],
    *,
    title: str = "AUC by group",
    ax: Axes | None = None,
) -> Figure:
    """Forest plot of one attribute: per finding, each group's AUC with its 95% interval (hollow:
    fewer than 10 positives or negatives), the whole split's AUC as a vertical line, flagged gaps in
    vermillion with a diamond."""
    chosen = [r for r in rows if r["attribute"] == attribute and r["finding"] != ANY]
    findings = list(dict.fromkeys(r["finding"] for r in chosen))
    if ax is None:
        fig = Figure(figsize=(8.0, 1.2 + 0.17 * (len(chosen) + len(findings))), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    fig = ax.figure
    y = 0.0
    ticks, labels = [], []
    for finding in findings:
        top = y
        for r in (r for r in chosen if r["finding"] == finding):
            auc, low, high = (float("nan") if r[k] is None else float(r[k]) for k in ("auc", "auc_low", "auc_high"))
            colour = "#D55E00" if r["flagged"] else "#0072B2"
            if math.isfinite(low) and math.isfinite(high):
                ax.plot([low, high], [y, y], color=colour, lw=1.4)
            marker = "D" if r["flagged"] else "o"
            face = "none" if r["too_small"] else colour
            if math.isfinite(auc):
                ax.plot([auc], [y], marker=marker, ms=5, color=colour, mfc=face)
            ticks.append(y)
            labels.append(
                f"{finding}: {r['group']} (n={r['n_images']}, pos={r['n_positive']})"
                + (" FLAGGED" if r["flagged"] else "")
            )
            y -= 1.0
        whole = overall.get(finding)
        if whole is not None:
            ax.plot([whole, whole], [top + 0.4, y + 0.6], color="0.35", ls="--", lw=1)
        y -= 0.6
    ax.set_yticks(ticks, labels, fontsize=6.5)
    lows = [float(r["auc_low"]) for r in chosen if r["auc_low"] is not None and math.isfinite(float(r["auc_low"]))]
    ax.set_xlim(min([0.5, *lows]) - 0.02, 1.005)
    ax.axvline(0.5, color="0.7", lw=0.8)
    ax.set_xlabel(
        "ROC AUC with its 95% patient-bootstrap interval\n(dashed: the finding's AUC on the whole split; grey: chance)"
    )
    ax.set_ylabel(f"Finding and {attribute} group")
    ax.set_title(
        title + "\n(diamond, vermillion: gap to the rest flagged; hollow: under 10 positives or negatives)", fontsize=9
    )
    ax.grid(axis="x", alpha=0.3)
    return fig
