"""The synthetic dataset: release format, label shape, deterministic, a finding-specific pixel signal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrflow.cli import main
from cxrflow.data.labels import NIH14
from cxrflow.data.metadata import label_matrix, load_release, read_data_entry
from cxrflow.data.synth import (
    BBOX_HEADER,
    DATA_ENTRY_HEADER,
    GRID,
    PATTERNS,
    sample_entries,
    synthesize,
    write_data_entry,
)
from cxrflow.errors import CxrflowError

SIZE = 64


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "nih"
    summary = synthesize(out, patients=60, size=SIZE, seed=5)
    return out, summary


def test_release_format_and_load(synth_dir):
    out, summary = synth_dir
    assert (out / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0] == DATA_ENTRY_HEADER
    assert (out / "BBox_List_2017.csv").read_text().splitlines()[0] == BBOX_HEADER
    release = load_release(out, strict=True)
    assert len(release.entries) == summary["images"] and not release.missing and not release.unlisted
    assert len(release.train_val) + len(release.test) == len(release.entries)
    assert len(release.test) == summary["test_images"] > 0
    image = Image.open(release.images[release.entries["image_id"].iloc[0]])
    assert image.mode == "L" and image.size == (SIZE, SIZE)


def test_every_finding_has_its_box(synth_dir):
    out, _ = synth_dir
    release = load_release(out, need_images=False)
    raw = (out / "BBox_List_2017.csv").read_text()
    assert ",Infiltrate," in raw and ",Infiltration," not in raw
    labels = label_matrix(release.entries)
    positives = {(i, NIH14.names[j]) for i, j in zip(*np.nonzero(labels))}
    ids = release.entries["image_id"].tolist()
    boxes = {(ids.index(r.image_id), r.finding) for r in release.bbox.itertuples()}
    assert boxes == positives
    b = release.bbox
    assert (
        (b["x"] >= 0).all()
        and (b["y"] >= 0).all()
        and (b["x"] + b["w"] <= SIZE).all()
        and (b["y"] + b["h"] <= SIZE).all()
    )
    assert (b["w"] >= SIZE / 5).all()  # patterns are large enough to survive downsampling
    cells = b.apply(lambda r: (int((r.y + r.h / 2) // (SIZE / GRID)), int((r.x + r.w / 2) // (SIZE / GRID))), axis=1)
    assert all(cell == PATTERNS[f][0] for cell, f in zip(cells, b["finding"]))


def test_label_shape_like_the_release(tmp_path):
    """From metadata alone (no pixels): 200 patients, written and parsed back."""
    raw, _, test_patients = sample_entries(200, np.random.default_rng(0))
    write_data_entry(raw, tmp_path / "d.csv")
    df = read_data_entry(tmp_path / "d.csv")
    labels = label_matrix(df)
    counts = dict(zip(NIH14.names, labels.sum(0)))
    no_finding = int((labels.sum(1) == 0).sum())
    assert 0.4 < no_finding / len(df) < 0.6 and no_finding > max(counts.values())
    assert max(counts, key=counts.get) == "Infiltration"
    assert min(counts, key=counts.get) == "Hernia"
    assert labels.sum(1).max() >= 3  # multi-label
    is_test = df["patient_id"].isin(test_patients).to_numpy()
    for j, name in enumerate(NIH14.names):  # a few patients with each finding in each list
        for part in (is_test, ~is_test):
            assert df.loc[part & (labels[:, j] == 1), "patient_id"].nunique() >= 3, name
    per_patient = df.groupby("patient_id")
    assert per_patient.size().mean() > 2.5 and per_patient.size().max() >= 8
    assert all((g["follow_up"].to_numpy() == np.arange(len(g))).all() for _, g in per_patient)
    assert all((np.diff(g["age"].to_numpy()) >= 0).all() for _, g in per_patient)
    assert df["age"].min() >= 0 and df["age"].max() <= 95 and df["age"].max() - df["age"].min() > 60
    assert set(df["sex"]) == {"M", "F"} and set(df["view"]) == {"PA", "AP"}
    assert 0.15 < is_test.mean() < 0.3


def test_exact_image_count_for_benchmarks():
    raw, _, _ = sample_entries(50, np.random.default_rng(1), images=180)
    assert len(raw) == 180 and raw["patient_id"].nunique() == 50


def test_each_finding_brightens_its_own_cell(synth_dir):
    """The learnable signal: a finding's cell is much brighter with the finding than without."""
    out, _ = synth_dir
    release = load_release(out)
    labels = label_matrix(release.entries)
    pixels = np.stack(
        [np.asarray(Image.open(release.images[i]), dtype=np.float32) for i in release.entries["image_id"]]
    )
    c = SIZE // GRID
    for j, name in enumerate(NIH14.names):
        (row, col), _ = PATTERNS[name]
        cell = pixels[:, row * c : (row + 1) * c, col * c : (col + 1) * c].mean(axis=(1, 2))
        pos, neg = cell[labels[:, j] == 1], cell[labels[:, j] == 0]
        assert pos.mean() - neg.mean() > 25, name
        assert pos.min() > np.median(neg), name  # nearly separable from pixels alone


def test_deterministic_per_seed(tmp_path, synth_dir):
    out, _ = synth_dir
    again = tmp_path / "again"
    synthesize(again, patients=60, size=SIZE, seed=5)
    for name in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv", "test_list.txt", "images/00000002_000.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other"
    synthesize(other, patients=60, size=SIZE, seed=6)
    assert (other / "Data_Entry_2017_v2020.csv").read_bytes() != (out / "Data_Entry_2017_v2020.csv").read_bytes()


def test_overwrite_rules(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--patients", "4", "--size", "32"]) == 0
    assert "images of 4 patients" in capsys.readouterr().out
    assert main(["synth", "--out", str(out), "--patients", "4", "--size", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and "--overwrite" in err[0]
    assert main(["synth", "--out", str(out), "--patients", "5", "--size", "32", "--overwrite"]) == 0
    assert pd.read_csv(out / "Data_Entry_2017_v2020.csv")["Patient ID"].nunique() == 5
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(CxrflowError, match="not a cxrflow synth output"):
        synthesize(precious, patients=2, size=32, overwrite=True)
    assert (precious / "thesis.tex").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
