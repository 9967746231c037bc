"""Streaming loader: exactly-once epochs over ranks and workers, determinism, fidelity, errors, memory."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from cxrflow.data.loader import augment, make_loader, to_model_input
from cxrflow.data.store import MANIFEST_NAME, SCHEMA, split_dir
from cxrflow.errors import CxrflowError
from cxrflow.testing.synthstore import write_synthetic_store

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

#: name -> (sizes, rows per split, rows_per_file, row_group_rows)
SHAPES = {
    # few big files: val/test are a single row group, so most shards share one unit
    "few-big": ((16,), {"train": 150, "val": 23, "test": 9}, 200, 64),
    # many small files with 3-row groups
    "many-small": ((24, 32), {"train": 61, "val": 20, "test": 7}, 7, 3),
    # one row per row group
    "tiny-groups": ((16,), {"train": 40, "val": 17, "test": 3}, 16, 1),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, (sizes, rows, per_file, per_group) in SHAPES.items():
        path = tmp_path_factory.mktemp(name) / "store"
        write_synthetic_store(path, sizes=sizes, rows=rows, rows_per_file=per_file, row_group_rows=per_group, seed=3)
        out[name] = path
    return out


def read_partition(store: Path, size: int, split: str) -> pa.Table:
    """The partition as pyarrow reads it, in file order (the reference the loader is checked against)."""
    files = sorted(split_dir(store, size, split).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def epoch_batches(store, size, split, *, world_size=1, **kw) -> list[list[dict]]:
    """Every rank's batches for one epoch, checking ``len()`` against what each rank yields."""
    out = []
    for rank in range(world_size):
        loader = make_loader(store, size, split, rank=rank, world_size=world_size, **kw)
        batches = list(loader)
        assert len(batches) == len(loader)
        out.append(batches)
    return out


def ids_of(per_rank: list[list[dict]]) -> list[str]:
    return [i for batches in per_rank for b in batches for i in b["image_id"]]


@pytest.mark.parametrize(
    "shape,size,split",
    [("few-big", 16, "val"), ("few-big", 16, "test"), ("many-small", 24, "train"), ("tiny-groups", 16, "val")],
)
@pytest.mark.parametrize("num_workers,world_size", [(0, 1), (0, 3), (1, 2), (2, 1), (3, 2), (2, 4)])
def test_every_row_exactly_once(stores, shape, size, split, num_workers, world_size):
    store = stores[shape]
    expected = read_partition(store, size, split).column("image_id").to_pylist()
    batch_size = 4
    per_rank = epoch_batches(
        store, size, split, batch_size=batch_size, num_workers=num_workers, world_size=world_size, shuffle_buffer=6
    )
    seen = collections.Counter(ids_of(per_rank))
    assert sorted(seen) == sorted(expected)
    assert set(seen.values()) == {1}
    for batches in per_rank:  # at most one short batch per rank, never an empty one
        sizes = [len(b["image_id"]) for b in batches]
        assert all(0 < s <= batch_size for s in sizes)
        assert sum(s < batch_size for s in sizes) <= 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_batch_size_beyond_the_split_is_one_batch_not_a_huge_buffer(stores, num_workers):
    """--batch-size 10**11 at 16 px would ask for a 25 TiB buffer; the split's 23 rows are one batch."""
    store = stores["few-big"]
    expected = read_partition(store, 16, "val").column("image_id").to_pylist()
    (batches,) = epoch_batches(store, 16, "val", batch_size=10**11, num_workers=num_workers)
    assert len(batches) == 1 and sorted(batches[0]["image_id"]) == sorted(expected)


