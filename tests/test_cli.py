import subprocess
import sys

import pytest

from cxrflow.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, _, help_text in COMMANDS:
        assert name in out
        assert help_text.split()[0] in out


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: cxrflow " + name in capsys.readouterr().out


def test_unknown_subcommand_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "cxrflow.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("cxrflow ")
