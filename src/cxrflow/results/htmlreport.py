"""``report.html``: one self-contained page that tells a whole study.

Gathered from the evaluation folders (and ensemble folders) a report is given, the runs and stores
they name, optional ``explore`` output and localization folders, and rendered with the Jinja2
template ``templates/report.html.j2`` (autoescaped: every name and path from a file is text). The
page embeds every figure as a PNG data URI and needs no network. Sections appear only when their
data exists:

1. data: each store's manifest and the exploration figures (``--explore``);
2. Table 1: every run and ensemble, one table per label vocabulary, beside the paper and published anchors;
3. per run: training curves, ROC, operating points, calibration, localization;
4. cases: per finding, top false positives / negatives and most confident positives, from the store;
5. reproduce: versions, commands, each run's resolved config, store manifest hashes, a rerun script
   (:mod:`cxrflow.results.reproduce`).

The evaluations, their stores and how the page names each one are gathered by :mod:`cxrflow.results.study`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxrflow import __version__
from cxrflow.errors import CxrflowError
from cxrflow.results.demographics_baseline import demographics_part, fusion_comparison
from cxrflow.results.localizationreport import current_localizations, localization_parts
from cxrflow.results.reproduce import reproduce_section
from cxrflow.results.study import (
    evaluation_anchor,
    evaluation_title,
    figure,
    load_evaluations,
    open_stores,
    read_json,
    split_name,
)
from cxrflow.results.table import STAGE_TITLES, model_title
from cxrflow.runs import METRICS_NAME, evaluation_checkpoint

HTML_NAME = "report.html"

#: Published mean test AUCs over the 14 ChestX-ray14 findings, with the split they were measured on.
PUBLISHED_ANCHORS: tuple[dict[str, Any], ...] = (
    {
        "source": "Wang et al. 2017 (ChestX-ray8, CVPR; 14-finding update)",
        "model": "ResNet-50",
        "split": "official split",
        "official": True,
        "mean_auc": 0.745,
    },
    {
        "source": "Rajpurkar et al. 2017 (CheXNet)",
        "model": "DenseNet-121",
        "split": "random patients 70/10/20 (not the official split)",
        "official": False,
        "mean_auc": 0.841,
    },
)

EXPLORE_FIGURES = (
    ("findings.png", "Images per finding in the dataset (bar chart, counts per finding)"),
    ("cooccurrence.png", "How often two findings occur on the same image (matrix of finding pairs)"),
    ("age_by_sex.png", "Age distribution of the patients by sex (histogram, years)"),
    ("images_per_patient.png", "Images per patient (histogram)"),
)


# --------------------------------------------------------------------------------------------------
# 1. data


def data_section(stores: dict[str, dict], explore: str | os.PathLike | None) -> dict[str, Any] | None:
    """The stores' manifests and the exploration figures; None when there is neither."""
    manifests = []
    for info in stores.values():
        m = info.get("manifest")
        if m is None:
            continue
        sizes = [str(s) for s in m.get("sizes", [])]
        splits = sorted(
            {s for per in m.get("rows", {}).values() for s in per},
            key=lambda s: ("train", "val", "test").index(s) if s in ("train", "val", "test") else 9,
        )
        manifests.append(
            {
                "path": info["path"],
                "sha256": info.get("sha256"),
                "created": m.get("created"),
                "cxrflow_version": m.get("cxrflow_version"),
                "source": {k: v for k, v in (m.get("source") or {}).items() if not isinstance(v, (list, dict))},
                "split": {k: v for k, v in (m.get("split") or {}).items() if not isinstance(v, (list, dict))},
                "split_name": split_name(info),
                "synthetic": _synthetic(m),
                "splits": splits,
                "rows": [
                    {"size": s, "counts": [m["rows"][s].get(sp) for sp in splits]}
                    for s in sizes
                    if s in m.get("rows", {})
                ],
                "pixel_stats": [
                    {"size": s, **(m.get("pixel_stats") or {}).get(s, {})}
                    for s in sizes
                    if s in (m.get("pixel_stats") or {})
                ],
                "positives": [
                    {"name": n, "count": (m.get("positives") or {}).get(n)} for n in m.get("label_names", [])
                ],
                "missing": list(m.get("missing") or [])[:50],
                "n_missing": len(m.get("missing") or []),
                "quarantined": list(m.get("quarantined") or [])[:50],
                "n_quarantined": len(m.get("quarantined") or []),
            }
        )
    problems = [info["problem"] for info in stores.values() if info.get("problem")]
    figures, stats = [], None
    if explore is not None:
        folder = Path(explore)
        if not folder.is_dir():
            raise CxrflowError("no such explore folder (write one with 'cxrflow explore')", folder)
        from cxrflow.outputs import marker_name, read_marker

        if read_marker(folder, "explore") is None and not (folder / "stats.json").is_file():
            raise CxrflowError(f"not a cxrflow explore output (no {marker_name('explore')} or stats.json); "
                               "write one with 'cxrflow explore'", folder)  # fmt: skip
        stats, _ = read_json(folder / "stats.json")
        figures = [figure(folder / name, alt) for name, alt in EXPLORE_FIGURES if (folder / name).exists()]
    if not manifests and not figures and stats is None and not problems:
        return None
    return {
        "stores": manifests,
        "problems": problems,
        "explore": str(explore) if explore else None,
        "stats": stats,
        "figures": figures,
    }


