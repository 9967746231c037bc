"""The rows of the paper's Table 1 over several evaluated runs, as Markdown and CSV.

Inputs are evaluation folders written by ``cxrflow evaluate`` (holding ``metrics.json``), or run
folders, in which case every ``eval-<split>-*/`` evaluation inside is used (a two-stage run evaluated
at ``best_kt`` and ``best_finetune`` gives two rows, KT and fine-tuned, like the paper). One row per
evaluation: model, size, stage, mean AUC with its 95% patient-bootstrap interval, the paper's
published mean AUC for the same configuration (reference column), the mean expected calibration
error (after the evaluation's temperature scaling, and raw) and the per-finding AUCs; the best row is
marked. An ensemble folder (``cxrflow ensemble``) is one row of its own, with its members named. A run that fuses demographics is its own row, its model named
"+ demographics". ``cxrflow report`` (:mod:`cxrflow.results.report`) writes them beside ``report.html``
(:mod:`cxrflow.results.htmlreport`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrflow import csvsafe, safeio
from cxrflow.errors import CxrflowError
from cxrflow.results.crosseval import on_other_collection
from cxrflow.runs import METRICS_NAME, check_metrics, evaluation_run, evaluation_status

#: The paper's published mean test AUCs (Table 1), by (model, input size, stage).
#: A size of None matches any input size (the paper's simple CNN, a single-stage model).
PAPER_MEAN_AUC: dict[tuple[str, int | None, str], float] = {
    ("simple_cnn", None, "finetune"): 0.6329,
    ("resnet50", 256, "kt"): 0.6663,
    ("resnet50", 256, "finetune"): 0.6670,
    ("resnet50", 512, "kt"): 0.6868,
    ("resnet50", 512, "finetune"): 0.6901,
    ("densenet121", 256, "kt"): 0.6842,
    ("densenet121", 256, "finetune"): 0.6843,
    ("densenet121", 512, "kt"): 0.6977,
    ("densenet121", 512, "finetune"): 0.6978,
}
STAGE_TITLES = {"kt": "KT", "finetune": "fine-tuned"}
#: How a fusion is named after the model's title ("none": image only, nothing added).
FUSION_TITLES = {"demographics": " + demographics"}
TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
COMPARISON_PNG = "comparison.png"


def paper_mean_auc(model: str, size: int | None, stage: str) -> float | None:
    """The paper's mean AUC for this configuration, or None when the paper has no such run."""
    if (model, None, stage) in PAPER_MEAN_AUC:
        return PAPER_MEAN_AUC[(model, None, stage)]
    return PAPER_MEAN_AUC.get((model, None if size is None else int(size), stage))


def model_title(model: str, fusion: str = "none") -> str:
    """``DenseNet-121`` (the title in the model's registry entry), or ``DenseNet-121 + demographics``
    for a fused run."""
    from cxrflow.modelling.registry import model_title as registered_title

    return registered_title(model) + FUSION_TITLES.get(fusion, "" if fusion == "none" else f" + {fusion}")


