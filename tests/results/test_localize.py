"""The box benchmark end to end: a synthetic release whose lesions sit anywhere, the Spark ETL
(which writes the boxes), cxrflow's trainer, real HiResCAM on the trained simple_cnn, localize."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from cxrflow.cli import main
from cxrflow.data.boxes import BOXES_NAME, IOBB_THRESHOLDS, IOU_THRESHOLDS
from cxrflow.data.store import SCHEMA, read_manifest
from cxrflow.identity import file_sha256
from cxrflow.results.localize import localization_status, localize_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def localized(spark, tmp_path_factory):
    from cxrflow.data.etl import run_etl
    from cxrflow.data.synth import synthesize
    from cxrflow.modelling.config import StageSettings, TrainConfig
    from cxrflow.modelling.train import train

    tmp = tmp_path_factory.mktemp("localize")
    synthesize(tmp / "release", patients=120, size=64, seed=1, placement="anywhere")
    store = tmp / "store"
    run_etl(tmp / "release", store, sizes=(32,), spark=spark)
    run = tmp / "run"
    config = TrainConfig(
        store=str(store), size=32, model="simple_cnn", out=str(run), pretrained="none", batch_size=16,
        kt=StageSettings(epochs=1, lr=1e-2), finetune=StageSettings(epochs=4, lr=3e-3),
        augment=False, device="cpu", early_stopping_patience=0,
    )  # fmt: skip
    train(config, quiet=True, log=lambda msg: None)
    result = localize_run(run, device="cpu")
    return tmp, store, run, result


@pytest.mark.slow
def test_etl_writes_boxes_beside_a_readable_store(localized):
    tmp, store, _, _ = localized
    manifest = read_manifest(store)
    boxes = pd.read_parquet(store / BOXES_NAME)
    bbox = pd.read_csv(tmp / "release" / "BBox_List_2017.csv")
    assert manifest["boxes"]["rows"] == len(boxes) == len(bbox) > 0
    assert sum(manifest["boxes"]["per_finding"].values()) == len(boxes)
    assert "Infiltration" in set(boxes["finding"]) and "Infiltrate" not in set(boxes["finding"])
    # the box file stays out of the hive dataset the README documents
    dataset = ds.dataset(store, format="parquet", partitioning="hive")
    assert all(dataset.schema.field(f.name).type == f.type for f in SCHEMA)


@pytest.mark.slow
def test_heatmaps_beat_the_fixed_box_baseline(localized):
    _, _, _, r = localized
    assert r["method"] == "hirescam" and r["split"] == "test"
    acc, base = r["accuracy_iobb"]["0.5"], r["baseline"]["accuracy_iobb"]["0.5"]
    # the most frequent finding, which the run detects best, and all findings together
    assert r["n_boxes"]["Infiltration"] >= 5
    assert acc["Infiltration"] >= base["Infiltration"] + 0.3
    assert acc["overall"] >= base["overall"] + 0.15
    assert r["baseline"]["boxes"]["Infiltration"]["source"].startswith("mean of")


@pytest.mark.slow
def test_json_matches_a_recomputation_from_boxes_csv(localized):
    tmp, store, run, r = localized
    out = run / "localize-test-best_finetune"
    saved = json.loads((out / "localization.json").read_text())
    assert saved["accuracy_iobb"] == r["accuracy_iobb"]
    # bound to its checkpoint, like an evaluation (the report shows it only while the run holds that file)
    assert saved["checkpoint_sha256"] == file_sha256(run / "best_finetune.pt") and saved["stage"] == "finetune"
    assert localization_status(out / "localization.json", saved) is None
    pred = pd.read_csv(out / "boxes.csv")
    assert pred.groupby(["image_id", "finding"]).size().max() <= saved["max_boxes"] == 3
    assert set(pred["rank"]) <= {1, 2, 3}
    # ground truth: the release's BBox file, restricted to the store's test images
    test_ids = set(ds.dataset(store / "size=32" / "split=test").to_table(columns=["image_id"]).column(0).to_pylist())
    gt = pd.read_csv(tmp / "release" / "BBox_List_2017.csv", skiprows=1, header=None, usecols=range(6))
    gt.columns = ["image_id", "finding", "x", "y", "w", "h"]
    gt = gt[gt["image_id"].isin(test_ids)].replace({"finding": {"Infiltrate": "Infiltration"}})
    assert len(gt) == sum(saved["n_boxes"].values())
    best = []
    for g in gt.itertuples():
        same = pred[(pred["image_id"] == g.image_id) & (pred["finding"] == g.finding)]
        iobb, iou = 0.0, 0.0
        for p in same.itertuples():
            ix = max(0.0, min(g.x + g.w, p.x + p.w) - max(g.x, p.x))
            iy = max(0.0, min(g.y + g.h, p.y + p.h) - max(g.y, p.y))
            inter = ix * iy
            iobb = max(iobb, inter / (p.w * p.h))
            iou = max(iou, inter / (g.w * g.h + p.w * p.h - inter))
        best.append((g.finding, iobb, iou))
    best = pd.DataFrame(best, columns=["finding", "iobb", "iou"])
    for t in IOBB_THRESHOLDS:
        assert saved["accuracy_iobb"][f"{t:g}"]["overall"] == pytest.approx((best["iobb"] >= t - 1e-6).mean(), abs=1e-3)
        for name, rows in best.groupby("finding"):
            assert saved["accuracy_iobb"][f"{t:g}"][name] == pytest.approx((rows["iobb"] >= t - 1e-6).mean(), abs=1e-3)
    for t in IOU_THRESHOLDS:
        assert saved["accuracy_iou"][f"{t:g}"]["overall"] == pytest.approx((best["iou"] >= t - 1e-6).mean(), abs=1e-3)
    for key in (
        "run",
        "checkpoint",
        "checkpoint_sha256",
        "thresholds",
        "wang2017",
        "fp_per_image",
        "unscored",
        "figures",
    ):
        assert key in saved
    assert saved["figures"] and all((out / f).is_file() for f in saved["figures"])
    assert len(saved["sweep"]) == len(saved["thresholds"]["sweep"])


def _bbox_csv(path, rows):
    path.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    )
    return path


def _test_image(store, k=0):
    return sorted(ds.dataset(store / "size=32" / "split=test").to_table(columns=["image_id"]).column(0).to_pylist())[k]


@pytest.mark.slow
def test_unscorable_boxes_are_listed_with_their_reason(localized, tmp_path, capsys):
    _, store, run, _ = localized
    image = _test_image(store)
    csv = _bbox_csv(tmp_path / "boxes.csv", [
        (image, "Mass", 10, 10, 20, 20),
        (image, "Nodule", 50, 50, 30, 30),  # the store image is 64 px: outside
        ("99999999_000.png", "Mass", 1, 1, 5, 5),  # not in the store
        (image, "Edema", 5, 5, 0, 4),  # empty
    ])  # fmt: skip
    rc = main(["localize", "--run", str(run), "--bbox", str(csv), "--out", str(tmp_path / "loc"), "--device", "cpu"])
    assert rc == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("3 boxes not scored") and "box outside the image: 1" in err[0]
    saved = json.loads((tmp_path / "loc" / "localization.json").read_text())
    assert {u["kind"] for u in saved["unscored"]} == {"box outside the image", "image not in the store", "empty box"}
    assert saved["n_boxes"]["Mass"] == 1 and saved["n_boxes"]["Nodule"] == 0
    assert "Nodule" in saved["findings_without_boxes"] and saved["accuracy_iobb"]["0.5"]["Nodule"] is None


@pytest.mark.slow
def test_bad_inputs_are_one_line_each(localized, tmp_path, capsys):
    _, store, run, _ = localized
    train_ids = ds.dataset(store / "size=32" / "split=train").to_table(columns=["image_id"]).column(0).to_pylist()
    train_only = _bbox_csv(tmp_path / "train.csv", [(train_ids[0], "Mass", 1, 1, 5, 5)])
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\nx.png,Mass,1,2,3\n")
    unknown = _bbox_csv(tmp_path / "unknown.csv", [("x.png", "Flu", 1, 1, 2, 2)])
    cases = [
        (["--bbox", str(train_only)], "no boxes to score for the 'test' split"),
        (["--bbox", str(bad)], "malformed row"),
        (["--bbox", str(unknown)], "unknown finding 'Flu'"),
        (["--bbox", str(tmp_path / "none.csv")], "file not found"),
        (["--store", str(tmp_path / "nostore")], "no such store"),
        (["--method", "gradcam", "--out", str(run / "localize-test-best_finetune")], "pass --overwrite"),
        (["--max-boxes", "0"], "--max-boxes must be at least 1"),
        (["--out", str(tmp_path / "file" / "o")], "cannot create the output folder"),
    ]
    (tmp_path / "file").write_text("")
    for extra, message in cases:
        rc = main(["localize", "--run", str(run), "--device", "cpu", "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0], (extra, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_predict_writes_heatmap_overlays(localized, tmp_path, capsys):
    from PIL import Image

    tmp, _, run, _ = localized
    source = tmp / "release" / "images"
    files = sorted(source.glob("*.png"))[:2]
    wide = tmp_path / "wide.png"  # a non-square input: padded to a square by the shared preprocessing
    Image.fromarray(np.pad(np.asarray(Image.open(files[0])), ((0, 0), (0, 30)))).save(wide)
    rc = main(["predict", "--run", str(run), str(files[1]), str(wide), "--json", "--heatmaps", str(tmp_path / "h")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["heatmap_method"] == "hirescam"
    for p in out["predictions"]:
        flagged = [n for n, v in p["probabilities"].items() if v >= 0.5]  # not evaluated: the 0.5 rule
        assert sorted(p["heatmaps"]) == sorted(flagged)
        for name, path in p["heatmaps"].items():
            assert path.endswith(f"-{name}.png") and Image.open(path).size[0] > 300
    assert any(p["heatmaps"] for p in out["predictions"])
    (tmp_path / "file").write_text("")
    rc = main(["predict", "--run", str(run), str(wide), "--heatmaps", str(tmp_path / "file")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a folder" in err[0]


def test_boxes_csv_keeps_every_digit_of_the_boxes(tmp_path):
    """boxes.csv was written with 6 significant digits: an original of 2500 px at a 256 px store gives
    coordinates such as 1234.765625, and IoBB recomputed from the rounded boxes could fall on the other
    side of a threshold than localization.json's."""
    from cxrflow.results.localize import BOXES_CSV, write_outputs

    pred = pd.DataFrame({"image_id": ["a.png", "b.png"], "finding": ["Mass", "Nodule"], "x": [1234.765625, 0.1 + 0.2],
                         "y": [2047.0 / 3, 1e-7], "w": [9.765625 * 7, 1.0 / 3], "h": [2.5, 1234567.125],
                         "score": [0.123456789, 1.0], "threshold": [60.0, 180.0], "rank": [1, 2]})  # fmt: skip
    write_outputs(tmp_path, {"n_boxes": {"Mass": 0}, "method": "hirescam"}, pred, pd.DataFrame(), None, "t")
    back = pd.read_csv(tmp_path / BOXES_CSV)
    for column in ("x", "y", "w", "h", "score"):
        assert back[column].tolist() == pred[column].tolist()