# --------------------------------------------------------------------------------------------------
# 2. Table 1


def _ece(metrics: dict) -> tuple[float | None, float | None]:
    cal = metrics.get("calibration") or {}
    ece = cal.get("ece_mean") or {}
    return ece.get("before"), ece.get("after")


def table_sections(evaluations: list[dict], stores: dict[str, dict]) -> list[dict[str, Any]]:
    """Table 1, one table per label vocabulary (mean AUCs over different findings are not comparable)."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for ev in evaluations:
        groups.setdefault(tuple(ev["row"]["label_names"]), []).append(ev)
    tables = []
    for names, evs in groups.items():
        rows = []
        for ev in evs:
            r, m = ev["row"], ev["metrics"]
            before, after = _ece(m)
            synthetic = ev.get("synthetic", False)  # no comparison with published results for synthetic data
            rows.append(
                {
                    **r,
                    **({"paper_mean_auc": None, "delta_vs_paper": None} if synthetic else {}),
                    "synthetic": synthetic,
                    "anchor": evaluation_anchor(ev),
                    "title": evaluation_title(ev),
                    "model_title": "ensemble" if ev["ensemble"] else model_title(r["model"]),
                    "stage_title": m.get("method", "") if ev["ensemble"] else STAGE_TITLES.get(r["stage"], r["stage"]),
                    "split_name": split_name(stores.get(str(m.get("store") or ""))),
                    "ece_before": before,
                    "ece_after": after,
                    "aucs": [r["auc"].get(n) for n in names],
                }
            )
        own = not all(r["other_collection"] for r in rows)  # best among the runs' own collections
        scored = [r for r in rows if r["mean_auc"] is not None and not (own and r["other_collection"])]
        best = max(scored, key=lambda r: r["mean_auc"]) if scored else None
        for r in rows:
            r["best"] = r is best
        tables.append(
            {
                "findings": list(names),
                "rows": rows,
                "has_ece": any(r["ece_before"] is not None or r["ece_after"] is not None for r in rows),
                "has_paper": any(r["paper_mean_auc"] is not None for r in rows),
                "anchors": PUBLISHED_ANCHORS
                if len(names) == 14 and _is_nih(names) and not any(r["synthetic"] for r in rows)
                else (),
                "synthetic": sum(r["synthetic"] for r in rows),
            }
        )
    return tables


def _is_nih(names: Sequence[str]) -> bool:
    from cxrflow.data.labels import NIH14

    return tuple(names) == NIH14.names


# --------------------------------------------------------------------------------------------------
# 3. per run


def _finding_table(m: dict) -> list[dict[str, Any]]:
    names = m["label_names"]
    cal = m.get("calibration") or {}
    demo = m.get("demographics_only") or {}
    out = []
    for n in names:
        out.append(
            {
                "name": n,
                "positives": (m.get("positives") or {}).get(n),
                "auc": (m.get("auc") or {}).get(n),
                "ci": (m.get("auc_ci95") or {}).get(n),
                "threshold": (m.get("threshold") or {}).get(n),
                "sensitivity": (m.get("sensitivity") or {}).get(n),
                "specificity": (m.get("specificity") or {}).get(n),
                "sensitivity_ci": (m.get("sensitivity_ci95") or {}).get(n),
                "specificity_ci": (m.get("specificity_ci95") or {}).get(n),
                "counts": (m.get("counts") or {}).get(n),
                "prevalence": (m.get("prevalence") or {}).get(n),
                "auprc": (m.get("auprc") or {}).get(n),
                "auprc_ci": (m.get("auprc_ci95") or {}).get(n),
                "excluded_unknown": (m.get("excluded_unknown") or {}).get(n),
                "temperature": (cal.get("temperature") or {}).get(n),
                "ece_before": ((cal.get("ece") or {}).get("before") or {}).get(n),
                "ece_after": ((cal.get("ece") or {}).get("after") or {}).get(n),
                "brier_before": ((cal.get("brier") or {}).get("before") or {}).get(n),
                "brier_after": ((cal.get("brier") or {}).get("after") or {}).get(n),
                "demo_auc": (demo.get("auc") or {}).get(n),
                "demo_ci": [(demo.get(k) or {}).get(n) for k in ("auc_low", "auc_high")],
                "shortcut": n in (demo.get("shortcut") or []),
            }
        )
    return out


def evaluation_part(ev: dict) -> dict[str, Any]:
    """One evaluation inside its run's section: ROC, operating points, calibration."""
    m, folder = ev["metrics"], ev["folder"]
    title = evaluation_title(ev)
    listed = list(m.get("figures") or [])
    figures = []
    if "roc.png" in listed or (folder / "roc.png").exists():
        figures.append(
            figure(
                folder / "roc.png",
                f"ROC curves per finding of {title} on the {m.get('split')} split; the AUC of each finding is in the table below",
            )
        )
    if "pr.png" in listed or (folder / "pr.png").exists():
        figures.append(figure(folder / "pr.png", f"Precision-recall curves per finding of {title} on the {m.get('split')} split; "
                              "AUPRC and prevalence (the chance level) of each finding in the legend"))  # fmt: skip
    if "reliability.png" in listed or (folder / "reliability.png").exists():
        figures.append(
            figure(
                folder / "reliability.png",
                f"Reliability diagram of {title}: predicted probability against observed frequency, before and after calibration",
            )
        )
    cal = m.get("calibration")
    from cxrflow.results.auditreport import audit_part

    return {
        "audit": audit_part(m, folder, title) if not ev["ensemble"] or "audit" in m else None,
        "synthetic": ev.get("synthetic", False),
        "anchor": evaluation_anchor(ev),
        "title": title,
        "row": ev["row"],
        "folder": str(folder),
        "split": m.get("split"),
        "threshold_split": m.get("threshold_split"),
        "figures": figures,
        "findings": _finding_table(m),
        "calibration": None
        if not cal
        else {k: cal.get(k) for k in ("method", "fitted_on", "bins", "ece_mean", "brier_mean")},
        "has_operating_points": "threshold" in m,
        "has_auprc": "auprc" in m,
        "has_counts": "counts" in m,
        "has_unknown": bool(m.get("excluded_unknown")),
        "demographics_only": demographics_part(m),
        "members": [
            {"run": x.get("run"), "eval": x.get("eval"), "sha": x.get("checkpoint_sha256")}
            for x in m.get("members", [])
        ],
    }


