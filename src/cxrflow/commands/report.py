"""``cxrflow report``: report.html and the paper's Table 1 over several runs (:mod:`cxrflow.results.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrflow.commands.common import must_exist
from cxrflow.errors import CxrflowError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folders (all their eval-<split>-* evaluations, and eval-<store>-<split>-* ones on other stores), "
        "evaluation or ensemble folders",
    )
    parser.add_argument("--out", required=True, help="folder for report.html, table.md, table.csv and comparison.png")
    parser.add_argument("--split", default="test", help="which evaluations of a run folder to use (default: test)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    parser.add_argument(
        "--explore", default=None, help="'cxrflow explore' output folder, for the data section of report.html"
    )
    parser.add_argument(
        "--store",
        default=None,
        help="store folder, when it moved since evaluation (default: the one each evaluation names)",
    )
    parser.add_argument(
        "--cases",
        type=int,
        default=3,
        help="images per finding and kind of case in report.html (0: no cases; default: 3)",
    )
    parser.add_argument(
        "--cases-for",
        default="best",
        choices=["best", "all"],
        help="cases of the best evaluation or of all (default: best)",
    )
    parser.add_argument("--no-html", action="store_true", help="write only table.md, table.csv and comparison.png")


def run(args: argparse.Namespace) -> int:
    must_exist(args.runs, "no such run or evaluation folder")
    from cxrflow.results.report import write_report

    if args.cases < 0:
        raise CxrflowError(f"--cases must be 0 or more, got {args.cases}")
    argv = [*args.runs, "--out", args.out] + (["--explore", args.explore] if args.explore else [])
    argv += ["--store", args.store] if args.store else []
    argv += [] if args.cases == 3 else ["--cases", str(args.cases)]
    argv += [] if args.cases_for == "best" else ["--cases-for", args.cases_for]
    result = write_report(
        args.runs, args.out, split=args.split, overwrite=args.overwrite, html=not args.no_html, explore=args.explore,
        store=args.store, cases=args.cases, cases_for=args.cases_for, report_args=argv,
    )  # fmt: skip
    print(summary_lines(result))
    return 0


def summary_lines(result: dict) -> str:
    """Where the report is and its headline (the tables stay in their files, not on the terminal)."""
    rows, best = result["rows"], result["best"]
    folder = Path(result["table_md"]).parent
    lines = [
        f"report: {result['report_html']} (open it in a browser)"
        if "report_html" in result
        else f"report folder: {folder}"
    ]
    kinds = sum(r["kind"] == "ensemble" for r in rows)
    lines.append(
        f"{_count(len(rows) - kinds, 'evaluation')}"
        + (f" and {_count(kinds, 'ensemble')}" if kinds else "")
        + f" on the {rows[0]['split'] if rows else '?'} split"
    )
    if best is not None and best["mean_auc"] is not None:
        ci = f" (95% CI {best['ci_low']:.3f}-{best['ci_high']:.3f})" if best["ci_low"] is not None else ""
        paper = "" if best["paper_mean_auc"] is None else f"; the paper's {best['paper_mean_auc']:.3f}"
        lines.append(f"best: {best['run']} ({best['label']}), mean AUC {best['mean_auc']:.3f}{ci}{paper}")
    lines.append(
        f"tables and figure: {Path(result['table_md']).name}, {Path(result['table_csv']).name}, "
        f"{Path(result['comparison_png']).name} in {folder}/"
    )
    if "cross_md" in result:
        lines.append(f"cross-collection table (one run on several stores): cross.md, cross.csv in {folder}/")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
