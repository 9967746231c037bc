import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrflow.data.labels import NIH14
from cxrflow.metrics import (
    _weighted_auc,
    binary_auc,
    bootstrap_auc_ci,
    bootstrap_aucs,
    per_class_auc,
    sensitivity_specificity,
    summarize,
    youden_threshold,
)


def _data(n=400, k=3, patients=120, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.uint8)
    p = np.clip(0.3 + 0.25 * y + rng.normal(0, 0.2, (n, k)), 0, 1).round(2)  # ties on purpose
    pid = rng.integers(0, patients, n)
    return y, p, pid


def test_weighted_auc_equals_auc_of_the_materialised_resample():
    rng = np.random.default_rng(1)
    y = rng.random(60) < 0.4
    s = rng.random(60).round(1)  # many ties
    w = rng.integers(0, 4, (5, 60)).astype(float)
    got = _weighted_auc(y, s, w)
    for b in range(5):
        c = w[b].astype(int)
        assert got[b] == pytest.approx(binary_auc(np.repeat(y, c), np.repeat(s, c)), abs=1e-12)


def _slow_reference_bootstrap(labels, probs, patient_ids, n_boot, seed):
    """The patient bootstrap written out: draw patients, stack every drawn patient's images (once per
    draw), score the resample with scikit-learn. Same random draws as bootstrap_aucs on small data."""
    from sklearn.metrics import roc_auc_score

    patients, patient_of_image = np.unique(patient_ids, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_boot, len(patients)))
    out = np.full((n_boot, labels.shape[1]), np.nan)
    for b in range(n_boot):
        rows = np.concatenate([np.flatnonzero(patient_of_image == p) for p in draws[b]])
        for j in range(labels.shape[1]):
            y = labels[rows, j]
            if 0 < y.sum() < len(y):
                out[b, j] = roc_auc_score(y, probs[rows, j])
    return out


def test_vectorised_patient_bootstrap_equals_the_slow_reference():
    y, p, pid = _data(n=60, k=3, patients=15, seed=5)
    y[:, 2] = 0
    y[pid == pid[0], 2] = 1  # finding 2: one positive patient, so some resamples have no positive
    got = bootstrap_aucs(y, p, pid, n_boot=40, seed=9)
    ref = _slow_reference_bootstrap(y, p, pid, n_boot=40, seed=9)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert np.isnan(ref[:, 2]).any() and not np.isnan(ref[:, 2]).all()


def test_ci_contains_point_estimate_and_is_reproducible():
    y, p, pid = _data()
    point = per_class_auc(y, p)
    ci = bootstrap_auc_ci(y, p, pid, n_boot=300, seed=3)
    for j in range(3):
        lo, hi = ci["auc_ci"][j]
        assert lo < point[j] < hi and hi - lo < 0.3
    lo, hi = ci["mean_auc_ci"]
    assert lo < point.mean() < hi
    assert bootstrap_auc_ci(y, p, pid, n_boot=300, seed=3) == ci
    assert bootstrap_auc_ci(y, p, pid, n_boot=300, seed=4) != ci


def test_bootstrap_resamples_patients_not_images():
    # 10 patients, each with 20 identical images: the data hold 10 independent units, not 200.
    rng = np.random.default_rng(0)
    y_pat = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    s_pat = rng.random(10)
    y = np.repeat(y_pat, 20)[:, None]
    s = np.repeat(s_pat, 20)[:, None]
    grouped = np.repeat(np.arange(10), 20)
    # grouping by patient is exactly the bootstrap of one image per patient ...
    per_patient = bootstrap_aucs(y_pat[:, None], s_pat[:, None], np.arange(10), n_boot=200, seed=0)
    by_patient = bootstrap_aucs(y, s, grouped, n_boot=200, seed=0)
    np.testing.assert_allclose(by_patient, per_patient)
    # ... and much wider than pretending the 200 images are independent
    wide = bootstrap_auc_ci(y, s, grouped, n_boot=300)["auc_ci"][0]
    narrow = bootstrap_auc_ci(y, s, np.arange(200), n_boot=300)["auc_ci"][0]
    assert (wide[1] - wide[0]) > 2.5 * (narrow[1] - narrow[0])


def test_youden_hand_computed():
    # thresholds (>=): 0.9 J=1/3, 0.7 J=2/3, 0.6 J=1/6, 0.4 J=1/2, 0.2 J=0
    assert youden_threshold([1, 1, 0, 1, 0], [0.9, 0.7, 0.6, 0.4, 0.2]) == 0.7
    # tie between 0.8 (J=.5) and 0.5 (J=.5): the higher, more specific threshold wins
    assert youden_threshold([1, 0, 1, 0], [0.8, 0.6, 0.5, 0.1]) == 0.8
    assert math.isnan(youden_threshold([0, 0, 0], [0.1, 0.2, 0.3]))


