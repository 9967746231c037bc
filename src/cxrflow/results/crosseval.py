"""``cxrflow evaluate --store OTHER``: one checkpoint scored on another collection's store.

The findings the model and the store both label are matched by name (:mod:`cxrflow.data.alignment`)
and scored; the model's other findings are listed as ``not_labelled``. The model's inputs are
normalised with the checkpoint's pixel statistics, never the other store's. Thresholds and
temperatures come from the run's own evaluation of the same checkpoint when there is one (they were
chosen on the run's validation split), else they are fitted on the other store's ``val`` split;
``metrics.json["threshold_source"]`` says which. The folder is ``RUN/eval-<store>-<split>-<checkpoint>``
so evaluations on several stores sit side by side; ``split="all"`` scores every split of the store as
one set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxrflow import __version__
from cxrflow.errors import CxrflowError
from cxrflow.names import printable
from cxrflow.runs import METRICS_NAME, Provenance, default_eval_dir, evaluation_status

ALL = "all"


def collection_name(manifest: dict, store: Path) -> str:
    """The collection a store was built from: its recorded format, else the store folder's name."""
    return str(manifest.get("format") or Path(store).resolve().name)


def store_sizes_check(manifest: dict, store: Path, size: int) -> None:
    """A store without the model's size is refused, naming the sizes that would work."""
    sizes = [int(s) for s in manifest.get("sizes", [])]
    if int(size) not in sizes:
        have = ", ".join(map(str, sizes)) or "none"
        raise CxrflowError(
            f"the store has no {size} px images, the size this model takes (it has: {have}); rebuild it with "
            f"'cxrflow etl ... --sizes {size}', or evaluate a run trained at {' or '.join(map(str, sizes)) or 'its sizes'} px",
            store,
        )


def _splits(manifest: dict, size: int, split: str, store: Path) -> list[str]:
    rows = manifest.get("rows", {}).get(str(int(size)), {})
    wanted = [s for s in rows if int(rows[s]) > 0] if split == ALL else [split]
    for s in wanted:
        if s not in rows or int(rows[s]) == 0:
            raise CxrflowError(f"the store has no {s!r} images at {size} px (it has: {', '.join(sorted(rows))})", store)
    return wanted


def own_evaluation(run: Path, name: str) -> tuple[dict, Path] | None:
    """The run's own evaluation of checkpoint ``name`` that is still about it (test first, then val)."""
    for split in ("test", "val"):
        path = default_eval_dir(run, split, name) / METRICS_NAME
        if path.is_file():
            metrics = json.loads(path.read_text())
            if evaluation_status(path, metrics) is None and "calibration" in metrics:
                return metrics, path
    return None


def _subset(pred: dict, model_idx: list[int], store_idx: list[int]) -> dict:
    """A scored split with the model's outputs and the store's labels of the aligned findings only."""
    return {
        "image_id": list(pred["image_id"]), "patient_id": pred["patient_id"],
        "labels": pred["labels"][:, store_idx], "known": pred["known"][:, store_idx],
        "logits": pred["logits"][:, model_idx], "probs": pred["probs"][:, model_idx], "loss": None,
    }  # fmt: skip


def _concat(parts: Sequence[dict]) -> dict:
    out = {"image_id": [i for p in parts for i in p["image_id"]], "loss": None}
    for key in ("patient_id", "labels", "known", "logits", "probs"):
        out[key] = np.concatenate([p[key] for p in parts])
    return out


def _number(x: Any) -> float:
    return float("nan") if x is None else float(x)


def score_with_run_calibration(evaluated: dict, validation: dict, names: Sequence[str], own: dict, *,
                               n_boot: int, seed: int, known: bool) -> dict:  # fmt: skip
    """The metrics of ``evaluated`` at the run's own thresholds and temperatures (``own``: its
    evaluation's ``metrics.json``), keyed by the model's finding names."""
    from cxrflow.metrics import summarize
    from cxrflow.modelling.calibration import apply_temperatures, calibration_report
    from cxrflow.operating import operating_report

    cal = own["calibration"]
    temps = np.array([_number(cal["temperature"].get(n)) for n in names])
    offsets = np.array([_number(cal.get("logit_offset", {}).get(n, 0.0)) for n in names])
    for pred in (validation, evaluated):
        pred["calprobs"] = apply_temperatures(pred["logits"], temps, offsets).astype(np.float32)
    labels, probs = np.asarray(evaluated["labels"]), np.asarray(evaluated["probs"], dtype=np.float64)
    mask = np.asarray(evaluated["known"]).astype(bool) if known else None
    thresholds = [_number(own.get("threshold", {}).get(n)) for n in names]
    metrics = summarize(labels, probs, evaluated["patient_id"], names, thresholds, n_boot=n_boot, seed=seed, known=mask)
    metrics.update(operating_report(labels, probs, evaluated["patient_id"], names, thresholds, known=mask,
                                    n_boot=n_boot, seed=seed))  # fmt: skip
    metrics["threshold_split"] = own.get("threshold_split", "val")
    metrics["threshold_calibrated"] = {n: own.get("threshold_calibrated", {}).get(n) for n in names}
    metrics["calibration"] = calibration_report(temps, labels, probs, evaluated["calprobs"], names, offsets=offsets,
                                                fitted_on="val split of the run's own store", known=mask)  # fmt: skip
    return metrics


