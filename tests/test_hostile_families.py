"""Families of hostile inputs, each fixed in one shared place: tests generate the inputs of a family
rather than list examples.

- outputs: user paths are never glob patterns, and clean-up touches only this output's own leftovers.
- names: names that become file names are sanitised and distinct; every CSV cxrflow writes shows
  formula-like cells as text (and reads its own CSVs back unchanged).
- where outputs go: never into a store or collection; ``--overwrite`` replaces only what cxrflow wrote.
- modes: an output that replaces a folder keeps that folder's mode; a new one follows the umask.
- printing: control characters of names (terminal escape sequences) are escaped wherever names are printed.
- rows left out: every command that reads a collection says what it left out and why.
- pixel budgets: a compressed DICOM is measured by its codestream's own dimensions, not its header's.
"""

from __future__ import annotations

import os
import re
import stat
import string
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrflow import csvsafe
from cxrflow.cli import main
from cxrflow.errors import CxrflowError
from cxrflow.names import file_part, file_parts, path_tag, printable
from cxrflow.outputs import check_target, claiming, leftovers, publishing, write_marker

SRC = Path(__file__).resolve().parents[1] / "src" / "cxrflow"
#: Text a hostile collection, run folder or finding may carry: formulas, separators, controls, quotes.
HOSTILE_TEXT = st.text(
    alphabet=st.sampled_from(list("=+-@'\t\r\n\x1b/\\.:|!\"A0 ") + ["é", "\u202e", "\x00"]), max_size=12
)

#: Output names made of glob metacharacters and ordinary letters (``st[12]``, ``*``, ``a?``).
GLOBBY = st.text(alphabet=string.ascii_lowercase[:3] + "0123[]*?!-", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and "/" not in s
)

pytestmark = pytest.mark.filterwarnings("ignore")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=GLOBBY, other=GLOBBY)
def test_cleanup_of_one_output_never_touches_another_outputs_partial_folder(tmp_path_factory, name, other):
    """``etl --out 'st[12]'`` beside a running ``etl --out st1`` leaves st1's partial folder alone."""
    if name == other:
        return
    root = tmp_path_factory.mktemp("pair")
    theirs = root / f".{other}.partial-0123abcd"
    theirs.mkdir()
    write_marker(theirs, "etl", partial=True, target=other)
    (theirs / "part-0.parquet").write_text("in progress")
    assert leftovers(root / name) == []
    with publishing(root / name, "etl") as pub:
        pub.commit()
    assert (theirs / "part-0.parquet").read_text() == "in progress"


def test_leftovers_are_matched_by_exact_name_not_by_prefix(tmp_path):
    """``store``'s clean-up does not take ``store.partial-ab``'s partial folder for one of its own."""
    out = tmp_path / "store"
    theirs = tmp_path / ".store.partial-ab.partial-0123abcd"
    theirs.mkdir()
    write_marker(theirs, "etl", partial=True)
    assert leftovers(out) == []
    mine = tmp_path / ".store.partial-0123abcd"
    mine.mkdir()
    write_marker(mine, "etl", partial=True, target="other")  # another output's marker: not ours
    with publishing(out, "etl") as pub:
        pub.commit()
    assert theirs.is_dir() and mine.is_dir()


# ------------------------------------------------------------------ names become paths or formulas


@given(HOSTILE_TEXT | st.text(max_size=12))
def test_protected_cells_never_start_a_formula_and_round_trip(value):
    cell = csvsafe.protect(value)
    assert not cell.startswith(("=", "+", "@", "\t", "\r")) and csvsafe.unprotect(cell) == value
    assert not cell.startswith("-") or re.fullmatch(r"-[0-9.eE+-]+|-(inf|nan)", cell, re.IGNORECASE)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(HOSTILE_TEXT.filter(lambda s: s.strip() and "\x00" not in s), min_size=1, max_size=5, unique=True))
def test_csvs_cxrflow_writes_read_back_unchanged(tmp_path_factory, ids):
    path = tmp_path_factory.mktemp("csv") / "split.csv"
    frame = pd.DataFrame({"image_id": ids, "patient_id": ids, "split": "train", "score": 0.5})
    csvsafe.write_frame(frame, path, index=False)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert not raw["image_id"].str.match(r"[=+@\t\r]").any()
    back = csvsafe.read_frame(path, dtype=str, keep_default_na=False)
    assert back["image_id"].tolist() == ids


