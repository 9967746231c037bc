"""The end-to-end demo (``make demo``): every stage of cxrflow on a synthetic dataset, in minutes on a laptop CPU.

1. ``synth``: a few hundred synthetic patients in the NIH release's exact format;
2. ``explore``: dataset statistics and figures;
3. ``etl``: local Spark writes the Parquet store at two small sizes;
4. ``sweep``: trains ``simple_cnn`` (one stage) and a small ``densenet121`` (random init, knowledge
   transfer then fine-tuning), evaluates every stage's best checkpoint on the test split (AUC with
   patient-bootstrap CIs, ROC and training-curve figures) and writes the report (``report.html``,
   one self-contained page for the whole study, and the table);
5. ``predict``: a few test images through the saved model, as a user would.

Everything is done by the stages' own functions; this module only chains them and prints where
each output is. The planted signal of the synthetic data is learnable, so the best run's mean test
AUC must reach :data:`TARGET_AUC`; the exit status says whether it did.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from cxrflow.errors import CxrflowError
from cxrflow.outputs import claiming, write_marker

#: The best run's mean test AUC the demo must reach on the synthetic data.
TARGET_AUC = 0.85


def demo_sweep(store: Path, sizes: tuple[int, int], seed: int, epochs: int) -> dict[str, Any]:
    """The demo's two runs as a sweep config: simple_cnn at the larger size, densenet121 at the smaller."""
    small, large = sorted(sizes)
    return {
        "store": str(store),
        "defaults": {
            "preset": "default",
            "pretrained": "none",
            "batch_size": 32,
            "eval_batch_size": 128,
            "seed": seed,
            "early_stopping_patience": 0,
        },
        "n_boot": 1000,
        "runs": [
            {"name": f"simple_cnn-{large}", "model": "simple_cnn", "size": large,
             "finetune": {"epochs": epochs + 2, "lr": 3e-3}},
            {"name": f"densenet121-{small}", "model": "densenet121", "size": small, "batch_size": 16,
             "kt": {"epochs": 1, "lr": 1e-2}, "finetune": {"epochs": epochs, "lr": 1e-3}},
        ],
    }  # fmt: skip


def run_demo(
    out: str | Path,
    *,
    patients: int = 300,
    image_size: int = 128,
    sizes: tuple[int, int] = (32, 64),
    epochs: int = 2,
    seed: int = 0,
    master: str = "local[2]",
    overwrite: bool = False,
    spark: Any = None,
    echo=print,
) -> dict[str, Any]:
    """Run every stage on a synthetic dataset in ``out``; returns a summary (paths, AUCs, timings).

    ``spark``: an existing SparkSession for the ETL (default: one on ``master``, stopped after).
    ``overwrite`` replaces an earlier demo folder (nothing else).
    """
    out = Path(out).absolute()
    with claiming(out, "demo", overwrite=overwrite, fresh=True):
        write_marker(out, "demo", patients=patients, sizes=list(sizes), seed=seed)
        return _demo(
            out,
            patients=patients,
            image_size=image_size,
            sizes=sizes,
            epochs=epochs,
            seed=seed,
            master=master,
            spark=spark,
            echo=echo,
        )


