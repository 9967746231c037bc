"""The Java processes behind a Spark session: started in a group of their own, ended with the session.

PySpark starts the driver JVM (``spark-submit``) as a child of Python and leaves it running until
Python exits; a ``local-cluster`` driver starts executor JVMs, and executors start Python worker
daemons (each in a process group of its own). A command interrupted while the JVM was still starting
lost track of it (PySpark keeps the ``Popen`` only once the JVM answers), and the orphan held the
caller's terminal or pipe for minutes. So :func:`launch_gateway` starts the JVM in a new session
(its own process group) and, if it is interrupted, ends every process it started; and
:func:`end_gateway` ends the JVM and everything it started: it closes the JVM's stdin (Spark's
signal to shut down), then terminates its process group, then kills what is left, each step
bounded in time.

Processes are found from ``/proc`` (Linux); elsewhere only the JVM's own process is ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Seconds the JVM gets to shut down by itself (closing its stdin), then after SIGTERM.
STOP_GRACE = 10.0
TERM_GRACE = 5.0


def _ppid_map() -> dict[int, int]:
    """pid -> parent pid of every process on this machine (empty without ``/proc``)."""
    parents: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            fields = stat[stat.rfind(")") + 2 :].split()
            if len(fields) > 1:
                parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (children, their children, ...)."""
    parents = _ppid_map()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier and child not in found}
        found |= frontier
    return found


def children() -> set[int]:
    """This process's living child processes."""
    me = os.getpid()
    return {child for child, parent in _ppid_map().items() if parent == me}


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rfind(")") + 2 :].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    """Waits up to ``seconds`` for ``pids`` to end (reaping this process's children); those left."""
    deadline = time.monotonic() + seconds
    while True:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.waitpid(pid, os.WNOHANG)  # a child of ours: reap it so it stops being "alive"
        left = {pid for pid in pids if alive(pid)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def end_processes(pids: set[int], grace: float = TERM_GRACE) -> None:
    """SIGTERM ``pids`` (and their descendants), then SIGKILL what is left after ``grace`` seconds."""
    for pid in list(pids):
        pids |= descendants(pid)
    _signal_all(pids, signal.SIGTERM)
    left = _wait_gone(pids, grace)
    _signal_all(left, signal.SIGKILL)
    _wait_gone(left, 2.0)


def launch_gateway(settings: Mapping[str, str]) -> Any:
    """PySpark's gateway (a JVM running ``spark-submit`` with ``settings``), started in a session of
    its own; a failure or interrupt while it starts ends every process it started."""
    from pyspark import SparkConf
    from pyspark.java_gateway import launch_gateway as pyspark_launch

    conf = SparkConf()
    for key, value in settings.items():
        conf.set(key, value)
    before = children()
    try:
        return pyspark_launch(conf, popen_kwargs={"start_new_session": True})
    except BaseException:
        end_processes(children() - before)
        raise


@contextlib.contextmanager
def _no_logging():
    """No log records while the JVM is taken down on purpose (py4j reports every broken connection)."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(before)


def end_gateway(gateway: Any, grace: float = STOP_GRACE) -> None:
    """End the gateway's JVM and every process it started (executors, Python workers), bounded in time."""
    proc = getattr(gateway, "proc", None)
    if proc is None:  # a JVM this process did not start (PYSPARK_GATEWAY_PORT)
        return
    tree = descendants(proc.pid) | {proc.pid}
    with contextlib.suppress(Exception), _no_logging():  # py4j logs each connection it loses on the way
        gateway.shutdown()
    try:
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()  # Spark's driver exits when its stdin closes
        with contextlib.suppress(Exception):
            proc.wait(timeout=grace)
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGTERM)  # the JVM's group: executors started by it
        end_processes({pid for pid in tree | descendants(proc.pid) if alive(pid)})
        with contextlib.suppress(Exception):
            proc.wait(timeout=1)
