"""Who the model fails: a subgroup audit of one evaluation (``subgroups.csv``, ``metrics.json["audit"]``).

Attributes come from the store's own columns, per evaluated image: sex, age band at the image
(0-20, 20-40, 40-60, 60-80, 80+: the bins of Seyyed-Kalantari et al. 2021), view (PA, AP, other)
and the sex x age-band intersections. An attribute the collection does not give at all (MIMIC-CXR
has no age) is skipped and the audit says so; images whose value is unknown form a group ``unknown``.

Per finding and group: images, positives, AUC with a 95% percentile interval from the evaluation's
own patient bootstrap (the same resamples, :func:`cxrflow.resample.patient_resamples`),
sensitivity (TPR) and FPR at the evaluation's operating threshold, and the gap: the group's AUC
minus the AUC of every other image of the split, with an interval of that difference over the same
resamples. Many groups times many findings are many tests (about 280 for 14 findings), and at 95%
each a model without any gap would show a dozen. So the gap intervals are simultaneous: with m
eligible (finding, group) pairs, each gap interval is the bootstrap estimate plus or minus
``z(1 - 0.05 / 2m)`` bootstrap standard errors (Bonferroni; about 3.7 standard errors for m = 280;
the standard error of a group whose AUC lies further from 0.5 than the rest's is first widened to
what it would be without a gap, :func:`null_se`, since an AUC near 1 varies less),
so that a model without any gap shows one flag or more in at most 5% of evaluations. A gap is
flagged exactly when that interval excludes 0 and the group has at least :data:`MIN_COUNT`
positives and negatives; smaller groups are reported, marked ``too_small``, and never flagged.

Per group, the underdiagnosis rate (Seyyed-Kalantari et al. 2021): among images with at least one
finding, the fraction the model calls "no finding" (every probability below its operating
threshold), and the same at one global threshold set at a false-positive rate of ``fpr`` (0.2,
Glocker et al. 2023) on the whole split: an image is called abnormal when its highest probability
reaches the threshold. These are the ``any`` rows of ``subgroups.csv``.

Group and rest AUCs (point estimates and every resample) come from one compiled pass per finding and
resample over the images in score order (:mod:`cxrflow.auditkernel`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from cxrflow import csvsafe
from cxrflow.metrics import binary_auc

#: The CSV's leading columns, in this order (more follow them).
COLUMNS = ("finding", "attribute", "group", "n_images", "n_positive", "auc", "auc_low", "auc_high",
           "tpr", "fpr", "gap", "gap_low", "gap_high", "flagged")  # fmt: skip
EXTRA_COLUMNS = ("n_negative", "rest_auc", "gap_p", "gap_level", "too_small", "threshold", "underdiagnosis",
                 "underdiagnosis_low", "underdiagnosis_high", "underdiagnosis_global", "underdiagnosis_global_low",
                 "underdiagnosis_global_high")  # fmt: skip
CSV_NAME = "subgroups.csv"
#: Finding name of the underdiagnosis rows.
ANY = "any"
UNKNOWN = "unknown"
#: Seyyed-Kalantari's age bins (years at the image): [low, high) and the last one open.
AGE_BANDS = ((0, 20, "0-20"), (20, 40, "20-40"), (40, 60, "40-60"), (60, 80, "60-80"), (80, math.inf, "80+"))
SEXES = ("F", "M")
VIEWS = ("PA", "AP", "other")
ATTRIBUTES = ("sex", "age", "view", "sex x age")
#: A gap is judged only where the group has at least this many positives and this many negatives.
MIN_COUNT = 10
#: Chance that a model without any gap shows a flag (family-wise, over every eligible test of an evaluation).
FWER = 0.05


@dataclass(frozen=True)
class Attribute:
    """One attribute: its name, the group index of every image and the groups' names."""

    name: str
    codes: np.ndarray
    groups: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# attributes


def _sex_names(sex: Sequence[Any]) -> np.ndarray:
    upper = np.array([str(s).strip().upper() if s is not None else "" for s in sex], dtype=object)
    return np.where(np.isin(upper, ["F", "FEMALE"]), "F", np.where(np.isin(upper, ["M", "MALE"]), "M", UNKNOWN))


