"""Section 5 of ``report.html``: how to reproduce the study (versions, commands, each run's resolved
config, store manifest hashes and a shell script that redoes it: ETL, training, evaluation, report).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from cxrflow import __version__
from cxrflow.results.study import evaluation_anchor, evaluation_title, git_commit

# --------------------------------------------------------------------------------------------------
# 5. reproduce


def _train_settings(config: dict) -> dict[str, Any]:
    """The settings of a saved run config that ``cxrflow train --config`` accepts (no out, names, stages)."""
    from cxrflow.modelling.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"out"}
    return {k: v for k, v in config.items() if k in fields}


def rerun_script(evaluations: list[dict], runs: list[dict], stores: dict[str, dict], report_args: list[str]) -> str:
    """The shell commands that redo the study: the ETL, each run's training and evaluation, the report."""
    q = shlex.quote
    lines = ["#!/usr/bin/env bash", "# Re-run this study with cxrflow " + __version__, "set -euo pipefail", ""]
    for info in stores.values():
        m = info.get("manifest")
        if m is None:
            continue
        src = (m.get("source") or {}).get("data_dir")
        split = m.get("split") or {}
        sizes = ",".join(str(s) for s in m.get("sizes", []))
        if src:
            cmd = f"cxrflow etl --data {q(src)} --out {q(info['path'])} --sizes {sizes} --seed {split.get('seed', 0)}"
            if split.get("val_fraction") is not None:
                cmd += f" --val-fraction {split['val_fraction']}"
            if split.get("split_csv"):  # the exact assignment it was made with
                cmd += f" --split-csv {q(str(split['split_csv']))}"
            if m.get("format"):  # collections other than NIH's: the reader and the views it kept
                cmd += f" --format {q(str(m['format']))}" + (f" --views {q(str(m['views']))}" if m.get("views") else "")
            lines += [f"# store {info['path']} (manifest sha256 {info.get('sha256', '?')})", cmd, ""]
        else:
            lines += [
                f"# store {info['path']}: not written by 'cxrflow etl' (split mode {split.get('mode')}); reuse it as it is",
                "",
            ]
    lines.append("mkdir -p rerun-configs")
    for section in runs:
        if section["ensemble"]:
            continue
        run = section["path"]
        if section["config"]:
            name = Path(run).name
            settings = json.dumps(_train_settings(section["config"]), indent=2)
            lines += [f"# run {name}", f"cat > rerun-configs/{q(name)}.json <<'EOF'", settings, "EOF",
                      f"cxrflow train --config rerun-configs/{q(name)}.json --out {q(run)}"]  # fmt: skip
        else:
            lines.append(f"# run {run}: no config.json there; train it as it was trained before")
        for part in section["evaluations"]:
            ev = next(e for e in evaluations if evaluation_anchor(e) == part["anchor"])
            m = ev["metrics"]
            boot = m.get("bootstrap") or {}
            cmd = f"cxrflow evaluate --run {q(run)} --checkpoint {m.get('checkpoint')} --split {m.get('split')}"
            if boot:
                cmd += f" --n-boot {boot.get('n_boot')} --seed {boot.get('seed')}"
            if m.get("alignment") is not None:  # scored on another store (evaluate --store OTHER)
                cmd += f" --store {q(str(m.get('store')))}" + "".join(f" --map {q(str(x))}" for x in m.get("map") or [])
                cmd += f" --uncertain {q(str(m['uncertain']))}" if m.get("uncertain") else ""
            if ev["folder"].parent != Path(run) or not ev["folder"].name.startswith("eval-"):
                cmd += f" --out {q(str(ev['folder']))}"
            lines.append(cmd)
        lines.append("")
    # a member of a run the script trains is named by that run's path as given (the script may run elsewhere)
    given = {Path(s["path"]).resolve(): s["path"] for s in runs if not s["ensemble"]}

    def member(x: dict) -> str:
        ev = Path(str(x.get("eval")))
        return str(Path(given[ev.parent]) / ev.name) if ev.parent in given else str(ev)

    for ev in evaluations:
        if ev["ensemble"]:
            m = ev["metrics"]
            boot = m.get("bootstrap") or {}
            members = " ".join(q(member(x)) for x in m.get("members", []))
            cmd = f"cxrflow ensemble {members} --out {q(str(ev['folder']))} --method {q(str(m.get('method')))}"
            if boot:
                cmd += f" --n-boot {boot.get('n_boot')} --seed {boot.get('seed')}"
            lines += [f"# ensemble {ev['folder']}", cmd, ""]
    lines.append("cxrflow report " + " ".join(q(a) for a in report_args))
    return "\n".join(lines) + "\n"


def logged_commands(run: Path) -> list[str]:
    """The ``cxrflow`` command lines a sweep ran for this run (``SWEEP/logs/<run>.log``), in order."""
    log = run.parent.parent / "logs" / f"{run.name}.log"
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[2:] for line in lines if line.startswith("$ cxrflow ")]


def reproduce_section(
    evaluations: list[dict], runs: list[dict], stores: dict[str, dict], report_args: list[str]
) -> dict[str, Any]:
    """Section 5: versions, the report command, stores, each run's config and commands, the rerun script."""
    versions = sorted(
        {str(ev["metrics"].get("cxrflow_version")) for ev in evaluations if ev["metrics"].get("cxrflow_version")}
    )
    recorded_commits = sorted(
        {str(s["config"]["git_commit"]) for s in runs if s["config"] and s["config"].get("git_commit")}
    )
    return {
        "version": __version__,
        "evaluation_versions": versions,
        "git_commit": git_commit(),
        "recorded_commits": recorded_commits,
        "command": "cxrflow report " + " ".join(shlex.quote(a) for a in report_args),
        "stores": [
            {"path": s["path"], "recorded": s["recorded"], "sha256": s.get("sha256"), "problem": s.get("problem")}
            for s in stores.values()
        ],
        "runs": [
            {
                "name": s["name"],
                "path": s["path"],
                "config": None if not s["config"] else json.dumps(s["config"], indent=2),
                "commands": [] if s["ensemble"] else logged_commands(Path(s["path"])),
            }
            for s in runs
        ],
        "evaluations": [
            {
                "title": evaluation_title(ev),
                "folder": str(ev["folder"]),
                "sha": ev["metrics"].get("checkpoint_sha256"),
                "created": ev["metrics"].get("created"),
            }
            for ev in evaluations
        ],
        "script": rerun_script(evaluations, runs, stores, report_args),
    }