@pytest.mark.parametrize("num_workers,world_size", [(0, 2), (2, 3)])
def test_drop_last_gives_full_equal_batches(stores, num_workers, world_size):
    n, batch_size = 61, 4
    per_rank = epoch_batches(
        stores["many-small"],
        32,
        "train",
        batch_size=batch_size,
        num_workers=num_workers,
        world_size=world_size,
        drop_last=True,
    )
    per_rank_batches = (n // world_size) // batch_size
    assert [len(b) for b in per_rank] == [per_rank_batches] * world_size
    assert all(len(b["image_id"]) == batch_size for batches in per_rank for b in batches)
    seen = collections.Counter(ids_of(per_rank))
    assert set(seen.values()) == {1} and len(seen) == world_size * per_rank_batches * batch_size


def test_order_is_deterministic_per_seed_and_epoch(stores):
    kw = dict(batch_size=5, num_workers=2, shuffle_buffer=10)
    store = stores["many-small"]
    first = ids_of(epoch_batches(store, 24, "train", **kw))
    again = ids_of(epoch_batches(store, 24, "train", **kw))
    assert first == again
    other_epoch = ids_of(epoch_batches(store, 24, "train", epoch=1, **kw))
    other_seed = ids_of(epoch_batches(store, 24, "train", seed=1, **kw))
    assert other_epoch != first and sorted(other_epoch) == sorted(first)
    assert other_seed != first and sorted(other_seed) == sorted(first)
    # one loader object reused across epochs through set_epoch
    loader = make_loader(store, 24, "train", **kw)
    loader.set_epoch(1)
    assert [i for b in loader for i in b["image_id"]] == other_epoch
    # shuffled order is not file order
    assert first != sorted(first)


def test_no_shuffle_single_process_is_file_order(stores):
    store = stores["tiny-groups"]
    expected = read_partition(store, 16, "train").column("image_id").to_pylist()
    assert ids_of(epoch_batches(store, 16, "train", batch_size=6, shuffle=False)) == expected


def test_rows_equal_what_pyarrow_reads(stores):
    store = stores["many-small"]
    table = read_partition(store, 32, "train").to_pydict()
    row_of = {image_id: i for i, image_id in enumerate(table["image_id"])}
    (batches,) = epoch_batches(store, 32, "train", batch_size=8, num_workers=1, shuffle_buffer=5)
    checked = 0
    for b in batches:
        assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (1, 32, 32)
        assert b["labels"].dtype == torch.float32 and b["labels"].shape[1] == 14
        assert b["patient_id"].dtype == torch.int64 and b["demographics"].dtype == torch.float32
        for j, image_id in enumerate(b["image_id"]):
            r = row_of[image_id]
            pixels = np.frombuffer(table["pixels"][r], dtype=np.uint8).reshape(32, 32)
            assert np.array_equal(b["image"][j, 0].numpy(), pixels)
            assert b["labels"][j].tolist() == [float(v) for v in table["labels"][r]]
            assert int(b["patient_id"][j]) == table["patient_id"][r]
            sex, view = table["sex"][r], table["view"][r]
            expected = [table["age"][r] / 100, 1.0 if sex == "F" else 0.0, 1.0 if view == "AP" else 0.0]
            assert b["demographics"][j].tolist() == pytest.approx(expected)
            checked += 1
    assert checked == 61
    # both label values, both sexes and both views occur, so the comparison above can fail
    assert {tuple(b["demographics"][:, 1].unique().tolist()) for b in batches} >= {(0.0, 1.0)}
    assert any(b["labels"].sum() > 0 for b in batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_reused_output_buffers_never_overwrite_held_batches(stores, num_workers):
    """Batch memory is recycled once the consumer drops a batch: batches still held keep their values."""
    store = stores["many-small"]
    table = read_partition(store, 32, "train").to_pydict()
    row_of = {image_id: i for i, image_id in enumerate(table["image_id"])}
    loader = make_loader(store, 32, "train", batch_size=3, num_workers=num_workers, shuffle_buffer=9, seed=2)
    kept, seen = [], []
    for i, b in enumerate(loader):  # 21 batches: far more than the buffers kept for reuse
        seen.extend(b["image_id"])
        if i % 3 == 0:
            kept.append(b)  # the others are dropped at once, so their buffers come back
        check = kept[len(kept) // 2]  # an older held batch, after newer batches reused freed buffers
        for j, image_id in enumerate(check["image_id"]):
            r = row_of[image_id]
            pixels = np.frombuffer(table["pixels"][r], np.uint8).reshape(32, 32)
            assert np.array_equal(check["image"][j, 0].numpy(), pixels)
            assert check["labels"][j].tolist() == [float(v) for v in table["labels"][r]]
            assert int(check["patient_id"][j]) == table["patient_id"][r]
    assert sorted(seen) == sorted(table["image_id"])
    for b in kept:
        for j, image_id in enumerate(b["image_id"]):
            r = row_of[image_id]
            assert np.array_equal(b["image"][j, 0].numpy(), np.frombuffer(table["pixels"][r], np.uint8).reshape(32, 32))
            assert int(b["patient_id"][j]) == table["patient_id"][r]


def test_dataset_in_a_callers_own_dataloader(stores):
    """``loader.dataset()`` in a plain DataLoader with workers yields ordinary batch dicts, every row once."""
    store = stores["many-small"]
    loader = make_loader(store, 24, "train", batch_size=4, num_workers=2, seed=4)
    own = torch.utils.data.DataLoader(loader.dataset(), batch_size=None, num_workers=2)
    batches = list(own)
    assert all(set(b) == {"image", "labels", "image_id", "patient_id", "demographics", "known"} for b in batches)
    assert [i for b in batches for i in b["image_id"]] == [i for b in loader for i in b["image_id"]]
    assert batches[0]["image"].shape == (4, 1, 24, 24) and batches[0]["labels"].shape == (4, 14)


def test_window_shuffle_stays_within_its_window(stores):
    """One worker, shuffle_buffer rows: the first batches come only from the first window's row groups
    (memory stays bounded) yet mix several row groups."""
    store = stores["tiny-groups"]  # one row per row group, so the window is exactly shuffle_buffer rows
    loader = make_loader(store, 16, "train", batch_size=4, shuffle_buffer=12, seed=6)
    units = read_partition(store, 16, "train").column("image_id").to_pylist()  # one row group each, file order
    order = np.random.default_rng([6, 0]).permutation(40)  # the epoch's row-group order (see _epoch_units)
    first_window = {units[i] for i in order[:12]}
    ids = [i for b in loader for i in b["image_id"]]
    assert set(ids[:12]) == first_window
    assert ids[:12] != [units[i] for i in order[:12]]


def test_stopping_early_ends_the_reading_thread(stores):
    """The in-process loader reads ahead in a thread; leaving the loop early stops it and closes the files."""
    loader = make_loader(stores["tiny-groups"], 16, "train", batch_size=2, shuffle_buffer=4)
    for _ in loader:
        break
    assert not [t for t in threading.enumerate() if t.name == "cxrflow-loader-read"]
    assert sum(len(b["image_id"]) for b in loader) == 40  # and the next pass is complete


def test_urls_and_fsspec_filesystems(stores, tmp_path):
    store = stores["few-big"]
    expected = ids_of(epoch_batches(store, 16, "val", batch_size=4, seed=5))
    assert ids_of(epoch_batches(store.as_uri(), 16, "val", batch_size=4, seed=5)) == expected
    assert (
        ids_of(epoch_batches(str(store), 16, "val", batch_size=4, seed=5, filesystem=pafs.LocalFileSystem()))
        == expected
    )
    memory = fsspec.filesystem("memory")
    root = f"/cxrflow-test-{tmp_path.name}"
    for path in store.rglob("*"):
        if path.is_file():
            memory.pipe(f"{root}/{path.relative_to(store).as_posix()}", path.read_bytes())
    try:
        assert ids_of(epoch_batches(f"memory://{root}", 16, "val", batch_size=4, seed=5, num_workers=1)) == expected
        assert ids_of(epoch_batches(root, 16, "val", batch_size=4, seed=5, filesystem=memory)) == expected
        with pytest.raises(CxrflowError, match="no such store"):
            make_loader(f"memory://{root}-absent", 16, "val", batch_size=4)
    finally:
        memory.rm(root, recursive=True)


def test_to_model_input_values_and_device():
    image = torch.tensor([0, 51, 255, 102], dtype=torch.uint8).view(1, 1, 2, 2)
    mean, std = 0.2, 0.5
    x = to_model_input(image, mean, std)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 2, 2)
    expected = torch.tensor([[-0.4, 0.0], [1.6, 0.4]])
    for c in range(3):
        assert torch.allclose(x[0, c], expected, atol=1e-6)
    assert to_model_input(image, mean, std, channels=1).shape == (1, 1, 2, 2)
    assert to_model_input(image.to("meta"), mean, std).device.type == "meta"
    buffer = torch.full((1, 3, 2, 2), 7.0)
    assert to_model_input(image, mean, std, out=buffer) is buffer and torch.equal(buffer, x)
    with pytest.raises(ValueError):
        to_model_input(image, mean, std, out=torch.empty(1, 1, 2, 2))
    with pytest.raises(TypeError):
        to_model_input(image.float(), mean, std)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transforms_stay_on_gpu():
    image = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8, device="cuda")
    x = to_model_input(image, 0.5, 0.25)
    assert x.device.type == "cuda"
    assert augment(x, torch.Generator().manual_seed(0)).device.type == "cuda"


def test_augment_is_seeded_small_and_keeps_shape():
    x = to_model_input(torch.randint(0, 256, (4, 1, 24, 24), dtype=torch.uint8), 0.4, 0.2)
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)
    identity = augment(x, torch.Generator().manual_seed(7), max_rotate=0, max_scale=0, max_translate=0)
    assert torch.allclose(identity, x, atol=1e-5)
    flips = augment(x, torch.Generator().manual_seed(1), max_rotate=0, max_scale=0, max_translate=0, hflip=True)
    for i in range(4):
        assert torch.allclose(flips[i], x[i], atol=1e-5) or torch.allclose(flips[i], x[i].flip(-1), atol=1e-5)
    with pytest.raises(TypeError):
        augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.Generator())


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_store_errors_name_what_exists(stores, tmp_path):
    store = stores["many-small"]
    with pytest.raises(CxrflowError, match="no such store"):
        make_loader(tmp_path / "absent", 24, "train", batch_size=4)
    with pytest.raises(CxrflowError, match=r"size 64 is not in the store; it has sizes \[24, 32\]"):
        make_loader(store, 64, "train", batch_size=4)
    bad = copy_store(store, tmp_path / "nosplit")
    manifest = json.loads((bad / MANIFEST_NAME).read_text())
    del manifest["rows"]["24"]["test"]
    (bad / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CxrflowError, match=r"split 'test' is not in the store; it has \['train', 'val'\]"):
        make_loader(bad, 24, "test", batch_size=4)
    manifest["format_version"] = 99
    (bad / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CxrflowError, match="newer"):
        make_loader(bad, 24, "train", batch_size=4)
    with pytest.raises(CxrflowError, match="batch_size"):
        make_loader(store, 24, "train", batch_size=0)
    with pytest.raises(CxrflowError, match="rank"):
        make_loader(store, 24, "train", batch_size=4, rank=2, world_size=2)


