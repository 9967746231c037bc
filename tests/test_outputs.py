"""Output folders: markers, refusals of what cxrflow did not write, locks across processes, leftovers."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cxrflow.cli import main
from cxrflow.errors import CxrflowError
from cxrflow.outputs import (
    OutputLock,
    check_target,
    claiming,
    leftovers,
    marker_name,
    publishing,
    read_marker,
    write_marker,
)
from cxrflow.testing.synthstore import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _decoys(tmp_path: Path) -> dict[str, Path]:
    """Folders and files that are not cxrflow's, as a careless --out might name them."""
    ssh = tmp_path / "home-like"
    (ssh / ".ssh").mkdir(parents=True)
    (ssh / ".ssh" / "id_ed25519").write_text("secret")
    git = tmp_path / "repo"
    (git / ".git").mkdir(parents=True)
    (git / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    fake_store = tmp_path / "fake-store"
    fake_store.mkdir()
    (fake_store / "_manifest.json").write_text("{}")  # a file name alone proves nothing
    (fake_store / "size=1").mkdir()
    other = tmp_path / "synth-data"
    other.mkdir()
    write_marker(other, "synth")
    (other / "Data_Entry_2017.csv").write_text("x")
    afile = tmp_path / "test_list.txt"
    afile.write_text("00000001_000.png\n")
    return {"ssh": ssh, "git": git, "fake_store": fake_store, "other_command": other, "file": afile}


def _snapshot(path: Path) -> list[tuple[str, bytes | None]]:
    if path.is_file():
        return [(path.name, path.read_bytes())]
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


@pytest.mark.parametrize("command", ["etl", "evaluate", "report", "synth", "demo", "sweep", "train", "explore"])
def test_decoys_are_refused_as_not_cxrflow_outputs(tmp_path, command):
    for name, decoy in _decoys(tmp_path).items():
        if name == "other_command" and command == "synth":
            continue  # it is one
        before = _snapshot(decoy)
        with pytest.raises(CxrflowError, match="not a cxrflow|not a folder") as info:
            check_target(decoy, command, overwrite=True)
        assert str(decoy) in str(info.value)
        if name == "other_command":
            assert "a cxrflow synth output, not a cxrflow" in str(info.value)
        assert _snapshot(decoy) == before, name


def test_inputs_home_and_parents_of_inputs_are_refused(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "evaluate")  # even a folder carrying the right marker
    ckpt = run / "best.pt"
    ckpt.write_bytes(b"x")
    for out in (run, tmp_path):
        with pytest.raises(CxrflowError, match="holds the input"):
            check_target(out, "evaluate", overwrite=True, inputs=[ckpt])
    with pytest.raises(CxrflowError, match="is the input"):
        check_target(run, "evaluate", overwrite=True, inputs=[run])
    monkeypatch.setenv("HOME", str(run))
    with pytest.raises(CxrflowError, match="home folder"):
        check_target(run, "evaluate", overwrite=True)
    monkeypatch.chdir(run)
    with pytest.raises(CxrflowError, match="current folder"):
        check_target(tmp_path, "evaluate", overwrite=True)


def test_marker_must_parse_and_name_its_producer(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "data").write_text("mine")
    for text in ("[]", "not json", json.dumps({"producer": "cxrflow etl"})):
        (out / marker_name("evaluate")).write_text(text)
        assert read_marker(out, "evaluate") is None
        with pytest.raises(CxrflowError, match="not a cxrflow evaluate output"):
            check_target(out, "evaluate", overwrite=True)
    write_marker(out, "evaluate")
    assert read_marker(out, "evaluate")["producer"] == "cxrflow evaluate"
    with pytest.raises(CxrflowError, match="already exists here; pass --overwrite"):
        check_target(out, "evaluate")
    check_target(out, "evaluate", overwrite=True)


def test_publishing_replaces_only_its_own_output_with_normal_permissions(tmp_path):
    out = tmp_path / "pub"
    with publishing(out, "report") as pub:
        (pub.tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing at the destination until the commit
        pub.commit(note="first")
    assert (out / "a.txt").read_text() == "1" and read_marker(out, "report")["note"] == "first"
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()
    with pytest.raises(CxrflowError, match="--overwrite"):
        with publishing(out, "report"):
            pass
    with pytest.raises(RuntimeError):
        with publishing(out, "report", overwrite=True) as pub:
            (pub.tmp / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == [marker_name("report"), "a.txt"]
    with publishing(out, "report", overwrite=True) as pub:
        (pub.tmp / "b.txt").write_text("2")
        pub.commit()
    assert sorted(p.name for p in out.iterdir()) == [marker_name("report"), "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pub"]  # no lock, temp or old folder left


def test_leftovers_of_a_killed_run_are_listed_and_removed_only_when_marked(tmp_path):
    out = tmp_path / "store"
    marked = tmp_path / ".store.partial-dead0001"
    marked.mkdir()
    write_marker(marked, "etl", partial=True)
    old = tmp_path / ".store.old-dead0002"
    old.mkdir()
    write_marker(old, "etl")
    foreign = tmp_path / ".store.partial-notours"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert leftovers(out) == sorted([marked, old, foreign])
    with publishing(out, "etl") as pub:
        pub.commit()
    assert leftovers(out) == [foreign] and (foreign / "keep.txt").read_text() == "mine"


_HOLD = textwrap.dedent(
    """
    import sys
    from cxrflow.outputs import OutputLock
    with OutputLock(sys.argv[1], sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.read()  # until the test kills it (or, should the test die first, its end of the pipe closes)
    """
)


def _hold_lock(out: Path, command: str) -> subprocess.Popen:
    """A process that holds ``out``'s lock until it is killed, however long the test takes to get there."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out), command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_honoured_across_processes_and_reclaimed_from_a_killed_holder(tmp_path):
    out = tmp_path / "out"
    holder = _hold_lock(out, "etl")
    try:
        with pytest.raises(CxrflowError) as info:
            OutputLock(out, "etl").acquire()
        message = str(info.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and "cxrflow etl" in message
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock file is still there, naming a dead pid: the next run takes it over
    assert (tmp_path / ".out.lock").exists()
    with OutputLock(out, "etl"):
        assert json.loads((tmp_path / ".out.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.slow
def test_train_evaluate_and_report_stop_on_a_held_lock_with_one_line(tmp_path, capsys):
    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 16, "val": 16, "test": 8}, seed=0)
    run = tmp_path / "run"
    holder = _hold_lock(run, "train")
    try:
        argv = [
            "train",
            "--quiet",
            "--store",
            str(store),
            "--size",
            "32",
            "--model",
            "simple_cnn",
            "--out",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"locked by cxrflow train (pid {holder.pid}" in err[0], err
        assert not run.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the dead holder's lock is reclaimed
    capsys.readouterr()
    ev = run / "eval-test-best_finetune"
    holder = _hold_lock(ev, "evaluate")
    try:
        assert main(["evaluate", "--run", str(run), "--n-boot", "5", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"locked by cxrflow evaluate (pid {holder.pid}" in err[0], err
        assert not ev.exists()
    finally:
        holder.kill()
        holder.wait()
    # the run folder, the store and the checkpoint are never an evaluation's --out
    for out in (run, store, tmp_path):
        assert (
            main(["evaluate", "--run", str(run), "--out", str(out), "--overwrite", "--n-boot", "5", "--device", "cpu"])
            == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("not a cxrflow evaluate output" in err or "holds the input" in err), err
    assert (run / "best_finetune.pt").is_file() and (store / "_manifest.json").is_file()
    assert main(["evaluate", "--run", str(run), "--n-boot", "5", "--device", "cpu"]) == 0
    assert (ev.stat().st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's 0700
    # train --overwrite on a folder that is not a run is refused, --resume too
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    for flag in ("--overwrite", "--resume"):
        assert main([*argv[:9], str(precious), *argv[10:], flag]) == 2
        assert "not a cxrflow train output" in capsys.readouterr().err
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]


def test_a_run_started_while_another_writes_names_the_holder_not_already_exists(tmp_path, capsys):
    """The first run's folder is already there (train writes in place, report was published before):
    the second run is told who is writing it, not that an output "already exists"."""
    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "train")
    holder = _hold_lock(run, "train")
    try:
        argv = ["train", "--quiet", "--store", str(tmp_path / "store"), "--size", "32", "--model", "simple_cnn",
                "--out", str(run), "--epochs", "1"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"locked by cxrflow train (pid {holder.pid}" in err[0], err
        with pytest.raises(CxrflowError, match=f"locked by cxrflow train \\(pid {holder.pid}"):
            check_target(run, "train", overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone the ordinary refusal comes back, and a refusal of a folder that is not
    # this command's output never depends on a lock
    with pytest.raises(CxrflowError, match="already exists here"):
        check_target(run, "train", overwrite=False)
    assert sorted(p.name for p in run.iterdir()) == [marker_name("train")]


def test_split_stops_on_a_held_lock_with_one_line(tmp_path, capsys):
    from cxrflow.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, patients=6, size=16, seed=0)
    out = tmp_path / "split.csv"
    holder = _hold_lock(out, "split")
    try:
        assert main(["split", "--data", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"locked by cxrflow split (pid {holder.pid}" in err[0], err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["split", "--data", str(data), "--out", str(out)]) == 0  # the dead holder's lock is reclaimed
    assert out.read_text().startswith("image_id,patient_id,split") and not (tmp_path / ".split.csv.lock").exists()


def test_etl_takes_its_lock_before_reading_any_metadata(tmp_path, capsys):
    """A second ETL on a held output stops at once naming the holder. Its metadata here is empty, so an
    ETL that read the metadata before taking the lock would stop with "no images" instead."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "Data_Entry_2017_v2020.csv").write_text("")
    out = tmp_path / "store"
    argv = ["etl", "--data", str(data), "--out", str(out), "--sizes", "8", "--master", "local[1]", "--no-progress"]
    holder = _hold_lock(out, "etl")
    try:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"locked by cxrflow etl (pid {holder.pid}" in err[0], err
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 2  # the dead holder's lock is reclaimed; then the metadata is read
    assert "no images" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no store, lock or partial folder left


def test_claiming_fresh_replaces_only_a_marked_folder(tmp_path):
    out = tmp_path / "demo"
    with claiming(out, "demo"):
        (out / "x").write_text("1")
    with pytest.raises(CxrflowError, match="--overwrite"):
        with claiming(out, "demo"):
            pass
    with claiming(out, "demo", overwrite=True, fresh=True):
        assert sorted(p.name for p in out.iterdir()) == [marker_name("demo")]


def _etl_cli(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cxrflow.cli", "etl", "--data", str(data), "--out", str(out), "--sizes", "16",
            "--master", "local[1]", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_two_etl_runs_at_once_one_proceeds_the_other_names_the_holder(tmp_path):
    from cxrflow.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, patients=20, size=32, seed=0)
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = [subprocess.Popen(_etl_cli(data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    lines = [line for line in loser[2].splitlines() if line.strip()]
    assert len(lines) == 1 and ("locked by cxrflow etl (pid" in lines[0] or "already exists here" in lines[0]), loser[2]
    assert (out / "_manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "store"]


def test_the_current_folder_is_refused_even_when_empty(tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in ("", ".", str(here)):  # publishing renamed the output over it: the shell was left in a deleted folder
        with pytest.raises(CxrflowError, match="is the current folder"):
            check_target(out, "explore")
    fixtures = Path(__file__).parent / "fixtures" / "nih" / "Data_Entry_2017_v2020.head.csv"
    metadata = tmp_path / "Data_Entry_2017_v2020.csv"
    metadata.write_text(fixtures.read_text())
    assert main(["explore", "--metadata", str(metadata), "--out", ""]) == 2
    assert "is the current folder" in capsys.readouterr().err
    assert here.is_dir() and os.path.samefile(os.getcwd(), here) and not any(here.iterdir())


def test_a_lock_file_that_is_not_cxrflows_is_never_written_through(tmp_path):
    precious = tmp_path / "precious.txt"
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    for make, problem in ((lambda: lock.symlink_to(precious), "is a symbolic link"),  # it was truncated and rewritten
                          (lambda: os.link(precious, lock), "is not cxrflow's lock file"),
                          (lambda: lock.write_text("a file of yours\n"), "is not cxrflow's lock file")):  # fmt: skip
        precious.write_text("my data\n")
        make()
        with pytest.raises(CxrflowError, match=problem) as info:
            OutputLock(out, "explore").acquire()
        assert info.value.path == str(lock)
        assert precious.read_text() == "my data\n"
        lock.unlink()
    lock.write_text(
        json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "command": "etl"})
    )  # a killed run's
    with OutputLock(out, "explore"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_symlinked_out_is_refused_as_a_link_and_what_it_points_at_is_untouched(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(target)
    for overwrite in (False, True):
        with pytest.raises(CxrflowError, match="is a symbolic link") as info:
            check_target(link, "evaluate", overwrite=overwrite)
        assert "give the folder it points at" in str(info.value)
    assert link.is_symlink() and (target / "notes.txt").read_text() == "mine"
