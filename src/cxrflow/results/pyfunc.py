"""The exported MLflow model: a small ``pyfunc`` class that scores a frame of base64 images.

:class:`CxrflowModel` is saved by reference (cloudpickle keeps a class of an installed package as
its import path), so the exported folder loads with :func:`mlflow.pyfunc.load_model` wherever the
pinned ``cxrflow`` is installed; its artifacts are a slim checkpoint and ``scoring.json``
(:func:`cxrflow.results.score.predictor_spec`): size, pixel statistics, findings, temperatures and
thresholds. An ensemble's model holds a folder of member checkpoints instead and a spec that adds
its members and combination rule (:mod:`cxrflow.results.ensembleexport`). The scoring itself is
:func:`cxrflow.results.score.score_frame`.

Served by ``mlflow models serve``, a request whose rows all fail (not an image, a truncated file, a
DICOM without pixels, an image over the size limit, no ``image`` column) is answered with HTTP 400
and a JSON ``message`` naming the problem, because such a request holds nothing to score; in a
batch with at least one good image, the bad rows get nulls and their ``error`` instead.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from cxrflow.errors import CxrflowError

#: Names of the model's artifacts.
CHECKPOINT_ARTIFACT = "checkpoint"
SPEC_ARTIFACT = "scoring"
#: An ensemble's member checkpoints (a folder) in place of the one checkpoint.
MEMBERS_ARTIFACT = "members"


class CxrflowModel(mlflow.pyfunc.PythonModel):
    """Base64 images in, calibrated probabilities and operating-point flags out (one row each)."""

    def load_context(self, context) -> None:
        from cxrflow.results.ensembleexport import ensemble_from_spec
        from cxrflow.results.score import predictor_from_spec

        with open(context.artifacts[SPEC_ARTIFACT], encoding="utf-8") as f:
            self.spec = json.load(f)
        if self.spec.get("kind") == "ensemble":  # every member, each with its own preprocessing
            self.predictor = ensemble_from_spec(context.artifacts[MEMBERS_ARTIFACT], self.spec)
        else:
            self.predictor = predictor_from_spec(context.artifacts[CHECKPOINT_ARTIFACT], self.spec)

    # pd.DataFrame is a hint MLflow infers no second signature from (the model's signature is explicit)
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from cxrflow.results.score import ERROR_COLUMN, MAX_IMAGE_BYTES, score_frame

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        try:
            out = score_frame(self.predictor, model_input, int(self.spec.get("max_image_bytes") or MAX_IMAGE_BYTES))
        except CxrflowError as exc:
            raise MlflowException(exc.message, error_code=INVALID_PARAMETER_VALUE) from None
        errors = out[ERROR_COLUMN]
        if len(out) and errors.notna().all():
            reasons = sorted(set(errors.astype(str)))
            raise MlflowException(
                f"no image in the request could be scored: {'; '.join(reasons)[:1000]}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        return out


def signature(label_names: list[str]) -> Any:
    """Inputs: ``image`` (required) and the optional demographics; outputs: the scored columns."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "image"),
        ColSpec("double", "age", required=False),
        ColSpec("string", "sex", required=False),
        ColSpec("string", "view", required=False),
    ])  # fmt: skip
    outputs = Schema(
        [ColSpec("double", f"prob_{n}", required=False) for n in label_names]
        + [ColSpec("boolean", f"positive_{n}", required=False) for n in label_names]
        + [ColSpec("string", "error", required=False)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)
