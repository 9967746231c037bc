"""Names are data, never terminal controls: every table and summary cxrflow prints (evaluate's,
localize's, store-info's, predict's headings, the audit and cross-collection lines) passes finding
names, image and folder names through :func:`cxrflow.names.printable`, so an escape sequence, a
carriage return, a bell or a newline in a name neither drives the terminal nor adds a line."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from cxrflow.commands.predict import format_calls
from cxrflow.data.store import format_manifest
from cxrflow.modelling.scoring import format_summary
from cxrflow.results.crosseval import format_cross_lines
from cxrflow.results.demographics_baseline import format_lines
from cxrflow.results.localize import format_table
from cxrflow.results.subgroups import format_audit

PIECES = ["\x1b[31m", "\x1b]0;pwned\x07", "\r", "\n", "\x07", "\x9b2J", "\t", "\x00", "é", "Mass", " ", "/"]
hostile = st.lists(st.sampled_from(PIECES + list(string.ascii_letters[:6])), min_size=1, max_size=6).map("".join)
names_of = st.lists(hostile, min_size=1, max_size=3, unique=True)


def _summary(names: list[str], folder: str) -> str:
    per = {n: 0.5 for n in names}
    metrics = {
        "model": folder, "size": 32, "checkpoint": folder, "split": "test", "n_images": 8, "n_patients": 4,
        "label_names": names, "mean_auc": 0.5, "mean_auc_ci95": [0.4, 0.6], "n_findings_in_mean": len(names),
        "auc": per, "auc_ci95": {n: [0.4, 0.6] for n in names}, "positives": {n: 3 for n in names},
        "threshold": per, "sensitivity": per, "specificity": per, "nan_findings": names,
    }  # fmt: skip
    return format_summary(metrics)


def _localize(names: list[str], folder: str) -> str:
    per = {n: 0.5 for n in [*names, "overall"]}
    result = {
        "model": folder, "size": 32, "checkpoint": folder, "method": "gradcam", "split": "test",
        "n_boxes": {n: 2 for n in names}, "n_images": 4, "max_boxes": 1,
        "accuracy_iobb": {"0.1": per, "0.5": per}, "accuracy_iou": {"0.5": per},
        "baseline": {"accuracy_iobb": {"0.1": per, "0.5": per}, "accuracy_iou": {"0.5": per}},
        "wang2017": {"accuracy_iobb": {"0.1": per}}, "fp_per_image": per,
    }  # fmt: skip
    return format_table(result)


def _manifest(names: list[str], folder: str) -> str:
    manifest = {
        "format_version": 2, "label_names": names, "sizes": [32], "pos_weight": [1.0] * len(names),
        "positives": {n: 1 for n in names}, "source": {"data_dir": folder, "written": 3},
        "quarantined": [{"image_id": n, "reason": folder} for n in names], "missing": names,
        "label_counts": {n: {"positive": 1} for n in names}, "uncertain_policies": ["zeros"],
    }  # fmt: skip
    return format_manifest(manifest)


def _calls(names: list[str], folder: str) -> str:
    predictions = [{"image": folder, "probabilities": {n: 0.9 for n in names}}]
    return format_calls(predictions, names, {n: 0.5 for n in names})


def _cross(names: list[str], folder: str) -> str:
    metrics = {"alignment": {n: n + "x" for n in names}, "store": folder, "threshold_source": folder,
               "not_labelled": names}  # fmt: skip
    return "\n".join(format_cross_lines(metrics))


def _audit(names: list[str], folder: str) -> str:
    audit = {"attributes": names, "gaps": {"flagged": 1, "tests": 2, "level": 0.95}, "file": folder,
             "flagged": [{"text": n} for n in names], "skipped": {n: folder for n in names}}  # fmt: skip
    return format_audit(audit)


def _demographics(names: list[str], folder: str) -> str:
    metrics = {"demographics_only": {"skipped": folder}}
    return "\n".join(format_lines(metrics))


PRINTERS = [_summary, _localize, _manifest, _calls, _cross, _audit, _demographics]


@settings(max_examples=60, deadline=None)
@given(names=names_of, folder=hostile)
def test_no_control_character_reaches_the_terminal(names, folder):
    plain = [f"finding{i}" for i in range(len(names))]
    for printer in PRINTERS:
        text = printer(names, folder)
        lines = text.split("\n")
        assert all(line.isprintable() for line in lines), (printer.__name__, text)
        # a newline inside a name is shown escaped, never as a new line of the table
        assert len(lines) == len(printer(plain, "folder").split("\n")), printer.__name__


def test_ordinary_names_are_printed_as_they_are():
    names = ["Pleural Thickening", "Épanchement", "Lesion/Mass"]
    for printer in PRINTERS:
        text = printer(names, "run-é")
        assert "\\x" not in text and "\\n" not in text
    assert "Épanchement" in _summary(names, "run")
