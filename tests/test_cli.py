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


HEAVY = ("torch", "torchvision", "sklearn", "pyspark")


def _heavy_imported(argv: list[str]) -> tuple[int, str, list[str]]:
    """Run ``cxrflow ARGV`` in a fresh interpreter; its exit status, stderr and the heavy libraries it imported."""
    code = (
        "import sys\n"
        "from cxrflow.cli import main\n"
        "try:\n"
        f"    status = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    *lines, last = proc.stderr.strip().splitlines()
    assert last.startswith("HEAVY "), proc.stderr
    return proc.returncode, "\n".join(lines), eval(last[len("HEAVY ") :])


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"]])
def test_help_imports_no_heavy_library(argv):
    code, _, heavy = _heavy_imported(argv)
    assert code == 0 and heavy == []


def test_a_mistake_in_train_is_answered_before_torch_is_imported(tmp_path):
    common = ["train", "--size", "32", "--model", "simple_cnn", "--out", str(tmp_path / "run")]
    code, err, heavy = _heavy_imported([*common, "--store", str(tmp_path / "nonexistent")])
    assert code == 2 and err == f"error: {tmp_path / 'nonexistent'}: no such store (run 'cxrflow etl' first)"
    assert heavy == []
    code, err, heavy = _heavy_imported(
        ["train", "--store", str(tmp_path), "--size", "32", "--model", "vgg", "--out", str(tmp_path / "run")]
    )
    assert code == 2 and err.startswith("error: unknown model 'vgg'") and heavy == []
    code, err, heavy = _heavy_imported([*common, "--device", "gpu"])
    assert code == 2 and "unknown device 'gpu'" in err and heavy == []


def test_the_light_model_and_fusion_names_are_the_registries():
    from cxrflow.data import demographics
    from cxrflow.modelling import catalog, models

    assert catalog.MODEL_NAMES == models.MODEL_NAMES
    assert catalog.CHECKPOINTING_MODELS == models.CHECKPOINTING_MODELS
    assert catalog.FUSIONS == demographics.FUSIONS


def test_every_train_setting_has_help_and_every_option_reaches_the_config(tmp_path):
    import dataclasses

    from cxrflow.commands.train import _option_overrides, get_args_parser
    from cxrflow.modelling.config import TrainConfig, option_fields

    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))
    text = get_args_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert (f"--{f.name.replace('_', '-')}" in text) == bool(f.metadata["option"]) or f.name == "preset"
        assert f.name in text or f"--{f.name.replace('_', '-')}" in text
    args = get_args_parser().parse_args(
        ["--out", "r", "--batch-size", "4", "--grad-checkpointing", "--device", "cuda:1"]
    )
    overrides = _option_overrides(args)
    assert overrides == {"out": "r", "batch_size": 4, "grad_checkpointing": True, "device": "cuda:1"}
    assert {f.name for f in option_fields()} >= set(overrides)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--out", "r", "--batch-size", "0"],
        ["evaluate", "--run", "r", "--batch-size", "x"],
        ["etl", "--data", "d", "--out", "o", "--val-fraction", "1"],
        ["sweep", "s.yaml", "--out", "o", "--device", "tpu"],
    ],
)
def test_shared_options_are_checked_alike_in_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cxrflow {argv[0]}: argument ")
