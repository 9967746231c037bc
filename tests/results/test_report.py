import csv
import json

import numpy as np
import pytest

from cxrflow.cli import main
from cxrflow.data.labels import NIH14
from cxrflow.errors import CxrflowError
from cxrflow.metrics import summarize
from cxrflow.results.report import write_report
from cxrflow.results.table import build_rows, format_markdown, paper_mean_auc


def _evaluation(folder, model, size, stage, signal, seed=0):
    """An evaluation folder as 'cxrflow evaluate' writes it (metrics.json only), beside the
    checkpoint it scored (any bytes: only its hash matters here)."""
    from cxrflow.identity import file_sha256

    checkpoint = folder.parent / f"best_{stage}.pt"
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not checkpoint.exists():
        checkpoint.write_bytes(rng_bytes(seed))
    rng = np.random.default_rng(seed)
    y = (rng.random((120, 14)) < 0.3).astype(np.uint8)
    p = rng.random((120, 14)) + signal * y
    m = summarize(y, p, np.arange(120) // 2, NIH14.names, n_boot=20)
    m.update(
        model=model,
        size=size,
        stage=stage,
        run_name=folder.parent.name,
        checkpoint=f"best_{stage}",
        split="test",
        checkpoint_sha256=file_sha256(checkpoint),
    )
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(m))
    return m


def rng_bytes(seed):
    return np.random.default_rng(seed).bytes(64)


@pytest.fixture
def runs(tmp_path):
    cnn = tmp_path / "cnn"
    _evaluation(cnn / "eval-test-best_finetune", "simple_cnn", 64, "finetune", 0.1)
    res = tmp_path / "res"
    _evaluation(res / "eval-test-best_finetune", "resnet50", 256, "finetune", 0.8, seed=1)
    _evaluation(res / "eval-test-best_kt", "resnet50", 256, "kt", 0.4, seed=2)
    return cnn, res


def test_paper_reference_values():
    assert paper_mean_auc("simple_cnn", 128, "finetune") == 0.6329
    assert paper_mean_auc("resnet50", 512, "finetune") == 0.6901
    assert paper_mean_auc("densenet121", 256, "kt") == 0.6842
    assert paper_mean_auc("densenet121", 64, "kt") is None


def test_rows_best_and_paper_column(runs):
    rows = build_rows(runs)
    assert [(r["run"], r["stage"]) for r in rows] == [("cnn", "finetune"), ("res", "kt"), ("res", "finetune")]
    assert [r["best"] for r in rows] == [False, False, True]
    assert [r["paper_mean_auc"] for r in rows] == [0.6329, 0.6663, 0.6670]
    assert rows[2]["delta_vs_paper"] == pytest.approx(rows[2]["mean_auc"] - 0.6670)


def test_written_tables(runs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    best_line = next(line for line in md.splitlines() if "**best**" in line)
    assert "**res**" in best_line and "fine-tuned" in best_line and "0.6670" in best_line
    assert "| Hernia |" in md and "0.6978" in md  # per-finding table and the paper's full table
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and [t["best"] for t in table] == ["false", "false", "true"]
    metrics = json.loads((runs[1] / "eval-test-best_kt" / "metrics.json").read_text())
    kt = table[1]
    assert float(kt["mean_auc"]) == pytest.approx(metrics["mean_auc"])
    assert float(kt["auc_Cardiomegaly"]) == pytest.approx(metrics["auc"]["Cardiomegaly"])
    assert float(kt["ci95_low"]) == pytest.approx(metrics["mean_auc_ci95"][0])
    assert kt["paper_mean_auc"] == "0.6663"
    assert (out / "comparison.png").stat().st_size > 5000
    # a second run refuses to overwrite without --overwrite
    assert main(["report", str(runs[0]), "--out", str(out)]) == 2
    assert main(["report", str(runs[0]), "--out", str(out), "--overwrite"]) == 0
    assert len(list(csv.DictReader(open(out / "table.csv")))) == 1


def test_nan_finding_reported(tmp_path):
    m = _evaluation(tmp_path / "r" / "eval-test-best_finetune", "simple_cnn", 32, "finetune", 0.5)
    m["nan_findings"] = ["Hernia"]
    m["auc"]["Hernia"] = None
    (tmp_path / "r" / "eval-test-best_finetune" / "metrics.json").write_text(json.dumps(m))
    md = format_markdown(build_rows([tmp_path / "r"]))
    assert "r (fine-tuned): Hernia" in md and "| Hernia | n/a |" in md


def test_missing_or_unevaluated_run_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrflowError, match="cxrflow evaluate"):
        build_rows([tmp_path / "empty"])
    with pytest.raises(CxrflowError, match="no such"):
        write_report([tmp_path / "nope"], tmp_path / "out")


def test_different_vocabularies_are_said_clearly(runs, tmp_path):
    m = _evaluation(tmp_path / "other" / "eval-test-best_finetune", "simple_cnn", 32, "finetune", 0.5)
    every = set(m["label_names"])
    m["label_names"] = m["label_names"][:2]
    for key, value in list(m.items()):  # every per-finding field names the same two findings
        if isinstance(value, dict) and set(value) == every:
            m[key] = {n: value[n] for n in m["label_names"]}
    (tmp_path / "other" / "eval-test-best_finetune" / "metrics.json").write_text(json.dumps(m))
    md = format_markdown(build_rows([runs[0], tmp_path / "other"]))
    assert "use 2 different label vocabularies" in md
    assert "vocabularies" not in format_markdown(build_rows([runs[0]]))


