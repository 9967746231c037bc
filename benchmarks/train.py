"""Training throughput (images/s) of every model: CPU at small sizes, and bf16 vs float32 on CUDA.

CPU: for each model and size, a full training step (fine-tuning, everything trainable) is the
baseline; a knowledge-transfer step (frozen backbone in eval mode, head only) is measured beside it
in the same run, with their ratio. CUDA (when present): DenseNet-121 and ResNet-50 at 256 and 512,
bf16 autocast + channels_last beside plain float32, with their ratio and the GPU's name.
Inputs are random tensors of the model's input shape (the loader has its own benchmark); weights are
random (``pretrained="none"``), which does not change the cost of a step.

Activation checkpointing (``--grad-checkpointing``): DenseNet-121 and ResNet-50 with and without,
peak memory of a training step and images/s, with their ratios. Each measurement runs in a fresh
process: on CUDA the peak is ``torch.cuda.max_memory_allocated``; on the CPU it is the process's
peak resident memory (``VmHWM``, reset after the warm-up step) above what it held then (model,
gradients, optimiser state and input are in neither), with glibc told to return freed blocks at
once (``MALLOC_MMAP_THRESHOLD_``) so that resident memory follows what is live.

    python benchmarks/train.py                      # CPU table, plus the GPU table where CUDA exists
    python benchmarks/train.py --models simple_cnn --sizes 64 --steps 5
    python benchmarks/train.py --distributed-only   # torchrun vs Spark's TorchDistributor, 2 CPU processes
    python benchmarks/train.py --checkpointing-only --ckpt-size 1024 --ckpt-batch-size 8   # on a GPU
    python benchmarks/train.py --stores-only --batch-size 32   # two stores vs their union as one store

Distributed launch (``--distributed``, ``--distributed-only``): the same 2-process CPU training run
(simple_cnn on a synthetic store) started by ``torchrun --nproc_per_node 2`` and by ``cxrflow train
--spark-master local-cluster[2,1,1024] --processes 2`` (TorchDistributor), one after the other in
the same run: per-epoch wall time (from each run's metrics.jsonl, first epoch left out) with their
ratio, and each launch's fixed cost (command wall time minus the epochs: interpreter and imports,
process group, for Spark also the JVM, the executors, the storage check and the barrier job).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cxrflow.modelling.models import CHECKPOINTING_MODELS, MODEL_NAMES, create_model


def images_per_second(
    name: str,
    size: int,
    *,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    head_only: bool = False,
    bf16: bool = False,
    channels_last: bool = False,
    grad_checkpointing: bool = False,
    memory: dict | None = None,
    cpu_time: bool = False,
) -> float:
    """Mean training images/s of ``steps`` optimiser steps after ``warmup`` untimed ones.

    ``memory``: filled with ``peak_bytes``, the peak memory of the steps above what was held before them.
    ``cpu_time``: images per CPU second of this process instead of per wall second (fair on a busy machine).
    """
    torch.manual_seed(0)
    model = create_model(name, 14, grad_checkpointing=grad_checkpointing).to(device)
    model.freeze_backbone(head_only)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    criterion = nn.BCEWithLogitsLoss()
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 14, device=device) < 0.2).float()

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    else:
        held = _resident_bytes()
        _reset_peak_resident()
    clock = time.process_time if cpu_time else time.perf_counter
    start = clock()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = clock() - start
    if memory is not None:
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_resident_bytes()
        memory["peak_bytes"] = peak - held
    return batch * steps / seconds


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_resident() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak resident set size (VmHWM) to the current one


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _one_measurement(args: argparse.Namespace) -> None:
    """``--one NAME SIZE BATCH CKPT``: one checkpointing measurement in this (fresh) process, as JSON."""
    name, size, batch, ckpt = args.one[0], int(args.one[1]), int(args.one[2]), args.one[3] == "1"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory: dict = {}
    rate = images_per_second(
        name,
        size,
        batch=batch,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        grad_checkpointing=ckpt,
        memory=memory,
        bf16=device.type == "cuda",
        channels_last=device.type == "cuda",
        cpu_time=device.type == "cpu",
    )
    print(json.dumps({"images_per_second": rate, **memory}))


def checkpointing_table(size: int, batch: int, steps: int, warmup: int, threads: int | None) -> None:
    """Peak memory and images/s with and without activation checkpointing, each in a fresh process."""
    where = (
        f"GPU {torch.cuda.get_device_name()} (bf16 + channels_last), images per second"
        if torch.cuda.is_available()
        else "CPU, images per CPU second of the process"
    )
    print(f"\nactivation checkpointing, {where}, {size} px, batch {batch}, {steps} timed steps after {warmup} warm-up")
    print(f"{'model':<12} {'peak MiB':>9} {'ckpt MiB':>9} {'memory':>7} {'img/s':>7} {'ckpt img/s':>11} {'speed':>6}")
    for name in CHECKPOINTING_MODELS:
        out = []
        for ckpt in ("0", "1"):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                name,
                str(size),
                str(batch),
                ckpt,
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
            ] + (["--threads", str(threads)] if threads else [])
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            run = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            out.append(json.loads(run.stdout.splitlines()[-1]))
        plain, ckpt = out
        mib = 2**20
        print(
            f"{name:<12} {plain['peak_bytes'] / mib:>9.0f} {ckpt['peak_bytes'] / mib:>9.0f} "
            f"{ckpt['peak_bytes'] / plain['peak_bytes']:>6.2f}x {plain['images_per_second']:>7.1f} "
            f"{ckpt['images_per_second']:>11.1f} {ckpt['images_per_second'] / plain['images_per_second']:>5.2f}x",
            flush=True,
        )


def cpu_table(models: list[str], sizes: list[int], batch: int, steps: int, warmup: int) -> None:
    device = torch.device("cpu")
    print(f"CPU, {torch.get_num_threads()} threads, batch {batch}, {steps} timed steps after {warmup} warm-up")
    print(f"{'model':<12} {'size':>5} {'finetune img/s':>15} {'kt img/s':>10} {'kt/finetune':>12}")
    for name in models:
        for size in sizes:
            full = images_per_second(name, size, batch=batch, steps=steps, warmup=warmup, device=device)
            head = images_per_second(name, size, batch=batch, steps=steps, warmup=warmup, device=device, head_only=True)
            print(f"{name:<12} {size:>5} {full:>15.1f} {head:>10.1f} {head / full:>11.2f}x", flush=True)


def gpu_table(sizes: list[int], batch: int, steps: int, warmup: int) -> None:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"\nGPU {torch.cuda.get_device_name(device)}, batch {batch}, {steps} timed steps after {warmup} warm-up")
    print(f"{'model':<12} {'size':>5} {'fp32 img/s':>11} {'bf16+CL img/s':>14} {'ratio':>7}")
    for name in ("densenet121", "resnet50"):
        for size in sizes:
            b = batch if size <= 256 else max(1, batch // 2)
            fp32 = images_per_second(name, size, batch=b, steps=steps, warmup=warmup, device=device)
            fast = images_per_second(
                name, size, batch=b, steps=steps, warmup=warmup, device=device, bf16=True, channels_last=True
            )
            print(f"{name:<12} {size:>5} {fp32:>11.1f} {fast:>14.1f} {fast / fp32:>6.2f}x  (batch {b})", flush=True)
            torch.cuda.empty_cache()


def _timed_run(cmd: list[str], run: Path) -> tuple[float, list[float]]:
    """(command wall seconds, per-epoch seconds from the run's metrics.jsonl)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return wall, [r["seconds"] for r in rows]


def distributed_table(processes: int, epochs: int, rows: int, size: int, master: str) -> None:
    from cxrflow.testing.synthstore import write_synthetic_store

    with tempfile.TemporaryDirectory(prefix="cxrflow-bench-") as tmp:
        store = Path(tmp) / "store"
        write_synthetic_store(store, sizes=(size,), rows={"train": rows, "val": rows // 4, "test": 8}, seed=0)
        train = [
            "-m",
            "cxrflow.cli",
            "train",
            "--quiet",
            "--store",
            str(store),
            "--size",
            str(size),
            "--model",
            "simple_cnn",
            "--epochs",
            str(epochs),
            "--batch-size",
            "16",
        ]
        launches = {
            "torchrun": [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(processes),
                *train,
                "--device",
                "cpu",
            ],
            "TorchDistributor": [sys.executable, *train, "--spark-master", master, "--processes", str(processes)],
        }
        print(
            f"\n{processes}-process CPU training, simple_cnn {size}px, {rows} train images, {epochs} epochs "
            f"(gloo); Spark master {master}"
        )
        print(f"{'launch':<17} {'epoch s':>8} {'start-up s':>11} {'wall s':>8}")
        epoch_time = {}
        for name, cmd in launches.items():
            run = Path(tmp) / name
            wall, seconds = _timed_run([*cmd, "--out", str(run)], run)
            later = seconds[1:] or seconds
            epoch_time[name] = sum(later) / len(later)
            print(f"{name:<17} {epoch_time[name]:>8.2f} {wall - sum(seconds):>11.1f} {wall:>8.1f}", flush=True)
        print(
            f"epoch time ratio TorchDistributor/torchrun: {epoch_time['TorchDistributor'] / epoch_time['torchrun']:.2f}x"
        )


def _step_cost(stores: list[Path], size: int, epochs: int, batch: int) -> float:
    """CPU seconds per image of training steps alone (loader, mixing, masked loss, optimiser) over
    ``epochs`` epochs: the train loaders ``cxrflow train`` builds, through the same epoch function."""
    from torch import nn

    from cxrflow.data.loader import make_loader
    from cxrflow.data.storeset import open_stores
    from cxrflow.data.uncertain import MaskedBCEWithLogits
    from cxrflow.modelling.config import TrainConfig
    from cxrflow.modelling.distributed import Dist
    from cxrflow.modelling.epoch import train_one_epoch
    from cxrflow.modelling.multitrain import mixed_loader
    from cxrflow.progress import Progress

    ctx = Dist(device=torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model("simple_cnn", 14, pretrained="none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if len(stores) > 1:
        config = TrainConfig(stores=[str(s) for s in stores], size=size, batch_size=batch, out="unused")
        config.validate()
        found = open_stores(config.all_stores(), size)
        criterion = MaskedBCEWithLogits(torch.ones(len(found.label_names)))
        make = lambda e: mixed_loader(config, found, epoch=e, ctx=ctx, drop_last=True)  # noqa: E731
    else:
        criterion = nn.BCEWithLogitsLoss()
        make = lambda e: make_loader(stores[0], size, "train", batch_size=batch, seed=0, epoch=e, drop_last=True)  # noqa: E731
    start, images = time.process_time(), 0
    for epoch in range(epochs):
        loader = make(epoch)
        progress = Progress(len(loader), "bench", enabled=False)
        images += train_one_epoch(model, loader, criterion, optimizer, ctx=ctx, mean=0.4, std=0.2, steps=len(loader),
                                  generator=None, progress=progress, stage="finetune", epoch=epoch + 1)[1]  # fmt: skip
    return (time.process_time() - start) / images


def _run_cost(stores: list[Path], out: Path, size: int, epochs: int, batch: int) -> float:
    """CPU seconds of this process per image seen (training and validation) over a whole ``cxrflow
    train`` run's epochs after the first."""
    from cxrflow.modelling.config import resolve_config
    from cxrflow.modelling.train import train

    config = resolve_config(
        "default",
        None,
        {"store": str(stores[0]), "stores": [str(s) for s in stores] if len(stores) > 1 else [], "size": size,
         "model": "simple_cnn", "pretrained": "none", "out": str(out), "batch_size": batch, "device": "cpu",
         "finetune.epochs": epochs},
    )  # fmt: skip
    marks: list[float] = []
    train(config, quiet=True, log=lambda msg: None, epoch_hook=lambda history: marks.append(time.process_time()))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return (marks[-1] - marks[0]) / sum(r["train_images"] + r["val_images"] for r in rows[1:])


def stores_table(rows: int, size: int, epochs: int, batch: int, rounds: int) -> None:
    """Training on two stores beside training on their union written as one store, same run.

    One synthetic collection of ``rows`` train images as one store (14 findings) and as two stores of
    half the rows each (and half the val rows), the second labelling 10 of the 14 findings (so the
    mixer widens and masks); simple_cnn (the cheapest model, so the loader's and the validation's
    share is the largest), one torch thread. CPU time per image, which other processes on a busy
    machine do not change: of the training steps alone, and of whole runs (each store's validation
    included: a fixed cost per epoch and store, so its share shrinks with the split). The runs
    alternate ``rounds`` times, each round in the other order; ratios of medians, one store / two
    stores (above 1: two stores cost less)."""
    from cxrflow.data.labels import NIH14, LabelVocabulary
    from cxrflow.testing.synthstore import write_synthetic_store

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="cxrflow-bench-") as tmp:
        root = Path(tmp)
        val = max(rows // 8, 32)
        write_synthetic_store(root / "union", sizes=(size,), rows={"train": rows, "val": val}, seed=0)
        half = {"train": rows // 2, "val": val // 2}
        write_synthetic_store(root / "a", sizes=(size,), rows=half, seed=1)
        ten = LabelVocabulary(tuple(NIH14.names[:10]))
        write_synthetic_store(
            root / "b", sizes=(size,), rows={k: v - v // 2 for k, v in half.items()}, vocab=ten, seed=2
        )
        print(f"\ntraining on two stores vs their union as one store: simple_cnn {size}px, {rows} train images, "
              f"{val} val images, batch {batch}, {epochs} epochs, {rounds} rounds alternating (CPU ms per image)")  # fmt: skip
        cost: dict[str, list[tuple[float, float]]] = {"one": [], "two": []}
        for r in range(rounds):  # one store first in even rounds, two stores first in odd ones
            for which in ("one", "two") if r % 2 == 0 else ("two", "one"):
                stores = [root / "union"] if which == "one" else [root / "a", root / "b"]
                step = _step_cost(stores, size, epochs, batch)
                cost[which].append((step, _run_cost(stores, root / f"{which}{r}", size, epochs, batch)))
            print(f"round {r + 1}: steps {cost['one'][-1][0] * 1e3:.2f} (one store) {cost['two'][-1][0] * 1e3:.2f} "
                  f"(two stores); whole runs {cost['one'][-1][1] * 1e3:.2f} {cost['two'][-1][1] * 1e3:.2f}", flush=True)  # fmt: skip
        med = {w: [sorted(c[i] for c in cost[w])[len(cost[w]) // 2] for i in (0, 1)] for w in cost}
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"ratio one store / two stores, CPU per image: training steps {med['one'][0] / med['two'][0]:.2f} "
              f"(>= 0.9 wanted), whole runs with validation {med['one'][1] / med['two'][1]:.2f}; "
              f"load average {load} on {os.cpu_count()} CPUs")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128], help="CPU sizes")
    parser.add_argument("--batch-size", type=int, default=16, help="CPU batch size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--gpu-sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--gpu-batch-size", type=int, default=64, help="halved above 256 px")
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU table")
    parser.add_argument("--distributed", action="store_true", help="also time torchrun vs TorchDistributor launches")
    parser.add_argument("--distributed-only", action="store_true", help="only the torchrun vs TorchDistributor table")
    parser.add_argument("--dist-epochs", type=int, default=4)
    parser.add_argument("--dist-rows", type=int, default=512, help="train images of the distributed run")
    parser.add_argument("--dist-master", default="local-cluster[2,1,1024]")
    parser.add_argument(
        "--ckpt-size",
        type=int,
        default=None,
        help="size of the checkpointing table (default 128 on CPU, 1024 on a GPU)",
    )
    parser.add_argument("--ckpt-batch-size", type=int, default=None, help="its batch (default 8 on CPU, 16 on a GPU)")
    parser.add_argument("--checkpointing-only", action="store_true", help="only the activation checkpointing table")
    parser.add_argument("--stores-only", action="store_true", help="only two stores vs their union as one store")
    parser.add_argument("--stores-rows", type=int, default=1024, help="train images of the two-store comparison")
    parser.add_argument("--stores-size", type=int, default=32)
    parser.add_argument("--stores-epochs", type=int, default=4)
    parser.add_argument("--stores-rounds", type=int, default=4)
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "SIZE", "BATCH", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        _one_measurement(args)
        return
    gpu = torch.cuda.is_available()
    ckpt_args = (
        args.ckpt_size or (1024 if gpu else 128),
        args.ckpt_batch_size or (16 if gpu else 8),
        args.steps,
        args.warmup,
        args.threads,
    )
    if args.stores_only:
        stores_table(args.stores_rows, args.stores_size, args.stores_epochs, args.batch_size, args.stores_rounds)
        return
    if args.checkpointing_only:
        checkpointing_table(*ckpt_args)
        return
    if args.distributed_only:
        distributed_table(2, args.dist_epochs, args.dist_rows, 32, args.dist_master)
        return
    if not args.skip_cpu:
        cpu_table(args.models, args.sizes, args.batch_size, args.steps, args.warmup)
    if torch.cuda.is_available():
        gpu_table(args.gpu_sizes, args.gpu_batch_size, args.gpu_steps, warmup=3)
    else:
        print("\nno CUDA GPU here: the bf16 + channels_last vs float32 table needs one")
    checkpointing_table(*ckpt_args)
    if args.distributed:
        distributed_table(2, args.dist_epochs, args.dist_rows, 32, args.dist_master)


if __name__ == "__main__":
    main()
