"""ONNX export: one graph from uint8 pixels to (calibrated) probabilities, checked against PyTorch.

The graph takes ``pixels`` uint8 ``(N, 1, S, S)`` at the model's size (and, for a run that fuses
demographics, ``demographics`` float32 ``(N, 3)`` in the training encoding of
:mod:`cxrflow.data.demographics`, NaN for unknown) and returns ``probabilities`` float32 ``(N, K)``
in the checkpoint's finding order. Inside it: the loader's normalisation
(the arithmetic of :func:`cxrflow.data.loader.to_model_input`, with the checkpoint's pixel statistics), the network, and
the evaluation's calibration ``sigmoid((logit - offset) / T)`` when the run was evaluated.

What comes before the graph (decode to gray, pad to a square, resize: :mod:`cxrflow.data.imaging`)
is named in the JSON sidecar with the size, the findings and the thresholds. The export is made by
PyTorch's TorchScript-based exporter (works offline, no extra packages) and checked with ONNX
Runtime against :meth:`cxrflow.results.predict.Predictor.probabilities` on random images.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrflow.errors import CxrflowError
from cxrflow.results.predict import Predictor

#: Largest difference to PyTorch's probabilities an export may have.
TOLERANCE = 1e-4
OPSET = 17


class ProbabilityGraph(nn.Module):
    """uint8 pixels (and encoded demographics) -> normalised input -> logits -> calibrated probabilities."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.model = predictor.model.eval()
        self.mean, self.std = float(predictor.mean), float(predictor.std)
        k = len(predictor.label_names)
        temperatures, offsets = (
            predictor.calibration if predictor.calibration is not None else (np.ones(k), np.zeros(k))
        )
        temperatures = np.where(np.isnan(temperatures), 1.0, temperatures)  # as apply_temperatures does
        self.register_buffer("temperature", torch.tensor(temperatures, dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(offsets, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        # to_model_input's arithmetic, written without its in-place ``out=`` steps that tracing cannot export
        x = (pixels.float() * (1.0 / (255.0 * self.std)) - self.mean / self.std).expand(-1, 3, -1, -1)
        z = self.model(x, demographics=demographics)
        return torch.sigmoid((z.float() - self.offset) / self.temperature)


def export_graph(predictor: Predictor) -> bytes:
    """The ONNX bytes of :class:`ProbabilityGraph` with a dynamic batch axis."""
    graph = ProbabilityGraph(predictor).cpu().eval()
    s = predictor.size
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, 1, s, s, dtype=torch.uint8),)
    names = ["pixels"]
    if predictor.uses_demographics:
        args += (torch.zeros(2, 3, dtype=torch.float32),)
        names.append("demographics")
    axes = {n: {0: "batch"} for n in [*names, "probabilities"]}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's business
        torch.onnx.export(graph, args, buffer, dynamo=False, input_names=names, output_names=["probabilities"],
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)  # fmt: skip
    return buffer.getvalue()


def check_graph(onnx_bytes: bytes, predictor: Predictor, n: int = 4, seed: int = 0) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's probabilities on ``n``
    random images (and demographics with unknown values, for a fused model)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    s = predictor.size
    pixels = rng.integers(0, 256, (n, 1, s, s), dtype=np.uint8)
    feeds: dict[str, np.ndarray] = {"pixels": pixels}
    demo = None
    if predictor.uses_demographics:
        demo = np.stack([rng.uniform(0.2, 0.9, n), rng.integers(0, 2, n), rng.integers(0, 2, n)], 1).astype(np.float32)
        demo[0, :] = np.nan  # unknown values take the graph's other branch
        feeds["demographics"] = demo
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], feeds)[0]
    want = predictor.probabilities({s: torch.from_numpy(pixels)}, None if demo is None else torch.from_numpy(demo))
    return float(np.max(np.abs(got.astype(np.float64) - want)))


def sidecar(predictor: Predictor, spec: dict[str, Any], max_diff: float) -> dict[str, Any]:
    """The JSON beside the graph: inputs, outputs, findings, thresholds and the preprocessing before it."""
    from cxrflow.data.imagecheck import MAX_SIDE

    inputs = [{"name": "pixels", "dtype": "uint8", "shape": ["N", 1, predictor.size, predictor.size]}]
    if predictor.uses_demographics:
        inputs.append({"name": "demographics", "dtype": "float32", "shape": ["N", 3],
                       "encoding": "(age / 100, sex M=0 F=1, view PA=0 AP=1), NaN = unknown (cxrflow.data.demographics)"})  # fmt: skip
    return {
        "format": "onnx",
        "opset": OPSET,
        "size": predictor.size,
        "label_names": list(predictor.label_names),
        "inputs": inputs,
        "output": {
            "name": "probabilities",
            "dtype": "float32",
            "shape": ["N", len(predictor.label_names)],
            "scale": "calibrated" if spec["calibrated"] else "raw sigmoid",
        },
        "thresholds": spec["thresholds"],
        "preprocessing": {
            "before_the_graph": [
                "decode PNG/JPEG/DICOM to 8-bit gray (cxrflow.data.imaging: 16-bit >> 8, RGB luma, DICOM windowed)",
                "pad to a centred square with black (0)",
                f"resize to {predictor.size} x {predictor.size} with Pillow's Lanczos filter, reducing_gap=2.0",
                f"refuse images whose padded square is over {MAX_SIDE} px",
            ],
            "inside_the_graph": f"(pixels / 255 - {spec['pixel_mean']:.6f}) / {spec['pixel_std']:.6f}, gray copied to 3 channels",
        },
        "pixel_mean": spec["pixel_mean"],
        "pixel_std": spec["pixel_std"],
        "calibration": {"temperature": spec["temperature"], "logit_offset": spec["logit_offset"]}
        if spec["calibrated"]
        else None,
        "max_abs_difference_to_pytorch": max_diff,
    }


def export_onnx(predictor: Predictor, spec: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path, float]:
    """Write ``out`` (the graph) and ``out`` with suffix ``.json`` (the sidecar), each atomically,
    after checking the graph against PyTorch; returns both paths and the largest difference."""
    import json

    from cxrflow.atomic import atomic_path, write_json_atomic

    out = Path(out)
    data = export_graph(predictor)
    max_diff = check_graph(data, predictor)
    if not max_diff <= TOLERANCE:
        raise CxrflowError(
            f"the ONNX graph differs from PyTorch by {max_diff:.2e} (over {TOLERANCE:g}); not written", out
        )
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(data)
    side = out.with_suffix(".json")
    write_json_atomic(side, json.loads(json.dumps(sidecar(predictor, spec, max_diff))))
    return out, side, max_diff