def _age_names(age: Sequence[Any]) -> np.ndarray:
    from cxrflow.data.demographics import AGE_RANGE

    years = np.array([np.nan if a is None else float(a) for a in age], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        known = (years >= AGE_RANGE[0]) & (years <= AGE_RANGE[1])
    out = np.full(years.shape, UNKNOWN, dtype=object)
    for low, high, name in AGE_BANDS:
        with np.errstate(invalid="ignore"):
            out[known & (years >= low) & (years < high)] = name
    return out


def _view_names(view: Sequence[Any]) -> np.ndarray:
    upper = np.array([str(v).strip().upper() if v is not None else "" for v in view], dtype=object)
    return np.where(np.isin(upper, ["PA", "AP"]), upper, np.where(upper == "", UNKNOWN, "other"))


def _attribute(name: str, values: np.ndarray, order: Sequence[str]) -> Attribute:
    present = set(values.tolist())
    groups = tuple(g for g in order if g in present) + tuple(sorted(present - set(order)))
    index = {g: i for i, g in enumerate(groups)}
    return Attribute(name, np.array([index[v] for v in values], dtype=np.int64), groups)


def make_attributes(
    age: Sequence[Any], sex: Sequence[Any], view: Sequence[Any]
) -> tuple[list[Attribute], dict[str, str]]:
    """The audit's attributes of N images from the store's raw ``age``, ``sex`` and ``view``, and
    the ones skipped with the reason (the collection gives no value for any image)."""
    sexes, ages, views = _sex_names(sex), _age_names(age), _view_names(view)
    attributes, skipped = [], {}
    known = {}
    for name, values, order in (("sex", sexes, (*SEXES, UNKNOWN)),
                                ("age", ages, (*(b[2] for b in AGE_BANDS), UNKNOWN)),
                                ("view", views, (*VIEWS, UNKNOWN))):  # fmt: skip
        if values.size and (values == UNKNOWN).all():
            skipped[name] = f"the collection gives no {name} for these images"
            continue
        known[name] = values
        attributes.append(_attribute(name, values, order))
    if "sex" in known and "age" in known:
        both = np.array([f"{s} {a}" for s, a in zip(known["sex"], known["age"])], dtype=object)
        order = [f"{s} {a}" for s in (*SEXES, UNKNOWN) for a in (*(b[2] for b in AGE_BANDS), UNKNOWN)]
        attributes.append(_attribute("sex x age", both, order))
    else:
        skipped["sex x age"] = "needs both sex and age"
    return attributes, skipped


# --------------------------------------------------------------------------------------------------
# group and rest AUCs under resamples


@dataclass(frozen=True)
class FindingPlan:
    """One finding's images (known label) in score order, their tie blocks and group columns."""

    patient: np.ndarray  # patient index of each image, in score order
    positive: np.ndarray  # bool
    block_starts: np.ndarray  # first image of each tie block, then n
    columns: np.ndarray  # [attributes, n]: the image's group column under each attribute

    @classmethod
    def build(cls, y, s, images, patient_of_image, attributes: list[Attribute]) -> FindingPlan:
        order = images[np.argsort(s[images], kind="mergesort")]
        s_o = s[order]
        starts = np.flatnonzero(np.r_[True, s_o[1:] != s_o[:-1]]) if order.size else np.zeros(0, np.int64)
        offsets = np.cumsum([0, *(len(a.groups) for a in attributes)])[:-1]
        columns = np.array([a.codes[order] + off for a, off in zip(attributes, offsets)], dtype=np.int64)
        return cls(patient_of_image[order].astype(np.int64), y[order].astype(np.bool_),
                   np.r_[starts, order.size].astype(np.int64), columns.reshape(len(attributes), order.size))  # fmt: skip


def group_and_rest_aucs(plan: FindingPlan, counts: np.ndarray, n_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(AUC of each group, AUC of everything else), ``float64[b, G]``, under each row of patient
    draws ``counts[b, P]`` (all ones: the split itself). NaN where one class is missing."""
    from cxrflow import auditkernel

    return auditkernel.group_and_rest_aucs(np.ascontiguousarray(counts, dtype=np.int64), plan.patient, plan.positive,
                                           plan.block_starts, plan.columns, n_columns)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the audit


def _rates(y: np.ndarray, called: np.ndarray) -> tuple[float, float]:
    """(TPR, FPR) of the calls; NaN where the group has no positives (negatives)."""
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = float((called & y).sum() / n_pos) if n_pos else math.nan
    fpr = float((called & ~y).sum() / n_neg) if n_neg else math.nan
    return tpr, fpr


def _percentile(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _bootstrap_groups(labels, probs, known, patient_ids, attributes, n_boot, seed, extra_columns):
    """Point and resampled group and rest AUCs per finding (``[K, G]``, ``[K, n_boot, G]`` each), and
    the resampled sums of ``extra_columns`` (``[N, C]``, summed with image weights: ``[n_boot, C]``)."""
    from cxrflow.resample import patient_resamples

    k = labels.shape[1]
    patient_of_image, chunks = patient_resamples(patient_ids, n_boot, seed)
    n_patients = int(patient_of_image.max()) + 1 if patient_of_image.size else 0
    plans = [FindingPlan.build(labels[:, j], probs[:, j], np.flatnonzero(known[:, j]), patient_of_image, attributes)
             for j in range(k)]  # fmt: skip
    g_total = sum(len(a.groups) for a in attributes)
    ones = np.ones((1, n_patients), np.int64)
    point = [group_and_rest_aucs(plan, ones, g_total) for plan in plans]
    group = np.full((k, n_boot, g_total), np.nan)
    rest = np.full((k, n_boot, g_total), np.nan)
    sums = np.zeros((n_boot, extra_columns.shape[1]))
    for start, counts in chunks:
        rows = slice(start, start + counts.shape[0])
        sums[rows] = counts[:, patient_of_image].astype(np.float64) @ extra_columns
        for j, plan in enumerate(plans):
            group[j, rows], rest[j, rows] = group_and_rest_aucs(plan, counts, g_total)
    return np.array([p[0][0] for p in point]), np.array([p[1][0] for p in point]), group, rest, sums


def global_threshold(abnormal: np.ndarray, top: np.ndarray, fpr: float) -> float:
    """The lowest threshold on the highest probability of an image at which at most ``fpr`` of the
    images without a finding are called abnormal (``top >= threshold``)."""
    normal = np.sort(top[~abnormal])[::-1]
    if normal.size == 0:
        return math.nan
    allowed = math.floor(fpr * normal.size + 1e-9)
    if allowed >= normal.size:
        return float(normal[-1])
    return float(np.nextafter(normal[allowed], np.inf))


def run_audit(
    labels: np.ndarray,
    probs: np.ndarray,
    patient_ids: np.ndarray,
    label_names: Sequence[str],
    attributes: list[Attribute],
    thresholds: Sequence[float],
    *,
    known: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    fpr: float = 0.2,
    skipped: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The audit of one split: ``{"rows": [one dict per finding, attribute and group], "summary": {...}}``.

    ``thresholds`` are the evaluation's operating thresholds (one per finding; NaN: none); ``known``
    ([N, K] 0/1) leaves unknown labels out of a finding's rows, as the evaluation does.
    """
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    known = np.ones(labels.shape, bool) if known is None else np.asarray(known).astype(bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    names = list(label_names)
    positive = labels & known
    abnormal = positive.any(axis=1)
    with np.errstate(invalid="ignore"):
        called = probs >= thresholds[None, :]  # NaN threshold: never called
    healthy_call_op = ~called.any(axis=1)
    top = probs.max(axis=1) if probs.size else np.zeros(len(probs))
    t_global = global_threshold(abnormal, top, fpr)
    healthy_call_global = top < t_global if not math.isnan(t_global) else np.zeros(len(top), bool)
    indicator = np.column_stack([a.codes == g for a in attributes for g in range(len(a.groups))]).astype(np.float64)
    extra = np.concatenate(
        [indicator * abnormal[:, None], indicator * (abnormal & healthy_call_op)[:, None],
         indicator * (abnormal & healthy_call_global)[:, None]], axis=1)  # fmt: skip
    group_pt, rest_pt, group_b, rest_b, sums = _bootstrap_groups(
        labels, probs, known, patient_ids, attributes, n_boot, seed, extra
    )
    rows = _finding_rows(labels, known, called, names, attributes, thresholds, (group_pt, rest_pt, group_b, rest_b))
    flag_gaps(rows)
    g = indicator.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ud_b, ud_global_b = sums[:, g : 2 * g] / sums[:, :g], sums[:, 2 * g :] / sums[:, :g]
    any_rows = _any_rows(abnormal, called, healthy_call_op, healthy_call_global, attributes, ud_b, ud_global_b)
    if math.isnan(t_global):  # no image without a finding: no global threshold, so no rate at it
        for r in any_rows:
            r.update(
                underdiagnosis_global=math.nan, underdiagnosis_global_low=math.nan, underdiagnosis_global_high=math.nan
            )
    rows += any_rows
    summary = summarize_audit(rows, attributes, skipped or {}, n_boot=n_boot, seed=seed, fpr=fpr, t_global=t_global,
                              achieved=float(np.mean(~healthy_call_global[~abnormal])) if (~abnormal).any() else None)  # fmt: skip
    summary["overall_auc"] = {
        n: _clean(binary_auc(labels[known[:, j], j], probs[known[:, j], j])) for j, n in enumerate(names)
    }
    return {"rows": rows, "summary": summary}


def _finding_rows(labels, known, called, names, attributes, thresholds, aucs) -> list[dict]:
    group_pt, rest_pt, group_b, rest_b = aucs
    rows = []
    for j, name in enumerate(names):
        col = 0
        for att in attributes:
            for gi, group in enumerate(att.groups):
                member = known[:, j] & (att.codes == gi)
                y = labels[member, j]
                auc, rest_auc = float(group_pt[j, col]), float(rest_pt[j, col])
                low, high = _percentile(group_b[j, :, col])
                gaps = group_b[j, :, col] - rest_b[j, :, col]
                gaps = gaps[np.isfinite(gaps)]
                tpr, fpr = _rates(y, called[member, j])
                n_pos = int(y.sum())
                rows.append({
                    "finding": name, "attribute": att.name, "group": group, "n_images": int(member.sum()),
                    "n_positive": n_pos, "auc": auc, "auc_low": low, "auc_high": high, "tpr": tpr, "fpr": fpr,
                    "gap": auc - rest_auc, "gap_low": math.nan, "gap_high": math.nan, "flagged": False,
                    "n_negative": int(member.sum()) - n_pos, "rest_auc": rest_auc,
                    "gap_se": null_se(float(gaps.std(ddof=1)) if gaps.size > 1 else math.nan, auc, rest_auc, n_pos,
                                      int(member.sum()) - n_pos),
                    "too_small": n_pos < MIN_COUNT or int(member.sum()) - n_pos < MIN_COUNT,
                    "threshold": float(thresholds[j]),
                })  # fmt: skip
                col += 1
    return rows


def hanley_mcneil_variance(auc: float, n_pos: int, n_neg: int) -> float:
    """Variance of an AUC estimated from ``n_pos`` positives and ``n_neg`` negatives (Hanley and McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    return (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)


def null_se(se: float, auc: float, rest_auc: float, n_pos: int, n_neg: int) -> float:
    """The gap's bootstrap standard error, widened where the group's AUC lies further from 0.5 than the
    rest's: an AUC near 1 varies less, so a group that is better by chance would otherwise look surely
    better. Scaled by the group's Hanley-McNeil standard error at the rest's AUC (no gap) over the one
    at its own; never narrowed."""
    if not (math.isfinite(se) and math.isfinite(auc) and math.isfinite(rest_auc)) or n_pos < 1 or n_neg < 1:
        return se
    own, null = hanley_mcneil_variance(auc, n_pos, n_neg), hanley_mcneil_variance(rest_auc, n_pos, n_neg)
    return se * math.sqrt(max(1.0, null / own)) if own > 0 else se


def flag_gaps(rows: list[dict], alpha: float = FWER) -> None:
    """Set every finding row's ``gap_p`` (two-sided, normal with the bootstrap standard error),
    ``gap_level``, ``gap_low``/``gap_high`` (the simultaneous interval, see the module doc) and
    ``flagged`` (eligible and its interval excludes 0)."""
    normal = NormalDist()
    for r in rows:
        se, gap = r.pop("gap_se"), r["gap"]
        ok = math.isfinite(se) and se > 0 and math.isfinite(gap)
        r["gap_p"] = 2.0 * (1.0 - normal.cdf(abs(gap) / se)) if ok else math.nan
        r["_se"] = se if ok else math.nan
    m = sum(1 for r in rows if not r["too_small"] and math.isfinite(r["gap_p"]))
    level = 1.0 - alpha / max(m, 1)
    z = normal.inv_cdf(1.0 - (1.0 - level) / 2.0)
    for r in rows:
        se = r.pop("_se")
        r["gap_level"] = level
        r["gap_low"], r["gap_high"] = r["gap"] - z * se, r["gap"] + z * se
        excludes = r["gap_low"] > 0 or r["gap_high"] < 0  # NaN compares False
        r["flagged"] = bool(excludes and not r["too_small"])


def _any_rows(abnormal, called, healthy_op, healthy_global, attributes, ud_b, ud_global_b) -> list[dict]:
    rows = []
    col = 0
    for att in attributes:
        for gi, group in enumerate(att.groups):
            member = att.codes == gi
            ill = abnormal[member]
            n_pos = int(ill.sum())
            tpr, fpr = _rates(ill, ~healthy_op[member])
            ud = float((healthy_op[member] & ill).sum() / n_pos) if n_pos else math.nan
            udg = float((healthy_global[member] & ill).sum() / n_pos) if n_pos else math.nan
            low, high = _percentile(ud_b[:, col])
            glow, ghigh = _percentile(ud_global_b[:, col])
            rows.append({
                "finding": ANY, "attribute": att.name, "group": group, "n_images": int(member.sum()), "n_positive": n_pos,
                "auc": math.nan, "auc_low": math.nan, "auc_high": math.nan, "tpr": tpr, "fpr": fpr, "gap": math.nan,
                "gap_low": math.nan, "gap_high": math.nan, "flagged": False, "n_negative": int(member.sum()) - n_pos,
                "too_small": n_pos < MIN_COUNT, "underdiagnosis": ud, "underdiagnosis_low": low,
                "underdiagnosis_high": high, "underdiagnosis_global": udg, "underdiagnosis_global_low": glow,
                "underdiagnosis_global_high": ghigh,
            })  # fmt: skip
            col += 1
    return rows


def _clean(x: Any) -> Any:
    """JSON-safe: NaN becomes None, numpy scalars become Python ones."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x


# --------------------------------------------------------------------------------------------------
# words, summary, file


_SEX_WORDS = {"F": "women", "M": "men", UNKNOWN: "patients of unknown sex"}


def group_words(attribute: str, group: str) -> str:
    """A group in plain words: "women", "patients aged 60-80", "AP views", "women aged 80+"."""
    if attribute == "sex":
        return _SEX_WORDS.get(group, group)
    if attribute == "age":
        return "patients of unknown age" if group == UNKNOWN else f"patients aged {group}"
    if attribute == "view":
        return "images of unknown view" if group == UNKNOWN else f"{group} views" if group != "other" else "other views"
    sex, _, age = group.partition(" ")
    who = {"F": "women", "M": "men"}.get(sex, "patients of unknown sex")
    return f"{who} of unknown age" if age == UNKNOWN else f"{who} aged {age}"


def gap_sentence(row: dict) -> str:
    """ "Effusion: AUC 0.71 in women vs 0.86 in the rest, gap -0.15 [-0.20, -0.10]"."""
    return (f"{row['finding']}: AUC {row['auc']:.2f} in {group_words(row['attribute'], row['group'])} vs "
            f"{row['rest_auc']:.2f} in the rest, gap {row['gap']:.2f} [{row['gap_low']:.2f}, {row['gap_high']:.2f}]")  # fmt: skip


def summarize_audit(rows, attributes, skipped, *, n_boot, seed, fpr, t_global, achieved) -> dict[str, Any]:
    """The audit's part of ``metrics.json``: attributes, how gaps are judged, the flagged gaps, underdiagnosis."""
    findings = [r for r in rows if r["finding"] != ANY]
    eligible = [r for r in findings if not r["too_small"] and math.isfinite(r.get("gap_p", math.nan))]
    flagged = sorted((r for r in findings if r["flagged"]), key=lambda r: r["gap"])
    level = findings[0]["gap_level"] if findings else 0.95
    return {
        "file": CSV_NAME,
        "attributes": {
            a.name: {"groups": list(a.groups), "images": {g: int((a.codes == i).sum()) for i, g in enumerate(a.groups)}}
            for a in attributes
        },
        "skipped": dict(skipped),
        "bootstrap": {
            "n_boot": int(n_boot),
            "seed": int(seed),
            "unit": "patient",
            "resamples": "the evaluation's own",
            "auc_interval": "percentile 95%",
        },
        "gaps": {
            "definition": "group AUC minus the AUC of every other image of the split",
            "rule": f"flagged when the interval excludes 0 and the group has at least {MIN_COUNT} positives and {MIN_COUNT} negatives",
            "interval": "simultaneous (Bonferroni over the tests): gap +- z(1 - fwer / 2 tests) bootstrap standard errors",
            "fwer": FWER,
            "tests": len(eligible),
            "flagged": len(flagged),
            "level": _clean(level),
        },
        "flagged": [
            {
                **{
                    k: _clean(r[k])
                    for k in ("finding", "attribute", "group", "auc", "rest_auc", "gap", "gap_low", "gap_high")
                },
                "text": gap_sentence(r),
            }
            for r in flagged
        ],
        "underdiagnosis": {
            "definition": "among images with at least one finding, the fraction called 'no finding'",
            "operating": "every probability below its finding's operating threshold",
            "global": f"highest probability below one threshold set at FPR {fpr:g} on the whole split",
            "global_fpr": float(fpr),
            "global_threshold": _clean(t_global),
            "achieved_fpr": _clean(achieved),
            "groups": [
                {
                    k: _clean(r[k])
                    for k in (
                        "attribute",
                        "group",
                        "n_images",
                        "n_positive",
                        "underdiagnosis",
                        "underdiagnosis_low",
                        "underdiagnosis_high",
                        "underdiagnosis_global",
                        "underdiagnosis_global_low",
                        "underdiagnosis_global_high",
                        "too_small",
                    )
                }
                for r in rows
                if r["finding"] == ANY
            ],
        },
    }


def csv_text(rows: list[dict]) -> str:
    """``subgroups.csv``: :data:`COLUMNS` first, then :data:`EXTRA_COLUMNS`; empty cells for NaN."""
    out = io.StringIO()
    writer = csvsafe.writer(out, lineterminator="\n")
    header = [*COLUMNS, *EXTRA_COLUMNS]
    writer.writerow(header)

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, (bool, np.bool_)):
            return "true" if v else "false"
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    for r in rows:
        writer.writerow([cell(r.get(c)) for c in header])
    return out.getvalue()


def read_csv(path) -> list[dict[str, Any]]:
    """``subgroups.csv`` back as dicts of numbers, booleans and strings (empty cells: NaN)."""
    text_columns = {"finding", "attribute", "group"}
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if k in text_columns:
                    row[k] = v
                elif v in ("true", "false"):
                    row[k] = v == "true"
                else:
                    row[k] = math.nan if v == "" else float(v)
            rows.append(row)
    return rows
