"""Runs that move: a run, an evaluation and a store work from any folder and after ``mv`` / ``cp -r``.

- A run records its store and itself by absolute path; a store that is no longer there is found by
  its splits' identity (moved with the run, beside it, or in the current folder), else one line names
  the stale path and ``--store``.
- An evaluation belongs to the run folder it is in: a copied run's evaluations and messages name the
  copy, and a suggested command works when run as printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrflow.cli import main
from cxrflow.data.store import locate_store, read_manifest, run_store, store_identity
from cxrflow.errors import CxrflowError
from cxrflow.runs import evaluation_run, evaluation_status

pytestmark = pytest.mark.filterwarnings("ignore")

#: Folder names a user may choose: spaces, quotes, dots, non-ASCII, shell metacharacters.
NAMES = st.text(alphabet=st.sampled_from(list("ab _-.'\"$é;&()")), min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and not s.startswith("-")
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two tiny stores with different splits (the second a decoy: same findings, other images)."""
    from cxrflow.testing.synthstore import write_synthetic_store

    root = tmp_path_factory.mktemp("stores")
    for name, seed in (("store", 0), ("decoy", 1)):
        write_synthetic_store(root / name, sizes=(16,), rows={"train": 8, "val": 4, "test": 4}, seed=seed)
    return root


def _config(store: Path, run: Path) -> dict:
    """The config a run trained on ``store`` records (its paths absolute, its splits' identity)."""
    return {"store": str(store), "out": str(run), "size": 16,
            "store_identity": store_identity(store, read_manifest(store), 16)}  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    run_at=st.lists(NAMES, min_size=1, max_size=3),
    store_at=st.lists(NAMES, min_size=1, max_size=2),
    move=st.sampled_from(["both", "store beside the run", "store beside the parent", "store into cwd", "gone"]),
    decoy=st.booleans(),
)
def test_a_moved_store_is_found_by_identity_or_named_stale(tmp_path_factory, stores, run_at, store_at, move, decoy):
    root = tmp_path_factory.mktemp("layout")
    old, new = root / "old", root / "new"
    run, store = old.joinpath(*run_at), old.joinpath("data", *store_at)
    if store == run or store in run.parents or run in store.parents:
        return
    run.mkdir(parents=True)
    shutil.copytree(stores / "store", store)
    config = _config(store, run)
    cwd = root / "cwd"
    cwd.mkdir()
    if decoy:  # another store with other splits where the search looks first
        shutil.copytree(stores / "decoy", run.parent / "decoy")
    if move == "both":  # mv old new: the store moved with the run
        old.rename(new)
        run, expected = new.joinpath(*run_at), new.joinpath("data", *store_at)
    else:
        expected = {
            "store beside the run": run.parent / "moved-store",
            "store beside the parent": run.parent.parent / "moved-store",
            "store into cwd": cwd / "moved-store",
            "gone": root / "far" / "away" / "store",
        }[move]
        if expected.exists():
            return
        expected.parent.mkdir(parents=True, exist_ok=True)
        store.rename(expected)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        if move == "gone":
            with pytest.raises(CxrflowError) as info:
                run_store(config, run=run)
            line = str(info.value)
            assert str(store) in line and "--store" in line and "gone" in line and "\n" not in line
            assert run_store(config, expected, run=run) == expected  # --store points at it explicitly
        else:
            assert run_store(config, run=run).resolve() == expected.resolve()
    finally:
        os.chdir(here)


def test_a_store_at_its_recorded_path_is_used_and_a_relative_record_is_read_from_the_runs_old_cwd(tmp_path, stores):
    shutil.copytree(stores / "store", tmp_path / "store")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    config = _config(tmp_path / "store", tmp_path / "runs" / "r")
    assert run_store(config, run=tmp_path / "runs" / "r") == tmp_path / "store"
    # a run of an older version recorded what the user typed, from the folder they trained in
    old = {"store": "store", "out": "runs/r", "size": 16}
    assert run_store(old, run=tmp_path / "runs" / "r").resolve() == (tmp_path / "store").resolve()
    with pytest.raises(CxrflowError, match="give it with --store"):
        locate_store("elsewhere", None, 16, run=tmp_path / "runs" / "r", recorded_run="runs/r")


