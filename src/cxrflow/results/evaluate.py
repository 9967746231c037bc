"""``cxrflow evaluate``: one checkpoint of a trained run scored on one split.

:func:`evaluate_run` runs a checkpoint over the validation and evaluated splits and writes, into one
folder (by default ``RUN/eval-<split>-<checkpoint>/``, e.g. ``RUN/eval-test-best_finetune/``):
``metrics.json``, ``predictions.parquet`` (``image_id``, ``patient_id``, ``prob_<finding>``,
``label_<finding>``, ``logit_<finding>``, ``calprob_<finding>``), ``val_predictions.parquet`` (the
same for the validation split), ``roc.png``, ``reliability.png`` and ``curves.png``. The numbers are
per-finding AUCs with patient-bootstrap intervals and validation-chosen operating points
(:mod:`cxrflow.metrics`); probabilities are also calibrated by per-finding temperature scaling fitted
on the validation logits (:mod:`cxrflow.modelling.scoring`; ``metrics.json["calibration"]``).
``cxrflow report`` reads those folders, ``cxrflow ensemble`` combines them.

An evaluation belongs to one checkpoint: ``metrics.json`` records its ``checkpoint_sha256`` (with
its stage and epoch, :class:`cxrflow.runs.Provenance`), and :func:`cxrflow.runs.evaluation_status` is
the one check every later consumer (report, predict's thresholds, ensembles, ...) makes before using
it. The model's inputs are normalised with the pixel statistics recorded in the checkpoint, and the
store's splits must be the ones the run was trained with
(:func:`cxrflow.modelling.inference.check_store_identity`).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrflow import __version__
from cxrflow.atomic import write_json_atomic
from cxrflow.errors import CxrflowError
from cxrflow.metrics import bootstrap_auc_ci
from cxrflow.modelling.scoring import score_with_calibration, write_prediction_files
from cxrflow.outputs import publishing
from cxrflow.results.demographics_baseline import demographics_only
from cxrflow.results.subgroups import attach_attributes, audit_evaluation
from cxrflow.runs import (
    METRICS_NAME,
    Provenance,
    default_eval_dir,
    read_epoch_records,
    resolve_checkpoint,
)


def evaluate_run(
    run: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    out: str | os.PathLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    store: str | os.PathLike | None = None,
    overwrite: bool = False,
    audit: bool = True,
    audit_fpr: float = 0.2,
) -> dict[str, Any]:
    """Evaluate one checkpoint of a run on ``split`` and write metrics, predictions and figures.

    Thresholds for sensitivity/specificity come from the validation split. With ``audit``, the
    subgroup audit (:mod:`cxrflow.results.subgroups`) writes ``subgroups.csv``; ``audit_fpr`` sets
    its global underdiagnosis threshold. Returns the metrics dict with ``out`` (the folder written) added.
    """
    from cxrflow.modelling.inference import resolve_device

    run = Path(run)
    if not run.is_dir():
        raise CxrflowError("no such run folder", run)
    name, ckpt_path = resolve_checkpoint(run, checkpoint)
    out = Path(out) if out is not None else default_eval_dir(run, split, name)
    device = resolve_device(device)
    inputs = [run, ckpt_path] + ([store] if store is not None else [])
    with publishing(out, "evaluate", overwrite=overwrite, inputs=inputs) as pub:
        return _evaluate_into(
            pub,
            run,
            name,
            ckpt_path,
            split=split,
            n_boot=n_boot,
            seed=seed,
            device=device,
            batch_size=batch_size,
            store=store,
            audit=(audit, audit_fpr),
        )


def _evaluate_into(
    pub, run: Path, name: str, ckpt_path: Path, *, split, n_boot, seed, device, batch_size, store, audit
) -> dict:
    """Score the checkpoint, write the evaluation into ``pub.tmp`` and publish it."""
    from cxrflow.data.store import read_manifest
    from cxrflow.modelling.inference import check_label_names, check_store_identity, predict_split, resolve_inference

    inference = resolve_inference(ckpt_path, store, device=device)
    manifest = read_manifest(inference.store)
    identity = check_store_identity(inference.config, inference.store, manifest, inference.size, (split, "val"))
    check_label_names(inference.label_names, manifest, ckpt_path)

    # validation is scored exactly as 'cxrflow predict' scores a file (same inference path and precision)
    def score(split_name: str) -> dict:
        return predict_split(
            inference.model, inference.store, inference.size, split_name, batch_size=batch_size,
            device=inference.device, pixel_mean=inference.pixel_mean, pixel_std=inference.pixel_std,
        )  # fmt: skip

    evaluated = score(split)
    validation = evaluated if split == "val" else score("val")
    has_states = "uncertain_policies" in manifest  # stores with label states report exclusions
    offsets = _logit_offsets(manifest, inference.config, len(inference.label_names))
    scored = score_with_calibration(
        evaluated, validation, inference.label_names, logit_offsets=offsets, n_boot=n_boot, seed=seed, known=has_states
    )
    scored["demographics_only"] = demographics_only(
        inference.store,
        inference.size,
        split,
        inference.label_names,
        evaluated,
        scored["auc"],
        interval=bootstrap_auc_ci,
        uncertain=str(inference.config.get("uncertain") or "ignore"),
        known=has_states,
        n_boot=n_boot,
        seed=seed,
    )
    loss = evaluated.get("loss")
    metrics = {
        **Provenance.of(run, name, ckpt_path, inference.checkpoint, inference.sha256).record(),
        "fusion": inference.config.get("fusion", "none"),
        "size": inference.size,
        "split": split,
        "store": str(inference.store),
        "store_identity": identity,
        "loss": None if loss is None else float(loss),
        # the normalisation the model was trained with, so that 'cxrflow predict' can work without the store
        "pixel_mean": inference.pixel_mean,
        "pixel_std": inference.pixel_std,
        **scored,
        "cxrflow_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    what = attach_attributes(
        inference.store,
        inference.size,
        split,
        evaluated,
        validation,
        metrics,
        manifest,
        f"{metrics.get('model')} {inference.size}px, {metrics['checkpoint']}",
    )
    _write_evaluation(pub, run, metrics, evaluated, validation, what=what, audit=audit)
    metrics["out"] = str(pub.out)
    return metrics


def _logit_offsets(manifest: dict, config: dict, k: int):
    """The ``log pos_weight`` shift of the training loss, per finding
    (:func:`cxrflow.modelling.calibration.pos_weight_offsets`)."""
    from cxrflow.modelling.calibration import pos_weight_offsets

    weights = manifest.get("pos_weight")
    # stores with label states: the loss's pos_weight was that of the run's --uncertain policy, not the
    # manifest's U-Ignore one
    if "uncertain_policies" in manifest:
        from cxrflow.data.uncertain import policy_pos_weight

        weights = policy_pos_weight(manifest, str(config.get("uncertain") or "ignore")).tolist()
    return pos_weight_offsets(weights, k)


def _write_evaluation(
    pub,
    run: Path,
    metrics: dict,
    evaluated: dict,
    validation: dict,
    *,
    what: str | None = None,
    audit: tuple[bool, float] = (False, 0.2),
) -> None:
    """Predictions, figures (training curves too, when the run has its epoch records), the subgroup
    audit when ``audit[0]`` (at global FPR ``audit[1]``) and ``metrics.json`` into ``pub.tmp``, then
    publish the folder."""
    from cxrflow.plots import plot_training_curves

    tmp = pub.tmp
    model, size = metrics.get("model"), metrics["size"]
    names = metrics["label_names"]
    what = what or f"{model} {size}px, {metrics['checkpoint']}"
    figures = write_prediction_files(tmp, evaluated, validation, names, metrics, what)
    metrics["audit"] = audit_evaluation(tmp, evaluated, names, metrics, fpr=audit[1], what=what) if audit[0] else None
    records = read_epoch_records(run)
    if records:
        plot_training_curves(records, title=f"Training curves, {run.name} ({model} {size}px)").savefig(
            tmp / "curves.png", dpi=110
        )
        figures.append("curves.png")
    else:
        metrics["figures_note"] = "no metrics.jsonl in the run folder: curves.png not drawn"
    metrics["figures"] = figures
    write_json_atomic(tmp / METRICS_NAME, metrics)
    pub.commit()
