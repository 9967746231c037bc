"""The model card (``README.md``) that travels inside an exported model folder.

Written from what the run recorded, never typed by hand: the training store's manifest (collection,
sizes, rows per split and how they were split), the checkpoint's config, the evaluation's
``metrics.json`` (test AUC per finding with its 95% patient-bootstrap interval, operating thresholds,
calibration) and its subgroup audit where one exists, then the intended use and the limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _data_section(config: dict, manifest: dict | None) -> list[str]:
    lines = ["## Training data", ""]
    lines.append(f"- store: `{config.get('store', 'unknown')}`")
    if manifest is None:
        return lines + ["- the store's manifest was not readable at export time; splits unknown", ""]
    source = manifest.get("source")
    fmt = manifest.get("format") or (source.get("format") if isinstance(source, dict) else None)
    lines.append(f"- collection format: {fmt or 'not recorded'}")
    if isinstance(source, dict):
        lines.append("- source: " + ", ".join(f"{k} {v}" for k, v in source.items() if not isinstance(v, (dict, list))))
    rows = (manifest.get("rows") or {}).get(str(config.get("size")), {})
    if rows:
        lines.append("- images per split at the model's size: " + ", ".join(f"{s} {n}" for s, n in rows.items()))
    split = manifest.get("split") or {}
    if isinstance(split, dict) and split:
        lines.append("- split: " + ", ".join(f"{k} {v}" for k, v in split.items() if not isinstance(v, (dict, list))))
    lines.append("- splits are by patient (no patient has images in two splits)")
    return lines + [""]


def _evaluation_section(metrics: dict | None, label_names: Sequence[str], calibrated: bool) -> list[str]:
    if metrics is None:
        return ["## Evaluation", "", "The run was not evaluated at this checkpoint: the probabilities are the raw",
                "sigmoid outputs and no operating thresholds are set (`positive_<finding>` is null).", ""]  # fmt: skip
    lo, hi = (metrics.get("mean_auc_ci95") or [None, None])[:2]
    lines = [
        "## Evaluation", "",
        (f"Split `{metrics.get('split')}`: {metrics.get('n_images')} images of {metrics.get('n_patients')} patients; "
         f"mean AUC {_fmt(metrics.get('mean_auc'))} (95% CI {_fmt(lo)}-{_fmt(hi)}, patient bootstrap)."), "",
        f"| finding | AUC | 95% CI | threshold ({'calibrated' if calibrated else 'raw'} scale) |", "| --- | ---: | --- | ---: |",
    ]  # fmt: skip
    auc, ci = metrics.get("auc") or {}, metrics.get("auc_ci95") or {}
    thresholds = (metrics.get("threshold_calibrated") if calibrated else metrics.get("threshold")) or {}
    for name in label_names:
        low, high = (ci.get(name) or [None, None])[:2]
        lines.append(f"| {name} | {_fmt(auc.get(name))} | {_fmt(low)}-{_fmt(high)} | {_fmt(thresholds.get(name))} |")
    return lines + [""]


def _audit_section(metrics: dict | None) -> list[str]:
    audit = (metrics or {}).get("audit")
    if not isinstance(audit, dict) or not audit:
        return ["## Subgroup audit", "", "No subgroup audit was recorded for this evaluation.", ""]
    lines = ["## Subgroup audit", ""]
    for key, value in audit.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            lines.append(f"- {key}: {value}")
        elif isinstance(value, list) and len(value) <= 20 and all(not isinstance(v, (dict, list)) for v in value):
            lines.append(f"- {key}: {', '.join(map(str, value)) or 'none'}")
        elif isinstance(value, list):
            lines.append(f"- {key}: {len(value)} entries (see the evaluation's `subgroups.csv`)")
    return lines + [""]


def model_card(
    *,
    run: str,
    checkpoint: str,
    config: dict,
    manifest: dict | None,
    metrics: dict | None,
    spec: dict,
    label_names: Sequence[str],
    fmt: str,
) -> str:
    """The Markdown model card of one exported model."""
    scale = (
        "calibrated (temperature scaling fitted on the validation split)" if spec.get("calibrated") else "raw sigmoid"
    )
    lines = [
        f"# cxrflow model: {config.get('model')} at {spec['size']} px", "",
        f"Exported from run `{run}`, checkpoint `{checkpoint}` (stage {config.get('stage', 'n/a')}), as {fmt}.", "",
        "## What it does", "",
        (f"Takes a chest X-ray (PNG, JPEG or DICOM) and gives one probability per finding ({len(label_names)}: "
         f"{', '.join(label_names)}), {scale}, and a positive flag per finding at the evaluation's operating "
         "threshold (Youden's J on the validation split)."), "",
        (f"Preprocessing inside the model: decode to 8-bit gray, pad to a square with black, resize to {spec['size']} px "
         f"(Lanczos), normalise with the training pixel mean {spec['pixel_mean']:.4f} and std {spec['pixel_std']:.4f}."),
        "Demographics (age, sex, view) are used: give them as columns." if spec.get("uses_demographics") else
        "Demographics are not used.", "",
    ]  # fmt: skip
    lines += _data_section(config, manifest)
    lines += _evaluation_section(metrics, label_names, bool(spec.get("calibrated")))
    lines += _audit_section(metrics)
    lines += _use_and_limits()
    return "\n".join(lines)


def _use_and_limits() -> list[str]:
    return [
        "## Intended use", "",
        "Research and engineering use: reproducing the pipeline, testing deployment and batch scoring. It is not a",
        "medical device and must not be used for diagnosis or to triage patients.", "",
        "## Limits", "",
        "- Trained on one collection's labels, which were mined from reports and are noisy; performance elsewhere",
        "  (other hospitals, scanners, populations, lateral views, children) is unknown until measured there.",
        "- The intervals above are for the evaluated split only; a subgroup's performance can differ (see the audit).",
        "- Thresholds trade sensitivity for specificity as chosen on validation data; a deployment should choose its own.",
        "- Probabilities reflect the training collection's prevalence, not another population's.", "",
    ]  # fmt: skip


def _members_section(metrics: dict, spec: dict) -> list[str]:
    recorded = list(metrics.get("members") or [])  # in the order the members were loaded and exported
    lines = ["## Members", "", "| member | model | size (px) | pixel mean | pixel std | member test AUC |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for i, entry in enumerate(spec["members"]):
        member_spec, info = entry["spec"], recorded[i] if i < len(recorded) else {}
        lines.append(
            f"| {entry['name']} | {info.get('model', 'n/a')} | {member_spec['size']} | {member_spec['pixel_mean']:.4f} "
            f"| {member_spec['pixel_std']:.4f} | {_fmt(info.get('mean_auc'))} |"
        )
    if spec["method"] == "stacked":
        rule = ("per finding, a logistic regression with non-negative weights on the members' logits, fitted on "
                "the validation split (findings with one label value there use the mean)")  # fmt: skip
    else:
        rule = "the mean of the members' calibrated probabilities (each member's own calibration)"
    return lines + ["", f"Combination: {rule}.", ""]


def ensemble_model_card(*, run: str, metrics: dict, manifest: dict | None, spec: dict) -> str:
    """The Markdown model card of an exported ensemble: what :func:`model_card` says of one run,
    with the members (each with its own size and pixel statistics) and the combination rule."""
    label_names = spec["label_names"]
    scale = "calibrated (temperature scaling of the ensemble's output, fitted on the validation split)" if spec.get(
        "calibrated") else "raw"  # fmt: skip
    lines = [
        f"# cxrflow model: an ensemble ({spec['method']}) of {len(spec['members'])} runs", "",
        f"Exported from ensemble `{run}` as an MLflow pyfunc model; every member's weights travel inside it.", "",
        "## What it does", "",
        (f"Takes a chest X-ray (PNG, JPEG or DICOM), scores it with every member and combines them into one probability "
         f"per finding ({len(label_names)}: {', '.join(label_names)}), {scale}, and a positive flag per finding at the "
         "ensemble evaluation's operating threshold (Youden's J on the validation split)."), "",
        ("Preprocessing inside the model, per member: decode to 8-bit gray, pad to a square with black, resize to the "
         "member's size (Lanczos), normalise with the member's training pixel mean and std (table below)."),
        "Demographics (age, sex, view) are used: give them as columns." if spec.get("uses_demographics") else
        "Demographics are not used.", "",
    ]  # fmt: skip
    lines += _members_section(metrics, spec)
    lines += _data_section({"store": metrics.get("store"), "size": (spec["size"] or [None])[0]}, manifest)
    lines += _evaluation_section(metrics, label_names, bool(spec.get("calibrated")))
    lines += _audit_section(metrics)
    lines += _use_and_limits()
    return "\n".join(lines)
