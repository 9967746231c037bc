import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrflow.cli import main
from cxrflow.errors import CxrflowError
from cxrflow.sweep import load_sweep, parse_sweep, plan_steps

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_paper_config_declares_the_nine_rows(tmp_path):
    sweep = load_sweep(CONFIGS / "paper.yaml", store=tmp_path)
    rows = [(r.config.model, r.config.size, c) for r in sweep.runs for c in r.evaluate]
    assert len(sweep.runs) == 5 and len(rows) == 9
    assert ("simple_cnn", 256, "best_finetune") in rows
    for model in ("resnet50", "densenet121"):
        for size in (256, 512):
            assert {(model, size, "best_kt"), (model, size, "best_finetune")} <= set(rows)
    densenet = next(r for r in sweep.runs if r.name == "densenet121-512")
    assert [s.name for s in densenet.config.stages()] == ["kt", "finetune"] and densenet.config.batch_size == 5
    assert densenet.config.store == str(tmp_path.resolve())


def test_toml_and_defaults(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(
        'store = "st"\n[defaults]\npretrained = "none"\n[[runs]]\nname = "a"\nmodel = "densenet121"\nsize = 32\n'
        '[[runs]]\nname = "b"\nmodel = "simple_cnn"\nsize = 32\n[runs.finetune]\nepochs = 3\nlr = 0.01\n'
    )
    a, b = load_sweep(f).runs
    assert a.evaluate == ["best_kt", "best_finetune"] and b.evaluate == ["best_finetune"]
    assert b.config.finetune.epochs == 3 and b.config.finetune.lr == 0.01


@pytest.mark.parametrize(
    "data, match",
    [
        (
            {"store": "s", "runs": [{"name": "a", "model": "simple_cnn", "size": 32, "colour": 1}]},
            "unknown setting 'colour'",
        ),
        ({"store": "s", "runs": [{"name": "a", "model": "simple_cnn", "size": 32}] * 2}, "two runs are named"),
        (
            {"store": "s", "runs": [{"name": "a", "model": "simple_cnn", "size": 32, "evaluate": ["best_kt"]}]},
            "cannot evaluate",
        ),
        ({"runs": [{"name": "a", "model": "simple_cnn", "size": 32}]}, "no store"),
        ({"store": "s", "runs": [{"name": "../x", "model": "simple_cnn", "size": 32}]}, "needs a 'name'"),
        ({"store": "s", "runs": []}, "non-empty list"),
    ],
)
def test_invalid_sweeps(data, match):
    with pytest.raises(CxrflowError, match=match):
        parse_sweep(data)


def test_changed_settings_are_refused(tmp_path):
    spec = parse_sweep({"store": "s", "runs": [{"name": "a", "model": "simple_cnn", "size": 32}]}).runs[0]
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**spec.config.to_dict(), "size": 64, "device": "cuda"}))
    with pytest.raises(CxrflowError, match="size: run has 64"):
        plan_steps(spec, tmp_path, device="cpu", n_boot=10)
    (folder / "config.json").write_text(json.dumps({**spec.config.to_dict(), "device": "cuda"}))
    assert [s[0] for s in plan_steps(spec, tmp_path, device="cpu", n_boot=10)] == ["train", "evaluate"]


