import base64
import html as htmlmod
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrflow.cli import main
from cxrflow.data.labels import LabelVocabulary
from cxrflow.errors import CxrflowError
from cxrflow.modelling.config import resolve_config
from cxrflow.results.htmlreport import build_context, build_html, render
from cxrflow.testing.synthstore import write_synthetic_store
from cxrflow.testing.synthstudy import write_evaluation, write_run_config, write_study


class Page(HTMLParser):
    """The parts of a page the tests look at: section ids, images, tables, text."""

    def __init__(self, html: str):
        super().__init__()
        self.sections, self.images, self.tables, self.links = [], [], [], []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "img":
            self.images.append(a)
        elif tag == "table":
            self.tables.append({"attrs": a, "rows": []})
        elif tag == "tr" and self.tables:
            self._row = []
            self.tables[-1]["rows"].append(self._row)
        elif tag in ("td", "th"):
            self._cell = []
        for key in ("href", "src"):
            if key in a:
                self.links.append(a[key])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def _explore(tmp):
    from cxrflow.data.explore import explore
    from cxrflow.data.metadata import load_release
    from cxrflow.data.synth import synthesize

    synthesize(tmp / "data", patients=20, size=32, seed=0)
    release = load_release(tmp / "data", need_images=False)
    explore(release.entries, tmp / "explore", "synthetic")
    return tmp / "explore"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    s = write_study(
        root,
        runs=[("simple_cnn", 64, ("finetune",)), ("resnet50", 256, ("kt", "finetune"))],
        test_rows=24,
        store_size=64,
        checkpoints=True,
        synthetic=False,
    )  # stands in for the NIH release
    s["explore"] = _explore(root)
    return s


