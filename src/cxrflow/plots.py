"""Figures of the paper: ROC curves per finding (its Figure 5), loss and AUC per epoch (Figure 4),
and a comparison of runs against the paper's published mean AUCs.

Every function takes an optional matplotlib ``ax``, draws into it (or into a new figure) and
returns the figure; nothing calls ``show()``. Figures are built with :class:`matplotlib.figure.Figure`
directly (Agg canvas, no pyplot state), so they work headless and are freed when dropped.
The CLI commands save them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxrflow.metrics import binary_auc, roc

STAGE_TITLES = {"kt": "KT (frozen backbone)", "finetune": "fine-tuning"}
STAGE_SHORT = {"kt": "KT", "finetune": "fine-tuning"}
STAGE_ORDER = ("kt", "finetune")


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def roc_points(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of every threshold, from (0, 0) to (1, 1)."""
    fpr, tpr, _ = roc(labels, probs)
    return fpr, tpr


def plot_roc(
    labels: np.ndarray,
    probs: np.ndarray,
    label_names: Sequence[str],
    *,
    aucs: Sequence[float | None] | None = None,
    title: str = "ROC curves per finding",
    ax: Axes | None = None,
) -> Figure:
    """One ROC curve per finding with its AUC in the legend; findings with one class are listed as n/a."""
    labels = np.asarray(labels)
    probs = np.asarray(probs)
    fig, ax = _new_axes(ax, (7.5, 7.5))
    colors = [_color(i) for i in range(len(label_names))]
    for j, name in enumerate(label_names):
        auc = aucs[j] if aucs is not None else binary_auc(labels[:, j], probs[:, j])
        if auc is None or np.isnan(auc):
            ax.plot([], [], color=colors[j], ls=_linestyle(j), label=f"{name} (AUC n/a: one class)")
            continue
        fpr, tpr = roc_points(labels[:, j], probs[:, j])
        ax.plot(fpr, tpr, color=colors[j], ls=_linestyle(j), lw=1.4, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="chance (AUC 0.500)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate = 1 - specificity (fraction of negatives)")
    ax.set_ylabel("True positive rate = sensitivity (fraction of positives)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5, framealpha=0.85)
    return fig


#: Okabe-Ito colours: told apart with every common colour-vision deficiency (black left for chance lines).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
#: Past seven curves the line style tells them apart too.
LINE_STYLES = ("-", "--", ":")


def _color(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _linestyle(i: int) -> str:
    return LINE_STYLES[(i // len(OKABE_ITO)) % len(LINE_STYLES)]


def plot_reliability(
    labels: np.ndarray,
    curves: Mapping[str, np.ndarray],
    *,
    bins: int = 15,
    title: str = "Reliability diagram (all findings pooled)",
    ax: Axes | None = None,
    mask: np.ndarray | None = None,
) -> Figure:
    """Observed frequency against mean predicted probability in equal-width bins, one line per
    entry of ``curves`` (e.g. ``{"before (ECE 0.21)": raw, "after (ECE 0.03)": calibrated}``),
    every (image, finding) pair pooled (only those where ``mask`` is true); the diagonal is perfect
    calibration. Each point is labelled with how many pairs its bin holds, and the bars at the
    bottom (right axis, log scale) show the same counts, so a point from a nearly empty bin shows."""
    from sklearn.calibration import calibration_curve

    keep = np.ones(np.shape(labels), bool).ravel() if mask is None else np.asarray(mask).astype(bool).ravel()
    y = np.asarray(labels).astype(int).ravel()[keep]
    fig, ax = _new_axes(ax, (6.5, 6.5))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    edges = np.linspace(0.0, 1.0, bins + 1)
    bars = ax.inset_axes((0.0, 0.0, 1.0, 0.2), sharex=ax)  # the bin counts, inside the bottom of the plot
    for i, (name, probs) in enumerate(curves.items()):
        p = np.asarray(probs, dtype=np.float64).ravel()[keep]
        observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="uniform")
        counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=bins)  # calibration_curve's bins
        colour = ("tab:red", "tab:blue", "tab:green")[i % 3]
        ax.plot(predicted, observed, "o-", ms=4, color=colour, label=name)
        for x, o, n in zip(predicted, observed, counts[counts > 0]):
            ax.annotate(f"{n}", (x, o), textcoords="offset points", xytext=(3, 3 + 8 * i), fontsize=6, color=colour)
        bars.bar(edges[:-1] + (i + 0.5) / (len(curves) + 1) / bins, np.where(counts > 0, counts, np.nan), width=1 / bins / (len(curves) + 1),
                 color=colour, alpha=0.25, align="edge")  # fmt: skip
    bars.set_yscale("log")
    bars.set_ylim(0.8, max(10.0, float(len(y))) * 1.5)
    bars.patch.set_alpha(0.0)
    bars.tick_params(labelbottom=False, labelsize=6, direction="in", pad=-14)
    bars.set_ylabel("pairs (log)", fontsize=6, labelpad=-28)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(
        f"Mean predicted probability in the bin ({bins} equal-width bins)\nnumbers and bars: (image, finding) pairs in the bin"
    )
    ax.set_ylabel("Observed frequency of the finding in the bin (fraction of images)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def ordered_epochs(records: Iterable[Mapping]) -> list[dict]:
    """Epoch records of ``metrics.jsonl`` in training order, one per (stage, epoch).

    A resumed run may log an epoch twice; the last record wins. Stages run kt first, then finetune.
    """
    latest: dict[tuple[str, int], dict] = {}
    for rec in records:
        latest[(str(rec["stage"]), int(rec["epoch"]))] = dict(rec)
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    return [latest[key] for key in sorted(latest, key=lambda k: (rank.get(k[0], len(rank)), k[1]))]


def _stage_spans(recs: list[dict]) -> list[tuple[str, int, int]]:
    """(stage, first x, last x) of each stage, x = 1-based position in training order."""
    spans: list[tuple[str, int, int]] = []
    for x, rec in enumerate(recs, start=1):
        if spans and spans[-1][0] == rec["stage"]:
            spans[-1] = (spans[-1][0], spans[-1][1], x)
        else:
            spans.append((rec["stage"], x, x))
    return spans


def _mark_stages(ax: Axes, recs: list[dict]) -> None:
    """A dotted line between stages (in the legend) and each stage's name above its epochs."""
    from matplotlib.ticker import MaxNLocator

    spans = _stage_spans(recs)
    for i, (stage, first, last) in enumerate(spans):
        if i > 0:
            prev = STAGE_SHORT.get(spans[i - 1][0], spans[i - 1][0])
            ax.axvline(
                first - 0.5,
                color="0.3",
                ls=":",
                lw=1.2,
                label=f"stage boundary ({prev} -> {STAGE_SHORT.get(stage, stage)})",
            )
        wide = last - first >= 2 or len(spans) == 1
        ax.text(
            (first + last) / 2,
            1.0,
            STAGE_TITLES.get(stage, stage) if wide else STAGE_SHORT.get(stage, stage),
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.3",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _values(recs: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in recs])


def plot_loss_curves(
    records: Iterable[Mapping], *, title: str = "Training and validation loss", ax: Axes | None = None
) -> Figure:
    """Train and validation loss per epoch over both stages, stage boundary marked."""
    recs = ordered_epochs(records)
    fig, ax = _new_axes(ax, (7.0, 4.5))
    x = np.arange(1, len(recs) + 1)
    ax.plot(x, _values(recs, "train_loss"), "o-", label="train loss")
    ax.plot(x, _values(recs, "val_loss"), "s-", label="validation loss")
    _mark_stages(ax, recs)
    ax.set_xlabel("Epoch (both stages, counted in training order)")
    ax.set_ylabel("Loss (weighted BCE per finding, mean over images)")
    ax.set_title(title, pad=16)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_auc_curves(
    records: Iterable[Mapping], *, title: str = "Validation mean AUC", ax: Axes | None = None
) -> Figure:
    """Mean validation AUC per epoch over both stages, stage boundary marked."""
    recs = ordered_epochs(records)
    fig, ax = _new_axes(ax, (7.0, 4.5))
    x = np.arange(1, len(recs) + 1)
    ax.plot(x, _values(recs, "val_auc_mean"), "o-", color="tab:green", label="validation mean AUC")
    _mark_stages(ax, recs)
    ax.set_xlabel("Epoch (both stages, counted in training order)")
    ax.set_ylabel("Mean ROC AUC (0.5 = chance, 1 = perfect)")
    ax.set_title(title, pad=16)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_training_curves(records: Iterable[Mapping], *, title: str = "Training curves") -> Figure:
    """Loss (left) and validation AUC (right) side by side: the paper's Figure 4 for one run."""
    recs = ordered_epochs(records)
    fig = Figure(figsize=(13.0, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    plot_loss_curves(recs, ax=left)
    plot_auc_curves(recs, ax=right)
    fig.suptitle(title)
    return fig


def plot_run_comparison(
    rows: Sequence[Mapping],
    *,
    title: str = "Mean test AUC per run (95% CI, patient bootstrap) vs the paper",
    ax: Axes | None = None,
) -> Figure:
    """Horizontal bars of each run's mean AUC with its interval; the paper's value as a marker.

    ``rows`` are report rows with ``label``, ``mean_auc``, ``ci_low``, ``ci_high`` and ``paper_mean_auc``.
    """
    fig, ax = _new_axes(ax, (10.0, 2.4 + 0.45 * max(len(rows), 1)))
    y = np.arange(len(rows))[::-1]
    mean = np.array([np.nan if r.get("mean_auc") is None else r["mean_auc"] for r in rows], dtype=float)
    lo = np.array([np.nan if r.get("ci_low") is None else r["ci_low"] for r in rows], dtype=float)
    hi = np.array([np.nan if r.get("ci_high") is None else r["ci_high"] for r in rows], dtype=float)
    # a percentile interval of a tiny test split can leave out its own point estimate; matplotlib
    # refuses negative error bars (a traceback in 'cxrflow report'), so the whisker stops at the bar
    err = np.clip(np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)]), 0, None)
    ax.barh(y, np.nan_to_num(mean), xerr=err, color="tab:blue", alpha=0.75, capsize=3, label="cxrflow (mean, 95% CI)")
    paper = np.array([np.nan if r.get("paper_mean_auc") is None else r["paper_mean_auc"] for r in rows], dtype=float)
    if np.isfinite(paper).any():
        ax.plot(paper, y, "D", color="tab:red", label="paper (published mean)")
    ax.set_yticks(y, [str(r["label"]) for r in rows], fontsize=8)
    ax.set_xlim(0.5, 1.0)
    ax.axvline(0.5, color="0.6", lw=1)
    ax.set_xlabel("Mean ROC AUC over findings (0.5 = chance, 1 = perfect)")
    ax.set_ylabel("Run (model, input size px, stage)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
