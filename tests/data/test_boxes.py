"""Box arithmetic of the localization benchmark, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrflow.data.boxes import (
    CENTRE_BOX,
    baseline_predictions,
    box_problem,
    evaluate_boxes,
    mean_boxes,
    normalise255,
    overlaps,
    predicted_boxes,
    read_boxes,
    region_boxes,
    write_boxes,
)
from cxrflow.errors import CxrflowError


def _frame(rows):
    return pd.DataFrame(rows, columns=["image_id", "finding", "x", "y", "w", "h"])


def test_iou_and_iobb_hand_computed():
    gt = [[0, 0, 10, 10]]
    pred = [[5, 0, 10, 10], [2, 2, 4, 4], [20, 20, 5, 5]]
    iou, iobb = overlaps(gt, pred)
    # half overlap: 50 / (100 + 100 - 50); a box inside the ground truth: IoBB 1, IoU 16/100; disjoint: 0
    np.testing.assert_allclose(iou, [[50 / 150, 0.16, 0.0]])
    np.testing.assert_allclose(iobb, [[0.5, 1.0, 0.0]])


def test_region_boxes_bound_each_connected_region():
    heat = np.zeros((20, 30))
    heat[2:5, 3:9] = 200.0  # region 1: x 3..9, y 2..5
    heat[10:16, 20:22] = 100.0  # region 2
    heat[16, 22] = 100.0  # touches region 2 diagonally: 8-connected, same region
    boxes = region_boxes(heat, 60)
    assert [b[:4] for b in boxes] == [(3.0, 2.0, 6.0, 3.0), (20.0, 10.0, 3.0, 7.0)]
    assert [b[4] for b in boxes] == [200.0, 100.0]
    assert [b[:4] for b in region_boxes(heat, 180)] == [(3.0, 2.0, 6.0, 3.0)]
    assert region_boxes(np.zeros((4, 4)), 60) == []


def test_predicted_boxes_pool_thresholds_rank_by_peak_and_cap():
    heat = np.zeros((40, 40))
    heat[5:25, 5:25] = 0.4  # wide region; its core is the peak
    heat[10:14, 10:14] = 1.0
    heat[30:33, 30:33] = 0.5  # a weaker second region
    heat[36:38, 2:4] = 0.3
    boxes = predicted_boxes(heat, (60, 180), max_boxes=None)
    first = boxes[0]
    assert (first["x"], first["y"], first["w"], first["h"], first["score"]) == (
        10,
        10,
        4,
        4,
        1.0,
    )  # tight 180-box first
    assert (boxes[1]["x"], boxes[1]["w"]) == (5, 20)  # same peak, wider 60-box next
    assert boxes[2]["score"] == pytest.approx(0.5)
    assert len(boxes) == 4
    assert len(predicted_boxes(heat, (60, 180), max_boxes=2)) == 2
    assert predicted_boxes(np.full((5, 5), 0.7)) == []  # a flat map has no region
    np.testing.assert_allclose(normalise255(np.array([1.0, 2.0, 3.0])), [0, 127.5, 255])


def test_accuracy_fp_and_pairs():
    gt = _frame([
        ("a.png", "Mass", 0, 0, 10, 10),
        ("a.png", "Mass", 50, 50, 10, 10),  # second box of the same image and finding
        ("b.png", "Mass", 0, 0, 10, 10),
        ("b.png", "Nodule", 0, 0, 10, 10),
    ])  # fmt: skip
    pred = _frame([
        ("a.png", "Mass", 0, 0, 10, 10),  # matches the first box exactly
        ("a.png", "Mass", 80, 80, 5, 5),  # false positive
        ("b.png", "Mass", 5, 0, 10, 10),  # IoBB 0.5, IoU 1/3
        ("b.png", "Nodule", 30, 30, 5, 5),  # miss (and a false positive)
    ])  # fmt: skip
    r = evaluate_boxes(gt, pred, ["Mass", "Nodule", "Edema"])
    np.testing.assert_allclose(r["scored"]["best_iobb"], [1.0, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(r["scored"]["best_iou"], [1.0, 0.0, 1 / 3, 0.0])
    assert r["accuracy_iobb"]["0.5"] == {"Mass": pytest.approx(2 / 3), "Nodule": 0.0, "Edema": None, "overall": 0.5}
    assert r["accuracy_iobb"]["0.75"]["Mass"] == pytest.approx(1 / 3)
    assert r["accuracy_iou"]["0.3"]["overall"] == 0.5 and r["accuracy_iou"]["0.4"]["overall"] == 0.25
    # FP at T(IoBB)=0.5: pair (a, Mass) 1, (b, Mass) 0, (b, Nodule) 1 -> Mass 0.5 per image, Nodule 1
    assert r["fp_per_image_by_iobb"]["0.5"] == {
        "Mass": 0.5,
        "Nodule": 1.0,
        "Edema": None,
        "overall": pytest.approx(2 / 3),
    }
    assert r["fp_per_image_by_iobb"]["0.75"]["Mass"] == 1.0  # the IoBB-0.5 box counts as false too
    # without predicted boxes every ground-truth box scores 0
    empty = evaluate_boxes(gt, pred.iloc[:0], ["Mass"])
    assert empty["accuracy_iobb"]["0.1"]["overall"] == 0.0 and empty["fp_per_image_by_iobb"]["0.1"]["Mass"] == 0.0


def test_baseline_mean_box_else_centre():
    dims = pd.DataFrame({"image_id": ["t1", "t2", "x"], "orig_width": [100, 200, 400], "orig_height": [100, 100, 200]})
    train = _frame([("t1", "Mass", 10, 20, 30, 40), ("t2", "Mass", 20, 20, 60, 40)])
    fixed = mean_boxes(train, dims, ["Mass", "Nodule"])
    assert fixed["Mass"]["box"] == pytest.approx([0.1, 0.2, 0.3, 0.4]) and "2 train boxes" in fixed["Mass"]["source"]
    assert fixed["Nodule"]["box"] == list(CENTRE_BOX)
    gt = _frame([("x", "Mass", 0, 0, 1, 1), ("x", "Mass", 5, 5, 1, 1), ("x", "Nodule", 0, 0, 1, 1)])
    base = baseline_predictions(gt, dims, fixed)
    assert len(base) == 2  # one box per image and finding
    np.testing.assert_allclose(base[["x", "y", "w", "h"]].to_numpy(), [[40, 40, 120, 80], [100, 50, 200, 100]])


def test_box_problems_named():
    assert box_problem(0, 0, 10, 10, 10, 10) is None
    assert box_problem(-0.5, 0, 10.4, 10, 10, 10) is None  # within a pixel of the edge
    assert box_problem(5, 5, 10, 10, 10, 10)[0] == "box outside the image"
    assert box_problem(0, 0, 0, 3, 10, 10)[0] == "empty box"
    assert box_problem(0, float("nan"), 1, 1, 10, 10)[0] == "non-finite box"


def test_box_file_round_trip_and_errors(tmp_path):
    frame = _frame([("a.png", "Mass", 1.5, 2, 3, 4), ("b.png", "Infiltration", 0, 0, 5, 5)])
    entry = write_boxes(tmp_path, frame)
    assert entry == {"file": "_boxes.parquet", "rows": 2, "per_finding": {"Infiltration": 1, "Mass": 1}}
    pd.testing.assert_frame_equal(read_boxes(tmp_path, None), frame, check_dtype=False)
    with pytest.raises(CxrflowError, match="no _boxes.parquet.*--bbox"):
        read_boxes(tmp_path / "nothing", None)
    csv = tmp_path / "BBox_List_2017.csv"
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Infiltrate,1,2,3,4\nb.png,Mass,1,2,three,4\n")
    with pytest.raises(CxrflowError) as err:
        read_boxes(None, csv)
    assert "line 3" in str(err.value) or ":3:" in str(err.value)
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Infiltrate,1,2,3,4\n")
    assert read_boxes(None, csv)["finding"].tolist() == ["Infiltration"]
