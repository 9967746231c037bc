import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from cxrflow.cli import main
from cxrflow.data.etl import auto_rows_per_file, parse_sizes, plan_tasks, process_task, row_group_rows, run_etl
from cxrflow.data.labels import NIH14
from cxrflow.data.metadata import load_release
from cxrflow.data.split import assign_splits
from cxrflow.data.store import MANIFEST_NAME, SCHEMA, format_manifest, read_manifest, row_order_key
from cxrflow.data.synth import synthesize
from cxrflow.errors import CxrflowError
from spark_standalone import wait_until_exited

SIZES = [16, 32]
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def _read(store, size=None, split=None):
    """The store's rows as a dict of columns, sorted by (size, split, image_id)."""
    dataset = ds.dataset(store, format="parquet", partitioning="hive")
    flt = None
    if size is not None:
        flt = ds.field("size") == size
    if split is not None:
        flt = (ds.field("split") == split) if flt is None else flt & (ds.field("split") == split)
    table = dataset.to_table(filter=flt).sort_by(
        [("size", "ascending"), ("split", "ascending"), ("image_id", "ascending")]
    )
    return table


def _reference(img: Image.Image, size: int, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    """Independent Pillow resize: pad non-square to a centred black square, then one plain resize."""
    img = img if img.mode == "L" else img.convert("L")
    side = max(img.size)
    if img.size[0] != img.size[1]:
        img = ImageOps.pad(img, (side, side), color=0, centering=(0.5, 0.5))
    return np.asarray(img.resize((size, size), resample), dtype=np.float64)


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthesize(root / "release", patients=14, size=64, seed=3)
    return root / "release"


@pytest.fixture(scope="module")
def synthetic_store(spark, synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "synthetic"
    manifest = run_etl(synthetic, out, SIZES, spark=spark, rows_per_file=8)
    return out, manifest


def _gray_texture(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    return np.clip(110 + 80 * np.sin(5 * x + seed) * np.cos(4 * y) + rng.normal(0, 5, (h, w)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    """A release folder with one image of every kind the ETL must handle, plus broken ones."""
    root = tmp_path_factory.mktemp("handmade") / "release"
    images = root / "images"
    images.mkdir(parents=True)
    kinds = {}

    def add(n, kind, writer):
        name = f"{n:08d}_000.{'jpg' if kind == 'jpeg' else 'png'}"
        kinds[name] = kind
        if writer is not None:
            writer(images / name)

    g = _gray_texture(80, 80, 1)
    add(1, "L", lambda p: Image.fromarray(g).save(p))
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    add(2, "RGBA", lambda p: Image.fromarray(rgba).save(p))
    add(3, "RGB", lambda p: Image.fromarray(np.dstack([g, np.roll(g, 3, 0), g // 2])).save(p))
    add(4, "I;16", lambda p: Image.fromarray(_gray_texture(72, 72, 4).astype(np.uint16) * 257).save(p))
    add(5, "jpeg", lambda p: Image.fromarray(_gray_texture(96, 96, 5)).save(p, "JPEG", quality=95))
    add(6, "non-square", lambda p: Image.fromarray(_gray_texture(90, 60, 6)).save(p))
    pal = Image.fromarray(_gray_texture(64, 64, 7))
    pal.putpalette([255 - i for i in range(256) for _ in range(3)])
    add(7, "P", lambda p: pal.save(p))
    add(8, "corrupt", lambda p: p.write_bytes(os.urandom(3000)))
    add(9, "zero-byte", lambda p: p.write_bytes(b""))

    def truncated(p):
        buf = io.BytesIO()
        Image.fromarray(_gray_texture(80, 80, 10)).save(buf, "PNG")
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    add(10, "truncated", truncated)
    add(11, "missing", None)
    for n in range(12, 22):
        add(n, "L", lambda p, n=n: Image.fromarray(_gray_texture(64, 64, n)).save(p))
    Image.fromarray(g).save(images / "99999999_000.png")  # on disk, not in the metadata
    findings = ["No Finding", "Cardiomegaly", "Effusion|Mass", "Hernia", "Atelectasis|Edema|Nodule"]
    lines = [HEADER]
    for i, name in enumerate(kinds):
        lines.append(
            f"{name},{findings[i % len(findings)]},0,{i + 1},{20 + i},{'MF'[i % 2]},{('PA', 'AP')[i % 2]},2500,2048,0.143,0.143"
        )
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    return root, kinds


@pytest.fixture(scope="module")
def handmade_store(spark, handmade, tmp_path_factory):
    root, _ = handmade
    out = tmp_path_factory.mktemp("stores") / "handmade"
    manifest = run_etl(root, out, SIZES, spark=spark, rows_per_file=4)
    return out, manifest


# ------------------------------------------------------------------------------------- tests


def test_planning_helpers():
    assert parse_sizes("512, 256,256") == [256, 512]
    for bad in ("", "a,b", "0", "-3", "99999"):
        with pytest.raises(CxrflowError):
            parse_sizes(bad)
    assert row_group_rows(512, 10_000) == 256 and row_group_rows(256, 10_000) == 1024
    assert row_group_rows(16, 7) == 7
    assert auto_rows_per_file(112_120, 512) == 512 and auto_rows_per_file(112_120, 1024) == 128
    assert auto_rows_per_file(40, 512) == 32 and auto_rows_per_file(5_000, 256) == 79
    recs = [{"image_id": f"{i:03d}.png", "split": "train" if i % 3 else "test"} for i in range(20, 0, -1)]
    tasks = plan_tasks(recs, 4, seed=7)
    assert [(s, p, len(r)) for s, p, r in tasks][:2] == [("train", 0, 4), ("train", 1, 4)]
    assert sum(len(r) for _, _, r in tasks) == 20
    # each split in the seeded row order, cut into consecutive slices; another seed, another order
    train = [x["image_id"] for s, _, r in tasks if s == "train" for x in r]
    assert train == sorted(train, key=lambda i: row_order_key(7, i)) and train != sorted(train)
    other = [x["image_id"] for s, _, r in plan_tasks(recs, 4, seed=8) if s == "train" for x in r]
    assert sorted(other) == sorted(train) and other != train
    assert plan_tasks(list(reversed(recs)), 4, seed=7) == tasks  # not the metadata's order


def test_store_layout_and_schema(synthetic_store):
    store, manifest = synthetic_store
    assert (store / MANIFEST_NAME).is_file() and read_manifest(store)["sizes"] == SIZES
    dataset = ds.dataset(store, format="parquet", partitioning="hive")
    assert {"size", "split"} <= set(dataset.schema.names)
    for field in SCHEMA:
        assert dataset.schema.field(field.name).type == field.type, field.name
    for size in SIZES:
        for split in ("train", "val", "test"):
            files = sorted((store / f"size={size}" / f"split={split}").glob("*.parquet"))
            assert files, (size, split)
            rows = 0
            for f in files:
                table = pq.read_table(f)
                ids = table.column("image_id").to_pylist()
                assert ids == sorted(ids, key=lambda i: row_order_key(0, i))  # the seeded row order
                assert all(len(p) == size * size for p in table.column("pixels").to_pylist())
                rows += table.num_rows
            assert rows == manifest["rows"][str(size)][split]
    assert len(list((store / "size=32" / "split=train").glob("*.parquet"))) > 1  # parallel reads
    assert not list(store.parent.glob(".synthetic.partial-*"))  # temp folder gone
    text = format_manifest(manifest)
    assert "sizes: 16, 32" in text and "quarantined (" not in text


def test_rows_labels_and_splits_match_metadata(synthetic, synthetic_store):
    store, manifest = synthetic_store
    release = load_release(synthetic)
    splits = assign_splits(release.entries, release.train_val, release.test, val_fraction=0.3, seed=0)
    expected_split = dict(zip(splits["image_id"], splits["split"]))
    entries = release.entries.set_index("image_id")
    for size in SIZES:
        table = _read(store, size=size)
        ids = table.column("image_id").to_pylist()
        assert sorted(ids) == sorted(entries.index)  # every image exactly once per size
        assert table.column("split").to_pylist() == [expected_split[i] for i in ids]
        labels = np.array(table.column("labels").to_pylist(), dtype=np.uint8)
        np.testing.assert_array_equal(labels, entries.loc[ids, list(NIH14.names)].to_numpy())
        for col in ("patient_id", "age", "sex", "view", "follow_up"):
            assert table.column(col).to_pylist() == entries.loc[ids, col].tolist(), col
        assert set(table.column("orig_width").to_pylist()) == {64}
    by_patient = {}
    table = _read(store, size=16)
    for pid, split in zip(table.column("patient_id").to_pylist(), table.column("split").to_pylist()):
        by_patient.setdefault(pid, set()).add(split)
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits
    src = manifest["source"]
    assert src["metadata_rows"] == src["written"] == len(entries) and src["missing"] == src["quarantined"] == 0
    assert manifest["split"]["mode"] == "official-lists"


def test_pixels_match_an_independent_pillow_resize(synthetic, synthetic_store):
    store, _ = synthetic_store
    for size in SIZES:
        table = _read(store, size=size)
        for image_id, pixels in zip(table.column("image_id").to_pylist(), table.column("pixels").to_pylist()):
            got = np.frombuffer(pixels, dtype=np.uint8).reshape(size, size)
            # the synthetic findings are sharp-edged patterns a few pixels wide at 16 px, where
            # filters differ most: compare with plain Lanczos (no reducing gap)
            ref = _reference(Image.open(synthetic / "images" / image_id), size, Image.Resampling.LANCZOS)
            assert np.abs(got - ref).mean() <= 3.0, image_id


def test_manifest_statistics_recomputed_from_the_store(synthetic_store):
    store, manifest = synthetic_store
    for size in SIZES:
        train = _read(store, size=size, split="train")
        pixels = np.frombuffer(b"".join(train.column("pixels").to_pylist()), dtype=np.uint8) / 255.0
        stats = manifest["pixel_stats"][str(size)]
        assert stats["mean"] == pytest.approx(pixels.mean(), abs=1e-9)
        assert stats["std"] == pytest.approx(pixels.std(), abs=1e-9)
    labels = np.array(_read(store, size=16, split="train").column("labels").to_pylist())
    pos = labels.sum(axis=0)
    assert [manifest["positives"][n] for n in NIH14.names] == pos.tolist()
    np.testing.assert_allclose(manifest["pos_weight"], (len(labels) - pos) / np.maximum(pos, 1))


def test_same_inputs_give_identical_rows(spark, synthetic, synthetic_store, tmp_path):
    store, first = synthetic_store
    second = run_etl(synthetic, tmp_path / "again", SIZES, spark=spark, rows_per_file=8)
    assert _read(store).equals(_read(tmp_path / "again"))
    for key in ("rows", "pixel_stats", "positives", "pos_weight", "source", "quarantined", "split"):
        assert first[key] == second[key], key
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))  # noqa: E731
    assert files(store) == files(tmp_path / "again")


def _task(root, split="train"):
    """One ETL task over every image file of a release folder (broken ones included), in name order."""
    records = [
        {"image_id": p.name, "path": str(p), "split": split, "patient_id": i, "labels": bytes([i % 2] * 14),
         "age": 30 + i, "sex": "MF"[i % 2], "view": "PA", "follow_up": 0}
        for i, p in enumerate(sorted((root / "images").iterdir()))
    ]  # fmt: skip
    return (split, 0, records)


@pytest.mark.parametrize("threads", [1, 4])
def test_task_threads_keep_input_order_and_quarantine(handmade, tmp_path, threads):
    root, kinds = handmade
    task = _task(root)
    options = {"sizes": [16, 24], "group_rows": {16: 3, 24: 3}, "compression": "zstd", "num_labels": 14}
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    summary = process_task(task, store=str(tmp_path / "one"), threads=1, **options)
    again = process_task(task, store=str(tmp_path / "many"), threads=threads, **options)
    broken = sorted(n for n, k in kinds.items() if k in ("corrupt", "zero-byte", "truncated"))
    assert [q["image_id"] for q in summary["quarantined"]] == broken
    assert summary["written"] == len(task[2]) - len(broken) == sum(summary["histograms"][16]) / 16**2
    for key in ("written", "quarantined", "positives", "histograms"):
        assert again[key] == summary[key], key
    for size in (16, 24):
        one = pq.read_table(tmp_path / "one" / f"size={size}" / "split=train" / "part-00000.parquet")
        many = pq.read_table(tmp_path / "many" / f"size={size}" / "split=train" / "part-00000.parquet")
        assert one.equals(many)
        assert one.column("image_id").to_pylist() == [r["image_id"] for r in task[2] if r["image_id"] not in broken]


def test_task_bug_in_a_decode_thread_raises_and_leaves_no_file(handmade, tmp_path, monkeypatch):
    from cxrflow.data import etl

    root, _ = handmade
    task = _task(root)
    real = etl.load_and_resize

    def buggy(path, sizes):
        if path == task[2][5]["path"]:
            raise RuntimeError("a bug, not bad input")
        return real(path, sizes)

    monkeypatch.setattr(etl, "load_and_resize", buggy)
    with pytest.raises(RuntimeError, match="a bug"):
        process_task(
            task, store=str(tmp_path), sizes=[16], group_rows={16: 2}, compression="zstd", num_labels=14, threads=3
        )
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_task_never_makes_the_store_folder_itself(handmade, tmp_path):
    """A task that outlives its job (its driver killed, the partial folder since removed or published)
    fails instead of leaving a stray copy of the folder behind."""
    root, _ = handmade
    gone = tmp_path / ".store.partial-gone"
    with pytest.raises(FileNotFoundError):
        process_task(_task(root), store=str(gone), sizes=[16], group_rows={16: 2}, compression="zstd", num_labels=14)
    assert list(tmp_path.iterdir()) == []


def test_handmade_set_every_mode_and_every_fault(handmade, handmade_store):
    root, kinds = handmade
    store, manifest = handmade_store
    bad = {name: kind for name, kind in kinds.items() if kind in ("corrupt", "zero-byte", "truncated")}
    reasons = {q["image_id"]: q["reason"] for q in manifest["quarantined"]}
    assert set(reasons) == set(bad)
    for name, kind in bad.items():
        expected = {"corrupt": "not a recognised image", "zero-byte": "empty file", "truncated": "cannot decode"}[kind]
        assert expected in reasons[name], (kind, reasons[name])
    assert all(Path(q["path"]).is_file() for q in manifest["quarantined"])
    assert manifest["missing"] == [n for n, k in kinds.items() if k == "missing"]
    src = manifest["source"]
    assert src["metadata_rows"] == len(kinds) == src["written"] + src["missing"] + src["quarantined"]
    assert src["unlisted_on_disk"] == 1 and manifest["split"]["mode"] == "patients-70-10-20"
    assert sum(manifest["rows"]["16"].values()) == src["written"] == len(kinds) - 4

    references = {
        "L": lambda p: Image.open(p),
        "RGBA": lambda p: Image.open(p).convert("RGB").convert("L"),
        "RGB": lambda p: Image.open(p).convert("L"),
        "I;16": lambda p: Image.fromarray(np.round(np.asarray(Image.open(p)) / 257.0).astype(np.uint8)),
        "jpeg": lambda p: Image.open(p).convert("L"),
        "non-square": lambda p: Image.open(p),
        "P": lambda p: Image.open(p).convert("L"),
    }
    seen = set()
    for size in SIZES:
        table = _read(store, size=size)
        for row in table.to_pylist():
            kind = kinds[row["image_id"]]
            path = root / "images" / row["image_id"]
            got = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(size, size)
            ref = _reference(references[kind](path), size)
            assert np.abs(got - ref).mean() <= 3.0, (kind, size)
            assert (row["orig_width"], row["orig_height"]) == Image.open(path).size
            seen.add(kind)
    assert seen == set(references)
    table = _read(store, size=16)
    row = next(r for r in table.to_pylist() if kinds[r["image_id"]] == "non-square")
    assert (row["orig_width"], row["orig_height"]) == (60, 90)
    assert "quarantined (3)" in format_manifest(manifest)


def test_existing_store_refused_then_overwritten(spark, handmade, handmade_store, tmp_path):
    root, _ = handmade
    store, manifest = handmade_store
    with pytest.raises(CxrflowError, match="already exists"):
        run_etl(root, store, SIZES, spark=spark)
    assert read_manifest(store)["created"] == manifest["created"]
    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CxrflowError, match="not a cxrflow etl output"):
        run_etl(root, other, SIZES, spark=spark, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    copy = tmp_path / "copy"
    run_etl(root, copy, [8], spark=spark, rows_per_file=32)
    again = run_etl(root, copy, [12], spark=spark, rows_per_file=32, overwrite=True)
    assert again["sizes"] == [12] and sorted(p.name for p in copy.iterdir()) == [
        ".cxrflow-etl.json",
        MANIFEST_NAME,
        "size=12",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old folders left


def test_strict_refuses_missing_images(handmade, tmp_path):
    root, _ = handmade
    with pytest.raises(CxrflowError, match="not on disk"):
        run_etl(root, tmp_path / "strict", SIZES, strict=True, master="local[1]")
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/no/such/folder"], "not a folder"),
        (["--sizes", "256,abc"], "--sizes"),
        (["--sizes", "0"], "--sizes"),
        (["--master", "locl[2]"], "invalid Spark master"),
        (["--rows-per-file", "0"], "--rows-per-file"),
        (["--driver-memory", "lots"], "--driver-memory"),
        (["--threads", "0"], "--threads"),
    ],
    ids=["wrong-path", "bad-sizes", "zero-size", "bad-master", "bad-rows", "bad-memory", "bad-threads"],
)
def test_cli_bad_input_is_one_line_exit_2(synthetic, tmp_path, capsys, args, message):
    argv = ["etl", "--data", str(synthetic), "--out", str(tmp_path / "out"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_existing_store(synthetic, synthetic_store, capsys):
    store, _ = synthetic_store
    assert main(["etl", "--data", str(synthetic), "--out", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists here; pass --overwrite" in err
    assert main(["store-info", str(store)]) == 0
    assert "train pixel mean" in capsys.readouterr().out


def _cli(*args):
    return [sys.executable, "-m", "cxrflow.cli", "etl", *args]


@pytest.mark.slow
def test_killed_run_leaves_nothing_that_looks_complete(spark, synthetic, tmp_path):
    out = tmp_path / "killed"
    # every process of the run inherits this mark, the PySpark daemon and its workers too: the daemon
    # makes a process group of its own, so the kill below does not reach them and they outlive the run
    mark = f"CXRFLOW_TEST_KILLED_RUN={tmp_path}"
    proc = subprocess.Popen(
        _cli(
            "--data", str(synthetic), "--out", str(out), "--sizes", "16", "--master", "local[1]", "--rows-per-file", "1"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, mark.split("=", 1)[0]: mark.split("=", 1)[1]},
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(tmp_path.glob(".killed.partial-*/size=16/split=*/part-*.parquet")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode != 0
    # an orphaned worker finishing its task writes into the partial folder (making it again if it
    # was removed), so wait until the dead run's workers have noticed and exited, not a fixed second
    wait_until_exited(mark.encode())
    assert not out.exists()
    assert not list(tmp_path.rglob(MANIFEST_NAME))
    partial = next(tmp_path.glob(".killed.partial-*"))
    with pytest.raises(CxrflowError, match="not a complete cxrflow store"):
        read_manifest(partial)
    # the next run takes over the dead run's lock and removes its leftover
    run_etl(synthetic, out, [16], spark=spark)
    assert read_manifest(out)["sizes"] == [16]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]


@pytest.mark.slow
@pytest.mark.cluster
def test_local_cluster_gives_the_same_store_as_local(synthetic, synthetic_store, tmp_path):
    store, manifest = synthetic_store
    out = tmp_path / "cluster"
    proc = subprocess.run(
        _cli(
            "--data",
            str(synthetic),
            "--out",
            str(out),
            "--sizes",
            "16,32",
            "--rows-per-file",
            "8",
            "--master",
            "local-cluster[2,1,1024]",
        ),  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert " INFO " not in proc.stderr and "WARN" not in proc.stderr  # quiet by default
    assert f"{manifest['source']['written']}/{manifest['source']['written']} images" in proc.stderr  # progress
    assert "images/s" in proc.stderr
    cluster = json.loads((out / MANIFEST_NAME).read_text())
    assert cluster["spark_master"] == "local-cluster[2,1,1024]"
    for key in ("rows", "pixel_stats", "positives", "pos_weight", "quarantined", "missing"):
        assert cluster[key] == manifest[key], key
    assert _read(out).equals(_read(store))


# ------------------------------------------------------------- row order, split identity, split file


def test_manifest_records_row_order_and_split_identity(synthetic_store):
    from cxrflow.data.store import store_split_identity

    store, manifest = synthetic_store
    assert manifest["row_order"] == {"kind": "shuffled", "seed": 0, "key": "blake2b-64(seed, image_id)"}
    for size in SIZES:
        for split in ("train", "val", "test"):
            assert manifest["split_identity"][split] == store_split_identity(store, size, split)
    assert len(set(manifest["split_identity"].values())) == 3


def test_etl_without_split_file_is_the_split_command(synthetic, synthetic_store, tmp_path, capsys):
    """`cxrflow split` and the ETL with the same options assign every image to the same split."""
    import pandas as pd

    store, _ = synthetic_store
    assert main(["split", "--data", str(synthetic), "--out", str(tmp_path / "split.csv")]) == 0
    written = pd.read_csv(tmp_path / "split.csv")
    table = _read(store, size=16)
    etl_split = dict(zip(table.column("image_id").to_pylist(), table.column("split").to_pylist()))
    assert etl_split == dict(zip(written["image_id"], written["split"]))


def test_etl_uses_exactly_the_split_file(spark, synthetic, synthetic_store, tmp_path):

    release = load_release(synthetic)
    frame = assign_splits(release.entries, release.train_val, release.test, seed=0)
    # move one whole train patient to val: a split that assign_splits would never give
    moved = int(frame.loc[frame["split"] == "train", "patient_id"].iloc[0])
    frame.loc[frame["patient_id"] == moved, "split"] = "val"
    frame.to_csv(tmp_path / "mine.csv", index=False)
    manifest = run_etl(synthetic, tmp_path / "store", [16], spark=spark, split_csv=tmp_path / "mine.csv")
    table = _read(tmp_path / "store")
    got = dict(zip(table.column("image_id").to_pylist(), table.column("split").to_pylist()))
    assert got == dict(zip(frame["image_id"], frame["split"]))
    assert manifest["split"]["mode"] == "split-csv" and manifest["split"]["split_csv"].endswith("mine.csv")
    base = read_manifest(synthetic_store[0])
    assert manifest["split_identity"]["test"] == base["split_identity"]["test"]
    assert manifest["split_identity"]["val"] != base["split_identity"]["val"]


def _bad_split_file(synthetic, tmp_path, kind):
    import pandas as pd

    release = load_release(synthetic)
    frame = assign_splits(release.entries, release.train_val, release.test, seed=0)
    if kind == "leak":  # one image of a train patient goes to test
        patient = frame.loc[frame["split"] == "train", "patient_id"].value_counts().index[0]
        frame.loc[frame.index[frame["patient_id"] == patient][0], "split"] = "test"
    elif kind == "missing":
        frame = frame.iloc[1:]
    elif kind == "foreign":
        frame = pd.concat(
            [frame, pd.DataFrame({"image_id": ["99999999_000.png"], "patient_id": [99999999], "split": ["train"]})]
        )
    elif kind == "bad-split":
        frame.loc[frame.index[3], "split"] = "holdout"
    path = tmp_path / f"{kind}.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [("leak", "has images in"), ("missing", "have no split in this file"), ("foreign", "not in the metadata"),
     ("bad-split", "is not one of train, val, test")],
)  # fmt: skip
def test_bad_split_file_is_one_line_exit_2(synthetic, tmp_path, capsys, kind, message):
    path = _bad_split_file(synthetic, tmp_path, kind)
    assert main(["etl", "--data", str(synthetic), "--out", str(tmp_path / "out"), "--split-csv", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