def test_corrupt_or_missing_files_are_named(stores, tmp_path):
    bad = copy_store(stores["many-small"], tmp_path / "corrupt")
    victim = sorted(split_dir(bad, 24, "train").glob("*.parquet"))[2]
    victim.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(CxrflowError, match="corrupt") as info:
        make_loader(bad, 24, "train", batch_size=4)
    assert info.value.path == str(victim)
    victim.unlink()
    with pytest.raises(CxrflowError, match="holds 54 rows in its Parquet files but the manifest says 61"):
        make_loader(bad, 24, "train", batch_size=4)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_wrong_pixel_length_names_file_and_row(stores, tmp_path, num_workers):
    bad = copy_store(stores["few-big"], tmp_path / f"short{num_workers}")
    victim = sorted(split_dir(bad, 16, "val").glob("*.parquet"))[0]
    table = pq.read_table(victim)
    pixels = table.column("pixels").to_pylist()
    pixels[5] = pixels[5][:-3]
    table = table.set_column(table.schema.get_field_index("pixels"), "pixels", pa.array(pixels, pa.binary()))
    pq.write_table(table.cast(SCHEMA), victim)
    loader = make_loader(bad, 16, "val", batch_size=4, num_workers=num_workers, shuffle=False)
    victim_id = table.column("image_id")[5].as_py()
    with pytest.raises(CxrflowError, match=rf"row 5 \(image_id {victim_id}\): 253 pixel bytes, expected 256") as info:
        list(loader)
    assert info.value.path == str(victim)
    assert "Traceback" not in str(info.value)


