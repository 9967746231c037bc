"""Training throughput (images/s) of every model: CPU at small sizes, and bf16 vs float32 on CUDA.

CPU: for each model and size, a full training step (fine-tuning, everything trainable) is the
baseline; a knowledge-transfer step (frozen backbone in eval mode, head only) is measured beside it
in the same run, with their ratio. CUDA (when present): DenseNet-121 and ResNet-50 at 256 and 512,
bf16 autocast + channels_last beside plain float32, with their ratio and the GPU's name.
Inputs are random tensors of the model's input shape (the loader has its own benchmark); weights are
random (``pretrained="none"``), which does not change the cost of a step.

    python benchmarks/train.py                      # CPU table, plus the GPU table where CUDA exists
    python benchmarks/train.py --models simple_cnn --sizes 64 --steps 5
    python benchmarks/train.py --distributed-only   # torchrun vs Spark's TorchDistributor, 2 CPU processes

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cxrflow.models import MODEL_NAMES, create_model


def images_per_second(
    name: str, size: int, *, batch: int, steps: int, warmup: int, device: torch.device,
    head_only: bool = False, bf16: bool = False, channels_last: bool = False,
) -> float:
    """Mean training images/s of ``steps`` optimiser steps after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    model = create_model(name, 14).to(device)
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
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - start)


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
    from cxrflow.synthstore import write_synthetic_store

    with tempfile.TemporaryDirectory(prefix="cxrflow-bench-") as tmp:
        store = Path(tmp) / "store"
        write_synthetic_store(store, sizes=(size,), rows={"train": rows, "val": rows // 4, "test": 8}, seed=0)
        train = ["-m", "cxrflow.cli", "train", "--quiet", "--store", str(store), "--size", str(size), "--model",
                 "simple_cnn", "--epochs", str(epochs), "--batch-size", "16"]
        launches = {
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                         str(processes), *train, "--device", "cpu"],
            "TorchDistributor": [sys.executable, *train, "--spark-master", master, "--processes", str(processes)],
        }
        print(f"\n{processes}-process CPU training, simple_cnn {size}px, {rows} train images, {epochs} epochs "
              f"(gloo); Spark master {master}")
        print(f"{'launch':<17} {'epoch s':>8} {'start-up s':>11} {'wall s':>8}")
        epoch_time = {}
        for name, cmd in launches.items():
            run = Path(tmp) / name
            wall, seconds = _timed_run([*cmd, "--out", str(run)], run)
            later = seconds[1:] or seconds
            epoch_time[name] = sum(later) / len(later)
            print(f"{name:<17} {epoch_time[name]:>8.2f} {wall - sum(seconds):>11.1f} {wall:>8.1f}", flush=True)
        print(f"epoch time ratio TorchDistributor/torchrun: {epoch_time['TorchDistributor'] / epoch_time['torchrun']:.2f}x")


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.distributed_only:
        distributed_table(2, args.dist_epochs, args.dist_rows, 32, args.dist_master)
        return
    if not args.skip_cpu:
        cpu_table(args.models, args.sizes, args.batch_size, args.steps, args.warmup)
    if torch.cuda.is_available():
        gpu_table(args.gpu_sizes, args.gpu_batch_size, args.gpu_steps, warmup=3)
    else:
        print("\nno CUDA GPU here: the bf16 + channels_last vs float32 table needs one")
    if args.distributed:
        distributed_table(2, args.dist_epochs, args.dist_rows, 32, args.dist_master)


if __name__ == "__main__":
    main()
