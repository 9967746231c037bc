"""Demographics fusion end to end on the synthetic release with demographic findings: synth, the real
Spark ETL, real training of an image-only and a fused simple_cnn with the same recipe, evaluation,
the report's rows, and prediction from the command line (with its one-line errors)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxrflow.cli import main
from cxrflow.data.etl import run_etl
from cxrflow.data.synth import DEMOGRAPHIC_FINDINGS, synthesize
from cxrflow.modelling.config import resolve_config
from cxrflow.modelling.train import train
from cxrflow.results.evaluate import evaluate_run
from cxrflow.results.table import build_rows, format_csv, format_markdown

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
SIZE = 32


@pytest.fixture(scope="module")
def fused_and_plain(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("fusion")
    synth = synthesize(root / "data", patients=400, size=SIZE, seed=0, demographic_findings=True)
    assert synth["demographic_findings"] == list(DEMOGRAPHIC_FINDINGS)
    manifest = run_etl(root / "data", root / "store", [SIZE], spark=spark, rows_per_file=512)
    runs = {}
    for fusion in ("none", "demographics"):
        config = resolve_config(
            "default",
            None,
            {
                "store": str(root / "store"),
                "size": SIZE,
                "model": "simple_cnn",
                "out": str(root / fusion),
                "fusion": fusion,
                "device": "cpu",
                "finetune.epochs": 8,
                "finetune.lr": 1e-3,
                "augment": False,
                "early_stopping_patience": 0,
                "scheduler": "plateau",
            },
        )
        train(config, quiet=True, log=lambda _: None)
        runs[fusion] = evaluate_run(root / fusion, n_boot=20, device="cpu")
    return root, manifest, runs


def test_manifest_counts_unknown_demographics_and_store_keeps_raw_values(fused_and_plain):
    root, manifest, _ = fused_and_plain
    unknown = manifest["demographics_unknown"]
    assert unknown["age"] > 0 and unknown["sex"] == 0 and unknown["view"] == 0 and unknown["any"] == unknown["age"]
    from cxrflow.data.store import format_manifest

    assert f"demographics unknown to a fused model (raw values kept): age {unknown['age']}, sex 0" in format_manifest(
        manifest
    )
    ages = np.concatenate([pq.read_table(root / "store", columns=["age"]).column("age").to_numpy()])
    bad = (ages < 1) | (ages > 120)
    assert int(bad.sum()) == unknown["age"] and set(ages[bad].tolist()) <= {0, 150, 414}  # raw values kept


def test_fused_run_beats_image_only_on_demographic_findings_and_mean(fused_and_plain):
    root, _, runs = fused_and_plain
    plain, fused = runs["none"], runs["demographics"]
    demo = list(DEMOGRAPHIC_FINDINGS)
    plain_demo = np.mean([plain["auc"][n] for n in demo])
    fused_demo = np.mean([fused["auc"][n] for n in demo])
    assert fused_demo > plain_demo + 0.03, (plain_demo, fused_demo)
    assert fused["mean_auc"] > plain["mean_auc"], (plain["mean_auc"], fused["mean_auc"])
    config = json.loads((root / "demographics" / "config.json").read_text())
    assert config["fusion"] == "demographics"
    assert config["demographics_encoding"]["age"]["known"] == "1 <= age <= 120 years"
    assert json.loads((root / "none" / "config.json").read_text())["fusion"] == "none"


def test_every_evaluation_has_demographics_alone_and_names_the_shortcuts(fused_and_plain):
    """The image-only run's evaluation names the findings that follow age, sex and view (and at most one
    other) as shortcuts; the fused run is at least as good as either part on them, within noise."""
    root, _, runs = fused_and_plain
    plain, fused = runs["none"], runs["demographics"]
    demo = list(DEMOGRAPHIC_FINDINGS)
    for m in (plain, fused):
        saved = json.loads(
            (root / ("none" if m is plain else "demographics") / "eval-test-best_finetune" / "metrics.json").read_text()
        )["demographics_only"]
        assert set(saved) >= {"auc", "auc_low", "auc_high", "shortcut"} and set(saved["auc"]) == set(m["label_names"])
        assert all(saved["auc_low"][n] <= saved["auc"][n] <= saved["auc_high"][n] for n in demo)
    # the same fit, the same test images: one baseline whichever run is evaluated
    assert plain["demographics_only"]["auc"] == fused["demographics_only"]["auc"]
    shortcut = plain["demographics_only"]["shortcut"]
    assert set(demo) <= set(shortcut) and len(set(shortcut) - set(demo)) <= 1, shortcut
    alone = plain["demographics_only"]["auc"]
    for n in demo:
        assert fused["auc"][n] >= max(plain["auc"][n], alone[n]) - 0.05, (n, plain["auc"][n], alone[n], fused["auc"][n])


def test_report_shows_demographics_alone_and_the_fusion_comparison(fused_and_plain):
    from cxrflow.results.htmlreport import build_html

    root, _, _ = fused_and_plain
    page = build_html([root / "none", root / "demographics"], cases=0, heatmap_fn=None)
    assert "Demographics only (95% CI)" in page and '<table id="fusion">' in page
    for name in DEMOGRAPHIC_FINDINGS:  # the image-only run's shortcuts, in words
        assert f"{name}: age, sex and view alone give AUC" in page
    assert "much of what it could learn here is who the patient is" in page
    alone = build_html([root / "none"], cases=0, heatmap_fn=None)
    assert "Demographics only (95% CI)" in alone and '<table id="fusion">' not in alone  # one kind: no comparison


def test_report_shows_the_fused_run_as_its_own_row(fused_and_plain):
    root, _, runs = fused_and_plain
    rows = build_rows([root / "none", root / "demographics"])
    assert [r["fusion"] for r in rows] == ["none", "demographics"]
    assert rows[1]["label"] == "Simple CNN + demographics 32px fine-tuned"
    lines = [line.replace("**", "") for line in format_markdown(rows).splitlines()]
    # the runs trained on a synthetic store, and the table says so beside each run
    assert "| demographics (synthetic data) | Simple CNN + demographics | 32 | fine-tuned |" in "\n".join(lines)
    assert "| none (synthetic data) | Simple CNN | 32 | fine-tuned |" in "\n".join(lines)
    table = list(csv.DictReader(format_csv(rows).splitlines()))
    assert [t["fusion"] for t in table] == ["none", "demographics"]


@pytest.fixture(scope="module")
def image_files(fused_and_plain, tmp_path_factory):
    root, _, _ = fused_and_plain
    table = pq.read_table(root / "store" / f"size={SIZE}" / "split=test").slice(0, 2).to_pylist()
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for row in table:
        path = folder / row["image_id"]
        Image.fromarray(np.frombuffer(row["pixels"], np.uint8).reshape(SIZE, SIZE), "L").save(path)
        paths.append(path)
    return paths, table


def test_predict_a_fused_run_with_demographics(fused_and_plain, image_files, capsys, tmp_path):
    root, _, _ = fused_and_plain
    paths, table = image_files
    run = str(root / "demographics")
    assert main(["predict", "--run", run, str(paths[0]), "--age", "63", "--sex", "F", "--view", "AP", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["predictions"][0]
    assert first["demographics"] == {"age": 63.0, "sex": "F", "view": "AP"}
    assert main(["predict", "--run", run, str(paths[0]), "--age", "20", "--sex", "M", "--view", "PA", "--json"]) == 0
    other = json.loads(capsys.readouterr().out)["predictions"][0]
    assert other["probabilities"] != first["probabilities"]  # the demographics reach the model
    # --metadata: the CSV's values per file (by file name), same numbers as the flags give
    meta = tmp_path / "meta.csv"
    meta.write_text("image,age,sex,view\n" + "".join(f"{p.name},63,F,AP\n" for p in paths))
    assert main(["predict", "--run", run, *map(str, paths), "--metadata", str(meta), "--json"]) == 0
    both = json.loads(capsys.readouterr().out)["predictions"]
    assert both[0]["probabilities"] == pytest.approx(first["probabilities"], abs=1e-6) and len(both) == 2
    # the evaluation's probability for a store row equals predict's with that row's own demographics
    row = table[0]
    evaluated = pq.read_table(root / "demographics" / "eval-test-best_finetune" / "predictions.parquet").to_pylist()
    prob = next(r for r in evaluated if r["image_id"] == row["image_id"])
    assert (
        main(
            [
                "predict",
                "--run",
                run,
                str(paths[0]),
                "--age",
                str(row["age"]),
                "--sex",
                row["sex"],
                "--view",
                row["view"],
                "--json",
            ]
        )
        == 0
    )
    mine = json.loads(capsys.readouterr().out)["predictions"][0]["probabilities"]
    assert mine["Edema"] == pytest.approx(prob["calprob_Edema"], abs=1e-5)  # calibrated by default
    assert (
        main(
            [
                "predict",
                "--run",
                run,
                str(paths[0]),
                "--age",
                str(row["age"]),
                "--sex",
                row["sex"],
                "--view",
                row["view"],
                "--json",
                "--raw",
            ]
        )
        == 0
    )
    raw = json.loads(capsys.readouterr().out)["predictions"][0]["probabilities"]
    assert raw["Edema"] == pytest.approx(prob["prob_Edema"], abs=1e-5)


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "the run fuses demographics"),
        (["--age", "sixty", "--sex", "F", "--view", "AP"], "--age: age must be a number"),
        (["--age", "60"], "give --age, --sex and --view together (missing --sex, --view"),
        (["--age", "60", "--sex", "F", "--view", "lateral"], "--view: view must be PA or AP"),
    ],
)
def test_predict_fused_run_bad_input_is_one_line(fused_and_plain, image_files, capsys, extra, message):
    root, _, _ = fused_and_plain
    assert main(["predict", "--run", str(root / "demographics"), str(image_files[0][0]), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_unknown_fusion_is_one_line(fused_and_plain, tmp_path, capsys):
    root, _, _ = fused_and_plain
    code = main(
        [
            "train",
            "--store",
            str(root / "store"),
            "--size",
            "32",
            "--model",
            "simple_cnn",
            "--out",
            str(tmp_path / "r"),
            "--fusion",
            "age",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err == "error: unknown fusion 'age'; choose one of none, demographics\n"
    assert not (tmp_path / "r").exists()
