"""Collections' readers (CheXpert, MIMIC-CXR-JPG, generic CSV, NIH) and the ETL on each format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from cxrflow.cli import main
from cxrflow.data.formats import chexpert as chexpert_format
from cxrflow.data.formats import detect_format, load_collection
from cxrflow.data.split import assign_collection_splits
from cxrflow.data.store import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from cxrflow.data.uncertain import KNOWN, UNCERTAIN, UNMENTIONED, label_counts
from cxrflow.errors import CxrflowError
from cxrflow.testing.synthformats import write_chexpert, write_generic, write_mimic


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _write(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _edit(path: Path, line: int, column: str, value: str) -> None:
    """Set ``column`` of file line ``line`` (header = line 1)."""
    rows = _rows(path)
    rows[line - 1][rows[0].index(column)] = value
    _write(path, rows)


@pytest.fixture(scope="module")
def chexpert_dir(tmp_path_factory) -> Path:
    return write_chexpert(tmp_path_factory.mktemp("cx"), patients=12, size=40)


# ------------------------------------------------------------------------------------------ readers


def test_chexpert_reader_values_states_patients_views(chexpert_dir):
    col = load_collection(chexpert_dir)
    assert col.format == "chexpert" and col.vocab.names == chexpert_format.VOCAB.names
    rows = [r for r in _rows(chexpert_dir / "train.csv")[1:] if r[3] == "Frontal"]
    first = rows[0]
    assert col.entries["image_id"].iloc[0] == first[0].split("/", 1)[1]
    assert col.entries["patient_id"].iloc[0] == int(first[0].split("/")[2][len("patient") :])
    expected = {"1.0": (1, KNOWN), "0.0": (0, KNOWN), "-1.0": (0, UNCERTAIN), "": (0, UNMENTIONED)}
    for j, name in enumerate(col.vocab.names):
        label, state = expected[first[5 + j]] if name != "No Finding" else (int(first[5 + j] == "1.0"), KNOWN)
        assert col.entries[name].iloc[0] == label and col.states[0, j] == state
    # No Finding is 1.0 or empty (the labeler derives it): empty is a known 0, so it has negatives to learn from
    nf = col.vocab.index("No Finding")
    assert {r[5] for r in rows} <= {"1.0", ""} and (col.states[:, nf] == KNOWN).all()
    assert (col.entries["No Finding"] == 0).any() and label_counts(
        col.entries[list(col.vocab.names)].to_numpy(), col.states, col.vocab.names
    )["No Finding"]["negative"] > 0
    assert set(col.entries["view"]) <= {"PA", "AP"}  # --views frontal by default
    assert col.entries["sex"].iloc[0] == {"Male": "M", "Female": "F"}[first[1]]
    everything = load_collection(chexpert_dir, "chexpert", views="all")
    assert (
        len(everything.entries) == len(_rows(chexpert_dir / "train.csv")) + len(_rows(chexpert_dir / "valid.csv")) - 2
    )
    assert main(["explore", "--data", str(chexpert_dir), "--out", str(chexpert_dir.parent / "explore")]) == 0
    stats = json.loads((chexpert_dir.parent / "explore" / "stats.json").read_text())
    edema = col.vocab.index("Edema")
    assert stats["label_states"]["Edema"]["uncertain"] == int((col.states[:, edema] == UNCERTAIN).sum())
    assert stats["findings"]["Edema"] == int(col.entries["Edema"].sum()) == stats["label_states"]["Edema"]["positive"]
    splits = assign_collection_splits(col, 0.3, 0)
    test_ids = {r[0].split("/", 1)[1] for r in _rows(chexpert_dir / "valid.csv")[1:] if r[3] == "Frontal"}
    assert set(splits.loc[splits["split"] == "test", "image_id"]) == test_ids
    assert splits.groupby("patient_id")["split"].nunique().max() == 1


def test_mimic_reader_study_labels_official_split(tmp_path):
    root = write_mimic(tmp_path, subjects=12, size=32, gzipped=True)
    col = load_collection(root)
    assert col.format == "mimic" and col.states is not None
    import gzip

    labels = {r[1]: r[2:] for r in csv.reader(gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt"))}
    header = labels.pop("study_id")
    meta = [r for r in csv.reader(gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "rt"))][1:]
    study_of = {r[0]: r[2] for r in meta}
    for i, image in enumerate(col.entries["image_id"]):
        values = dict(zip(header, labels[study_of[image]]))
        for j, name in enumerate(col.vocab.names):
            assert col.entries[name].iloc[i] == (values[name] == "1.0")
            blank = KNOWN if name == "No Finding" else UNMENTIONED  # derived by the labeler: empty is a known 0
            assert col.states[i, j] == {"1.0": KNOWN, "0.0": KNOWN, "-1.0": UNCERTAIN, "": blank}[values[name]]
    split_rows = {r[0]: r[3] for r in csv.reader(gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "rt"))}
    splits = assign_collection_splits(col, 0.3, 0)
    for image, split in zip(splits["image_id"], splits["split"]):
        assert {"train": "train", "validate": "val", "test": "test"}[split_rows[image]] == split
    assert set(col.entries["view"]) <= {"PA", "AP"}


def test_generic_reader_per_column_and_pipe(tmp_path):
    root = write_generic(tmp_path / "a", patients=8, findings=("Nodule", "Mass"))
    col = load_collection(root, "csv")
    assert col.vocab.names == ("Nodule", "Mass") and col.states is not None
    rows = _rows(root / "labels.csv")
    assert col.entries["image_id"].tolist() == [r[0] for r in rows[1:]]
    assert col.entries["patient_id"].nunique() == 8  # text ids H00001... numbered in sorted order
    pipe = write_generic(tmp_path / "b", patients=8, findings=("Nodule", "Mass"), per_column=False, split=True)
    col = load_collection(pipe)
    assert col.vocab.names == ("Mass", "Nodule") and col.states is None
    rows = _rows(pipe / "labels.csv")
    for i, r in enumerate(rows[1:]):
        assert col.entries["Mass"].iloc[i] == ("Mass" in r[5].split("|"))
    splits = assign_collection_splits(col, 0.3, 0)
    assert splits["split"].tolist() == [r[6] for r in rows[1:]]
    # MIMIC's and CheXpert's names of the validation split mean val too
    assert "val" in splits["split"].tolist()
    text = (pipe / "labels.csv").read_text()
    (pipe / "labels.csv").write_text(text.replace(",val\n", ",Validate\n", 1).replace(",val\n", ",valid \n"))
    again = assign_collection_splits(load_collection(pipe), 0.3, 0)
    assert again["split"].tolist() == splits["split"].tolist()


def test_what_stands_at_an_image_path_is_found_and_only_an_absent_path_is_missing(tmp_path):
    import os

    root = write_generic(tmp_path / "a", patients=6, findings=("Nodule", "Mass"))
    col = load_collection(root, "csv")
    ids = col.entries["image_id"].tolist()
    paths = {i: Path(col.images[i]) for i in ids[:4]}
    paths[ids[0]].unlink()
    paths[ids[0]].mkdir()  # a folder: the ETL's decoder quarantines it as one
    paths[ids[1]].unlink()
    os.mkfifo(paths[ids[1]])
    paths[ids[2]].unlink()
    paths[ids[2]].symlink_to(tmp_path / "nowhere.png")  # a broken link
    paths[ids[3]].unlink()
    col = load_collection(root, "csv")
    assert col.missing == [ids[3]]
    assert set(ids[:3]) <= set(col.images) and len(col.images) == len(ids) - 1


def test_detection_nih_and_ambiguous(tmp_path):
    from cxrflow.data.synth import synthesize

    nih = tmp_path / "nih"
    synthesize(nih, patients=4, size=16, seed=0)
    assert detect_format(nih) == "nih" and load_collection(nih, need_images=False).states is None
    both = write_generic(tmp_path / "both", patients=3)
    (both / "Data_Entry_2017.csv").write_text("x\n")
    with pytest.raises(CxrflowError, match="several formats"):
        detect_format(both)
    with pytest.raises(CxrflowError, match="no known collection"):
        detect_format(tmp_path / "both" / "images")


# ---------------------------------------------------------------------------------------- bad input


def _error_of(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("value", ["2.0", "yes"])
def test_chexpert_unknown_value_names_file_and_line(tmp_path, value, capsys):
    root = write_chexpert(tmp_path, patients=3, size=16)
    _edit(root / "train.csv", 3, "Edema", value)
    err = _error_of(["explore", "--data", str(root), "--out", str(tmp_path / "x")], capsys)
    assert err.startswith(f"error: {root / 'train.csv'}:3: unknown value {value!r} in column 'Edema'")
    assert err.count("\n") == 0


def test_bad_inputs_are_one_line_with_file_and_line(tmp_path, capsys):
    root = write_generic(tmp_path / "g", patients=4)
    rows = _rows(root / "labels.csv")
    _write(root / "labels.csv", rows[:2] + [["../outside.png", *rows[2][1:]]] + rows[3:])
    err = _error_of(["split", "--data", str(root), "--out", str(tmp_path / "s.csv")], capsys)
    assert err.startswith(f"error: {root / 'labels.csv'}:3: image path '../outside.png' escapes the data folder")

    _write(root / "labels.csv", rows[:2] + [rows[1]] + rows[2:])
    err = _error_of(["split", "--data", str(root), "--out", str(tmp_path / "s.csv")], capsys)
    assert f"{root / 'labels.csv'}:3: image {rows[1][0]!r} is listed twice (first on line 2)" in err

    _write(root / "labels.csv", [[c for c in r[:1] + r[2:]] for r in rows])
    err = _error_of(["split", "--data", str(root), "--out", str(tmp_path / "s.csv")], capsys)
    assert err.startswith(f"error: {root / 'labels.csv'}:1: missing column 'patient_id'")

    split = write_generic(tmp_path / "p", patients=4, split=True)
    rows = _rows(split / "labels.csv")
    line = (
        next(i for i, r in enumerate(rows[1:], start=2) if r[1] == rows[1][1] and i > 2)
        if any(r[1] == rows[1][1] for r in rows[2:])
        else None
    )
    if line is None:  # give the first patient a second image
        rows.insert(2, [rows[1][0].replace(".png", "_x.png"), *rows[1][1:]])
        line = 3
    rows[line - 1][-1] = "test" if rows[1][-1] != "test" else "train"
    _write(split / "labels.csv", rows)
    err = _error_of(["split", "--data", str(split), "--out", str(tmp_path / "s.csv")], capsys)
    assert f"{split / 'labels.csv'}:{line}: patient" in err and "one split only" in err


def test_mimic_study_without_split_entry(tmp_path, capsys):
    root = write_mimic(tmp_path, subjects=4, size=16)
    rows = _rows(root / "mimic-cxr-2.0.0-split.csv")
    _write(root / "mimic-cxr-2.0.0-split.csv", rows[:1] + rows[2:])
    err = _error_of(["explore", "--data", str(root), "--out", str(tmp_path / "x"), "--views", "all"], capsys)
    assert err.startswith(f"error: {root / 'mimic-cxr-2.0.0-metadata.csv'}:2: study")
    assert "has no entry in mimic-cxr-2.0.0-split.csv" in err


def test_no_rows_is_one_line(tmp_path, capsys):
    """A header-only labels.csv (pipe labels: no finding names at all) crashed the ETL with a traceback;
    a CheXpert train.csv of lateral images only leaves nothing under --views frontal."""
    root = write_generic(tmp_path / "g", patients=3, size=16, per_column=False)
    _write(root / "labels.csv", _rows(root / "labels.csv")[:1])
    for command in ("explore", "etl"):
        assert main([command, "--data", str(root), "--out", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {root / 'labels.csv'}: no images: the file has a header but no rows"]
        assert not (tmp_path / command).exists()
    cx = write_chexpert(tmp_path / "cx", patients=3, size=16)
    for name in ("train.csv", "valid.csv"):
        _write(cx / name, [r for r in _rows(cx / name) if r[3] != "Frontal"])
    assert main(["explore", "--data", str(cx), "--out", str(tmp_path / "x")]) == 2
    assert "no images: --views frontal: left out" in capsys.readouterr().err


def test_chexpert_missing_column(tmp_path, capsys):
    root = write_chexpert(tmp_path, patients=2, size=16)
    rows = _rows(root / "valid.csv")
    _write(root / "valid.csv", [r[:-1] for r in rows])
    err = _error_of(["split", "--data", str(root), "--out", str(tmp_path / "s.csv")], capsys)
    assert err.startswith(f"error: {root / 'valid.csv'}:1: missing column 'Support Devices'")


# ------------------------------------------------------------------------------------------ the ETL


def _store_rows(store: Path, size: int) -> dict:
    table = ds.dataset(str(store), format="parquet", partitioning="hive").to_table()
    return {r["image_id"]: r for r in table.filter(ds.field("size") == size).to_pylist()}


def test_etl_chexpert_store_has_states_counts_and_format(spark, chexpert_dir, tmp_path):
    from cxrflow.data.etl import run_etl

    manifest = run_etl(chexpert_dir, tmp_path / "store", sizes=(16,), spark=spark)
    col = load_collection(chexpert_dir)
    assert manifest["format"] == "chexpert" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["views"] == "frontal"  # what the store holds, so that it can be made again
    assert manifest["label_names"] == list(chexpert_format.VOCAB.names)
    assert manifest["uncertain_policies"] == ["ignore", "ones", "zeros"]
    rows = _store_rows(tmp_path / "store", 16)
    assert len(rows) == len(col.entries) == manifest["source"]["written"]
    for i, image in enumerate(col.entries["image_id"]):
        assert rows[image]["labels"] == col.entries[list(col.vocab.names)].iloc[i].tolist()
        assert rows[image]["labels_known"] == col.states[i].tolist()
    train = [r for r in rows.values() if r["split"] == "train"]
    states = np.array([r["labels_known"] for r in train])
    labels = np.array([r["labels"] for r in train])
    edema = col.vocab.index("Edema")
    counts = manifest["label_counts"]["Edema"]
    assert counts == {
        "positive": int(((states[:, edema] == KNOWN) & (labels[:, edema] == 1)).sum()),
        "negative": int(((states[:, edema] == KNOWN) & (labels[:, edema] == 0)).sum()),
        "uncertain": int((states[:, edema] == UNCERTAIN).sum()),
        "unknown": int((states[:, edema] == UNMENTIONED).sum()),
    }
    assert manifest["pos_weight"][edema] == pytest.approx(counts["negative"] / max(counts["positive"], 1))
    from cxrflow.data.store import format_manifest

    shown = format_manifest(read_manifest(tmp_path / "store"))
    assert "collection format chexpert" in shown and "train labels: positive / negative / uncertain" in shown


def test_etl_generic_csv_all_known_has_no_states_column(spark, tmp_path):
    from cxrflow.data.etl import run_etl

    root = write_generic(tmp_path / "g", patients=10, per_column=False)
    manifest = run_etl(root, tmp_path / "store", sizes=(16,), spark=spark)
    assert manifest["format"] == "csv" and "uncertain_policies" not in manifest
    table = ds.dataset(str(tmp_path / "store"), format="parquet", partitioning="hive").to_table()
    assert "labels_known" not in table.column_names
    assert manifest["source"]["written"] == len(_rows(root / "labels.csv")) - 1
    assert (
        manifest["synthetic"]["generator"] == "cxrflow.testing.synthformats"
    )  # a generated collection's store says so


def test_etl_mimic_official_split(spark, tmp_path):
    from cxrflow.data.etl import run_etl

    root = write_mimic(tmp_path / "m", subjects=12, size=24)
    manifest = run_etl(root, tmp_path / "store", sizes=(16,), spark=spark, format="mimic")
    rows = _store_rows(tmp_path / "store", 16)
    split_of = {r[0]: r[3] for r in _rows(root / "mimic-cxr-2.0.0-split.csv")[1:]}
    assert {image: r["split"] for image, r in rows.items()} == {
        image: {"train": "train", "validate": "val", "test": "test"}[split_of[image]] for image in rows
    }
    assert manifest["split"]["mode"] == "official-split" and manifest["split"]["val_fraction"] is None
    # MIMIC-CXR-JPG's files hold no ages: the source summary said "age_unknown 0" for them
    assert manifest["source"]["age_unknown"] == manifest["source"]["metadata_rows"] > 0


def test_store_of_format_version_1_still_opens(tmp_path):
    from cxrflow.data.loader import make_loader
    from cxrflow.testing.synthstore import write_synthetic_store

    write_synthetic_store(tmp_path / "s", sizes=(16,), rows={"train": 8, "val": 4, "test": 4})
    path = tmp_path / "s" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 1
    manifest.pop("format", None)
    path.write_text(json.dumps(manifest))
    assert read_manifest(tmp_path / "s")["format_version"] == 1
    batch = next(iter(make_loader(tmp_path / "s", 16, "train", batch_size=8, shuffle=False)))
    assert batch["known"].shape == batch["labels"].shape and bool((batch["known"] == 1).all())


def test_generic_pipe_labels_no_finding_in_any_case_and_one_spelling_per_finding(tmp_path, capsys):
    """'no finding' was learnt as a finding of its own (every normal image a positive of it), and
    'nodule' beside 'Nodule' split one finding's positives between two heads."""
    (tmp_path / "labels.csv").write_text(
        "image,patient_id,labels\na.png,1,no finding\nb.png,2,Nodule | Mass\nc.png,3,NO FINDING\nd.png,4,Mass\n"
    )
    col = load_collection(tmp_path, "csv", need_images=False)
    assert col.vocab.names == ("Mass", "Nodule")
    assert col.entries[["Mass", "Nodule"]].to_numpy().tolist() == [[0, 0], [1, 1], [0, 0], [1, 0]]
    with open(tmp_path / "labels.csv", "a") as f:
        f.write("e.png,5,nodule\n")
    err = _error_of(["explore", "--data", str(tmp_path), "--out", str(tmp_path / "x")], capsys)
    assert (
        err
        == f"error: {tmp_path / 'labels.csv'}:6: finding 'nodule' is also written 'Nodule'; spell each finding one way"
    )


