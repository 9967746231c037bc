"""Ensembles of real runs trained by cxrflow's own trainer on a small synthetic store (CPU, 32 px)."""

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxrflow.cli import main
from cxrflow.errors import CxrflowError
from cxrflow.metrics import bootstrap_auc_ci, sensitivity_specificity, youden_threshold
from cxrflow.modelling.calibration import expected_calibration_error, fit_temperature, logit
from cxrflow.modelling.ensemble import build_ensemble
from cxrflow.results.evaluate import evaluate_run


def _train(tmp, store, name, *, seed, epochs, lr):
    from cxrflow.modelling.config import StageSettings, TrainConfig
    from cxrflow.modelling.train import train

    out = tmp / name
    config = TrainConfig(
        store=str(store), size=32, model="simple_cnn", out=str(out), pretrained="none", batch_size=16,
        kt=StageSettings(epochs=1, lr=lr), finetune=StageSettings(epochs=epochs, lr=lr),
        augment=False, device="cpu", early_stopping_patience=0, seed=seed,
    )  # fmt: skip
    train(config, quiet=True, log=lambda msg: None)
    return out


@pytest.fixture(scope="module")
def members(tmp_path_factory, one_torch_thread):
    """Two different evaluated runs (other seed, learning rate and length) on one store."""
    from cxrflow.testing.synthstore import write_synthetic_store

    tmp = tmp_path_factory.mktemp("ensemble")
    store = tmp / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 128, "val": 128, "test": 128}, prevalence=0.3, signal=12)
    runs = [_train(tmp, store, "a", seed=0, epochs=2, lr=3e-3), _train(tmp, store, "b", seed=1, epochs=1, lr=1e-2)]
    evals = [evaluate_run(r, n_boot=50)["out"] for r in runs]
    return tmp, store, runs, evals


@pytest.fixture(scope="module")
def stacked(members):
    tmp, _, runs, _ = members
    return build_ensemble(runs, tmp / "ens-stacked", method="stacked", n_boot=50)


def _frame(folder, name="predictions.parquet"):
    return pq.read_table(folder / name).to_pandas()


@pytest.mark.slow  # the module's two trained, evaluated runs take ~20 s to build
def test_stacked_ensemble_scores_at_least_its_best_member(members, stacked):
    _, _, _, evals = members
    member_aucs = [json.loads((e / "metrics.json").read_text())["mean_auc"] for e in map(_path, evals)]
    assert stacked["mean_auc"] >= max(member_aucs)
    assert stacked["kind"] == "ensemble" and stacked["method"] == "stacked" and stacked["model"] == "ensemble(stacked)"
    assert [m["eval"] for m in stacked["members"]] == [str(_path(e).resolve()) for e in evals]
    assert all(len(m["checkpoint_sha256"]) == 64 for m in stacked["members"])
    assert stacked["stacking"]["fitted_on"] == "val" and stacked["stacking"]["fallback_to_mean"] == []


def _path(p):
    from pathlib import Path

    return Path(p)


