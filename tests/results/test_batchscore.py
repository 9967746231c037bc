"""Spark batch scoring (``cxrflow predict --store --out``) equals the evaluation row for row and resumes."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from test_evaluate import train_tiny_run

from cxrflow.cli import main
from cxrflow.results.predict import load_predictor

pytestmark = pytest.mark.slow  # a trained, evaluated run scored by real local Spark


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    run, store = train_tiny_run(tmp, epochs=1, rows={"train": 40, "val": 48, "test": 48})
    assert main(["evaluate", "--run", str(run), "--n-boot", "10"]) == 0
    return run, store


def _scored(folder):
    frame = pd.read_parquet(folder)
    return frame.drop(columns=[c for c in frame.columns if c == "split"]).set_index("image_id")


def test_spark_scoring_of_a_store_equals_the_evaluation_row_for_row(evaluated, tmp_path, spark):
    run, store = evaluated
    out = tmp_path / "pred"
    assert (
        main(["predict", "--run", str(run), "--store", str(store), "--out", str(out), "--spark-master", "local[2]"])
        == 0
    )
    scored = _scored(out)
    predictor = load_predictor(run)
    names = predictor.label_names
    assert len(scored) == 40 + 48 + 48 and scored["error"].isna().all()
    for name in ("predictions.parquet", "val_predictions.parquet"):
        evaluation = pd.read_parquet(run / "eval-test-best_finetune" / name).set_index("image_id")
        mine = scored.loc[evaluation.index]
        np.testing.assert_allclose(mine[[f"prob_{n}" for n in names]].to_numpy(float),
                                   evaluation[[f"calprob_{n}" for n in names]].to_numpy(float), atol=1e-5)  # fmt: skip
        for n in names:
            t = predictor.thresholds.get(n)
            if t is not None:
                assert mine[f"positive_{n}"].tolist() == (mine[f"prob_{n}"] >= t).tolist()
    record = json.loads((out / "_scoring.json").read_text())
    assert record["spec"]["calibrated"] and sorted(record["parts"]) == sorted(
        str(p.relative_to(out)) for p in out.rglob("*.parquet")
    )


def test_a_killed_job_resumes_where_it_stopped(evaluated, tmp_path, spark, capsys):
    run, store = evaluated
    out = tmp_path / "pred"
    argv = ["predict", "--run", str(run), "--store", str(store), "--split", "test", "--out", str(out)]
    assert main(argv) == 0
    full = _scored(out)
    parts = sorted(out.rglob("*.parquet"))
    assert len(parts) >= 1
    # a killed job: one part missing, the temporary file of another half written
    kept = {p: p.stat().st_mtime_ns for p in parts[1:]}
    parts[0].unlink()
    half = parts[0].parent / f".{parts[0].name}.abc123.tmp"
    half.write_bytes(b"PAR1 half a parquet file")
    capsys.readouterr()
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert not half.exists() and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    pd.testing.assert_frame_equal(_scored(out).sort_index(), full.sort_index())
    # a resumed job with another model is refused, not mixed in
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("eval-*"))
    assert (
        main(["predict", "--run", str(other), "--store", str(store), "--split", "test", "--out", str(out), "--resume"])
        == 2
    )
    assert "another spec" in capsys.readouterr().err
    # the same folder scored afresh by the other model, in the same Spark session: the workers use the new model
    shutil.rmtree(out)
    assert main(["predict", "--run", str(other), "--store", str(store), "--split", "test", "--out", str(out)]) == 0
    raw = pd.read_parquet(run / "eval-test-best_finetune" / "predictions.parquet").set_index("image_id")
    names = load_predictor(other).label_names
    np.testing.assert_allclose(_scored(out).loc[raw.index, [f"prob_{n}" for n in names]].to_numpy(float),
                               raw[[f"prob_{n}" for n in names]].to_numpy(float), atol=1e-5)  # fmt: skip


def test_a_collections_files_are_scored_and_a_broken_one_is_an_error_row(evaluated, tmp_path, spark):
    """``--data`` scores a collection's image files as predict does; a broken file is a row with its error."""
    from cxrflow.data.formats import load_collection
    from cxrflow.data.synth import synthesize
    from cxrflow.results.predict import predict_files

    run, _ = evaluated
    synthesize(tmp_path / "nih", patients=6, size=48, seed=2)
    collection = load_collection(tmp_path / "nih", views="all")
    broken = min(collection.images.items())
    with open(broken[1], "r+b") as f:
        f.truncate(60)
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--data", str(tmp_path / "nih"), "--out", str(out)]) == 0
    scored = _scored(out)
    assert sorted(scored.index) == sorted(collection.entries["image_id"])
    assert scored["error"].notna().tolist().count(True) == 1 and "truncated" in scored.loc[broken[0], "error"]
    others = sorted(collection.images.items())[1:4]
    predictor = load_predictor(run)
    predictions, _ = predict_files(predictor, [f for _, f in others])
    for (image_id, _), p in zip(others, predictions):
        got = scored.loc[image_id, [f"prob_{n}" for n in predictor.label_names]].to_numpy(float)
        np.testing.assert_allclose(got, [p["probabilities"][n] for n in predictor.label_names], atol=1e-5)


def test_tasks_keep_weights_channels_last_only_where_the_probabilities_stay_the_same(evaluated, monkeypatch):
    import torch

    from cxrflow.results import batchscore

    rng = np.random.default_rng(1)
    images = {32: torch.from_numpy(rng.integers(0, 256, (6, 1, 32, 32), dtype=np.uint8))}
    predictor = load_predictor(evaluated[0])
    want = predictor.probabilities(images)
    conv = next(p for p in predictor.model.parameters() if p.dim() == 4)
    assert batchscore.use_channels_last(predictor)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    np.testing.assert_allclose(predictor.probabilities(images), want, atol=batchscore.CHANNELS_LAST_TOLERANCE)
    monkeypatch.setattr(batchscore, "CHANNELS_LAST_TOLERANCE", -1.0)  # no layout can agree within it
    assert not batchscore.use_channels_last(predictor)
    assert conv.is_contiguous()  # put back as it was
    np.testing.assert_array_equal(predictor.probabilities(images), want)
