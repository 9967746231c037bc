"""Dataset statistics and figures from the metadata alone: the paper's data section.

:func:`compute_stats` is a pure function of the parsed metadata; the ``plot_*`` functions take an
optional matplotlib ``ax`` and return the figure (Agg canvas, never shown); the ``explore`` command
writes ``stats.json``, four PNG figures and a ``summary.md`` that shows them.

``stats.json`` keys: ``images``, ``patients``, ``patients_by_sex`` ({"M", "F"}: each patient counted
once, with the sex of their first row in the file), ``age`` ({min, max, mean} over images, years),
``images_per_patient`` ({max, mean}), ``follow_up`` ({max, mean} of ``Follow-up #`` over images),
``findings`` (images per finding, vocabulary order, then the no-finding token), ``max_findings_per_image``,
``view_positions`` ({view: images}), ``cooccurrence`` (a 14 x 14 dict of dicts in vocabulary order:
``cooccurrence[a][b]`` = images labelled with both a and b; the diagonal is the finding's count).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from cxrflow.atomic import save_figure_atomic, write_json_atomic, write_text_atomic
from cxrflow.data.labels import NIH14, LabelVocabulary
from cxrflow.data.metadata import AGE_RANGE, label_matrix
from cxrflow.errors import CxrflowError
from cxrflow.outputs import publishing
from cxrflow.plots import _new_axes

FIGURES = {
    "findings": "findings.png",
    "cooccurrence": "cooccurrence.png",
    "age_by_sex": "age_by_sex.png",
    "images_per_patient": "images_per_patient.png",
}
STATS_NAME = "stats.json"
SUMMARY_NAME = "summary.md"
SEX_COLORS = {"M": "tab:blue", "F": "tab:red"}


def _no_finding_name(vocab: LabelVocabulary) -> str:
    if vocab.no_finding is None and "No Finding" in vocab.names:  # CheXpert: an observation of its own
        return "none of the findings"
    return vocab.no_finding or "No Finding"


def _first_per_patient(entries: pd.DataFrame) -> pd.DataFrame:
    """Each patient's first row in file order."""
    return entries.drop_duplicates("patient_id", keep="first")


def compute_stats(entries: pd.DataFrame, vocab: LabelVocabulary = NIH14) -> dict:
    """The data-section statistics of a :func:`~cxrflow.data.metadata.read_data_entry` frame (JSON-ready)."""
    if len(entries) == 0:
        raise CxrflowError("the metadata has no rows")
    labels = label_matrix(entries, vocab).astype(np.int64)
    per_image = labels.sum(axis=1)
    per_patient = entries.groupby("patient_id", sort=False).size()
    first = _first_per_patient(entries)
    sexes = first["sex"].value_counts()
    co = labels.T @ labels
    findings = {name: int(n) for name, n in zip(vocab.names, labels.sum(axis=0))}
    findings[_no_finding_name(vocab)] = int((per_image == 0).sum())
    views = entries["view"].value_counts()
    known_ages = entries.loc[entries["age"].between(*AGE_RANGE), "age"]
    return {
        "images": int(len(entries)),
        "patients": int(len(per_patient)),
        "patients_by_sex": {"M": int(sexes.get("M", 0)), "F": int(sexes.get("F", 0))},
        "age": {  # ages outside 0-120 are unknown (AGE_UNKNOWN) and counted apart
            "min": int(known_ages.min()) if len(known_ages) else None,
            "max": int(known_ages.max()) if len(known_ages) else None,
            "mean": round(float(known_ages.mean()), 2) if len(known_ages) else None,
            "unknown": int(len(entries) - len(known_ages)),
        },
        "images_per_patient": {"max": int(per_patient.max()), "mean": round(float(per_patient.mean()), 3)},
        "follow_up": {"max": int(entries["follow_up"].max()), "mean": round(float(entries["follow_up"].mean()), 3)},
        "findings": findings,
        "max_findings_per_image": int(per_image.max()),
        "view_positions": {str(k): int(v) for k, v in views.items()},
        "cooccurrence": {a: {b: int(co[i, j]) for j, b in enumerate(vocab.names)} for i, a in enumerate(vocab.names)},
    }


