"""Loader throughput and memory beside a bare pyarrow scan and an emulation of the paper's read path.

Builds a synthetic store (default 2,000 train images at 512 and 256 px), then measures, each case in
its own subprocess so peak memory is per case:

(a) floor: bare pyarrow scan of the ``pixels`` column, bytes copied into numpy once;
(b) ``make_loader`` with 0, 1, 2 workers delivering uint8 batches (shuffled, as in training);
(c) the same through ``to_model_input`` to float32 3-channel tensors on the CPU;
(p) at 512 only: an EMULATION of the paper's path (Petastorm 0.13.1 cannot import with current
    pyarrow): float32 RGB 3x512x512 rows serialised per row with ``np.save`` into a binary column,
    as Petastorm's NdarrayCodec does, read row by row, decoded with ``np.load`` and collated into
    tensors. It leaves out Petastorm's own overheads, so it is faster than the real thing.

(m) batch composition at a 1% shuffle window (see :mod:`cxrflow.testing.batchmix`): distinct percentiles
    of image_id order and distinct patients per batch of 32, for the ETL's shuffled row order and
    for the image_id order stores had before, each against a uniform permutation; and the loader's
    throughput on the two layouts (same run), which the row order must not change.

Peak memory is the summed Pss of the case process and its DataLoader workers, sampled every 20 ms
(Pss counts shared pages once, split among the processes sharing them).

    python benchmarks/loader.py [--images 2000] [--sizes 512 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# ------------------------------------------------------------------ memory sampling


def _tree_pss_bytes(root: int) -> tuple[int, int]:
    """Summed proportional set size of ``root`` and its descendants: (all, data only) (Linux /proc).

    Pss splits pages shared between processes (torch's libraries, forked workers' inherited memory,
    shared-memory batches) among them, so the sum is what the tree really costs, unlike summed RSS.
    "Data only" (Pss_Anon + Pss_Shmem) leaves out mapped library code (torch alone maps ~0.7 GB).
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, data, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = {
                    k: int(v.split()[0]) * 1024
                    for k, v in (line.split(":", 1) for line in f if ":" in line)
                    if k.startswith("Pss")
                }
        except (OSError, ValueError):
            fields = {}
        total += fields.get("Pss", 0)
        data += fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0)
        todo.extend(children.get(pid, []))
    return total, data


class PeakMemory:
    """Background sampler (every 20 ms) of the peak summed Pss of this process tree."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.peak_data, self._stop = interval, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, data = _tree_pss_bytes(os.getpid())
            self.peak, self.peak_data = max(self.peak, total), max(self.peak_data, data)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ cases (run in a subprocess)


def case_floor(store: str, size: int, args) -> int:
    """Bare scan: every row group's pixels column, bytes copied once into a numpy array."""
    folder = Path(store) / f"size={size}" / "split=train"
    n = 0
    for path in sorted(folder.glob("*.parquet")):
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            for chunk in pf.read_row_group(g, columns=["pixels"]).column("pixels").chunks:
                offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
                data = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
                images = data.reshape(len(chunk), size, size).copy()
                n += len(images)
    return n


def case_loader(store: str, size: int, args, to_float: bool, reuse: bool = False) -> int:
    import torch

    from cxrflow.data.loader import make_loader, to_model_input
    from cxrflow.data.store import pixel_stats, read_manifest

    torch.set_num_threads(1 if args.workers_case else 2)
    mean, std = pixel_stats(read_manifest(store), size)
    loader = make_loader(store, size, "train", batch_size=args.batch_size, num_workers=args.workers_case, seed=1)
    n, out = 0, None
    for batch in loader:
        x = batch["image"]
        if to_float:
            if reuse and (out is None or out.shape[0] != x.shape[0]):
                out = torch.empty((x.shape[0], 3, size, size))
            x = to_model_input(x, mean, std, out=out if reuse else None)
        n += x.shape[0]
    return n


