"""The demographics-only baseline of every evaluation (cxrflow.results.demographics_baseline): a tiny
store whose answers can be checked by hand, fields a store lacks, the shortcut rule and its words."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrflow.data.store import SCHEMA, split_dir
from cxrflow.results.demographics_baseline import (
    demographics_only,
    format_lines,
    fusion_comparison,
    shortcut_findings,
    shortcut_sentences,
)
from cxrflow.results.evaluate import bootstrap_auc_ci

NAMES = ["Female", "Old", "Noise"]


def _write(store, split: str, rows: list[tuple], first_patient: int) -> dict:
    """rows: (age, sex, view, labels); one patient per image."""
    n = len(rows)
    table = pa.table(
        {
            "image_id": [f"{split}_{i}.png" for i in range(n)],
            "patient_id": pa.array(range(first_patient, first_patient + n), pa.int64()),
            "labels": pa.array([list(r[3]) for r in rows], pa.list_(pa.uint8())),
            "age": pa.array([r[0] for r in rows], pa.int16()),
            "sex": pa.array([r[1] for r in rows], pa.string()),
            "view": pa.array([r[2] for r in rows], pa.string()),
            "follow_up": pa.array([0] * n, pa.int32()),
            "orig_width": pa.array([8] * n, pa.int32()),
            "orig_height": pa.array([8] * n, pa.int32()),
            "pixels": pa.array([bytes(64)] * n, pa.binary()),
        },
        schema=SCHEMA,
    )
    folder = split_dir(store, 8, split)
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    return {
        "image_id": table.column("image_id").to_pylist()[::-1],  # the evaluation's order need not be the store's
        "patient_id": np.arange(first_patient, first_patient + n)[::-1],
        "labels": np.array([r[3] for r in rows], np.float32)[::-1],
        "known": np.ones((n, 3), np.float32),
    }


def _row(age, sex, view, noise):
    """Female: 1 exactly for women; Old: 1 exactly above 50 years; Noise: given."""
    return (age, sex, view, (int(sex == "F"), int(age is not None and age > 50), noise))


@pytest.fixture
def tiny(tmp_path):
    train = [
        _row(a, s, v, n)
        for a, s, v, n in [
            (20, "M", "PA", 1),
            (30, "F", "AP", 0),
            (40, "M", "AP", 1),
            (45, "F", "PA", 0),
            (60, "M", "PA", 0),
            (70, "F", "AP", 1),
            (80, "M", "AP", 0),
            (85, "F", "PA", 1),
        ]
    ]
    test = [
        _row(a, s, v, n)
        for a, s, v, n in [(25, "M", "PA", 1), (35, "F", "PA", 0), (65, "M", "AP", 0), (75, "F", "AP", 1)]
    ]
    _write(tmp_path / "s", "train", train, 1)
    return tmp_path / "s", _write(tmp_path / "s", "test", test, 100)


def test_baseline_by_hand(tiny):
    store, evaluated = tiny
    model_auc = {"Female": 0.90, "Old": 1.0, "Noise": 0.5}
    demo = demographics_only(store, 8, "test", NAMES, evaluated, model_auc, interval=bootstrap_auc_ci, n_boot=200)
    # sex alone separates Female, age alone separates Old: AUC 1 in every resample, so the interval is [1, 1]
    assert demo["auc"]["Female"] == 1.0 and demo["auc"]["Old"] == 1.0
    assert demo["auc_low"]["Female"] == demo["auc_high"]["Female"] == 1.0
    # shortcut: lower bound above 0.6 and AUC >= model's - 0.05 (Female 1.0 >= 0.85; Old 1.0 >= 0.95)
    assert demo["shortcut"] == ["Female", "Old"]
    assert demo["fields"] == ["age", "sex", "view"] and demo["left_out"] == [] and "note" not in demo
    assert demo["fitted_on"] == {"split": "train", "images": 8}


def test_recomputed_from_the_same_fit_and_same_interval(tiny):
    from cxrflow.metrics import per_class_auc
    from cxrflow.modelling.fusion import fit_logistic, logistic_scores, read_split_demographics

    store, evaluated = tiny
    demo = demographics_only(store, 8, "test", NAMES, evaluated, {}, interval=bootstrap_auc_ci, n_boot=50, seed=3)
    train = read_split_demographics(store, 8, "train", NAMES)
    test = read_split_demographics(store, 8, "test", NAMES)
    scores = logistic_scores(fit_logistic(train["demographics"], train["labels"]), test["demographics"])
    assert demo["auc"]["Noise"] == pytest.approx(per_class_auc(test["labels"], scores)[2])
    ci = bootstrap_auc_ci(test["labels"][::-1], scores[::-1], test["patient_id"][::-1], n_boot=50, seed=3)
    assert [demo["auc_low"]["Noise"], demo["auc_high"]["Noise"]] == pytest.approx(ci["auc_ci"][2])
    assert demo["shortcut"] == []  # no model AUC to compare with: never a shortcut


def test_a_field_the_store_lacks_is_left_out_and_said(tmp_path):
    train = [_row(None, s, "PA", n) for s, n in [("M", 1), ("F", 0), ("M", 0), ("F", 1), ("M", 1), ("F", 1)]]
    _write(tmp_path / "s", "train", train, 1)
    evaluated = _write(tmp_path / "s", "test", [_row(None, s, "PA", 0) for s in "MFMF"], 100)
    demo = demographics_only(tmp_path / "s", 8, "test", NAMES, evaluated, {}, interval=bootstrap_auc_ci, n_boot=20)
    assert demo["fields"] == ["sex", "view"] and demo["left_out"] == ["age"]
    assert demo["note"] == "the store has no age: left out of the demographics-only baseline"
    assert demo["auc"]["Female"] == 1.0 and demo["auc"]["Old"] is None  # Old: no positives in test
    assert "note: the store has no age" in "\n".join(format_lines({"demographics_only": demo}))


def test_a_store_without_demographics_skips_and_says_so(tmp_path):
    train = [(None, None, None, (i % 2, 0, 1)) for i in range(6)]
    _write(tmp_path / "s", "train", train, 1)
    evaluated = _write(tmp_path / "s", "test", train[:4], 100)
    demo = demographics_only(tmp_path / "s", 8, "test", NAMES, evaluated, {}, interval=bootstrap_auc_ci, n_boot=20)
    assert (
        demo["skipped"].startswith("the store has no age, sex or view") and demo["auc"] == {} and demo["shortcut"] == []
    )
    assert format_lines({"demographics_only": demo}) == [f"demographics-only baseline skipped: {demo['skipped']}"]


def test_shortcut_rule_at_its_edges():
    names = ["A", "B", "C", "D", "E"]
    auc = {"A": 0.88, "B": 0.88, "C": 0.70, "D": 0.75, "E": None}
    low = {"A": 0.84, "B": 0.60, "C": 0.65, "D": 0.61, "E": None}
    model = {"A": 0.60, "B": 0.60, "C": 0.76, "D": 0.80, "E": 0.7}
    # B: lower bound not above 0.6; C: 0.70 < 0.76 - 0.05; D: 0.75 >= 0.80 - 0.05 (on the edge); E: no AUC
    assert shortcut_findings(names, auc, low, model) == ["A", "D"]


def test_shortcut_sentence_in_plain_words():
    metrics = {
        "auc": {"Hernia": 0.60},
        "demographics_only": {
            "auc": {"Hernia": 0.88},
            "auc_low": {"Hernia": 0.84},
            "auc_high": {"Hernia": 0.91},
            "shortcut": ["Hernia"],
            "fields": ["age", "sex", "view"],
        },
    }
    assert shortcut_sentences(metrics) == [
        (
            "Hernia: age, sex and view alone give AUC 0.88 [0.84, 0.91], the model 0.60: "
            "much of what it could learn here is who the patient is"
        )
    ]


def test_fusion_comparison_needs_both_kinds():
    demo = {"auc": {"A": 0.8, "B": 0.5}}
    plain = {
        "fusion": "none",
        "split": "test",
        "label_names": ["A", "B"],
        "auc": {"A": 0.7, "B": 0.9},
        "run_name": "p",
        "demographics_only": demo,
    }
    fused = {**plain, "fusion": "demographics", "auc": {"A": 0.85, "B": 0.89}, "run_name": "f"}
    assert fusion_comparison([plain]) is None and fusion_comparison([fused]) is None
    table = fusion_comparison([fused, plain])
    assert [(r["name"], r["image_only"], r["fused"], r["demographics_only"]) for r in table["rows"]] == [
        ("A", 0.7, 0.85, 0.8),
        ("B", 0.9, 0.89, 0.5),
    ]
    assert table["rows"][0]["margin"] == pytest.approx(0.05) and table["rows"][1]["margin"] == pytest.approx(-0.01)


def test_a_store_without_its_training_split_skips_and_says_so(tmp_path):
    evaluated = _write(tmp_path / "s", "test", [_row(30, "F", "PA", 0)] * 2, 100)
    demo = demographics_only(tmp_path / "s", 8, "test", NAMES, evaluated, {}, interval=bootstrap_auc_ci, n_boot=20)
    assert demo["skipped"] == "the store has no training split at size 8 to fit it on" and demo["auc"] == {}
