"""A Spark standalone cluster on 127.0.0.1 losing a worker in the middle of the ETL: the job either
completes through Spark's task retry with a complete, correct store, or fails with one clear line
and publishes nothing; never a store with missing rows that looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from cxrflow.data.metadata import load_release
from cxrflow.data.store import read_manifest
from cxrflow.data.synth import synthesize
from cxrflow.testing.synthstore import write_synthetic_store
from spark_standalone import loopback_cluster, run_with_fault, wait_until_exited

JOB_TIMEOUT = 420


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    # the driver binds to loopback too (by default a driver on a spark:// master takes the host's address)
    return {
        **os.environ,
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "SPARK_LOCAL_IP": "127.0.0.1",
    }


@pytest.mark.slow
@pytest.mark.cluster
def test_etl_with_a_worker_killed_mid_job_is_complete_or_not_published(tmp_path):
    release = tmp_path / "release"
    synthesize(release, patients=40, size=128, seed=5)
    out = tmp_path / "store"
    with loopback_cluster(tmp_path / "cluster", workers=2) as cluster:

        def kill_a_worker(pid: int) -> bool:
            if not list(tmp_path.glob(".store.partial-*/size=32/split=*/part-*.parquet")):
                return False  # wait until tasks are finishing
            cluster.kill_worker(1)
            return True

        code, err, killed = run_with_fault(
            [
                "etl",
                "--data",
                str(release),
                "--out",
                str(out),
                "--sizes",
                "32",
                "--master",
                cluster.url,
                "--rows-per-file",
                "4",
                "--no-progress",
            ],
            _env(),
            kill_a_worker,
            JOB_TIMEOUT,
        )
    assert killed, "the job ended before a worker could be killed"
    assert not list(tmp_path.glob(".store.partial-*")), "the temporary store was left behind"
    if code != 0:  # refused: one clear line, nothing published
        lines = [line for line in err.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
        assert not out.exists()
        return
    expected = load_release(release)
    found = set(expected.images)
    table = ds.dataset(str(out / "size=32"), format="parquet", partitioning="hive").to_table(columns=["image_id"])
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(found) and set(ids) == found  # every image once, none lost
    manifest = read_manifest(out)
    assert sum(manifest["rows"]["32"].values()) == len(found)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.cluster
def test_training_with_a_worker_killed_fails_cleanly_and_resumes_on_a_new_worker(tmp_path):
    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 256, "val": 32, "test": 8}, seed=6)
    run = tmp_path / "run"
    with loopback_cluster(tmp_path / "cluster", workers=2) as cluster:
        argv = [
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
            "8",
            "--batch-size",
            "8",
            "--set",
            "early_stopping_patience=0",
            "--spark-master",
            cluster.url,
            "--processes",
            "2",
            "--spark-wait",
            "300",
        ]  # both runs wait for their executors however slowly they register

        def kill_a_worker(pid: int) -> bool:
            if not (run / "metrics.jsonl").exists():
                return False  # wait until an epoch has finished
            cluster.kill_worker(1)
            return True

        # the job's processes on the executors (PySpark workers, torchrun, the ranks) carry this mark
        mark = f"CXRFLOW_TEST_JOB={tmp_path}"
        code, err, killed = run_with_fault(
            [*argv, "--spark-conf", f"spark.executorEnv.{mark}"], _env(), kill_a_worker, JOB_TIMEOUT
        )
        assert killed and code == 2, err[-3000:]
        # rank 0 on the surviving worker holds the run folder's lock until it has exited: the resume
        # below starts once every process of the failed job is gone, however slowly they stop
        wait_until_exited(mark.encode())
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "--resume" in last, err[-3000:]
        before = _metrics(run)
        assert 1 <= len(before) < 8 and not (run / "done.json").exists()

        cluster.add_worker()  # the lost node is replaced
        done = subprocess.run(
            [sys.executable, "-m", "cxrflow.cli", *argv, "--resume"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    after = _metrics(run)
    assert [r["epoch"] for r in after] == list(range(1, 9)) and after[: len(before)] == before
