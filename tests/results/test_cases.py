import numpy as np
import pyarrow.parquet as pq

from cxrflow.data.store import split_dir
from cxrflow.results.cases import case_set, overlay, read_pixels, select_cases, thumbnail_size
from cxrflow.testing.synthstore import write_synthetic_store


def test_select_cases_hand_computed():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.1, 0.5]])
    labels = np.array([[1, 0], [0, 1], [0, 0], [1, 1], [0, 0]])
    (a, b) = select_cases(probs, labels, 2)
    assert a["fp"].tolist() == [2, 1]  # negatives 1, 2, 4 by probability, highest first
    assert a["fn"].tolist() == [3, 0]  # positives 0, 3, lowest first
    assert a["tp"].tolist() == [0, 3]
    assert b["fp"].tolist() == [4, 2] and b["fn"].tolist() == [3, 1] and b["tp"].tolist() == [1, 3]
    # an unknown label keeps the image out of that finding's cases
    known = np.ones_like(labels)
    known[2, 0] = 0
    assert select_cases(probs, labels, 2, known)[0]["fp"].tolist() == [1, 4]


def test_read_pixels_returns_exactly_the_wanted_images(tmp_path):
    store = tmp_path / "store"
    write_synthetic_store(
        store, sizes=(32,), rows={"train": 8, "val": 4, "test": 40}, rows_per_file=16, row_group_rows=4
    )
    part = split_dir(store, 32, "test")
    table = pq.read_table(part, columns=["image_id", "pixels"])
    truth = dict(zip(table.column("image_id").to_pylist(), table.column("pixels").to_pylist()))
    wanted = ["test_000003.png", "test_000017.png", "test_000039.png", "not_there.png"]
    got = read_pixels(part, 32, wanted)
    assert sorted(got) == wanted[:3]
    for image_id, pixels in got.items():
        assert pixels.shape == (32, 32) and pixels.tobytes() == truth[image_id]


def test_thumbnail_size_prefers_small_store_sizes():
    assert thumbnail_size([64, 256, 512], 512, need_model_input=False) == 256
    assert thumbnail_size([32, 64], 64, need_model_input=False) == 64
    assert thumbnail_size([256, 512], 512, need_model_input=True) == 512


def test_overlay_colours_only_where_the_heatmap_is():
    image = np.full((8, 8), 100, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[2:4, 2:4] = 1.0
    out = overlay(image, heat)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all() and not (out[2, 2] == 100).all()


def test_case_set_without_and_with_images():
    probs = np.array([[0.9], [0.2], [0.7], [0.4]])
    labels = np.array([[1], [0], [0], [1]])
    pred = {"image_id": ["a", "b", "c", "d"], "probs": probs, "labels": labels}
    result = case_set(pred, ["Mass"], 1, thresholds={"Mass": 0.5})
    kinds = {k["key"]: k["items"] for k in result["findings"][0]["kinds"]}
    assert kinds["fp"][0]["image_id"] == "c" and kinds["fp"][0]["called"] is True
    assert kinds["fn"][0]["image_id"] == "d" and kinds["fn"][0]["called"] is False
    assert "uri" not in kinds["fp"][0] and result["note"] is None

    def read(ids):
        return {i: np.zeros((16, 16), np.uint8) for i in ids if i != "d"}, "d is gone"

    result = case_set(pred, ["Mass"], 1, read=read, heatmaps=lambda img, j: np.ones(img.shape, np.float32))
    kinds = {k["key"]: k["items"] for k in result["findings"][0]["kinds"]}
    assert kinds["fp"][0]["uri"].startswith("data:image/png;base64,") and "overlay_uri" in kinds["fp"][0]
    assert "uri" not in kinds["fn"][0] and result["note"] == "d is gone" and result["overlays"]


def test_case_predictions_carry_unknown_labels(tmp_path):
    import pyarrow as pa

    from cxrflow.results.htmlreport import read_case_predictions

    table = pa.table({"image_id": ["a", "b"], "patient_id": pa.array([1, 2], pa.int64()), "prob_Mass": pa.array([0.9, 0.1], pa.float32()),
                      "label_Mass": pa.array([0, 1], pa.uint8()), "known_Mass": pa.array([0, 1], pa.uint8())})  # fmt: skip
    pq.write_table(table, tmp_path / "p.parquet")
    pred, names = read_case_predictions(tmp_path / "p.parquet")
    assert names == ["Mass"] and pred["known"].tolist() == [[0], [1]]
    assert select_cases(pred["probs"], pred["labels"], 2, pred["known"])[0]["fp"].tolist() == []  # 'a' is not known
    pq.write_table(table.drop(["known_Mass"]), tmp_path / "q.parquet")
    assert read_case_predictions(tmp_path / "q.parquet")[0]["known"] is None


def test_false_positives_and_negatives_are_wrong_calls_at_the_threshold_or_none():
    probs = np.array([[0.95], [0.9], [0.3], [0.6], [0.2]])
    labels = np.array([[1], [1], [0], [0], [0]])
    # threshold 0.5: one false positive (0.6), no false negative; the positives are correct calls, never "false"
    (chosen,) = select_cases(probs, labels, 3, thresholds=[0.5])
    assert chosen["fp"].tolist() == [3] and chosen["fn"].tolist() == [] and chosen["tp"].tolist() == [0, 1]
    pred = {"image_id": list("abcde"), "probs": probs, "labels": labels}
    result = case_set(pred, ["Mass"], 3, thresholds={"Mass": 0.81})
    kinds = {k["key"]: k for k in result["findings"][0]["kinds"]}
    assert [i["image_id"] for i in kinds["fp"]["items"]] == [] and kinds["fp"][
        "empty"
    ] == "no false positives at threshold 0.81"
    assert kinds["fn"]["items"] == [] and kinds["fn"]["empty"] == "no false negatives at threshold 0.81"
    assert all(i["called"] for i in kinds["tp"]["items"])
    # without a threshold nothing is called: the kinds are named as rankings, not as errors
    result = case_set(pred, ["Mass"], 1)
    titles = [k["title"] for k in result["findings"][0]["kinds"]]
    assert titles[:2] == ["Highest-scored negatives", "Lowest-scored positives"]
