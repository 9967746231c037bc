"""Spark's processes never outlive the command: the JVM a command starts (with everything it starts)
ends on Ctrl-C and SIGTERM, whether the JVM is still starting or a job is running; an unreachable
master and a ``local-cluster`` larger than the machine are one line within seconds, in every command
that starts Spark.

The interrupt tests run the real CLI in a subprocess whose environment carries a tag that every
process it starts inherits (the JVM, Python workers); after the command exits, no tagged process may
remain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cxrflow.data import sparkproc
from cxrflow.data.spark import check_local_cluster, check_reachable
from cxrflow.errors import CxrflowError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _tagged(tag: str) -> dict[int, str]:
    """pid -> command line of every living process whose environment carries ``tag``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if tag.encode() not in (entry / "environ").read_bytes() or not sparkproc.alive(int(entry.name)):
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def _cxrflow(args: list[str], tag: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "CXRFLOW_TEST_TAG": tag}
    return subprocess.Popen(
        [sys.executable, "-m", "cxrflow.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from cxrflow.data.synth import synthesize

    root = tmp_path_factory.mktemp("sparkproc")
    synthesize(root / "release", patients=40, size=96, seed=5)
    return root / "release"


@pytest.mark.slow
@pytest.mark.parametrize(
    "phase, sig, code, line",
    [
        ("jvm-starting", signal.SIGINT, 130, "error: interrupted"),
        ("job-running", signal.SIGINT, 130, "error: interrupted"),
        ("job-running", signal.SIGTERM, 143, "error: terminated"),
    ],
)
def test_interrupted_etl_leaves_no_process(release, tmp_path, phase, sig, code, line):
    tag = f"cxrflow-test-{uuid.uuid4().hex}"
    proc = _cxrflow(
        ["etl", "--data", str(release), "--out", "store", "--sizes", "96", "--master", "local[2]", "--no-progress"],
        tag,
        tmp_path,
    )
    try:
        if phase == "jvm-starting":  # the JVM exists but PySpark has not connected to it yet
            started = _wait_for(lambda: any("java" in c for c in _tagged(tag).values()), 60)
        else:  # Python workers run the job's tasks
            started = _wait_for(lambda: any("pyspark.daemon" in c for c in _tagged(tag).values()), 120)
        assert started and proc.poll() is None, f"the ETL ended before the {phase} phase: {proc.communicate()}"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)  # returns only once every holder of the pipes is gone
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [line]
    assert not out.strip()
    assert _wait_for(lambda: not _tagged(tag), 5), f"left running: {_tagged(tag)}"
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["etl", "--data", "data", "--out", "store", "--master"],
        ["train", "--store", "store", "--out", "run", "--size", "64", "--spark-master"],
    ],
)
@pytest.mark.parametrize("bad", ["unreachable", "oversized"])
def test_bad_master_is_one_line_at_once(tmp_path, refused_port, command, bad):
    from cxrflow.data.synth import synthesize
    from cxrflow.testing.synthstore import write_synthetic_store

    synthesize(tmp_path / "data", patients=4, size=64, seed=0)
    write_synthetic_store(tmp_path / "store", sizes=(64,), rows={"train": 8, "val": 4, "test": 4})
    master = f"spark://127.0.0.1:{refused_port}" if bad == "unreachable" else "local-cluster[64,1,1024]"
    tag = f"cxrflow-test-{uuid.uuid4().hex}"
    started = time.monotonic()
    proc = _cxrflow([*command, master], tag, tmp_path)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1
    expected = "cannot reach the Spark master" if bad == "unreachable" else "asks for 64 cores"
    assert err.startswith("error: ") and expected in err
    assert took < 15, f"{took:.1f} s"
    assert not _tagged(tag)


def test_local_cluster_must_fit_the_machine():
    machine = (2, 8192)  # cores, MB
    check_local_cluster("local-cluster[2,1,1024]", None, machine)
    check_local_cluster("local[64]", None, machine)  # threads, not processes: not checked
    cases = {
        "local-cluster[64,1,1024]": "asks for 64 cores (64 workers x 1) but this machine has 2",
        "local-cluster[1, 3, 1024]": "asks for 3 cores",
        "local-cluster[2,1,5000]": "asks for 10000 MB of memory (2 workers x 5000 MB) but this machine has 8192 MB",
        "local-cluster[1,1,512]": "each worker has 512 MB but an executor needs 1024 MB",
    }
    for master, message in cases.items():
        with pytest.raises(CxrflowError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_local_cluster(master, None, machine)
    check_local_cluster("local-cluster[1,1,512]", "256m", machine)
    with pytest.raises(CxrflowError, match="executor needs 2048 MB"):
        check_local_cluster("local-cluster[1,1,1024]", "2g", machine)


def test_unreachable_master_fails_within_the_timeout(refused_port):
    started = time.monotonic()
    with pytest.raises(CxrflowError, match=f"cannot reach the Spark master spark://127.0.0.1:{refused_port}"):
        check_reachable(f"spark://127.0.0.1:{refused_port}", timeout=2)
    assert time.monotonic() - started < 3
    check_reachable("local[2]")  # not a network master: nothing to check


def test_end_processes_ends_a_whole_tree():
    shell = subprocess.Popen(["sh", "-c", "sleep 120 & sleep 120 & wait"])
    try:
        assert _wait_for(lambda: len(sparkproc.descendants(shell.pid)) == 2, 10)
        tree = sparkproc.descendants(shell.pid) | {shell.pid}
        assert shell.pid in sparkproc.children()
        sparkproc.end_processes({shell.pid}, grace=5)
        assert not [pid for pid in tree if sparkproc.alive(pid)]
    finally:
        shell.kill()
        shell.wait()


def test_a_process_ignoring_sigterm_is_killed():
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(15, signal.SIG_IGN); print(1, flush=True); time.sleep(120)"], stdout=subprocess.PIPE)  # fmt: skip
    try:
        stubborn.stdout.readline()
        started = time.monotonic()
        sparkproc.end_processes({stubborn.pid}, grace=0.5)
        assert not sparkproc.alive(stubborn.pid) and time.monotonic() - started < 5
    finally:
        stubborn.kill()
        stubborn.wait()


@pytest.mark.slow
@pytest.mark.cluster
def test_executors_that_never_register_end_in_one_line_after_the_wait(tmp_path):
    from spark_standalone import loopback_cluster

    script = (
        "import sys\n"
        "from cxrflow.data.spark import spark_session\n"
        "from cxrflow.errors import CxrflowError\n"
        "try:\n"
        "    with spark_session(sys.argv[1], 'no-workers', executor_wait=3):\n"
        "        pass\n"
        "except CxrflowError as exc:\n"
        "    print(exc)\n"
    )
    tag = f"cxrflow-test-{uuid.uuid4().hex}"
    with loopback_cluster(tmp_path / "cluster", workers=0) as cluster:  # a master no worker ever joins
        done = subprocess.run(
            [sys.executable, "-c", script, cluster.url], capture_output=True, text=True, timeout=180,
            env={**os.environ, "PYTHONPATH": SRC, "CXRFLOW_TEST_TAG": tag},
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"no Spark executor registered with the master {cluster.url} within 3 s" in done.stdout
    assert _wait_for(lambda: not _tagged(tag), 5), f"left running: {_tagged(tag)}"