def case_paper(store: str, size: int, args) -> int:
    """Emulated Petastorm read: per-row np.load of float32 RGB arrays, collated into batch tensors."""
    import torch

    n = 0
    pf = pq.ParquetFile(Path(store) / "paper-emulation.parquet")
    for record_batch in pf.iter_batches(batch_size=args.batch_size, columns=["image", "labels"]):
        rows = record_batch.to_pylist()  # Petastorm hands rows to the decoder one by one
        images = [torch.from_numpy(np.load(io.BytesIO(r["image"]))) for r in rows]
        labels = [torch.tensor(r["labels"], dtype=torch.float32) for r in rows]
        batch = torch.stack(images), torch.stack(labels)
        n += batch[0].shape[0]
    return n


def run_case(args) -> None:
    size, store = args.size, args.store
    if args.case != "floor":  # imports are not part of the measurement
        import torch  # noqa: F401

        import cxrflow.data.loader  # noqa: F401
    fn = {
        "floor": lambda: case_floor(store, size, args),
        "uint8": lambda: case_loader(store, size, args, to_float=False),
        "float": lambda: case_loader(store, size, args, to_float=True),
        "float-reuse": lambda: case_loader(store, size, args, to_float=True, reuse=True),
        "paper": lambda: case_paper(store, size, args),
    }[args.case]
    best, best_cpu = None, None
    memory = PeakMemory()
    if not args.cpu_time:  # the sampler's own CPU time would blur the CPU-time figure
        memory.__enter__()
    try:
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            n = fn()
            seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            best = seconds if best is None else min(best, seconds)
            best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
    finally:
        if not args.cpu_time:
            memory.__exit__()
    print(
        json.dumps(
            {
                "images": n,
                "seconds": best,
                "cpu_seconds": best_cpu,
                "peak_mem": memory.peak,
                "peak_data": memory.peak_data,
            }
        )
    )


# ------------------------------------------------------------------ building the data


def recompress(workdir: Path, compression: str) -> None:
    """Rewrite the store's Parquet files with ``compression``, keeping their row groups (the ETL writes zstd)."""
    for path in sorted(workdir.glob("size=*/split=*/*.parquet")):
        source = pq.ParquetFile(path)
        tmp = path.with_suffix(".tmp")
        with pq.ParquetWriter(
            tmp, source.schema_arrow, compression=compression, use_dictionary=["image_id", "sex", "view"]
        ) as writer:
            for g in range(source.num_row_groups):
                writer.write_table(source.read_row_group(g))
        os.replace(tmp, path)


def build(
    workdir: Path,
    sizes: list[int],
    images: int,
    paper_images: int,
    row_group_rows: int | None,
    compression: str = "snappy",
) -> None:
    from cxrflow.data.etl import auto_rows_per_file
    from cxrflow.testing.synthstore import write_synthetic_store

    start = time.perf_counter()
    # files and row groups laid out as the ETL lays out the full release (112,120 images)
    write_synthetic_store(
        workdir,
        sizes=tuple(sizes),
        rows={"train": images},
        rows_per_file=auto_rows_per_file(112_120, max(sizes)),
        row_group_rows=row_group_rows,
        seed=0,
    )
    if compression != "snappy":  # write_synthetic_store uses pyarrow's default, snappy
        recompress(workdir, compression)
    if 512 in sizes and paper_images:
        rng = np.random.default_rng(0)
        writer = None
        for start_row in range(0, paper_images, 10):
            m = min(10, paper_images - start_row)
            blobs = []
            for _ in range(m):
                buf = io.BytesIO()
                np.save(buf, rng.random((3, 512, 512), dtype=np.float32))  # NdarrayCodec.encode
                blobs.append(buf.getvalue())
            table = pa.table(
                {
                    "image_id": [f"{i:06d}.png" for i in range(start_row, start_row + m)],
                    "image": pa.array(blobs, pa.binary()),
                    "labels": pa.array([[0] * 14] * m, pa.list_(pa.int32())),
                }
            )
            writer = writer or pq.ParquetWriter(workdir / "paper-emulation.parquet", table.schema, compression="snappy")
            writer.write_table(table)  # one row group per 10 rows (~30 MB, like Petastorm's row groups)
        writer.close()
    print(f"built store in {workdir} ({time.perf_counter() - start:.0f} s)", flush=True)


