import json

import numpy as np
import pyarrow.dataset as ds
import pytest

from cxrflow.cli import main
from cxrflow.data.labels import NIH14
from cxrflow.data.store import MANIFEST_NAME, SCHEMA, check_partition, pixel_stats, read_manifest
from cxrflow.errors import CxrflowError
from cxrflow.testing.synthstore import write_synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    write_synthetic_store(path, sizes=(16, 24), rows={"train": 40, "val": 10, "test": 10}, rows_per_file=16)
    return path


def test_synthetic_store_matches_contract(store):
    dataset = ds.dataset(store, partitioning="hive")
    table = dataset.to_table(filter=(ds.field("size") == 24) & (ds.field("split") == "train"))
    assert table.num_rows == 40
    for field in SCHEMA:
        assert table.schema.field(field.name).type == field.type
    pixels = table.column("pixels").to_pylist()
    assert all(len(p) == 24 * 24 for p in pixels)
    labels = np.array(table.column("labels").to_pylist())
    assert labels.shape == (40, len(NIH14))
    manifest = read_manifest(store)
    assert manifest["rows"]["24"] == {"train": 40, "val": 10, "test": 10}
    positives = labels.sum(axis=0)
    assert [manifest["positives"][n] for n in NIH14.names] == positives.tolist()
    assert manifest["pos_weight"] == pytest.approx(((40 - positives) / np.maximum(positives, 1)).tolist())


def test_planted_signal_is_in_the_pixels(store):
    table = ds.dataset(store, partitioning="hive").to_table(
        filter=(ds.field("size") == 16) & (ds.field("split") == "train")
    )
    imgs = np.frombuffer(b"".join(table.column("pixels").to_pylist()), np.uint8).reshape(-1, 16, 16)
    labels = np.array(table.column("labels").to_pylist())
    cell0 = imgs[:, :4, :4].mean(axis=(1, 2))
    assert cell0[labels[:, 0] == 1].mean() > cell0[labels[:, 0] == 0].mean() + 40


def test_partition_and_stats(store):
    manifest = read_manifest(store)
    assert check_partition(manifest, store, 16, "val").is_dir()
    mean, std = pixel_stats(manifest, 16)
    assert 0 < mean < 1 and 0 < std < 1
    with pytest.raises(CxrflowError, match=r"size 99 is not in the store; it has sizes \[16, 24\]"):
        check_partition(manifest, store, 99, "train")
    with pytest.raises(CxrflowError, match="split 'holdout'"):
        check_partition(manifest, store, 16, "holdout")


def test_manifest_errors(tmp_path):
    with pytest.raises(CxrflowError, match="no such store"):
        read_manifest(tmp_path / "absent")
    with pytest.raises(CxrflowError, match="not a complete cxrflow store"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CxrflowError, match="newer than this cxrflow supports"):
        read_manifest(tmp_path)


def test_store_info_cli(store, tmp_path, capsys):
    assert main(["store-info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "sizes: 16, 24" in out and "Hernia" in out
    assert main(["store-info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no such store" in err[0]


def test_store_info_words_the_manifest_without_python_reprs():
    from cxrflow.data.store import format_manifest

    manifest = {
        "format_version": 2, "cxrflow_version": "0.1.0", "created": "2026-01-02T03:04:05+00:00", "label_names": ["A", "B"],
        "sizes": [16], "rows": {"16": {"train": 34, "val": 6, "test": 1234}},
        "pixel_stats": {"16": {"mean": 0.41234, "std": 0.2}},
        "source": {"data_dir": "/d", "metadata_rows": 41, "images_found": 41, "written": 40, "missing": 0,
                   "quarantined": 1, "unlisted_on_disk": 0, "age_unknown": 2},
        "split": {"mode": "patients-70-10-20", "val_fraction": None, "seed": 3, "patients": {"train": 9, "val": 2, "test": 3}},
        "parquet": {"compression": "zstd", "rows_per_file": 32, "row_group_rows": {"16": 32}},
    }  # fmt: skip
    text = format_manifest(manifest)
    for repr_mark in ("{", "}", "=None", "None", "'"):
        assert repr_mark not in text, repr_mark
    lines = text.splitlines()
    table = lines[lines.index("images per split:") + 1 :][:2]
    assert table[0].split() == ["size", "train", "val", "test", "train", "pixel", "mean", "/", "std"]
    assert table[1].split() == ["16", "34", "6", "1,234", "0.412", "/", "0.200"]
    assert table[0].index("test") + 4 == table[1].index("1,234") + 5  # right-aligned under its heading
    assert (
        "split: no official split: all patients 70 / 10 / 20 train / val / test (seed 3); patients: train 9, val 2, test 3"
        in text
    )
    assert "written by cxrflow 0.1.0 on 2026-01-02 03:04 UTC" in text