def test_split_ground_truth_sorts_boxes_by_what_can_be_scored():
    from cxrflow.results.localize import split_ground_truth

    boxes = pd.DataFrame({
        "image_id": ["a.png", "a.png", "b.png", "gone.png", "bad.png", "t.png"],
        "finding": ["Mass", "Nodule", "Mass", "Mass", "Mass", "Mass"],
        "x": [1.0, 90.0, 1.0, 1.0, 1.0, 1.0], "y": [1.0] * 6, "w": [5.0] * 6, "h": [5.0] * 6,
    })  # fmt: skip
    images = pd.DataFrame({"image_id": ["a.png", "b.png", "t.png"], "orig_width": [64, 64, 64],
                           "orig_height": [64, 64, 64], "split": ["test", "test", "train"]})  # fmt: skip
    manifest = {"missing": ["gone.png"], "quarantined": [{"image_id": "bad.png", "reason": "truncated PNG"}]}
    gt, unscored, other = split_ground_truth(boxes, images, "test", ["Mass", "Nodule"], manifest)
    assert gt[["image_id", "finding"]].values.tolist() == [["a.png", "Mass"], ["b.png", "Mass"]]
    assert gt["orig_width"].tolist() == [64, 64] and other == {"train": 1}
    reasons = {u["image_id"] + "/" + u["finding"]: u["reason"] for u in unscored}
    assert reasons["a.png/Nodule"].startswith("box x=90..95") and "64x64" in reasons["a.png/Nodule"]
    assert "missing on disk" in reasons["gone.png/Mass"] and "truncated PNG" in reasons["bad.png/Mass"]
