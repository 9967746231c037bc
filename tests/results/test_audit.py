"""The subgroup audit: hand-computed small cases, the compiled pass against materialised resamples,
a collection where one finding is fainter for women, null data, and the CSV's shape."""

import math

import numpy as np
import pytest

from cxrflow.metrics import _weighted_auc, binary_auc, bootstrap_aucs
from cxrflow.resample import patient_resamples
from cxrflow.results.audit import (
    ANY,
    COLUMNS,
    FindingPlan,
    csv_text,
    gap_sentence,
    global_threshold,
    group_and_rest_aucs,
    make_attributes,
    read_csv,
    run_audit,
)


def _rows(result, finding, attribute):
    return {r["group"]: r for r in result["rows"] if r["finding"] == finding and r["attribute"] == attribute}


def test_hand_computed_group_and_rest_auc():
    # women: pos 0.9, 0.4; neg 0.5, 0.1 -> pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    # men:   pos 0.8; neg 0.2, 0.8 (tie) -> (1 + 0.5) / 2 = 0.75 ... with a third negative 0.95 -> 1.5/3 = 0.5
    probs = np.array([0.9, 0.4, 0.5, 0.1, 0.8, 0.2, 0.8, 0.95])[:, None]
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 0])[:, None]
    sex = ["F", "F", "F", "F", "M", "M", "M", "M"]
    attributes, _ = make_attributes([30] * 8, sex, ["PA"] * 8)
    result = run_audit(labels, probs, np.arange(8), ["Effusion"], attributes, [0.6], n_boot=50)
    rows = _rows(result, "Effusion", "sex")
    assert rows["F"]["auc"] == pytest.approx(0.75) and rows["M"]["auc"] == pytest.approx(0.5)
    assert rows["F"]["rest_auc"] == pytest.approx(0.5) and rows["F"]["gap"] == pytest.approx(0.25)
    # at threshold 0.6: women TPR 1/2, FPR 0/2; men TPR 1/1, FPR 2/3 (0.8 and 0.95 called)
    assert (rows["F"]["tpr"], rows["F"]["fpr"]) == (0.5, 0.0)
    assert rows["M"]["tpr"] == 1.0 and rows["M"]["fpr"] == pytest.approx(2 / 3)
    assert rows["F"]["too_small"] and not rows["F"]["flagged"]  # 2 positives: reported, never flagged
    assert rows["F"]["n_images"] == 4 and rows["F"]["n_positive"] == 2
    # one age band and one view: every image in one group, whose rest is empty (no AUC, no gap)
    age = _rows(result, "Effusion", "age")["20-40"]
    assert age["auc"] == pytest.approx(binary_auc(labels[:, 0], probs[:, 0])) and math.isnan(age["gap"])


def test_group_and_rest_aucs_equal_those_of_materialised_resamples():
    rng = np.random.default_rng(3)
    n = 120
    y = rng.random(n) < 0.35
    s = rng.random(n).round(1)  # many ties, also across groups
    attributes, _ = make_attributes(
        rng.integers(-1, 99, n), rng.choice(["M", "F", "U"], n), rng.choice(["PA", "AP", "LL", ""], n)
    )
    images = np.flatnonzero(rng.random(n) < 0.85)  # the others have an unknown label
    plan = FindingPlan.build(y, s, images, np.arange(n), attributes)
    counts = rng.integers(0, 3, (3, n))
    columns = sum(len(a.groups) for a in attributes)
    group, rest = group_and_rest_aucs(plan, counts, columns)
    col = 0
    for att in attributes:
        for g in range(len(att.groups)):
            for b in range(3):
                copies = np.repeat(images, counts[b, images])
                inside = copies[att.codes[copies] == g]
                outside = copies[att.codes[copies] != g]
                for got, chosen in ((group[b, col], inside), (rest[b, col], outside)):
                    want = binary_auc(y[chosen], s[chosen]) if chosen.size else math.nan
                    assert got == pytest.approx(want, abs=1e-12, nan_ok=True)
            col += 1


