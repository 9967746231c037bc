"""Training on several stores end to end: the CLI, per-collection validation, the checkpoint, evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cxrflow.cli import main
from cxrflow.commands.train import config_from_args, get_args_parser
from cxrflow.data.labels import LabelVocabulary
from cxrflow.testing.synthstore import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: One collection's findings under NIH names, another's under CheXpert names; Mass only in the first,
#: Edema only in the second.
NIH_LIKE = LabelVocabulary(("Atelectasis", "Effusion", "Mass", "Nodule"))
CHEXPERT_LIKE = LabelVocabulary(("Atelectasis", "Pleural Effusion", "Edema"))


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("collections")
    a, b = root / "nih", root / "chexpert"
    write_synthetic_store(a, sizes=(32,), rows={"train": 64, "val": 32, "test": 24}, vocab=NIH_LIKE, seed=1)
    write_synthetic_store(b, sizes=(32,), rows={"train": 32, "val": 32, "test": 24}, vocab=CHEXPERT_LIKE, seed=2)
    return a, b


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_one_store_is_a_run_on_one_store_and_several_are_recorded_absolute(two, tmp_path, monkeypatch):
    a, b = two
    parser = get_args_parser()
    one = config_from_args(parser.parse_args(["--store", str(a), "--size", "32", "--out", "r"]))
    assert one.store == str(a) and one.stores == [] and not one.multi_store
    monkeypatch.chdir(a.parent)
    both = config_from_args(parser.parse_args(["--store", "nih", "--store", "chexpert", "--size", "32", "--out", "r",
                                               "--store-weights", "1,2"]))  # fmt: skip
    assert both.stores == [str(a), str(b)] and both.store == str(a) and both.store_weights == [1.0, 2.0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--store", "{a}"], "names the same store twice"),
        (["--store", "{tmp}"], "_manifest.json is missing"),
        (["--store", "{b}", "--size", "48"], "no 48 px images"),
        (["--store", "{b}", "--store-weights", "1"], "one weight per --store"),
        (["--store", "{b}", "--store-weights", "1,-2"], "positive numbers"),
        (["--store", "{b}", "--store-weights", "1,x"], "comma-separated numbers"),
    ],
)
def test_bad_store_sets_are_one_line_before_training(two, tmp_path, capsys, extra, message):
    a, b = two
    extra = [e.format(a=a, b=b, tmp=tmp_path) for e in extra]
    argv = [
        "train",
        "--quiet",
        "--store",
        str(a),
        "--size",
        "32",
        "--model",
        "simple_cnn",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*argv, *extra]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_run_on_two_collections_validates_each_records_both_and_evaluates_on_each(two, tmp_path, capsys):
    a, b = two
    run = tmp_path / "run"
    argv = ["train", "--quiet", "--store", str(a), "--store", str(b), "--size", "32", "--model", "simple_cnn",
            "--pretrained", "none", "--epochs", "2", "--batch-size", "16", "--fusion", "demographics",
            "--out", str(run)]  # fmt: skip
    assert main(argv) == 0

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        by_store = row["val_auc_by_store"]
        assert set(by_store) == {"nih", "chexpert"}
        assert set(by_store["nih"]["auc"]) == {"Atelectasis", "Effusion", "Mass", "Nodule"}
        assert set(by_store["chexpert"]["auc"]) == {"Atelectasis", "Effusion", "Edema"}  # model names
        pairs = [v for s in by_store.values() for v in s["auc"].values() if v is not None]
        assert row["val_auc_mean"] == pytest.approx(sum(pairs) / len(pairs))
        assert row["val_images"] == 64

    ckpt = torch.load(run / "best_finetune.pt", map_location="cpu", weights_only=True)
    config = ckpt["config"]
    assert ckpt["label_names"] == ["Atelectasis", "Effusion", "Mass", "Nodule", "Edema"]
    assert config["store"] == str(a) and config["stores"] == [str(a), str(b)]
    assert len(config["store_identities"]) == 2 and config["store_identity"] == config["store_identities"][0]
    assert config["store_alignment"][1] == {"Atelectasis": "Atelectasis", "Pleural Effusion": "Effusion",
                                            "Edema": "Edema"}  # fmt: skip
    assert math.isfinite(config["pixel_mean"]) and len(config["pos_weight"]) == 5

    assert main(["train", "--quiet", "--out", str(run), "--resume"]) == 0  # finished: nothing to do
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--n-boot", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    own, other = run / "eval-test-best_finetune", run / "eval-chexpert-test-best_finetune"
    assert f"wrote {own}/" in out and f"wrote {other}/" in out
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (own, other))
    assert first["not_labelled"] == ["Edema"] and second["not_labelled"] == ["Mass", "Nodule"]
    assert first["trained_on_store"] and second["trained_on_store"]
    assert second["alignment"]["Effusion"] == "Pleural Effusion"
    # the audit's options reach every store's evaluation
    assert main(["evaluate", "--run", str(run), "--n-boot", "20", "--device", "cpu", "--no-audit", "--overwrite"]) == 0
    assert capsys.readouterr().out.count("subgroup audit: skipped (--no-audit)") == 2
    assert not any((d / "subgroups.csv").exists() for d in (own, other))
    assert main(["evaluate", "--run", str(run), "--n-boot", "20", "--device", "cpu", "--overwrite"]) == 0
    assert "--no-audit" not in capsys.readouterr().out

    from cxrflow.modelling.predictor import load_run_predictor

    # predict takes each finding's operating point from the first store's evaluation that scored it
    predictor = load_run_predictor(run, device="cpu")
    assert predictor.thresholds == {**second["threshold_calibrated"], **first["threshold_calibrated"]}


@pytest.mark.slow
def test_a_run_on_two_stores_cut_in_its_second_epoch_resumes_to_the_same_result(two, tmp_path):
    from cxrflow.modelling.config import resolve_config
    from cxrflow.modelling.train import train

    a, b = two

    def config(out: Path):
        return resolve_config(None, None, {"stores": [str(a), str(b)], "size": 32, "model": "simple_cnn",
                                           "pretrained": "none", "out": str(out), "batch_size": 16,
                                           "finetune.epochs": 3, "store_weights": "1,2"})  # fmt: skip

    train(config(tmp_path / "reference"), quiet=True, log=lambda msg: None)

    def cut(model, stage, epoch, step):
        if epoch == 2 and step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut"), quiet=True, log=lambda msg: None, step_hook=cut)
    train(config(tmp_path / "cut"), resume=True, quiet=True, log=lambda msg: None)
    reference, resumed = (
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("reference", "cut")
    )

    def figures(rows: list[dict]) -> list[float]:
        return [v for r in rows for v in (r["train_loss"], r["val_loss"], r["val_auc_mean"], r["train_images"],
                                          *(s["mean"] for s in r["val_auc_by_store"].values()))]  # fmt: skip

    assert len(resumed) == 3 and figures(resumed) == pytest.approx(figures(reference), abs=1e-5)
