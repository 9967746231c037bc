"""The cross-collection table: runs (with the stores they trained on) against the stores they were scored on.

Drawn by ``cxrflow report`` (``cross.md``, ``cross.csv`` and a section of ``report.html``) when its
evaluations include one run scored on several stores (``evaluate --store OTHER`` writes
``RUN/eval-<store>-<split>-<checkpoint>``, :mod:`cxrflow.results.crosseval`). One row per run and
checkpoint, one column per test store; a cell is the mean AUC over the findings that run and that
store share (the evaluation's scored findings), with its 95% patient-bootstrap interval and the
number of findings. Below it, per finding, each store's AUC and interval; and the drop from a run's
own collection to each other collection in words, both means taken over the same shared findings
(the evaluation's own interval when its mean is over exactly those findings, else one from its
``predictions.parquet`` with the same patient bootstrap, :func:`cxrflow.metrics.bootstrap_auc_ci`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrflow import csvsafe, safeio
from cxrflow.results.crosseval import on_other_collection, trained_stores
from cxrflow.results.table import STAGE_TITLES, model_title

CROSS_MD = "cross.md"
CROSS_CSV = "cross.csv"


@dataclass
class Cell:
    """One evaluation of a run on one store."""

    store: str
    own: bool
    metrics: dict
    folder: Path
    scored: list[str] = field(default_factory=list)  # findings with an AUC, in the model's order

    @property
    def mean(self) -> float | None:
        return self.metrics.get("mean_auc")

    @property
    def ci(self) -> list[float] | None:
        return self.metrics.get("mean_auc_ci95")


# --------------------------------------------------------------------------------------------------
# gathering


def _store_key(metrics: dict) -> str:
    """Evaluations of one store share a column: the identity of its scored split, else its path."""
    identity = (metrics.get("store_identity") or {}).get(str(metrics.get("split")))
    return identity or str(Path(str(metrics.get("store") or "?")).resolve())


def _run_of(folder: Path, metrics: dict) -> str:
    """The run an evaluation belongs to: the run folder holding it (a run copied or moved keeps its
    evaluations), else the run it records."""
    if (folder.parent / "config.json").is_file():
        return str(folder.parent.resolve())
    return str(metrics.get("run"))


def _row_label(m: dict) -> str:
    stage = STAGE_TITLES.get(str(m.get("stage")), str(m.get("stage")))
    return f"{model_title(str(m.get('model')), str(m.get('fusion') or 'none'))} {m.get('size')}px {stage}"


def gather(sources: Sequence[str | Path]) -> dict[str, Any] | None:
    """The table's content from the evaluations' ``metrics.json`` files, or None when no run was
    scored on more than one store (ensembles are left out: they are rows of Table 1)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    columns: dict[str, dict[str, Any]] = {}
    for source in map(Path, sources):
        m = safeio.read_json(source, "evaluation")
        if m.get("kind") == "ensemble":
            continue
        key, store = (_run_of(source.parent, m), str(m.get("checkpoint"))), _store_key(m)
        paths, _ = trained_stores(m, Path(key[0]))
        row = rows.setdefault(key, {
            "run": m.get("run_name") or Path(key[0]).name, "run_path": key[0], "checkpoint": key[1],
            "label": _row_label(m), "trained_on": [Path(p).name for p in paths] or ["?"], "cells": {},
        })  # fmt: skip
        column = columns.setdefault(store, {"key": store, "path": str(m.get("store") or ""), "own_of": []})
        own = not on_other_collection(m, Path(key[0]))
        if own:
            column["own_of"].append(row["run"])
        scored = [n for n in m.get("label_names") or [] if (m.get("auc") or {}).get(n) is not None]
        row["cells"][store] = Cell(store, own, m, source.parent, scored)
    if not any(len(r["cells"]) > 1 for r in rows.values()):
        return None
    _name_columns(list(columns.values()))
    ordered = sorted(columns.values(), key=lambda c: (not c["own_of"], c["name"]))
    return {"columns": ordered, "rows": list(rows.values())}


