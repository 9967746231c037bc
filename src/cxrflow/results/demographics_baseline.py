"""Demographics alone, in every evaluation: how far age, sex and view get without the image.

``cxrflow evaluate`` fits, per finding, a logistic regression on age, sex and view (standardised,
with known-flags for unknown values; :func:`cxrflow.modelling.fusion.fit_logistic`, the fit a fused
model starts from) on the run's training split only, scores it on the evaluated split's images
and reports its AUC with the evaluation's own patient-bootstrap interval, as ``metrics.json``'s
``demographics_only``. A finding is a *shortcut* when demographics alone clearly predict it (the
interval's lower bound is above ``SHORTCUT_FLOOR``) and nearly as well as the model does (AUC
at least the model's minus ``SHORTCUT_MARGIN``; :func:`cxrflow.data.demographics.shortcut_findings`): much of what a model can learn there is who
the patient is, not what the image shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cxrflow.data.demographics import FIELDS, SHORTCUT_FLOOR, SHORTCUT_MARGIN, SHORTCUT_RULE, shortcut_findings
from cxrflow.names import printable

__all__ = ["SHORTCUT_FLOOR", "SHORTCUT_MARGIN", "SHORTCUT_RULE", "demographics_only", "shortcut_findings"]


def _skipped(reason: str) -> dict[str, Any]:
    return {"skipped": reason, "auc": {}, "auc_low": {}, "auc_high": {}, "shortcut": [], "rule": SHORTCUT_RULE}


def _aligned(rows: dict[str, np.ndarray], image_ids: Sequence[str], split: str) -> np.ndarray:
    """``rows["demographics"]`` in the order of ``image_ids`` (the evaluation's)."""
    where = {str(i): k for k, i in enumerate(rows["image_id"])}
    missing = [i for i in image_ids if str(i) not in where]
    if missing:
        raise ValueError(f"{len(missing)} evaluated images are not in the store's {split} split (first {missing[0]})")
    return rows["demographics"][[where[str(i)] for i in image_ids]]


def demographics_only(
    store: str | os.PathLike,
    size: int,
    split: str,
    label_names: Sequence[str],
    evaluated: dict[str, Any],
    model_auc: dict[str, float | None],
    *,
    interval: Callable[..., dict[str, Any]],
    uncertain: str = "ignore",
    known: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``demographics_only`` object of ``metrics.json`` for one evaluation.

    ``evaluated``: the evaluation's scored split (``image_id``, ``patient_id``, ``labels``,
    ``known``); ``interval``: the evaluation's bootstrap (``bootstrap_auc_ci``), called with the
    same patients, resamples and seed; ``known``: whether the store has label states.
    """
    from cxrflow.data.store import split_dir
    from cxrflow.metrics import per_class_auc
    from cxrflow.modelling.fusion import fit_logistic, logistic_scores, read_split_demographics

    names = list(label_names)
    if not any(split_dir(store, size, "train").glob("*.parquet")):
        return _skipped(f"the store has no training split at size {size} to fit it on")
    train = read_split_demographics(store, size, "train", names, uncertain)
    fit = fit_logistic(train["demographics"], train["labels"], train["known"], seed=seed)
    used = [f for f in FIELDS if f not in fit["missing"]]
    if not used:
        return _skipped("the store has no age, sex or view for the training split: no demographics-only baseline")
    if len(evaluated["image_id"]) == 0:
        return _skipped(f"the {split} split is empty")
    demo = _aligned(read_split_demographics(store, size, split, names, uncertain), evaluated["image_id"], split)
    scores = logistic_scores(fit, demo)
    labels, mask = np.asarray(evaluated["labels"]), (np.asarray(evaluated["known"]) if known else None)
    aucs = per_class_auc(labels, scores, mask)
    ci = interval(labels, scores, np.asarray(evaluated["patient_id"]), n_boot=n_boot, seed=seed, known=mask)

    def num(x: Any) -> float | None:
        return None if x is None or not np.isfinite(x) else float(x)

    auc = {n: num(a) for n, a in zip(names, aucs)}
    low = {n: (None if c is None else float(c[0])) for n, c in zip(names, ci["auc_ci"])}
    high = {n: (None if c is None else float(c[1])) for n, c in zip(names, ci["auc_ci"])}
    left_out = [f for f in FIELDS if f in fit["missing"]]
    return {
        "auc": auc,
        "auc_low": low,
        "auc_high": high,
        "shortcut": shortcut_findings(names, auc, low, model_auc),
        "rule": SHORTCUT_RULE,
        "fields": used,
        "left_out": left_out,
        **(
            {"note": f"the store has no {', '.join(left_out)}: left out of the demographics-only baseline"}
            if left_out
            else {}
        ),
        "fitted_on": {"split": "train", "images": len(train["labels"])},
        "model": "per finding, logistic regression (scikit-learn, L2, C=1) on standardised age, sex, view and "
        "their known-flags",
    }


def _fields_text(fields: Sequence[str]) -> str:
    fields = list(fields) or list(FIELDS)
    return fields[0] if len(fields) == 1 else ", ".join(fields[:-1]) + " and " + fields[-1]


def shortcut_sentences(metrics: dict[str, Any]) -> list[str]:
    """One plain sentence per shortcut finding of an evaluation's ``metrics.json``."""
    demo = metrics.get("demographics_only") or {}
    out = []
    for n in demo.get("shortcut") or []:
        a, lo, hi = (demo.get(k, {}).get(n) for k in ("auc", "auc_low", "auc_high"))
        model = (metrics.get("auc") or {}).get(n)
        if a is None or lo is None or hi is None:
            continue
        out.append(
            f"{n}: {_fields_text(demo.get('fields') or FIELDS)} alone give AUC {a:.2f} [{lo:.2f}, {hi:.2f}], the model "
            f"{'n/a' if model is None else f'{model:.2f}'}: much of what it could learn here is who the patient is"
        )
    return out


def format_lines(metrics: dict[str, Any]) -> list[str]:
    """Lines for the terminal summary of an evaluation."""
    demo = metrics.get("demographics_only")
    if not demo:
        return []
    if demo.get("skipped"):
        return [printable(f"demographics-only baseline skipped: {demo['skipped']}")]
    shown = ", ".join(f"{n} {a:.3f}" for n, a in demo["auc"].items() if a is not None)
    lines = [
        f"demographics-only AUC (logistic regression on {_fields_text(demo.get('fields'))}, fitted on train): {shown}"
    ]
    if demo.get("note"):
        lines.append(f"note: {demo['note']}")
    lines += [f"shortcut: {s}" for s in shortcut_sentences(metrics)]
    return [printable(line) for line in lines]  # finding names are data: never terminal controls


def fusion_comparison(evaluations: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Image-only, fused and demographics-alone AUC per finding, when the evaluations (``metrics`` dicts
    of one split and vocabulary) hold an image-only and a fused run; None otherwise. The first of each
    kind is compared; demographics alone comes from the image-only evaluation (else the fused one)."""
    plain = next((m for m in evaluations if (m.get("fusion") or "none") == "none" and "kind" not in m), None)
    if plain is None:
        return None
    fused = next(
        (
            m
            for m in evaluations
            if m.get("fusion") == "demographics"
            and m.get("split") == plain.get("split")
            and m.get("label_names") == plain.get("label_names")
        ),
        None,
    )
    if fused is None:
        return None
    demo = next((d for d in (plain.get("demographics_only"), fused.get("demographics_only")) if d and d.get("auc")), {})
    rows = []
    for n in plain["label_names"]:
        i, f, d = plain["auc"].get(n), fused["auc"].get(n), (demo.get("auc") or {}).get(n)
        best = max((x for x in (i, d) if x is not None), default=None)
        rows.append(
            {
                "name": n,
                "image_only": i,
                "fused": f,
                "demographics_only": d,
                "margin": None if f is None or best is None else f - best,
            }
        )
    return {
        "split": plain.get("split"),
        "image_only_run": plain.get("run_name"),
        "fused_run": fused.get("run_name"),
        "rows": rows,
    }


def demographics_part(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """What an evaluation's section of the report shows about demographics alone (None: not computed)."""
    demo = metrics.get("demographics_only")
    if not demo:
        return None
    return {
        "skipped": demo.get("skipped"),
        "note": demo.get("note"),
        "shortcuts": shortcut_sentences(metrics),
        "fields": _fields_text(demo.get("fields") or FIELDS),
        "rule": demo.get("rule", SHORTCUT_RULE),
    }
