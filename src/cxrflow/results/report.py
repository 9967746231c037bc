"""``cxrflow report``: ``table.md``, ``table.csv``, ``comparison.png`` and ``report.html`` in one folder.

The table's rows (the paper's Table 1 over several evaluated runs) come from :mod:`cxrflow.results.table`,
the page from :mod:`cxrflow.results.htmlreport`; the folder is published at once (:mod:`cxrflow.outputs`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrflow.outputs import publishing
from cxrflow.results.crosstable import CROSS_CSV, CROSS_MD, cross_table
from cxrflow.results.crosstable import format_csv as cross_csv
from cxrflow.results.crosstable import format_markdown as cross_markdown
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
    """Write ``table.md``, ``table.csv``, ``comparison.png`` and (``html``) ``report.html`` into ``out``, and
    ``cross.md`` and ``cross.csv`` when one run was scored on several stores (:mod:`cxrflow.results.crosstable`).

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
        synthetic = {
            "title": "Mean test AUC per run (95% CI, patient bootstrap); synthetic data, no published comparison"
        }
        plot_run_comparison(rows, **(synthetic if any(r["synthetic"] for r in rows) else {})).savefig(
            png, format="png", dpi=120
        )
        files = {
            TABLE_MD: format_markdown(rows).encode(),
            TABLE_CSV: format_csv(rows).encode(),
            COMPARISON_PNG: png.getvalue(),
        }
        cross = cross_table([r["source"] for r in rows])  # one run scored on several stores
        if cross is not None:
            files[CROSS_MD], files[CROSS_CSV] = cross_markdown(cross).encode(), cross_csv(cross).encode()
            names.update(cross_md=CROSS_MD, cross_csv=CROSS_CSV)
        if html:
            from cxrflow.results.htmlreport import build_html

            page = build_html(
                paths, split=split, explore=explore, store=store, cases=cases, cases_for=cases_for,
                report_args=report_args if report_args is not None else [*map(str, paths), "--out", str(out)],
                cross=cross,
            )  # fmt: skip
            files[HTML_NAME] = page.encode("utf-8")
        for name, content in files.items():
            (pub.tmp / name).write_bytes(content)
        pub.commit()
    written = {name: out / name for name in files}
    best = next((r for r in rows if r["best"]), None)
    return {"rows": rows, "best": best, **{k: str(written[n]) for k, n in names.items()}}