def test_generic_pipe_labels_no_finding_with_findings(tmp_path, capsys):
    root = write_generic(tmp_path, patients=3, per_column=False)
    _edit(root / "labels.csv", 3, "labels", "No Finding|Mass")
    err = _error_of(["split", "--data", str(root), "--out", str(tmp_path / "s.csv")], capsys)
    assert err == f"error: {root / 'labels.csv'}:3: 'labels' 'No Finding|Mass' combines 'No Finding' with findings"


def test_generic_aliases_csv_file_and_chexpert_parent_folder(tmp_path, chexpert_dir):
    root = write_generic(tmp_path / "g", patients=4, findings=("Nodule", "Mass"))
    rows = _rows(root / "labels.csv")
    rows[0] = ["Path", "Subject_ID", "Patient Age", "Gender", "ViewPosition", "Nodule", "Mass"]
    _write(root / "my-export.csv", rows)
    (root / "labels.csv").unlink()
    col = load_collection(root / "my-export.csv")
    assert col.format == "csv" and col.entries["image_id"].tolist() == [r[0] for r in rows[1:]]
    assert col.entries["age"].tolist() == [int(r[2]) for r in rows[1:]] and not col.missing
    parent = load_collection(chexpert_dir.parent, need_images=False)
    assert parent.format == "chexpert" and parent.entries.equals(
        load_collection(chexpert_dir, need_images=False).entries
    )


