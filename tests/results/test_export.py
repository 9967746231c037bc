"""cxrflow export: the MLflow model and the ONNX graph score images as predict and evaluate do."""

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_evaluate import train_tiny_run

from cxrflow.cli import main
from cxrflow.results.predict import load_predictor, predict_files

pytestmark = pytest.mark.slow  # a trained and evaluated run, then MLflow and ONNX exports


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An evaluated tiny run, its MLflow and ONNX exports, and a few of its test rows as PNG files."""
    tmp = tmp_path_factory.mktemp("export")
    run, store = train_tiny_run(tmp, epochs=1)
    assert main(["evaluate", "--run", str(run), "--n-boot", "10"]) == 0
    assert main(["export", "--run", str(run), "--format", "mlflow", "--out", str(tmp / "model")]) == 0
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(tmp / "model.onnx")]) == 0
    rows = pq.read_table(next((store / "size=32" / "split=test").glob("*.parquet"))).slice(0, 5).to_pylist()
    images = tmp / "img"
    images.mkdir()
    files = []
    for r in rows:
        path = images / f"{r['image_id']}.png"
        path.write_bytes(_png(np.frombuffer(r["pixels"], np.uint8).reshape(32, 32)))
        files.append(path)
    evaluation = pd.read_parquet(run / "eval-test-best_finetune" / "predictions.parquet").set_index("image_id")
    return {"run": run, "store": store, "tmp": tmp, "files": files, "ids": [r["image_id"] for r in rows],
            "evaluation": evaluation}  # fmt: skip


def _encoded(files):
    return [base64.b64encode(Path(f).read_bytes()).decode() for f in files]


def test_mlflow_model_gives_predicts_and_evaluates_probabilities_and_flags(exported):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(exported["tmp"] / "model"))
    predictor = load_predictor(exported["run"])
    names = predictor.label_names
    frame = pd.DataFrame({"image": _encoded(exported["files"])})
    out = model.predict(frame)
    assert list(out.columns) == [f"prob_{n}" for n in names] + [f"positive_{n}" for n in names] + ["error"]
    got = out[[f"prob_{n}" for n in names]].to_numpy(np.float64)
    predictions, errors = predict_files(predictor, exported["files"])
    assert errors == []
    want = np.array([[p["probabilities"][n] for n in names] for p in predictions])
    np.testing.assert_allclose(got, want, atol=1e-5)
    calibrated = exported["evaluation"].loc[exported["ids"], [f"calprob_{n}" for n in names]].to_numpy(np.float64)
    np.testing.assert_allclose(got, calibrated, atol=1e-5)  # the evaluation's calibrated probabilities
    for j, n in enumerate(names):
        t = predictor.thresholds.get(n)
        flags = out[f"positive_{n}"]
        if t is None:
            assert flags.isna().all()
        else:
            assert flags.tolist() == [bool(v >= t) for v in got[:, j]]
    assert out["error"].isna().all()
    meta = model.metadata.metadata
    assert meta["calibrated"] is True and meta["probabilities"] == "calibrated" and meta["label_names"] == names


def test_a_bad_image_gets_nulls_and_an_error_and_the_batch_still_scores(exported):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(exported["tmp"] / "model"))
    good = _encoded(exported["files"][:2])
    truncated = base64.b64encode(exported["files"][0].read_bytes()[:50]).decode()
    frame = pd.DataFrame({"image": [good[0], "bm90IGFuIGltYWdl", truncated, "%%%", good[1]]})
    out = model.predict(frame)
    assert out["error"].isna().tolist() == [True, False, False, False, True]
    assert (
        "not a recognised image" in out["error"][1] and "truncated" in out["error"][2] and "base64" in out["error"][3]
    )
    probs = out.filter(like="prob_")
    assert probs.iloc[[1, 2, 3]].isna().all().all() and probs.iloc[[0, 4]].notna().all().all()
    assert out.filter(like="positive_").iloc[[1, 2, 3]].isna().all().all()
    alone = model.predict(pd.DataFrame({"image": good[:1]}))
    np.testing.assert_allclose(alone.filter(like="prob_").to_numpy(float), probs.iloc[[0]].to_numpy(float), atol=1e-6)
    with pytest.raises(MlflowException, match="no image in the request could be scored"):
        model.predict(pd.DataFrame({"image": ["bm90IGFuIGltYWdl"]}))


def test_model_folder_carries_the_model_card_and_pins_cxrflow(exported):
    from cxrflow import __version__

    folder = exported["tmp"] / "model"
    card = (folder / "README.md").read_text()
    metrics = json.loads((exported["run"] / "eval-test-best_finetune" / "metrics.json").read_text())
    assert "| Atelectasis |" in card and f"{metrics['auc']['Atelectasis']:.3f}" in card
    assert "## Intended use" in card and "## Limits" in card and "## Training data" in card
    assert f"cxrflow=={__version__}" in (folder / "requirements.txt").read_text().split()
    spec = json.loads((folder / "artifacts" / "scoring.json").read_text())
    assert spec["calibrated"] and spec["size"] == 32 and len(spec["temperature"]) == 14


def test_onnx_graph_scores_pixels_as_the_evaluation(exported):
    import onnxruntime as ort

    sidecar = json.loads((exported["tmp"] / "model.json").read_text())
    assert sidecar["size"] == 32 and sidecar["output"]["scale"] == "calibrated"
    assert sidecar["max_abs_difference_to_pytorch"] <= 1e-4 and sidecar["thresholds"]
    table = pq.read_table(next((exported["store"] / "size=32" / "split=test").glob("*.parquet"))).to_pylist()
    pixels = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(1, 32, 32) for r in table])
    session = ort.InferenceSession(str(exported["tmp"] / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], {"pixels": pixels})
    names = sidecar["label_names"]
    want = exported["evaluation"].loc[[r["image_id"] for r in table], [f"calprob_{n}" for n in names]].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_unevaluated_run_exports_raw_probabilities_and_no_flags(exported, tmp_path):
    import mlflow.pyfunc

    run = tmp_path / "run"
    shutil.copytree(exported["run"], run, ignore=shutil.ignore_patterns("eval-*"))
    assert main(["export", "--run", str(run), "--format", "mlflow", "--out", str(tmp_path / "m")]) == 0
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    assert model.metadata.metadata["probabilities"] == "raw"
    out = model.predict(pd.DataFrame({"image": _encoded(exported["files"][:1])}))
    assert out.filter(like="positive_").isna().all().all()
    raw = exported["evaluation"].loc[exported["ids"][:1], [c.replace("calprob_", "prob_") for c in exported["evaluation"].columns
                                                           if c.startswith("calprob_")]].to_numpy(float)  # fmt: skip
    np.testing.assert_allclose(out.filter(like="prob_").to_numpy(float), raw, atol=1e-5)
    assert "not evaluated" in (tmp_path / "m" / "README.md").read_text()


def test_export_refuses_what_it_must_not_do(exported, tmp_path, capsys):
    run = str(exported["run"])
    assert main(["export", "--run", run, "--format", "mlflow", "--out", str(tmp_path / "m"), "--register", "x"]) == 2
    assert "--register needs --mlflow" in capsys.readouterr().err
    assert main(["export", "--run", run, "--format", "onnx", "--out", str(exported["tmp"] / "model.onnx")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert main(["export", "--run", run, "--format", "mlflow", "--out", str(mine)]) == 2
    assert (mine / "notes.txt").read_text() == "the user's" and "Traceback" not in capsys.readouterr().err


def _serve(folder, port):
    """``mlflow models serve`` on a loopback port, in its own process group (stopped by the caller)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder), "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_model_answers_good_requests_and_refuses_bad_ones_with_json(exported):
    import os
    import signal
    import time

    import requests

    port = _free_port()
    server = _serve(exported["tmp"] / "model", port)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /ping within 120 s"
            time.sleep(0.5)
        good = {"dataframe_records": [{"image": image} for image in _encoded(exported["files"][:2])]}
        answer = requests.post(f"{url}/invocations", json=good, timeout=60)
        assert answer.status_code == 200
        rows = answer.json()["predictions"]
        model_out = np.array([[r[f"prob_{n}"] for n in load_predictor(exported["run"]).label_names] for r in rows])
        calibrated = exported["evaluation"].loc[exported["ids"][:2]].filter(like="calprob_").to_numpy(float)
        np.testing.assert_allclose(model_out, calibrated, atol=1e-5)
        truncated = base64.b64encode(exported["files"][0].read_bytes()[:50]).decode()
        bad = {"not a recognised image": {"dataframe_records": [{"image": "bm90IGFuIGltYWdl"}]},
               "truncated": {"dataframe_records": [{"image": truncated}]},
               "missing inputs ['image']": {"dataframe_records": [{"img": good["dataframe_records"][0]["image"]}]}}  # fmt: skip
        for named, body in bad.items():
            refused = requests.post(f"{url}/invocations", json=body, timeout=60)
            assert 400 <= refused.status_code < 500 and named in refused.json()["message"], (named, refused.text[:300])
            again = requests.post(f"{url}/invocations", json=good, timeout=60)
            assert again.status_code == 200 and again.json()["predictions"] == rows
        mixed = {"dataframe_records": [good["dataframe_records"][0], {"image": "bm90IGFuIGltYWdl"}]}
        rows = requests.post(f"{url}/invocations", json=mixed, timeout=60).json()["predictions"]
        assert (
            rows[0]["error"] is None and rows[1]["prob_Atelectasis"] is None and "not a recognised" in rows[1]["error"]
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_fused_model_takes_demographics_in_both_formats(exported, tmp_path):
    """A run that fuses age, sex and view: the MLflow model reads them from columns as predict does,
    and the ONNX graph has a second input."""
    import mlflow.pyfunc
    import onnxruntime as ort
    import torch

    from cxrflow.data.demographics import encode
    from cxrflow.modelling.models import create_model

    names = load_predictor(exported["run"]).label_names
    net = create_model("simple_cnn", len(names), pretrained="none", fusion="demographics")
    run = tmp_path / "fused"
    run.mkdir()
    config = {"model": "simple_cnn", "size": 32, "pixel_mean": 0.4, "pixel_std": 0.2, "fusion": "demographics"}
    torch.save({"model": net.state_dict(), "config": config, "label_names": names}, run / "best_finetune.pt")
    assert main(["export", "--run", str(run), "--format", "mlflow", "--out", str(tmp_path / "m")]) == 0
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    files = exported["files"][:3]
    people = [(63.0, "F", "AP"), (None, None, None), (30.0, "M", "PA")]
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    frame = pd.DataFrame({"image": _encoded(files), "age": [p[0] for p in people], "sex": [p[1] for p in people],
                          "view": [p[2] for p in people]})  # fmt: skip
    got = model.predict(frame).filter(like="prob_").to_numpy(float)
    predictions, _ = predict_files(load_predictor(run), files, demographics={str(f): p for f, p in zip(files, people)})
    want = np.array([[p["probabilities"][n] for n in names] for p in predictions])
    np.testing.assert_allclose(got, want, atol=1e-5)
    unknown = model.predict(frame[["image"]]).filter(like="prob_").to_numpy(float)
    assert not np.allclose(unknown[0], got[0], atol=1e-4)  # the demographics change the answer
    np.testing.assert_allclose(unknown[1], got[1], atol=1e-6)  # all unknown either way
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels", "demographics"]
    pixels = np.stack([np.asarray(Image.open(f))[None] for f in files])
    (onnx_probs,) = session.run(["probabilities"], {"pixels": pixels, "demographics": encode(people)})
    np.testing.assert_allclose(onnx_probs, want, atol=1e-4)


def test_logged_and_registered_model_loads_from_the_registry(exported, tmp_path):
    import mlflow
    import mlflow.pyfunc

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["export", "--run", str(exported["run"]), "--format", "mlflow", "--out", str(tmp_path / "m"),
            "--mlflow", uri, "--register", "cxr-tiny"]  # fmt: skip
    assert main(argv) == 0
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/cxr-tiny/1")
    local = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    frame = pd.DataFrame({"image": _encoded(exported["files"][:2])})
    pd.testing.assert_frame_equal(model.predict(frame), local.predict(frame))
