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

An ensemble whose members share one input size is one graph too (:class:`EnsembleGraph`: every
member with its own normalisation and calibration, the ensemble's combination and calibration),
checked the same way against :class:`cxrflow.modelling.ensemble.EnsemblePredictor`; members at
different sizes are refused (:func:`cxrflow.results.ensembleexport.single_size`).
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


class Calibration(nn.Module):
    """``sigmoid((logit - offset) / T)`` per finding; without a calibration, the plain sigmoid."""

    def __init__(self, calibration: tuple | None, k: int) -> None:
        super().__init__()
        temperatures, offsets = calibration if calibration is not None else (np.ones(k), np.zeros(k))
        temperatures = np.where(np.isnan(temperatures), 1.0, temperatures)  # as apply_temperatures does
        self.register_buffer("temperature", torch.tensor(temperatures, dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(offsets, dtype=torch.float32))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((z - self.offset) / self.temperature)


class ProbabilityGraph(nn.Module):
    """uint8 pixels (and encoded demographics) -> normalised input -> logits -> calibrated
    probabilities (the predictor's calibration, or the one given)."""

    def __init__(self, predictor: Predictor, calibration: tuple | None = None) -> None:
        super().__init__()
        self.model = predictor.model.eval()
        self.mean, self.std = float(predictor.mean), float(predictor.std)
        k = len(predictor.label_names)
        self.calibrate = Calibration(predictor.calibration if calibration is None else calibration, k)

    def logits(self, pixels: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        # to_model_input's arithmetic, written without its in-place ``out=`` steps that tracing cannot export
        x = (pixels.float() * (1.0 / (255.0 * self.std)) - self.mean / self.std).expand(-1, 3, -1, -1)
        return self.model(x, demographics=demographics).float()

    def forward(self, pixels: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        return self.calibrate(self.logits(pixels, demographics))


class EnsembleGraph(nn.Module):
    """An ensemble's members on the same uint8 pixels, each with its own normalisation and
    calibration, combined as :func:`cxrflow.modelling.ensemble.ensemble_logits` does (the logit of
    the mean calibrated probability, or per finding the stacking weights on the members' logits),
    then the ensemble's own calibration."""

    def __init__(self, predictor: Any) -> None:
        super().__init__()
        k = len(predictor.label_names)
        self.members = nn.ModuleList(
            ProbabilityGraph(m, c) for m, c in zip(predictor.members, predictor.member_calibrations)
        )
        self.fused = [bool(m.uses_demographics) for m in predictor.members]
        self.calibrate = Calibration(predictor.calibration, k)
        coef, intercept, stacked = np.zeros((len(self.members), k)), np.zeros(k), np.zeros(k, bool)
        weights_per_finding = (predictor.stacking or []) if predictor.method == "stacked" else []
        for j, weights in enumerate(weights_per_finding):
            if weights is not None:  # None: this finding falls back to the mean
                coef[:, j], intercept[j], stacked[j] = weights["coef"], weights["intercept"], True
        self.stacked_any = bool(stacked.any())
        self.register_buffer("coef", torch.tensor(coef, dtype=torch.float32))
        self.register_buffer("intercept", torch.tensor(intercept, dtype=torch.float32))
        self.register_buffer("stacked", torch.tensor(stacked))

    def forward(self, pixels: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        z = [m.logits(pixels, demographics if fused else None) for m, fused in zip(self.members, self.fused)]
        mean = torch.stack([m.calibrate(zm) for m, zm in zip(self.members, z)]).mean(0).clamp(1e-7, 1.0 - 1e-7)
        combined = torch.log(mean) - torch.log1p(-mean)  # cxrflow.modelling.calibration.logit
        if self.stacked_any:
            weighted = self.intercept + (self.coef[:, None, :] * torch.stack(z)).sum(0)
            combined = torch.where(self.stacked, weighted, combined)
        return self.calibrate(combined)


def graph_size(predictor: Any) -> int:
    """The graph's one input size: the model's, or the one every ensemble member takes (else refused)."""
    from cxrflow.results.ensembleexport import is_ensemble, single_size

    return single_size(predictor) if is_ensemble(predictor) else int(predictor.size)


def export_graph(predictor: Any) -> bytes:
    """The ONNX bytes of :class:`ProbabilityGraph` (:class:`EnsembleGraph` for an ensemble whose
    members share one size) with a dynamic batch axis."""
    from cxrflow.results.ensembleexport import is_ensemble

    s = graph_size(predictor)
    graph = (EnsembleGraph(predictor) if is_ensemble(predictor) else ProbabilityGraph(predictor)).cpu().eval()
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


def check_graph(onnx_bytes: bytes, predictor: Any, n: int = 4, seed: int = 0) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's probabilities on ``n``
    random images (and demographics with unknown values, for a fused model)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    s = graph_size(predictor)
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


def _inside_the_graph(spec: dict[str, Any]) -> dict[str, Any]:
    """What the graph does to the pixels, in the sidecar's words (an ensemble's per member)."""
    if spec.get("kind") != "ensemble":
        return {
            "inside_the_graph": f"(pixels / 255 - {spec['pixel_mean']:.6f}) / {spec['pixel_std']:.6f}, gray copied to 3 channels",
            "pixel_mean": spec["pixel_mean"],
            "pixel_std": spec["pixel_std"],
        }
    rule = "stacking weights on the members' logits per finding (the mean where a finding has none)" if spec[
        "method"] == "stacked" else "logit of the mean of the members' calibrated probabilities"  # fmt: skip
    return {
        "inside_the_graph": (
            "per member: (pixels / 255 - member pixel_mean) / member pixel_std, gray copied to 3 channels, the "
            f"member's network and calibration; then the ensemble's {spec['method']} rule ({rule}) and its calibration"
        ),
        "method": spec["method"],
        "members": [
            {
                "name": m["name"],
                "pixel_mean": m["spec"]["pixel_mean"],
                "pixel_std": m["spec"]["pixel_std"],
                "calibration": {"temperature": m["temperature"], "logit_offset": m["logit_offset"]},
            }
            for m in spec["members"]
        ],  # fmt: skip
    }


def sidecar(predictor: Any, spec: dict[str, Any], max_diff: float) -> dict[str, Any]:
    """The JSON beside the graph: inputs, outputs, findings, thresholds and the preprocessing before it."""
    from cxrflow.data.imagecheck import MAX_SIDE

    size = graph_size(predictor)
    inputs = [{"name": "pixels", "dtype": "uint8", "shape": ["N", 1, size, size]}]
    if predictor.uses_demographics:
        inputs.append({"name": "demographics", "dtype": "float32", "shape": ["N", 3],
                       "encoding": "(age / 100, sex M=0 F=1, view PA=0 AP=1), NaN = unknown (cxrflow.data.demographics)"})  # fmt: skip
    inside = _inside_the_graph(spec)
    return {
        "format": "onnx",
        "opset": OPSET,
        **({"kind": "ensemble"} if spec.get("kind") == "ensemble" else {}),
        "size": size,
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
                f"resize to {size} x {size} with Pillow's Lanczos filter, reducing_gap=2.0",
                f"refuse images whose padded square is over {MAX_SIDE} px",
            ],
            "inside_the_graph": inside.pop("inside_the_graph"),
        },
        **inside,
        "calibration": {"temperature": spec["temperature"], "logit_offset": spec["logit_offset"]}
        if spec["calibrated"]
        else None,
        "max_abs_difference_to_pytorch": max_diff,
    }


def export_onnx(predictor: Any, spec: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path, float]:
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
