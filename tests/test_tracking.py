"""MLflow tracking of train and evaluate, read back with MLflow's own client and compared with the
run folder; a tracking backend that refuses or breaks mid-run; MLflow missing; malformed URIs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from cxrflow.cli import main
from cxrflow.errors import CxrflowError
from cxrflow.modelling.config import resolve_config
from cxrflow.modelling.train import train
from cxrflow.testing.synthstore import write_synthetic_store
from cxrflow.tracking import (
    RUN_ID_FILE,
    TrackingRequest,
    check_uri,
    default_uri,
    epoch_metrics,
    flatten_params,
    tracked_training,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trackstore") / "store"
    write_synthetic_store(path, sizes=(32,), rows={"train": 32, "val": 24, "test": 16}, seed=4)
    return path


@pytest.fixture(autouse=True)
def allow_file_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_argv(store: Path, run: Path, epochs: int = 2) -> list[str]:
    return [
        "train",
        "--quiet",
        "--store",
        str(store),
        "--size",
        "32",
        "--model",
        "simple_cnn",
        "--out",
        str(run),
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
    ]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_uris_and_conversions():
    assert check_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert check_uri("databricks") == "databricks"
    assert check_uri("sqlite:///tmp/m.db") == "sqlite:///tmp/m.db"
    assert check_uri("relative/mlruns").startswith("file:///") and check_uri("relative/mlruns").endswith(
        "/relative/mlruns"
    )
    for bad in ["htp://x", "http://", "http://h:port", "file://otherhost/x", "a b", "", "c:x"]:
        with pytest.raises(CxrflowError, match="malformed MLflow tracking URI"):
            check_uri(bad)
    assert default_uri("/x/runs") == "file:///x/runs/mlruns"
    assert flatten_params({"a": {"b": 1}, "c": [1, 2], "d": None}) == {"a.b": "1", "c": "[1, 2]", "d": "None"}
    row = {
        "stage": "kt",
        "epoch": 1,
        "train_loss": 0.5,
        "val_loss": None,
        "val_auc_mean": 0.75,
        "lr": 1e-3,
        "val_auc": {"Mass": 0.5, "Hernia": None},
        "seconds": 2.0,
        "images_per_second": 10.0,
    }
    assert epoch_metrics(row) == {
        "train_loss": 0.5,
        "val_auc_mean": 0.75,
        "lr": 1e-3,
        "val_auc/Mass": 0.5,
        "seconds": 2.0,
        "images_per_second": 10.0,
    }


@pytest.mark.slow
def test_train_and_evaluate_log_into_one_mlflow_run(store, tmp_path, capsys):
    run = tmp_path / "runs" / "r1"
    assert main([*_train_argv(store, run), "--mlflow"]) == 0
    record = json.loads((run / RUN_ID_FILE).read_text())
    assert record["tracking_uri"] == default_uri(tmp_path / "runs")
    client = _client(record["tracking_uri"])
    mlrun = client.get_run(record["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "r1"
    config = json.loads((run / "config.json").read_text())
    assert mlrun.data.params["model"] == "simple_cnn" and mlrun.data.params["finetune.epochs"] == "2"
    assert mlrun.data.params["store"] == config["store"] and mlrun.data.params["world_size"] == "1"
    rows = _rows(run)
    assert _history(client, record["run_id"], "val_auc_mean") == [(i, r["val_auc_mean"]) for i, r in enumerate(rows, 1)]
    assert _history(client, record["run_id"], "train_loss") == [(i, r["train_loss"]) for i, r in enumerate(rows, 1)]
    assert _history(client, record["run_id"], "val_auc/Mass") == [
        (i, r["val_auc"]["Mass"]) for i, r in enumerate(rows, 1)
    ]
    assert {a.path for a in client.list_artifacts(record["run_id"])} >= {"config.json", "metrics.jsonl", "done.json"}

    # a later evaluation, without --mlflow, logs into the same MLflow run
    assert main(["evaluate", "--run", str(run), "--n-boot", "50", "--device", "cpu"]) == 0
    metrics = json.loads((run / "eval-test-best_finetune" / "metrics.json").read_text())
    logged = client.get_run(record["run_id"]).data.metrics
    assert logged["test/best_finetune/mean_auc"] == pytest.approx(metrics["mean_auc"])
    assert [
        logged["test/best_finetune/mean_auc_ci95_low"],
        logged["test/best_finetune/mean_auc_ci95_high"],
    ] == pytest.approx(metrics["mean_auc_ci95"])
    defined = {n: v for n, v in metrics["auc"].items() if v is not None}
    assert {k: v for k, v in logged.items() if k.startswith("test/best_finetune/auc/")} == pytest.approx(
        {f"test/best_finetune/auc/{n}": v for n, v in defined.items()}
    )
    artifacts = {a.path for a in client.list_artifacts(record["run_id"], "eval-test-best_finetune")}
    assert artifacts == {f"eval-test-best_finetune/{n}" for n in ["metrics.json", *metrics["figures"]]}
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_refusing_server_costs_one_warning_not_the_run(store, tmp_path, capsys, refused_port):
    run = tmp_path / "run"
    assert main([*_train_argv(store, run), "--mlflow", f"http://127.0.0.1:{refused_port}"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: MLflow tracking") == 1 and "carrying on" in err, err
    assert (run / "done.json").is_file() and len(_rows(run)) == 2 and not (run / RUN_ID_FILE).exists()


@pytest.mark.slow
def test_a_store_broken_mid_run_is_one_warning_and_evaluate_fills_the_gap(store, tmp_path, capsys):
    run = tmp_path / "run"
    mlruns = tmp_path / "mlruns"
    config = resolve_config(
        None,
        None,
        {
            "store": str(store),
            "size": 32,
            "model": "simple_cnn",
            "out": str(run),
            "finetune.epochs": 3,
            "batch_size": 8,
        },
    )

    def break_store(model, stage, epoch, step):
        if epoch == 2 and step == 1:
            shutil.move(mlruns, tmp_path / "away")
            mlruns.write_text("not a folder")  # every write into the store fails from here on

    with tracked_training(TrackingRequest(str(mlruns)), run) as hook:
        train(config, quiet=True, epoch_hook=hook, step_hook=break_store)
    err = capsys.readouterr().err
    assert err.count("warning: MLflow tracking") == 1, err
    assert len(_rows(run)) == 3 and (run / "done.json").is_file()

    mlruns.unlink()
    shutil.move(tmp_path / "away", mlruns)  # the server is back
    assert main(["evaluate", "--run", str(run), "--n-boot", "20", "--device", "cpu"]) == 0
    record = json.loads((run / RUN_ID_FILE).read_text())
    client = _client(record["tracking_uri"])
    assert [s for s, _ in _history(client, record["run_id"], "val_auc_mean")] == [1, 2, 3]
    assert "test/best_finetune/mean_auc" in client.get_run(record["run_id"]).data.metrics


def test_mlflow_missing_or_malformed_uri_is_one_line_and_nothing_written(store, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main([*_train_argv(store, run), "--mlflow", "http://host:notaport"]) == 2
    assert "malformed MLflow tracking URI" in _one_error_line(capsys.readouterr().err)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the optional package were not installed
    assert main([*_train_argv(store, run), "--mlflow"]) == 2
    assert "pip install 'cxrflow[mlflow]'" in _one_error_line(capsys.readouterr().err)
    assert not run.exists()


@pytest.mark.slow
def test_an_ensemble_is_its_own_mlflow_run_naming_its_tracked_members(store, tmp_path, capsys, refused_port):
    runs = tmp_path / "runs"
    tracked, untracked, ens = runs / "a", runs / "b", runs / "ens"
    assert main([*_train_argv(store, tracked), "--mlflow"]) == 0
    assert main([*_train_argv(store, untracked), "--seed", "1"]) == 0
    for run in (tracked, untracked):
        assert main(["evaluate", "--run", str(run), "--n-boot", "20", "--device", "cpu"]) == 0
    members = [str(tracked), str(untracked)]
    assert main(["ensemble", *members, "--out", str(ens), "--n-boot", "20", "--mlflow", "http://host:notaport"]) == 2
    assert "malformed MLflow tracking URI" in _one_error_line(capsys.readouterr().err) and not ens.exists()
    down = tmp_path / "ens-down"  # a refusing server costs one warning, not the ensemble
    assert (
        main(
            ["ensemble", *members, "--out", str(down), "--n-boot", "20", "--mlflow", f"http://127.0.0.1:{refused_port}"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("warning: MLflow tracking") == 1 and "logging an ensemble" in err, err
    assert (down / "metrics.json").is_file() and not (down / RUN_ID_FILE).exists()

    assert main(["ensemble", *members, "--out", str(ens), "--n-boot", "20", "--mlflow"]) == 0
    record = json.loads((ens / RUN_ID_FILE).read_text())
    member_record = json.loads((tracked / RUN_ID_FILE).read_text())
    assert record["tracking_uri"] == member_record["tracking_uri"] == default_uri(runs)
    client = _client(record["tracking_uri"])
    mlrun = client.get_run(record["run_id"])
    metrics = json.loads((ens / "metrics.json").read_text())
    assert (
        mlrun.info.status == "FINISHED" and mlrun.info.run_name == "ens" and record["run_id"] != member_record["run_id"]
    )
    params = mlrun.data.params
    assert (
        params["method"] == "mean"
        and params["split"] == "test"
        and json.loads(params["label_names"]) == metrics["label_names"]
    )
    assert [params[f"members.{i}.eval"] for i in (0, 1)] == [m["eval"] for m in metrics["members"]]
    assert [params[f"members.{i}.name"] for i in (0, 1)] == metrics["member_names"]
    assert params["members.0.mlflow_run_id"] == member_record["run_id"] and "members.1.mlflow_run_id" not in params
    logged = mlrun.data.metrics
    assert logged["test/ensemble/mean_auc"] == pytest.approx(metrics["mean_auc"])
    assert [logged["test/ensemble/mean_auc_ci95_low"], logged["test/ensemble/mean_auc_ci95_high"]] == pytest.approx(
        metrics["mean_auc_ci95"]
    )
    assert {k: v for k, v in logged.items() if k.startswith("test/ensemble/auc/")} == pytest.approx(
        {f"test/ensemble/auc/{n}": v for n, v in metrics["auc"].items() if v is not None}
    )
    assert {a.path for a in client.list_artifacts(record["run_id"])} == {"metrics.json", *metrics["figures"]}

    # rebuilt without --mlflow: the ensemble it replaced was tracked, so the new one is a new MLflow run in that store
    assert main(["ensemble", *members, "--out", str(ens), "--n-boot", "20", "--method", "stacked", "--overwrite"]) == 0
    rebuilt = json.loads((ens / RUN_ID_FILE).read_text())
    assert rebuilt["tracking_uri"] == record["tracking_uri"] and rebuilt["run_id"] != record["run_id"]
    assert client.get_run(rebuilt["run_id"]).data.params["method"] == "stacked"
    assert client.get_run(record["run_id"]).data.params["method"] == "mean"
    assert "warning" not in capsys.readouterr().err