@pytest.mark.slow
def _wait_until_gone(group: int, timeout: float = 60.0) -> None:
    """Wait until no live process of process group ``group`` is left (zombies count as gone): a
    SIGKILLed trainer holding torch's memory can take a moment to exit on a loaded machine, and
    until then its lock is, rightly, held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] not in ("Z", "X"):
                alive.append(entry.name)
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of the killed sweep still alive after {timeout:.0f} s")


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, capsys):
    from cxrflow.testing.synthstore import write_synthetic_store

    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 64, "val": 32, "test": 32}, prevalence=0.3)
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"store: {store}\n"
        "defaults: {pretrained: none, batch_size: 16, augment: false, early_stopping_patience: 0}\n"
        "n_boot: 50\n"
        "runs:\n"
        "  - {name: a, model: simple_cnn, size: 32, finetune: {epochs: 1, lr: 0.003}}\n"
        "  - {name: b, model: simple_cnn, size: 32, seed: 1, finetune: {epochs: 8, lr: 0.003}}\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cxrflow.cli", "sweep", str(config), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    b = out / "runs" / "b"
    try:
        deadline = time.monotonic() + 240
        while not (b / "last.pt").exists():  # run a finished and was evaluated; b is mid-way
            assert proc.poll() is None and time.monotonic() < deadline, "sweep ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its training subprocess, like a power cut
        proc.wait()
    _wait_until_gone(proc.pid)  # after a power cut nothing is left running: the orphaned trainer too
    assert not (b / "done.json").exists()
    a = out / "runs" / "a"
    finished = [a / "done.json", a / "best_finetune.pt", a / "eval-test-best_finetune" / "metrics.json"]
    stamps = [p.stat().st_mtime_ns for p in finished]

    capsys.readouterr()
    # the re-run goes in this process (saves two interpreter start-ups; the plan is the same)
    assert main(["sweep", str(config), "--out", str(out), "--device", "cpu", "--in-process"]) == 0
    assert [p.stat().st_mtime_ns for p in finished] == stamps  # nothing of run a was redone
    printed = capsys.readouterr().out
    assert "1 run(s) to train/evaluate" in printed and "--resume" in printed and "resuming" in printed
    epochs = [json.loads(line)["epoch"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))
    with open(out / "report" / "table.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["a", "b"]
    # a third call finds nothing to do
    b_done = (b / "done.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sweep", str(config), "--out", str(out), "--device", "cpu"]) == 0
    assert "already trained and evaluated: a, b" in capsys.readouterr().out
    assert (b / "done.json").stat().st_mtime_ns == b_done
    # an evaluation of a checkpoint that has changed since is not reused: it is made again
    import torch

    ckpt = torch.load(a / "best_finetune.pt", weights_only=True)
    ckpt["model"]["head.bias"] += 1.0
    torch.save(ckpt, a / "best_finetune.pt")
    evaluated = (a / "eval-test-best_finetune" / "metrics.json").stat().st_mtime_ns
    assert main(["sweep", str(config), "--out", str(out), "--device", "cpu", "--in-process"]) == 0
    assert (a / "eval-test-best_finetune" / "metrics.json").stat().st_mtime_ns != evaluated
    assert (b / "done.json").stat().st_mtime_ns == b_done


def test_scheduler_runs_one_job_per_gpu_in_parallel(tmp_path):
    from collections import deque

    from cxrflow.sweep import _Job, _run_subprocesses

    # each step marks its start, then waits (up to 60 s) until a step on another GPU has started: steps
    # that run in parallel overlap however late the machine lets either interpreter start; steps run
    # one after another would not (a fixed sleep was a guess at how far apart two starts can be)
    started = tmp_path / "started"
    started.mkdir()
    script = (
        "import os, sys, time, pathlib; t = time.time(); gpu = os.environ.get('CUDA_VISIBLE_DEVICES'); "
        f"marks = pathlib.Path({str(started)!r}); (marks / gpu).touch(); deadline = t + 60\n"
        "while time.time() < deadline and not [m for m in marks.iterdir() if m.name != gpu]: time.sleep(0.02)\n"
        "print(sys.argv[1], gpu, t, time.time())"
    )
    jobs = [_Job(name, deque([[f"{name}1"], [f"{name}2"]]), tmp_path / f"{name}.log") for name in ("a", "b", "c")]
    jobs[2].steps = deque([["c1"], ["fail"], ["c3"]])

    def command(argv):
        return [sys.executable, "-c", script + ("; sys.exit(3)" if argv[0] == "fail" else ""), argv[0]]

    _run_subprocesses(jobs, ["0", "1"], lambda msg: None, command=command)
    runs = {}
    for job in jobs:
        for line in job.log.read_text().splitlines():
            if line and not line.startswith("$"):
                step, gpu, start, end = line.split()
                runs[step] = (gpu, float(start), float(end))
    assert runs["a1"][0] == runs["a2"][0] and runs["b1"][0] == runs["b2"][0] and runs["a1"][0] != runs["b1"][0]
    assert runs["a1"][1] < runs["b1"][2] and runs["b1"][1] < runs["a1"][2]  # a and b overlapped in time
    assert jobs[2].failed and "exit status 3" in jobs[2].failed and "c3" not in runs  # stops at its failed step
    assert not jobs[0].failed and not jobs[1].failed


def test_missing_store_or_size_fails_before_training(tmp_path):
    from cxrflow.testing.synthstore import write_synthetic_store

    assert (
        main(["sweep", str(CONFIGS / "paper.yaml"), "--out", str(tmp_path / "o"), "--store", str(tmp_path / "none")])
        == 2
    )
    write_synthetic_store(tmp_path / "st", sizes=(32,), rows={"train": 4, "val": 4, "test": 4})
    from cxrflow.sweep import run_sweep

    sweep = load_sweep(CONFIGS / "paper.yaml", store=tmp_path / "st")
    with pytest.raises(CxrflowError, match="size 256 is not in the store"):
        run_sweep(sweep, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _without_unsupported_fusion(data):
    """The sweep file as this checkout can parse it: 'fusion' is a training setting of the
    demographics-fusion branch; where TrainConfig does not have it yet, those keys are dropped."""
    import dataclasses

    from cxrflow.modelling.config import TrainConfig

    if "fusion" in {f.name for f in dataclasses.fields(TrainConfig)}:
        return data, True
    return {**data, "runs": [{k: v for k, v in r.items() if k != "fusion"} for r in data["runs"]]}, False


def test_beyond_paper_config_declares_paper_fused_and_ensemble_rows(tmp_path):
    from cxrflow.modelling.config import read_config_file

    raw = read_config_file(CONFIGS / "beyond-paper.yaml")
    data, fusion_supported = _without_unsupported_fusion(raw)
    sweep = parse_sweep(data, source="beyond-paper.yaml", store=tmp_path)
    paper = load_sweep(CONFIGS / "paper.yaml", store=tmp_path)
    by_name = {r.name: r for r in sweep.runs}
    for run in paper.runs:  # the paper's nine rows, unchanged
        assert by_name[run.name].config.to_dict() == run.config.to_dict() and by_name[run.name].evaluate == run.evaluate
    fused = [r["name"] for r in raw["runs"] if r.get("fusion") == "demographics"]
    assert len(fused) >= 2 and all(n.endswith("-fused") for n in fused)
    if fusion_supported:
        assert all(by_name[n].config.fusion == "demographics" for n in fused)
    assert {e.method for e in sweep.ensembles} == {"mean", "stacked"}
    members = {r for e in sweep.ensembles for r, _ in e.members}
    assert set(fused) <= members and {"densenet121-512", "resnet50-512"} <= members
    assert all(c == "best_finetune" for e in sweep.ensembles for _, c in e.members)


_RUNS = [{"name": "a", "model": "simple_cnn", "size": 32}, {"name": "b", "model": "simple_cnn", "size": 32, "seed": 1}]


@pytest.mark.parametrize(
    "ensembles, match",
    [
        ([{"name": "e", "members": ["a", "b"], "method": "median"}], "unknown method 'median'"),
        ([{"name": "e", "members": ["a"]}], "at least two members"),
        ([{"name": "e", "members": ["a", "c"]}], "no run named 'c'"),
        ([{"name": "e", "members": ["a", "b:best_kt"]}], "not evaluated at best_kt"),
        ([{"name": "e", "members": ["a", "a"]}], "names a member twice"),
        ([{"name": "a", "members": ["a", "b"]}], "unique among runs and ensembles"),
        ([{"name": "e", "members": ["a", "b"], "weights": [1, 2]}], "name, members and method only"),
    ],
)
def test_invalid_ensembles(ensembles, match):
    with pytest.raises(CxrflowError, match=match):
        parse_sweep({"store": "s", "runs": _RUNS, "ensembles": ensembles})


@pytest.mark.slow
def test_sweep_builds_its_ensembles_once(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cxrflow.testing.synthstore import write_synthetic_store
    from cxrflow.tracking import default_uri

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 48, "val": 48, "test": 48}, prevalence=0.3, signal=12)
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"store: {store}\n"
        "defaults: {pretrained: none, batch_size: 16, augment: false, early_stopping_patience: 0, finetune: {epochs: 1, lr: 0.003}}\n"
        "n_boot: 20\n"
        "runs:\n  - {name: a, model: simple_cnn, size: 32}\n  - {name: b, model: simple_cnn, size: 32, seed: 1}\n"
        "ensembles:\n  - {name: ab, members: [a, b], method: stacked}\n"
    )
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out), "--device", "cpu", "--in-process", "--mlflow"]) == 0
    ens = out / "ensembles" / "ab" / "metrics.json"
    m = json.loads(ens.read_text())
    assert m["method"] == "stacked" and m["member_names"] == ["a/best_finetune", "b/best_finetune"]
    # with --mlflow the ensemble is its own MLflow run in the sweep's store, naming its members' runs
    record = json.loads((ens.parent / "mlflow.json").read_text())
    assert record["tracking_uri"] == default_uri(out)
    params = MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).data.params
    assert params["method"] == "stacked" and [params[f"members.{i}.mlflow_run_id"] for i in (0, 1)] == [
        json.loads((out / "runs" / r / "mlflow.json").read_text())["run_id"] for r in ("a", "b")
    ]
    with open(out / "report" / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["a", "b", "ab"] and rows[2]["members"] == "a/best_finetune;b/best_finetune"
    assert rows[2]["kind"] == "ensemble" and float(rows[2]["ece_calibrated"]) == pytest.approx(
        m["calibration"]["ece_mean"]["after"]
    )
    stamp = ens.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sweep", str(config), "--out", str(out), "--device", "cpu", "--in-process"]) == 0
    assert ens.stat().st_mtime_ns == stamp and "cxrflow ensemble" not in capsys.readouterr().out


def test_a_run_may_name_several_stores_instead_of_the_sweeps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {"runs": [{"name": "both", "model": "simple_cnn", "size": 32, "stores": ["a", "b"],
                      "store_weights": "1,2"}]}  # fmt: skip
    spec = parse_sweep(data).runs[0]
    assert spec.config.stores == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert spec.config.store == str(tmp_path / "a") and spec.config.store_weights == [1.0, 2.0]
    steps = plan_steps(spec, tmp_path, device="cpu", n_boot=10)
    written = json.loads((tmp_path / "configs" / "both.json").read_text())
    assert written["stores"] == spec.config.stores and steps[0][0] == "train"
    with pytest.raises(CxrflowError, match="one weight per --store"):
        parse_sweep({"store": "s", "runs": [{**data["runs"][0], "store_weights": [1, 2, 3]}]})
