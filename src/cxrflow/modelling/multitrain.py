"""Training on several stores at once: the run's plan, its mixed train loader and its validation.

:mod:`cxrflow.modelling.train` runs a run on several stores with the same loop as on one; what
differs is here. The plan reads the stores (:mod:`cxrflow.data.storeset`): the model's findings are
the union of theirs, the loss weights are counted over the rows where each finding is known, the
pixel statistics are the stores' weighted by train rows, and the saved config records every store
(``stores``, ``store_identities``, ``store_alignment``). Each epoch's batches mix the stores
(:mod:`cxrflow.data.mixing`). Validation scores each store's val split on the findings it labels:
``val_auc_by_store`` holds each collection's AUCs, ``val_auc_mean`` (which picks the best epoch) is
the mean over every (collection, finding) pair with both classes, and ``val_auc`` per finding is the
mean over the collections where that finding has both classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cxrflow.data.loader import make_loader
from cxrflow.data.mixing import MixedLoader
from cxrflow.data.storeset import (
    StoreSet,
    check_policy_names,
    check_store_weights,
    combined_pixel_stats,
    combined_pos_weight,
    open_stores,
    store_policy,
)
from cxrflow.data.uncertain import masked_bce
from cxrflow.metrics import mean_auc, per_class_auc
from cxrflow.modelling.config import TrainConfig
from cxrflow.modelling.distributed import Dist
from cxrflow.modelling.inference import predict_split


def plan_stores(config: TrainConfig) -> dict[str, Any]:
    """What several stores decide about a run: ``stores`` (the :class:`StoreSet`), ``label_names``,
    ``mean``, ``std``, ``pos_weight`` (list), ``train_rows`` and the config keys the run saves."""
    stores = open_stores(config.all_stores(), config.size)
    check_policy_names(config.uncertain, stores.label_names)
    check_store_weights(config.store_weights, len(stores.stores))
    mean, std = combined_pixel_stats(stores)
    pos_weight = combined_pos_weight(stores, config.uncertain)
    saved = {
        "store": stores.paths[0],
        "stores": stores.paths,
        "store_names": [s.name for s in stores.stores],
        "store_identity": stores.stores[0].identity,
        "store_identities": [s.identity for s in stores.stores],
        "store_alignment": stores.alignment(),
        "store_train_rows": stores.train_rows(),
        "pos_weight": pos_weight,
    }
    return {
        "stores": stores,
        "label_names": list(stores.label_names),
        "mean": mean,
        "std": std,
        "pos_weight": pos_weight,
        "train_rows": sum(stores.train_rows()),
        "saved": saved,
    }


def mixed_loader(config: TrainConfig, stores: StoreSet, *, epoch: int, ctx: Dist, drop_last: bool) -> MixedLoader:
    """This rank's train batches of one epoch, mixing every store (each in its own shuffle)."""
    loaders = [
        make_loader(
            s.path,
            config.size,
            "train",
            batch_size=config.batch_size,
            shuffle=True,
            seed=config.seed,
            epoch=epoch,
            num_workers=config.num_workers,
            rank=ctx.rank,
            world_size=ctx.world_size,
            drop_last=False,
            uncertain=store_policy(config.uncertain, s.label_names),
        )
        for s in stores.stores
    ]
    return MixedLoader(
        loaders,
        [s.model_index for s in stores.stores],
        len(stores.label_names),
        weights=check_store_weights(config.store_weights, len(loaders)),
        batch_size=config.batch_size,
        drop_last=drop_last,
        seed=config.seed,
        epoch=epoch,
        rank=ctx.rank,
    )


def validate_stores(
    model: Any,
    stores: StoreSet,
    config: TrainConfig,
    ctx: Dist,
    *,
    mean: float,
    std: float,
    pos_weight: torch.Tensor,
    note: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score every store's val split on the findings it labels (see the module docstring); ``note``
    gets one line naming the (collection, finding) pairs without both classes."""
    names = list(stores.label_names)
    by_store: dict[str, dict[str, Any]] = {}
    pairs: list[float] = []
    per_finding: dict[str, list[float]] = {n: [] for n in names}
    loss_sum, known_sum, images, undefined = 0.0, 0.0, 0, []
    for s in stores.stores:
        val = predict_split(model, s.path, config.size, "val", batch_size=config.eval_batch_size, device=ctx.device,
                            num_workers=config.num_workers, rank=ctx.rank, world_size=ctx.world_size,
                            pixel_mean=mean, pixel_std=std, uncertain=store_policy(config.uncertain, s.label_names))  # fmt: skip
        index = list(s.model_index)
        aucs = per_class_auc(val["labels"], val["probs"][:, index], val["known"])
        own = {names[j]: _plain(a) for j, a in zip(index, aucs)}
        by_store[s.name] = {"mean": _plain(mean_auc(aucs)), "auc": own, "images": len(val["image_id"])}
        for j, a in zip(index, aucs):
            if math.isnan(a):
                undefined.append(f"{s.name}/{names[j]}")
            else:
                pairs.append(float(a))
                per_finding[names[j]].append(float(a))
        known = torch.from_numpy(val["known"]).double()
        loss = masked_bce(torch.from_numpy(val["logits"][:, index]).double(), torch.from_numpy(val["labels"]).double(),
                          known, pos_weight.detach().cpu().double()[index])  # fmt: skip
        loss_sum += float(loss) * float(known.sum())
        known_sum += float(known.sum())
        images += len(val["image_id"])
    if undefined and note is not None:
        note(f"val AUC undefined (one class only) for {', '.join(undefined)}; excluded from the mean")
    return {
        "val_loss": _plain(loss_sum / known_sum) if known_sum else None,
        "val_auc_mean": _plain(mean_auc(np.asarray(pairs))) if pairs else None,
        "val_auc": {n: _plain(float(np.mean(v))) if v else None for n, v in per_finding.items()},
        "val_auc_by_store": by_store,
        "val_images": images,
    }


def fit_fusion(model: Any, stores: StoreSet, config: TrainConfig, pos_weight: list[float]) -> str:
    """Fit a fused model's demographic term on every store's train rows, labels in the model's findings
    (an attribute a collection lacks is unknown for its rows)."""
    from cxrflow.modelling.fusion import init_from_rows, read_split_demographics

    k = len(stores.label_names)
    parts = []
    for s in stores.stores:
        rows = read_split_demographics(
            s.path, stores.size, "train", list(s.label_names), store_policy(config.uncertain, s.label_names)
        )
        n = len(rows["labels"])
        labels, known = np.zeros((n, k), np.uint8), np.zeros((n, k), np.uint8)
        labels[:, list(s.model_index)] = rows["labels"]
        known[:, list(s.model_index)] = rows["known"]
        parts.append({"demographics": rows["demographics"], "labels": labels, "known": known})
    together = {key: np.concatenate([p[key] for p in parts]) for key in ("demographics", "labels", "known")}
    return init_from_rows(model, together, pos_weight=pos_weight, seed=config.seed)


def _plain(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