def _fake_run(root: Path, name: str) -> Path:
    """A run folder with a checkpoint and a current evaluation of it (no model needed)."""
    run = root / name
    evaluation = run / "eval-test-best_finetune"
    evaluation.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "best_finetune.pt").write_bytes(b"weights")
    metrics = {
        "run": str(run), "run_name": run.name, "checkpoint": "best_finetune",
        "checkpoint_path": str(run / "best_finetune.pt"),
        "checkpoint_sha256": hashlib.sha256(b"weights").hexdigest(), "stage": "finetune", "epoch": 1,
        "split": "test", "mean_auc": 0.5, "auc": {"A": 0.5}, "label_names": ["A"],
    }  # fmt: skip
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    return run


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAMES, copy=NAMES, how=st.sampled_from(["cp", "mv"]))
def test_a_copied_or_moved_runs_stale_evaluation_names_the_run_as_it_is_now(tmp_path_factory, name, copy, how):
    root = tmp_path_factory.mktemp("runs")
    original = _fake_run(root, name)
    if copy == name:
        return
    target = root / "elsewhere" / copy
    target.parent.mkdir()
    (shutil.copytree if how == "cp" else shutil.move)(original, target)
    metrics_path = target / "eval-test-best_finetune" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert evaluation_run(metrics_path, metrics) == target and evaluation_status(metrics_path) is None
    (target / "best_finetune.pt").write_bytes(b"retrained")
    if how == "cp":
        assert (
            evaluation_status(original / "eval-test-best_finetune" / "metrics.json") is None
        )  # the original is untouched
    reason = evaluation_status(metrics_path)
    assert reason is not None and "changed" in reason
    command = shlex.split(reason.split("run '", 1)[1].rsplit("' again", 1)[0])  # the command as printed
    assert command[command.index("--run") + 1] == str(target) and "--out" not in command


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stores):
    """A 1-epoch run trained from its own folder with relative paths (``--store store --out run``)."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(stores / "store", root / "store")
    here = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "--quiet", "--store", "store", "--size", "16", "--model", "simple_cnn", "--out", "run",
                     "--epochs", "1", "--batch-size", "4", "--device", "cpu"]) == 0  # fmt: skip
    finally:
        os.chdir(here)
    return root


@pytest.mark.slow
def test_runs_evaluations_and_stores_work_from_anywhere_after_mv_and_cp(trained, tmp_path, monkeypatch, capsys):
    config = json.loads((trained / "run" / "config.json").read_text())
    assert config["store"] == str(trained / "store") and config["out"] == str(trained / "run")
    monkeypatch.chdir(tmp_path)  # another working folder
    evaluate = ["evaluate", "--n-boot", "5", "--device", "cpu", "--overwrite"]
    assert main([*evaluate, "--run", str(trained / "run")]) == 0
    shutil.move(trained / "store", trained / "store2")  # mv store store2: found beside the run
    shutil.copytree(trained / "run", trained / "run2")  # cp -r run run2, then run2 trained on (other weights)
    ckpt = torch.load(trained / "run2" / "best_finetune.pt", weights_only=True)
    next(t for t in ckpt["model"].values() if t.is_floating_point()).add_(0.01)
    torch.save(ckpt, trained / "run2" / "best_finetune.pt")
    assert main([*evaluate, "--run", str(trained / "run2")]) == 0
    assert main(["report", str(trained / "run2"), "--out", str(tmp_path / "rep"), "--no-html"]) == 0
    assert "run2" in (tmp_path / "rep" / "table.md").read_text()
    shutil.copytree(trained / "run", tmp_path / "run3")  # an unfinished run moved away from its store: resumes
    (tmp_path / "run3" / "done.json").unlink()
    assert main(["train", "--resume", "--out", str(tmp_path / "run3"), "--quiet", "--device", "cpu"]) == 2
    assert "give it with --store" in capsys.readouterr().err
    shutil.move(tmp_path / "run3", trained / "run3")
    assert main(["train", "--resume", "--out", str(trained / "run3"), "--quiet", "--device", "cpu"]) == 0
    assert json.loads((trained / "run3" / "config.json").read_text())["store"] == str(trained / "store2")
    capsys.readouterr()
    shutil.move(trained / "store2", tmp_path / "far")  # nowhere the search looks
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    assert main([*evaluate, "--run", str(trained / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(trained / "store") in err[0] and "--store" in err[0], err
    assert main([*evaluate, "--run", str(trained / "run2"), "--store", str(tmp_path / "far")]) == 0
    image = str(_images(tmp_path)[0])
    assert main(["predict", "--run", str(trained / "run2"), "--json", image]) == 0
    # an ensemble of run and run2, then everything moved together (mv trained moved)
    assert (
        main(["ensemble", str(trained / "run"), str(trained / "run2"), "--out", str(trained / "ens"), "--n-boot", "5"])
        == 0
    )
    ens = json.loads((trained / "ens" / "metrics.json").read_text())
    assert [m["run"] for m in ens["members"]] == [str(trained / "run"), str(trained / "run2")]
    shutil.move(trained, tmp_path / "moved")
    try:
        capsys.readouterr()
        assert main(["predict", "--run", str(tmp_path / "moved" / "ens"), "--json", image]) == 0
        assert main(["report", str(tmp_path / "moved" / "ens"), "--out", str(tmp_path / "rep2"), "--no-html"]) == 0
    finally:
        shutil.move(tmp_path / "moved", trained)
        shutil.move(tmp_path / "far", trained / "store")


def _images(folder: Path) -> list[Path]:
    from PIL import Image

    path = folder / "x.png"
    Image.new("L", (20, 20), 90).save(path)
    return [path]
