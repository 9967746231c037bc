"""cxrflow export of an ensemble folder: the MLflow model and the ONNX graph score images as the
ensemble's evaluation and ``cxrflow predict --run ENSEMBLE`` do."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxrflow.cli import main
from cxrflow.results.predict import load_predictor, predict_files

pytestmark = pytest.mark.slow  # three trained and evaluated runs, two ensembles, then MLflow and ONNX exports


def _train(tmp, store, name, *, size, seed, lr):
    from cxrflow.modelling.config import StageSettings, TrainConfig
    from cxrflow.modelling.train import train

    out = tmp / name
    config = TrainConfig(
        store=str(store), size=size, model="simple_cnn", out=str(out), pretrained="none", batch_size=16,
        kt=StageSettings(epochs=1, lr=lr), finetune=StageSettings(epochs=1, lr=lr),
        augment=False, device="cpu", early_stopping_patience=0, seed=seed,
    )  # fmt: skip
    train(config, quiet=True, log=lambda msg: None)
    assert main(["evaluate", "--run", str(out), "--n-boot", "10"]) == 0
    return out


def _png_files(store, size, folder, n=6):
    rows = pq.read_table(next((store / f"size={size}" / "split=test").glob("*.parquet"))).slice(0, n).to_pylist()
    folder.mkdir()
    files = []
    for r in rows:
        buffer = io.BytesIO()
        Image.fromarray(np.frombuffer(r["pixels"], np.uint8).reshape(size, size), "L").save(buffer, format="PNG")
        files.append(folder / f"{r['image_id']}.png")
        files[-1].write_bytes(buffer.getvalue())
    return files, [r["image_id"] for r in rows]


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory, one_torch_thread):
    """Two runs at 32 px and one at 48 px on one store (each with the store's pixel statistics at
    its size), a stacked and a mean ensemble of the 32 px runs and a mean ensemble across sizes."""
    from cxrflow.testing.synthstore import write_synthetic_store

    tmp = tmp_path_factory.mktemp("export-ensemble")
    store = tmp / "store"
    write_synthetic_store(store, sizes=(32, 48), rows={"train": 96, "val": 64, "test": 48}, prevalence=0.3, signal=12)
    a = _train(tmp, store, "a", size=32, seed=0, lr=3e-3)
    b = _train(tmp, store, "b", size=32, seed=1, lr=1e-2)
    c = _train(tmp, store, "c", size=48, seed=2, lr=3e-3)
    folders = {}
    for name, members, method in (("stacked", [a, b], "stacked"), ("mean", [a, b], "mean"), ("mixed", [a, c], "mean")):
        folders[name] = tmp / f"ens-{name}"
        args = ["ensemble", *map(str, members), "--out", str(folders[name]), "--method", method, "--n-boot", "10"]
        assert main(args) == 0
    files32, ids32 = _png_files(store, 32, tmp / "png32")
    files48, _ = _png_files(store, 48, tmp / "png48")
    return {"tmp": tmp, "store": store, "ens": folders, "files32": files32, "ids32": ids32, "files48": files48}


def _encoded(files):
    return [base64.b64encode(Path(f).read_bytes()).decode() for f in files]


def _predictions(folder):
    return pd.read_parquet(folder / "predictions.parquet").set_index("image_id")


def test_mlflow_ensemble_scores_as_the_ensembles_evaluation_and_predict(ensembles):
    import mlflow.pyfunc

    folder = ensembles["ens"]["stacked"]
    out_dir = ensembles["tmp"] / "model-stacked"
    assert main(["export", "--run", str(folder), "--format", "mlflow", "--out", str(out_dir)]) == 0
    model = mlflow.pyfunc.load_model(str(out_dir))
    predictor = load_predictor(folder)
    names = predictor.label_names
    out = model.predict(pd.DataFrame({"image": _encoded(ensembles["files32"])}))
    assert out["error"].isna().all()
    got = out[[f"prob_{n}" for n in names]].to_numpy(np.float64)
    evaluated = _predictions(folder).loc[ensembles["ids32"], [f"calprob_{n}" for n in names]].to_numpy(np.float64)
    np.testing.assert_allclose(got, evaluated, atol=1e-5)  # the ensemble evaluation's calibrated probabilities
    predictions, errors = predict_files(predictor, ensembles["files32"])
    assert errors == []
    np.testing.assert_allclose(got, [[p["probabilities"][n] for n in names] for p in predictions], atol=1e-5)
    assert predictor.thresholds  # the ensemble evaluation's operating points travel with the model
    for j, n in enumerate(names):
        t = predictor.thresholds.get(n)
        assert out[f"positive_{n}"].tolist() == ([None] * len(got) if t is None else [bool(v >= t) for v in got[:, j]])
    meta = model.metadata.metadata
    assert meta["kind"] == "ensemble" and meta["method"] == "stacked" and meta["calibrated"] is True
    metrics = json.loads((folder / "metrics.json").read_text())
    assert meta["members"] == metrics["member_names"]
    card = (out_dir / "README.md").read_text()
    assert "## Members" in card and all(f"| {m} |" in card for m in metrics["member_names"])
    assert f"{metrics['auc']['Atelectasis']:.3f}" in card and "logistic regression" in card
    spec = json.loads((out_dir / "artifacts" / "scoring.json").read_text())
    assert any(w is not None for w in spec["stacking"])  # the stacking weights are used, not only the mean


def test_mlflow_ensemble_keeps_each_members_size_and_normalisation(ensembles):
    import mlflow.pyfunc

    folder = ensembles["ens"]["mixed"]
    out_dir = ensembles["tmp"] / "model-mixed"
    assert main(["export", "--run", str(folder), "--format", "mlflow", "--out", str(out_dir)]) == 0
    spec = json.loads((out_dir / "artifacts" / "scoring.json").read_text())
    sizes = [m["spec"]["size"] for m in spec["members"]]
    means = [m["spec"]["pixel_mean"] for m in spec["members"]]
    assert sizes == [32, 48] and means[0] != means[1]  # each member's own statistics, from its store size
    model = mlflow.pyfunc.load_model(str(out_dir))
    files = ensembles["files48"]
    out = model.predict(pd.DataFrame({"image": _encoded(files)}))
    predictor = load_predictor(folder)
    predictions, errors = predict_files(predictor, files)
    assert errors == [] and out["error"].isna().all()
    names = predictor.label_names
    want = np.array([[p["probabilities"][n] for n in names] for p in predictions])
    np.testing.assert_allclose(out[[f"prob_{n}" for n in names]].to_numpy(np.float64), want, atol=1e-5)
    bad = model.predict(pd.DataFrame({"image": [_encoded(files[:1])[0], "bm90IGFuIGltYWdl"]}))
    assert bad["error"].isna().tolist() == [True, False] and bad.filter(like="prob_").iloc[1].isna().all()


@pytest.mark.parametrize("method", ["mean", "stacked"])
def test_onnx_ensemble_is_one_graph_that_scores_as_the_evaluation(ensembles, method):
    import onnxruntime as ort

    folder = ensembles["ens"][method]
    target = ensembles["tmp"] / f"ens-{method}.onnx"
    assert main(["export", "--run", str(folder), "--format", "onnx", "--out", str(target)]) == 0
    side = json.loads(target.with_suffix(".json").read_text())
    assert side["kind"] == "ensemble" and side["method"] == method and side["size"] == 32 and len(side["members"]) == 2
    assert side["max_abs_difference_to_pytorch"] <= 1e-4 and side["output"]["scale"] == "calibrated"
    table = pq.read_table(next((ensembles["store"] / "size=32" / "split=test").glob("*.parquet"))).to_pylist()
    pixels = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(1, 32, 32) for r in table])
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], {"pixels": pixels})
    names = side["label_names"]
    want = _predictions(folder).loc[[r["image_id"] for r in table], [f"calprob_{n}" for n in names]].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_onnx_refuses_an_ensemble_whose_members_take_different_sizes(ensembles, capsys):
    target = ensembles["tmp"] / "mixed.onnx"
    assert main(["export", "--run", str(ensembles["ens"]["mixed"]), "--format", "onnx", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different input sizes (32, 48 px)" in err[0]
    assert "one by one" in err[0] and "--format mlflow" in err[0]
    assert not target.exists() and not target.with_suffix(".json").exists()
    argv = [
        "export",
        "--run",
        str(ensembles["ens"]["mean"]),
        "--checkpoint",
        "last",
        "--format",
        "onnx",
        "--out",
        str(target),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint" in err[0] and not target.exists()


def test_logged_ensemble_model_loads_from_the_registry(ensembles, tmp_path):
    import mlflow
    import mlflow.pyfunc

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["export", "--run", str(ensembles["ens"]["mean"]), "--format", "mlflow", "--out", str(tmp_path / "m"),
            "--mlflow", uri, "--register", "cxr-ensemble"]  # fmt: skip
    assert main(argv) == 0
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/cxr-ensemble/1")
    assert model.metadata.metadata["kind"] == "ensemble"
    frame = pd.DataFrame({"image": _encoded(ensembles["files32"][:2])})
    pd.testing.assert_frame_equal(model.predict(frame), mlflow.pyfunc.load_model(str(tmp_path / "m")).predict(frame))