def _demo(out: Path, *, patients, image_size, sizes, epochs, seed, master, spark, echo) -> dict[str, Any]:
    """The stages of :func:`run_demo` in the claimed folder ``out``."""
    from cxrflow.data.etl import run_etl
    from cxrflow.data.explore import explore
    from cxrflow.data.metadata import load_release
    from cxrflow.data.synth import synthesize
    from cxrflow.results.predict import load_predictor, predict_files
    from cxrflow.sweep import parse_sweep, run_sweep

    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, text: str) -> float:
        echo(f"\n== {name}: {text}")
        return time.perf_counter()

    t = stage("synth", f"{patients} synthetic patients, {image_size}x{image_size} px PNGs")
    synth = synthesize(out / "data", patients=patients, size=image_size, seed=seed)
    echo(f"{synth['images']} images ({synth['train_val_images']} train/val, {synth['test_images']} test)")
    timings["synth"] = time.perf_counter() - t

    t = stage("explore", "dataset statistics and figures")
    release = load_release(out / "data", need_images=False)
    stats = explore(release.entries, out / "explore", str(release.data_entry_path))
    echo(f"{stats['images']} images of {stats['patients']} patients")
    timings["explore"] = time.perf_counter() - t

    t = stage("etl", f"Spark ({master}) to a Parquet store at sizes {', '.join(map(str, sizes))} px")
    manifest = run_etl(out / "data", out / "store", sizes, master, seed=seed, spark=spark, progress=sys.stderr)
    rows = manifest["rows"][str(sizes[0])]
    echo(
        f"store: {', '.join(f'{k} {v}' for k, v in rows.items())} images per size; {len(manifest['quarantined'])} quarantined"
    )
    timings["etl"] = time.perf_counter() - t

    t = stage("train + evaluate + report", "simple_cnn and densenet121 (random init), evaluated on test")
    sweep = parse_sweep(demo_sweep(out / "store", sizes, seed, epochs), source="demo")
    result = run_sweep(sweep, out / "sweep", device="cpu", in_process=True, echo=echo, explore=out / "explore")
    if result["failed"]:
        raise CxrflowError(f"demo runs failed: {result['failed']}", out / "sweep")
    timings["train_evaluate_report"] = time.perf_counter() - t

    t = stage("predict", "three test images through the best run's model, as 'cxrflow predict' does")
    best = result["best"]
    run_folder = out / "sweep" / "runs" / best["run"]
    predictor = load_predictor(run_folder, f"best_{best['stage']}", device="cpu")
    test_images = sorted((out / "data" / "images").glob("*.png"))
    test_ids = set((out / "data" / "test_list.txt").read_text().split())
    sample = [p for p in test_images if p.name in test_ids][:3]
    predictions, errors = predict_files(predictor, sample)
    truth = dict(zip(release.entries["image_id"], release.entries["finding_labels"]))
    for p in predictions:
        name = Path(p["image"]).name
        called = ", ".join(f"{k} {p['probabilities'][k]:.2f}" for k in p.get("positive", [])) or "No Finding"
        echo(f"{name}: {called}  (metadata says: {truth.get(name, '?')})")
    timings["predict"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    return _write_summary(out, result, timings)


def _write_summary(out: Path, result: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The demo's summary (every evaluation's mean test AUC, where each output is), also ``out/summary.json``."""
    from cxrflow.atomic import write_json_atomic

    best = result["best"]
    evaluations = sorted((out / "sweep" / "runs").glob("*/eval-test-*/metrics.json"))
    aucs = {}
    for m in evaluations:
        data = json.loads(m.read_text())
        aucs[f"{data['run_name']} {data['stage']}"] = {"mean_auc": data["mean_auc"], "ci95": data["mean_auc_ci95"]}
    summary = {
        "out": str(out),
        "best": best,
        "target_auc": TARGET_AUC,
        "target_met": best is not None and best["mean_auc"] is not None and best["mean_auc"] >= TARGET_AUC,
        "mean_test_auc": aucs,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "outputs": {
            "dataset": str(out / "data"),
            "explore": str(out / "explore"),
            "store": str(out / "store"),
            "runs": str(out / "sweep" / "runs"),
            "report": result["report"],
            "evaluations": [str(m.parent) for m in evaluations],
        },
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Where every output is, and the headline numbers."""
    out = Path(summary["out"])

    def rel(p: str | Path) -> str:
        try:
            return str(Path(p).relative_to(Path.cwd()))
        except ValueError:
            return str(p)

    report = summary["outputs"]["report"] or {}
    lines = [
        "",
        "== summary",
        f"open the report: {rel(report.get('report_html', '-'))}",
        f"everything is under {rel(out)}/",
    ]
    lines.append(f"  dataset (NIH format)      {rel(summary['outputs']['dataset'])}/")
    lines.append(f"  data exploration          {rel(summary['outputs']['explore'])}/ (summary.md, figures)")
    lines.append(f"  Parquet store             {rel(summary['outputs']['store'])}/ (_manifest.json)")
    lines.append(f"  report table              {rel(report.get('table_md', '-'))}  (+ table.csv)")
    lines.append(f"  runs vs paper figure      {rel(report.get('comparison_png', '-'))}")
    for e in summary["outputs"]["evaluations"]:
        lines.append(
            f"  evaluation                {rel(e)}/ (metrics.json, predictions.parquet, roc.png, reliability.png, curves.png)"
        )
    lines.append("mean test AUC (95% CI, patient bootstrap):")
    for name, v in summary["mean_test_auc"].items():
        ci = v["ci95"]
        lines.append(f"  {name:<28} {v['mean_auc']:.4f}" + (f"  ({ci[0]:.4f}-{ci[1]:.4f})" if ci else ""))
    best = summary["best"]
    verdict = "met" if summary["target_met"] else "NOT met"
    lines.append(
        f"best run: {best['run']} ({best['stage']}), mean test AUC {best['mean_auc']:.4f}; "
        f"target >= {summary['target_auc']} {verdict}"
    )
    s = summary["seconds"]
    lines.append(
        "wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in s.items() if k != "total")
        + f"; total {s['total']:.0f} s"
    )
    return "\n".join(lines)