def test_audit_uses_the_evaluations_own_resamples():
    rng = np.random.default_rng(0)
    n, patients = 200, 60
    pid = rng.integers(0, patients, n)
    y = rng.random((n, 1)) < 0.3
    s = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, (n, 1)), 0, 1)
    evaluation = bootstrap_aucs(y, s, pid, n_boot=40, seed=7)[:, 0]
    attributes, _ = make_attributes(np.full(n, 50), np.where(rng.random(n) < 0.5, "F", "M"), ["PA"] * n)
    # the group holding every image (one age band) is the whole split: its resampled AUCs are the evaluation's
    patient_of_image, chunks = patient_resamples(pid, 40, 7)
    plan = FindingPlan.build(y[:, 0], s[:, 0], np.arange(n), patient_of_image, attributes)
    columns = sum(len(a.groups) for a in attributes)
    assert [a.name for a in attributes] == ["sex", "age", "view", "sex x age"]
    resampled = [group_and_rest_aucs(plan, counts, columns)[0] for _, counts in chunks]
    age_column = len(attributes[0].groups)
    np.testing.assert_allclose(np.concatenate(resampled)[:, age_column], evaluation, atol=1e-12)
    # and a group's AUC is the evaluation's weighted AUC with the other images weighted 0
    women = attributes[0].codes == attributes[0].groups.index("F")
    _, chunks = patient_resamples(pid, 40, 7)
    _, counts = next(chunks)
    w = counts[:, patient_of_image].astype(float) * women
    col = attributes[0].groups.index("F")
    got = group_and_rest_aucs(plan, counts, columns)[0][:, col]
    np.testing.assert_allclose(got, _weighted_auc(y[:, 0], s[:, 0], w), atol=1e-12)


def test_attributes_bins_unknowns_and_skips():
    attributes, skipped = make_attributes([0, 19, 20, 79, 80, 130, -1], ["F", "Male", "m", "U", None, "female", "F"],
                                          ["PA", "ap", "LATERAL", "", None, "AP", "PA"])  # fmt: skip
    by = {a.name: [a.groups[c] for c in a.codes] for a in attributes}
    assert by["age"] == ["unknown", "0-20", "20-40", "60-80", "80+", "unknown", "unknown"]  # 0 and 130: unknown ages
    assert by["sex"] == ["F", "M", "M", "unknown", "unknown", "F", "F"]
    assert by["view"] == ["PA", "AP", "other", "unknown", "unknown", "AP", "PA"]
    assert by["sex x age"][1] == "M 0-20" and by["sex x age"][0] == "F unknown"
    assert skipped == {}
    # a collection without any age (MIMIC-CXR): the attribute and the intersections are skipped, and said so
    attributes, skipped = make_attributes([-1, -1], ["F", "M"], ["PA", "AP"])
    assert [a.name for a in attributes] == ["sex", "view"]
    assert "age" in skipped["age"] and "sex x age" in skipped


def test_underdiagnosis_hand_computed():
    # 6 images, 2 findings (thresholds 0.5 and 0.7); abnormal images 0-3, normal 4-5
    labels = np.array([[1, 0], [0, 1], [1, 1], [1, 0], [0, 0], [0, 0]])
    probs = np.array([[0.6, 0.1], [0.2, 0.3], [0.1, 0.6], [0.4, 0.9], [0.55, 0.1], [0.1, 0.2]])
    sex = ["F", "F", "M", "M", "F", "M"]
    attributes, _ = make_attributes([30] * 6, sex, ["PA"] * 6)
    result = run_audit(labels, probs, np.arange(6), ["A", "B"], attributes, [0.5, 0.7], n_boot=20, fpr=0.5)
    rows = _rows(result, ANY, "sex")
    # women: image 0 called (0.6 >= 0.5), image 1 not (0.2, 0.3): 1 of 2 underdiagnosed
    # men: image 2 not called (0.1, 0.6 < 0.7), image 3 called (0.9): 1 of 2
    assert rows["F"]["underdiagnosis"] == 0.5 and rows["M"]["underdiagnosis"] == 0.5
    assert rows["F"]["n_positive"] == 2 and rows["F"]["fpr"] == 1.0 and rows["M"]["fpr"] == 0.0
    # global threshold at FPR 0.5 over the highest probabilities of the normal images (0.55, 0.2): above 0.2
    t = result["summary"]["underdiagnosis"]["global_threshold"]
    assert 0.2 < t <= 0.21 and result["summary"]["underdiagnosis"]["achieved_fpr"] == 0.5
    # highest probabilities of the abnormal images: women 0.6, 0.3 -> 1 of 2 below t? 0.3 >= t, so 0 of 2
    assert rows["F"]["underdiagnosis_global"] == 0.0 and rows["M"]["underdiagnosis_global"] == 0.0
    assert math.isnan(rows["F"]["auc"]) and not rows["F"]["flagged"]


def test_global_threshold_never_exceeds_the_rate():
    top = np.array([0.1, 0.2, 0.2, 0.3, 0.9])
    abnormal = np.zeros(5, bool)
    for fpr in (0.2, 0.4, 0.5, 0.99):
        t = global_threshold(abnormal, top, fpr)
        assert np.mean(top >= t) <= fpr + 1e-12
    assert np.mean(top >= global_threshold(abnormal, top, 0.2)) == 0.2


