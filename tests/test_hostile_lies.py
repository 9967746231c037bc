"""Files that lie: every number cxrflow reads from a file it did not just compute is checked, and a
damaged file is one line naming it.

- checkpoints: weights holding NaN or infinities are refused where checkpoints are loaded;
- ``metrics.json``: numbers finite and in range, intervals not reversed, the mean the mean of its
  AUCs, finding names distinct (one validator, :func:`cxrflow.runs.check_metrics`);
- ``predictions.parquet``: schema, findings, rows and values (one reader, :func:`cxrflow.runs.read_predictions`);
- stores: manifests with distinct names and possible counts; parts of another schema.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrflow.cli import main
from cxrflow.data.manifest import check_manifest
from cxrflow.data.store import SCHEMA, read_manifest, verify_store
from cxrflow.errors import CxrflowError
from cxrflow.runs import check_metrics, predictions_table, read_predictions

pytestmark = pytest.mark.filterwarnings("ignore")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
#: Numbers a damaged or forged file may hold where a probability-like number belongs.
BAD_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e-9, 1.0000001, -3.0, 17.0])


def _one_line(exc: pytest.ExceptionInfo, name: str) -> None:
    text = str(exc.value)
    assert isinstance(exc.value, CxrflowError) and "\n" not in text and name in text, text


# ------------------------------------------------------------------------------------------ checkpoints


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.sampled_from([math.nan, math.inf, -math.inf]), which=st.integers(0, 10_000), at=st.integers(0, 10**9))
def test_a_checkpoint_with_nan_or_infinite_weights_is_refused_at_load(tmp_path_factory, value, which, at):
    from cxrflow.modelling.models import create_model, load_checkpoint

    model = create_model("simple_cnn", 3, pretrained="none")
    state = model.state_dict()
    floats = [k for k, t in state.items() if t.is_floating_point() and t.numel()]
    name = floats[which % len(floats)]
    state[name].view(-1)[at % state[name].numel()] = value
    path = tmp_path_factory.mktemp("ckpt") / "best_finetune.pt"
    torch.save({"model": state, "config": {"model": "simple_cnn", "size": 16}, "label_names": ["a", "b", "c"]}, path)
    with pytest.raises(CxrflowError, match="NaN or infinite") as info:
        load_checkpoint(path)
    _one_line(info, "best_finetune.pt")
    assert name in str(info.value)


# ---------------------------------------------------------------------------------------- metrics.json

NAMES = ["Atelectasis", "Effusion", "Mass"]
GOOD = {
    "run": "/r", "checkpoint": "best_finetune", "split": "test", "size": 16, "n_images": 4, "n_patients": 4,
    "label_names": NAMES, "mean_auc": 0.625, "mean_auc_ci95": [0.5, 0.75], "n_findings_in_mean": 2,
    "auc": {"Atelectasis": 0.5, "Effusion": 0.75, "Mass": None},
    "auc_ci95": {"Atelectasis": [0.25, 0.75], "Effusion": [0.5, 1.0], "Mass": None},
    "sensitivity": {"Atelectasis": 1.0, "Effusion": 0.5, "Mass": None},
    "threshold": {"Atelectasis": 0.4, "Effusion": 0.6, "Mass": None}, "loss": 0.7,
}  # fmt: skip


def _lie(m: dict, kind: str, value: float, finding: int) -> None:
    """Make ``m`` lie in one of the ways a damaged or hand-edited metrics.json does."""
    name = NAMES[finding % 2]  # a finding with an AUC
    if kind == "mean_auc":
        m["mean_auc"] = value
    elif kind == "auc":
        m["auc"][name] = value
    elif kind == "sensitivity":
        m["sensitivity"][name] = value
    elif kind == "reversed interval":
        m["mean_auc_ci95"] = [0.8, 0.6]
    elif kind == "reversed finding interval":
        m["auc_ci95"][name] = [0.9, 0.1]
    elif kind == "interval out of range":
        m["auc_ci95"][name] = [0.1, value]
    elif kind == "a name twice":
        m["label_names"] = [NAMES[0], NAMES[0], NAMES[2]]
    elif kind == "other findings":
        m["auc"]["Hernia"] = 0.5
    elif kind == "mean of other AUCs":
        m["mean_auc"] = 0.95
    elif kind == "negative count":
        m["n_images"] = -4
    elif kind == "threshold":
        m["threshold"][name] = value if not math.isfinite(value) else math.nan
    elif kind == "loss":
        m["loss"] = math.inf
    elif kind == "temperature":  # a temperature that is not a positive number makes every probability NaN
        m["calibration"] = {"temperature": {name: -value if math.isfinite(value) and value > 0 else value}}


LIES = st.sampled_from(["mean_auc", "auc", "sensitivity", "reversed interval", "reversed finding interval",
                        "interval out of range", "a name twice", "other findings", "mean of other AUCs",
                        "negative count", "threshold", "loss", "temperature"])  # fmt: skip


@given(kind=LIES, value=BAD_NUMBERS, finding=st.integers(0, 1))
def test_metrics_that_lie_are_refused_in_one_line_naming_the_file(kind, value, finding):
    assert check_metrics(copy.deepcopy(GOOD), "ev/metrics.json")
    m = copy.deepcopy(GOOD)
    _lie(m, kind, value, finding)
    parsed = json.loads(json.dumps(m))  # as read back from the file (NaN and infinities included)
    with pytest.raises(CxrflowError) as info:
        check_metrics(parsed, "ev/metrics.json")
    _one_line(info, "ev/metrics.json")


# ---------------------------------------------------------------------------------- predictions.parquet


def _predictions(n: int, k: int, seed: int) -> tuple[dict, list[str]]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    pred = {
        "image_id": [f"img{i}.png" for i in range(n)], "patient_id": np.arange(n),
        "labels": rng.integers(0, 2, (n, k)).astype(np.float32), "logits": logits,
        "probs": 1 / (1 + np.exp(-logits)),
    }  # fmt: skip
    return pred, [f"F{j}" for j in range(k)]


DAMAGE = st.sampled_from(["truncated", "nan logit", "inf logit", "probability", "label", "other schema",
                          "rows", "findings", "column type"])  # fmt: skip


@SETTINGS
@given(n=st.integers(1, 12), k=st.integers(1, 4), seed=st.integers(0, 99), damage=DAMAGE, cut=st.floats(0, 0.99))
def test_predictions_that_lie_are_refused_in_one_line_naming_the_file(tmp_path_factory, n, k, seed, damage, cut):
    pred, names = _predictions(n, k, seed)
    metrics = {"label_names": names, "n_images": n}
    path = tmp_path_factory.mktemp("pred") / "predictions.parquet"
    pq.write_table(predictions_table(pred, names), path)
    back, got = read_predictions(path, metrics, rows=n)
    assert got == names and np.allclose(back["logits"], pred["logits"])
    i, j = seed % n, seed % k
    table = predictions_table(pred, names)
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
    elif damage in ("nan logit", "inf logit", "probability", "label"):
        key, value = {"nan logit": ("logits", np.nan), "inf logit": ("logits", np.inf), "probability": ("probs", 1.5),
                      "label": ("labels", 7)}[damage]  # fmt: skip
        pred[key] = np.array(pred[key], dtype=np.float64)
        pred[key][i, j] = value
        table = predictions_table(pred, names)
        if damage == "probability":
            table = table.set_column(table.schema.get_field_index(f"prob_{names[j]}"), f"prob_{names[j]}",
                                     pa.array(pred["probs"][:, j]))  # fmt: skip
        pq.write_table(table, path)
    elif damage == "other schema":
        pq.write_table(pa.table({"image_id": pred["image_id"], "score": np.zeros(n)}), path)
    elif damage == "rows":
        metrics["n_images"] = n + 1
    elif damage == "findings":
        metrics["label_names"] = [*names, "Hernia"]
    elif damage == "column type":
        table = table.set_column(table.schema.get_field_index(f"prob_{names[j]}"), f"prob_{names[j]}",
                                 pa.array([str(v) for v in pred["probs"][:, j]]))  # fmt: skip
        pq.write_table(table, path)
    with pytest.raises(CxrflowError) as info:
        read_predictions(path, metrics, rows=metrics["n_images"])
    _one_line(info, "predictions.parquet")


# ---------------------------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from cxrflow.testing.synthstore import write_synthetic_store

    path = tmp_path_factory.mktemp("store") / "store"
    write_synthetic_store(path, sizes=(16,), rows={"train": 8, "val": 4, "test": 4}, seed=0)
    return path


MANIFEST_LIES = st.sampled_from(["a name twice", "a size twice", "positives above the train rows",
                                 "negative positives", "positives of other findings"])  # fmt: skip


@given(kind=MANIFEST_LIES, which=st.integers(0, 13))
def test_manifests_that_lie_are_refused_in_one_line(store, kind, which):
    good = read_manifest(store)
    m = copy.deepcopy(good)
    names = m["label_names"]
    if kind == "a name twice":
        names[which % len(names)] = names[(which + 1) % len(names)]
    elif kind == "a size twice":
        m["sizes"] = m["sizes"] * 2
    elif kind == "positives above the train rows":
        m["positives"][names[which % len(names)]] = 9
    elif kind == "negative positives":
        m["positives"][names[which % len(names)]] = -1
    else:
        m["positives"]["Not a finding"] = m["positives"].pop(names[which % len(names)])
    with pytest.raises(CxrflowError) as info:
        check_manifest(m, "store/_manifest.json")
    _one_line(info, "store/_manifest.json")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    column=st.sampled_from(SCHEMA.names),
    kind=st.sampled_from(["type", "gone"]),
    split=st.sampled_from(["train", "test"]),
)
def test_a_store_part_of_another_schema_is_found_by_verify_and_the_reader(tmp_path_factory, store, column, kind, split):
    from cxrflow.data.loader import make_loader

    copy_ = tmp_path_factory.mktemp("bad") / "store"
    shutil.copytree(store, copy_)
    part = next((copy_ / "size=16" / f"split={split}").glob("part-*.parquet"))
    table = pq.read_table(part)
    at = table.schema.get_field_index(column)
    if kind == "gone":
        table = table.remove_column(at)
    else:  # the same values in another type: a list of int64, large strings for strings, strings for numbers
        values = table.column(column).to_pylist()
        if column == "labels":
            other = pa.array(values, pa.list_(pa.int64()))
        elif pa.types.is_string(SCHEMA.field(column).type):
            other = pa.array(values, pa.large_string())
        else:
            other = pa.array([str(v) for v in values], pa.string())
        table = table.set_column(at, column, other)
    pq.write_table(table, part)
    problems, _, _ = verify_store(copy_, read_manifest(copy_))
    assert any(part.name in p and column in p for p in problems), problems
    if column in ("image_id", "patient_id", "labels", "age", "sex", "view", "pixels"):
        with pytest.raises(CxrflowError, match="not a cxrflow store file") as info:
            next(iter(make_loader(copy_, 16, split, batch_size=4, shuffle=False)))
        _one_line(info, part.name)


# ------------------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, store):
    """A 1-epoch run on the store, evaluated (copied as a second ensemble member by the test)."""
    root = tmp_path_factory.mktemp("lies")
    args = ["--store", str(store), "--size", "16", "--model", "simple_cnn", "--out", str(root / "a")]
    assert main(["train", "--quiet", *args, "--epochs", "1", "--batch-size", "4", "--device", "cpu"]) == 0
    assert main(["evaluate", "--run", str(root / "a"), "--n-boot", "5", "--device", "cpu"]) == 0
    return root


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.slow
def test_commands_on_files_that_lie_end_in_one_line(evaluated, tmp_path, capsys):
    from PIL import Image

    runs = tmp_path / "runs"
    shutil.copytree(evaluated, runs)
    a, b = runs / "a", runs / "b"
    shutil.copytree(a, b)  # a copied run: its evaluation is b's
    capsys.readouterr()
    # a member's predictions with a NaN logit: ensemble names the file
    pred_path = b / "eval-test-best_finetune" / "predictions.parquet"
    table = pq.read_table(pred_path)
    column = next(c for c in table.column_names if c.startswith("logit_"))
    values = table.column(column).to_numpy().copy()
    values[0] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values)), pred_path)
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "ens"), "--n-boot", "5"]) == 2
    assert "predictions.parquet" in _error_line(capsys)
    # metrics.json with an impossible mean: report names the file
    metrics_path = a / "eval-test-best_finetune" / "metrics.json"
    m = json.loads(metrics_path.read_text())
    m["mean_auc"] = 1e308
    original = metrics_path.read_text()
    metrics_path.write_text(json.dumps(m))
    assert main(["report", str(a), "--out", str(tmp_path / "rep"), "--no-html"]) == 2
    assert "metrics.json" in _error_line(capsys)
    # metrics.json naming two findings (each per-finding field trimmed to match): predict names the file
    two = {k: ({n: v for n, v in x.items() if n in m["label_names"][:2]} if isinstance(x, dict) and
               set(x) == set(m["label_names"]) else x) for k, x in json.loads(original).items()}  # fmt: skip
    metrics_path.write_text(json.dumps({**two, "label_names": m["label_names"][:2]}))
    Image.new("L", (20, 20), 90).save(tmp_path / "x.png")
    assert main(["predict", "--run", str(a), str(tmp_path / "x.png"), "--json"]) == 2
    assert "metrics.json" in _error_line(capsys)
    metrics_path.write_text(original)
    # NaN weights: predict and evaluate refuse the checkpoint, never give null probabilities
    ckpt = torch.load(a / "best_finetune.pt", weights_only=True)
    next(t for t in ckpt["model"].values() if t.is_floating_point()).view(-1)[0] = math.nan
    torch.save(ckpt, a / "best_finetune.pt")
    assert main(["predict", "--run", str(a), str(tmp_path / "x.png"), "--json"]) == 2
    assert "NaN" in _error_line(capsys)
    assert main(["evaluate", "--run", str(a), "--n-boot", "5", "--device", "cpu", "--overwrite"]) == 2
    assert "best_finetune.pt" in _error_line(capsys)