def test_every_csv_cxrflow_writes_goes_through_the_safe_writer():
    """No module writes CSV around :mod:`cxrflow.csvsafe` (synthetic collections mimic the releases' own files)."""
    allowed = {"csvsafe.py", "synthformats.py"}
    offenders = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py") if path.name not in allowed
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.to_csv\(|\bcsv\.(writer|DictWriter)\(", line)
    ]  # fmt: skip
    assert offenders == []


@given(st.text(max_size=300))
def test_file_parts_are_one_safe_bounded_component(name):
    part = file_part(name)
    assert part and "/" not in part and "\x00" not in part and not part.startswith(".") and part.isprintable()
    assert len(part.encode()) <= 80
    assert part == name or re.search(r"-[0-9a-f]{8}$", part)


@given(st.lists(HOSTILE_TEXT | st.sampled_from(["Mass", "mass", "Lesion/Mass", "Lesion_Mass"]), max_size=8))
def test_distinct_names_get_distinct_file_parts(names):
    parts = file_parts(names)
    assert len({p.casefold() for p in parts.values()}) == len(parts) == len(set(names))


def test_same_file_name_in_two_folders_gets_two_tags(tmp_path):
    assert path_tag(tmp_path / "d1" / "x.png") != path_tag(tmp_path / "d2" / "x.png")
    assert path_tag(tmp_path / "d1" / "x.png") == path_tag(tmp_path / "d1" / ".." / "d1" / "x.png")


FORMULA_RUN = "=2+5+cmd|' -C calc'!A0"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A 1-epoch run named like a formula, on a store whose findings hold a path separator and a formula."""
    from cxrflow.data.labels import LabelVocabulary
    from cxrflow.testing.synthstore import write_synthetic_store

    root = tmp_path_factory.mktemp("hostile")
    store = root / "store"
    vocab = LabelVocabulary(("Lesion/Mass", "Lesion_Mass", "=1+1", "Effusion"), no_finding=None)
    write_synthetic_store(store, sizes=(16,), rows={"train": 8, "val": 4, "test": 4}, seed=0, vocab=vocab)
    run = root / "runs" / FORMULA_RUN
    run.parent.mkdir()
    assert main(["train", "--quiet", "--store", str(store), "--size", "16", "--model", "simple_cnn", "--out", str(run),
                 "--epochs", "1", "--batch-size", "4", "--device", "cpu"]) == 0  # fmt: skip
    return run


@pytest.mark.slow
def test_findings_and_images_named_like_paths_get_their_own_overlays(hostile_run, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from cxrflow.results import overlays

    monkeypatch.setattr(overlays, "flagged_findings", lambda p: list(p["probabilities"]))
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        Image.new("L", (20, 20), 80 if folder == "d1" else 160).save(tmp_path / folder / "x.png")
    written = []
    for folder in ("d1", "d2"):  # two predicts into one folder
        assert main(["predict", "--run", str(hostile_run), str(tmp_path / folder / "x.png"), "--json",
                     "--heatmaps", str(tmp_path / "h")]) == 0  # fmt: skip
        written += [
            p
            for pred in __import__("json").loads(capsys.readouterr().out)["predictions"]
            for p in pred["heatmaps"].values()
        ]
    assert len(written) == len(set(written)) == 8
    assert all(Path(p).parent == tmp_path / "h" and Path(p).is_file() for p in written)


@pytest.mark.slow
def test_a_run_named_like_a_formula_is_text_in_table_csv(hostile_run, tmp_path):
    assert main(["evaluate", "--run", str(hostile_run), "--n-boot", "5", "--device", "cpu"]) == 0
    assert main(["report", str(hostile_run), "--out", str(tmp_path / "r"), "--no-html"]) == 0
    text = (tmp_path / "r" / "table.csv").read_text()
    assert "'" + FORMULA_RUN in text and "\n" + FORMULA_RUN not in text and "," + FORMULA_RUN not in text


# ------------------------------------------------------------------------------------ where outputs go

#: Relative paths a user may save inside an output folder (notes, a sub-folder of theirs, a hidden file).
USER_FILES = st.lists(st.sampled_from(["notes.txt", ".DS_Store", "mine/keep.csv", "a b.md", "roc.png.bak"]), min_size=1,
                      max_size=3, unique=True)  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user_files=USER_FILES, command=st.sampled_from(["evaluate", "report", "explore", "etl"]))
def test_overwrite_refuses_to_delete_a_file_cxrflow_did_not_write(tmp_path_factory, user_files, command):
    out = tmp_path_factory.mktemp("pub") / "out"
    with publishing(out, command) as pub:
        (pub.tmp / "metrics.json").write_text("{}")
        (pub.tmp / "sub").mkdir()
        (pub.tmp / "sub" / "roc.png").write_bytes(b"png")
        pub.commit()
    for rel in user_files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("the user's")
    with pytest.raises(CxrflowError, match="did not write") as info, publishing(out, command, overwrite=True) as pub:
        pub.commit()
    assert any(rel in str(info.value) for rel in user_files)
    assert all((out / rel).read_text() == "the user's" for rel in user_files) and (out / "metrics.json").exists()
    for rel in user_files:  # once the user's files are gone, the overwrite goes ahead
        (out / rel).unlink()
    with publishing(out, command, overwrite=True) as pub:
        pub.commit()


@pytest.mark.parametrize("command", ["evaluate", "report", "localize", "explore", "ensemble", "predict"])
@pytest.mark.parametrize("sealed", ["etl", "synth"])
def test_no_output_goes_into_a_store_or_collection(tmp_path, command, sealed):
    folder = tmp_path / "sealed"
    with publishing(folder, sealed) as pub:
        pub.commit()
    for out in (folder / "out", folder / "size=16" / "deep" / "out"):
        with pytest.raises(CxrflowError, match=f"inside a cxrflow {sealed} output"):
            check_target(out, command)
    if command != sealed:
        with pytest.raises(CxrflowError):
            check_target(folder, command)


@pytest.mark.slow
def test_predict_heatmaps_never_write_into_the_store_and_evaluate_keeps_the_users_notes(hostile_run, tmp_path, capsys):
    from PIL import Image

    store = hostile_run.parent.parent / "store"
    before = sorted(p.name for p in store.rglob("*"))
    Image.new("L", (20, 20), 80).save(tmp_path / "x.png")
    for target in (store, store / "size=16", store / "overlays"):
        rc = main(["predict", "--run", str(hostile_run), str(tmp_path / "x.png"), "--heatmaps", str(target)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "cxrflow etl output" in err[0], err
    assert sorted(p.name for p in store.rglob("*")) == before
    assert main(["evaluate", "--run", str(hostile_run), "--n-boot", "5", "--device", "cpu"]) in (0, 2)
    capsys.readouterr()
    evaluation = hostile_run / "eval-test-best_finetune"
    (evaluation / "notes.txt").write_text("my notes")
    rc = main(["evaluate", "--run", str(hostile_run), "--n-boot", "5", "--device", "cpu", "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "notes.txt" in err[0], err
    assert (evaluation / "notes.txt").read_text() == "my notes"


# ---------------------------------------------------------------------------------------------- modes

MODES = st.sampled_from([0o700, 0o750, 0o755, 0o770, 0o711, 0o775])
UMASKS = st.sampled_from([0o022, 0o077, 0o002, 0o027])


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=MODES, umask=UMASKS, command=st.sampled_from(["synth", "evaluate", "report"]), first=st.booleans())
def test_an_output_replacing_a_folder_keeps_its_mode_and_a_new_one_follows_the_umask(tmp_path_factory, mode, umask,
                                                                                     command, first):  # fmt: skip
    root = tmp_path_factory.mktemp("modes")
    out = root / "priv"
    old = os.umask(umask)
    try:
        if first:  # an empty folder the user made
            out.mkdir()
        else:  # an earlier output
            with publishing(out, command) as pub:
                pub.commit()
        os.chmod(out, mode)
        with publishing(out, command, overwrite=True) as pub:
            pub.commit()
        assert _mode(out) == mode
        with publishing(root / "new", command) as pub:
            pub.commit()
        assert _mode(root / "new") == 0o777 & ~umask
        with claiming(root / "run", "train"):
            pass
        os.chmod(root / "run", mode)
        with claiming(root / "run", "train", overwrite=True, fresh=True):
            pass
        assert _mode(root / "run") == mode
    finally:
        os.umask(old)


@given(mode=st.sampled_from([0o600, 0o640, 0o644, 0o660]), umask=UMASKS)
def test_a_file_output_replacing_a_file_keeps_its_mode(tmp_path_factory, mode, umask):
    from cxrflow.atomic import write_text_atomic

    path = tmp_path_factory.mktemp("file") / "split.csv"
    old = os.umask(umask)
    try:
        write_text_atomic(path, "a")
        assert _mode(path) == 0o666 & ~umask
        os.chmod(path, mode)
        write_text_atomic(path, "b")
        assert _mode(path) == mode and path.read_text() == "b"
    finally:
        os.umask(old)


@pytest.mark.slow
def test_synth_into_a_private_folder_keeps_it_private(tmp_path):
    priv = tmp_path / "priv"
    priv.mkdir(mode=0o700)
    os.chmod(priv, 0o700)
    assert main(["synth", "--out", str(priv), "--patients", "4", "--size", "32"]) == 0
    assert _mode(priv) == 0o700 and any(priv.iterdir())


# ------------------------------------------------------------------------------------------- printing

CONTROL = st.text(alphabet=st.sampled_from(["\x1b", "[", "3", "1", "m", "\x07", "\r", "\n", "\x9b", "\u202e", "a", "é", "/"]),
                  max_size=12)  # fmt: skip


@given(CONTROL, CONTROL)
def test_error_lines_never_carry_control_characters(name, problem):
    line = str(CxrflowError(problem, name))
    assert line.isprintable() and printable(name) in line
    assert printable("Pleural Thickening é/x.png") == "Pleural Thickening é/x.png"


@pytest.mark.slow
def test_names_with_escape_sequences_are_printed_escaped(hostile_run, tmp_path, capsys):
    from PIL import Image

    good = tmp_path / "ok\x1b[31m.png"
    Image.new("L", (20, 20), 80).save(good)
    bad = tmp_path / "bad\x1b]0;owned\x07.png"
    bad.write_bytes(b"not an image")
    rc = main(["predict", "--run", str(hostile_run), str(good), str(bad)])
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err and "\x07" not in captured.err
    assert "ok\\x1b[31m.png" in captured.out and "bad\\x1b]0;owned\\x07.png" in captured.err, (rc, captured)
    rc = main(["report", str(tmp_path / "no\x1b[2Jrun"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "\x1b" not in err and "no\\x1b[2Jrun" in err


# ---------------------------------------------------------------------------------------- rows left out


def _chexpert_with_odd_views(root: Path, odd: int) -> tuple[Path, int, int]:
    """A CheXpert folder whose first ``odd`` Frontal train rows have view LL or RL; returns it, the
    number of such rows and the number of lateral rows."""
    from cxrflow.testing.synthformats import write_chexpert

    folder = write_chexpert(root, patients=8, size=16, seed=1)
    table = pd.read_csv(folder / "train.csv", dtype=str, keep_default_na=False)
    frontal = table.index[table["Frontal/Lateral"] == "Frontal"][:odd]
    table.loc[frontal, "AP/PA"] = ["LL" if i % 2 else "RL" for i in range(len(frontal))]
    table.to_csv(folder / "train.csv", index=False)
    valid = pd.read_csv(folder / "valid.csv", dtype=str, keep_default_na=False)
    lateral = int((table["Frontal/Lateral"] == "Lateral").sum() + (valid["Frontal/Lateral"] == "Lateral").sum())
    return folder, len(frontal), lateral


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(odd=st.integers(1, 3), command=st.sampled_from(["explore", "split"]))
def test_commands_reading_a_collection_say_what_they_left_out(tmp_path_factory, capsys, odd, command):
    root = tmp_path_factory.mktemp("views")
    folder, odd, lateral = _chexpert_with_odd_views(root, odd)
    out = root / ("explore" if command == "explore" else "split.csv")
    assert main([command, "--data", str(folder), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"{odd} marked Frontal" in said and f"{lateral} lateral" in said, said
    if command == "explore":
        assert f"{odd} marked Frontal" in (out / "summary.md").read_text()


# -------------------------------------------------------------------------------------- pixel budgets


def _jpeg2000_dicom(path: Path) -> bytes:
    import numpy as np

    from cxrflow.testing.synthformats import write_dicom

    write_dicom(path, (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 4096, transfer_syntax="jpeg2000")
    return path.read_bytes()


def _with_siz(data: bytes, width: int, height: int) -> bytes:
    """``data`` with its JPEG 2000 SIZ marker saying ``width`` x ``height`` (the DICOM header still says 64x64)."""
    at = data.find(b"\xff\x4f\xff\x51")
    assert at > 0
    x = at + 8  # SOC, SIZ, Lsiz, Rsiz, then Xsiz, Ysiz
    return data[:x] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[x + 8 :]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 2**31), height=st.integers(1, 2**31))
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path_factory, width, height):
    from cxrflow.data.imagecheck import MAX_SIDE
    from cxrflow.data.imaging import ImageError, preprocess

    if max(width, height) <= MAX_SIDE:
        return
    path = tmp_path_factory.mktemp("j2k") / "bomb.dcm"
    path.write_bytes(_with_siz(_jpeg2000_dicom(path), width, height))
    with pytest.raises(ImageError, match=f"codestream says {width}x{height}"):
        preprocess(path, [32])


def test_an_honest_jpeg2000_dicom_still_decodes(tmp_path):
    from cxrflow.data.imaging import preprocess

    path = tmp_path / "ok.dcm"
    _jpeg2000_dicom(path)
    assert preprocess(path, [32])[32].shape == (32, 32)


@given(width=st.integers(1, 65535), height=st.integers(1, 65535))
def test_jpeg_frame_headers_are_read_from_the_codestream(width, height):
    import io

    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEGBaseline8Bit

    from cxrflow.data.formats.dicom import codestream_sizes

    buf = io.BytesIO()
    Image.new("L", (8, 8), 90).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = bytes(data)
    assert codestream_sizes(ds) == [(width, height)]
