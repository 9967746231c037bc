"""``cxrflow report``: ``table.md``, ``table.csv``, ``comparison.png`` and ``report.html`` in one folder.

The table's rows (the paper's Table 1 over several evaluated runs) come from :mod:`cxrflow.results.table`,
the page from :mod:`cxrflow.results.htmlreport`; the folder is published at once (:mod:`cxrflow.outputs`).
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any, Sequence

from cxrflow.errors import CxrflowError
from cxrflow.outputs import publishing
from cxrflow.results.table import (
    COMPARISON_PNG,
    TABLE_CSV,
    TABLE_MD,
    build_rows,
    format_csv,
    format_markdown,
)


def write_report(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    split: str = "test",
    overwrite: bool = False,
    html: bool = True,
    explore: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
    cases: int = 3,
    cases_for: str = "best",
    report_args: list[str] | None = None,
) -> dict[str, Any]:
    """Write ``table.md``, ``table.csv``, ``comparison.png`` and (``html``) ``report.html`` into ``out``.

    Returns the rows and the paths written. The HTML options are those of
    :func:`cxrflow.results.htmlreport.build_context`.
    """
    from cxrflow.plots import plot_run_comparison

    out = Path(out)
    names = {"table_md": TABLE_MD, "table_csv": TABLE_CSV, "comparison_png": COMPARISON_PNG}
    if html:
        from cxrflow.results.htmlreport import HTML_NAME

        names["report_html"] = HTML_NAME
    # the lock is held from the start, so a second report on the same --out (even with --overwrite)
    # stops naming this one instead of replacing its output a moment later
    with publishing(out, "report", overwrite=overwrite, inputs=paths) as pub:
        rows = build_rows(paths, split)
        png = io.BytesIO()
        plot_run_comparison(rows).savefig(png, format="png", dpi=120)
        files = {TABLE_MD: format_markdown(rows).encode(), TABLE_CSV: format_csv(rows).encode(), COMPARISON_PNG: png.getvalue()}
        if html:
            from cxrflow.results.htmlreport import build_html

            page = build_html(
                paths, split=split, explore=explore, store=store, cases=cases, cases_for=cases_for,
                report_args=report_args if report_args is not None else [*map(str, paths), "--out", str(out)],
            )  # fmt: skip
            files[HTML_NAME] = page.encode("utf-8")
        for name, content in files.items():
            (pub.tmp / name).write_bytes(content)
        pub.commit()
    written = {name: out / name for name in files}
    best = next((r for r in rows if r["best"]), None)
    return {"rows": rows, "best": best, **{k: str(written[n]) for k, n in names.items()}}


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
