"""Patient-level splits: official lists and the 70/10/20 fallback; never a patient in two splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrflow.cli import main
from cxrflow.data.metadata import read_data_entry
from cxrflow.data.split import MODE_OFFICIAL, MODE_PATIENTS, assign_splits, split_counts
from cxrflow.data.synth import TEST_NAME, TRAIN_VAL_NAME, sample_entries, write_data_entry
from cxrflow.errors import CxrflowError


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Metadata of 200 synthetic patients (no pixels) and its official lists, by patient."""
    root = tmp_path_factory.mktemp("release")
    raw, _, test_patients = sample_entries(200, np.random.default_rng(7))
    write_data_entry(raw, root / "Data_Entry_2017_v2020.csv")
    entries = read_data_entry(root / "Data_Entry_2017_v2020.csv")
    is_test = entries["patient_id"].isin(test_patients)
    test = entries["image_id"][is_test].tolist()
    train_val = entries["image_id"][~is_test].tolist()
    (root / TRAIN_VAL_NAME).write_text("\n".join(train_val) + "\n")
    (root / TEST_NAME).write_text("\n".join(test) + "\n")
    return root, entries, train_val, test


def assert_patient_disjoint(frame: pd.DataFrame) -> None:
    per_patient = frame.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all(), per_patient[per_patient > 1]


def test_official_lists(release):
    _, entries, train_val, test = release
    frame = assign_splits(entries, train_val, test, val_fraction=0.3, seed=0)
    assert frame.attrs["mode"] == MODE_OFFICIAL
    assert frame["image_id"].tolist() == entries["image_id"].tolist()
    assert set(frame.loc[frame["split"] == "test", "image_id"]) == set(test)
    assert_patient_disjoint(frame)
    counts = split_counts(frame)
    tv_patients = counts["train"]["patients"] + counts["val"]["patients"]
    assert counts["val"]["patients"] == round(0.3 * tv_patients)
    assert sum(c["images"] for c in counts.values()) == len(entries)


def test_fallback_70_10_20(release):
    _, entries, _, _ = release
    frame = assign_splits(entries, None, None, seed=0)
    assert frame.attrs["mode"] == MODE_PATIENTS
    assert_patient_disjoint(frame)
    counts = split_counts(frame)
    assert [counts[s]["patients"] for s in ("train", "val", "test")] == [140, 20, 40]


def test_seeded_reproducible_and_independent_of_row_order(release):
    _, entries, train_val, test = release
    for tv, te in ((train_val, test), (None, None)):
        a = assign_splits(entries, tv, te, seed=3)
        b = assign_splits(entries, tv, te, seed=3)
        c = assign_splits(entries, tv, te, seed=4)
        shuffled = entries.sample(frac=1.0, random_state=0)
        d = assign_splits(shuffled, tv, te, seed=3)
        pd.testing.assert_frame_equal(a, b)
        assert not a["split"].equals(c["split"])
        assert d.set_index("image_id")["split"].sort_index().equals(a.set_index("image_id")["split"].sort_index())


def test_tiny_patient_counts_fill_every_split():
    entries = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "patient_id": [1, 2, 3, 3]})
    frame = assign_splits(entries, None, None, seed=0)
    assert sorted(frame.drop_duplicates("patient_id")["split"]) == ["test", "train", "val"]
    assert_patient_disjoint(frame)


def test_bad_input_is_a_user_error(release):
    _, entries, train_val, test = release
    with pytest.raises(CxrflowError, match="val-fraction"):
        assign_splits(entries, train_val, test, val_fraction=1.0)
    with pytest.raises(CxrflowError, match="both official lists"):
        assign_splits(entries, train_val, None)
    with pytest.raises(CxrflowError, match="in both official lists"):
        assign_splits(entries, train_val, test + [train_val[0]])
    moved = entries.loc[entries["image_id"] == test[0], "patient_id"].iloc[0]
    other = entries.loc[entries["patient_id"] != moved, "image_id"].iloc[0]
    with pytest.raises(CxrflowError, match="has images in both official lists"):
        # put one test patient's image in train_val (and keep every image listed once)
        assign_splits(
            entries, [i for i in train_val if i != other] + [test[0]], [i for i in test if i != test[0]] + [other]
        )


def test_cli_official_lists_then_refuses_overwrite(release, tmp_path, capsys):
    root, entries, _, test = release
    out = tmp_path / "split.csv"
    assert main(["split", "--data", str(root), "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "official lists" in printed and "test" in printed
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["image_id", "patient_id", "split"] and len(frame) == len(entries)
    assert set(frame.loc[frame["split"] == "test", "image_id"]) == set(test)
    assert_patient_disjoint(frame)
    assert main(["split", "--data", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and "--overwrite" in err[0]
    assert main(["split", "--data", str(root), "--out", str(out), "--overwrite", "--seed", "2"]) == 0


def test_cli_without_lists_says_so(release, tmp_path, capsys):
    root, _, _, _ = release
    data = tmp_path / "nolists"
    data.mkdir()
    (data / "Data_Entry_2017_v2020.csv").write_bytes((root / "Data_Entry_2017_v2020.csv").read_bytes())
    assert main(["split", "--data", str(data), "--out", str(tmp_path / "s.csv")]) == 0
    assert "70/10/20" in capsys.readouterr().out
    assert_patient_disjoint(pd.read_csv(tmp_path / "s.csv"))