# --------------------------------------------------------------------------------------------- figures


def plot_findings(stats: dict, *, ax: Axes | None = None) -> Figure:
    """Horizontal bars: images per finding (most frequent on top), the no-finding count in gray."""
    fig, ax = _new_axes(ax, (8, 6))
    items = sorted(stats["findings"].items(), key=lambda kv: kv[1])
    names = [k for k, _ in items]
    counts = [v for _, v in items]
    extra = [k for k in stats["findings"] if k not in stats["cooccurrence"]]
    colors = ["0.6" if k in extra else "tab:blue" for k in names]
    bars = ax.barh(names, counts, color=colors)
    total = max(stats["images"], 1)
    ax.bar_label(bars, labels=[f"{c:,} ({c / total:.1%})" for c in counts], padding=3, fontsize=8)
    ax.set_xlim(0, max(counts) * 1.25 if max(counts) > 0 else 1)
    ax.set_title(f"Images per finding ({stats['images']:,} images, multi-label)")
    ax.set_xlabel("images (count)")
    ax.set_ylabel("finding")
    return fig


def plot_cooccurrence(stats: dict, *, ax: Axes | None = None) -> Figure:
    """Heatmap of images labelled with both findings (log colour scale; diagonal = the finding alone)."""
    fig, ax = _new_axes(ax, (9, 8))
    names = list(stats["cooccurrence"])
    matrix = np.array([[stats["cooccurrence"][a][b] for b in names] for a in names], dtype=np.float64)
    shown = np.where(matrix > 0, matrix, np.nan)
    vmax = max(float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0, 1.0)
    image = ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(vmax, 2)))
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            value = int(matrix[i, j])
            bright = value > 0 and np.log(value) > 0.6 * np.log(max(vmax, 2))
            color = "black" if bright else "white" if value else "0.5"
            ax.text(j, i, f"{value:,}", ha="center", va="center", fontsize=6, color=color)
    ax.set_title("Finding co-occurrence (images labelled with both)")
    ax.set_xlabel("finding")
    ax.set_ylabel("finding")
    fig.colorbar(image, ax=ax, label="images (count, log scale)", shrink=0.8)
    return fig


def _age_text(age: dict) -> str:
    """``2-94, mean 46.9`` plus how many ages are unknown (not given, or outside 0-120, in the metadata)."""
    text = "unknown" if age["mean"] is None else f"{age['min']}-{age['max']}, mean {age['mean']:.1f}"
    return text + (f" ({age['unknown']:,} unknown: not given or outside 0-120)" if age.get("unknown") else "")


