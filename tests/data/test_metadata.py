"""The NIH metadata layer on the release's own head files and on every kind of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrflow.cli import main
from cxrflow.data.labels import NIH14, LabelVocabulary
from cxrflow.data.metadata import (
    find_images,
    label_matrix,
    load_release,
    read_bbox,
    read_data_entry,
    read_image_list,
)
from cxrflow.errors import CxrflowError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "nih"
V2020 = FIXTURES / "Data_Entry_2017_v2020.head.csv"
ORIGINAL = FIXTURES / "Data_Entry_2017.head.csv"
BBOX = FIXTURES / "BBox_List_2017.head.csv"


def head_lines() -> list[str]:
    return V2020.read_text().splitlines()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_v2020_head_parses_with_the_right_values():
    df = read_data_entry(V2020)
    assert len(df) == 30
    assert list(df.columns[:11]) == [
        "image_id", "finding_labels", "follow_up", "patient_id", "age", "sex", "view",
        "orig_width", "orig_height", "spacing_x", "spacing_y",
    ]  # fmt: skip
    assert list(df.columns[11:]) == list(NIH14.names)
    assert df["follow_up"].dtype == np.int32 and df["patient_id"].dtype == np.int64
    assert df["age"].dtype == np.int16 and df["orig_width"].dtype == np.int32
    assert all(df[n].dtype == np.uint8 for n in NIH14.names)
    row = df.set_index("image_id").loc["00000001_001.png"]
    assert NIH14.decode(row[list(NIH14.names)].to_numpy()) == ["Cardiomegaly", "Emphysema"]
    assert (row["patient_id"], row["age"], row["follow_up"], row["sex"], row["view"]) == (1, 58, 1, "M", "PA")
    assert (row["orig_width"], row["orig_height"]) == (2894, 2729)
    assert row["spacing_x"] == pytest.approx(0.143)
    assert label_matrix(df)[3].sum() == 0  # 00000002_000.png: No Finding
    assert df["image_id"].iloc[11] == "00000003_000.png" and df["follow_up"].iloc[11] == 7  # file order kept
    assert df.set_index("image_id").loc["00000004_000.png", "view"] == "AP"


def test_label_columns_match_per_row_parsing():
    """Vectorised label encoding equals parsing every row on its own (labels from metadata only)."""
    df = read_data_entry(V2020)
    expected = np.stack([NIH14.encode(NIH14.parse(t)) for t in df["finding_labels"]])
    np.testing.assert_array_equal(label_matrix(df), expected)


def test_original_format_with_trailing_column_and_short_spacing():
    old, new = read_data_entry(ORIGINAL), read_data_entry(V2020)
    assert ORIGINAL.read_text().splitlines()[1].endswith(",")
    pd.testing.assert_frame_equal(
        old.drop(columns=["spacing_x", "spacing_y"]), new.drop(columns=["spacing_x", "spacing_y"])
    )
    np.testing.assert_allclose(old["spacing_x"], new["spacing_x"])


def test_original_format_value_in_trailing_column(tmp_path):
    lines = ORIGINAL.read_text().splitlines()
    lines[4] += "oops"
    with pytest.raises(CxrflowError, match="unexpected value 'oops' after the last column") as info:
        read_data_entry(write_lines(tmp_path / "Data_Entry_2017.csv", lines))
    assert info.value.line == 5


def test_bbox_head_and_infiltrate_alias(tmp_path):
    boxes = read_bbox(BBOX)
    assert list(boxes.columns) == ["image_id", "finding", "x", "y", "w", "h"] and len(boxes) == 20
    assert boxes.iloc[0]["image_id"] == "00013118_008.png"
    assert boxes.iloc[0][["x", "y", "w", "h"]].tolist() == pytest.approx(
        [225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661]
    )
    lines = BBOX.read_text().splitlines()
    lines[2] = lines[2].replace("Atelectasis", "Infiltrate")
    assert read_bbox(write_lines(tmp_path / "b.csv", lines))["finding"].iloc[1] == "Infiltration"


def test_another_vocabulary_describes_another_label_set(tmp_path):
    lines = head_lines()[:4]
    lines[1:] = [
        line.replace("Cardiomegaly|Emphysema", "Emphysema").replace("Cardiomegaly|Effusion", "Effusion")
        for line in lines[1:]
    ]
    vocab = LabelVocabulary(("Effusion", "Emphysema", "Cardiomegaly"))
    df = read_data_entry(write_lines(tmp_path / "d.csv", lines), vocab)
    assert list(df.columns[11:]) == ["Effusion", "Emphysema", "Cardiomegaly"]
    assert label_matrix(df, vocab).tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0]]


def _drop_age(lines):
    return [",".join(p for k, p in enumerate(line.split(",")) if k != 4) for line in lines]


def _set(row: int, field: int, value: str):
    """Edit data row ``row`` (0-based) field ``field``."""

    def edit(lines):
        parts = lines[row + 1].split(",")
        parts[field] = value
        lines[row + 1] = ",".join(parts)
        return lines

    return edit


def _append(row: int, text: str):
    def edit(lines):
        lines[row + 1] += text
        return lines

    return edit


def _truncate(row: int):
    def edit(lines):
        lines[row + 1] = lines[row + 1].rsplit(",", 1)[0]
        return lines

    return edit


def _blank_then(edit_fn):
    def edit(lines):
        lines = edit_fn(lines)
        return lines[:3] + [""] + lines[3:]  # a blank line after line 3 must not shift line numbers

    return edit


BAD_DATA_ENTRY = [
    ("missing column", _drop_age, 1, "missing column 'Patient Age'"),
    ("unknown finding", _set(4, 1, "Hernia|Flu"), 6, "unknown finding 'Flu'"),
    ("non-numeric age", _set(1, 4, "58Y"), 3, "'Patient Age' must be an integer, got '58Y'"),
    ("non-numeric id", _set(6, 3, "three"), 8, "'Patient ID' must be an integer"),
    ("non-numeric width", _set(2, 7, "wide"), 4, "'OriginalImage[Width,Height]' must be an integer"),
    ("non-numeric spacing", _set(2, 10, "0.1x"), 4, "'OriginalImagePixelSpacing[x,y]' must be a number"),
    ("too many columns", _append(7, ",extra"), 9, "expected 11 columns, found 12"),
    ("too few columns", _truncate(9), 11, "expected 11 columns, found 10"),
    ("value after last column", _append(8, ",,x"), 10, "expected 11 columns, found 13"),
    ("empty labels", _set(3, 1, ""), 5, "empty 'Finding Labels'"),
    (
        "duplicate image",
        _set(12, 0, "00000001_002.png"),
        14,
        "duplicate Image Index '00000001_002.png' (first on line 4)",
    ),
    ("bad sex", _set(5, 5, "X"), 7, "'Patient Gender' must be one of M/F"),
    ("bad view", _set(5, 6, "LL"), 7, "'View Position' must be one of PA/AP"),
    (
        "id beyond int64",
        _set(5, 3, "99999999999999999999"),
        7,
        "'Patient ID' = 99999999999999999999 does not fit a 64-bit integer",
    ),
    ("NaN spacing", _set(5, 9, "nan"), 7, "'OriginalImagePixelSpacing[x,y]' must be a finite number, got 'nan'"),
    ("infinite spacing", _set(5, 10, "inf"), 7, "must be a finite number, got 'inf'"),
    ("age beyond int64", _set(5, 4, "1" + "0" * 20), 7, "does not fit a 64-bit integer"),
    ("blank line then bad age", _blank_then(_set(20, 4, "old")), 23, "'Patient Age' must be an integer"),
    ("blank line then duplicate", _blank_then(_set(25, 0, "00000005_000.png")), 28, "duplicate Image Index"),
]


@pytest.mark.parametrize("name,edit,line,message", BAD_DATA_ENTRY, ids=[c[0] for c in BAD_DATA_ENTRY])
def test_bad_data_entry_names_file_and_line(tmp_path, name, edit, line, message):
    path = write_lines(tmp_path / "Data_Entry_2017_v2020.csv", edit(head_lines()))
    with pytest.raises(CxrflowError) as info:
        read_data_entry(path)
    assert info.value.path == str(path)
    assert info.value.line == line
    assert message in info.value.message


def test_bad_bbox_rows(tmp_path):
    lines = BBOX.read_text().splitlines()
    bad = lines.copy()
    bad[5] = bad[5].replace("Atelectasis", "Atelectasiss")
    with pytest.raises(CxrflowError, match="unknown finding 'Atelectasiss'") as info:
        read_bbox(write_lines(tmp_path / "b.csv", bad))
    assert info.value.line == 6
    bad = lines.copy()
    bad[3] = bad[3].rsplit(",", 2)[0]
    with pytest.raises(CxrflowError, match="expected 6 columns, found 4") as info:
        read_bbox(write_lines(tmp_path / "b.csv", bad))
    assert info.value.line == 4
    with pytest.raises(CxrflowError, match="missing column 'Bbox"):
        read_bbox(write_lines(tmp_path / "b.csv", ["Image Index,Finding Label,x,y,w,h"] + lines[1:]))


def make_release(root: Path, test_patients=(3, 8), lists=True) -> Path:
    """A release folder from the v2020 head file; official lists split by patient."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(V2020, root / "Data_Entry_2017_v2020.csv")
    if lists:
        df = read_data_entry(V2020)
        test = df["patient_id"].isin(test_patients)
        (root / "train_val_list.txt").write_text("\n".join(df["image_id"][~test]) + "\n")
        (root / "test_list.txt").write_text("\n".join(df["image_id"][test]) + "\n")
    return root