@pytest.mark.slow  # the module's two trained, evaluated runs take ~20 s to build
def test_every_figure_in_the_ensemble_metrics_recomputes_from_its_predictions(members, stacked):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import brier_score_loss, roc_auc_score

    _, _, _, evals = members
    out = _path(stacked["out"])
    m = json.loads((out / "metrics.json").read_text())
    test, val = _frame(out), _frame(out, "val_predictions.parquet")
    names = m["label_names"]
    assert m["n_images"] == len(test) == 128 and m["n_patients"] == test["patient_id"].nunique() and len(val) == 128
    # the stacking is a logistic regression on the members' validation logits, refitted here with sklearn
    member_val = [_frame(_path(e), "val_predictions.parquet").set_index("image_id").loc[val["image_id"]] for e in evals]
    member_test = [_frame(_path(e)).set_index("image_id").loc[test["image_id"]] for e in evals]
    weights = m["stacking"]["weights"]
    for name in names:
        # members with weight 0 were left out for a negative weight; the rest is sklearn's fit on them
        kept = [i for i, c in enumerate(weights[name]["coef"]) if c > 0]
        assert kept and all(c >= 0 for c in weights[name]["coef"])
        x_val = np.column_stack([member_val[i][f"logit_{name}"] for i in kept])
        lr = LogisticRegression(C=0.1, random_state=0, max_iter=1000).fit(x_val, val[f"label_{name}"])
        assert (lr.coef_ >= 0).all()
        x_test = np.column_stack([member_test[i][f"logit_{name}"] for i in kept])
        np.testing.assert_allclose(test[f"logit_{name}"], lr.decision_function(x_test), atol=1e-3)
    aucs = []
    for name in names:
        y, p = test[f"label_{name}"], test[f"prob_{name}"]
        assert m["positives"][name] == int(y.sum())
        auc = roc_auc_score(y, p) if y.nunique() == 2 else None
        assert m["auc"][name] == (None if auc is None else pytest.approx(auc, abs=1e-6))
        aucs.append(auc)
        y_val = val[f"label_{name}"]
        for key, col in (("threshold", "prob_"), ("threshold_calibrated", "calprob_")):
            t = youden_threshold(y_val, val[col + name])
            assert m[key][name] == (None if math.isnan(t) else pytest.approx(t))
        sens, spec = sensitivity_specificity(y, p, m["threshold"][name])
        assert m["sensitivity"][name] == pytest.approx(sens) and m["specificity"][name] == pytest.approx(spec)
        cal = m["calibration"]
        assert cal["temperature"][name] == pytest.approx(fit_temperature(val[f"logit_{name}"], y_val), rel=1e-4)
        for when, col in (("before", "prob_"), ("after", "calprob_")):
            assert cal["ece"][when][name] == pytest.approx(expected_calibration_error(y, test[col + name]), abs=1e-6)
            assert cal["brier"][when][name] == pytest.approx(
                brier_score_loss(y, test[col + name], pos_label=1), abs=1e-6
            )
    assert m["mean_auc"] == pytest.approx(np.mean([a for a in aucs if a is not None]))
    labels = test[[f"label_{n}" for n in names]].to_numpy()
    probs = test[[f"prob_{n}" for n in names]].to_numpy()
    ci = bootstrap_auc_ci(labels, probs, test["patient_id"].to_numpy(), n_boot=50, seed=0)
    assert m["mean_auc_ci95"] == pytest.approx(ci["mean_auc_ci"], abs=1e-6)
    assert set(m["figures"]) == {"roc.png", "pr.png", "reliability.png"} and all(
        (out / f).stat().st_size > 10_000 for f in m["figures"]
    )
    from sklearn.metrics import average_precision_score

    for name in names:  # the precision-recall figure's AUPRCs, from the same predictions
        y = test[f"label_{name}"]
        if y.nunique() == 2:
            assert m["auprc"][name] == pytest.approx(average_precision_score(y, test[f"prob_{name}"]), abs=1e-6)


def test_stacking_weights_are_never_negative():
    from cxrflow.modelling.ensemble import fit_stacking

    rng = np.random.default_rng(0)
    y = (rng.random((400, 1)) < 0.3).astype(int)
    good = 2.0 * y + rng.normal(0, 1, (400, 1))
    # a second member whose logits are mostly the first one's: alone it ranks well, yet a free
    # regression would give it a negative weight to cancel the shared part
    shadow = good + 0.3 * rng.normal(0, 1, (400, 1)) - 0.5 * y
    (fit,) = fit_stacking([good, shadow], y)
    assert fit["coef"][0] > 0 and fit["coef"][1] == 0.0
    from sklearn.linear_model import LogisticRegression

    assert (
        LogisticRegression(C=0.1).fit(np.hstack([good, shadow]), y[:, 0]).coef_[0, 1] < 0
    )  # what the constraint prevents
    assert fit_stacking([good, shadow], np.zeros((400, 1))) == [None]


