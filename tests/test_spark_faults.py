"""A Spark standalone cluster on 127.0.0.1 losing a worker in the middle of the ETL: the job either
completes through Spark's task retry with a complete, correct store, or fails with one clear line
and publishes nothing; never a store with missing rows that looks complete."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from cxrflow.metadata import load_release
from cxrflow.store import read_manifest
from cxrflow.synth import synthesize
from spark_standalone import loopback_cluster

JOB_TIMEOUT = 420


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_etl_with_a_worker_killed_mid_job_is_complete_or_not_published(tmp_path):
    release = tmp_path / "release"
    synthesize(release, patients=40, size=128, seed=5)
    out = tmp_path / "store"
    killed = False
    with loopback_cluster(tmp_path / "cluster", workers=2) as cluster:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxrflow.cli", "etl", "--data", str(release), "--out", str(out), "--sizes", "32",
             "--master", cluster.url, "--rows-per-file", "4", "--no-progress"],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + JOB_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline and not killed:
                if list(tmp_path.glob(".store.partial-*/size=32/split=*/part-*.parquet")):  # tasks are finishing
                    cluster.kill_worker(1)
                    killed = True
                time.sleep(0.05)
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert killed, "the job ended before a worker could be killed"
    assert not list(tmp_path.glob(".store.partial-*")), "the temporary store was left behind"
    if proc.returncode != 0:  # refused: one clear line, nothing published
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
