"""Uncertain and unmentioned labels: policies, counts, masked loss, loader, training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cxrflow.cli import main
from cxrflow.data.loader import make_loader
from cxrflow.data.store import KNOWN_COLUMN, MANIFEST_NAME, schema_for
from cxrflow.data.uncertain import (
    KNOWN,
    UNCERTAIN,
    UNMENTIONED,
    apply_policy,
    label_counts,
    masked_bce,
    pos_weight,
)
from cxrflow.metrics import summarize
from cxrflow.testing.synthstore import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=np.uint8)
STATES = np.array([[KNOWN, UNCERTAIN, UNMENTIONED], [KNOWN, KNOWN, KNOWN], [UNCERTAIN, UNMENTIONED, KNOWN]], np.uint8)


def test_policies_by_hand():
    labels, known = apply_policy(LABELS, STATES, "ignore")
    assert labels.tolist() == LABELS.tolist() and known.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 1]]
    labels, known = apply_policy(LABELS, STATES, "ones")
    assert labels.tolist() == [[1, 1, 0], [0, 0, 1], [1, 0, 0]] and known.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 1]]
    labels, known = apply_policy(LABELS, STATES, "zeros")
    assert labels.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]] and known.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 1]]
    labels, known = apply_policy(LABELS, None, "ones")
    assert labels is LABELS and known.tolist() == [[1, 1, 1]] * 3


def test_counts_and_pos_weight_by_hand():
    counts = label_counts(LABELS, STATES, ("a", "b", "c"))
    assert counts == {
        "a": {"positive": 1, "negative": 1, "uncertain": 1, "unknown": 0},
        "b": {"positive": 0, "negative": 1, "uncertain": 1, "unknown": 1},
        "c": {"positive": 1, "negative": 1, "uncertain": 0, "unknown": 1},
    }
    assert pos_weight(counts, "abc", "ignore") == [1.0, 1.0, 1.0]
    assert pos_weight(counts, "abc", "ones") == [0.5, 1.0, 1.0]
    assert pos_weight(counts, "abc", "zeros") == [2.0, 2.0, 1.0]


def test_masked_bce_counts_known_labels_only():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    known = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    pw = torch.tensor([2.0, 3.0])
    each = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=pw, reduction="none")
    expected = (each[0, 0] + each[1, 0] + each[1, 1]) / 3
    assert float(masked_bce(logits, labels, known, pw)) == pytest.approx(float(expected))
    full = masked_bce(logits, labels, torch.ones_like(known), pw)
    assert float(full) == pytest.approx(float(torch.nn.BCEWithLogitsLoss(pos_weight=pw)(logits, labels)))


def test_summarize_uses_known_labels_per_finding():
    labels = np.array([[1, 1], [0, 0], [1, 1], [0, 0], [1, 1]])
    probs = np.array([[0.9, 0.9], [0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.8, 0.8]])
    known = np.array([[1, 1], [1, 1], [1, 0], [1, 1], [1, 1]])
    m = summarize(labels, probs, np.arange(5), ["all", "masked"], np.array([0.5, 0.5]), n_boot=50, known=known)
    assert m["auc"]["all"] == pytest.approx(5 / 6) and m["auc"]["masked"] == pytest.approx(1.0)
    assert m["excluded_unknown"] == {"all": 0, "masked": 1}
    assert m["positives"] == {"all": 3, "masked": 2}
    assert m["sensitivity"]["masked"] == pytest.approx(1.0) and m["sensitivity"]["all"] == pytest.approx(2 / 3)
    assert "excluded_unknown" not in summarize(labels, probs, np.arange(5), ["a", "b"], n_boot=10)


def _add_states(store: Path, seed: int, all_known: bool = False) -> np.ndarray:
    """Give every file of a synthetic store a labels_known column (random states) and the manifest
    the keys the ETL writes for such stores; returns the train states in file order."""
    rng = np.random.default_rng(seed)
    manifest = json.loads((store / MANIFEST_NAME).read_text())
    train_labels, train_states = [], []
    for path in sorted(store.rglob("part-*.parquet")):
        table = pq.read_table(path)
        group_rows = pq.ParquetFile(path).metadata.row_group(0).num_rows  # same row groups, same shuffle
        labels = np.array(table.column("labels").to_pylist(), dtype=np.uint8)
        states = (
            np.full_like(labels, KNOWN)
            if all_known
            else rng.choice([KNOWN, UNCERTAIN, UNMENTIONED], size=labels.shape, p=[0.7, 0.15, 0.15]).astype(np.uint8)
        )
        table = table.add_column(
            table.schema.get_field_index("labels") + 1, KNOWN_COLUMN, pa.array(states.tolist(), pa.list_(pa.uint8()))
        )
        assert table.schema.equals(schema_for(True), check_metadata=False)
        pq.write_table(table, path, row_group_size=group_rows)
        if "split=train" in str(path):
            train_labels.append(labels)
            train_states.append(states)
    counts = label_counts(np.concatenate(train_labels), np.concatenate(train_states), manifest["label_names"])
    manifest.update(
        {
            "format": "chexpert",
            "label_counts": counts,
            "uncertain_policies": ["ignore", "ones", "zeros"],
            "pos_weight": pos_weight(counts, manifest["label_names"]),
        }
    )
    (store / MANIFEST_NAME).write_text(json.dumps(manifest))
    return np.concatenate(train_states)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("uncertain")
    out = {}
    for name in ("nih", "states", "all-known"):
        write_synthetic_store(root / name, sizes=(32,), rows={"train": 64, "val": 32, "test": 32}, seed=3)
        out[name] = root / name
    _add_states(out["states"], seed=1)
    _add_states(out["all-known"], seed=1, all_known=True)
    return out


@pytest.mark.parametrize("policy", ["ignore", "ones", "zeros"])
def test_loader_applies_the_policy(stores, policy):
    table = pq.read_table(next((stores["states"] / "size=32" / "split=train").glob("part-*.parquet")))
    labels = np.array(table.column("labels").to_pylist(), dtype=np.uint8)
    states = np.array(table.column(KNOWN_COLUMN).to_pylist(), dtype=np.uint8)
    want_labels, want_known = apply_policy(labels, states, policy)
    batch = next(
        iter(make_loader(stores["states"], 32, "train", batch_size=len(labels), shuffle=False, uncertain=policy))
    )
    assert batch["labels"].numpy().tolist() == want_labels.tolist()
    assert batch["known"].numpy().tolist() == want_known.tolist()
    assert batch["known"].dtype == torch.float32


def _train(store: Path, out: Path, *extra: str) -> None:
    assert (
        main(
            [
                "train",
                "--quiet",
                "--store",
                str(store),
                "--size",
                "32",
                "--model",
                "simple_cnn",
                "--out",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--device",
                "cpu",
                *extra,
            ]
        )
        == 0
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "best_finetune.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_nih_training_is_the_same_whatever_the_policy(stores, tmp_path):
    """An NIH store has every label known: the plain BCE is used and --uncertain changes nothing."""
    _train(stores["nih"], tmp_path / "a")
    _train(stores["nih"], tmp_path / "b", "--uncertain", "ones")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_all_known_states_train_like_the_plain_store(stores, tmp_path):
    """Masked loss over labels that are all known = the plain mean BCE (up to summation order)."""
    _train(stores["nih"], tmp_path / "plain")
    _train(stores["all-known"], tmp_path / "masked")
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "masked")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


@pytest.mark.slow
def test_train_and_evaluate_with_unknown_labels(stores, tmp_path):
    _train(stores["states"], tmp_path / "run", "--uncertain", "zeros")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["uncertain"] == "zeros"
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--device", "cpu", "--n-boot", "20"]) == 0
    folder = next((tmp_path / "run").glob("eval-test-*"))
    metrics = json.loads((folder / "metrics.json").read_text())
    states = np.concatenate(
        [
            np.array(pq.read_table(p).column(KNOWN_COLUMN).to_pylist())
            for p in sorted((stores["states"] / "size=32" / "split=test").glob("part-*.parquet"))
        ]
    )
    names = metrics["label_names"]
    assert metrics["excluded_unknown"] == {n: int((states[:, j] != KNOWN).sum()) for j, n in enumerate(names)}
    predictions = pq.read_table(folder / "predictions.parquet")
    assert predictions.column(f"known_{names[0]}").to_pylist() == (states[:, 0] == KNOWN).astype(int).tolist()
    # calibration removes the logit shift of the loss the run trained with: U-Zeros' pos_weight, not the manifest's U-Ignore one
    manifest = json.loads((stores["states"] / "_manifest.json").read_text())
    zeros = np.log(np.maximum(pos_weight(manifest["label_counts"], names, "zeros"), 1e-12))
    offsets = np.array([metrics["calibration"]["logit_offset"][n] for n in names])
    np.testing.assert_allclose(offsets, zeros, rtol=1e-6)
    assert not np.allclose(offsets, np.log(np.maximum(manifest["pos_weight"], 1e-12)))


def test_per_finding_policy():
    from cxrflow.data.uncertain import resolve_policy
    from cxrflow.errors import CxrflowError

    assert resolve_policy("zeros", "abc") == "zeros"
    assert resolve_policy("zeros,b=ones", "abc") == ("zeros", "ones", "zeros")
    assert resolve_policy("c=ones", "abc") == ("ignore", "ignore", "ones")
    labels, known = apply_policy(LABELS, STATES, ("zeros", "ones", "ignore"))
    assert labels.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0]] and known.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 1]]
    counts = label_counts(LABELS, STATES, ("a", "b", "c"))
    assert pos_weight(counts, "abc", "zeros,b=ones") == [2.0, 1.0, 1.0]
    for bad in ("maybe", "ones,zeros", "=ones", "ignore,d=ones"):
        with pytest.raises(CxrflowError, match="--uncertain"):
            resolve_policy(bad, "abc")


def test_loader_per_finding_policy(stores):
    table = pq.read_table(next((stores["states"] / "size=32" / "split=train").glob("part-*.parquet")))
    labels = np.array(table.column("labels").to_pylist(), dtype=np.uint8)
    states = np.array(table.column(KNOWN_COLUMN).to_pylist(), dtype=np.uint8)
    names = json.loads((stores["states"] / MANIFEST_NAME).read_text())["label_names"]
    per = tuple("ones" if n == "Edema" else "zeros" for n in names)
    want_labels, want_known = apply_policy(labels, states, per)
    batch = next(
        iter(
            make_loader(
                stores["states"], 32, "train", batch_size=len(labels), shuffle=False, uncertain="zeros,Edema=ones"
            )
        )
    )
    assert batch["labels"].numpy().tolist() == want_labels.tolist()
    assert batch["known"].numpy().tolist() == want_known.tolist()


@pytest.mark.slow
def test_ensemble_of_runs_with_unknown_labels_scores_known_labels_only(stores, tmp_path):
    """An ensemble's stacking, thresholds, calibration and AUCs use each finding's known labels, as
    its members' evaluations do (it counted the unknown labels as negatives)."""
    from sklearn.metrics import roc_auc_score

    from cxrflow.modelling.ensemble import build_ensemble

    for name, seed in (("a", "0"), ("b", "1")):
        _train(stores["states"], tmp_path / name, "--seed", seed)
        assert main(["evaluate", "--run", str(tmp_path / name), "--device", "cpu", "--n-boot", "20"]) == 0
    member = json.loads(next((tmp_path / "a").glob("eval-test-*/metrics.json")).read_text())
    ens = build_ensemble([tmp_path / "a", tmp_path / "b"], tmp_path / "ens", method="stacked", n_boot=20)
    assert ens["excluded_unknown"] == member["excluded_unknown"] and sum(ens["excluded_unknown"].values()) > 0
    test = pq.read_table(tmp_path / "ens" / "predictions.parquet").to_pandas()
    for name in ens["label_names"]:
        known = test[f"known_{name}"].to_numpy().astype(bool)
        y, p = test[f"label_{name}"].to_numpy()[known], test[f"prob_{name}"].to_numpy()[known]
        expected = roc_auc_score(y, p) if 0 < y.sum() < len(y) else None
        assert ens["auc"][name] == (None if expected is None else pytest.approx(expected, abs=1e-9))