def run_sections(evaluations: list[dict]) -> list[dict[str, Any]]:
    """One section per run (or ensemble): config, training curves, its evaluations, localization."""
    by_run: dict[Path, list[dict]] = {}
    for ev in evaluations:
        by_run.setdefault(ev["run"], []).append(ev)
    sections = []
    for run, evs in by_run.items():
        config, _ = read_json(run / "config.json")
        curves = next((ev["folder"] / "curves.png" for ev in evs if (ev["folder"] / "curves.png").exists()), None)
        first = evs[0]
        sections.append(
            {
                "name": first["folder"].name if first["ensemble"] else run.name,
                "path": str(run),
                "ensemble": first["ensemble"],
                "config": config,
                "config_summary": _config_summary(config),
                "curves": None
                if curves is None
                else figure(
                    curves, f"Training curves of {run.name}: loss and validation mean AUC per epoch over both stages"
                ),
                "evaluations": [evaluation_part(ev) for ev in evs],
                "localization": [] if first["ensemble"] else localization_parts(run),
            }
        )
    return sections


def _config_summary(config: dict | None) -> list[tuple[str, str]]:
    if not config:
        return []
    items = [("model", config.get("model")), ("input size (px)", config.get("size")), ("pretrained", config.get("pretrained")),
             ("batch size", config.get("batch_size")), ("optimizer", config.get("optimizer")), ("seed", config.get("seed"))]  # fmt: skip
    for stage in config.get("stages") or []:
        items.append(
            (
                f"stage {stage.get('name')}",
                f"{stage.get('trainable')} trainable, {stage.get('epochs')} epochs, lr {stage.get('lr')}",
            )
        )
    return [(k, str(v)) for k, v in items if v is not None]