def test_mimic_image_twice_and_patient_in_two_splits(tmp_path, capsys):
    root = write_mimic(tmp_path, subjects=6, size=16)
    meta = root / "mimic-cxr-2.0.0-metadata.csv"
    rows = _rows(meta)
    _write(meta, rows + [rows[1]])
    err = _error_of(["split", "--data", str(root), "--out", str(tmp_path / "s.csv")], capsys)
    assert err == f"error: {meta}:{len(rows) + 1}: image {rows[1][0]!r} is listed twice (first on line 2)"
    _write(meta, rows)
    split = root / "mimic-cxr-2.0.0-split.csv"
    rows = _rows(split)
    subject = rows[1][2]
    line = next((i for i, r in enumerate(rows[2:], start=3) if r[2] == subject), None)
    if line is None:  # the first subject has one image: move another image of a new study to it
        rows[2][2], line = subject, 3
    rows[line - 1][3] = "test" if rows[1][3] != "test" else "train"
    _write(split, rows)
    err = _error_of(["split", "--data", str(root), "--out", str(tmp_path / "s.csv")], capsys)
    assert err.startswith(f"error: {split}:{line}: patient {subject}") and "one split only" in err


def test_chexpert_image_in_both_files(tmp_path, capsys):
    root = write_chexpert(tmp_path, patients=2, size=16, valid_patients=1)
    train, valid = _rows(root / "train.csv"), _rows(root / "valid.csv")
    _write(root / "valid.csv", valid + [train[1]])
    err = _error_of(["split", "--data", str(root), "--out", str(tmp_path / "s.csv")], capsys)
    assert err.startswith(f"error: {root / 'valid.csv'}:{len(valid) + 1}: image ")
    assert err.endswith("is also listed in train.csv line 2")


