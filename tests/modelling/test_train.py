"""Training end to end on small synthetic stores: learning, two stages, resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cxrflow.cli import main
from cxrflow.commands.train import config_from_args, get_args_parser
from cxrflow.data.labels import NIH14
from cxrflow.metrics import mean_auc, per_class_auc
from cxrflow.modelling.config import resolve_config
from cxrflow.modelling.inference import predict_split
from cxrflow.modelling.models import create_model, load_checkpoint
from cxrflow.modelling.train import train
from cxrflow.testing.synthstore import write_synthetic_store

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "stage", "epoch", "config", "label_names", "metrics"}
METRIC_KEYS = {
    "stage",
    "epoch",
    "train_loss",
    "val_loss",
    "val_auc_mean",
    "val_auc",
    "lr",
    "seconds",
    "images_per_second",
}
TIMING = ("seconds", "images_per_second")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "store"
    write_synthetic_store(path, sizes=(32,), rows={"train": 128, "val": 64, "test": 16}, seed=0)
    return path


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "store"
    write_synthetic_store(path, sizes=(32,), rows={"train": 32, "val": 24, "test": 8}, seed=1)
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(*argv: str) -> int:
    return main(["train", "--quiet", *argv])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.slow
def test_simple_cnn_learns_the_planted_signal(store, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "--store",
        str(store),
        "--size",
        "32",
        "--model",
        "simple_cnn",
        "--out",
        str(run),
        "--epochs",
        "4",
        "--lr",
        "3e-3",
        "--batch-size",
        "16",
    ]
    assert _train(*argv) == 0
    out = capsys.readouterr().out
    assert "stage finetune: trainable 33,822 of 33,822 parameters" in out
    assert sorted(p.name for p in run.iterdir()) == [
        ".cxrflow-train.json",
        "best_finetune.pt",
        "config.json",
        "done.json",
        "last.pt",
        "metrics.jsonl",
    ]
    rows = _metrics(run)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("finetune", e) for e in range(1, 5)]
    assert all(METRIC_KEYS <= set(r) and set(r["val_auc"]) == set(NIH14.names) for r in rows)
    assert all(r["train_images"] == 128 and r["val_images"] == 64 for r in rows)
    best_auc = max(r["val_auc_mean"] for r in rows)
    assert best_auc > 0.85, rows  # chance is 0.5

    config = json.loads((run / "config.json").read_text())
    assert config["store"] == str(store) and config["size"] == 32 and config["model"] == "simple_cnn"
    assert config["label_names"] == list(NIH14.names) and config["stages"][0]["name"] == "finetune"
    ckpt = torch.load(run / "best_finetune.pt", weights_only=True)
    assert CHECKPOINT_KEYS <= set(ckpt)
    assert ckpt["metrics"]["val_auc_mean"] == pytest.approx(best_auc)
    assert json.loads((run / "done.json").read_text())["best"]["finetune"]["epoch"] == ckpt["epoch"]

    # the stored model reproduces its validation AUC through predict_split
    model, _ = load_checkpoint(run / "best_finetune.pt")
    pred = predict_split(model, store, 32, "val", batch_size=20)
    assert len(pred["image_id"]) == 64 and len(set(pred["image_id"])) == 64
    assert pred["probs"].dtype == np.float32 and pred["probs"].shape == (64, 14)
    # the probabilities equal an independent reference: pixels read with pyarrow, normalised by hand
    table = pq.read_table(store / "size=32" / "split=val").to_pydict()
    pixels = np.stack([np.frombuffer(p, np.uint8).reshape(32, 32) for p in table["pixels"]]).astype(np.float32)
    x = torch.from_numpy((pixels / 255.0 - config["pixel_mean"]) / config["pixel_std"])[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        reference = torch.sigmoid(model.eval()(x.contiguous())).numpy()
    order = [pred["image_id"].index(i) for i in table["image_id"]]
    np.testing.assert_allclose(pred["probs"][order], reference, atol=1e-5)
    assert pred["labels"].shape == (64, 14) and pred["patient_id"].dtype == np.int64
    assert mean_auc(per_class_auc(pred["labels"], pred["probs"])) == pytest.approx(best_auc, abs=1e-5)
    assert pred["loss"] == pytest.approx(ckpt["metrics"]["val_loss"], rel=1e-4)

    # an existing run is never overwritten silently
    assert _train(*argv) == 2
    assert "--resume" in _one_error_line(capsys.readouterr().err)
    # --overwrite also removes the old run's evaluations (they describe a model that is gone)
    assert main(["evaluate", "--run", str(run), "--n-boot", "10"]) == 0 and (run / "eval-test-best_finetune").is_dir()
    # ... and only those: a folder of the user's named eval-*, or a link to one, is left as it is
    (run / "eval-mine").mkdir()
    for folder in (run / "eval-mine", tmp_path / "elsewhere"):
        folder.mkdir(exist_ok=True)
        (folder / "metrics.json").write_text("{}")
        (folder / "notes.txt").write_text("mine")
    (run / "eval-link").symlink_to(tmp_path / "elsewhere")
    assert _train(*argv[:-4], "--epochs", "1", "--overwrite") == 0
    assert len(_metrics(run)) == 1 and not (run / "eval-test-best_finetune").exists()
    for folder in (run / "eval-mine", run / "eval-link", tmp_path / "elsewhere"):
        assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "notes.txt"]


@pytest.mark.slow
def test_densenet121_two_stages_and_resume_between_them(small_store, tmp_path, capsys):
    run = tmp_path / "run"
    common = [
        "--store",
        str(small_store),
        "--size",
        "32",
        "--model",
        "densenet121",
        "--pretrained",
        "none",
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "1e-4",
        "--batch-size",
        "8",
        "--seed",
        "5",
    ]
    assert _train(*common, "--out", str(run)) == 0
    out = capsys.readouterr().out
    assert "stage kt: trainable 14,350 of 6,968,206 parameters" in out
    assert "stage finetune: trainable 6,968,206 of 6,968,206 parameters" in out
    rows = _metrics(run)
    assert [(r["stage"], r["epoch"], r["lr"]) for r in rows] == [("kt", 1, 1e-3), ("finetune", 1, 1e-4)]
    kt = torch.load(run / "best_kt.pt", weights_only=True)
    ft = torch.load(run / "best_finetune.pt", weights_only=True)
    assert (kt["stage"], ft["stage"]) == ("kt", "finetune")
    # kt froze the backbone, BatchNorm statistics included: it equals the seeded initial weights
    torch.manual_seed(5)
    initial = create_model("densenet121", 14).state_dict()
    backbone = [k for k in initial if k.startswith("backbone.")]
    assert all(torch.equal(kt["model"][k], initial[k]) for k in backbone)
    assert not torch.equal(kt["model"]["head.weight"], initial["head.weight"])
    # fine-tuning started from the kt head and moved the backbone and its statistics
    changed = [k for k in backbone if not torch.equal(ft["model"][k], kt["model"][k])]
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("conv0.weight") for k in changed)

    # a crash in the middle of fine-tuning, then --resume: the same result as the run above
    crashed = tmp_path / "crashed"
    config = config_from_args(get_args_parser().parse_args([*common, "--out", str(crashed)]))

    def crash(model, stage, epoch, step):
        if stage == "finetune" and step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, quiet=True, step_hook=crash)
    assert [r["stage"] for r in _metrics(crashed)] == ["kt"] and not (crashed / "best_finetune.pt").exists()
    train(config, resume=True, quiet=True)
    _assert_same_rows(rows, _metrics(crashed))
    again = torch.load(crashed / "best_finetune.pt", weights_only=True)
    assert all(torch.allclose(again["model"][k].float(), ft["model"][k].float(), atol=1e-5) for k in ft["model"])


@pytest.mark.slow
def test_finetuning_starts_from_the_best_kt_epoch_when_it_is_not_the_last(small_store, tmp_path):
    """kt epoch 2 ends with its head turned over (so its validation AUC falls below epoch 1's):
    fine-tuning must start from best_kt.pt (epoch 1), not from the last kt weights."""
    argv = [
        "--store",
        str(small_store),
        "--size",
        "32",
        "--model",
        "densenet121",
        "--pretrained",
        "none",
        "--epochs",
        "2",
        "1",
        "--lr",
        "1e-2",
        "1e-4",
        "--batch-size",
        "8",
        "--seed",
        "5",
        "--out",
        str(tmp_path / "run"),
    ]
    config = config_from_args(get_args_parser().parse_args(argv))
    steps = 32 // 8
    seen: dict[str, dict] = {}

    def hook(model, stage, epoch, step):
        if stage == "kt" and epoch == 2 and step == steps:
            with torch.no_grad():
                model.head.weight.neg_()
                model.head.bias.neg_()
        if stage == "finetune" and epoch == 1 and step == 1:
            seen["start"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    log: list[str] = []
    train(config, quiet=True, step_hook=hook, log=log.append)
    kt = [r for r in _metrics(tmp_path / "run") if r["stage"] == "kt"]
    assert kt[0]["val_auc_mean"] > kt[1]["val_auc_mean"], kt  # the precondition: the last kt epoch is not the best
    best = torch.load(tmp_path / "run" / "best_kt.pt", weights_only=True)
    assert best["epoch"] == 1 and "fine-tuning starts from best_kt.pt (epoch 1)" in log
    assert all(torch.equal(seen["start"][k], best["model"][k]) for k in best["model"])


def test_resume_refuses_options_that_change_the_result(small_store, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--store", str(small_store), "--size", "32", "--model", "simple_cnn", "--epochs", "1", "--batch-size", "8"]
    assert _train(*argv, "--out", str(run)) == 0
    capsys.readouterr()
    assert _train("--out", str(run), "--resume", "--batch-size", "4", "--lr", "0.5") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "batch_size (saved 8, given 4)" in line and "finetune (saved" in line and "--overwrite" in line
    assert _train("--out", str(run), "--resume", "--set", "optimizer=sgd") == 2
    assert "optimizer (saved adam, given sgd)" in _one_error_line(capsys.readouterr().err)
    # where it runs may change, and so may the store's place when it holds the same splits
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(small_store, moved)
    assert _train("--out", str(run), "--resume", "--device", "cpu", "--num-workers", "0", "--batch-size", "8",
                  "--store", str(moved)) == 0  # fmt: skip
    other = tmp_path / "other"
    write_synthetic_store(other, sizes=(32,), rows={"train": 32, "val": 24, "test": 8}, seed=2)
    capsys.readouterr()
    assert _train("--out", str(run), "--resume", "--store", str(other)) == 2
    assert "store (saved" in _one_error_line(capsys.readouterr().err)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_store, tmp_path, capsys):
    config = resolve_config(
        None,
        None,
        {
            "store": str(small_store),
            "size": 32,
            "model": "simple_cnn",
            "out": str(tmp_path / "run"),
            "finetune.epochs": 3,
            "batch_size": 8,
        },
    )

    def poison(model, stage, epoch, step):
        if epoch == 2 and step == 2:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    from cxrflow.errors import CxrflowError

    with pytest.raises(CxrflowError) as err:
        train(config, quiet=True, step_hook=poison)
    message = str(err.value)
    assert "not finite" in message and "epoch 2, step 2" in message and "last.pt" in message
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert len(_metrics(tmp_path / "run")) == 1 and not (tmp_path / "run" / "done.json").exists()

    # from the command line: a learning rate that blows up gives one error line, exit 2
    capsys.readouterr()
    code = _train(
        "--store",
        str(small_store),
        "--size",
        "32",
        "--model",
        "simple_cnn",
        "--out",
        str(tmp_path / "run2"),
        "--set",
        "optimizer=sgd",
        "--lr",
        "1e38",
        "--epochs",
        "1",
        "--batch-size",
        "8",
    )
    assert code == 2
    assert "no epoch had finished" in _one_error_line(capsys.readouterr().err)


def test_val_finding_without_positives_is_reported_not_fatal(tmp_path, capsys):
    store = tmp_path / "store"
    write_synthetic_store(store, rows={"train": 24, "val": 6, "test": 2}, seed=3)
    val = pq.read_table(store / "size=32" / "split=val").column("labels").to_pylist()
    without = {n for n, col in zip(NIH14.names, np.array(val).T) if col.sum() in (0, len(val))}
    assert without  # the store is built so that some findings have no positives in val
    run = tmp_path / "run"
    assert (
        _train(
            "--store",
            str(store),
            "--size",
            "32",
            "--model",
            "simple_cnn",
            "--out",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "8",
        )
        == 0
    )
    assert "undefined" in capsys.readouterr().out
    row = _metrics(run)[0]
    assert {n for n, v in row["val_auc"].items() if v is None} == without
    assert row["val_auc_mean"] == pytest.approx(np.mean([v for v in row["val_auc"].values() if v is not None]))


def test_finding_without_train_negatives_is_named_as_untrained(tmp_path, capsys):
    store = tmp_path / "store"
    write_synthetic_store(store, rows={"train": 16, "val": 6, "test": 2}, seed=3, prevalence=1.0)
    run = tmp_path / "run"
    assert (
        _train(
            "--store",
            str(store),
            "--size",
            "32",
            "--model",
            "simple_cnn",
            "--out",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "8",
        )
        == 0
    )
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: no negative")]
    assert len(notes) == 1 and all(name in notes[0] for name in NIH14.names), notes


def test_bad_inputs_give_one_error_line(store, tmp_path, capsys):
    base = ["--store", str(store), "--size", "32", "--out", str(tmp_path / "r")]
    cases = [
        (["--model", "vgg16", *base], "simple_cnn, resnet50, densenet121"),
        (
            ["--model", "simple_cnn", *base[:2], "--size", "64", "--out", str(tmp_path / "r")],
            "size 64 is not in the store",
        ),
        (
            ["--model", "simple_cnn", "--store", str(tmp_path / "nope"), "--size", "32", "--out", str(tmp_path / "r")],
            "no such store",
        ),
        (["--model", "simple_cnn", *base, "--resume", "--overwrite"], "exclude each other"),
        (["--model", "simple_cnn", *base, "--lr", "1", "2"], "one value or one per stage"),
        (["--model", "simple_cnn", *base, "--set", "weight_decay"], "KEY=VALUE"),
        (["--model", "resnet50", *base, "--stage", "kt", "--epochs", "1", "2"], "one value or one per stage"),
    ]
    for argv, expected in cases:
        assert _train(*argv) == 2, argv
        assert expected in _one_error_line(capsys.readouterr().err)
    if not torch.cuda.is_available():
        assert _train("--model", "simple_cnn", *base, "--device", "cuda") == 2
        assert "no CUDA GPU" in _one_error_line(capsys.readouterr().err)
    empty = tmp_path / "empty"
    write_synthetic_store(empty, rows={"train": 8, "val": 0, "test": 0})
    assert _train("--model", "simple_cnn", "--store", str(empty), "--size", "32", "--out", str(tmp_path / "e")) == 2
    assert "split 'val' at size 32 is empty" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_preset_config_file_and_options_reach_the_run(small_store, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("model: simple_cnn\nfinetune:\n  epochs: 1\n")
    run = tmp_path / "run"
    assert (
        _train(
            "--preset",
            "paper",
            "--config",
            str(settings),
            "--store",
            str(small_store),
            "--size",
            "32",
            "--out",
            str(run),
            "--seed",
            "4",
        )
        == 0
    )
    saved = json.loads((run / "config.json").read_text())
    assert (saved["preset"], saved["batch_size"], saved["optimizer"], saved["seed"]) == ("paper", 5, "sgd", 4)
    assert saved["stages"] == [{"name": "finetune", "trainable": "all", "epochs": 1, "lr": saved["finetune"]["lr"]}]
    (row,) = _metrics(run)
    assert row["train_images"] == 30  # 32 rows in whole batches of 5; the shuffle changes the 2 left out each epoch


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [(r["stage"], r["epoch"]) for r in a] == [(r["stage"], r["epoch"]) for r in b]
    for ra, rb in zip(_comparable(a), _comparable(b)):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
            elif isinstance(value, dict):
                assert rb[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
            else:
                assert rb[key] == value, key


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 256, "val": 32, "test": 8}, seed=2)
    args = [
        "--store",
        str(store),
        "--size",
        "32",
        "--model",
        "simple_cnn",
        "--epochs",
        "3",
        "--lr",
        "2e-3",
        "--batch-size",
        "16",
        "--set",
        "plateau_patience=0",
        "--set",
        "early_stopping_patience=0",
    ]
    reference = tmp_path / "reference"
    assert _train(*args, "--out", str(reference)) == 0
    epoch_seconds = _metrics(reference)[1]["seconds"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxrflow.cli", "train", "--quiet", *args, "--out", str(killed)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    metrics = killed / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            # into the second epoch: 0.4 of an epoch as long as this run's own first epoch took too, so
            # a reference measured while the machine was busier cannot carry the kill past the last epoch
            own_seconds = json.loads(metrics.read_text().splitlines()[0])["seconds"]
            time.sleep(0.4 * min(epoch_seconds, own_seconds))
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (killed / "done.json").exists()
    done_before = len(_metrics(killed))
    assert 1 <= done_before < 3

    assert _train(*args, "--out", str(killed), "--resume") == 0
    _assert_same_rows(_metrics(reference), _metrics(killed))
    a = torch.load(reference / "best_finetune.pt", weights_only=True)
    b = torch.load(killed / "best_finetune.pt", weights_only=True)
    assert a["epoch"] == b["epoch"]
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5) for k in a["model"])
    # the learning-rate schedule was restored too (plateau patience 0 cuts the rate after a bad epoch)
    assert [r["lr"] for r in _metrics(reference)] == [r["lr"] for r in _metrics(killed)]


@pytest.mark.slow
def test_two_process_gloo_run_agrees_on_one_best_checkpoint(small_store, tmp_path):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cxrflow.cli",
        "train",
        "--quiet",
        "--store",
        str(small_store),
        "--size",
        "32",
        "--model",
        "densenet121",
        "--pretrained",
        "none",
        "--out",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # both ranks write into one pipe: a rank's line can land inside another's, so find lines anywhere
    best = re.findall(r"\[rank (\d)\] (best \w+: epoch \d+, val AUC [-+.0-9eE]+)", done.stdout)
    by_rank = {r: sorted(line for rank, line in best if rank == str(r)) for r in (0, 1)}
    assert len(by_rank[0]) == 2 and by_rank[0] == by_rank[1]  # both ranks computed the same validation AUCs
    rows = _metrics(run)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("kt", 1), ("finetune", 1)]
    assert all(r["val_images"] == 24 and r["train_images"] == 32 for r in rows)  # shards cover the splits
    ckpt = torch.load(run / "best_finetune.pt", weights_only=True)
    assert ckpt["config"]["world_size"] == 2
    assert f"best finetune: epoch 1, val AUC {ckpt['metrics']['val_auc_mean']}" in by_rank[0]
    model, _ = load_checkpoint(run / "best_finetune.pt")
    pred = predict_split(model, small_store, 32, "val")
    assert mean_auc(per_class_auc(pred["labels"], pred["probs"])) == pytest.approx(ckpt["metrics"]["val_auc_mean"])