# --------------------------------------------------------------------------------------------------
# 4. cases


def case_sections(
    evaluations: list[dict],
    stores: dict[str, dict],
    tables: list[dict],
    *,
    n: int,
    cases_for: str,
    heatmap_fn: Callable[..., np.ndarray] | None,
) -> list[dict[str, Any]]:
    """Cases of the best evaluation of each table (``cases_for="best"``) or of every evaluation."""
    from cxrflow.results.cases import case_set

    if n <= 0:
        return []
    best = {r["source"] for t in tables for r in t["rows"] if r["best"]}
    chosen = [ev for ev in evaluations if cases_for == "all" or ev["row"]["source"] in best]
    out = []
    for ev in chosen:
        pred_path = ev["folder"] / "predictions.parquet"
        if not pred_path.is_file():
            out.append(
                {
                    "title": evaluation_title(ev),
                    "anchor": evaluation_anchor(ev),
                    "error": f"no {pred_path.name} in {ev['folder']}",
                }
            )
            continue
        predictions, names = read_case_predictions(pred_path, ev["metrics"])
        store = stores.get(str(ev["metrics"].get("store") or ""), {})
        overlay, why_not = _heatmaps_for(ev, heatmap_fn)
        reader = _store_reader(store, ev, need_model_input=overlay is not None)
        result = case_set(
            predictions, names, n, thresholds=ev["metrics"].get("threshold"), read=reader, heatmaps=overlay
        )
        result["note"] = " ".join(filter(None, [result["note"], why_not])) or None
        out.append(
            {
                "title": evaluation_title(ev),
                "anchor": evaluation_anchor(ev),
                "n": n,
                "synthetic": ev.get("synthetic", False),
                **result,
            }
        )
    return out


def read_case_predictions(path: Path, metrics: dict | None = None) -> tuple[dict[str, Any], list[str]]:
    """``predictions.parquet`` as arrays, plus which labels are known (``known_<finding>``) where recorded;
    checked against its evaluation's ``metrics`` (:func:`cxrflow.runs.read_predictions`)."""
    import pyarrow.parquet as pq

    from cxrflow.runs import read_predictions

    rows = None if metrics is None or metrics.get("kind") == "ensemble" else metrics.get("n_images")
    pred, names = read_predictions(path, metrics, rows=rows)
    columns = [f"known_{n}" for n in names]
    pred["known"] = None
    if names and set(columns) <= set(pq.read_schema(path).names):
        table = pq.read_table(path, columns=columns)
        pred["known"] = np.column_stack([table.column(c).to_numpy() for c in columns])
    return pred, names


def _store_reader(store: dict, ev: dict, *, need_model_input: bool):
    """A function fetching case images from the evaluation's store, or one that says why it cannot."""
    from cxrflow.data.store import split_dir
    from cxrflow.results.cases import read_pixels, thumbnail_size

    manifest = store.get("manifest")
    m = ev["metrics"]

    def read(image_ids: list[str]) -> tuple[dict[str, np.ndarray], str | None]:
        if manifest is None:
            return {}, f"No thumbnails: {store.get('problem') or store.get('unknown') or 'the store is unknown'}."
        sizes = (
            m.get("size") if isinstance(m.get("size"), list) else [m.get("size") or 0]
        )  # an ensemble's members' sizes
        size = thumbnail_size(manifest.get("sizes", []), int(max(sizes)), need_model_input)
        partition = split_dir(store["path"], size, str(m.get("split") or "test"))
        if not partition.is_dir():
            return {}, f"No thumbnails: the store {store['path']} has no partition {partition.name} at {size} px."
        pixels = read_pixels(partition, size, image_ids)
        missing = len(set(image_ids) - set(pixels))
        note = None
        if missing:
            note = (
                f"{missing} of {len(set(image_ids))} case images are not in the store at {store['path']} "
                "(rewritten since the evaluation?); they are listed without thumbnails."
            )
        return pixels, note

    return read