def test_load_release_with_lists_and_kaggle_image_layout(tmp_path):
    root = make_release(tmp_path / "nih")
    ids = read_data_entry(V2020)["image_id"].tolist()
    for k, image_id in enumerate(ids[:-2]):  # the last two are missing on disk
        folder = root / f"images_{1 + k % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image_id).write_bytes(b"")
    (root / "images_001" / "images" / "99999999_000.png").write_bytes(b"")  # not in the metadata
    (root / "images_001" / "images" / "notes.txt").write_text("ignored")
    release = load_release(root)
    assert release.data_entry_path.name == "Data_Entry_2017_v2020.csv"
    assert len(release.test) == 11 and len(release.train_val) == 19
    assert release.missing == ids[-2:]
    assert release.unlisted == ["99999999_000.png"]
    assert release.images[ids[1]] == root / "images_002" / "images" / ids[1]
    assert release.summary()["images_found"] == 28 and release.bbox is None
    with pytest.raises(CxrflowError, match="2 of 30 images .* not on disk"):
        load_release(root, strict=True)
    assert load_release(root, need_images=False).images == {}


def test_find_images_single_folder_and_duplicates(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    (tmp_path / "images" / "b.JPG").write_bytes(b"")
    assert sorted(find_images(tmp_path)) == ["a.png", "b.JPG"]
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "a.png").write_bytes(b"")
    with pytest.raises(CxrflowError, match="appears twice"):
        find_images(tmp_path)


