import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_evaluate import train_tiny_run

from cxrflow.cli import main
from cxrflow.modelling.inference import predict_split
from cxrflow.modelling.models import load_checkpoint
from cxrflow.results.predict import load_predictor, predict_files


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    run, store = train_tiny_run(tmp, epochs=1)
    table = pq.read_table(next((store / "size=32" / "split=test").glob("*.parquet"))).slice(0, 2).to_pylist()
    a = np.frombuffer(table[0]["pixels"], np.uint8).reshape(32, 32)
    b = np.frombuffer(table[1]["pixels"], np.uint8).reshape(32, 32)
    img = tmp / "img"
    img.mkdir()
    Image.fromarray(a, "L").save(img / "gray.png")
    rgba = np.dstack([a, a, a, np.full_like(a, 255)])
    Image.fromarray(rgba, "RGBA").save(img / "rgba.png")
    Image.fromarray(a.astype(np.uint16) * 257).save(img / "sixteen.png")  # I;16
    assert Image.open(img / "sixteen.png").mode.startswith("I")
    Image.fromarray(np.vstack([b, np.zeros((8, 32), np.uint8)]), "L").save(img / "tall.jpg", quality=95)
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return run, store, img, [table[0]["image_id"], table[1]["image_id"]]


def test_predict_matches_the_pipeline_on_every_format(run_and_images):
    run, store, img, ids = run_and_images
    predictor = load_predictor(run)
    files = [img / "gray.png", img / "rgba.png", img / "sixteen.png", img / "tall.jpg"]
    predictions, errors = predict_files(predictor, files)
    assert errors == [] and [p["image"] for p in predictions] == [str(f) for f in files]
    # the store's own pixels through predict_split (loader + trainer path) give the same probabilities
    model, ckpt = load_checkpoint(run / "best_finetune.pt")
    ref = predict_split(model, store, 32, "test")
    expected = ref["probs"][ref["image_id"].index(ids[0])]
    for p in predictions[:3]:  # gray, RGBA and 16-bit decode to the same gray image
        got = np.array([p["probabilities"][n] for n in ckpt["label_names"]])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert all(0.0 <= v <= 1.0 for v in predictions[3]["probabilities"].values())


def test_bad_file_is_one_error_line_and_others_still_predicted(run_and_images, capsys):
    run, _, img, _ = run_and_images
    rc = main(["predict", "--run", str(run), str(img / "gray.png"), str(img / "broken.png"), str(img / "nope.png"),
               str(img / "tall.jpg"), "--json"])  # fmt: skip
    assert rc == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [p["image"].split("/")[-1] for p in out["predictions"]] == ["gray.png", "tall.jpg"]
    assert len(out["predictions"][0]["probabilities"]) == 14
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in captured.err
    assert lines[0].startswith(f"error: {img / 'broken.png'}: ") and "nope.png: no such file" in lines[1]


@pytest.mark.slow
def test_heatmaps_never_replace_a_file_predict_did_not_write(run_and_images, tmp_path, capsys):
    run, _, img, _ = run_and_images
    argv = ["predict", "--run", str(run), str(img / "gray.png"), "--json", "--heatmaps", str(tmp_path / "h")]
    assert main(argv) == 0
    written = [Path(p) for p in json.loads(capsys.readouterr().out)["predictions"][0]["heatmaps"].values()]
    assert written  # not evaluated: findings at or above 0.5 are flagged, and the tiny run flags some
    assert main(argv) == 0  # predict's own files are replaced by the next predict
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / written[0].name).write_text("the user's own file")
    argv[-1] = str(mine)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mine / written[0].name) in err[0] and "refusing to replace it" in err[0], err
    assert sorted(p.name for p in mine.iterdir()) == [written[0].name]
    assert (mine / written[0].name).read_text() == "the user's own file"


def test_table_output_and_exit_zero(run_and_images, capsys):
    run, _, img, _ = run_and_images
    assert main(["predict", "--run", str(run), str(img / "gray.png")]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:3] == ["image", "Atelectasis", "Cardiomegaly"] and row.startswith(str(img / "gray.png"))
    assert len(row.split()) == 15


def _copy_run_with_store(run, dest, store, keep_stats=False):
    """A copy of ``run`` whose checkpoints name ``store`` as their training store (and, unless
    ``keep_stats``, hold no pixel statistics)."""
    import torch

    shutil.copytree(run, dest)
    stats_keys = () if keep_stats else ("pixel_mean", "pixel_std", "pixel_stats")
    for ckpt_path in dest.glob("*.pt"):
        ckpt = torch.load(ckpt_path, weights_only=True)
        ckpt["config"]["store"] = str(store)
        for d in (ckpt, ckpt["config"]):
            for k in stats_keys:
                d.pop(k, None)
        torch.save(ckpt, ckpt_path)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in stats_keys}))
    return dest


