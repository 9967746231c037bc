"""The audit inside 'cxrflow evaluate' on a tiny trained run, and what report.html says about it."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxrflow.cli import main
from cxrflow.metrics import binary_auc
from cxrflow.results.audit import ANY, COLUMNS, make_attributes, read_csv


def _train(tmp: Path, fusion: str = "none") -> tuple[Path, Path]:
    from cxrflow.modelling.config import StageSettings, TrainConfig
    from cxrflow.modelling.train import train
    from cxrflow.testing.synthstore import write_synthetic_store

    store = tmp / "store"
    if not store.exists():
        write_synthetic_store(store, sizes=(32,), rows={"train": 96, "val": 48, "test": 96}, prevalence=0.3)
    out = tmp / f"run-{fusion}"
    config = TrainConfig(
        store=str(store), size=32, model="simple_cnn", out=str(out), pretrained="none", batch_size=16,
        kt=StageSettings(epochs=1, lr=1e-2), finetune=StageSettings(epochs=1, lr=3e-3),
        augment=False, device="cpu", early_stopping_patience=0, fusion=fusion,
    )  # fmt: skip
    train(config, quiet=True, log=lambda msg: None)
    return out, store


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("subgroups")
    run, store = _train(tmp)
    out = tmp / "eval"
    assert main(["evaluate", "--run", str(run), "--out", str(out), "--n-boot", "50", "--audit-fpr", "0.3"]) == 0
    return run, store, out


@pytest.mark.slow
def test_evaluate_writes_an_audit_that_recomputes_from_predictions_and_the_store(evaluated):
    _, store, out = evaluated
    m = json.loads((out / "metrics.json").read_text())
    assert m["synthetic"] is True and m["audit"]["file"] == "subgroups.csv"
    assert m["audit"]["underdiagnosis"]["global_fpr"] == 0.3
    assert set(m["audit"]["attributes"]) == {"sex", "age", "view", "sex x age"}
    rows = read_csv(out / "subgroups.csv")
    assert tuple((out / "subgroups.csv").read_text().splitlines()[0].split(",")[: len(COLUMNS)]) == COLUMNS
    # recompute every group's AUC and gap from predictions.parquet joined with the store's attributes
    pred = pq.read_table(out / "predictions.parquet").to_pandas()
    attrs = pq.read_table(store / "size=32" / "split=test", columns=["image_id", "age", "sex", "view"]).to_pandas()
    joined = pred[["image_id"]].merge(attrs, on="image_id", how="left")
    assert (joined[["age", "sex", "view"]].to_numpy() == pred[["age", "sex", "view"]].to_numpy()).all()
    attributes, _ = make_attributes(joined["age"].tolist(), joined["sex"].tolist(), joined["view"].tolist())
    checked = 0
    for r in rows:
        if r["finding"] == ANY:
            continue
        att = next(a for a in attributes if a.name == r["attribute"])
        member = att.codes == att.groups.index(r["group"])
        y, s = pred[f"label_{r['finding']}"].to_numpy(), pred[f"prob_{r['finding']}"].to_numpy(np.float64)
        assert r["n_images"] == member.sum() and r["n_positive"] == y[member].sum()
        auc, rest = binary_auc(y[member], s[member]), binary_auc(y[~member], s[~member])
        assert r["auc"] == pytest.approx(auc, abs=1e-5, nan_ok=True)
        assert r["gap"] == pytest.approx(auc - rest, abs=1e-5, nan_ok=True)
        checked += not np.isnan(auc)
    assert checked > 20
    assert {f["attribute"] for f in m["audit"]["figures"]} == set(m["audit"]["attributes"])
    assert all((out / f["file"]).is_file() for f in m["audit"]["figures"])


@pytest.mark.slow
def test_no_audit_skips_it(evaluated, tmp_path, capsys):
    run, _, _ = evaluated
    out = tmp_path / "plain"
    assert main(["evaluate", "--run", str(run), "--out", str(out), "--n-boot", "20", "--no-audit"]) == 0
    assert "subgroup audit: skipped (--no-audit)" in capsys.readouterr().out
    assert not (out / "subgroups.csv").exists()
    assert json.loads((out / "metrics.json").read_text())["audit"] is None


def test_audit_fpr_outside_0_1_is_one_usage_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--run", "x", "--audit-fpr", "1.5"])
    assert exc.value.code == 2 and "--audit-fpr" in capsys.readouterr().err


@pytest.mark.slow
def test_report_of_a_synthetic_store_says_synthetic_and_shows_the_audit(evaluated, tmp_path):
    import re

    _, _, out = evaluated
    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report)]) == 0
    html = (report / "report.html").read_text()
    banner = html[html.index("<header>") : html.index("</header>")]
    assert "Synthetic data." in banner and "(synthetic data)" in banner  # the banner and the page's title
    assert "Published results" not in html and "Wang et al." not in html  # no comparison with published results
    assert "Who the model fails: subgroup audit (synthetic data)" in html
    assert "Underdiagnosis (synthetic data)" in html and html.count("Forest plot of") >= 4
    assert re.search(r"No flagged gaps|Flagged gaps", html)
    assert "official" not in re.sub(r"<[^>]+>", "", html).split("Table 1")[1].split("3. Runs")[0]


@pytest.mark.slow
def test_a_fusion_run_gets_the_same_audit(evaluated):
    _, _, out = evaluated
    fused, _ = _train(out.parent, fusion="demographics")
    target = out.parent / "eval-fused"
    assert main(["evaluate", "--run", str(fused), "--out", str(target), "--n-boot", "20"]) == 0
    m = json.loads((target / "metrics.json").read_text())
    assert m["fusion"] == "demographics" and m["audit"]["file"] == "subgroups.csv"
    assert len(read_csv(target / "subgroups.csv")) == len(read_csv(out / "subgroups.csv"))


def test_an_ensembles_attributes_come_from_the_store_when_its_members_predictions_lack_them(tmp_path):
    """Members evaluated before predictions carried age, sex and view: the ensemble's audit reads them
    from the store; with neither, it says why it has no audit."""
    import pyarrow as pa

    from cxrflow.results.subgroups import ensemble_audit, store_attributes
    from cxrflow.testing.synthstore import write_synthetic_store

    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 8, "val": 16, "test": 16}, seed=2)
    member = tmp_path / "member"
    member.mkdir()
    parts = {}
    for split, name in (("test", "predictions.parquet"), ("val", "val_predictions.parquet")):
        table = pq.read_table(store / "size=32" / f"split={split}", columns=["image_id"])
        ids = table.column("image_id").to_pylist()[::-1]  # another order than the store's
        pq.write_table(pa.table({"image_id": ids}), member / name)
        parts[split] = {"image_id": ids}
    metrics = {"members": [{"eval": str(member), "size": 32}], "store": str(store), "split": "test"}
    from cxrflow.results.subgroups import _ensemble_attributes

    assert _ensemble_attributes(parts["test"], parts["val"], metrics) == " (synthetic data)" and metrics["synthetic"]
    expected = store_attributes(store, 32, "test", parts["test"]["image_id"])
    for key in ("age", "sex", "view"):
        assert list(parts["test"][key]) == list(expected[key])
    assert list(parts["val"]["age"]) == list(store_attributes(store, 32, "val", parts["val"]["image_id"])["age"])
    gone = {"members": [{"eval": str(member), "size": 32}], "store": str(tmp_path / "moved"), "split": "test"}
    assert ensemble_audit()(tmp_path, {"image_id": parts["test"]["image_id"]}, {"image_id": []}, ["A"], gone) == ""
    assert gone["audit"] is None and "cannot be read" in gone["audit_note"]
