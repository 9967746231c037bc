"""The cross-collection table of ``cxrflow report`` (:mod:`cxrflow.results.crosstable`): runs against the
stores they were scored on, from evaluation folders in the shapes ``cxrflow evaluate`` writes."""

import csv
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

from cxrflow.metrics import bootstrap_auc_ci
from cxrflow.results.crosstable import cross_table
from cxrflow.results.report import write_report
from cxrflow.results.table import build_rows, find_evaluations
from cxrflow.runs import read_predictions
from cxrflow.testing.synthstore import write_synthetic_store
from cxrflow.testing.synthstudy import write_cross_evaluation, write_study

SHARED = 5


class Nesting(HTMLParser):
    """Every element of a page closed, in the order opened (void elements aside)."""

    VOID = {"meta", "img", "br", "hr", "input", "link", "source", "col", "wbr"}

    def __init__(self, page: str):
        super().__init__()
        self.open, self.errors = [], []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if self.open and self.open[-1] == tag:
            self.open.pop()
        else:
            self.errors.append((tag, self.getpos(), self.open[-3:]))


def _study(tmp_path):
    """Two runs trained on one store; the first also scored on a second store labelling 5 of its findings."""
    got = write_study(tmp_path, runs=(("resnet50", 256, ("finetune",)), ("densenet121", 256, ("finetune",))),
                      ensemble=False, localization=False)  # fmt: skip
    other = tmp_path / "chexpert"
    write_synthetic_store(other, sizes=(64,), rows={"train": 8, "val": 8, "test": 40}, seed=3)
    got["other"] = other
    got["cross"] = write_cross_evaluation(got["runs"][0], other, got["label_names"][:SHARED])
    return got


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study, read only."""
    return _study(tmp_path_factory.mktemp("crosstable"))


@pytest.fixture
def run_copy(study, tmp_path):
    """A copy of the first run's folder (its evaluations inside), for a test that changes it."""
    copy = tmp_path / "run"
    shutil.copytree(study["runs"][0], copy)
    return copy


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_report_draws_the_matrix_and_names_the_drop_over_the_shared_findings(study, tmp_path):
    run = study["runs"][0]
    own, cross = _metrics(run / "eval-test-best_finetune"), _metrics(study["cross"])
    got = write_report(study["runs"], tmp_path / "report")
    md = (tmp_path / "report" / "cross.md").read_text()
    ci = own["mean_auc_ci95"]
    assert f"| {own['mean_auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (14) *own* |" in md
    xci = cross["mean_auc_ci95"]
    assert f"| {cross['mean_auc']:.3f} [{xci[0]:.3f}, {xci[1]:.3f}] ({SHARED}) |" in md
    assert "| densenet121-256 (DenseNet-121 256px fine-tuned) | store |" in md  # scored on its own store only
    # the run's own mean, over the 5 findings it shares with the other store, against the other store's
    shared = study["label_names"][:SHARED]
    own_mean = float(np.mean([own["auc"][n] for n in shared]))
    text = (f"ResNet-50 256px fine-tuned trained on store: {own_mean:.2f} on its own test split, "
            f"{cross['mean_auc']:.2f} on chexpert ({cross['mean_auc'] - own_mean:+.2f} over {SHARED} shared findings)")  # fmt: skip
    assert f"- {text}" in md
    table = cross_table([m for m in find_evaluations(study["runs"])])
    (drop,) = table["drops"]
    pred, names = read_predictions(run / "eval-test-best_finetune" / "predictions.parquet")
    cols = [names.index(n) for n in shared]
    expected = bootstrap_auc_ci(pred["labels"][:, cols], pred["probs"][:, cols], pred["patient_id"],
                                n_boot=own["bootstrap"]["n_boot"], seed=own["bootstrap"]["seed"])  # fmt: skip
    assert drop["own_ci"] == pytest.approx(expected["mean_auc_ci"]) and drop["own_ci"] != ci
    assert drop["other_ci"] == xci  # the evaluation's own interval: its mean is over exactly those findings
    # per finding: each store's AUC, and the findings the other store does not label
    assert f"| {shared[0]} | {own['auc'][shared[0]]:.3f}" in md
    assert f"| {study['label_names'][-1]} | {own['auc'][study['label_names'][-1]]:.3f}" in md
    assert md.count("not labelled") == 14 - SHARED
    rows = list(csv.DictReader(open(got["cross_csv"])))
    means = {(r["run"], r["test_store"]): r for r in rows if r["finding"] == "mean"}
    assert set(means) == {("resnet50-256", "store"), ("resnet50-256", "chexpert"), ("densenet121-256", "store")}
    assert float(means[("resnet50-256", "chexpert")]["auc"]) == cross["mean_auc"]
    assert (
        means[("resnet50-256", "chexpert")]["own_collection"] == "false"
        and means[("resnet50-256", "store")]["n_findings"] == "14"
    )
    page = (tmp_path / "report" / "report.html").read_text()
    assert 'id="cross-matrix"' in page and text in page and 'href="#cross"' in page
    nesting = Nesting(page)
    assert nesting.errors == [] and nesting.open == []
    # the rerun script scores the run on the other store again
    rerun = f"cxrflow evaluate --run {run} --checkpoint best_finetune --split test --n-boot 50 --seed 0 --store {study['other'].resolve()}"
    assert rerun in page