@pytest.mark.slow  # the module's two trained, evaluated runs take ~20 s to build
def test_mean_ensemble_averages_calibrated_probabilities(members):
    tmp, _, runs, evals = members
    out = tmp / "ens-mean"
    assert main(["ensemble", str(evals[0]), str(runs[1]), "--out", str(out), "--n-boot", "20"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "mean" and m["stacking"] is None and len(m["members"]) == 2
    test = _frame(out)
    frames = [_frame(_path(e)).set_index("image_id").loc[test["image_id"]] for e in evals]
    for name in m["label_names"]:
        mean = np.mean([f[f"calprob_{name}"].to_numpy(np.float64) for f in frames], axis=0)
        np.testing.assert_allclose(test[f"logit_{name}"], logit(mean), atol=1e-3)
    assert main(["ensemble", str(evals[0]), str(runs[1]), "--out", str(out)]) == 2  # no silent overwrite


@pytest.mark.slow  # the module's two trained, evaluated runs take ~20 s to build
def test_predict_with_an_ensemble_runs_every_member(members, stacked, tmp_path, capsys):
    _, store, _, _ = members
    row = pq.read_table(next((store / "size=32" / "split=test").glob("*.parquet"))).slice(0, 1).to_pylist()[0]
    png = tmp_path / "x.png"
    Image.fromarray(np.frombuffer(row["pixels"], np.uint8).reshape(32, 32), "L").save(png)
    expected = _frame(_path(stacked["out"])).set_index("image_id").loc[row["image_id"]]
    for flag, col in (([], "calprob_"), (["--raw"], "prob_")):
        assert main(["predict", "--run", stacked["out"], str(png), "--json", *flag]) == 0
        out = json.loads(capsys.readouterr().out)
        got = out["predictions"][0]["probabilities"]
        for name in stacked["label_names"]:
            assert got[name] == pytest.approx(expected[col + name], abs=1e-4)
        scale = "threshold_calibrated" if col == "calprob_" else "threshold"
        assert out["thresholds"] == {n: t for n, t in stacked[scale].items() if t is not None}
    # a member checkpoint that is not the one the ensemble was built from is refused
    changed = tmp_path / "changed"
    shutil.copytree(stacked["out"], changed)
    m = json.loads((changed / "metrics.json").read_text())
    m["members"][1]["checkpoint_sha256"] = "0" * 64
    (changed / "metrics.json").write_text(json.dumps(m))
    assert main(["predict", "--run", str(changed), str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed since the ensemble was built" in err[0]
    # an evaluation folder is not something to predict with: one line naming what to give instead
    assert main(["predict", "--run", str(members[3][0]), str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --run the run folder" in err[0]


@pytest.mark.slow  # the module's two trained, evaluated runs take ~20 s to build
def test_report_shows_the_ensemble_row_with_members_and_ece(members, stacked, tmp_path):
    from cxrflow.results.table import build_rows, format_csv, format_markdown

    _, _, runs, _ = members
    rows = build_rows([*runs, stacked["out"]])
    ens = rows[-1]
    assert ens["kind"] == "ensemble" and ens["members"] == ["a/best_finetune", "b/best_finetune"]
    assert ens["ece"] == pytest.approx(stacked["calibration"]["ece_mean"]["after"])
    assert rows[0]["ece"] is not None and rows[0]["ece_raw"] is not None
    md = format_markdown(rows)
    assert "Ensemble (stacked) of a/best_finetune + b/best_finetune" in md and "ECE" in md
    assert "members" in format_csv(rows).splitlines()[0]


@pytest.mark.slow  # the module's two trained, evaluated runs take ~20 s to build
def test_bad_members_are_one_line_errors(members, tmp_path, capsys):
    tmp, store, runs, evals = members
    e0, e1 = map(_path, evals)

    def one_line_error(argv, match):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err

    out = str(tmp_path / "ens")
    one_line_error(["ensemble", str(e0), "--out", out], "at least two evaluated runs")
    one_line_error(
        ["ensemble", str(e0), str(e1), "--out", out, "--method", "median"], "unknown ensemble method 'median'"
    )
    one_line_error(["ensemble", str(e0), str(runs[0]), "--out", out], "the same checkpoint is named twice")
    unevaluated = tmp_path / "fresh"
    shutil.copytree(runs[0], unevaluated, ignore=shutil.ignore_patterns("eval-*"))
    one_line_error(["ensemble", str(e0), str(unevaluated), "--out", out], "not evaluated on 'test'")
    one_line_error(["ensemble", str(e0), str(tmp_path / "nowhere"), "--out", out], "no such run or evaluation folder")

    # other label names (another vocabulary): last finding renamed in metrics and predictions
    other = tmp_path / "other-vocab"
    shutil.copytree(e1, other)
    m = json.loads((other / "metrics.json").read_text())
    m["label_names"][-1] = "Fibroid"
    for key, value in list(m.items()):  # every per-finding field names Fibroid too
        if isinstance(value, dict) and "Hernia" in value:
            m[key] = {("Fibroid" if n == "Hernia" else n): v for n, v in value.items()}
    (other / "metrics.json").write_text(json.dumps(m))
    for f in ("predictions.parquet", "val_predictions.parquet"):
        t = pq.read_table(other / f)
        pq.write_table(t.rename_columns([c.replace("Hernia", "Fibroid") for c in t.column_names]), other / f)
    one_line_error(["ensemble", str(e0), str(other), "--out", out], "other label names")
    with pytest.raises(CxrflowError, match="differ: Fibroid, Hernia"):
        build_ensemble([e0, other], tmp_path / "ens")

    # another store or split: other image ids
    moved = tmp_path / "other-store"
    shutil.copytree(e1, moved)
    t = pq.read_table(moved / "predictions.parquet")
    ids = [f"x{i}" for i in t.column("image_id").to_pylist()]
    pq.write_table(t.set_column(0, "image_id", __import__("pyarrow").array(ids)), moved / "predictions.parquet")
    one_line_error(["ensemble", str(e0), str(moved), "--out", out], "scored other test images")

    # an ensemble is not a member; an evaluation without calibration (older cxrflow) asks to re-evaluate
    ens = build_ensemble([e0, e1], tmp_path / "ens-ok", n_boot=10)["out"]
    one_line_error(["ensemble", str(e0), ens, "--out", out], "cannot be a member of another ensemble")
    # a member's or an ensemble's metrics.json of the wrong shape: one line naming the file and the field
    for text, field in (
        ("[]", "expected a JSON object"),
        (json.dumps({**json.loads((e1 / "metrics.json").read_text()), "mean_auc": "high"}), "'mean_auc'"),
    ):
        shaped = tmp_path / "shaped"
        shutil.rmtree(shaped, ignore_errors=True)
        shutil.copytree(e1, shaped)
        (shaped / "metrics.json").write_text(text)
        one_line_error(["ensemble", str(e0), str(shaped), "--out", out], field)
    broken = tmp_path / "ens-broken"
    shutil.copytree(ens, broken)
    image = tmp_path / "x.png"
    Image.new("L", (40, 40), 128).save(image)
    for members in ("x", [5], [{"run": 3}]):
        (broken / "metrics.json").write_text(
            json.dumps({**json.loads((_path(ens) / "metrics.json").read_text()), "members": members})
        )
        one_line_error(["predict", "--run", str(broken), str(image)], "'members' of an ensemble")
        one_line_error(["report", str(broken), "--out", str(tmp_path / "report")], "'members' of an ensemble")
    old = tmp_path / "old-eval"
    shutil.copytree(e1, old)
    (old / "val_predictions.parquet").unlink()
    one_line_error(["ensemble", str(e0), str(old), "--out", out], "--overwrite")

    # a member whose run was trained again since its evaluation: its numbers belong to another model
    retrained = tmp_path / "retrained"
    shutil.copytree(runs[1], retrained)
    (retrained / _path(e1).name / "metrics.json").write_text(
        json.dumps(
            {**json.loads((_path(e1) / "metrics.json").read_text()), "checkpoint_path": str(retrained / "unused.pt")}
        )
    )
    ckpt = retrained / f"{json.loads((_path(e1) / 'metrics.json').read_text())['checkpoint']}.pt"
    ckpt.write_bytes(ckpt.read_bytes() + b"retrained")
    one_line_error(["ensemble", str(e0), str(retrained), "--out", out], "changed since this evaluation")
    assert not (tmp_path / "ens").exists()


@pytest.mark.slow  # the module's two trained, evaluated runs take ~20 s to build
def test_an_ensemble_holds_its_output_lock_while_it_combines(members, tmp_path, monkeypatch):
    """A second ensemble on the same --out, even with --overwrite, stops naming the first while the
    first is still combining its members (not only while it renames its folder into place)."""
    import cxrflow.modelling.ensemble as ensemble

    _, _, runs, _ = members
    out = tmp_path / "ens"
    original, second = ensemble.check_members, []

    def check_members_while_a_second_ensemble_starts(loaded):
        if not second:
            second.append(True)
            with pytest.raises(CxrflowError, match="locked by cxrflow ensemble"):
                build_ensemble(runs, out, n_boot=10, overwrite=True)
        return original(loaded)

    monkeypatch.setattr(ensemble, "check_members", check_members_while_a_second_ensemble_starts)
    build_ensemble(runs, out, n_boot=10)
    assert second and (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]


@pytest.mark.slow  # the module's two trained, evaluated runs take ~20 s to build
def test_the_ensemble_keeps_its_members_demographics_only_baseline(members, stacked):
    """Same store, same test images: the members' baseline, its shortcuts judged against the ensemble's AUC."""
    from cxrflow.data.demographics import shortcut_findings

    _, _, _, evals = members
    member = json.loads((_path(evals[0]) / "metrics.json").read_text())["demographics_only"]
    m = json.loads((_path(stacked["out"]) / "metrics.json").read_text())
    demo = m["demographics_only"]
    assert (
        demo["auc"] == member["auc"] and demo["auc_low"] == member["auc_low"] and demo["from"] == str(_path(evals[0]))
    )
    assert demo["shortcut"] == shortcut_findings(m["label_names"], demo["auc"], demo["auc_low"], m["auc"])
    # the synthetic store's demographics are drawn apart from its labels: nothing is a shortcut there
    assert demo["shortcut"] == [] and all(abs(a - 0.5) < 0.25 for a in demo["auc"].values() if a is not None)


@pytest.mark.slow
def test_cxrflow_ensemble_audits_the_ensemble_like_an_evaluation(members, tmp_path, capsys):
    from cxrflow.metrics import binary_auc
    from cxrflow.results.audit import read_csv

    _, _, runs, _ = members
    out = tmp_path / "ens"
    assert main(["ensemble", *map(str, runs), "--out", str(out), "--n-boot", "20", "--audit-fpr", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "subgroup audit (sex, age, view, sex x age): " in printed
    metrics = json.loads((out / "metrics.json").read_text())
    audit = metrics["audit"]
    assert audit["underdiagnosis"]["global_fpr"] == 0.1 and audit["bootstrap"]["n_boot"] == 20
    assert metrics["synthetic"] and {f["file"] for f in audit["figures"]} >= {"subgroups-sex.png", "subgroups-age.png"}
    # the ensemble's predictions carry each image's attributes, and the audit recomputes from them
    pred = _frame(out)
    assert {"age", "sex", "view"} <= set(pred.columns)
    rows = read_csv(out / "subgroups.csv")
    name = metrics["label_names"][0]
    for group in ("F", "M"):
        mine = pred[pred["sex"].str.upper().str[0] == group]
        row = next(r for r in rows if r["finding"] == name and r["attribute"] == "sex" and r["group"] == group)
        assert row["n_images"] == len(mine)
        assert row["auc"] == pytest.approx(
            binary_auc(mine[f"label_{name}"].to_numpy(), mine[f"prob_{name}"].to_numpy()), abs=1e-5
        )
    from cxrflow.results.report import write_report

    page = open(write_report([out], tmp_path / "report", cases=0)["report_html"]).read()
    assert "Who the model fails: subgroup audit (synthetic data)" in page and "subgroups-sex.png" in page
    assert main(["ensemble", *map(str, runs), "--out", str(tmp_path / "plain"), "--n-boot", "5", "--no-audit"]) == 0
    assert "subgroup audit: skipped (--no-audit)" in capsys.readouterr().out
    assert not (tmp_path / "plain" / "subgroups.csv").exists()
