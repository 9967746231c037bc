"""The study a report is about: its evaluations (and ensembles) loaded from the folders given, the
stores they name opened, and how the page names and links each evaluation. Shared by the sections of
``report.html`` (:mod:`cxrflow.results.htmlreport`, :mod:`cxrflow.results.reproduce`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrflow import safeio
from cxrflow.errors import CxrflowError
from cxrflow.identity import file_sha256
from cxrflow.results.embed import figure_uri
from cxrflow.results.table import STAGE_TITLES, build_rows, model_title
from cxrflow.runs import METRICS_NAME, evaluation_run

#: How each store split mode is named in the page.
SPLIT_MODES = {
    "official-lists": "official",
    "official-split": "official (the collection's split file)",
    "split-csv": "as given by --split-csv",
    "patients-70-10-20": "random patients 70/10/20",
    "synthetic-store": "synthetic",
}


# --------------------------------------------------------------------------------------------------
# small readers


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(content, None) or (None, why not)."""
    try:
        data = safeio.read_json(path, "cxrflow file")
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({exc})"
    return (data, None) if isinstance(data, dict) else (None, "not a JSON object")


def figure(path: Path, alt: str, caption: str | None = None) -> dict[str, Any]:
    """A figure for the page: its data URI and alt text, or the reason it could not be shown."""
    try:
        return {"uri": figure_uri(path), "alt": alt, "caption": caption or alt, "name": Path(path).name}
    except (OSError, ValueError) as exc:
        return {
            "error": f"{Path(path).name} could not be shown: {exc}",
            "caption": caption or alt,
            "name": Path(path).name,
        }


def git_commit(package: Path | None = None) -> str | None:
    """The commit of the git checkout cxrflow runs from (its ``src/cxrflow``), else None.

    A cxrflow installed into some other repository's virtual environment is not that repository's code,
    so the checkout must hold this very package.
    """
    package = (package or Path(__file__).parents[1]).resolve()  # src/cxrflow, above results/

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10, check=False
        )

    try:
        found = git("rev-parse", "--show-toplevel", "HEAD")
        lines = found.stdout.split()
        if found.returncode != 0 or len(lines) != 2 or Path(lines[0], "src", "cxrflow").resolve() != package:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return lines[1] + (" (with uncommitted changes)" if dirty else "")


# --------------------------------------------------------------------------------------------------
# evaluations and stores


def load_evaluations(paths: Sequence[str | os.PathLike], split: str) -> list[dict[str, Any]]:
    """Every evaluation named by ``paths``: its Table 1 row, metrics, folder and run folder."""
    rows = build_rows(paths, split)
    evaluations = []
    for row in rows:
        folder = Path(row["source"]).parent
        metrics, _ = read_json(Path(row["source"]))
        ensemble = metrics.get("kind") == "ensemble"
        run = folder if ensemble else evaluation_run(folder / METRICS_NAME, metrics)
        evaluations.append({"row": row, "metrics": metrics, "folder": folder, "run": run, "ensemble": ensemble})
    return evaluations


def open_stores(evaluations: list[dict], store_override: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """Each store the evaluations were made on, by the path recorded: its manifest, or why it is not there."""
    from cxrflow.data.store import read_manifest

    stores: dict[str, dict[str, Any]] = {}
    for ev in evaluations:
        recorded = str(ev["metrics"].get("store") or "")
        if recorded in stores:
            continue
        path = Path(store_override) if store_override else _located(recorded, ev)
        info: dict[str, Any] = {"recorded": recorded, "path": str(path), "manifest": None}
        if not recorded and not store_override:
            info["unknown"] = "the evaluation does not record its store"
        elif not (path / "_manifest.json").is_file():
            moved = "no longer at the path recorded at evaluation" if not store_override else "not a cxrflow store"
            info["problem"] = f"store {path} is {moved} (no _manifest.json there); pass --store DIR to point at it"
        else:
            try:  # the shape the data section and the cases rely on, checked as every reader does
                manifest = read_manifest(path)
            except CxrflowError as exc:
                info["problem"] = f"store manifest {path / '_manifest.json'}: {exc.message}"
            else:
                info.update(manifest=manifest, sha256=file_sha256(path / "_manifest.json"))
        stores[recorded] = info
    return stores


def _located(recorded: str, ev: dict) -> Path:
    """The evaluation's store where it is now: at ``recorded``, else found by its splits' identity
    around the run (:func:`cxrflow.data.store.locate_store`), else ``recorded`` (said missing)."""
    from cxrflow.data.store import locate_store

    m = ev["metrics"]
    if not recorded or not isinstance(m.get("store_identity"), dict) or ev["ensemble"]:
        return Path(recorded)
    try:
        return locate_store(
            recorded, m["store_identity"], int(m.get("size") or 0), run=ev["run"], recorded_run=m.get("run")
        )
    except (CxrflowError, ValueError, TypeError):
        return Path(recorded)


def split_name(store: dict[str, Any] | None) -> str:
    """How the store's test split was drawn, in words (the thing to check before comparing AUCs)."""
    from cxrflow.results.auditreport import split_words

    return split_words((store or {}).get("manifest"))


def evaluation_anchor(ev: dict) -> str:
    """A stable HTML id for an evaluation."""
    digest = hashlib.sha1(str(ev["folder"].resolve()).encode()).hexdigest()[:10]
    return f"eval-{digest}"


def evaluation_title(ev: dict) -> str:
    r, m = ev["row"], ev["metrics"]
    if ev["ensemble"]:
        return f"{ev['folder'].name}: ensemble ({m.get('method', '?')}) of {len(m.get('members', []))} evaluations"
    stage = STAGE_TITLES.get(r["stage"], r["stage"])
    where = f", on {r['test_store']}" if r.get("other_collection") else ""
    return f"{r['run']}: {model_title(r['model'])} {r['size']} px, {stage}{where}"