def measure(
    args,
    case: str,
    size: int,
    workers: int = 0,
    images: int | None = None,
    store: Path | None = None,
    cpu_time: bool = False,
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--store",
        str(store or args.workdir),
        "--size",
        str(size),
        "--workers-case",
        str(workers),
        "--batch-size",
        str(args.batch_size),
        "--repeat",
        str(args.repeat),
    ]
    if cpu_time:
        cmd.append("--cpu-time")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"case {case} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["mb"] = result["images"] * size * size / 1e6
    return result


def mixing(args) -> None:
    """(m): batch composition of the shuffled and the image_id-ordered layouts at a 1% window."""
    from cxrflow.testing.batchmix import batch_mixing
    from cxrflow.testing.synthstore import write_synthetic_store

    print(
        f"\n(m) batch composition, {args.mix_rows} train rows, 4 images per patient, row groups of 256 rows "
        f"(the ETL's at 512 px), window 1% of the split, batch {args.batch_size}"
    )
    print(f"{'layout':<28}{'percentiles':>12}{'uniform':>9}{'ratio':>7}{'patients':>10}{'uniform':>9}{'ratio':>7}")
    for shuffled, name in ((True, "shuffled (ETL row order)"), (False, "image_id order (before)")):
        store = args.workdir / f"mix-{name.split()[0]}"
        write_synthetic_store(store, sizes=(4,), rows={"train": args.mix_rows}, rows_per_file=512, row_group_rows=256,
                              follow_ups=4, shuffled=shuffled, seed=0)  # fmt: skip
        m = batch_mixing(store, 4, "train", batch_size=args.batch_size, window_fraction=0.01, seed=1)
        print(
            f"{name:<28}{m['percentiles']:>12.1f}{m['uniform_percentiles']:>9.1f}{m['percentiles_ratio']:>7.2f}"
            f"{m['patients']:>10.1f}{m['uniform_patients']:>9.1f}{m['patients_ratio']:>7.2f}"
        )
    print("target: both ratios >= 0.9 for the shuffled layout")