def _run_offsets(inference, k_idx: list[int]) -> np.ndarray | None:
    """The training loss's logit offsets from the run's own store, when it is readable."""
    from cxrflow.data.store import read_manifest
    from cxrflow.modelling.calibration import pos_weight_offsets
    from cxrflow.results.evaluate import _logit_offsets

    recorded = inference.config.get("pos_weight")  # a run on several stores records its loss's weights
    if recorded is not None and len(recorded) == len(inference.label_names):
        return pos_weight_offsets(recorded, len(recorded))[k_idx]
    try:
        manifest = read_manifest(inference.store)
    except CxrflowError:
        return None
    return np.asarray(_logit_offsets(manifest, inference.config, len(inference.label_names)))[k_idx]


def evaluate_on_store(
    run: str | os.PathLike,
    store: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    out: str | os.PathLike | None = None,
    maps: Sequence[str] = (),
    uncertain: str = "ignore",
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    overwrite: bool = False,
    audit: bool = True,
    audit_fpr: float = 0.2,
) -> dict[str, Any]:
    """Score a checkpoint of ``run`` on another collection's ``store`` (see the module's docstring);
    returns the metrics dict with ``out`` added. Every user mistake is found before any scoring.
    ``audit``/``audit_fpr``: the subgroup audit, as for the run's own evaluation."""
    from cxrflow.data.alignment import align, parse_map
    from cxrflow.data.store import read_manifest
    from cxrflow.data.uncertain import check_policy
    from cxrflow.modelling.inference import resolve_device
    from cxrflow.outputs import publishing
    from cxrflow.runs import resolve_checkpoint

    run, store = Path(run), Path(store)
    if not run.is_dir():
        raise CxrflowError("no such run folder", run)
    name, ckpt_path = resolve_checkpoint(run, checkpoint)
    user_map = parse_map(maps)
    check_policy(uncertain)
    manifest = read_manifest(store)
    label_names = _checkpoint_label_names(ckpt_path)
    alignment = align(label_names, manifest.get("label_names") or [], user_map, store_label=f"the store {store.name}")
    out = Path(out) if out is not None else default_eval_dir(run, split, name, store.resolve().name)
    device = resolve_device(device)
    with publishing(out, "evaluate", overwrite=overwrite, inputs=[run, ckpt_path, store]) as pub:
        return _evaluate_into(pub, run, name, ckpt_path, store, manifest, alignment, split=split, uncertain=uncertain, maps=maps,
                              n_boot=n_boot, seed=seed, device=device, batch_size=batch_size,
                              audit=(audit, audit_fpr))  # fmt: skip


def is_other_collection(checkpoint: str | os.PathLike, store: str | os.PathLike) -> bool:
    """Whether ``store`` is another collection's store for this checkpoint: it labels other findings
    (or the same in another order) than the checkpoint predicts, or it labels the same findings but
    none of its splits is one the run was trained with (its recorded store identities) and it was not
    built from the run's own source data. The run's store moved, or a copy of it, holds the run's
    splits: it is the run's own (and a store rebuilt from the run's source data with other splits is
    refused by the run's own evaluation, as training images could be in its test split)."""
    from cxrflow.data.store import read_manifest

    manifest = read_manifest(store)
    try:
        names, config = _checkpoint_record(Path(checkpoint))
    except CxrflowError:
        return False  # the run's own evaluation reports an unreadable checkpoint
    if [str(n) for n in manifest.get("label_names") or []] != names:
        return True
    return _other_images(config, Path(store), manifest)