def test_evaluation_of_a_replaced_checkpoint_is_refused_in_one_line(runs, tmp_path, capsys):
    cnn, res = runs
    (res / "best_kt.pt").write_bytes(b"retrained")  # e.g. train --overwrite or --resume wrote a new best_kt
    assert main(["report", str(cnn), str(res), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best_kt.pt changed since this evaluation" in err
    assert "cxrflow evaluate" in err and "--checkpoint best_kt" in err
    assert not (tmp_path / "report").exists()
    (res / "best_kt.pt").unlink()
    assert main(["report", str(res), "--out", str(tmp_path / "report")]) == 2
    assert "is gone" in capsys.readouterr().err
    legacy = tmp_path / "old" / "eval-test-best_finetune"
    _evaluation(legacy, "simple_cnn", 64, "finetune", 0.1)
    m = json.loads((legacy / "metrics.json").read_text())
    del m["checkpoint_sha256"]
    (legacy / "metrics.json").write_text(json.dumps(m))
    assert main(["report", str(legacy.parent), "--out", str(tmp_path / "report")]) == 2
    assert "does not record which checkpoint" in capsys.readouterr().err


def test_a_report_holds_its_output_lock_while_it_builds(runs, tmp_path, monkeypatch):
    """Two reports on one --out at once, both with --overwrite: the second stops naming the first
    instead of replacing its output a moment later (the lock covers the build, not only the rename)."""
    import cxrflow.results.report as report

    out = tmp_path / "report"
    assert main(["report", str(runs[0]), "--out", str(out)]) == 0
    original, second = report.build_rows, []

    def build_rows_while_a_second_report_starts(paths, split="test"):
        if not second:
            second.append(True)
            with pytest.raises(CxrflowError, match="locked by cxrflow report"):
                write_report([runs[1]], out, overwrite=True)
        return original(paths, split)

    monkeypatch.setattr(report, "build_rows", build_rows_while_a_second_report_starts)
    write_report([runs[0], runs[1]], out, overwrite=True)
    assert second and len(list(csv.DictReader(open(out / "table.csv")))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn", "report", "res"]  # no lock, partial or old folder


def test_report_prints_where_it_is_and_the_best_row_not_the_table(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"report: {out / 'report.html'} (open it in a browser)"
    assert lines[1] == "3 evaluations on the test split"
    assert lines[2].startswith("best: res (ResNet-50 256px fine-tuned), mean AUC ") and "the paper's 0.667" in lines[2]
    assert lines[3] == f"tables and figure: table.md, table.csv, comparison.png in {out}/"
    assert len(lines) == 4 and not any("|" in line for line in lines)


@pytest.mark.slow
def test_table1_per_finding_block_is_the_evaluations_own_numbers(tmp_path):
    """Prevalence, AUPRC, TP/FP/FN/TN and sensitivity/specificity with their intervals, read from
    metrics.json (not recomputed), in table.md, table.csv and report.html's Table 1."""
    from cxrflow.testing.synthstudy import write_study

    study = write_study(tmp_path, runs=(("resnet50", 256, ("finetune",)),), ensemble=False, localization=False)
    (folder,) = study["evaluations"]
    m = json.loads((folder / "metrics.json").read_text())
    write_report(study["runs"], tmp_path / "report")
    md = (tmp_path / "report" / "table.md").read_text()
    block = md[md.index("## Per finding, at the operating threshold") :]
    for n in m["label_names"]:
        c, a, s, sp = m["counts"][n], m["auprc_ci95"][n], m["sensitivity_ci95"][n], m["specificity_ci95"][n]
        assert (
            f"| {n} | {m['positives'][n]} | {100 * m['prevalence'][n]:.1f}% | {m['auc'][n]:.3f} "
            f"({m['auc_ci95'][n][0]:.3f}–{m['auc_ci95'][n][1]:.3f}) | {m['auprc'][n]:.3f} ({a[0]:.3f}–{a[1]:.3f}) | "
            f"{m['threshold'][n]:.3f} | {c['tp']} | {c['fp']} | {c['fn']} | {c['tn']} | "
            f"{m['sensitivity'][n]:.3f} ({s[0]:.3f}–{s[1]:.3f}) | {m['specificity'][n]:.3f} ({sp[0]:.3f}–{sp[1]:.3f}) |"
        ) in block, n
        assert c["tp"] + c["fp"] + c["fn"] + c["tn"] == m["n_images"]
    (row,) = list(csv.DictReader(open(tmp_path / "report" / "table.csv")))
    n = m["label_names"][2]
    assert float(row[f"auprc_{n}"]) == m["auprc"][n] and float(row[f"auprc_high_{n}"]) == m["auprc_ci95"][n][1]
    assert (
        int(row[f"fn_{n}"]) == m["counts"][n]["fn"]
        and float(row[f"specificity_low_{n}"]) == m["specificity_ci95"][n][0]
    )
    assert float(row[f"prevalence_{n}"]) == m["prevalence"][n]
    page = (tmp_path / "report" / "report.html").read_text()
    details = page[
        page.index('<details class="per-finding">') : page.index("</details>", page.index('class="per-finding"'))
    ]
    c = m["counts"][n]
    assert (
        f'<td class="n">{c["tp"]}</td><td class="n">{c["fp"]}</td><td class="n">{c["fn"]}</td><td class="n">{c["tn"]}</td>'
        in details
    )
