"""Reading cxrflow's own files: a named pipe or device in place of any file of a run, evaluation or
store is refused in one line (never a hang), and every parsed file is read under a size bound."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from cxrflow.cli import main
from cxrflow.testing.synthstore import write_synthetic_store

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A store and a 1-epoch simple_cnn run on it, evaluated on test (tests damage copies)."""
    root = tmp_path_factory.mktemp("safeio")
    store = root / "store"
    write_synthetic_store(store, sizes=(16,), rows={"train": 8, "val": 4, "test": 4}, seed=0)
    run = root / "run"
    assert main(["train", "--quiet", "--store", str(store), "--size", "16", "--model", "simple_cnn", "--out", str(run),
                 "--epochs", "1", "--batch-size", "4", "--device", "cpu"]) == 0  # fmt: skip
    assert main(["evaluate", "--run", str(run), "--n-boot", "5", "--device", "cpu"]) == 0
    return store, run


def _pipe_in_place_of(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


EVAL = "eval-test-best_finetune"
#: (command, file replaced by a pipe relative to the copied run or store) for each reader of cxrflow's files.
CASES = [
    ("report", f"run/{EVAL}/roc.png"),
    ("report", f"run/{EVAL}/metrics.json"),
    ("predict", "run/config.json"),
    ("predict", f"run/{EVAL}/metrics.json"),
    ("predict", "run/best_finetune.pt"),
    ("resume", "run/config.json"),
    ("resume", "run/last.pt"),
    ("verify", "store/_manifest.json"),
    ("verify", "store/size=16/split=train/part-00000.parquet"),
    ("evaluate", "run/best_finetune.pt"),
]


def _argv(command: str, store: Path, run: Path, out: Path, image: Path) -> list[str]:
    return {
        "report": ["report", str(run), "--out", str(out)],
        "predict": ["predict", "--run", str(run), str(image)],
        "resume": ["train", "--quiet", "--resume", "--out", str(run), "--device", "cpu"],
        "verify": ["store-info", str(store), "--verify"],
        "evaluate": ["evaluate", "--run", str(run), "--n-boot", "5", "--device", "cpu", "--overwrite"],
    }[command]


@pytest.mark.slow
@pytest.mark.timeout(60, method="signal")
@pytest.mark.parametrize("command,relative", CASES)
def test_a_pipe_in_place_of_any_file_cxrflow_reads_back_is_one_line_not_a_hang(
    evaluated, tmp_path, capsys, command, relative
):
    from PIL import Image

    store, run = evaluated
    shutil.copytree(store, tmp_path / "store")
    shutil.copytree(run, tmp_path / "run")
    image = tmp_path / "x.png"
    Image.new("L", (16, 16), 100).save(image)
    target = tmp_path / relative
    assert target.is_file(), sorted(p.name for p in target.parent.iterdir())
    _pipe_in_place_of(target)
    rc = main(_argv(command, tmp_path / "store", tmp_path / "run", tmp_path / "out", image))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    # finished (no hang), with a result or one error line, and the pipe left as it was
    assert rc in (0, 2) and len(errors) == (rc == 2) and "Traceback" not in captured.err, captured.err
    assert stat.S_ISFIFO(os.stat(target).st_mode)


# ------------------------------------------------------------------------------- size and resource bounds

HUGE = 30 * 2**30  # a 30 GB sparse file: nothing on disk, a MemoryError when read whole


def _sparse(path: Path, head: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(HUGE)
    return path


@pytest.mark.timeout(60, method="signal")
@pytest.mark.parametrize("name", ["settings.yaml", "settings.json", "settings.toml"])
def test_a_huge_settings_file_is_one_line_naming_its_size(tmp_path, capsys, name):
    path = _sparse(tmp_path / name)
    rc = main(["train", "--config", str(path), "--store", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(path) in err[0] and "bytes, over the" in err[0], err


@pytest.mark.timeout(60, method="signal")
def test_a_huge_manifest_is_one_line(evaluated, tmp_path, capsys):
    store, _ = evaluated
    shutil.copytree(store, tmp_path / "store")
    manifest = tmp_path / "store" / "_manifest.json"
    manifest.unlink()
    _sparse(manifest, b"{")
    for argv in (["store-info", str(tmp_path / "store")], ["store-info", str(tmp_path / "store"), "--verify"]):
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "_manifest.json" in err[0] and "bytes, over the" in err[0], err


@pytest.mark.timeout(60, method="signal")
def test_a_huge_image_is_refused_without_reading_it(evaluated, tmp_path, capsys):
    _, run = evaluated
    image = _sparse(tmp_path / "x.png", b"\x89PNG\r\n\x1a\n")
    rc = main(["predict", "--run", str(run), str(image)])
    captured = capsys.readouterr()
    assert rc in (0, 2) and "bytes, over the" in captured.out + captured.err and "Traceback" not in captured.err


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(9)
)


@pytest.mark.timeout(60, method="signal")
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_yaml_aliases_never_expand(tmp_path, capsys, command):
    path = tmp_path / "settings.yaml"
    path.write_text(LAUGHS)
    argv = {"train": ["train", "--config", str(path), "--store", str(tmp_path), "--out", str(tmp_path / "run")],
            "sweep": ["sweep", str(path), "--out", str(tmp_path / "sweep")]}[command]  # fmt: skip
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(path) in err[0] and "alias" in err[0], err


LONG = "n" * 300


@pytest.mark.timeout(120, method="signal")
@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "--out", "{tmp}/" + LONG, "--patients", "4", "--size", "32"],
        ["split", "--data", "{tmp}/data", "--out", "{tmp}/" + LONG],
        ["explore", "--data", "{tmp}/data", "--out", "{tmp}/" + LONG],
        ["store-info", "{tmp}/" + LONG],
        [
            "train",
            "--store",
            "{tmp}/store",
            "--out",
            "{tmp}/" + LONG,
            "--size",
            "16",
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
        ["evaluate", "--run", "{tmp}/" + LONG],
        ["report", "{tmp}/" + LONG, "--out", "{tmp}/r"],
        ["predict", "--run", "{tmp}/" + LONG, "{tmp}/x.png"],
        ["etl", "--data", "{tmp}/" + LONG, "--out", "{tmp}/s"],
    ],
    ids=lambda argv: argv[0],
)
def test_a_name_too_long_for_the_file_system_is_one_line(evaluated, tmp_path, capsys, argv):
    from cxrflow.data.synth import synthesize

    store, _ = evaluated
    shutil.copytree(store, tmp_path / "store")
    synthesize(tmp_path / "data", patients=4, size=32, seed=0)
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert "too long" in errors[0].lower(), errors


@pytest.mark.timeout(60, method="signal")
def test_a_huge_split_csv_is_one_line(tmp_path, capsys):
    from cxrflow.data.synth import synthesize

    synthesize(tmp_path / "data", patients=4, size=32, seed=0)
    split = _sparse(tmp_path / "split.csv", b"image_id,patient_id,split\n")
    rc = main(["etl", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "store"), "--split-csv", str(split)])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "split.csv" in errors[0] and "bytes, over the" in errors[0], err