def _study(seed, *, faint=None, n_patients=1500, per_patient=4, k=4):
    """Labels and scores of a model that separates every finding equally well, except ``faint``
    (a finding index) whose positives stand out less for women."""
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    pid = np.repeat(np.arange(n_patients), per_patient)
    sex = np.where(rng.random(n_patients) < 0.5, "F", "M")[pid]
    age = rng.integers(5, 92, n_patients)[pid] + np.tile(np.arange(per_patient), n_patients)  # a year per follow-up
    view = np.where(rng.random(n) < 0.6, "PA", "AP")
    labels = rng.random((n, k)) < 0.12
    strength = np.full((n, k), 1.6)
    if faint is not None:
        strength[sex == "F", faint] = 0.6
    scores = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + strength * labels - 2)))
    return labels, scores.astype(np.float32).astype(np.float64), pid, age, sex, view


def test_a_finding_fainter_for_women_is_flagged_in_women_with_the_right_sign():
    labels, probs, pid, age, sex, view = _study(0, faint=2)
    attributes, skipped = make_attributes(age, sex, view)
    names = ["Atelectasis", "Cardiomegaly", "Effusion", "Mass"]
    result = run_audit(labels, probs, pid, names, attributes, [0.3] * 4, n_boot=300, skipped=skipped)
    women = _rows(result, "Effusion", "sex")["F"]
    assert women["flagged"] and women["gap"] < 0 and women["gap_high"] < 0
    assert women["auc"] == pytest.approx(binary_auc(labels[sex == "F", 2], probs[sex == "F", 2]))
    assert women["rest_auc"] == pytest.approx(binary_auc(labels[sex != "F", 2], probs[sex != "F", 2]))
    flagged = [r for r in result["rows"] if r["flagged"]]
    # every flag is about Effusion and the sexes (the mirror image: men better than the rest), never elsewhere
    assert {r["finding"] for r in flagged} == {"Effusion"}
    assert all(r["attribute"] in ("sex", "sex x age") for r in flagged)
    assert all((r["gap"] < 0) == r["group"].startswith("F") for r in flagged)
    summary = result["summary"]
    assert summary["flagged"][0]["finding"] == "Effusion" and summary["flagged"][0]["gap"] < 0
    assert summary["flagged"][0]["text"].startswith("Effusion: AUC ")
    assert "in women vs" in gap_sentence(women) or "in women aged" in summary["flagged"][0]["text"]


@pytest.mark.slow
def test_null_data_flags_almost_nothing():
    """Five studies without any gap, about 80 eligible tests each: the simultaneous intervals keep
    the studies with any flag to about 5% (here at most one of the five, with at most two flags)."""
    flags_per_study = []
    for seed in range(1, 6):
        labels, probs, pid, age, sex, view = _study(seed)
        attributes, skipped = make_attributes(age, sex, view)
        result = run_audit(labels, probs, pid, list("ABCD"), attributes, [0.3] * 4, n_boot=200, skipped=skipped)
        flags_per_study.append(sum(r["flagged"] for r in result["rows"]))
        assert result["summary"]["gaps"]["tests"] > 60
    assert sum(f > 0 for f in flags_per_study) <= 1 and sum(flags_per_study) <= 2, flags_per_study


def test_flagged_exactly_when_the_interval_excludes_zero_and_the_group_is_large_enough():
    labels, probs, pid, age, sex, view = _study(0, faint=1)
    attributes, skipped = make_attributes(age, sex, view)
    result = run_audit(labels, probs, pid, list("ABCD"), attributes, [0.3] * 4, n_boot=200, skipped=skipped)
    for r in result["rows"]:
        if r["finding"] == ANY:
            continue
        excludes = r["gap_low"] > 0 or r["gap_high"] < 0
        assert r["flagged"] == (excludes and r["n_positive"] >= 10 and r["n_negative"] >= 10)
        assert r["too_small"] == (r["n_positive"] < 10 or r["n_negative"] < 10)


def test_csv_has_the_columns_first_and_reads_back(tmp_path):
    labels, probs, pid, age, sex, view = _study(0, n_patients=200)
    attributes, _ = make_attributes(age, sex, view)
    result = run_audit(labels, probs, pid, list("ABCD"), attributes, [0.3] * 4, n_boot=30)
    path = tmp_path / "subgroups.csv"
    path.write_text(csv_text(result["rows"]))
    header = path.read_text().splitlines()[0].split(",")
    assert tuple(header[: len(COLUMNS)]) == COLUMNS
    back = read_csv(path)
    assert len(back) == len(result["rows"])
    assert {r["finding"] for r in back} == {"A", "B", "C", "D", ANY}
    first = back[0]
    assert first["auc"] == pytest.approx(result["rows"][0]["auc"], abs=1e-5) and isinstance(first["flagged"], bool)