def test_sensitivity_specificity_at_threshold():
    sens, spec = sensitivity_specificity([1, 0, 1, 0, 0], [0.8, 0.75, 0.5, 0.1, 0.7], 0.7)
    assert sens == 0.5 and spec == pytest.approx(1 / 3)
    sens, spec = sensitivity_specificity([0, 0], [0.8, 0.1], 0.5)
    assert math.isnan(sens) and spec == 0.5


def test_summarize_names_and_excludes_nan_finding():
    y, p, pid = _data(k=14)
    y[:, 13] = 0  # Hernia: no positives in the split
    thresholds = np.full(14, 0.5)
    m = summarize(y, p, pid, NIH14.names, thresholds, n_boot=50)
    assert m["nan_findings"] == ["Hernia"]
    assert m["auc"]["Hernia"] is None and m["auc_ci95"]["Hernia"] is None
    assert m["positives"]["Hernia"] == 0 and m["n_findings_in_mean"] == 13
    expected = float(np.mean([binary_auc(y[:, j], p[:, j]) for j in range(13)]))
    assert m["mean_auc"] == pytest.approx(expected)
    assert m["n_images"] == 400 and m["n_patients"] == len(np.unique(pid))
    assert m["sensitivity"]["Hernia"] is None and 0 <= m["specificity"]["Hernia"] <= 1
    s, sp = sensitivity_specificity(y[:, 0], p[:, 0], 0.5)
    assert m["sensitivity"]["Atelectasis"] == s and m["specificity"]["Atelectasis"] == sp


# --- a real run, trained by cxrflow.modelling.train on a synthetic store -------------------------------------

import json  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402

from cxrflow.cli import main  # noqa: E402
from cxrflow.errors import CxrflowError  # noqa: E402
from cxrflow.results.evaluate import evaluate_run  # noqa: E402
from cxrflow.runs import read_predictions, resolve_checkpoint  # noqa: E402


def train_tiny_run(tmp, model="simple_cnn", rows=None, epochs=2, store=None):
    """A finished run of cxrflow's own trainer on a synthetic store (32 px)."""
    from cxrflow.modelling.config import StageSettings, TrainConfig
    from cxrflow.modelling.train import train
    from cxrflow.testing.synthstore import write_synthetic_store

    if store is None:
        store = tmp / "store"
        write_synthetic_store(store, sizes=(32,), rows=rows or {"train": 96, "val": 48, "test": 48}, prevalence=0.3)
    out = tmp / f"run-{model}"
    config = TrainConfig(
        store=str(store), size=32, model=model, out=str(out), pretrained="none", batch_size=16,
        kt=StageSettings(epochs=1, lr=1e-2), finetune=StageSettings(epochs=epochs, lr=3e-3),
        augment=False, device="cpu", early_stopping_patience=0,
    )  # fmt: skip
    train(config, quiet=True, log=lambda msg: None)
    return out, store


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("evaluate"))