MEMORY_PROBE = textwrap.dedent(
    """
    import sys
    from cxrflow.data.loader import make_loader

    def status_kb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    loader = make_loader(sys.argv[1], 128, "train", batch_size=16, shuffle_buffer=64, seed=1)
    batch = next(iter(loader))  # imports and allocators warmed up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kb("VmRSS")
    rows = sum(len(b["image_id"]) for b in loader)
    print(rows, (status_kb("VmHWM") - before) * 1024)
    """
)


@pytest.mark.slow
def test_peak_memory_flat_when_store_grows_tenfold(tmp_path):
    """Peak RSS while streaming a whole epoch: 300 vs 3,000 rows at 128 px (4.9 vs 49 MB of pixels).

    Allocators keep a fixed ~10 MB after the first files, so the bound is a fraction of the growth:
    a loader that held the split (or leaked rows) would grow by about the full 44 MB.
    """
    growth = {}
    for n in (300, 3000):
        store = tmp_path / f"s{n}"
        write_synthetic_store(store, sizes=(128,), rows={"train": n}, rows_per_file=300, row_group_rows=32)
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(store)], capture_output=True, text=True, check=True
        )
        rows, grew = map(int, out.stdout.split())
        assert rows == n
        growth[n] = grew
    store_growth = 2700 * 128 * 128
    assert growth[3000] - growth[300] < 0.4 * store_growth, growth
