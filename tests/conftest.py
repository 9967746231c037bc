"""Shared test fixtures: one real local Spark session for the whole test run, a one-thread torch
setting for modules that run many tiny models, a refused port, and torch's global generator seeded
before every test.

Starting Spark costs several seconds, so it is paid once: any test taking the ``spark`` fixture
gets the same ``local[2]`` session (small memory, quiet logs), stopped when the run ends.
"""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="session")
def spark():
    """A real, quiet ``local[2]`` SparkSession shared by the whole test session."""
    from cxrflow.data.spark import build_spark

    session = build_spark(
        "local[2]",
        "cxrflow-tests",
        driver_memory="1g",
        conf={"spark.default.parallelism": "2", "spark.sql.shuffle.partitions": "2"},
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny inputs gain nothing from threads, and spare threads stall badly on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def refused_port():
    """A loopback port where nothing answers: bound by this test and never listened on, so every
    connection is refused and no other process can take the port while the test runs (a port that
    was merely free a moment ago can be)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture(autouse=True)
def torch_global_seed():
    """Every test starts from the same state of torch's global generator, so a test's random weights
    and inputs do not depend on which tests ran before it (pytest -k, a new test, another order)."""
    import torch

    torch.manual_seed(0)