@pytest.mark.slow
def test_evaluate_run_writes_metrics_predictions_and_figures(tiny_run, tmp_path):
    run, store = tiny_run
    out = tmp_path / "ev"
    assert main(["evaluate", "--run", str(run), "--out", str(out), "--n-boot", "200"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "mean_auc",
        "mean_auc_ci95",
        "auc",
        "auc_ci95",
        "n_images",
        "n_patients",
        "positives",
        "sensitivity",
        "specificity",
        "threshold",
        "nan_findings",
        "checkpoint",
        "stage",
        "model",
        "size",
    ):
        assert key in m, key
    assert m["checkpoint"] == "best_finetune" and m["stage"] == "finetune" and m["model"] == "simple_cnn"
    assert m["n_images"] == 48 and m["split"] == "test" and len(m["auc"]) == 14
    lo, hi = m["mean_auc_ci95"]
    assert lo <= m["mean_auc"] <= hi
    # the AUCs recomputed independently (sklearn) from predictions.parquet match metrics.json
    from sklearn.metrics import roc_auc_score

    table = pq.read_table(out / "predictions.parquet").to_pandas()
    assert list(table.columns[:2]) == ["image_id", "patient_id"] and table.shape == (48, 2 + 4 * 14 + 3)
    assert list(table.columns[-3:]) == ["age", "sex", "view"]  # the subgroup audit's attributes, from the store
    for name, auc in m["auc"].items():
        y = table[f"label_{name}"]
        if y.nunique() == 2:
            assert roc_auc_score(y, table[f"prob_{name}"]) == pytest.approx(auc, abs=1e-6)
        else:
            assert auc is None and name in m["nan_findings"]
    # sensitivity/specificity are at the validation threshold, recomputed from the predictions
    t = m["threshold"]["Cardiomegaly"]
    called = table["prob_Cardiomegaly"] >= t
    pos = table["label_Cardiomegaly"] == 1
    assert m["sensitivity"]["Cardiomegaly"] == pytest.approx((called & pos).sum() / pos.sum())
    for figure in ("roc.png", "curves.png", "reliability.png"):
        assert (out / figure).stat().st_size > 10_000 and figure in m["figures"]
    pred, names = read_predictions(out / "predictions.parquet")
    assert names == m["label_names"] and pred["probs"].shape == (48, 14)
    # no silent overwrite
    assert main(["evaluate", "--run", str(run), "--out", str(out)]) == 2
    assert main(["evaluate", "--run", str(run), "--out", str(out), "--overwrite", "--n-boot", "10"]) == 0


@pytest.mark.slow
def test_evaluate_default_folder_and_nan_finding(tmp_path):
    # a test split without a single Hernia positive: its AUC is NaN, named, and left out of the mean
    import pyarrow as pa

    run, store = train_tiny_run(tmp_path, epochs=1)
    folder = store / "size=32" / "split=test"
    for f in folder.glob("*.parquet"):
        t = pq.read_table(f)
        labels = [row[:13] + [0] for row in t.column("labels").to_pylist()]
        t = t.set_column(t.schema.get_field_index("labels"), "labels", pa.array(labels, pa.list_(pa.uint8())))
        pq.write_table(t, f)
    metrics = evaluate_run(run, n_boot=50)
    assert Path(metrics["out"]) == run / "eval-test-best_finetune"
    m = json.loads((run / "eval-test-best_finetune" / "metrics.json").read_text())
    assert m["nan_findings"] == ["Hernia"] and m["auc"]["Hernia"] is None and m["positives"]["Hernia"] == 0
    assert m["n_findings_in_mean"] == 13
    assert m["mean_auc"] == pytest.approx(np.mean([v for v in m["auc"].values() if v is not None]))


def test_checkpoint_resolution_errors(tiny_run, tmp_path):
    run, _ = tiny_run
    assert resolve_checkpoint(run) == ("best_finetune", run / "best_finetune.pt")
    with pytest.raises(CxrflowError, match="no best_kt.pt"):
        resolve_checkpoint(run, "best_kt")
    with pytest.raises(CxrflowError, match="no checkpoint to evaluate"):
        resolve_checkpoint(tmp_path)
    assert main(["evaluate", "--run", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_evaluation_calibrates_on_validation_and_every_figure_recomputes(tiny_run, tmp_path):
    from sklearn.metrics import brier_score_loss

    from cxrflow.data.store import read_manifest
    from cxrflow.modelling.calibration import expected_calibration_error, fit_temperature

    run, store = tiny_run
    out = tmp_path / "ev"
    m = evaluate_run(run, out=out, n_boot=20)
    cal = m["calibration"]
    pos_weight = read_manifest(store)["pos_weight"]
    assert list(cal["logit_offset"].values()) == pytest.approx(np.log(pos_weight))
    assert (cal["method"], cal["fitted_on"], cal["bins"]) == ("temperature", "val", 15)
    test = pq.read_table(out / "predictions.parquet").to_pandas()
    val = pq.read_table(out / "val_predictions.parquet").to_pandas()
    assert len(val) == 48 and list(val.columns) == list(test.columns)
    for name in m["label_names"]:
        for frame in (test, val):
            # raw probabilities are the sigmoid of the logits; calibrated ones divide the logit by T
            z = frame[f"logit_{name}"].to_numpy(np.float64)
            np.testing.assert_allclose(frame[f"prob_{name}"], 1 / (1 + np.exp(-z)), atol=1e-6)
            shifted = z - cal["logit_offset"][name]  # log pos_weight of the training loss
            np.testing.assert_allclose(
                frame[f"calprob_{name}"], 1 / (1 + np.exp(-shifted / cal["temperature"][name])), atol=1e-6
            )
        y_val = val[f"label_{name}"]
        if y_val.nunique() == 2:  # T is the NLL minimum on the validation logits
            shifted = val[f"logit_{name}"] - cal["logit_offset"][name]
            assert cal["temperature"][name] == pytest.approx(fit_temperature(shifted, y_val), rel=1e-4)
        y = test[f"label_{name}"]
        for when, col in (("before", "prob_"), ("after", "calprob_")):
            assert cal["ece"][when][name] == pytest.approx(expected_calibration_error(y, test[col + name]), abs=1e-6)
            assert cal["brier"][when][name] == pytest.approx(
                brier_score_loss(y, test[col + name], pos_label=1), abs=1e-6
            )
        # thresholds: Youden's J on the validation probabilities, raw and calibrated
        for key, col in (("threshold", "prob_"), ("threshold_calibrated", "calprob_")):
            expected = youden_threshold(y_val, val[col + name])
            assert m[key][name] == (None if math.isnan(expected) else pytest.approx(expected))
    for key in ("ece_mean", "brier_mean"):
        for when in ("before", "after"):
            assert cal[key][when] == pytest.approx(np.mean(list(cal[key.split("_")[0]][when].values())))
    # calibration lowers the mean ECE: pos_weight training leaves the raw probabilities inflated
    assert cal["ece_mean"]["after"] < cal["ece_mean"]["before"]


# --- a result belongs to its checkpoint, its normalisation and its store ------------------------------


@pytest.mark.slow
def test_evaluation_records_its_checkpoint_and_store(tiny_run, tmp_path):
    from cxrflow.data.store import store_split_identity
    from cxrflow.identity import file_sha256
    from cxrflow.runs import evaluation_status

    run, store = tiny_run
    m = evaluate_run(run, out=tmp_path / "ev", n_boot=10)
    ckpt = torch.load(run / "best_finetune.pt", weights_only=True)
    assert m["checkpoint_sha256"] == file_sha256(run / "best_finetune.pt")
    assert (m["stage"], m["epoch"]) == (ckpt["stage"], ckpt["epoch"])
    assert m["store_identity"] == {s: store_split_identity(store, 32, s) for s in ("test", "val")}
    assert evaluation_status(tmp_path / "ev" / "metrics.json") is None


@pytest.mark.slow
def test_a_stale_evaluation_names_the_command_that_makes_it_again_in_its_own_folder(tiny_run, tmp_path):
    """Retrained after two evaluations (the run's default folder and one written with --out): each
    says to evaluate again, the second into its own folder rather than the run's default one."""
    from cxrflow.runs import evaluation_status

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    default = evaluate_run(run, n_boot=5)["out"]
    evaluate_run(run, out=tmp_path / "ev", n_boot=5)
    ckpt = torch.load(run / "best_finetune.pt", weights_only=True)
    torch.save({**ckpt, "epoch": ckpt["epoch"] + 1}, run / "best_finetune.pt")  # e.g. train --overwrite
    at_default = evaluation_status(Path(default) / "metrics.json")
    elsewhere = evaluation_status(tmp_path / "ev" / "metrics.json")
    assert "best_finetune.pt changed since this evaluation" in at_default and "--out" not in at_default
    assert f"--checkpoint best_finetune --split test --out {tmp_path / 'ev'} --overwrite" in elsewhere


@pytest.mark.slow
def test_normalisation_comes_from_the_checkpoint_not_the_store(tiny_run, tmp_path):
    """A store rebuilt with other pixel statistics does not change a trained model's inputs."""
    run, store = tiny_run
    before = evaluate_run(run, out=tmp_path / "before", n_boot=10)
    moved = tmp_path / "store"
    shutil.copytree(store, moved)
    manifest = json.loads((moved / "_manifest.json").read_text())
    manifest["pixel_stats"]["32"] = {"mean": 0.9, "std": 0.05}
    (moved / "_manifest.json").write_text(json.dumps(manifest))
    after = evaluate_run(run, out=tmp_path / "after", n_boot=10, store=moved)
    a, _ = read_predictions(tmp_path / "before" / "predictions.parquet")
    b, _ = read_predictions(tmp_path / "after" / "predictions.parquet")
    np.testing.assert_array_equal(a["probs"], b["probs"])
    assert after["pixel_mean"] == before["pixel_mean"] != 0.9


def _with_source(store: Path, data_dir: str) -> None:
    manifest = json.loads((store / "_manifest.json").read_text())
    manifest["source"] = {**manifest.get("source", {}), "data_dir": data_dir}
    (store / "_manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_a_store_rebuilt_from_the_runs_own_data_with_other_splits_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    """Its test split may hold the run's training images: not scored as another collection's store."""
    from cxrflow.testing.synthstore import write_synthetic_store

    run, store = tiny_run
    own = tmp_path / "own"
    shutil.copytree(store, own)
    _with_source(own, "/data/nih")
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval-*"))
    for checkpoint in copy.glob("*.pt"):  # the run as trained on the store at 'own'
        ckpt = torch.load(checkpoint, weights_only=True)
        torch.save({**ckpt, "config": {**ckpt["config"], "store": str(own)}}, checkpoint)
    rebuilt = tmp_path / "rebuilt"
    write_synthetic_store(rebuilt, sizes=(32,), rows={"train": 96, "val": 48, "test": 48}, prevalence=0.3, seed=1)
    _with_source(rebuilt, "/data/nih")
    assert main(["evaluate", "--run", str(copy), "--store", str(rebuilt), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not the one this run was trained with" in err
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("device, message", [("cuda", "no CUDA GPU is available"), ("foo", "unknown device 'foo'")])
def test_unusable_device_is_one_line(tiny_run, tmp_path, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run, _ = tiny_run
    assert main(["evaluate", "--run", str(run), "--device", device, "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err and "Traceback" not in err


def _invert_val_labels(store: Path) -> None:
    """Turn every validation label over (the manifest's recorded identity then no longer applies)."""
    import pyarrow as pa

    for f in (store / "size=32" / "split=val").glob("*.parquet"):
        t = pq.read_table(f)
        labels = [[1 - v for v in row] for row in t.column("labels").to_pylist()]
        t = t.set_column(t.schema.get_field_index("labels"), "labels", pa.array(labels, pa.list_(pa.uint8())))
        pq.write_table(t, f)
    manifest = json.loads((store / "_manifest.json").read_text())
    del manifest["split_identity"]
    (store / "_manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_thresholds_come_from_validation_not_from_the_evaluated_split(tmp_path):
    """With validation labels turned over, val and test disagree: the recorded thresholds are the
    validation-Youden ones, computed from validation probabilities scored as predict scores them."""
    from cxrflow.modelling.inference import predict_split, training_pixel_stats
    from cxrflow.modelling.models import load_checkpoint
    from cxrflow.testing.synthstore import write_synthetic_store

    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 96, "val": 48, "test": 48}, prevalence=0.3)
    _invert_val_labels(store)
    run, _ = train_tiny_run(tmp_path, store=store, epochs=2)
    m = evaluate_run(run, n_boot=10)
    model, ckpt = load_checkpoint(run / "best_finetune.pt")
    mean, std = training_pixel_stats(ckpt["config"], 32)
    val = predict_split(model, store, 32, "val", pixel_mean=mean, pixel_std=std)
    test = predict_split(model, store, 32, "test", pixel_mean=mean, pixel_std=std)
    names = m["label_names"]
    from_val = [youden_threshold(val["labels"][:, j], val["probs"][:, j]) for j in range(14)]
    from_test = [youden_threshold(test["labels"][:, j], test["probs"][:, j]) for j in range(14)]
    assert [m["threshold"][n] for n in names] == pytest.approx(from_val, abs=0, nan_ok=True)
    differ = sum(1 for a, b in zip(from_val, from_test) if not (np.isnan(a) or np.isnan(b)) and a != b)
    assert differ >= 10, (from_val, from_test)


def test_summary_and_store_info_columns_line_up_with_long_finding_names():
    """CheXpert's 'Enlarged Cardiomediastinum' (26 characters) pushed its row's numbers out of their columns."""
    from cxrflow.data.store import format_manifest
    from cxrflow.modelling.scoring import format_summary

    names = ["Enlarged Cardiomediastinum", "Edema"]
    metrics = {"model": "simple_cnn", "size": 32, "checkpoint": "best_finetune", "split": "test", "n_images": 9,
               "n_patients": 6, "mean_auc": 0.7, "mean_auc_ci95": [0.6, 0.8], "n_findings_in_mean": 2,
               "label_names": names, "positives": {n: 5 for n in names}, "auc": {n: 0.7 for n in names},
               "auc_ci95": {n: [0.6, 0.8] for n in names}}  # fmt: skip
    rows = format_summary(metrics).splitlines()[2:5]
    assert len({r.index("0.700") for r in rows[1:]}) == 1 and rows[0].index("AUC") + 3 == rows[1].index("0.700") + 5
    shown = format_manifest({"label_names": names, "pos_weight": [2.0, 3.0], "positives": {n: 4 for n in names}})
    lines = [line for line in shown.splitlines() if line.startswith("  ") and line.split()[-1] in ("2.00", "3.00")]
    assert len(lines) == 2 and len({len(line) for line in lines}) == 1
