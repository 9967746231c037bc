"""Exploration statistics hand-checked on a tiny frame; figures; the explore command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cxrflow.cli import main
from cxrflow.data.explore import (
    FIGURES,
    compute_stats,
    plot_age_by_sex,
    plot_cooccurrence,
    plot_findings,
    plot_images_per_patient,
)
from cxrflow.data.labels import NIH14
from cxrflow.data.metadata import read_data_entry

FIXTURES = Path(__file__).parents[1] / "fixtures" / "nih"
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
TINY = [
    "00000001_000.png,Cardiomegaly|Effusion,0,1,40,M,PA,2500,2048,0.168,0.168",
    "00000001_001.png,No Finding,1,1,41,M,AP,2500,2048,0.168,0.168",
    "00000001_002.png,Cardiomegaly|Effusion|Hernia,2,1,42,M,PA,2500,2048,0.168,0.168",
    "00000002_000.png,Effusion,0,2,10,F,PA,2500,2048,0.168,0.168",
    "00000003_000.png,No Finding,0,3,90,F,AP,2500,2048,0.168,0.168",
]
KEYS = {
    "images", "patients", "patients_by_sex", "age", "images_per_patient", "follow_up", "findings",
    "max_findings_per_image", "view_positions", "cooccurrence",
}  # fmt: skip


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    path.write_text("\n".join([HEADER, *TINY]) + "\n")
    return path


def test_ages_a_collection_does_not_give_are_not_called_out_of_range(tmp_path, capsys):
    """MIMIC-CXR has no ages at all; the summary line said '57 unknown: outside 0-120'."""
    from cxrflow.testing.synthformats import write_mimic

    root = write_mimic(tmp_path / "mimic", subjects=4, size=16)
    assert main(["explore", "--data", str(root), "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "unknown: not given or outside 0-120" in out and "unknown: outside" not in out


def test_stats_hand_checked(tiny):
    stats = compute_stats(read_data_entry(tiny))
    assert set(stats) == KEYS
    assert stats["images"] == 5 and stats["patients"] == 3
    assert stats["patients_by_sex"] == {"M": 1, "F": 2}
    assert stats["age"] == {"min": 10, "max": 90, "mean": 44.6, "unknown": 0}
    assert stats["images_per_patient"] == {"max": 3, "mean": pytest.approx(5 / 3, abs=1e-3)}
    assert stats["follow_up"] == {"max": 2, "mean": 0.6}
    assert list(stats["findings"]) == [*NIH14.names, "No Finding"]
    assert stats["findings"]["Effusion"] == 3 and stats["findings"]["Cardiomegaly"] == 2
    assert stats["findings"]["Hernia"] == 1 and stats["findings"]["No Finding"] == 2 and stats["findings"]["Mass"] == 0
    assert stats["max_findings_per_image"] == 3
    assert stats["view_positions"] == {"PA": 3, "AP": 2}
    co = stats["cooccurrence"]
    assert list(co) == list(NIH14.names) and all(list(row) == list(NIH14.names) for row in co.values())
    assert co["Cardiomegaly"]["Effusion"] == co["Effusion"]["Cardiomegaly"] == 2
    assert co["Effusion"]["Effusion"] == 3 and co["Hernia"]["Cardiomegaly"] == 1 and co["Mass"]["Effusion"] == 0
    json.dumps(stats)  # JSON-ready


def test_figures_are_titled_and_labelled(tiny):
    entries = read_data_entry(tiny)
    stats = compute_stats(entries)
    for fig in (
        plot_findings(stats),
        plot_cooccurrence(stats),
        plot_age_by_sex(entries),
        plot_images_per_patient(entries),
    ):
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    target = Figure()
    ax = target.add_subplot()
    assert plot_findings(stats, ax=ax) is target


def test_long_tail_of_images_per_patient():
    entries = pd.DataFrame({"patient_id": np.r_[np.zeros(184, int), np.arange(1, 50)], "age": 50, "sex": "M"})
    fig = plot_images_per_patient(entries)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "max 184" in ax.get_title() and ax.get_xlim()[1] >= 184


@pytest.mark.slow
def test_cli_metadata_and_data_folder(tiny, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["explore", "--metadata", str(tiny), "--out", str(out)]) == 0
    assert "5 images, 3 patients" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats) == KEYS and stats["findings"]["Effusion"] == 3
    summary = (out / "summary.md").read_text()
    for name in FIGURES.values():
        assert (out / name).stat().st_size > 1000 and f"]({name})" in summary
    assert main(["explore", "--data", str(tiny.parent), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and "--overwrite" in err[0]
    assert main(["explore", "--data", str(tiny.parent), "--out", str(out), "--overwrite"]) == 0


def test_cli_bad_metadata_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([HEADER, TINY[0], TINY[1].replace("No Finding", "Nothing")]) + "\n")
    assert main(["explore", "--metadata", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {bad}:3: unknown finding 'Nothing' in Finding Labels 'Nothing' (known: {', '.join(NIH14.names)}, No Finding)"
    ]
    assert main(["explore", "--metadata", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.csv'}: file not found"


def test_real_head_file(tmp_path):
    stats = compute_stats(read_data_entry(FIXTURES / "Data_Entry_2017_v2020.head.csv"))
    assert stats["images"] == 30 and stats["patients"] == 11
    assert stats["findings"]["Hernia"] == 8 and stats["images_per_patient"]["max"] == 8
