"""Heatmaps per second of every model, beside plain inference on the same images in the same run.

For each model at ``--size`` (default 256): ``batch_logits`` (one forward pass, no gradient, as
``evaluate`` and ``predict`` score) is the baseline; ``heatmaps`` (one finding per image, forward
and backward to the class-activation layer, float32, the model's own method; and the other method
beside it) is measured on the same uint8 images, with the ratio heatmap time / inference time. On
CUDA (``--device cuda``, or ``auto`` where a GPU exists) inference runs in bf16 as everywhere in
cxrflow, while heatmaps stay float32. Weights are random (``pretrained="none"``): the cost is the same.

    python benchmarks/localize.py                          # CPU, all models, 256 px, 8 images
    python benchmarks/localize.py --models simple_cnn --images 32 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cxrflow.modelling.heatmaps import METHODS, cam_method, heatmaps
from cxrflow.modelling.inference import batch_logits, resolve_device
from cxrflow.modelling.models import MODEL_NAMES, create_model


def _best_of(fn, rounds: int, device: torch.device) -> float:
    """Shortest wall time of ``rounds`` calls after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, size: int, n: int, batch: int, rounds: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_model(name, 14).to(device).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 1, size, size), dtype=np.uint8))
    targets = [i % 14 for i in range(n)]

    def infer() -> None:
        for s in range(0, n, batch):
            batch_logits(model, images[s : s + batch], 0.5, 0.25, device)

    row = {"model": name, "inference": n / _best_of(infer, rounds, device)}
    own = cam_method(model)
    for method in (own, *[m for m in METHODS if m != own]):
        seconds = _best_of(
            lambda method=method: heatmaps(model, images, targets, method=method, pixel_mean=0.5, pixel_std=0.25, device=device, batch_size=batch),
            rounds, device,
        )  # fmt: skip
        row[method] = n / seconds
    row["own"] = own
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated model names")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--images", type=int, default=8, help="images per measurement (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward/backward (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, best taken (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"heatmaps vs inference at {args.size} px, {args.images} images, batch {args.batch}, best of {args.rounds}, {where}"
    )
    print(f"{'model':<12} {'inference/s':>11} {'own method':>10} {'heatmaps/s':>10} {'ratio':>6} {'other/s':>8}")
    for name in args.models.split(","):
        r = measure(name, args.size, args.images, args.batch, args.rounds, device)
        other = next(m for m in METHODS if m != r["own"])
        print(
            f"{name:<12} {r['inference']:>11.1f} {r['own']:>10} {r[r['own']]:>10.1f} "
            f"{r['inference'] / r[r['own']]:>5.1f}x {r[other]:>8.1f}"
        )


if __name__ == "__main__":
    main()