def _name_columns(columns: list[dict]) -> None:
    """A column is named by its store's folder; two folders of one name add their parent's."""
    names = [Path(c["path"]).name or "?" for c in columns]
    for c, name in zip(columns, names):
        c["name"] = name if names.count(name) == 1 else f"{Path(c['path']).parent.name}/{name}"


# --------------------------------------------------------------------------------------------------
# the drop from a run's own collection to another


def mean_over(cell: Cell, findings: Sequence[str]) -> tuple[float | None, list[float] | None]:
    """Mean AUC of ``cell`` over ``findings`` and its 95% patient-bootstrap interval: the evaluation's
    own when its mean is over exactly these findings, else from its predictions with the same
    bootstrap settings (None interval when the predictions are not there)."""
    if not findings:
        return None, None
    aucs = cell.metrics.get("auc") or {}
    point = float(sum(aucs[n] for n in findings) / len(findings))
    if set(findings) == set(cell.scored):
        return cell.mean, cell.ci
    return point, _interval_from_predictions(cell, findings)


def _interval_from_predictions(cell: Cell, findings: Sequence[str]) -> list[float] | None:
    import numpy as np

    from cxrflow.metrics import bootstrap_auc_ci
    from cxrflow.runs import PREDICTIONS_NAME, read_predictions

    try:
        pred, names = read_predictions(cell.folder / PREDICTIONS_NAME)
    except (OSError, ValueError, KeyError):
        return None
    if not set(findings) <= set(names):
        return None
    cols = [names.index(n) for n in findings]
    boot = cell.metrics.get("bootstrap") or {}
    known = pred.get("known")
    ci = bootstrap_auc_ci(
        pred["labels"][:, cols], pred["probs"][:, cols], pred["patient_id"], n_boot=int(boot.get("n_boot", 1000)),
        seed=int(boot.get("seed", 0)), known=None if known is None else np.asarray(known)[:, cols],
    )  # fmt: skip
    return ci["mean_auc_ci"]