def test_read_image_list_skips_blank_lines(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("a.png\n\nb.png\n")
    assert read_image_list(path) == ["a.png", "b.png"]
    assert read_image_list(FIXTURES / "test_list.head.txt") == [
        "00000003_000.png",
        "00000003_001.png",
        "00000003_002.png",
    ]


def test_list_entry_not_in_metadata(tmp_path):
    root = make_release(tmp_path / "nih")
    with open(root / "test_list.txt", "a") as f:
        f.write("00099999_000.png\n")
    with pytest.raises(CxrflowError, match="'00099999_000.png' is not in Data_Entry_2017_v2020.csv") as info:
        load_release(root, need_images=False)
    assert info.value.path == str(root / "test_list.txt") and info.value.line == 12


def test_patient_in_both_lists(tmp_path):
    root = make_release(tmp_path / "nih")
    tv = (root / "train_val_list.txt").read_text().splitlines()
    te = (root / "test_list.txt").read_text().splitlines()
    moved = tv.pop(0)  # 00000001_000.png: patient 1 now in both lists
    write_lines(root / "train_val_list.txt", tv)
    write_lines(root / "test_list.txt", te + [moved])
    with pytest.raises(CxrflowError, match="patient 1 .* also has images in train_val_list.txt") as info:
        load_release(root, need_images=False)
    assert info.value.path == str(root / "test_list.txt") and info.value.line == 12


def test_duplicate_list_entry_and_image_in_neither_list(tmp_path):
    root = make_release(tmp_path / "nih")
    tv = (root / "train_val_list.txt").read_text().splitlines()
    write_lines(root / "train_val_list.txt", tv + [tv[2]])
    with pytest.raises(CxrflowError, match="listed twice") as info:
        load_release(root, need_images=False)
    assert info.value.line == 20
    write_lines(root / "train_val_list.txt", tv[:5] + tv[6:])
    with pytest.raises(CxrflowError, match="1 image\\(s\\) are in neither") as info:
        load_release(root, need_images=False)
    assert info.value.path == str(root / "Data_Entry_2017_v2020.csv") and info.value.line == 15
    assert "'00000005_000.png'" in info.value.message


def test_one_list_without_the_other_and_missing_metadata(tmp_path):
    root = make_release(tmp_path / "nih")
    (root / "test_list.txt").unlink()
    with pytest.raises(CxrflowError, match="train_val_list.txt is present but test_list.txt is missing"):
        load_release(root, need_images=False)
    with pytest.raises(CxrflowError, match="no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv"):
        load_release(tmp_path, need_images=False)


def test_original_file_name_accepted_and_bbox_checked(tmp_path):
    root = make_release(tmp_path / "nih", lists=False)
    (root / "Data_Entry_2017_v2020.csv").rename(root / "Data_Entry_2017.csv")
    lines = BBOX.read_text().splitlines()[:1] + ["00000001_001.png,Infiltrate,10,20,30,40"]
    write_lines(root / "BBox_List_2017.csv", lines)
    release = load_release(root, need_images=False)
    assert release.data_entry_path.name == "Data_Entry_2017.csv" and release.train_val is None
    assert release.bbox["finding"].tolist() == ["Infiltration"]
    write_lines(root / "BBox_List_2017.csv", lines + BBOX.read_text().splitlines()[1:2])
    with pytest.raises(CxrflowError, match="'00013118_008.png' is not in") as info:
        load_release(root, need_images=False)
    assert info.value.line == 3


def test_cli_reports_bad_csv_as_one_error_line(tmp_path, capsys):
    root = make_release(tmp_path / "nih", lists=False)
    path = root / "Data_Entry_2017_v2020.csv"
    write_lines(path, _set(1, 4, "58Y")(head_lines()))
    assert main(["explore", "--data", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: {path}:3: ") and "Patient Age" in err[0]
