"""The Python API (``cxrflow.load_model``, ``cxrflow.open_store``): the documented example runs as
written on a real tiny run, and gives what ``cxrflow predict`` gives."""

from __future__ import annotations

import ast
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_evaluate import train_tiny_run

import cxrflow
from cxrflow.errors import CxrflowError
from cxrflow.results.predict import load_predictor, predict_files

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A simple_cnn run trained at 32 px on a store that also holds 64 px, evaluated (calibrated,
    thresholds), and two of its test images as a PNG and a 16-bit DICOM file."""
    from cxrflow.results.evaluate import evaluate_run
    from cxrflow.testing.synthformats import write_dicom
    from cxrflow.testing.synthstore import write_synthetic_store

    tmp = tmp_path_factory.mktemp("api")
    store = tmp / "store"
    write_synthetic_store(store, sizes=(32, 64), rows={"train": 96, "val": 48, "test": 48}, prevalence=0.3)
    run, _ = train_tiny_run(tmp, epochs=1, store=store)
    evaluate_run(run, n_boot=10, device="cpu")
    rows = pq.read_table(next((store / "size=32" / "split=test").glob("*.parquet"))).slice(0, 2).to_pylist()
    a, b = (np.frombuffer(r["pixels"], np.uint8).reshape(32, 32) for r in rows)
    Image.fromarray(a, "L").save(tmp / "a.png")
    write_dicom(tmp / "b.dcm", np.vstack([b, np.zeros((8, 32), np.uint8)]).astype(np.uint16) * 257)
    return run, store, [str(tmp / "a.png"), str(tmp / "b.dcm")]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


@pytest.mark.slow
def test_the_documented_example_runs_verbatim(evaluated):
    run, store, images = evaluated
    paths, example = _python_blocks()[:2]
    assigned = {t.id for node in ast.parse(paths).body for t in node.targets}
    assert assigned == {"RUN", "IMAGES", "STORE"}  # the example's only inputs are these paths
    assert len([line for line in example.splitlines() if line.strip()]) <= 12
    namespace = {"RUN": str(run), "IMAGES": images, "STORE": str(store)}
    exec(compile(example, str(DOC), "exec"), namespace)  # noqa: S102 (the block as written in the docs)

    model, table = namespace["model"], namespace["table"]
    names = model.findings
    assert len(names) == 14 and "Effusion" in names
    assert table.shape == (2, 28) and list(table.index) == images
    assert list(table.columns) == [("probability", n) for n in names] + [("call", n) for n in names]
    assert table.columns.names[0] == "calibrated" and table.attrs["scale"] == "calibrated" and model.calibrated
    assert "calibrated" in model.describe() and table.attrs["errors"] == []
    probabilities, calls = namespace["probabilities"], namespace["calls"]
    assert np.isfinite(probabilities.to_numpy()).all()
    assert ((probabilities >= 0) & (probabilities <= 1)).all().all()
    thresholds = table.attrs["thresholds"]
    assert thresholds == model.thresholds and thresholds  # the evaluation's validation thresholds
    for name in names:
        if name in thresholds:
            assert list(calls[name]) == [p >= thresholds[name] for p in probabilities[name]], name
        else:
            assert calls[name].isna().all(), name
    # the same numbers as cxrflow predict's own functions
    predictions, errors = predict_files(load_predictor(run), images)
    assert errors == []
    for p in predictions:
        np.testing.assert_allclose(probabilities.loc[p["image"]].to_numpy(), [p["probabilities"][n] for n in names])
        if thresholds:
            called = calls.loc[p["image"]].fillna(False).astype(bool)
            assert sorted(p["positive"]) == sorted(called[called].index)

    (heat,) = namespace["maps"]
    assert heat.finding == "Effusion" and heat.image == images[0] and heat.method == "hirescam"
    assert heat.map.shape == (32, 32) and heat.map.dtype == np.float32 and 0 <= heat.map.min() <= heat.map.max() <= 1
    assert math.isclose(heat.probability, probabilities.loc[images[0], "Effusion"], rel_tol=1e-5)  # batch of 1 vs 2
    assert heat.on_original().shape == (32, 32)
    figure = namespace["figure"]
    assert "Effusion" in figure.axes[0].get_title() and figure.axes[0].get_xlabel()

    opened, batch = namespace["store"], namespace["batch"]
    assert opened.findings == names and opened.sizes == [32, 64] and opened.splits == ["train", "val", "test"]
    assert opened.rows[64] == {"train": 96, "val": 48, "test": 48}
    assert tuple(batch["image"].shape) == (32, 1, 64, 64) and tuple(batch["labels"].shape) == (32, 14)
    assert len(namespace["loader"]) == 3


@pytest.mark.slow
def test_a_checkpoint_never_evaluated_gives_raw_probabilities_and_no_calls(evaluated, tmp_path):
    run, _, images = evaluated
    alone = tmp_path / "alone.pt"
    shutil.copyfile(run / "best_finetune.pt", alone)
    plain = cxrflow.load_model(alone)  # a file outside its run folder: no evaluation belongs to it
    table = plain.predict(images[0])
    assert table.shape == (1, 14) and set(table.columns.get_level_values(0)) == {"probability"}
    assert table.columns.names[0] == "raw" and table.attrs["thresholds"] is None and table.attrs["calls"] is None
    assert "no calls" in plain.describe()
    raw = cxrflow.load_model(run, raw=True).predict(images[0])
    np.testing.assert_allclose(table["probability"].to_numpy(), raw["probability"].to_numpy())
    assert raw.columns.names[0] == "raw" and ("call", "Effusion") in raw.columns
    # the run's own checkpoint file is the run's checkpoint: its evaluation's calibration and calls apply
    inside = cxrflow.load_model(run / "best_finetune.pt").predict(images)
    whole = cxrflow.load_model(run).predict(images)
    assert inside.attrs["scale"] == "calibrated" and inside.equals(whole)


@pytest.mark.slow
def test_user_mistakes_are_one_clear_error(evaluated, tmp_path):
    run, store, images = evaluated
    model = cxrflow.load_model(run)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(CxrflowError, match=r"1 of 2 images could not be scored.*errors='skip'") as err:
        model.predict([images[0], broken])
    assert str(broken) in str(err.value)
    table = model.predict([images[0], broken], errors="skip")
    assert list(table.index) == [images[0]] and table.attrs["errors"][0]["image"] == str(broken)
    with pytest.raises(CxrflowError, match="unknown finding 'Effusions'"):
        model.heatmaps(images[0], finding="Effusions")
    with pytest.raises(CxrflowError, match="no such run folder or checkpoint file"):
        cxrflow.load_model(tmp_path / "nope")
    with pytest.raises(CxrflowError, match="no such store"):
        cxrflow.open_store(tmp_path / "nope")
    with pytest.raises(CxrflowError, match="size 48 is not in the store"):
        cxrflow.open_store(store).loader(size=48)


def test_import_cxrflow_stays_light():
    code = (
        "import sys, cxrflow\n"
        "heavy = [m for m in ('torch', 'torchvision', 'pandas', 'pyarrow', 'pyspark') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert {'load_model', 'open_store', 'Model'} <= set(dir(cxrflow))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(Path(cxrflow.__file__).parents[1])})
    from cxrflow.results import api  # the first use loads the API

    assert cxrflow.load_model is api.load_model and cxrflow.open_store is api.open_store
    with pytest.raises(AttributeError, match="no attribute 'load_models'"):
        cxrflow.load_models  # noqa: B018


def test_heatmaps_of_a_fused_model_use_the_images_demographics(tmp_path):
    """The shared heatmap core (CLI --heatmaps and Model.heatmaps) passes a fused model the image's
    own age, sex and view: a model that fuses them cannot score an image without them."""
    import torch

    from cxrflow.modelling.models import create_model
    from cxrflow.results.overlays import check_heatmap_predictor, prediction_heatmaps
    from cxrflow.results.predict import Predictor

    model = create_model("simple_cnn", 3, fusion="demographics").eval()
    predictor = Predictor(model, 32, 0.5, 0.25, ["A", "B", "C"], tmp_path / "c.pt", torch.device("cpu"))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 32), dtype=np.uint8), "L").save(tmp_path / "x.png")
    prediction = {"image": str(tmp_path / "x.png"), "demographics": {"age": 63.0, "sex": "F", "view": "PA"}}
    maps = prediction_heatmaps(predictor, prediction, ["B", "C"], "gradcam")
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    with pytest.raises(CxrflowError, match="needs age, sex and view"):
        prediction_heatmaps(predictor, {"image": prediction["image"]}, ["B"], "gradcam")

    class Ensemble:
        checkpoint = tmp_path / "ensemble"

    with pytest.raises(CxrflowError, match="heatmaps need a single model's run, not an ensemble"):
        check_heatmap_predictor(Ensemble())


@pytest.mark.slow
def test_an_evaluation_of_another_checkpoint_is_not_used_and_says_so(evaluated, tmp_path):
    import torch

    run, _, images = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = torch.load(copy / "best_finetune.pt", weights_only=True)
    ckpt["model"]["head.bias"] += 1.0  # as if the run had been trained again after its evaluation
    torch.save(ckpt, copy / "best_finetune.pt")
    with pytest.warns(UserWarning, match="best_finetune.pt changed since this evaluation"):
        model = cxrflow.load_model(copy)
    table = model.predict(images)
    assert (
        table.attrs["scale"] == "raw"
        and table.attrs["thresholds"] is None
        and "call" not in table.columns.get_level_values(0)
    )
    with pytest.warns(UserWarning, match="does not use demographics"):
        model.predict(images[0], demographics=(63, "F", "PA"))
