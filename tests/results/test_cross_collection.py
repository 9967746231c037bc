"""Scoring a run on another collection's store: findings aligned by name (:mod:`cxrflow.data.alignment`),
scored by :mod:`cxrflow.results.crosseval` and ``cxrflow evaluate --store OTHER``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrflow.cli import main
from cxrflow.data.alignment import ALIASES, align, name_key, parse_map, same_finding
from cxrflow.data.formats.chexpert import VOCAB as CHEXPERT
from cxrflow.data.labels import NIH14, LabelVocabulary
from cxrflow.data.store import KNOWN_COLUMN
from cxrflow.data.uncertain import KNOWN, POLICIES, UNCERTAIN, UNMENTIONED, apply_policy
from cxrflow.errors import CxrflowError
from cxrflow.metrics import binary_auc
from cxrflow.runs import read_predictions

# ------------------------------------------------------------------------------------------------
# the alias table, without pixels


def test_names_match_without_case_spaces_or_underscores():
    assert name_key("Pleural_Thickening") == name_key("pleural thickening") == "pleuralthickening"
    assert same_finding("Effusion", "Pleural Effusion") and same_finding("pleural effusion", "EFFUSION")
    assert same_finding("Pleural_Thickening", "Pleural Thickening")
    assert not same_finding("Effusion", "Pleural Other") and not same_finding("Mass", "Lung Lesion")


def test_nih_to_chexpert_alignment_is_the_documented_one():
    got = align(NIH14.names, CHEXPERT.names)
    assert got.pairs == {
        "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
        "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema",
    }  # fmt: skip
    assert got.not_labelled == [
        "Infiltration",
        "Mass",
        "Nodule",
        "Emphysema",
        "Fibrosis",
        "Pleural_Thickening",
        "Hernia",
    ]
    assert "Support Devices" in got.not_predicted and "Pleural Effusion" not in got.not_predicted
    # the other way round too: a CheXpert model scored on an NIH store
    assert align(CHEXPERT.names, NIH14.names).pairs["Pleural Effusion"] == "Effusion"
    assert all(len(group) == 2 for group in ALIASES)


def test_user_map_extends_the_table_and_bad_maps_are_one_clear_error():
    got = align(NIH14.names, CHEXPERT.names, parse_map(["mass=lung lesion"]))
    assert got.pairs["Mass"] == "Lung Lesion" and "Mass" not in got.not_labelled
    with pytest.raises(CxrflowError, match="'Lung Nodule' is not a finding of the store"):
        align(NIH14.names, CHEXPERT.names, {"Nodule": "Lung Nodule"})
    with pytest.raises(CxrflowError, match="'Nodules' is not a finding of the model"):
        align(NIH14.names, CHEXPERT.names, {"Nodules": "Lung Lesion"})
    with pytest.raises(
        CxrflowError,
        match=r"'Effusion' and 'Pleural_Thickening', are mapped to the one store finding 'Pleural Effusion' \(by --map",
    ):
        align(NIH14.names, CHEXPERT.names, {"Pleural_Thickening": "Pleural Effusion"})
    with pytest.raises(CxrflowError, match="MODEL_FINDING=STORE_FINDING"):
        parse_map(["Mass"])
    with pytest.raises(CxrflowError, match="no finding in common"):
        align(["Hernia", "Fibrosis"], CHEXPERT.names)


# ------------------------------------------------------------------------------------------------
# a run scored on a second store of the same images under other finding names


from test_evaluate import train_tiny_run  # noqa: E402 - the section's own imports

from cxrflow.results.crosseval import evaluate_on_store  # noqa: E402
from cxrflow.results.evaluate import evaluate_run  # noqa: E402

#: the second store's findings: model (NIH) name -> its name there; Infiltration, Fibrosis and Hernia
#: are not labelled there, and it labels one finding the model does not predict
RENAMED = {"Pleural_Thickening": "pleural thickening", "Effusion": "Pleural Effusion", "Edema": "Edema",
           "Atelectasis": "Atelectasis", "Mass": "Mass", "Nodule": "Nodule", "Cardiomegaly": "cardiomegaly",
           "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
           "Emphysema": "Emphysema"}  # fmt: skip
EXTRA = "Support Devices"


def relabelled_copy(src: Path, dst: Path, renamed: dict[str, str], extra: str, *, states: bool = False) -> None:
    """``src`` copied to ``dst`` with the same pixels and the labels of ``renamed``'s findings only
    (under their new names, in reverse order), plus ``extra``, a finding labelled by chance; with
    ``states``, a CheXpert-like store whose labels are by chance uncertain (20%) or not mentioned (10%)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "_manifest.json").read_text())
    old = manifest["label_names"]
    keep = [old.index(n) for n in renamed][::-1]
    names = [renamed[old[i]] for i in keep] + [extra]
    rng = np.random.default_rng(7)
    for part in sorted(dst.rglob("*.parquet")):
        table = pq.read_table(part)
        lab = np.array(table.column("labels").to_pylist(), dtype=np.uint8)
        new = np.concatenate([lab[:, keep], (rng.random((len(lab), 1)) < 0.3).astype(np.uint8)], axis=1)
        column = pa.array([list(map(int, r)) for r in new], pa.list_(pa.uint8()))
        table = table.set_column(table.schema.get_field_index("labels"), "labels", column)
        if states:
            draw = rng.random(new.shape)
            known = np.where(draw < 0.1, UNMENTIONED, np.where(draw < 0.3, UNCERTAIN, KNOWN)).astype(np.uint8)
            column = pa.array([list(map(int, r)) for r in known], pa.list_(pa.uint8()))
            table = table.add_column(table.schema.get_field_index("labels") + 1, KNOWN_COLUMN, column)
        pq.write_table(table, part)
    manifest.update(label_names=names, vocabulary=LabelVocabulary(tuple(names)).to_dict(),
                    positives={n: 1 for n in names}, pos_weight=[1.0] * len(names))  # fmt: skip
    manifest.pop("split_identity", None)
    if states:
        manifest.update(format_version=max(2, manifest["format_version"]), uncertain_policies=list(POLICIES))
    (dst / "_manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross")
    run, store = train_tiny_run(tmp)
    other = tmp / "other"
    relabelled_copy(store, other, RENAMED, EXTRA)
    own = evaluate_run(run, n_boot=20)  # RUN/eval-test-best_finetune: the run's thresholds and temperatures
    return run, store, other, own