def test_works_after_the_store_is_gone(run_and_images, tmp_path):
    run, store, img, _ = run_and_images
    copy = _copy_run_with_store(run, tmp_path / "run", tmp_path / "gone", keep_stats=True)
    before = predict_files(load_predictor(run), [img / "gray.png"])[0]
    after = predict_files(load_predictor(copy), [img / "gray.png"])[0]
    assert after[0]["probabilities"] == pytest.approx(before[0]["probabilities"])


def test_no_pixel_statistics_anywhere_is_a_clear_error(run_and_images, tmp_path, capsys):
    run, _, img, _ = run_and_images
    copy = _copy_run_with_store(run, tmp_path / "run", tmp_path / "gone")
    assert main(["predict", "--run", str(copy), str(img / "gray.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--store" in err and "Traceback" not in err


@pytest.mark.slow
def test_evaluated_run_flags_findings_at_the_validation_thresholds(run_and_images, tmp_path, capsys):
    run, _, img, _ = run_and_images
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = load_predictor(copy)
    assert before.thresholds is None and not before.calibrated  # not evaluated yet: raw probabilities only
    assert main(["evaluate", "--run", str(copy), "--n-boot", "10"]) == 0
    evaluation = json.loads((copy / "eval-test-best_finetune" / "metrics.json").read_text())
    recorded = evaluation["threshold_calibrated"]
    predictor = load_predictor(copy)
    assert predictor.calibrated and predictor.thresholds == {n: t for n, t in recorded.items() if t is not None}
    raw = load_predictor(copy, raw=True)
    assert not raw.calibrated and raw.thresholds == {n: t for n, t in evaluation["threshold"].items() if t is not None}
    # calibrated = sigmoid((logit - log pos_weight) / T) of the raw output, finding by finding; raw = what it was before evaluation
    (p_raw,) = predict_files(raw, [img / "gray.png"])[0]
    (p_before,) = predict_files(before, [img / "gray.png"])[0]
    assert p_raw["probabilities"] == p_before["probabilities"]
    (p_cal,) = predict_files(predictor, [img / "gray.png"])[0]
    for n, q in p_raw["probabilities"].items():
        z = np.log(q) - np.log1p(-q)
        z = (z - evaluation["calibration"]["logit_offset"][n]) / evaluation["calibration"]["temperature"][n]
        assert p_cal["probabilities"][n] == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-5)
    # the same findings are flagged on both scales (temperature scaling keeps the order)
    assert p_cal["positive"] == p_raw["positive"]
    (p,) = predict_files(predictor, [img / "gray.png"])[0]
    expected = [n for n, t in predictor.thresholds.items() if p["probabilities"][n] >= t]
    assert p["positive"] == [n for n in predictor.label_names if n in expected]
    capsys.readouterr()
    assert main(["predict", "--run", str(copy), str(img / "gray.png")]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.endswith("positive at the validation threshold")
    assert row.endswith(", ".join(p["positive"]) or "none")
    for flag, calibrated in (([], True), (["--raw"], False)):
        assert main(["predict", "--run", str(copy), str(img / "gray.png"), "--json", *flag]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["calibrated"] is calibrated
        expected = p_cal if calibrated else p_raw
        assert out["predictions"][0]["probabilities"] == pytest.approx(expected["probabilities"])


def test_pixel_bombs_and_pipes_get_an_error_and_the_other_files_a_result(run_and_images, tmp_path):
    import os

    from PIL import Image

    run, _, img, _ = run_and_images
    bomb = tmp_path / "bomb.png"
    Image.new("L", (1_000_000, 1)).save(bomb)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    link = tmp_path / "link.png"
    link.symlink_to(img / "gray.png")
    predictions, errors = predict_files(load_predictor(run), [bomb, img / "gray.png", fifo, link])
    assert [p["image"] for p in predictions] == [str(img / "gray.png"), str(link)]
    assert predictions[0]["probabilities"] == predictions[1]["probabilities"]
    reasons = {e["image"]: e["error"] for e in errors}
    assert "1000000x1" in reasons[str(bomb)] and "pixel budget" in reasons[str(bomb)]
    assert "not a file" in reasons[str(fifo)] or "named pipe" in reasons[str(fifo)]


@pytest.mark.slow
def test_output_piped_into_head_ends_quietly(run_and_images):
    import subprocess
    import sys

    run, _, img, _ = run_and_images
    images = [str(img / "gray.png")] * 400  # far more output than a pipe buffer holds
    cmd = [sys.executable, "-m", "cxrflow.cli", "predict", "--run", str(run), "--json", *images]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does once it has its line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert first.startswith(b"{") and "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141


@pytest.mark.slow
def test_thresholds_of_an_evaluation_of_another_checkpoint_are_not_used(run_and_images, tmp_path, capsys):
    import torch

    run, _, img, _ = run_and_images
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["evaluate", "--run", str(copy), "--n-boot", "10"]) == 0
    assert load_predictor(copy).thresholds is not None
    ckpt = torch.load(copy / "best_finetune.pt", weights_only=True)
    ckpt["model"]["head.bias"] += 1.0  # as if the run had been trained again
    torch.save(ckpt, copy / "best_finetune.pt")
    predictor = load_predictor(copy)
    assert predictor.thresholds is None and "best_finetune.pt changed since this evaluation" in predictor.note
    capsys.readouterr()
    assert main(["predict", "--run", str(copy), str(img / "gray.png")]) == 0
    captured = capsys.readouterr()
    assert "positive at the validation threshold" not in captured.out
    (note,) = captured.err.strip().splitlines()
    assert note.startswith("note: ") and "cxrflow evaluate" in note


@pytest.mark.slow
def test_an_unreadable_evaluation_is_named_not_skipped_silently(run_and_images, tmp_path, capsys):
    run, _, img, _ = run_and_images
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["evaluate", "--run", str(copy), "--n-boot", "10"]) == 0
    (metrics,) = copy.glob("eval-*-best_finetune/metrics.json")
    metrics.write_bytes(b'{"mean_auc": 0.9, \xff')
    predictor = load_predictor(copy)
    assert predictor.thresholds is None and predictor.calibration is None
    capsys.readouterr()
    assert main(["predict", "--run", str(copy), str(img / "gray.png")]) == 0
    (note,) = capsys.readouterr().err.strip().splitlines()
    assert note.startswith(f"note: {metrics}: unreadable") and "calibration are not used" in note


@pytest.mark.slow
def test_predict_on_the_original_png_files_gives_evaluates_probabilities(spark, tmp_path):
    """Real ETL of real PNG files, a trained run, its evaluation: predict on the same PNG files (its
    own decode and resize) gives the probabilities of predictions.parquet."""
    from test_evaluate import train_tiny_run

    from cxrflow.data.etl import run_etl
    from cxrflow.data.synth import synthesize
    from cxrflow.results.evaluate import evaluate_run

    release = tmp_path / "release"
    synthesize(release, patients=30, size=96, seed=4)
    run_etl(release, tmp_path / "store", [32], spark=spark)
    run, store = train_tiny_run(tmp_path, epochs=1, store=tmp_path / "store")
    metrics = evaluate_run(run, n_boot=10)
    table = pq.read_table(Path(metrics["out"]) / "predictions.parquet").to_pandas().set_index("image_id")
    files = [release / "images" / image_id for image_id in table.index[:12]]
    names = metrics["label_names"]
    # calibrated (predict's default) against calprob_*, the model's raw outputs (--raw) against prob_*
    for raw, prefix in ((False, "calprob_"), (True, "prob_")):
        predictions, errors = predict_files(load_predictor(run, raw=raw), files, batch_size=5)
        assert errors == [] and len(predictions) == 12
        got = np.array([[p["probabilities"][n] for n in names] for p in predictions])
        expected = table.loc[[f.name for f in files], [f"{prefix}{n}" for n in names]].to_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert np.ptp(expected, axis=0).max() > 1e-3  # different images, different probabilities


def test_an_unevaluated_run_says_why_no_finding_is_called(run_and_images, capsys):
    run, _, img, _ = run_and_images
    assert main(["predict", "--run", str(run), str(img / "gray.png")]) == 0
    captured = capsys.readouterr()
    assert "called" not in captured.out.splitlines()[0]
    note = captured.err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note: no finding is called: the thresholds")
    assert (
        f"{run} has no evaluation of best_finetune; 'cxrflow evaluate --run {run} --checkpoint best_finetune'"
        in note[0]
    )


def test_calls_are_printed_with_the_thresholds_that_made_them():
    from cxrflow.commands.predict import format_calls

    predictions = [{"image": "a.png", "probabilities": {"Edema": 0.7, "Mass": 0.2, "Hernia": 0.9}}]
    header, row = format_calls(predictions, ["Edema", "Mass", "Hernia"], {"Edema": 0.41, "Mass": 0.3}).splitlines()
    assert header.split()[:4] == [
        "image",
        "Edema>=0.410",
        "Mass>=0.300",
        "Hernia",
    ]  # Hernia: no threshold, never called
    assert row.split()[:4] == ["a.png", "0.700", "0.200", "0.900"] and row.endswith("  Edema")
    assert header.index("Edema>=0.410") + len("Edema>=0.410") == row.index("0.700") + len("0.700")