def _other_images(config: dict, store: Path, manifest: dict) -> bool:
    """A store of the run's findings holds another collection's images: no split identity in common
    with any store the run was trained on, and not the run's own source data rebuilt."""
    from cxrflow.data.store import read_manifest, store_identity

    recorded = [config.get("store_identity") or {}, *(config.get("store_identities") or [])]
    trained = {h for identity in recorded if isinstance(identity, dict) for h in identity.values() if h}
    if not trained or "size" not in config:
        return False  # a run without recorded identities: scored as its own store, as before
    if str(int(config["size"])) not in (manifest.get("rows") or {}):
        return False  # the run's own evaluation names the sizes the store has
    if trained & set(store_identity(store, manifest, int(config["size"])).values()):
        return False
    source = (manifest.get("source") or {}).get("data_dir")
    for path in [config.get("store"), *(config.get("stores") or [])]:
        try:
            theirs = (read_manifest(path).get("source") or {}).get("data_dir") if path else None
        except CxrflowError:
            continue
        if source and theirs and Path(str(source)).resolve() == Path(str(theirs)).resolve():
            return False
    return True


def _checkpoint_label_names(path: Path) -> list[str]:
    """The findings a checkpoint predicts, read without building its model."""
    return _checkpoint_record(path)[0]


def _checkpoint_record(path: Path) -> tuple[list[str], dict]:
    """The findings a checkpoint predicts and its config, read without building its model."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return [str(n) for n in ckpt.get("label_names") or []], dict(ckpt.get("config") or {})
    except (OSError, RuntimeError, ValueError, AttributeError, TypeError) as e:
        raise CxrflowError(f"unreadable checkpoint ({type(e).__name__})", path) from e


def _evaluate_into(pub, run: Path, name: str, ckpt_path: Path, store: Path, manifest: dict, alignment, *, split: str,
                   uncertain: str, maps: Sequence[str], n_boot: int, seed: int, device, batch_size: int,
                   audit: tuple[bool, float] = (True, 0.2)) -> dict:  # fmt: skip
    """Score the aligned findings, write the evaluation into ``pub.tmp`` and publish it."""
    from cxrflow.data.store import store_identity
    from cxrflow.modelling.inference import predict_split, resolve_inference
    from cxrflow.modelling.scoring import score_with_calibration
    from cxrflow.results.evaluate import _write_evaluation

    inference = resolve_inference(ckpt_path, None, device=device)
    store_sizes_check(manifest, store, inference.size)
    splits = _splits(manifest, inference.size, split, store)
    model_idx, store_idx = alignment.indices(inference.label_names, manifest["label_names"])
    names = list(alignment.pairs)

    def score(s: str) -> dict:
        pred = predict_split(inference.model, store, inference.size, s, batch_size=batch_size, device=inference.device,
                             pixel_mean=inference.pixel_mean, pixel_std=inference.pixel_std, uncertain=uncertain)  # fmt: skip
        return _subset(pred, model_idx, store_idx)

    scored_splits = {s: score(s) for s in splits}
    evaluated = scored_splits[splits[0]] if len(splits) == 1 else _concat([scored_splits[s] for s in splits])
    validation = scored_splits.get("val") or (score("val") if _has(manifest, inference.size, "val") else evaluated)
    has_states = "uncertain_policies" in manifest
    identity = store_identity(store, manifest, inference.size)
    trained = identity in (inference.config.get("store_identities") or [])  # one of a multi-store run's own
    own = None if trained else own_evaluation(run, name)
    if own is not None:
        scored = score_with_run_calibration(
            evaluated, validation, names, own[0], n_boot=n_boot, seed=seed, known=has_states
        )
        source = f"the run's own evaluation {own[1].parent}"
    else:
        scored = score_with_calibration(evaluated, validation, names, logit_offsets=_run_offsets(inference, model_idx),
                                        n_boot=n_boot, seed=seed, known=has_states)  # fmt: skip
        why = "a store the run trained on" if trained else f"the run has no current evaluation of {name}"
        source = f"fitted on the val split of {store.name} ({why})"
    metrics = {
        **Provenance.of(run, name, ckpt_path, inference.checkpoint, inference.sha256).record(),
        "fusion": inference.config.get("fusion", "none"), "size": inference.size, "split": split,
        "store": str(store.resolve()), "store_identity": identity, "trained_on_store": trained,
        "collections": {"model": _run_collection(inference), "store": collection_name(manifest, store)},
        **alignment.record(), "map": list(maps), "uncertain": uncertain if has_states else None,
        "model_label_names": list(inference.label_names), "threshold_source": source,
        "loss": None, "pixel_mean": inference.pixel_mean, "pixel_std": inference.pixel_std, **scored,
        "cxrflow_version": __version__, "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    what = _attach_store_attributes(store, manifest, inference.size, scored_splits, evaluated, validation, metrics)
    _write_evaluation(pub, run, metrics, evaluated, validation, what=what, audit=audit)
    metrics["out"] = str(pub.out)
    return metrics


def _attach_store_attributes(store: Path, manifest: dict, size: int, scored_splits: dict, evaluated: dict,
                             validation: dict, metrics: dict) -> str:  # fmt: skip
    """The store's ``age``, ``sex`` and ``view`` added to the scored images (for the subgroup audit and the
    predictions files), whether the store is synthetic recorded in ``metrics``, and the model's name in
    figure titles, which names the store scored ("..., on chexpert", plus " (synthetic data)")."""
    from cxrflow.results.subgroups import data_words, store_attributes

    for s, pred in scored_splits.items():
        pred.update(store_attributes(store, size, s, pred["image_id"]))
    keys = ("age", "sex", "view")
    if "age" not in evaluated:  # split "all": the splits concatenated in the order they were scored
        evaluated.update({k: np.concatenate([p[k] for p in scored_splits.values()]) for k in keys})
    if "age" not in validation:
        validation.update(store_attributes(store, size, "val", validation["image_id"]))
    metrics["synthetic"] = bool(data_words(manifest))
    return f"{metrics.get('model')} {size}px, {metrics['checkpoint']}, on {store.resolve().name}" + data_words(manifest)


def _has(manifest: dict, size: int, split: str) -> bool:
    return int(manifest.get("rows", {}).get(str(int(size)), {}).get(split, 0) or 0) > 0


def _run_collection(inference) -> str:
    from cxrflow.data.store import read_manifest

    try:
        return collection_name(read_manifest(inference.store), inference.store)
    except CxrflowError:
        return Path(inference.store).name or "unknown"


def format_cross_lines(metrics: dict) -> list[str]:
    """Terminal lines of an evaluation on another collection's store: what was scored against what,
    where the thresholds came from, and the model's findings the store does not label (none for the
    run's own evaluations)."""
    if metrics.get("alignment") is None:
        return []
    where = Path(str(metrics.get("store", "the store"))).name
    pairs = metrics["alignment"]
    renamed = [f"{m} -> {s}" for m, s in pairs.items() if m != s]
    n_model = len(metrics.get("model_label_names") or pairs)
    lines = [f"scored on {where}: {len(pairs)} of the model's {n_model} findings"
             + (f" (as {', '.join(renamed)})" if renamed else ""), f"thresholds and temperatures: {metrics.get('threshold_source')}"]  # fmt: skip
    missing = metrics.get("not_labelled") or []
    lines += [f"not labelled in {where}: {', '.join(missing)}"] if missing else []
    return [printable(line) for line in lines]  # names and folders are data: never terminal controls


