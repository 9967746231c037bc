"""Ctrl-C and SIGTERM end a command with one line and the shell's status (130, 143), every clean-up
run, also when a library's clean-up fails while the interrupt unwinds (py4j's calls after Ctrl-C) and
logs about it."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import logging, os, signal, sys, time
import cxrflow.commands.store_info as store
from cxrflow import cli

def command(args):
    try:
        if sys.argv[1] == "TERM":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        raise KeyboardInterrupt
    finally:  # a library's clean-up that fails because of the interrupt, and logs it
        try:
            raise ConnectionError("Answer from Java side is empty")
        except ConnectionError:
            logging.exception("Exception while sending command.")
            print("cleaned up", file=sys.stderr)
            raise RuntimeError("cannot stop: the connection is gone")

store.run = command
sys.exit(cli.main(["store-info", "x"]))
"""


@pytest.mark.parametrize("how, code, line", [("INT", 130, "error: interrupted"), ("TERM", 143, "error: terminated")])
def test_an_interrupt_stays_the_cause_when_a_clean_up_fails(how, code, line):
    done = subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines() == ["cleaned up", line]