def _heatmaps_for(ev: dict, heatmap_fn: Callable[..., np.ndarray] | None):
    """(``(image, finding) -> heatmap`` or None, why not) for an evaluation whose run has localization output."""
    m = ev["metrics"]
    if heatmap_fn is None or ev["ensemble"]:
        return None, None
    found, left_out = current_localizations(ev["run"])
    if not found:
        why = "No heatmap overlays: the run's localization output is for an older checkpoint; rerun 'cxrflow localize'."
        return None, why if any(part["stale"] for part in left_out) else None
    # build_rows has already refused an evaluation whose checkpoint is gone or changed (evaluation_status)
    ckpt = evaluation_checkpoint(ev["folder"] / METRICS_NAME, m)
    loc = next((d for _, d in found if d.get("checkpoint_sha256") == m.get("checkpoint_sha256")), found[0][1])
    from cxrflow.modelling.inference import resolve_inference

    inference = resolve_inference(ckpt, device="cpu")
    method = loc.get("method") or "gradcam"

    def heat(image: np.ndarray, finding: int) -> np.ndarray:
        return heatmap_fn(
            inference.model, image, finding, method=method, pixel_mean=inference.pixel_mean,
            pixel_std=inference.pixel_std, device=inference.device,
        )  # fmt: skip

    return heat, None


def default_heatmap_fn() -> Callable[..., np.ndarray] | None:
    """``cxrflow.modelling.heatmaps.heatmap`` when that module is installed, else None."""
    try:
        from cxrflow.modelling.heatmaps import heatmap
    except ImportError:
        return None
    return heatmap


# --------------------------------------------------------------------------------------------------
# the page


def build_context(
    paths: Sequence[str | os.PathLike],
    *,
    split: str = "test",
    explore: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
    cases: int = 3,
    cases_for: str = "best",
    report_args: list[str] | None = None,
    heatmap_fn: Callable[..., np.ndarray] | None = None,
    cross: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the page shows, as plain data (sections absent are None or empty); ``cross``: the
    cross-collection table when already made (:func:`cxrflow.results.crosstable.cross_table`)."""
    from cxrflow.results.crosstable import cross_table

    evaluations = load_evaluations(paths, split)
    stores = open_stores(evaluations, store)
    synthetic_stores = _mark_synthetic(evaluations, stores)
    tables = table_sections(evaluations, stores)
    runs = run_sections(evaluations)
    args = report_args if report_args is not None else [*map(str, paths), "--out", "REPORT"]
    return {
        "title": f"cxrflow study: {len(evaluations)} evaluation{'s' if len(evaluations) != 1 else ''}"
        + (" (synthetic data)" if synthetic_stores else ""),
        "synthetic_stores": synthetic_stores,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": __version__,
        "data": data_section(stores, explore),
        "tables": tables,
        "vocabularies": len(tables),
        "runs": runs,
        "cases": case_sections(evaluations, stores, tables, n=cases, cases_for=cases_for, heatmap_fn=heatmap_fn),
        "heatmaps_available": heatmap_fn is not None,
        "reproduce": reproduce_section(evaluations, runs, stores, args),
        "fusion": fusion_comparison([ev["metrics"] for ev in evaluations]),
        "cross": cross if cross is not None else cross_table([ev["row"]["source"] for ev in evaluations]),
    }


def _synthetic(manifest: dict | None) -> bool:
    from cxrflow.data.synthetic import is_synthetic

    return is_synthetic(manifest)


def _mark_synthetic(evaluations: list[dict], stores: dict[str, dict]) -> list[str]:
    """Set each evaluation's ``synthetic``; the stores (paths) of synthetic data behind the page."""
    from cxrflow.results.auditreport import is_synthetic_evaluation

    found = []
    for ev in evaluations:
        recorded = str(ev["metrics"].get("store") or "")
        ev["synthetic"] = is_synthetic_evaluation(ev["metrics"], stores.get(recorded))
        if ev["synthetic"] and recorded not in found:
            found.append(recorded)
    return [stores.get(r, {}).get("path", r) or "unknown store" for r in found]


def render(context: dict[str, Any]) -> str:
    """The page from its context, through the packaged Jinja2 template (autoescaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cxrflow", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["pct"] = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    env.filters["sortkey"] = lambda x: "" if x is None or (isinstance(x, float) and np.isnan(x)) else x
    return env.get_template("report.html.j2").render(**context)


def _num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{x:,}"
    return f"{float(x):.{digits}f}"


def build_html(paths: Sequence[str | os.PathLike], **options: Any) -> str:
    """The whole page for the evaluations named by ``paths`` (see :func:`build_context` for options)."""
    options.setdefault("heatmap_fn", default_heatmap_fn())
    return render(build_context(paths, **options))
