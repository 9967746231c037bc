"""What ``report.html`` says about an evaluation's subgroups and its data, as plain data for the template.

:func:`audit_part` turns ``metrics.json["audit"]`` and the forest plots beside it into the page's
"Who the model fails" block (flagged gaps first, in plain words; the forest plots; the
underdiagnosis table). :func:`split_words` names where a store's test split came from, and
:func:`is_synthetic_evaluation` tells whether an evaluation's results come from synthetic data, so
that the page says so and leaves out every comparison with published results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrflow.results.embed import figure_uri


def is_synthetic_evaluation(metrics: dict, store: dict[str, Any] | None) -> bool:
    """True when the evaluation records a synthetic store, or its store's manifest says it is one."""
    from cxrflow.data.synthetic import is_synthetic

    return bool(metrics.get("synthetic")) or is_synthetic((store or {}).get("manifest"))


def split_words(manifest: dict | None) -> str:
    """Where the test split came from: "official (the NIH release's test_list.txt)" only for the
    NIH release itself; otherwise "the collection's test list", "patient split ...", ..."""
    from cxrflow.data.synthetic import is_synthetic

    if manifest is None:
        return "unknown (store not found)"
    mode = (manifest.get("split") or {}).get("mode")
    synthetic = is_synthetic(manifest)
    nih = manifest.get("format", "nih") == "nih"
    if mode == "official-lists":
        if nih and not synthetic:
            return "official (the NIH release's test_list.txt)"
        return "the synthetic collection's test list" if synthetic else "the collection's test list"
    words = {
        "official-split": "the collection's own train/val/test split",
        "split-csv": "as given by --split-csv",
        "patients-70-10-20": "patient split (random 70/10/20 by patient)",
        "synthetic-store": "patient split of a synthetic store",
    }.get(mode, str(mode or "unknown"))
    return f"synthetic data: {words}" if synthetic and mode != "synthetic-store" else words


def audit_part(metrics: dict, folder: Path, title: str) -> dict[str, Any]:
    """The audit block of one evaluation: ``{"missing": why}`` when it has none."""
    audit = metrics.get("audit")
    if not isinstance(audit, dict):
        if metrics.get("audit_note"):
            return {"missing": f"No subgroup audit: {metrics['audit_note']}."}
        why = "made with --no-audit" if "audit" in metrics else "made by a cxrflow without the audit"
        return {"missing": f"No subgroup audit: the evaluation was {why}; run 'cxrflow evaluate' again to add one."}
    figures = []
    for entry in audit.get("figures") or []:
        path = Path(folder) / str(entry.get("file"))
        alt = (f"Forest plot of {title}: AUC with its 95% interval for every {entry.get('attribute')} group and finding; "
               "dashed: the finding's AUC on the whole split; diamonds: flagged gaps")  # fmt: skip
        try:
            figures.append({"uri": figure_uri(path), "alt": alt, "caption": alt, "name": path.name})
        except (OSError, ValueError) as exc:
            figures.append({"error": f"{path.name} could not be shown: {exc}", "caption": alt, "name": path.name})
    gaps = audit.get("gaps") or {}
    under = audit.get("underdiagnosis") or {}
    return {
        "flagged": [f.get("text") for f in audit.get("flagged") or []],
        "tests": gaps.get("tests"),
        "level": gaps.get("level"),
        "rule": gaps.get("rule"),
        "skipped": dict(audit.get("skipped") or {}),
        "attributes": list((audit.get("attributes") or {}).keys()),
        "figures": figures,
        "file": audit.get("file"),
        "n_boot": (audit.get("bootstrap") or {}).get("n_boot"),
        "global_fpr": under.get("global_fpr"),
        "global_threshold": under.get("global_threshold"),
        "achieved_fpr": under.get("achieved_fpr"),
        "underdiagnosis": list(under.get("groups") or []),
    }
