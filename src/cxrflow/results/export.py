"""``cxrflow export``: a run's checkpoint as a deployable model, MLflow or ONNX.

- ``--format mlflow``: a self-contained MLflow model folder (``mlflow.pyfunc``, class
  :class:`cxrflow.results.pyfunc.CxrflowModel`) that takes a frame of base64 images and gives
  calibrated probabilities and operating-point flags (:mod:`cxrflow.results.score`); preprocessing,
  temperatures and thresholds travel inside it, and a model card (``README.md``,
  :mod:`cxrflow.results.modelcard`) beside them. ``--mlflow URI`` also logs it to a tracking server
  and ``--register NAME`` registers it there. ``mlflow models serve -m OUT --env-manager local``
  serves the folder as it is.
- ``--format onnx``: one graph from uint8 pixels to probabilities plus a JSON sidecar
  (:mod:`cxrflow.results.onnxexport`), checked against PyTorch on export.

The predictor is the one ``cxrflow predict`` loads (:func:`cxrflow.results.predict.load_predictor`):
calibrated when a current evaluation of the checkpoint exists, raw otherwise (``--raw`` forces raw).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cxrflow.errors import CxrflowError

FORMATS = ("mlflow", "onnx")
CARD_NAME = "README.md"


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow without its progress bars and its advice on type hints and input examples (the
    signature is given explicitly; the model's predict has no type hints on purpose)."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


def requirements() -> list[str]:
    """The exported model's pip requirements: cxrflow pinned (it decodes and scores), and the
    versions of what it loads with."""
    from importlib.metadata import PackageNotFoundError, version

    from cxrflow import __version__

    pins = [f"cxrflow=={__version__}"]
    for package in ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "pydicom"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # no local tag (+cu130): PyPI has none
        except PackageNotFoundError:
            if package == "mlflow":
                pins.append(f"mlflow-skinny=={version('mlflow-skinny')}")
    return pins


def _context(predictor: Any, run: str) -> tuple[str, dict, dict | None, dict | None]:
    """(checkpoint name, checkpoint config, store manifest or None, evaluation metrics or None)."""
    import torch

    from cxrflow.modelling.predictor import _evaluation_record

    ckpt = torch.load(predictor.checkpoint, map_location="cpu", weights_only=True)
    config = dict(ckpt.get("config") or {})
    config.setdefault("stage", ckpt.get("stage"))
    metrics = (
        _evaluation_record(Path(run), predictor.checkpoint.stem)[0]
        if predictor.calibrated or predictor.thresholds
        else None
    )
    return predictor.checkpoint.stem, ckpt, _manifest(config, predictor.checkpoint.parent), metrics


def _manifest(record: dict, run: Path | None = None) -> dict | None:
    """The manifest of the store a run (its ``config``) or an evaluation records, found where it moved
    (:func:`cxrflow.data.store.run_store`); None when there is none to read."""
    from cxrflow.data.store import read_manifest, run_store

    try:
        return read_manifest(run_store(record, run=run)) if record.get("store") else None
    except CxrflowError:
        return None


def _save(folder: Path, artifacts: dict[str, str], label_names: list[str], metadata: dict) -> None:
    import mlflow.pyfunc

    with quiet_mlflow():
        from cxrflow.results.pyfunc import CxrflowModel, signature

        mlflow.pyfunc.save_model(
            str(folder), python_model=CxrflowModel(), artifacts=artifacts, signature=signature(label_names),
            pip_requirements=requirements(), metadata=metadata,
        )  # fmt: skip


def build_model_folder(predictor: Any, run: str, folder: Path) -> dict:
    """Save the MLflow model into the empty ``folder`` (created); returns its scoring spec."""
    from cxrflow.atomic import write_json_atomic, write_text_atomic
    from cxrflow.results.ensembleexport import is_ensemble
    from cxrflow.results.modelcard import model_card
    from cxrflow.results.score import predictor_spec, save_slim_checkpoint

    with quiet_mlflow():  # the class definition itself warns about type hints
        from cxrflow.results.pyfunc import CHECKPOINT_ARTIFACT, SPEC_ARTIFACT

    if is_ensemble(predictor):
        return _build_ensemble_folder(predictor, run, folder)
    name, ckpt, manifest, metrics = _context(predictor, run)
    spec = predictor_spec(predictor)
    with tempfile.TemporaryDirectory(prefix="cxrflow-export-") as staging:
        checkpoint, spec_file = Path(staging) / "model.pt", Path(staging) / "scoring.json"
        save_slim_checkpoint(predictor, ckpt, checkpoint)
        write_json_atomic(spec_file, spec)
        metadata = {"cxrflow_run": str(run), "cxrflow_checkpoint": name, "calibrated": spec["calibrated"],
                    "probabilities": "calibrated" if spec["calibrated"] else "raw", "size": spec["size"],
                    "label_names": spec["label_names"], "evaluated": metrics is not None}  # fmt: skip
        _save(
            folder, {CHECKPOINT_ARTIFACT: str(checkpoint), SPEC_ARTIFACT: str(spec_file)}, spec["label_names"], metadata
        )
    config = dict(ckpt.get("config") or {}, stage=ckpt.get("stage"))
    card = model_card(run=str(run), checkpoint=name, config=config, manifest=manifest, metrics=metrics, spec=spec,
                      label_names=spec["label_names"], fmt="an MLflow pyfunc model")  # fmt: skip
    write_text_atomic(folder / CARD_NAME, card)
    return spec


def _build_ensemble_folder(predictor: Any, run: str, folder: Path) -> dict:
    """The MLflow model of an ensemble folder: every member's slim checkpoint, the ensemble's spec
    (:mod:`cxrflow.results.ensembleexport`) and a model card listing the members."""
    from cxrflow.atomic import read_json_object, write_json_atomic, write_text_atomic
    from cxrflow.results.ensembleexport import MEMBERS_DIR, ensemble_spec, save_members
    from cxrflow.results.modelcard import ensemble_model_card
    from cxrflow.runs import METRICS_NAME

    with quiet_mlflow():
        from cxrflow.results.pyfunc import MEMBERS_ARTIFACT, SPEC_ARTIFACT

    metrics = read_json_object(Path(run) / METRICS_NAME, "ensemble")
    spec = ensemble_spec(predictor, metrics.get("member_names"))
    with tempfile.TemporaryDirectory(prefix="cxrflow-export-") as staging:
        members, spec_file = Path(staging) / MEMBERS_DIR, Path(staging) / "scoring.json"
        save_members(predictor, spec, members)
        write_json_atomic(spec_file, spec)
        metadata = {"cxrflow_run": str(run), "kind": "ensemble", "method": spec["method"],
                    "members": [m["name"] for m in spec["members"]], "calibrated": spec["calibrated"],
                    "probabilities": "calibrated" if spec["calibrated"] else "raw", "size": spec["size"],
                    "label_names": spec["label_names"], "evaluated": True}  # fmt: skip
        _save(folder, {MEMBERS_ARTIFACT: str(members), SPEC_ARTIFACT: str(spec_file)}, spec["label_names"], metadata)
    card = ensemble_model_card(
        run=str(run), metrics=metrics, manifest=_manifest({"store": metrics.get("store")}), spec=spec
    )
    write_text_atomic(folder / CARD_NAME, card)
    return spec


def export_mlflow(predictor: Any, run: str, out: Path, *, overwrite: bool = False) -> Path:
    """Write the MLflow model folder of a run's predictor or an ensemble's at ``out`` (whole or not at all)."""
    from cxrflow.outputs import publishing

    with publishing(out, "export", overwrite=overwrite, inputs=[run]) as pub:
        staging = pub.tmp / "model"
        build_model_folder(predictor, run, staging)
        for entry in staging.iterdir():
            os.replace(entry, pub.tmp / entry.name)
        staging.rmdir()
        pub.commit(run=str(Path(run).absolute()), format="mlflow")
    return out


def log_mlflow(folder: Path, uri: str, register: str | None) -> str:
    """Log the exported folder's model to the tracking server at ``uri`` (and register it); returns its model URI."""
    import mlflow
    import mlflow.pyfunc

    from cxrflow.tracking import check_uri

    mlflow.set_tracking_uri(check_uri(uri))
    meta = json.loads(json.dumps(_mlmodel_metadata(folder)))
    loaded_spec = json.loads((folder / "artifacts" / "scoring.json").read_text())
    with quiet_mlflow():
        from cxrflow.results.pyfunc import CHECKPOINT_ARTIFACT, MEMBERS_ARTIFACT, SPEC_ARTIFACT, CxrflowModel, signature
    from cxrflow.results.ensembleexport import MEMBERS_DIR

    weights = (
        {MEMBERS_ARTIFACT: str(folder / "artifacts" / MEMBERS_DIR)}
        if loaded_spec.get("kind") == "ensemble"
        else {CHECKPOINT_ARTIFACT: str(folder / "artifacts" / "model.pt")}
    )

    with quiet_mlflow(), mlflow.start_run(run_name=f"export-{Path(meta.get('cxrflow_run', 'run')).name}"):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=CxrflowModel(),
            artifacts={**weights, SPEC_ARTIFACT: str(folder / "artifacts" / "scoring.json")},
            signature=signature(loaded_spec["label_names"]), pip_requirements=requirements(), metadata=meta,
            registered_model_name=register,
        )  # fmt: skip
        mlflow.log_artifact(str(folder / CARD_NAME), artifact_path="model_card")
    return info.model_uri


def _mlmodel_metadata(folder: Path) -> dict:
    from mlflow.models import Model

    return dict(Model.load(str(folder)).metadata or {})
