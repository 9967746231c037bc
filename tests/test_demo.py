import json

import pytest

from cxrflow.demo import format_summary, run_demo
from cxrflow.errors import CxrflowError


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, spark):
    out = tmp_path / "demo"
    lines = []
    summary = run_demo(out, patients=150, image_size=64, sizes=(32, 48), epochs=1, spark=spark, echo=lines.append)
    runs = out / "sweep" / "runs"
    for folder in (runs / "simple_cnn-48" / "eval-test-best_finetune", runs / "densenet121-32" / "eval-test-best_kt",
                   runs / "densenet121-32" / "eval-test-best_finetune"):  # fmt: skip
        for name in ("metrics.json", "predictions.parquet", "roc.png", "curves.png"):
            assert (folder / name).is_file(), folder / name
    assert (out / "sweep" / "report" / "table.md").is_file() and (out / "explore").is_dir()
    html = (out / "sweep" / "report" / "report.html").read_text()
    assert 'id="data"' in html and 'id="cases"' in html and "Images per finding" in html  # explore figures too
    assert (out / "store" / "_manifest.json").is_file()
    assert set(summary["mean_test_auc"]) == {"simple_cnn-48 finetune", "densenet121-32 kt", "densenet121-32 finetune"}
    best = summary["best"]
    assert best["mean_auc"] == max(v["mean_auc"] for v in summary["mean_test_auc"].values())
    # the target, checked against the best run's own predictions with scikit-learn (not by the demo's code)
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    table = pd.read_parquet(runs / best["run"] / f"eval-test-best_{best['stage']}" / "predictions.parquet")
    names = [c[len("label_") :] for c in table.columns if c.startswith("label_")]
    aucs = [roc_auc_score(table[f"label_{n}"], table[f"prob_{n}"]) for n in names if table[f"label_{n}"].nunique() == 2]
    assert len(aucs) >= 10 and sum(aucs) / len(aucs) == pytest.approx(best["mean_auc"], abs=1e-6)
    assert sum(aucs) / len(aucs) >= 0.85 and summary["target_met"]
    assert json.loads((out / "summary.json").read_text())["best"] == best
    text = format_summary(summary)
    first = text.split("== summary\n", 1)[1].splitlines()[0]
    assert first.startswith("open the report: ") and first.endswith("report.html")
    assert "table.md" in text and "roc.png" in text and f"{best['mean_auc']:.4f}" in text
    assert any("== predict" in line for line in lines)
    print(summary["seconds"])
    # re-running needs --overwrite, which only ever deletes a demo folder
    with pytest.raises(CxrflowError, match="--overwrite"):
        run_demo(out, spark=spark)


def test_overwrite_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(CxrflowError, match="not a cxrflow demo output"):
        run_demo(tmp_path, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