def plot_age_by_sex(entries: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Histogram of each patient's age at their first image, one series per sex, 5-year bins."""
    fig, ax = _new_axes(ax, (8, 5))
    first = _first_per_patient(entries)
    first = first[first["age"].between(*AGE_RANGE)]  # unknown ages are not plotted
    top = int(max(100, first["age"].max() + 5)) if len(first) else 100
    bins = np.arange(0, top + 5, 5)
    for sex in ("M", "F"):
        ages = first.loc[first["sex"] == sex, "age"].to_numpy()
        label = {"M": "male", "F": "female"}[sex] + f" ({len(ages):,} patients)"
        ax.hist(ages, bins=bins, histtype="step", linewidth=2, color=SEX_COLORS[sex], label=label)
    ax.set_title("Age distribution by sex (age at each patient's first image)")
    ax.set_xlabel("age (years)")
    ax.set_ylabel("patients (count)")
    ax.set_xlim(0, top)
    ax.legend()
    return fig


def plot_images_per_patient(entries: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Histogram of the number of images per patient (log count axis: the tail is long)."""
    fig, ax = _new_axes(ax, (8, 5))
    per_patient = entries.groupby("patient_id", sort=False).size().to_numpy()
    top = int(per_patient.max())
    bins = np.arange(0.5, top + 1.5, 1)  # one bar per count
    ax.hist(per_patient, bins=bins, color="tab:blue", edgecolor="white", linewidth=0.3 if top <= 60 else 0)
    ax.set_yscale("log")
    ax.set_title(f"Images per patient ({len(per_patient):,} patients, mean {per_patient.mean():.2f}, max {top})")
    ax.set_xlabel("images per patient (count)")
    ax.set_ylabel("patients (count, log scale)")
    ax.set_xlim(0, top + 1)
    return fig


def make_figures(entries: pd.DataFrame, stats: dict) -> dict[str, Figure]:
    """All four figures, keyed like :data:`FIGURES`."""
    return {
        "findings": plot_findings(stats),
        "cooccurrence": plot_cooccurrence(stats),
        "age_by_sex": plot_age_by_sex(entries),
        "images_per_patient": plot_images_per_patient(entries),
    }


# --------------------------------------------------------------------------------------------- report


def summary_markdown(stats: dict, source: str) -> str:
    """A short data-section report that embeds the figures."""
    s = stats
    lines = [
        "# Dataset summary",
        "",
        f"Source: `{source}`",
        "",
        "| | |",
        "|---|---|",
        f"| images | {s['images']:,} |",
        f"| patients | {s['patients']:,} ({s['patients_by_sex']['M']:,} male, {s['patients_by_sex']['F']:,} female) |",
        f"| age (years) | {_age_text(s['age'])} |",
        f"| images per patient | mean {s['images_per_patient']['mean']:.2f}, max {s['images_per_patient']['max']} |",
        f"| follow-up # | mean {s['follow_up']['mean']:.2f}, max {s['follow_up']['max']} |",
        f"| findings per image | at most {s['max_findings_per_image']} |",
        "| view positions | " + ", ".join(f"{k} {v:,}" for k, v in s["view_positions"].items()) + " |",
        "",
        "## Findings",
        "",
        "| finding | images | share |",
        "|---|---:|---:|",
    ]
    for name, n in sorted(s["findings"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {n:,} | {n / s['images']:.1%} |")
    lines += [
        "",
        "## Figures",
        "",
        f"![Images per finding]({FIGURES['findings']})",
        "",
        f"![Finding co-occurrence]({FIGURES['cooccurrence']})",
        "",
        f"![Age distribution by sex]({FIGURES['age_by_sex']})",
        "",
        f"![Images per patient]({FIGURES['images_per_patient']})",
        "",
    ]
    return "\n".join(lines)


def explore(
    entries: pd.DataFrame,
    out_dir: str | os.PathLike,
    source: str,
    vocab: LabelVocabulary = NIH14,
    overwrite: bool = False,
    states: np.ndarray | None = None,
    notes: list[str] | None = None,
) -> dict:
    """Write stats.json, the figures and summary.md into ``out_dir``; return the stats.

    ``out_dir`` is published whole (see :mod:`cxrflow.outputs`): an existing folder is replaced
    only with ``overwrite`` and only if an earlier ``explore`` wrote it. ``states`` (the collection's
    label states, see :mod:`cxrflow.data.uncertain`) add ``label_states``: positives, negatives, uncertain
    and not mentioned per finding; ``findings`` counts positives.
    """
    with publishing(out_dir, "explore", overwrite=overwrite, inputs=[source]) as pub:
        stats = compute_stats(entries, vocab)
        if states is not None:
            from cxrflow.data.uncertain import label_counts

            stats["label_states"] = label_counts(label_matrix(entries, vocab), states, vocab.names)
        for key, fig in make_figures(entries, stats).items():
            save_figure_atomic(fig, pub.tmp / FIGURES[key])
        write_json_atomic(pub.tmp / STATS_NAME, stats)
        left_out = "".join(f"\nLeft out: {n}\n" for n in notes or [])
        write_text_atomic(pub.tmp / SUMMARY_NAME, summary_markdown(stats, source) + left_out)
        pub.commit()
    return stats