@pytest.mark.slow
def test_shared_findings_score_as_on_the_own_store(two_stores, capsys):
    run, _, other, own = two_stores
    assert main(["evaluate", "--run", str(run), "--store", str(other), "--n-boot", "20", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "not labelled in other: Infiltration, Fibrosis, Hernia" in printed
    assert (
        "scored on other: 11 of the model's 14 findings (as Cardiomegaly -> cardiomegaly, Effusion -> Pleural Effusion,"
        in printed
    )
    folder = run / "eval-other-test-best_finetune"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["alignment"] == {m: RENAMED[m] for m in NIH14.names if m in RENAMED}
    assert metrics["not_labelled"] == ["Infiltration", "Fibrosis", "Hernia"] and metrics["not_predicted"] == [EXTRA]
    assert metrics["label_names"] == list(metrics["alignment"])
    for name in metrics["label_names"]:
        assert metrics["auc"][name] is not None and own["auc"][name] is not None
        assert metrics["auc"][name] == pytest.approx(own["auc"][name], abs=1e-6), name
        assert metrics["threshold"][name] == pytest.approx(own["threshold"][name], abs=1e-9)
        assert metrics["sensitivity"][name] == pytest.approx(own["sensitivity"][name], abs=1e-9)
    assert "the run's own evaluation" in metrics["threshold_source"]
    assert metrics["collections"] == {"model": "store", "store": "other"}
    assert metrics["pixel_mean"] == own["pixel_mean"] and metrics["checkpoint_sha256"] == own["checkpoint_sha256"]
    assert set(metrics["store_identity"]) == {"train", "val", "test"}
    assert (folder / "predictions.parquet").is_file() and (run / "eval-test-best_finetune").is_dir()  # side by side


@pytest.mark.slow
def test_split_all_and_a_chexpert_named_store_without_the_runs_evaluation(two_stores, tmp_path):
    from cxrflow.testing.synthstore import write_synthetic_store

    run, _, other, _ = two_stores
    every = evaluate_on_store(run, other, split="all", out=tmp_path / "all", n_boot=5, device="cpu")
    assert every["n_images"] == 96 + 48 + 48 and every["split"] == "all"
    chexpert = tmp_path / "chexpert"
    write_synthetic_store(
        chexpert, sizes=(32,), rows={"train": 16, "val": 24, "test": 24}, vocab=CHEXPERT, prevalence=0.3
    )
    alone = tmp_path / "alone"
    shutil.copytree(run, alone, ignore=shutil.ignore_patterns("eval-*"))  # no evaluation of its own
    got = evaluate_on_store(alone, chexpert, n_boot=5, device="cpu")
    assert Path(got["out"]) == alone / "eval-chexpert-test-best_finetune"
    assert got["alignment"]["Effusion"] == "Pleural Effusion" and "Hernia" in got["not_labelled"]
    assert got["threshold_source"].startswith("fitted on the val split of chexpert")
    assert all(0.0 <= got["auc"][n] <= 1.0 for n in got["label_names"] if got["auc"][n] is not None)


@pytest.mark.slow
def test_bad_input_is_one_line_before_scoring(two_stores, tmp_path, capsys):
    from cxrflow.testing.synthstore import write_synthetic_store

    run, _, other, _ = two_stores
    small = tmp_path / "small"
    write_synthetic_store(small, sizes=(16,), rows={"train": 8, "val": 8, "test": 8}, vocab=CHEXPERT)
    not_a_store = tmp_path / "nothing"
    not_a_store.mkdir()
    cases = [
        (["--store", str(other), "--map", "Hernia=Lung Lesion"], "'Lung Lesion' is not a finding of the store other"),
        (["--store", str(other), "--map", "Hernias=Support Devices"], "'Hernias' is not a finding of the model"),
        (
            ["--store", str(other), "--map", "Hernia=Pleural Effusion"],
            "are mapped to the one store finding 'Pleural Effusion'",
        ),
        (["--store", str(not_a_store)], "not a complete cxrflow store"),
        (["--store", str(small)], "the store has no 32 px images, the size this model takes (it has: 16)"),
        (["--split", "all"], "--split all scores every split of another collection's store"),
    ]
    for extra, message in cases:
        out = tmp_path / "ev"
        assert main(["evaluate", "--run", str(run), "--out", str(out), "--n-boot", "5", "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists()


@pytest.mark.slow
def test_uncertain_labels_of_the_other_store_follow_the_policy(two_stores, tmp_path):
    run, store, _, _ = two_stores
    states = tmp_path / "states"
    relabelled_copy(store, states, RENAMED, EXTRA, states=True)
    own, _ = read_predictions(run / "eval-test-best_finetune" / "predictions.parquet")
    row = {image: i for i, image in enumerate(own["image_id"])}
    table = pa.concat_tables(pq.read_table(p) for p in sorted((states / "size=32" / "split=test").glob("*.parquet")))
    order = [row[i] for i in table.column("image_id").to_pylist()]
    labels = np.array(table.column("labels").to_pylist(), dtype=np.uint8)
    label_states = np.array(table.column(KNOWN_COLUMN).to_pylist(), dtype=np.uint8)
    names = json.loads((states / "_manifest.json").read_text())["label_names"]
    excluded = {}
    for policy in ("ignore", "ones"):
        got = evaluate_on_store(run, states, out=tmp_path / policy, uncertain=policy, n_boot=5, device="cpu")
        assert got["uncertain"] == policy
        y, known = apply_policy(labels, label_states, policy)
        for model_name, store_name in got["alignment"].items():
            j, k = names.index(store_name), list(NIH14.names).index(model_name)
            mask = known[:, j].astype(bool)
            expected = binary_auc(y[mask, j], own["probs"][order][mask, k])
            assert got["auc"][model_name] == pytest.approx(expected, abs=1e-6), (policy, model_name)
            assert got["excluded_unknown"][model_name] == int((~mask).sum())
        excluded[policy] = sum(got["excluded_unknown"].values())
    assert excluded["ignore"] > excluded["ones"] > 0  # uncertain labels are masked, or counted as positives


@pytest.mark.slow
def test_predict_keeps_the_runs_own_operating_points_and_a_stale_one_names_its_store(two_stores, tmp_path):
    import torch

    from cxrflow.modelling.predictor import _evaluation_record
    from cxrflow.runs import evaluation_status

    run, _, other, own = two_stores
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval-*"))
    got = evaluate_on_store(copy, other, maps=["Infiltration=Support Devices"], n_boot=5, device="cpu")
    assert got["alignment"]["Infiltration"] == "Support Devices" and got["map"] == ["Infiltration=Support Devices"]
    assert _evaluation_record(copy, "best_finetune") == (None, None)  # not a threshold source for 'cxrflow predict'
    ckpt = torch.load(copy / "best_finetune.pt", weights_only=True)
    torch.save({**ckpt, "epoch": ckpt["epoch"] + 1}, copy / "best_finetune.pt")
    line = evaluation_status(Path(got["out"]) / "metrics.json")
    assert f"--store {other.resolve()} --split test --map 'Infiltration=Support Devices' --overwrite" in line, line


# ------------------------------------------------------------------------------------------------
# the subgroup audit and figure titles of an evaluation on another store; another store of the same findings


@pytest.mark.slow
def test_an_evaluation_on_another_store_is_audited_and_its_figures_name_that_store(two_stores, tmp_path, monkeypatch):
    import cxrflow.results.evaluate as evaluate_module
    from cxrflow.results.audit import read_csv

    run, _, other, _ = two_stores
    titles = []
    real = evaluate_module.write_prediction_files

    def recording(tmp, evaluated, validation, names, metrics, what):
        titles.append(what)
        return real(tmp, evaluated, validation, names, metrics, what)

    monkeypatch.setattr(evaluate_module, "write_prediction_files", recording)
    got = evaluate_on_store(run, other, out=tmp_path / "ev", n_boot=20, device="cpu")
    assert titles == ["simple_cnn 32px, best_finetune, on other (synthetic data)"]
    audit = got["audit"]
    assert audit["file"] == "subgroups.csv" and set(audit["attributes"]) == {"sex", "age", "view", "sex x age"}
    assert (tmp_path / "ev" / "subgroups-sex.png").is_file()
    rows = read_csv(tmp_path / "ev" / "subgroups.csv")
    assert {r["finding"] for r in rows} == {*got["label_names"], "any"}
    # the audit is recomputed from predictions.parquet alone (it carries each image's attributes)
    pred = pq.read_table(tmp_path / "ev" / "predictions.parquet").to_pandas()
    name = next(n for n in got["label_names"] if got["auc"][n] is not None)
    women = pred[pred["sex"].str.upper().str.startswith("F")]
    row = next(r for r in rows if r["finding"] == name and r["attribute"] == "sex" and r["group"] == "F")
    assert row["n_images"] == len(women)
    assert row["auc"] == pytest.approx(
        binary_auc(women[f"label_{name}"].to_numpy(), women[f"prob_{name}"].to_numpy()), abs=1e-5
    )
    skipped = evaluate_on_store(run, other, out=tmp_path / "none", n_boot=5, device="cpu", audit=False)
    assert skipped["audit"] is None and not (tmp_path / "none" / "subgroups.csv").exists()


@pytest.mark.slow
def test_a_store_of_the_same_findings_with_other_images_is_scored_as_another_collection(two_stores, tmp_path, capsys):
    from cxrflow.testing.synthstore import write_synthetic_store

    run, store, _, _ = two_stores
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    hospital = tmp_path / "hospital"  # an NIH-style collection of other patients: the same finding names
    write_synthetic_store(hospital, sizes=(32,), rows={"train": 16, "val": 24, "test": 40}, prevalence=0.3, seed=5)
    assert main(["evaluate", "--run", str(copy), "--store", str(hospital), "--n-boot", "5", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "scored on hospital: 14 of the model's 14 findings" in printed and "subgroup audit (" in printed
    metrics = json.loads((copy / "eval-hospital-test-best_finetune" / "metrics.json").read_text())
    assert metrics["alignment"] == {n: n for n in NIH14.names} and metrics["n_images"] == 40
    assert metrics["collections"]["store"] == "hospital" and "the run's own evaluation" in metrics["threshold_source"]
    moved = tmp_path / "moved"  # the run's own store moved: its splits, so the run's own evaluation
    shutil.copytree(store, moved)
    assert main(["evaluate", "--run", str(copy), "--store", str(moved), "--out", str(tmp_path / "own"),
                 "--n-boot", "5", "--device", "cpu"]) == 0  # fmt: skip
    own = json.loads((tmp_path / "own" / "metrics.json").read_text())
    assert "alignment" not in own and own["n_images"] == 48
    # the report of the run draws it against both stores
    assert main(["report", str(copy), "--out", str(tmp_path / "report"), "--cases", "0"]) == 0
    assert "cross-collection table (one run on several stores): cross.md, cross.csv" in capsys.readouterr().out
    cross = (tmp_path / "report" / "cross.md").read_text()
    assert (
        "| Run | Trained on | store | hospital |" in cross
        and "on hospital (" in cross
        and "over 14 shared findings)" in cross
    )
