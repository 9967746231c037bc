"""An ensemble (``cxrflow ensemble``) as one deployable scorer: its members, its combination rule,
its calibration and thresholds in one JSON spec beside one slim checkpoint per member.

The spec (:func:`ensemble_spec`) is the single-model spec of :mod:`cxrflow.results.score` grown by
what an ensemble adds: ``"kind": "ensemble"``, the method (``mean`` of the members' calibrated
probabilities, or ``stacked`` weights per finding), each member's own size, pixel statistics and
calibration, and the ensemble's temperatures and thresholds from its evaluation. Each member keeps
its own preprocessing, so members at different sizes or with other pixel statistics score the same
image as ``cxrflow predict --run ENSEMBLE`` does (:class:`cxrflow.modelling.ensemble.EnsemblePredictor`,
rebuilt by :func:`ensemble_from_spec`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrflow.errors import CxrflowError

#: The member checkpoints' folder inside an exported model (``member-<i>/model.pt``).
MEMBERS_DIR = "members"


def is_ensemble(predictor: Any) -> bool:
    """Whether ``predictor`` is an ensemble's (several member models) rather than one run's."""
    return hasattr(predictor, "members") and not hasattr(predictor, "model")


def _floats(values: Any) -> list[float] | None:
    return None if values is None else [float(v) for v in np.asarray(values, np.float64)]


def ensemble_spec(predictor: Any, member_names: list[str] | None = None) -> dict[str, Any]:
    """The JSON-able description of an ensemble predictor (see the module docstring); members are
    named by ``member_names`` (the ensemble's ``metrics.json``), else by their checkpoint paths."""
    from cxrflow.results.score import MAX_IMAGE_BYTES, SPEC_VERSION, predictor_spec

    calibration = predictor.calibration
    members = []
    for i, (member, member_calibration) in enumerate(zip(predictor.members, predictor.member_calibrations)):
        members.append({
            "name": member_names[i] if member_names and i < len(member_names) else str(member.checkpoint),
            "checkpoint": f"member-{i}/model.pt",
            "spec": predictor_spec(member),  # raw: the member's calibration is the ensemble's input
            "temperature": None if member_calibration is None else _floats(member_calibration[0]),
            "logit_offset": None if member_calibration is None else _floats(member_calibration[1]),
        })  # fmt: skip
    return {
        "version": SPEC_VERSION,
        "kind": "ensemble",
        "method": predictor.method,
        "stacking": predictor.stacking,
        "size": list(predictor.sizes),
        "label_names": list(predictor.label_names),
        "calibrated": calibration is not None,
        "temperature": None if calibration is None else _floats(calibration[0]),
        "logit_offset": None if calibration is None else _floats(calibration[1]),
        "thresholds": None if predictor.thresholds is None else dict(predictor.thresholds),
        "uses_demographics": bool(predictor.uses_demographics),
        "max_image_bytes": MAX_IMAGE_BYTES,
        "members": members,
    }


def save_members(predictor: Any, spec: dict[str, Any], folder: str | os.PathLike) -> None:
    """Write each member's slim checkpoint under ``folder`` at the path its spec entry names."""
    import torch

    from cxrflow.results.score import save_slim_checkpoint

    for member, entry in zip(predictor.members, spec["members"]):
        target = Path(folder) / entry["checkpoint"]
        target.parent.mkdir(parents=True, exist_ok=True)
        ckpt = torch.load(member.checkpoint, map_location="cpu", weights_only=True)
        save_slim_checkpoint(member, ckpt, target)


def ensemble_from_spec(folder: str | os.PathLike, spec: dict[str, Any]) -> Any:
    """A CPU :class:`~cxrflow.modelling.ensemble.EnsemblePredictor` from the member checkpoints
    under ``folder`` and the ensemble's :func:`ensemble_spec`."""
    from cxrflow.modelling.ensemble import EnsemblePredictor
    from cxrflow.results.score import predictor_from_spec

    if spec.get("kind") != "ensemble":
        raise CxrflowError("not an ensemble's scoring spec", folder)
    members, calibrations = [], []
    for entry in spec["members"]:
        member = predictor_from_spec(Path(folder) / entry["checkpoint"], entry["spec"])
        if member.label_names != list(spec["label_names"]):
            raise CxrflowError("a member's findings are not the ensemble's", Path(folder) / entry["checkpoint"])
        members.append(member)
        calibrations.append(
            None
            if entry.get("temperature") is None
            else (np.asarray(entry["temperature"], np.float64), np.asarray(entry["logit_offset"], np.float64))
        )
    calibration = None
    if spec.get("calibrated"):
        calibration = (np.asarray(spec["temperature"], np.float64), np.asarray(spec["logit_offset"], np.float64))
    return EnsemblePredictor(
        members, calibrations, spec["method"], spec.get("stacking"), list(spec["label_names"]), Path(folder),
        spec.get("thresholds"), calibration,
    )  # fmt: skip


def single_size(predictor: Any) -> int:
    """The one input size every member takes; a one-line refusal naming what to do instead when
    the members need different sizes (one ONNX graph takes its pixels at one size)."""
    sizes = list(predictor.sizes)
    if len(sizes) != 1:
        raise CxrflowError(
            f"the ensemble's members take different input sizes ({', '.join(map(str, sizes))} px) and one ONNX graph "
            "takes one; export the members one by one ('cxrflow export --run MEMBER_RUN --format onnx') "
            "or the whole ensemble with --format mlflow",
            predictor.checkpoint,
        )
    return int(sizes[0])
