"""A loopback Spark standalone cluster (one master, N workers) for fault-tolerance tests.

pip's pyspark ships ``bin/spark-class`` but not ``sbin/start-master.sh``/``start-worker.sh``; those
scripts only run ``spark-class org.apache.spark.deploy.master.Master`` / ``...worker.Worker`` in the
background, which is what this helper does, in the foreground of child processes it owns. Every
address is 127.0.0.1 (``SPARK_LOCAL_IP`` also binds the web UIs there), every wait is bounded, and
the processes (each in its own process group, with the executors it starts) are always stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyspark

from cxrflow.data.spark import find_java


@dataclass
class Cluster:
    url: str
    master: subprocess.Popen
    workers: list[subprocess.Popen]
    logs: Path
    add_worker: Callable[[], subprocess.Popen]

    def kill_worker(self, index: int, timeout: float = 60) -> None:
        """SIGKILL a worker with everything it started (its executor and Python workers): a lost node.

        The executor's PySpark daemon runs in a process group of its own, so it and its Python workers
        outlive the group's kill until they notice their executor is gone; this returns once they have
        exited, so nothing of the lost node writes after it (into a folder the job has since removed)."""
        _signal_group(self.workers[index], signal.SIGKILL)
        wait_until_exited(_node_mark(self.logs, f"worker-{index}"), timeout)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # executors the worker started, even when it is already gone
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"loopback Spark cluster: {what} within {timeout:.0f} s")
        time.sleep(0.2)


@contextlib.contextmanager
def loopback_cluster(
    folder: Path, workers: int = 2, cores: int = 1, memory: str = "1g", timeout: float = 120
) -> Iterator[Cluster]:
    """Start a master and ``workers`` workers on 127.0.0.1; stop them all on the way out."""
    home = Path(pyspark.__file__).parent
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "JAVA_HOME": find_java().home,
        "SPARK_HOME": str(home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_MASTER_HOST": "127.0.0.1",
        "SPARK_NO_DAEMONIZE": "1",
        "SPARK_LOG_DIR": str(folder),
    }
    spark_class = str(home / "bin" / "spark-class")
    started: list[subprocess.Popen] = []

    def start(name: str, *argv: str) -> subprocess.Popen:
        log = open(folder / f"{name}.log", "w")
        key, value = _node_mark(folder, name).decode().split("=", 1)
        proc = subprocess.Popen(
            [spark_class, *argv],
            env={**env, key: value},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        started.append(proc)
        return proc

    try:
        # every port is 0, chosen by the master and workers themselves as they bind: a port found free
        # here and passed on could be taken by another process before they bind it (Spark then moves
        # to the next port, and the workers would look for the master where it is not)
        master = start(
            "master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", "0", "--webui-port", "0"
        )
        master_log = folder / "master.log"
        _wait_for(lambda: _master_url(master_log) is not None, timeout, "the master did not start")
        url = _master_url(master_log)
        _wait_for(lambda: _accepts(int(url.rsplit(":", 1)[1])), timeout, "the master did not listen")
        nodes: list[subprocess.Popen] = []

        def add_worker() -> subprocess.Popen:
            """Start one more worker and wait until the master has registered it."""
            i = len(nodes)
            nodes.append(
                start(
                    f"worker-{i}",
                    "org.apache.spark.deploy.worker.Worker",
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    str(cores),
                    "--memory",
                    memory,
                    "--work-dir",
                    str(folder / f"work-{i}"),
                    "--webui-port",
                    "0",
                    url,
                )
            )
            _wait_for(
                lambda: master_log.read_text(errors="replace").count("Registering worker") > i,
                timeout,
                f"worker {i} did not register",
            )
            return nodes[-1]

        for _ in range(workers):
            add_worker()
        yield Cluster(url, master, nodes, folder, add_worker)
    finally:
        for proc in reversed(started):
            _stop(proc)


def _node_mark(folder: Path, name: str) -> bytes:
    """The environment entry every process of one node carries (its executors and Python workers inherit it)."""
    return f"CXRFLOW_TEST_NODE={folder}/{name}".encode()


def processes_with(mark: bytes) -> list[int]:
    """Ids of the live processes whose environment holds the entry ``mark`` (b"NAME=value")."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_until_exited(mark: bytes, timeout: float = 120) -> None:
    """Wait until no process carries ``mark`` in its environment: what a killed job started has exited."""
    _wait_for(lambda: not processes_with(mark), timeout, f"processes {processes_with(mark)} with {mark!r} did not exit")


def _master_url(log: Path) -> str | None:
    """The master's URL from its log ("Starting Spark master at spark://127.0.0.1:PORT"), once it is there."""
    found = re.search(r"Starting Spark master at (spark://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
    return found.group(1) if found else None


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def run_with_fault(
    argv: list[str], env: dict[str, str], fault: Callable[[int], bool], timeout: float
) -> tuple[int, str, bool]:
    """Run ``python -m cxrflow.cli *argv``, calling ``fault(pid)`` every 50 ms until it reports that it
    struck; bounded by ``timeout``, and the process is always reaped. Returns (exit status, stderr, struck)."""
    struck = False
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxrflow.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=err, text=True
        )
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline and not struck:
                struck = fault(proc.pid)
                time.sleep(0.05)
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return proc.returncode, err.read(), struck