def drops(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Per run, each own collection against each other collection, over their shared findings."""
    names = {c["key"]: c["name"] for c in table["columns"]}
    out = []
    for row in table["rows"]:
        owns = [c for c in row["cells"].values() if c.own]
        for own in owns:
            for other in (c for c in row["cells"].values() if not c.own):
                shared = [n for n in other.scored if n in own.scored]
                own_mean, own_ci = mean_over(own, shared)
                other_mean, other_ci = mean_over(other, shared)
                if own_mean is None or other_mean is None:
                    continue
                where = "its own" if len(owns) == 1 else f"{names[own.store]}'s"
                text = (f"{row['label']} trained on {' + '.join(row['trained_on'])}: {own_mean:.2f} on {where} "
                        f"{own.metrics.get('split', 'test')} split, {other_mean:.2f} on {names[other.store]} "
                        f"({other_mean - own_mean:+.2f} over {len(shared)} shared finding{'s' if len(shared) != 1 else ''})")  # fmt: skip
                out.append({"run": row["run"], "checkpoint": row["checkpoint"], "own": names[own.store],
                            "other": names[other.store], "findings": shared, "own_mean": own_mean,
                            "own_ci": own_ci, "other_mean": other_mean, "other_ci": other_ci,
                            "drop": other_mean - own_mean, "text": text})  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# as data for the page, Markdown and CSV


def cross_table(sources: Sequence[str | Path]) -> dict[str, Any] | None:
    """Everything the cross-collection table shows, or None when no run was scored on several stores."""
    table = gather(sources)
    if table is None:
        return None
    table["drops"] = drops(table)
    table["details"] = [_detail(row, table["columns"]) for row in table["rows"]]
    table["synthetic"] = any(c.metrics.get("synthetic") for r in table["rows"] for c in r["cells"].values())
    return table


def _detail(row: dict, columns: list[dict]) -> dict[str, Any]:
    """Per finding of a run: each store's AUC and interval, or why there is none."""
    mine = [c for c in columns if c["key"] in row["cells"]]
    findings: list[str] = []
    for c in mine:
        cell = row["cells"][c["key"]]
        findings += [n for n in cell.metrics.get("model_label_names") or cell.metrics.get("label_names") or []
                     if n not in findings]  # fmt: skip
    lines = []
    for n in findings:
        values = []
        for c in mine:
            m = row["cells"][c["key"]].metrics
            auc, ci = (m.get("auc") or {}).get(n), (m.get("auc_ci95") or {}).get(n)
            why = (
                "not labelled" if n in (m.get("not_labelled") or []) or n not in (m.get("label_names") or []) else "n/a"
            )
            values.append({"auc": auc, "ci": ci, "why": None if auc is not None else why})
        lines.append({"finding": n, "values": values})
    return {"run": row["run"], "label": row["label"], "columns": [c["name"] for c in mine], "findings": lines}


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(ci: Sequence[float] | None) -> str:
    return f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else ""


def format_markdown(table: dict[str, Any]) -> str:
    """``cross.md``: the matrix, the drops in words, and the per-finding detail."""
    cols = table["columns"]
    lines = ["# Does it travel? Mean AUC of each run on each store" + (" (synthetic data)" if table["synthetic"] else ""), "",
             "Each cell: mean ROC AUC over the findings that run and that store share, its 95% patient-bootstrap",
             "interval, and the number of findings in the mean. *own* marks a store the run was trained on.", "",
             "| Run | Trained on | " + " | ".join(c["name"] for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]  # fmt: skip
    for row in table["rows"]:
        cells = []
        for c in cols:
            cell = row["cells"].get(c["key"])
            cells.append("—" if cell is None else f"{_num(cell.mean)}{_ci(cell.ci)} ({len(cell.scored)})"
                         + (" *own*" if cell.own else ""))  # fmt: skip
        lines.append(f"| {row['run']} ({row['label']}) | {' + '.join(row['trained_on'])} | " + " | ".join(cells) + " |")
    if table["drops"]:
        lines += ["", "## From the run's own collection to another", ""]
        lines += [f"- {d['text']}" for d in table["drops"]]
    for detail in table["details"]:
        lines += ["", f"## {detail['run']} ({detail['label']}): AUC per finding and store", "",
                  "| Finding | " + " | ".join(detail["columns"]) + " |", "|---|" + "---:|" * len(detail["columns"])]  # fmt: skip
        for f in detail["findings"]:
            values = [v["why"] if v["why"] else f"{_num(v['auc'])}{_ci(v['ci'])}" for v in f["values"]]
            lines.append(f"| {f['finding']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def format_csv(table: dict[str, Any]) -> str:
    """``cross.csv``: one row per run, store and finding; finding ``mean`` is the matrix's cell."""
    names = {c["key"]: c["name"] for c in table["columns"]}
    buf = io.StringIO()
    w = csvsafe.writer(buf, lineterminator="\n")
    w.writerow(["run", "checkpoint", "model", "trained_on", "test_store", "own_collection", "split", "finding",
                "n_findings", "auc", "ci95_low", "ci95_high"])  # fmt: skip

    def number(x: Any) -> str:
        return "" if x is None else repr(float(x))

    for row in table["rows"]:
        for key, cell in row["cells"].items():
            head = [row["run"], row["checkpoint"], row["label"], ";".join(row["trained_on"]), names[key],
                    str(cell.own).lower(), cell.metrics.get("split")]  # fmt: skip
            ci = cell.ci or [None, None]
            w.writerow([*head, "mean", len(cell.scored), number(cell.mean), number(ci[0]), number(ci[1])])
            for n in cell.metrics.get("label_names") or []:
                auc, fci = (
                    (cell.metrics.get("auc") or {}).get(n),
                    (cell.metrics.get("auc_ci95") or {}).get(n) or [None, None],
                )
                w.writerow([*head, n, 1, number(auc), number(fci[0]), number(fci[1])])
    return buf.getvalue()