def trained_stores(metrics: dict, run: Path | None = None) -> tuple[list[str], list[dict]]:
    """The stores an evaluated run was trained on (its ``config.json``: ``stores``, else ``[store]``), as
    absolute paths, and their recorded split identities; empty when the run's config cannot be read.
    ``run``: the run folder, when it is not (or no longer) the one the evaluation records."""
    from cxrflow import safeio

    try:
        config = safeio.read_json(Path(run or str(metrics.get("run") or "")) / "config.json", "run config")
    except (OSError, ValueError, RecursionError):
        return [], []
    if not isinstance(config, dict):
        return [], []
    stores = config.get("stores") or ([config["store"]] if config.get("store") else [])
    identities = config.get("store_identities") or [config.get("store_identity") or {}]
    return [str(Path(str(s)).resolve()) for s in stores], [i for i in identities if isinstance(i, dict)]


def on_other_collection(metrics: dict, run: Path | None = None) -> bool:
    """Whether an evaluation scored its run on a store the run was not trained on: written by
    ``evaluate --store OTHER`` (it records an ``alignment``) on a store that is neither one of the
    run's stores (by path) nor holds one of their splits (by identity). Ensembles are not. ``run``:
    the run folder holding the evaluation, when known (see :func:`trained_stores`)."""
    if metrics.get("kind") == "ensemble" or metrics.get("alignment") is None:
        return False
    paths, identities = trained_stores(metrics, run)
    if metrics.get("store") and str(Path(str(metrics["store"])).resolve()) in paths:
        return False
    scored = {h for h in (metrics.get("store_identity") or {}).values() if h}
    return not any(scored & {h for h in identity.values() if h} for identity in identities)
