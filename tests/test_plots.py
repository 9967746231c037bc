import numpy as np
from matplotlib.figure import Figure

from cxrflow.data.labels import NIH14
from cxrflow.plots import (
    ordered_epochs,
    plot_auc_curves,
    plot_roc,
    plot_run_comparison,
    plot_training_curves,
    roc_points,
)


def _records():
    recs = []
    for stage, n in (("kt", 2), ("finetune", 3)):
        for e in range(1, n + 1):
            recs.append(
                {"stage": stage, "epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_auc_mean": 0.6 + 0.05 * e}
            )
    return recs


def _labelled(ax):
    return ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_roc_points_hand_computed():
    fpr, tpr = roc_points([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])


def test_roc_figure_has_one_curve_per_finding_with_auc(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random((80, 14)) < 0.3).astype(int)
    y[:, 13] = 0
    p = rng.random((80, 14))
    fig = plot_roc(y, p, NIH14.names)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert _labelled(ax) and "rate" in ax.get_xlabel()
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == 15  # 14 findings + chance
    assert texts[0].startswith("Atelectasis (AUC 0.") and "n/a" in texts[13]
    fig.savefig(tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 10_000


def test_plot_into_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_auc_curves(_records(), ax=ax) is fig
    assert _labelled(ax)


def test_training_curves_both_stages_and_boundary():
    recs = _records() + [{"stage": "kt", "epoch": 2, "train_loss": 9.0, "val_loss": 9.0, "val_auc_mean": 0.5}]
    ordered = ordered_epochs(recs)
    assert [(r["stage"], r["epoch"]) for r in ordered] == [
        ("kt", 1),
        ("kt", 2),
        ("finetune", 1),
        ("finetune", 2),
        ("finetune", 3),
    ]
    assert ordered[1]["train_loss"] == 9.0  # a re-logged epoch (resume): the last record wins
    fig = plot_training_curves(recs)
    loss_ax, auc_ax = fig.axes
    assert all(_labelled(a) for a in (loss_ax, auc_ax)) and fig.get_suptitle()
    assert len(loss_ax.get_lines()) == 3  # train, val, stage boundary
    boundary = loss_ax.get_lines()[-1]
    assert list(boundary.get_xdata()) == [2.5, 2.5]
    assert any("fine-tuning" in t.get_text() for t in loss_ax.texts)


def test_run_comparison():
    rows = [
        {"label": "a", "mean_auc": 0.7, "ci_low": 0.65, "ci_high": 0.75, "paper_mean_auc": 0.68},
        {"label": "b", "mean_auc": None, "ci_low": None, "ci_high": None, "paper_mean_auc": None},
    ]
    fig = plot_run_comparison(rows)
    assert _labelled(fig.axes[0])


def test_run_comparison_draws_an_interval_that_leaves_out_its_estimate():
    # a bootstrap interval of a 4-image test split: the mean AUC lies above it (matplotlib refused
    # the negative error bar and 'cxrflow report' ended in a traceback)
    rows = [{"label": "tiny", "mean_auc": 0.62, "ci_low": 0.30, "ci_high": 0.55, "paper_mean_auc": None},
            {"label": "none", "mean_auc": None, "ci_low": None, "ci_high": None, "paper_mean_auc": 0.7}]  # fmt: skip
    fig = plot_run_comparison(rows)
    assert isinstance(fig, Figure) and fig.axes[0].get_title()
