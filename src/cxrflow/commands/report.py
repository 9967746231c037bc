"""``cxrflow report``: report.html and the paper's Table 1 over several runs (:mod:`cxrflow.results.report`)."""

from __future__ import annotations

import argparse

from cxrflow.errors import CxrflowError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (all their eval-<split>-* evaluations), evaluation or ensemble folders")
    parser.add_argument("--out", required=True, help="folder for report.html, table.md, table.csv and comparison.png")
    parser.add_argument("--split", default="test", help="which evaluations of a run folder to use (default: test)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    parser.add_argument("--explore", default=None, help="'cxrflow explore' output folder, for the data section of report.html")
    parser.add_argument("--store", default=None, help="store folder, when it moved since evaluation (default: the one each evaluation names)")
    parser.add_argument("--cases", type=int, default=3, help="images per finding and kind of case in report.html (0: no cases; default: 3)")
    parser.add_argument("--cases-for", default="best", choices=["best", "all"], help="cases of the best evaluation or of all (default: best)")
    parser.add_argument("--no-html", action="store_true", help="write only table.md, table.csv and comparison.png")


def run(args: argparse.Namespace) -> int:
    from cxrflow.results.report import format_markdown, write_report

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
    if "report_html" in result:
        print(f"wrote {result['report_html']}")
    print(format_markdown(result["rows"]).split("\n## ")[0].rstrip())
    for key in ("table_md", "table_csv", "comparison_png"):
        print(f"wrote {result[key]}")
    return 0