def find_evaluations(paths: Sequence[str | os.PathLike], split: str = "test") -> list[Path]:
    """The ``metrics.json`` files named by ``paths`` (evaluation folders, run folders or files).

    A run folder contributes its ``eval-<split>-*`` folders, KT before fine-tuned, then its
    evaluations on other stores (``eval-<store>-<split>-*``, written by ``evaluate --store OTHER``). A
    path with no evaluation is an error naming it (so a missing run is never silently left out of the table).
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == METRICS_NAME:
            found.append(p)
        elif (p / METRICS_NAME).is_file():
            found.append(p / METRICS_NAME)
        elif p.is_dir():
            inner = sorted(
                p.glob(f"eval-{split}-*/{METRICS_NAME}"),
                key=lambda m: (0 if m.parent.name.endswith("best_kt") else 1, m.parent.name),
            )
            inner += [m for m in sorted(p.glob(f"eval-*-{split}-*/{METRICS_NAME}")) if m not in inner
                      and _on_store_named(m, split)]  # fmt: skip
            if not inner:
                raise CxrflowError(
                    f"no evaluation on split {split!r} here (expected {METRICS_NAME}, eval-{split}-*/ or "
                    f"eval-<store>-{split}-*/; run 'cxrflow evaluate --run {p}' first)",
                    p,
                )
            found.extend(inner)
        else:
            raise CxrflowError("no such run or evaluation folder", p)
    return found


def _on_store_named(metrics_path: Path, split: str) -> bool:
    """Whether ``eval-<store>-<split>-<checkpoint>/metrics.json`` is an evaluation on that split (a store
    whose name holds ``-<split>-`` does not make another split's evaluation one); an unreadable one is
    kept, so that the table names it."""
    try:
        m = safeio.read_json(metrics_path, "evaluation")
    except (OSError, ValueError, RecursionError):
        return True
    if not isinstance(m, dict):
        return True
    return m.get("split") == split and metrics_path.parent.name.endswith(f"-{split}-{m.get('checkpoint')}")


def load_row(metrics_path: Path) -> dict[str, Any]:
    """One table row from an evaluation's ``metrics.json``."""
    try:
        m = safeio.read_json(metrics_path, "evaluation")
    except (OSError, ValueError) as exc:
        raise CxrflowError(f"unreadable evaluation: {exc}", metrics_path) from None
    check_metrics(m, metrics_path)
    stale = evaluation_status(metrics_path, m)
    if stale is not None:  # a number in the table must belong to the model the run holds now
        raise CxrflowError(stale, Path(metrics_path).parent)
    model = m.get("model", "?")
    fusion = m.get("fusion") or "none"
    size = m.get("size")
    stage = m.get("stage") or (m.get("method", "?") if m.get("kind") == "ensemble" else "?")
    ci = m.get("mean_auc_ci95") or [None, None]
    ensemble = m.get("kind") == "ensemble"
    if ensemble:
        size = "/".join(map(str, size)) if isinstance(size, list) else size
        members = list(m.get("member_names") or [Path(e.get("eval", "?")).parent.name for e in m.get("members", [])])
        label = f"Ensemble ({m.get('method')}) of {' + '.join(members)}"
    else:
        members = []
        label = f"{model_title(model, fusion)} {size}px {STAGE_TITLES.get(stage, stage)}"
    run = Path(metrics_path).parent.parent  # the run folder holding the evaluation, when it is one
    other = on_other_collection(m, run if (run / "config.json").is_file() else None)  # never the paper's numbers
    label += f" on {Path(str(m.get('store') or '')).name}" if other else ""
    paper = None if ensemble or other or m.get("synthetic") else paper_mean_auc(model, size, stage)
    mean = m["mean_auc"]
    ece = (m.get("calibration") or {}).get("ece_mean") or {}
    return {
        "label": label,
        "kind": "ensemble" if ensemble else "evaluation",
        "members": members,
        "ece": ece.get("after"),
        "ece_raw": ece.get("before"),
        # the run as it is now (a copied run's evaluations are the copy's), as the ensemble names itself
        "run": m.get("run_name") if ensemble else evaluation_run(metrics_path, m).name,
        "model": model,
        "fusion": fusion,
        "size": size,
        "stage": stage,
        "checkpoint": m.get("checkpoint"),
        "split": m.get("split"),
        "n_images": m.get("n_images"),
        "n_patients": m.get("n_patients"),
        "mean_auc": mean,
        "ci_low": ci[0],
        "ci_high": ci[1],
        "paper_mean_auc": paper,
        "delta_vs_paper": None if paper is None or mean is None else mean - paper,
        "nan_findings": list(m.get("nan_findings", [])),
        "auc": dict(m["auc"]),
        "label_names": list(m["label_names"]),
        "source": str(metrics_path),
        "synthetic": bool(m.get("synthetic")),
        "other_collection": other,
        "test_store": Path(str(m.get("store") or "")).name,
        "per_finding": per_finding(m),
    }


#: What :func:`per_finding` gives for each finding, as read from ``metrics.json`` (None where absent).
PER_FINDING = ("positives", "prevalence", "auc", "auc_ci", "auprc", "auprc_ci", "threshold", "tp", "fp", "fn", "tn",
               "sensitivity", "sensitivity_ci", "specificity", "specificity_ci")  # fmt: skip


def per_finding(m: dict) -> list[dict[str, Any]]:
    """Per finding of an evaluation, as its ``metrics.json`` holds them (nothing recomputed): positives,
    test prevalence, AUC and AUPRC with their 95% intervals and, at the operating threshold, the
    TP/FP/FN/TN image counts and sensitivity and specificity with their 95% intervals."""

    def get(key: str, name: str) -> Any:
        return (m.get(key) or {}).get(name)

    out = []
    for n in m.get("label_names") or []:
        counts = get("counts", n) or {}
        out.append({"name": n, "positives": get("positives", n), "prevalence": get("prevalence", n),
                    "auc": get("auc", n), "auc_ci": get("auc_ci95", n), "auprc": get("auprc", n),
                    "auprc_ci": get("auprc_ci95", n), "threshold": get("threshold", n),
                    **{c: counts.get(c) for c in ("tp", "fp", "fn", "tn")},
                    "sensitivity": get("sensitivity", n), "sensitivity_ci": get("sensitivity_ci95", n),
                    "specificity": get("specificity", n), "specificity_ci": get("specificity_ci95", n)})  # fmt: skip
    return out


def build_rows(paths: Sequence[str | os.PathLike], split: str = "test") -> list[dict[str, Any]]:
    """Rows of every evaluation named by ``paths``, in the given order, with the best marked (among the
    evaluations on the runs' own collections, when there are any)."""
    rows = [load_row(p) for p in find_evaluations(paths, split)]
    own = not all(r["other_collection"] for r in rows)
    scored = [i for i, r in enumerate(rows) if r["mean_auc"] is not None and not (own and r["other_collection"])]
    best = max(scored, key=lambda i: rows[i]["mean_auc"]) if scored else None
    for i, r in enumerate(rows):
        r["best"] = i == best
    return rows


def _finding_columns(rows: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names.extend(n for n in r["label_names"] if n not in names)
    return names


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def format_csv(rows: Sequence[dict]) -> str:
    """The table as CSV: one row per evaluation, numbers unrounded, empty cells for n/a."""
    findings = _finding_columns(rows)
    head = [
        "run",
        "model",
        "fusion",
        "size",
        "stage",
        "checkpoint",
        "split",
        "n_images",
        "n_patients",
        "mean_auc",
        "ci95_low",
        "ci95_high",
        "paper_mean_auc",
        "delta_vs_paper",
        "best",
        "nan_findings",
        "ece_calibrated",
        "ece_raw",
        "kind",
        "members",
        "test_store",
        "other_collection",
    ] + [f"auc_{n}" for n in findings]
    head += [f"{column}_{n}" for n in findings for column in _CSV_PER_FINDING]
    buf = io.StringIO()
    w = csvsafe.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in rows:
        w.writerow(
            [
                r["run"],
                r["model"],
                r["fusion"],
                r["size"],
                r["stage"],
                r["checkpoint"],
                r["split"],
                r["n_images"],
                r["n_patients"],
            ]
            + [
                "" if r[k] is None else repr(float(r[k]))
                for k in ("mean_auc", "ci_low", "ci_high", "paper_mean_auc", "delta_vs_paper")
            ]
            + [str(r["best"]).lower(), ";".join(r["nan_findings"])]
            + ["" if r[k] is None else repr(float(r[k])) for k in ("ece", "ece_raw")]
            + [r["kind"], ";".join(r["members"]), r["test_store"], str(r["other_collection"]).lower()]
            + ["" if r["auc"].get(n) is None else repr(float(r["auc"][n])) for n in findings]
            + [_csv_cell(r, n, column) for n in findings for column in _CSV_PER_FINDING]
        )
    return buf.getvalue()


#: The per-finding columns of ``table.csv`` after the AUCs (``<column>_<finding>``; ``_low``/``_high``: 95% CI).
_CSV_PER_FINDING = ("prevalence", "auprc", "auprc_low", "auprc_high", "threshold", "tp", "fp", "fn", "tn",
                    "sensitivity", "sensitivity_low", "sensitivity_high", "specificity", "specificity_low",
                    "specificity_high")  # fmt: skip


def _csv_cell(row: dict, name: str, column: str) -> str:
    """One per-finding cell of ``table.csv``: empty where the evaluation does not have it."""
    entry = next((f for f in row.get("per_finding", []) if f["name"] == name), None) or {}
    if column.endswith(("_low", "_high")):
        base, end = column.rsplit("_", 1)
        ci = entry.get(f"{base}_ci")
        value = ci[0 if end == "low" else 1] if ci else None
    else:
        value = entry.get(column)
    if value is None:
        return ""
    return str(int(value)) if column in ("tp", "fp", "fn", "tn") else repr(float(value))


def _markdown_header(rows: Sequence[dict]) -> list[str]:
    """The title, the notes on what the columns mean, and a warning when label vocabularies differ."""
    lines = [
        "# Mean test AUC per run (cf. the paper's Table 1)",
        "",
        "Mean ROC AUC over the findings that have both classes in the split; 95% interval from a",
        "patient-level bootstrap. *Paper* is the published mean AUC of the same model, input size and",
        "stage (KT = frozen backbone, knowledge transfer; fine-tuned = everything trained), shown for",
        "reference only: the data, split and preprocessing behind it differ. The best run is in bold.",
        "*ECE* is the mean expected calibration error over findings (15 equal-width bins; lower is",
        "better) of the temperature-scaled probabilities, with the model's raw ones in brackets.",
        'A model named "+ demographics" also sees age, sex and view; the paper\'s models are image only.',
        "",
    ]
    vocabularies = len({tuple(r["label_names"]) for r in rows})
    if vocabularies > 1:
        lines += [
            f"**These evaluations use {vocabularies} different label vocabularies: their mean AUCs are over different",
            "findings and not comparable.** `report.html` shows one table per vocabulary.",
            "",
        ]
    return lines


def _markdown_run_row(r: dict) -> str:
    """One row of the summary table (its first five cells in bold for the best run)."""
    mean = _fmt(r["mean_auc"])
    ci = f"{_fmt(r['ci_low'])} – {_fmt(r['ci_high'])}" if r["ci_low"] is not None else "n/a"
    delta = "" if r["delta_vs_paper"] is None else f"{r['delta_vs_paper']:+.4f}"
    ece = "n/a" if r["ece"] is None else f"{r['ece']:.3f}" + ("" if r["ece_raw"] is None else f" ({r['ece_raw']:.3f})")
    model = (
        f"Ensemble ({r['model'][len('ensemble(') : -1]})"
        if r["kind"] == "ensemble"
        else model_title(r["model"], r["fusion"])
    )
    cells = [
        r["run"]
        + (f" on {r['test_store']}" if r.get("other_collection") else "")
        + (" (synthetic data)" if r.get("synthetic") else ""),
        model,
        str(r["size"]),
        STAGE_TITLES.get(r["stage"], r["stage"]),
        mean or "n/a",
        ci,
        ece,
        _fmt(r["paper_mean_auc"]) or "—",
        delta or "—",
        str(r["n_images"]),
        "**best**" if r["best"] else "",
    ]
    if r["best"]:
        cells[:5] = [f"**{c}**" for c in cells[:5]]
    return "| " + " | ".join(cells) + " |"


def _markdown_run_notes(rows: Sequence[dict]) -> list[str]:
    """The lists under the summary table: each ensemble's members, and findings without an AUC."""
    lines: list[str] = []
    ensembles = [f"{r['run']}: {r['label']}" for r in rows if r["kind"] == "ensemble"]
    if ensembles:
        lines += [
            "",
            "Ensembles (members are run/checkpoint; weights, thresholds and temperatures fitted on validation, never on test):",
        ]
        lines += [f"- {e}" for e in ensembles]
    nan_notes = [
        f"{r['run']} ({STAGE_TITLES.get(r['stage'], r['stage'])}): {', '.join(r['nan_findings'])}"
        for r in rows
        if r["nan_findings"]
    ]
    if nan_notes:
        lines += ["", "Findings without an AUC (one class only in the split), left out of the mean:"]
        lines += [f"- {n}" for n in nan_notes]
    return lines


def _markdown_findings(rows: Sequence[dict]) -> list[str]:
    """The per-finding AUC table: one row per finding, one column per evaluation."""
    lines = ["", "## Per-finding test AUC", ""]
    lines.append(
        "| Finding | "
        + " | ".join(
            f"{r['run']} {STAGE_TITLES.get(r['stage'], r['stage'])}"
            + (f" on {r['test_store']}" if r.get("other_collection") else "")
            for r in rows
        )
        + " |"
    )
    lines.append("|---|" + "---:|" * len(rows))
    for n in _finding_columns(rows):
        lines.append(f"| {n} | " + " | ".join(_fmt(r["auc"].get(n), 3) or "n/a" for r in rows) + " |")
    return lines


def _interval_text(value: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + (f" ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else "")


def _markdown_operating(rows: Sequence[dict]) -> list[str]:
    """Per evaluation, one row per finding: prevalence, AUC and AUPRC with their intervals and, at the
    operating threshold, TP/FP/FN/TN and sensitivity and specificity with their intervals."""
    lines = ["", "## Per finding, at the operating threshold", "",
             "Test prevalence; AUC and AUPRC (average precision; chance level = prevalence) with 95% patient-bootstrap",
             "intervals; at the threshold chosen on validation (Youden's J), the images counted TP/FP/FN/TN and",
             "sensitivity and specificity with 95% intervals. n/a: not in the evaluation (an older cxrflow, or one class only)."]  # fmt: skip
    for r in rows:
        where = f" on {r['test_store']}" if r.get("other_collection") else ""
        synthetic = " (synthetic data)" if r.get("synthetic") else ""
        lines += ["", f"### {r['run']}{where}: {r['label']}{synthetic}", "",
                  "| Finding | Positives | Prevalence | AUC (95% CI) | AUPRC (95% CI) | Threshold | TP | FP | FN | TN | "
                  "Sensitivity (95% CI) | Specificity (95% CI) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for f in r.get("per_finding", []):
            prevalence = "n/a" if f["prevalence"] is None else f"{100 * f['prevalence']:.1f}%"
            counts = ["n/a" if f[c] is None else str(f[c]) for c in ("tp", "fp", "fn", "tn")]
            cells = [f["name"], "n/a" if f["positives"] is None else str(f["positives"]), prevalence,
                     _interval_text(f["auc"], f["auc_ci"]), _interval_text(f["auprc"], f["auprc_ci"]),
                     _fmt(f["threshold"], 3) or "n/a", *counts, _interval_text(f["sensitivity"], f["sensitivity_ci"]),
                     _interval_text(f["specificity"], f["specificity_ci"])]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _markdown_paper() -> list[str]:
    """The paper's published mean AUCs, one row per model and input size."""
    lines = [
        "",
        "## The paper's published mean AUCs",
        "",
        "| Model | Size (px) | KT | Fine-tuned |",
        "|---|---:|---:|---:|",
    ]
    published: dict[tuple[str, int | None], dict[str, float]] = {}
    for (model, size, stage), auc in PAPER_MEAN_AUC.items():
        published.setdefault((model, size), {})[stage] = auc
    for (model, size), aucs in published.items():
        lines.append(
            f"| {model_title(model)} | {'—' if size is None else size} | {_fmt(aucs.get('kt')) or '—'} | "
            f"{_fmt(aucs.get('finetune')) or '—'} |"
        )
    return lines


def format_markdown(rows: Sequence[dict]) -> str:
    """The table as Markdown: the summary table (best in bold), per-finding AUCs, the paper's values."""
    lines = _markdown_header(rows)
    lines += [
        "| Run | Model | Size (px) | Stage | Mean AUC | 95% CI | ECE (raw) | Paper | Δ vs paper | Images | Best |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|:---:|",
    ]
    lines += [_markdown_run_row(r) for r in rows]
    lines += _markdown_run_notes(rows)
    lines += _markdown_findings(rows)
    lines += _markdown_operating(rows)
    lines += _markdown_paper()
    return "\n".join(lines) + "\n"