def layout_throughput(args, size: int) -> None:
    """The loader's uint8 throughput on the shuffled layout vs the same images in image_id order."""
    from cxrflow.data.etl import auto_rows_per_file
    from cxrflow.testing.synthstore import write_synthetic_store

    ordered = args.workdir / "ordered"
    write_synthetic_store(ordered, sizes=(size,), rows={"train": args.images}, rows_per_file=auto_rows_per_file(112_120, size),
                          row_group_rows=args.row_group_rows, seed=0, shuffled=False)  # fmt: skip
    if args.compression != "snappy":
        recompress(ordered, args.compression)
    for path in ordered.rglob("*.parquet"):
        path.read_bytes()
    rates = {"shuffled": [], "ordered": []}
    cpu = {"shuffled": [], "ordered": []}
    for _ in range(3):  # interleaved, so both layouts see the same machine load
        for name, store in (("shuffled", args.workdir), ("ordered", ordered)):
            r = measure(args, "uint8", size, 0, store=store, cpu_time=True)
            rates[name].append(r["images"] / r["seconds"])
            cpu[name].append(r["images"] / r["cpu_seconds"])
    best = {k: max(v) for k, v in rates.items()}
    best_cpu = {k: max(v) for k, v in cpu.items()}
    print(
        f"(b) make_loader uint8, 0 workers, shuffled layout vs image_id layout (best of 3 interleaved rounds):\n"
        f"    wall: {best['shuffled']:.0f} vs {best['ordered']:.0f} images/s, ratio {best['shuffled'] / best['ordered']:.3f}\n"
        f"    per CPU-second (less sensitive to other jobs): {best_cpu['shuffled']:.0f} vs {best_cpu['ordered']:.0f}, "
        f"ratio {best_cpu['shuffled'] / best_cpu['ordered']:.3f} (target: within 5%)"
    )
    shutil.rmtree(ordered, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="train images in the synthetic store")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--row-group-rows",
        type=int,
        default=None,
        help="rows per row group (default: the ETL's layout, about 64 MiB: 256 rows at 512 px)",
    )
    p.add_argument(
        "--compression",
        default="snappy",
        choices=["snappy", "zstd", "none"],
        help="Parquet compression of the built store (the ETL writes zstd; noise pixels barely compress)",
    )
    p.add_argument("--paper-images", type=int, default=200, help="rows in the emulated paper file (3 MB each)")
    p.add_argument("--repeat", type=int, default=2, help="passes per case; the fastest is reported")
    p.add_argument("--workdir", type=Path, default=None, help="where to build the store (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the built store")
    p.add_argument(
        "--mix-rows",
        type=int,
        default=78_000,
        help="rows of the batch-composition stores (the release's train split: ~78k)",
    )
    p.add_argument("--only-mix", action="store_true", help="only the batch-composition and layout-throughput cases")
    # internal: one case in this process
    p.add_argument("--case", choices=["floor", "uint8", "float", "float-reuse", "paper"], help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers-case", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cpu-time", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        run_case(args)
        return

    own_dir = args.workdir is None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cxrflow-bench-loader-"))
    try:
        print(
            f"cxrflow loader benchmark: {args.images} images, sizes {args.sizes}, batch {args.batch_size}, "
            f"{args.row_group_rows or 'ETL-layout'} rows per row group, {args.compression}, {os.cpu_count()} CPUs, "
            f"load average at start {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        mixing(args)
        build(args.workdir, args.sizes, args.images, 0 if args.only_mix else args.paper_images, args.row_group_rows,
              args.compression)  # fmt: skip
        for path in args.workdir.rglob("*.parquet"):  # warm the page cache so no case pays for the disk
            path.read_bytes()
        if args.only_mix:
            layout_throughput(args, args.sizes[0])
            return
        header = f"{'case':<44}{'images/s':>10}{'MB/s':>9}{'peak mem':>11}{'(data)':>10}{'ratio':>8}"
        for size in args.sizes:
            print(
                f"\nsize {size} (MB/s counts uint8 pixels delivered; peak mem = Pss of case process + workers; data = without library code)"
            )
            print(header)
            floor = measure(args, "floor", size)
            floor_rate = floor["images"] / floor["seconds"]

            def row(name: str, r: dict, base: float, base_name: str) -> float:
                rate = r["images"] / r["seconds"]
                print(
                    f"{name:<44}{rate:>10.0f}{r['mb'] / r['seconds']:>9.0f}{r['peak_mem'] / 2**20:>8.0f} MB{r['peak_data'] / 2**20:>7.0f} MB"
                    f"{rate / base:>7.2f}x  vs {base_name}"
                )
                return rate

            row("(a) floor: bare pyarrow scan -> numpy", floor, floor_rate, "(a)")
            best_uint8, best_float = 0.0, 0.0
            for w in args.workers:
                best_uint8 = max(
                    best_uint8,
                    row(f"(b) make_loader uint8, {w} workers", measure(args, "uint8", size, w), floor_rate, "(a)"),
                )
            best_w = 0
            for w in args.workers:
                rate = row(
                    f"(c) + to_model_input float32x3, {w} workers", measure(args, "float", size, w), floor_rate, "(a)"
                )
                best_float, best_w = max((best_float, best_w), (rate, w))
            best_float = max(
                best_float,
                row(
                    f"(c) same, reusing one out= buffer, {best_w} workers",
                    measure(args, "float-reuse", size, best_w),
                    floor_rate,
                    "(a)",
                ),
            )
            print(f"best (b) / (a) = {best_uint8 / floor_rate:.2f} (target >= 0.7)")
            layout_throughput(args, size)
            if size == 512 and args.paper_images:
                paper = measure(args, "paper", size)
                paper_rate = row("(p) EMULATED paper path (np.save rows)", paper, floor_rate, "(a)")
                print(f"best (c) / (p) emulated paper path = {best_float / paper_rate:.1f}x (same run)")
                print(
                    "(p) is an emulation of Petastorm's storage and decode (NdarrayCodec, np.save per row), "
                    "not Petastorm itself, which cannot import with current pyarrow; Petastorm 0.13.1 itself was "
                    "measured side by side in its own environment (see the README)."
                )
        print(f"\nload average at end {os.getloadavg()[0]:.1f} (other jobs on this machine slow every figure)")
    finally:
        if own_dir and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