@pytest.fixture(scope="module")
def report(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    args = [
        "report",
        *map(str, study["runs"]),
        str(study["ensemble"]),
        "--out",
        str(out),
        "--explore",
        str(study["explore"]),
    ]
    assert main(args) == 0
    return out / "report.html"


def _metrics(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())


def _thumbnails(folder, n):
    """How many case thumbnails an evaluation gives: per finding n of each kind, fewer where the split
    lacks them (false positives and negatives at the evaluation's threshold)."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(folder) / "predictions.parquet")
    names = [c[len("label_") :] for c in table.column_names if c.startswith("label_")]
    thresholds = _metrics(folder)["threshold"]
    total = 0
    for name in names:
        y = table.column(f"label_{name}").to_numpy() > 0.5
        if thresholds.get(name) is None:  # no threshold: ranked, n of each kind as far as the split has them
            total += min(n, int((~y).sum())) + 2 * min(n, int(y.sum()))
            continue
        called = table.column(f"prob_{name}").to_numpy().astype(np.float64) >= thresholds[name]
        total += min(n, int((called & ~y).sum())) + min(n, int((~called & y).sum())) + min(n, int(y.sum()))
    return total


def test_every_section_with_the_numbers_of_the_run_folders(study, report):
    html = report.read_text()
    page = Page(html)
    assert page.sections == ["data", "table1", "runs", "cases", "reproduce"]
    text = page.all_text
    table1 = next(t for t in page.tables if t["attrs"].get("class") == "sortable")
    body = [r for r in table1["rows"][1:] if len(r) > 8]
    assert len(body) == 3 + 1 + 2  # three evaluations, the ensemble, two published anchors
    for folder in [*study["evaluations"], study["ensemble"]]:
        m = _metrics(folder)
        row = next(r for r in body if r[0].startswith(Path(m["run"]).name if "run" in m else folder.name) and
                   r[6] == f"{m['mean_auc']:.4f}")  # fmt: skip
        assert row[7] == f"{m['mean_auc_ci95'][0]:.3f}–{m['mean_auc_ci95'][1]:.3f}"
        assert row[10] == f"{m['calibration']['ece_mean']['before']:.4f}"  # ECE raw, beside paper and delta
        assert row[12] == f"{m['auc']['Atelectasis']:.3f}"
    cnn = next(r for r in body if r[0].startswith("simple_cnn-64"))
    assert cnn[8] == "0.6329"  # the paper's simple CNN, beside the matching run
    wang = next(r for r in body if r[0].startswith("Wang et al. 2017"))
    assert "ResNet-50" in wang[0] and wang[1] == "official split" and wang[2] == "0.745"
    # per run: operating points from metrics.json, localization, members of the ensemble
    kt = _metrics(study["evaluations"][1])
    ops = [t for t in page.tables if t["rows"] and t["rows"][0][:3] == ["Finding", "Positives", "AUC"]]
    assert len(ops) == 4
    mass = next(r for r in ops[1]["rows"] if r[0] == "Mass")
    assert mass[4:7] == [
        f"{kt['threshold']['Mass']:.3f}",
        f"{kt['sensitivity']['Mass']:.3f}",
        f"{kt['specificity']['Mass']:.3f}",
    ]
    assert "Localization" in text and "Accuracy (IoBB)" in text and "Members:" in text
    alts = [img["alt"] for img in page.images]
    assert sum(a.startswith("ROC curves per finding") for a in alts) == 4
    assert sum(a.startswith("Reliability diagram") for a in alts) == 4
    assert sum(a.startswith("Training curves") for a in alts) == 2
    assert any(a.startswith("Heatmaps of gradcam") for a in alts)
    assert sum(a.startswith("Images per finding") for a in alts) == 1  # explore figures
    # cases of the best evaluation, thumbnails read from the store
    assert sum(bool(re.match(r"test_\d+\.png: probability of", a)) for a in alts) == _thumbnails(study["ensemble"], 3)
    # reproduce: version, manifest hash, configs
    sha = __import__("hashlib").sha256((study["store"] / "_manifest.json").read_bytes()).hexdigest()
    assert sha in text and "cxrflow train --config" in text and '"model": "resnet50"' in text


def test_self_contained_escaped_and_small(report):
    html = report.read_text()
    page = Page(html)
    assert page.images and all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert all(img.get("alt") for img in page.images)
    for img in page.images[:5] + page.images[-5:]:
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as im:
            assert im.width > 0
    assert not [u for u in page.links if not (u.startswith("#") or u.startswith("data:"))]
    assert "<link" not in html and "@import" not in html and 'src="http' not in html
    assert report.stat().st_size < 10 * 2**20


def test_rerun_script_rebuilds_each_run_config(study, tmp_path):
    logs = study["root"] / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / "resnet50-256.log"
    log.write_text("\n$ cxrflow train --config c.json --out x\nepoch 1 ...\n$ cxrflow evaluate --run x\n")
    try:
        ctx = build_context([*study["runs"]], cases=0)
    finally:  # the study is shared by the module: later tests see it as the fixture made it, in any order
        log.unlink()
    assert [r["commands"] for r in ctx["reproduce"]["runs"]] == [
        [],
        ["cxrflow train --config c.json --out x", "cxrflow evaluate --run x"],
    ]
    assert "cxrflow evaluate --run x" in render(ctx)
    script = ctx["reproduce"]["script"]
    blocks = re.findall(r"cat > rerun-configs/(\S+)\.json <<'EOF'\n(.*?)\nEOF", script, re.S)
    assert [b[0] for b in blocks] == ["simple_cnn-64", "resnet50-256"]
    for name, text in blocks:
        (tmp_path / f"{name}.json").write_text(text)
        config = resolve_config(None, tmp_path / f"{name}.json", {"out": str(tmp_path / name)})  # as --out gives it
        saved = json.loads((study["root"] / "runs" / name / "config.json").read_text())
        assert (config.model, config.size, config.kt.epochs, config.finetune.lr) == (
            saved["model"], saved["size"], saved["kt"]["epochs"], saved["finetune"]["lr"])  # fmt: skip
    run = study["runs"][1]
    assert f"cxrflow evaluate --run {run} --checkpoint best_kt --split test --n-boot 50 --seed 0" in script
    assert f"cxrflow train --config rerun-configs/resnet50-256.json --out {run}" in script
    assert script.rstrip().endswith("--out REPORT")


def test_git_commit_only_of_cxrflow_own_checkout(tmp_path):
    from cxrflow.results.study import git_commit

    commit = git_commit()
    here = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if here.returncode == 0 and Path(__file__).parents[2].joinpath("src", "cxrflow").resolve() == Path(
        __import__("cxrflow").__file__).parent.resolve():  # fmt: skip
        assert commit is not None and commit.startswith(here.stdout.strip())
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(tmp_path),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    (tmp_path / "cxrflow").mkdir()
    assert git_commit(tmp_path / "cxrflow") is None  # another repository: not cxrflow's commit


def test_sections_without_data_are_absent(tmp_path):
    s = write_study(tmp_path, runs=[("resnet50", 64, ("finetune",))], test_rows=12, store_size=32,
                    calibrated=False, localization=False, ensemble=False)  # fmt: skip
    m = _metrics(s["evaluations"][0])
    del m["store"]
    (s["evaluations"][0] / "metrics.json").write_text(json.dumps(m))
    page = Page(build_html(s["runs"], cases=0))
    assert page.sections == ["table1", "runs", "reproduce"]
    text = page.all_text
    header = page.tables[0]["rows"][0]
    assert "ECE" not in text and "Localization" not in text and "Paper" not in header and "Mean AUC" in header
    assert not [i for i in page.images if i["alt"].startswith("Reliability")]


@pytest.mark.slow
def test_names_from_files_are_text_and_vocabularies_get_their_own_table(study, tmp_path):
    vocab = LabelVocabulary(("<b>Mass</b>", "Nodule & co"), no_finding=None)
    store = tmp_path / "odd<store>"
    write_synthetic_store(store, sizes=(32,), rows={"train": 8, "val": 4, "test": 16}, vocab=vocab)
    run = tmp_path / "run<script>alert(1)</script>"
    write_run_config(run, store, "simple_cnn", 32, vocab.names)
    write_evaluation(run / "eval-test-best_finetune", run, store, model="simple_cnn", size=32, stage="finetune",
                     signal=1.0, seed=0, store_size=32)  # fmt: skip
    html = build_html([run, study["runs"][0]], cases=1)
    assert "<b>Mass</b>" not in html and "<script>alert(1)" not in html
    assert "&lt;b&gt;Mass&lt;/b&gt;" in html and "Nodule &amp; co" in html and "odd&lt;store&gt;" in html
    page = Page(html)
    assert len([t for t in page.tables if t["attrs"].get("class") == "sortable"]) == 2
    assert "use 2 different label vocabularies: one table per vocabulary" in page.all_text


def test_unreadable_figure_is_named_and_the_page_still_builds(study, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(study["runs"][0], run)
    (run / "eval-test-best_finetune" / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    page = Page(build_html([run], cases=0))
    assert "roc.png could not be shown" in page.all_text
    assert [i for i in page.images if i["alt"].startswith("Training curves")]


@pytest.mark.slow
def test_moved_store_builds_without_thumbnails_and_says_why(tmp_path):
    s = write_study(tmp_path, runs=[("simple_cnn", 64, ("finetune",))], test_rows=12, store_size=32,
                    localization=False, ensemble=False)  # fmt: skip
    moved = tmp_path / "far" / "away" / "moved-store"  # where no search for a moved store looks
    moved.parent.mkdir(parents=True)
    s["store"].rename(moved)
    page = Page(build_html(s["runs"], cases=2))
    assert "cases" in page.sections
    text = page.all_text
    assert f"store {s['store']} is no longer at the path recorded at evaluation" in text and "--store" in text
    assert not [i for i in page.images if i["alt"].startswith("test_")]
    assert "test_0000" in text  # the cases are still listed, by image id
    page = Page(build_html(s["runs"], cases=2, store=moved))
    assert len([i for i in page.images if i["alt"].startswith("test_")]) == _thumbnails(s["evaluations"][0], 2)


@pytest.mark.parametrize("field, value", [("rows", "x"), ("split_identity", 5), ("pos_weight", "x")])
def test_a_store_manifest_of_the_wrong_shape_is_named_and_the_page_still_builds(tmp_path, field, value):
    s = write_study(tmp_path, runs=[("simple_cnn", 64, ("finetune",))], test_rows=12, store_size=32,
                    localization=False, ensemble=False)  # fmt: skip
    manifest = s["store"] / "_manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), field: value}))
    text = Page(build_html(s["runs"], cases=2)).all_text
    assert f"store manifest {manifest}: manifest field '{field}' must be" in text
    assert "test_0000" in text  # the cases are still listed, by image id


def test_heatmap_overlays_where_localization_exists(study, one_torch_thread, tmp_path):
    import torch

    from cxrflow.modelling.inference import model_input

    calls = []

    def saliency(model, image, finding, *, method, pixel_mean, pixel_std, device):
        calls.append(method)
        x = model_input(torch.from_numpy(image.copy())[None, None], pixel_mean, pixel_std, device).requires_grad_()
        model(x)[0, finding].backward()
        g = x.grad.abs().sum(dim=1)[0]
        return (g / g.max().clamp_min(1e-12)).numpy()

    ctx = build_context([study["runs"][0]], cases=1, heatmap_fn=saliency)
    items = [i for f in ctx["cases"][0]["findings"] for k in f["kinds"] for i in k["items"]]
    assert items and all("overlay_uri" in i for i in items) and set(calls) == {"gradcam"}
    assert render(ctx).count('alt="Heatmap for ') == len(items)
    # a run without localization output gets no overlays
    ctx = build_context([study["runs"][1]], cases=1, heatmap_fn=saliency)
    assert not ctx["cases"][0]["overlays"]
    # a run whose checkpoint changed since the evaluation is refused in one line: its
    # numbers and heatmaps would belong to another model
    run = tmp_path / "run"
    shutil.copytree(study["runs"][0], run)
    metrics = _metrics(run / "eval-test-best_finetune")
    shutil.copyfile(metrics["checkpoint_path"], run / "best_finetune.pt")
    metrics.update(checkpoint_path=str(run / "best_finetune.pt"), checkpoint_sha256="0" * 64)
    (run / "eval-test-best_finetune" / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(CxrflowError, match="best_finetune.pt changed since this evaluation"):
        build_context([run], cases=1, heatmap_fn=saliency)


def _localization_tables(page: Page) -> list[dict]:
    return [t for t in page.tables if t["rows"] and t["rows"][0][:2] == ["Finding", "Boxes"]]


def test_rerun_script_rebuilds_ensembles_and_other_formats_stores(study, report):
    """The rerun script made the ensemble a comment (the report command after it then failed on a
    missing folder) and left out the store's --format and --views."""
    import html as htmlmod
    import shlex

    from cxrflow.results.reproduce import rerun_script

    script = htmlmod.unescape(
        re.search(r"re-run the study</h3>\s*<pre><code>(.*?)</code>", report.read_text(), re.S).group(1)
    )
    ens = _metrics(study["ensemble"])
    line = next(x for x in script.splitlines() if x.startswith("cxrflow ensemble "))
    args = shlex.split(line)
    assert args[2 : 2 + len(ens["members"])] == [m["eval"] for m in ens["members"]]
    assert args[args.index("--out") + 1] == str(study["ensemble"]) and args[args.index("--method") + 1] == ens["method"]
    assert script.index(line) < script.index("cxrflow report ")
    manifest = {
        "source": {"data_dir": "/data/CheXpert-v1.0-small"},
        "split": {"seed": 0, "val_fraction": 0.3},
        "sizes": [256],
        "format": "chexpert",
        "views": "all",
    }
    etl = rerun_script([], [], {"s": {"manifest": manifest, "path": "cx-store", "sha256": "0"}}, []).splitlines()
    assert (
        "cxrflow etl --data /data/CheXpert-v1.0-small --out cx-store --sizes 256 --seed 0 --val-fraction 0.3 --format chexpert --views all"
        in etl
    )
    manifest = {
        "source": {"data_dir": "/data/nih"},
        "sizes": [256],
        "split": {"mode": "split-csv", "split_csv": "/s/split.csv", "seed": 0},
    }
    etl = rerun_script([], [], {"s": {"manifest": manifest, "path": "st", "sha256": "0"}}, []).splitlines()
    assert "cxrflow etl --data /data/nih --out st --sizes 256 --seed 0 --split-csv /s/split.csv" in etl


def test_rerun_script_names_ensemble_members_by_the_runs_it_trains(tmp_path, monkeypatch):
    """An ensemble's members are recorded with absolute paths; the script trains its runs at the paths
    the report was given, so it names the members there too."""
    from cxrflow.results.reproduce import rerun_script

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    runs = [{"ensemble": False, "path": "runs/a", "config": None, "evaluations": []}]
    members = [
        {"eval": str(tmp_path / "runs" / "a" / "eval-test-best_finetune")},
        {"eval": "/elsewhere/b/eval-test-last"},
    ]
    ens = {"ensemble": True, "folder": Path("ens"), "metrics": {"method": "mean", "members": members}}
    lines = rerun_script([ens], runs, {}, ["ens"]).splitlines()
    assert (
        "cxrflow ensemble runs/a/eval-test-best_finetune /elsewhere/b/eval-test-last --out ens --method mean" in lines
    )


def test_split_modes_of_every_format_are_named():
    """MIMIC's official split.csv and a CSV's split column ('official-split') read in words like NIH's lists."""
    from cxrflow.results.study import split_name

    modes = ("official-lists", "official-split", "patients-70-10-20", "split-csv")
    named = {m: split_name({"manifest": {"split": {"mode": m}}}) for m in modes}
    assert named == {
        "official-lists": "official (the NIH release's test_list.txt)",
        "official-split": "the collection's own train/val/test split",
        "patients-70-10-20": "patient split (random 70/10/20 by patient)",
        "split-csv": "as given by --split-csv",
    }
    # "official" only for the NIH release itself: another collection's list, or a synthetic NIH-format one, is not
    chexpert = split_name({"manifest": {"format": "chexpert", "split": {"mode": "official-lists"}}})
    synthetic = split_name(
        {"manifest": {"synthetic": {"generator": "cxrflow synth"}, "split": {"mode": "official-lists"}}}
    )
    assert chexpert == "the collection's test list" and synthetic == "the synthetic collection's test list"
    assert "official" not in chexpert + synthetic


def test_localization_table_has_the_iou_thresholds_and_the_overall_box_count(study, report):
    """The IoU columns are headed by the IoU thresholds localize scores (0.1 ... 0.7, not the
    IoBB ones), each cell is localization.json's figure, and the overall row counts every box."""
    (table,) = _localization_tables(Page(report.read_text()))
    loc = json.loads(next(Path(study["runs"][0]).glob("localize-*/localization.json")).read_text())
    iobb, iou = sorted(loc["accuracy_iobb"], key=float), sorted(loc["accuracy_iou"], key=float)
    assert len(iou) == 7 and table["rows"][1] == [f"≥ {t}" for t in [*iobb, *iobb, *iou]]
    for row in table["rows"][2:]:
        name, boxes, cells = row[0], row[1], row[2:]
        assert boxes == str(sum(loc["n_boxes"].values()) if name == "overall" else loc["n_boxes"][name])
        assert cells[2 * len(iobb) : 2 * len(iobb) + len(iou)] == [f"{loc['accuracy_iou'][t][name]:.3f}" for t in iou]


@pytest.mark.slow
def test_localization_of_a_checkpoint_the_run_no_longer_holds_is_left_out(study, one_torch_thread, tmp_path):
    """A localize-* table, its gallery and the overlays it feeds belong to one checkpoint."""
    import pyarrow.dataset as ds
    import torch

    from cxrflow.results.htmlreport import default_heatmap_fn

    run = tmp_path / "run"
    shutil.copytree(study["runs"][0], run)
    shutil.rmtree(run / "localize-test-best_finetune")  # the study's stand-in; localize for real below
    shutil.copyfile(run / "best_finetune.pt", run / "last.pt")
    test_ids = (
        ds.dataset(study["store"] / "size=64" / "split=test").to_table(columns=["image_id"]).column(0).to_pylist()
    )
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        + "".join(f"{i},Mass,10,10,20,20\n" for i in sorted(test_ids)[:3])
    )
    for checkpoint in ("best_finetune", "last"):
        assert main(["localize", "--run", str(run), "--checkpoint", checkpoint, "--bbox", str(boxes),
                     "--store", str(study["store"]), "--device", "cpu"]) == 0  # fmt: skip
    heatmap = default_heatmap_fn()
    page = Page(render(build_context([run], cases=1, heatmap_fn=heatmap)))
    assert len(_localization_tables(page)) == 2 and "Left out" not in page.all_text

    checkpoint = torch.load(run / "last.pt", weights_only=True)
    checkpoint["epoch"] += 1  # trained on since: last.pt is another model, its localization describes the old one
    torch.save(checkpoint, run / "last.pt")
    ctx = build_context([run], cases=1, heatmap_fn=heatmap)
    page = Page(render(ctx))
    assert len(_localization_tables(page)) == 1  # best_finetune's, which still matches its checkpoint
    assert sum(img["alt"].startswith("Heatmaps of hirescam") for img in page.images) == 1
    note = "Left out, not made from the checkpoint the run holds now: last.pt changed since this localization (retrained or resumed; it scored finetune epoch 3)"
    assert note in page.all_text and f"cxrflow localize --run {run.resolve()} --checkpoint last" in page.all_text
    assert ctx["cases"][0]["overlays"]  # overlays come from the current localization

    shutil.rmtree(run / "localize-test-best_finetune")  # only the stale one left: no table, no overlays
    ctx = build_context([run], cases=1, heatmap_fn=heatmap)
    page = Page(render(ctx))
    assert not _localization_tables(page) and note in page.all_text
    assert (
        not ctx["cases"][0]["overlays"] and "localization output is for an older checkpoint" in ctx["cases"][0]["note"]
    )


