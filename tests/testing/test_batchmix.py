"""Batch composition at a 1% shuffle window: the shuffled store layout mixes like a uniform permutation."""

from __future__ import annotations

import pytest

from cxrflow.testing.batchmix import batch_mixing
from cxrflow.testing.synthstore import write_synthetic_store

ROWS = 6400  # 1% window = 64 rows = one row group, as ~1% of the release's train split is a few row groups


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = {}
    for shuffled in (True, False):
        path = tmp_path_factory.mktemp("mix") / "store"
        write_synthetic_store(path, sizes=(4,), rows={"train": ROWS}, rows_per_file=128, row_group_rows=64,
                              follow_ups=4, shuffled=shuffled, seed=5)  # fmt: skip
        out[shuffled] = path
    return out


def test_shuffled_store_batches_mix_like_a_uniform_permutation(layouts):
    mix = batch_mixing(layouts[True], 4, "train", batch_size=32, window_fraction=0.01, seed=1)
    assert mix["window"] == 64 and mix["batches"] == ROWS // 32
    assert 25 < mix["uniform_percentiles"] < 30  # 100 * (1 - 0.99**32) = 27.5 for a uniform batch
    assert mix["percentiles_ratio"] >= 0.9, mix
    assert mix["patients_ratio"] >= 0.9, mix


def test_image_id_ordered_store_does_not(layouts):
    """The layout before rows were shuffled: the same window mixes far worse (the measure can fail)."""
    mix = batch_mixing(layouts[False], 4, "train", batch_size=32, window_fraction=0.01, seed=1)
    assert mix["percentiles_ratio"] < 0.6 and mix["patients_ratio"] < 0.6, mix


def test_synthetic_store_records_its_row_order(layouts, tmp_path):
    from cxrflow.data.store import read_manifest

    assert read_manifest(layouts[True])["row_order"]["kind"] == "shuffled"
    assert "row_order" not in read_manifest(layouts[False])
    # the same seed gives the same store
    again = write_synthetic_store(tmp_path / "again", sizes=(4,), rows={"train": 200}, seed=5)
    first = write_synthetic_store(tmp_path / "first", sizes=(4,), rows={"train": 200}, seed=5)
    assert again["split_identity"] == first["split_identity"]
    import pyarrow.parquet as pq

    def ids(root):
        return pq.read_table(root / "size=4" / "split=train").column("image_id").to_pylist()

    assert ids(tmp_path / "again") == ids(tmp_path / "first") != sorted(ids(tmp_path / "first"))