def test_table1_names_the_other_store_and_never_compares_it_with_the_paper_or_calls_it_best(study):
    rows = build_rows(study["runs"])
    other = [r for r in rows if r["other_collection"]]
    assert [r["test_store"] for r in other] == ["chexpert"] and other[0]["paper_mean_auc"] is None
    assert not other[0]["best"] and sum(r["best"] for r in rows) == 1


def test_no_matrix_when_each_run_was_scored_on_one_store(study, tmp_path):
    got = write_report(study["runs"][1:], tmp_path / "report")
    assert "cross_md" not in got and not (tmp_path / "report" / "cross.md").exists()
    assert 'id="cross"' not in (tmp_path / "report" / "report.html").read_text()


def test_a_store_whose_name_holds_the_split_does_not_bring_another_splits_evaluation(run_copy):
    cross = run_copy / "eval-chexpert-test-best_finetune"
    val = run_copy / "eval-my-test-store-val-best_finetune"  # an evaluation of the val split of store 'my-test-store'
    val.mkdir()
    (val / "metrics.json").write_text(json.dumps({**_metrics(cross), "split": "val"}))
    found = find_evaluations([run_copy])
    assert val / "metrics.json" not in found and cross / "metrics.json" in found


def test_a_run_trained_on_two_stores_has_two_own_columns(study, run_copy, tmp_path):
    run = run_copy
    second = tmp_path / "second"
    write_synthetic_store(second, sizes=(64,), rows={"train": 8, "val": 8, "test": 40}, seed=4)
    config = json.loads((run / "config.json").read_text())
    config["stores"] = [config["store"], str(second.resolve())]
    (run / "config.json").write_text(json.dumps(config))
    write_cross_evaluation(run, second, study["label_names"][:8], seed=9)  # evaluate --run RUN on its second store
    table = cross_table(find_evaluations([run]))
    (row,) = table["rows"]
    assert row["trained_on"] == ["store", "second"]
    names = {c["key"]: c["name"] for c in table["columns"]}
    assert {names[k]: c.own for k, c in row["cells"].items()} == {"store": True, "second": True, "chexpert": False}
    assert [c["name"] for c in table["columns"]] == ["second", "store", "chexpert"]  # the run's own stores first
    texts = [d["text"] for d in table["drops"]]
    assert len(texts) == 2 and texts[0].startswith("ResNet-50 256px fine-tuned trained on store + second: ")
    assert " on store's test split, " in texts[0] and " on second's test split, " in texts[1]
    assert all(f"over {SHARED} shared findings" in t for t in texts)


def test_a_run_evaluated_only_store_by_store_is_found(run_copy):
    """A run trained on several stores may hold only eval-<store>-<split>-* folders."""
    run = run_copy
    (run / "eval-test-best_finetune").rename(run / "eval-store-test-best_finetune")
    rows = build_rows([run])
    got = {r["test_store"]: r for r in rows}
    assert sorted(got) == ["chexpert", "store"] and not got["store"]["other_collection"] and got["store"]["best"]
    assert got["chexpert"]["other_collection"] and got["chexpert"]["label"] == "ResNet-50 256px fine-tuned on chexpert"