def test_run_without_evaluation_is_one_line_naming_the_command(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cxrflow evaluate --run {tmp_path / 'run'}" in err


@pytest.mark.slow
def test_nine_evaluation_study_stays_small(tmp_path):
    s = write_study(tmp_path, test_rows=400, store_size=256, draw_each=True)
    html = build_html([*s["runs"], s["ensemble"]])
    size = len(html.encode())
    assert 9 == len(s["evaluations"]) and size < 10 * 2**20, size


# --------------------------------------------------------------------------------------------------
# in a real browser: headless Chromium, network through a proxy that counts every request

PAGE_CHECK = """
<script>
window.addEventListener("load", function () {
  var out = {sections: Array.prototype.map.call(document.querySelectorAll("main > section"), function (s) { return s.id; })};
  var imgs = Array.prototype.slice.call(document.images);
  out.images = imgs.length;
  out.undecoded = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  out.resources = performance.getEntriesByType("resource").map(function (e) { return e.name; })
    .filter(function (n) { return n.indexOf("data:") !== 0; });
  var table = document.querySelector("table.sortable");
  function order() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.getAttribute("data-run"); }); }
  function aucs() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return parseFloat(r.cells[6].getAttribute("data-sort")); }); }
  out.before = order();
  var button = table.querySelector('th[data-key="mean-auc"] button');
  out.sortable = !!button;
  if (button) {
    button.click();
    out.after = order(); out.aucs_after = aucs(); out.aria = button.parentNode.getAttribute("aria-sort");
    button.click();
    out.aucs_again = aucs();
  }
  var pre = document.createElement("pre");
  pre.id = "page-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium_or_skip() -> str:
    found = os.environ.get("CXRFLOW_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p),
        None,
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(
                "CI is set but no Chromium was found: .ci/run installs Debian's 'chromium' package before 'make test'"
            )
        pytest.skip("no Chromium browser on this machine (install Debian's 'chromium' package or set CXRFLOW_CHROMIUM)")
    return found


#: Domains of the services Chromium itself calls (clock, component updates, account check, safe
#: browsing) whatever page it shows; which of their hosts it calls varies with the build and timing.
BROWSER_SERVICE_DOMAINS = ("google.com", "googleapis.com", "gvt1.com")
#: Hosts in those domains that serve pages' fonts and scripts: a request to one of them is the page's.
PAGE_CDN_HOSTS = {"fonts.googleapis.com", "ajax.googleapis.com", "storage.googleapis.com", "www.google.com"}


def _page_hosts(requests: list[str]) -> set[str]:
    """The hosts among the proxy's requests that the page, not the browser's own services, asked for."""
    hosts = {_host(r) for r in requests}
    return {
        h
        for h in hosts
        if h in PAGE_CDN_HOSTS or not any(h == d or h.endswith("." + d) for d in BROWSER_SERVICE_DOMAINS)
    }


def _host(request_line: str) -> str:
    """The host of 'GET http://host/path HTTP/1.1' or 'CONNECT host:443 HTTP/1.1'."""
    target = request_line.split(" ")[1] if " " in request_line else request_line
    return re.sub(r"^[a-z]+://", "", target).split("/")[0].split(":")[0]


class CountingProxy:
    """A local 'proxy' that records the first line of every request sent to it and answers 502."""

    def __init__(self):
        self.requests: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    first_line = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                    if not first_line:  # a preconnected socket closed unused: no request was made
                        continue
                    if first_line != self.SETTLE:
                        self.requests.append(first_line)
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    SETTLE = "SETTLE cxrflow-counting-proxy"

    def settle(self, timeout: float = 60):
        """Return once every connection made before this call has been read and recorded.

        A browser that has exited can leave connections in the listen queue that the serving thread
        has not read yet (it reads them one at a time); they would be counted against whatever runs
        next, or not at all. The queue is first in, first out, so when this call's own connection
        is answered, every earlier one has been recorded."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as conn:
            conn.sendall(self.SETTLE.encode() + b"\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 502"), "the counting proxy did not answer"

    def close(self):
        self.sock.close()


def _chromium(browser, profile, proxy, *args, timeout=120):
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
        f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
        "--disable-domain-reliability", "--no-first-run", "--no-default-browser-check", "--metrics-recording-only",
        "--disable-extensions", "--disable-client-side-phishing-detection", "--no-pings", "--disable-breakpad",
        "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,Translate,MediaRouter",
        *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _page_check(browser, tmp_path, proxy, html: str) -> dict:
    page = tmp_path / "checked.html"
    page.write_text(html.replace("</body>", PAGE_CHECK + "</body>"))
    done = _chromium(browser, tmp_path / "profile", proxy, "--virtual-time-budget=15000", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="page-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page check did not run: {done.stderr[-2000:]}"
    return json.loads(htmlmod.unescape(found.group(1)))


@pytest.mark.browser
def test_in_headless_chromium(report, study, tmp_path):
    browser = _chromium_or_skip()
    proxy = CountingProxy()
    try:
        # the proxy sees what a page fetches: one image from the network is one request
        control = _page_check(
            browser,
            tmp_path,
            proxy,
            '<html><body><main></main><img src="http://cxrflow-test.invalid/x.png" alt="x"><table class="sortable"><tbody></tbody></table></body></html>',
        )
        proxy.settle()
        assert _page_hosts(proxy.requests) == {"cxrflow-test.invalid"} and control["undecoded"] == ["x"]
        proxy.requests.clear()
        result = _page_check(browser, tmp_path, proxy, report.read_text())
        shot = tmp_path / "report.png"
        _chromium(
            browser, tmp_path / "profile", proxy, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()
        )
        proxy.settle()
    finally:
        proxy.close()
    assert result["sections"] == ["data", "table1", "runs", "cases", "reproduce"]
    # every image of the page is in the document and decodes (Cases show only wrong calls, so the
    # count follows the study: the figures, the thumbnails of its errors and the overlays)
    assert result["images"] == report.read_text().count("<img") and result["images"] > 50 and result["undecoded"] == []
    assert result["resources"] == [] and _page_hosts(proxy.requests) == set(), proxy.requests
    assert result["sortable"] and result["aria"] == "descending"
    assert result["aucs_after"] == sorted(result["aucs_after"], reverse=True) and result["after"] != result["before"]
    assert result["aucs_again"] == sorted(result["aucs_after"])
    with Image.open(shot) as im:
        assert im.size == (1280, 2400) and np.asarray(im.convert("L")).std() > 10


#: The width Chromium lays a page out in when printing on A4 landscape with the template's 10 mm
#: margins: 277 mm at 96 CSS px per inch.
A4_LANDSCAPE_PX = 1047

PRINT_WIDTH_CHECK = """
<script>
window.addEventListener("load", function () {
  var pre = document.createElement("pre");
  pre.id = "print-width";
  pre.textContent = String(document.querySelector("#table1 table").scrollWidth);
  document.body.appendChild(pre);
});
</script>
"""


@pytest.mark.browser
def test_table1_fits_across_a4_landscape_when_printed(report, tmp_path):
    browser = _chromium_or_skip()
    html = report.read_text()
    assert html.count("@media print {") == 1
    # the print rules applied on screen, in a window as wide as the printed page
    page = tmp_path / "as-printed.html"
    page.write_text(html.replace("@media print {", "@media all {").replace("</body>", PRINT_WIDTH_CHECK + "</body>"))
    proxy = CountingProxy()
    try:
        done = _chromium(
            browser,
            tmp_path / "profile",
            proxy,
            f"--window-size={A4_LANDSCAPE_PX},800",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.as_uri(),
        )
    finally:
        proxy.close()
    found = re.search(r'<pre id="print-width">(\d+)</pre>', done.stdout)
    assert found, f"the width check did not run: {done.stderr[-2000:]}"
    assert int(found.group(1)) <= A4_LANDSCAPE_PX
