"""An ensemble is bound to its members' checkpoints by their hashes: a member checkpoint replaced,
retrained or gone after the ensemble was built is refused in one line by every use of the ensemble
(report, predict, the status check), naming the member and the commands that fix it; the commands
work as printed."""

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxrflow.cli import main
from cxrflow.modelling.ensemble import build_ensemble
from cxrflow.results.evaluate import evaluate_run
from cxrflow.runs import METRICS_NAME, evaluation_status


def _train(tmp, store, name, *, seed):
    from cxrflow.modelling.config import StageSettings, TrainConfig
    from cxrflow.modelling.train import train

    out = tmp / name
    config = TrainConfig(
        store=str(store), size=32, model="simple_cnn", out=str(out), pretrained="none", batch_size=32,
        kt=StageSettings(epochs=1, lr=3e-3), finetune=StageSettings(epochs=1, lr=3e-3),
        augment=False, device="cpu", early_stopping_patience=0, seed=seed,
    )  # fmt: skip
    train(config, quiet=True, log=lambda msg: None)
    return out


@pytest.fixture(scope="module")
def original(tmp_path_factory, one_torch_thread):
    """Two evaluated runs, an ensemble of them, and one image to predict on (kept pristine in a copy)."""
    from cxrflow.testing.synthstore import write_synthetic_store

    tmp_path = tmp_path_factory.mktemp("binding") / "study"
    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 64, "val": 64, "test": 64}, prevalence=0.3, signal=12)
    runs = [_train(tmp_path, store, "a", seed=0), _train(tmp_path, store, "b", seed=1)]
    for run in runs:
        evaluate_run(run, n_boot=20)
    ens = Path(build_ensemble(runs, tmp_path / "ens", method="mean", n_boot=20)["out"])
    row = pq.read_table(next((store / "size=32" / "split=test").glob("*.parquet"))).slice(0, 1).to_pylist()[0]
    png = tmp_path / "x.png"
    Image.fromarray(np.frombuffer(row["pixels"], np.uint8).reshape(32, 32), "L").save(png)
    shutil.copytree(tmp_path, tmp_path.with_name("pristine"))
    return tmp_path, runs, ens, png


@pytest.fixture()
def built(original):
    """The study of ``original`` as it was built, at the same paths (every test changes it)."""
    tmp = original[0]
    shutil.rmtree(tmp)
    shutil.copytree(tmp.with_name("pristine"), tmp)
    return original


def _one_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _uses(tmp, ens, png):
    """Every use of an ensemble, as the CLI runs it."""
    return {
        "predict": ["predict", "--run", str(ens), str(png)],
        "report": ["report", str(ens), "--out", str(tmp / "report"), "--no-html", "--overwrite"],
    }


def _replace(run):
    """The member's best checkpoint replaced by one with other weights (as a retraining would)."""
    import torch

    ckpt = torch.load(run / "best_finetune.pt", map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] + 0.01
    torch.save(ckpt, run / "best_finetune.pt")


def _drop_hash(run, donor, ens):
    metrics = json.loads((ens / METRICS_NAME).read_text())
    del metrics["members"][1]["checkpoint_sha256"]
    (ens / METRICS_NAME).write_text(json.dumps(metrics))


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, expected",
    [
        ("replaced", "best_finetune.pt changed since the ensemble was built"),
        ("replaced and evaluated again", "best_finetune.pt changed since the ensemble was built"),
        ("hash not recorded", "does not record which checkpoint it was built from"),
    ],
)
def test_a_changed_member_is_refused_by_every_use(built, capsys, change, expected):
    tmp, (a, b), ens, png = built
    assert main(_uses(tmp, ens, png)["predict"]) == 0
    capsys.readouterr()
    if change == "hash not recorded":
        _drop_hash(b, a, ens)
    else:
        _replace(b)
        if change == "replaced and evaluated again":  # the member's own evaluation is current again
            evaluate_run(b, n_boot=20, overwrite=True)
    status = evaluation_status(ens / METRICS_NAME)
    assert status is not None and status.startswith(f"ensemble member {b}") and expected in status
    for argv in _uses(tmp, ens, png).values():
        line = _one_error(argv, capsys)
        assert f"ensemble member {b}" in line and expected in line
    if change == "hash not recorded":
        return
    # the fix, run as printed: evaluate the member again (unless done), then rebuild the ensemble
    fixes = [part.split(")")[0] for part in status.split("(") if part.startswith("cxrflow evaluate")]
    fixes.append(status.rsplit("rebuild the ensemble: ", 1)[1])
    for command in fixes:
        assert main(shlex.split(command)[1:]) == 0, command
    capsys.readouterr()
    assert evaluation_status(ens / METRICS_NAME) is None
    assert main(_uses(tmp, ens, png)["predict"]) == 0


@pytest.mark.slow
def test_a_member_checkpoint_gone_is_one_line(built, capsys):
    tmp, (a, b), ens, png = built
    (b / "best_finetune.pt").unlink()
    for argv in _uses(tmp, ens, png).values():
        line = _one_error(argv, capsys)
        assert f"ensemble member {b}" in line and "best_finetune.pt is gone" in line
