"""Several stores as one training set: findings aligned by name, checks, loss weights, pixel statistics."""

from __future__ import annotations

import shutil

import pytest

from cxrflow.data.labels import LabelVocabulary
from cxrflow.data.storeset import (
    check_store_weights,
    combined_pixel_stats,
    combined_pos_weight,
    known_counts,
    open_stores,
    store_policy,
    union_findings,
)
from cxrflow.errors import CxrflowError
from cxrflow.testing.synthstore import write_synthetic_store

NIH_LIKE = LabelVocabulary(("Atelectasis", "Effusion", "Mass"))
CHEXPERT_LIKE = LabelVocabulary(("Pleural Effusion", "Edema", "atelectasis"))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    write_synthetic_store(root / "nih", sizes=(32, 48), rows={"train": 20, "val": 8, "test": 4}, vocab=NIH_LIKE, seed=1)
    write_synthetic_store(root / "chx", sizes=(32,), rows={"train": 12, "val": 8}, vocab=CHEXPERT_LIKE, seed=2)
    return root


def test_union_keeps_the_first_order_then_adds_new_findings_matched_by_alias_and_spelling():
    names, index = union_findings([NIH_LIKE.names, CHEXPERT_LIKE.names])
    assert names == ["Atelectasis", "Effusion", "Mass", "Edema"]
    assert index == [[0, 1, 2], [1, 3, 0]]


def test_one_store_labelling_one_finding_twice_is_refused():
    with pytest.raises(CxrflowError, match="'Effusion' and 'Pleural Effusion'"):
        union_findings([["Mass"], ["Effusion", "Pleural Effusion"]])


def test_open_stores_aligns_and_records_each_store(two):
    stores = open_stores([two / "nih", two / "chx"], 32)
    assert stores.label_names == ("Atelectasis", "Effusion", "Mass", "Edema")
    assert [s.name for s in stores.stores] == ["nih", "chx"] and stores.train_rows() == [20, 12]
    assert stores.alignment()[1] == {"Pleural Effusion": "Effusion", "Edema": "Edema", "atelectasis": "Atelectasis"}
    assert [set(s.identity) for s in stores.stores] == [{"train", "val", "test"}, {"train", "val"}]
    assert stores.paths == [str((two / "nih").resolve()), str((two / "chx").resolve())]


@pytest.mark.parametrize(
    ("which", "size", "message"),
    [
        ("not-a-store", 32, "_manifest.json is missing"),
        ("missing", 32, "no such store"),
        ("same", 32, "names the same store twice"),
        ("copy", 32, "holds the same images and labels"),
        ("twin-name", 32, "both called 'nih'"),
        ("size", 48, "no 48 px images; the sizes every store holds: 32"),
    ],
)
def test_bad_store_sets_are_one_clear_error(two, tmp_path, which, size, message):
    other = {
        "not-a-store": tmp_path,
        "missing": tmp_path / "nothing",
        "same": two / "nih" / ".." / "nih",
        "copy": shutil.copytree(two / "nih", tmp_path / "nih-copy"),
        "twin-name": tmp_path / "elsewhere" / "nih",
        "size": two / "chx",
    }[which]
    if which == "twin-name":
        write_synthetic_store(other, sizes=(32,), rows={"train": 8, "val": 8}, vocab=NIH_LIKE, seed=9)
    with pytest.raises(CxrflowError, match=message):
        open_stores([two / "nih", other], size)


def test_stores_without_any_common_size_say_so(two, tmp_path):
    write_synthetic_store(tmp_path / "s64", sizes=(64,), rows={"train": 8, "val": 8}, vocab=NIH_LIKE, seed=3)
    with pytest.raises(CxrflowError, match=r"no image size in common \(chx: 32; s64: 64\)"):
        open_stores([two / "chx", tmp_path / "s64"], 32)


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0], "one weight per --store \\(2\\), got 1"), ([1.0, 0.0], "positive"), ([1.0, float("nan")], "positive")],
)
def test_store_weights_of_wrong_count_or_not_positive_are_refused(weights, message):
    with pytest.raises(CxrflowError, match=message):
        check_store_weights(weights, 2)


def test_store_weights_default_to_one_each():
    assert check_store_weights([], 3) == [1.0, 1.0, 1.0] and check_store_weights([2, 0.5], 2) == [2.0, 0.5]


def test_per_finding_uncertain_choices_follow_each_store_spelling():
    assert store_policy("zeros,Effusion=ones,Mass=ones", ["Pleural Effusion", "Edema"]) == "zeros,Pleural Effusion=ones"
    assert store_policy("ignore", ["Edema"]) == "ignore"


def test_pos_weight_is_counted_over_the_rows_where_each_finding_is_known():
    # store 1 (all known, 10 train rows): Atelectasis 2 positives, Effusion 5; store 2 (label states):
    # Effusion 1 positive, 3 negatives, 4 uncertain, 2 unknown; Edema only in store 2
    m1 = {"label_names": ["Atelectasis", "Effusion"], "rows": {"32": {"train": 10}},
          "positives": {"Atelectasis": 2, "Effusion": 5}}  # fmt: skip
    counts = {"Pleural Effusion": {"positive": 1, "negative": 3, "uncertain": 4, "unknown": 2},
              "Edema": {"positive": 2, "negative": 6, "uncertain": 0, "unknown": 2}}  # fmt: skip
    m2 = {"label_names": ["Pleural Effusion", "Edema"], "rows": {"32": {"train": 10}}, "label_counts": counts,
          "uncertain_policies": ["ignore", "ones", "zeros"]}  # fmt: skip
    assert known_counts(m1, "ignore") == ([2, 5], [8, 5])
    assert known_counts(m2, "ones") == ([5, 2], [3, 6])

    class Entry:
        def __init__(self, manifest, index):
            self.manifest, self.label_names, self.model_index = manifest, manifest["label_names"], index

    class Set:
        label_names = ("Atelectasis", "Effusion", "Edema")
        stores = (Entry(m1, (0, 1)), Entry(m2, (1, 2)))

    # Effusion: (5 + 3) negatives over (5 + 1) positives when uncertain is ignored; Atelectasis only
    # from store 1 (8 / 2), Edema only from store 2 (6 / 2): the other store's rows do not count
    assert combined_pos_weight(Set(), "ignore") == [4.0, 8 / 6, 3.0]
    assert combined_pos_weight(Set(), "zeros")[1] == (5 + 3 + 4) / 6


def test_pixel_statistics_are_the_stores_weighted_by_train_rows(two):
    stores = open_stores([two / "nih", two / "chx"], 32)
    mean, std = combined_pixel_stats(stores)
    (m1, s1), (m2, s2) = (
        (s.manifest["pixel_stats"]["32"]["mean"], s.manifest["pixel_stats"]["32"]["std"]) for s in stores.stores
    )
    assert mean == pytest.approx((20 * m1 + 12 * m2) / 32)
    assert std**2 == pytest.approx((20 * (s1**2 + m1**2) + 12 * (s2**2 + m2**2)) / 32 - mean**2)