def test_generic_age_and_sex_from_dicom_headers(tmp_path):
    from cxrflow.testing.synthformats import write_dicom

    for i in range(3):
        write_dicom(tmp_path / f"img{i}.dcm", np.full((8, 8), 100 * i, np.uint16))
    _write(
        tmp_path / "labels.csv",
        [
            ["image", "patient_id", "labels", "age"],
            ["img0.dcm", "1", "A", ""],
            ["img1.dcm", "2", "", "40"],
            ["img2.dcm", "3", "A", ""],
        ],
    )
    col = load_collection(tmp_path)
    assert col.entries["age"].tolist() == [63, 40, 63]  # write_dicom's PatientAge 063Y, PatientSex F
    assert col.entries["sex"].tolist() == ["F", "F", "F"]


def test_a_collections_metadata_file_given_as_data_names_its_folder(tmp_path, chexpert_dir, capsys):
    from cxrflow.data.synth import synthesize

    nih = tmp_path / "nih"
    synthesize(nih, patients=4, size=16, seed=0)
    entry = next(nih.glob("Data_Entry_2017*.csv"))
    train_csv = next(chexpert_dir.rglob("train.csv"))
    for command in ("split", "explore"):
        for file, kind in ((entry, "nih"), (train_csv, "chexpert")):
            err = _error_of([command, "--data", str(file), "--out", str(tmp_path / "out")], capsys)
            assert err == (
                f"error: {file}: this is the metadata file of a {kind} collection, not a labels CSV "
                f"(--format csv): give its folder: --data {file.parent}"
            )
    generic = write_generic(tmp_path / "g", patients=3)
    assert len(load_collection(next(generic.glob("*.csv")), need_images=False).entries) > 0  # a labels CSV still reads
