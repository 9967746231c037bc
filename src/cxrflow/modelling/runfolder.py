"""A training run's folder: its checkpoints (written atomically), metrics.jsonl, and the checks
before a run starts writing into it (:mod:`cxrflow.modelling.train` runs the run)."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import torch

from cxrflow import safeio
from cxrflow.atomic import atomic_path, write_text_atomic
from cxrflow.errors import CxrflowError
from cxrflow.modelling.distributed import Dist, barrier
from cxrflow.outputs import read_marker, write_marker

#: Files a run writes; ``--overwrite`` removes exactly these.
RUN_FILES = ("config.json", "metrics.jsonl", "best_kt.pt", "best_finetune.pt", "last.pt", "done.json", "mlflow.json")


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temporary file in the same folder, then rename into place.

    Serialized in memory first: torch.save writing to a full disk raises a RuntimeError that does
    not say why ("unexpected pos"), a plain write raises the OSError (no space left) it is."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getbuffer())


def load_checkpoint_file(path: Path) -> dict:
    """A run's checkpoint dict (weights_only); one line naming the file when it is damaged."""
    try:
        return torch.load(safeio.regular_file(path, "checkpoint"), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean a damaged file
        raise CxrflowError(f"cannot read checkpoint: {str(exc).splitlines()[0]}", path) from None


def plain(value: float) -> float | None:
    """A JSON- and weights_only-safe float: NaN/inf become None."""
    return float(value) if value is not None and math.isfinite(value) else None


def prepare_run_folder(out: Path, *, resume: bool, overwrite: bool, ctx: Dist) -> None:
    """Refuse to clobber an existing run; with --overwrite remove only the files a run writes."""
    existing = [p for p in out.iterdir()] if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise CxrflowError("the run folder path exists and is not a folder", out)
    if existing and not (resume or overwrite):
        raise CxrflowError("run folder already exists; pass --resume to continue it or --overwrite to start again", out)
    barrier(ctx)  # every rank has checked before rank 0 changes anything
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        if read_marker(out, "train") is None:
            write_marker(out, "train")
        for stale in out.glob(".*.tmp"):
            stale.unlink()
        if overwrite and not resume:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            # evaluations of the old checkpoints describe a model that no longer exists; only folders
            # 'cxrflow evaluate' wrote (its marker, not a link) go: any other eval-* is left alone
            for evaluation in out.glob("eval-*"):
                if (
                    evaluation.is_dir()
                    and not evaluation.is_symlink()
                    and read_marker(evaluation, "evaluate") is not None
                ):
                    shutil.rmtree(evaluation)
    barrier(ctx)


def write_metrics(out: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the history (atomic; the history lives in last.pt too)."""
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
