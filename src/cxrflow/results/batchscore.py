"""Batch scoring on Spark: ``cxrflow predict --run RUN --store STORE --out PRED``.

Every row of a store's splits (or, with ``--data DIR``, every image of a collection) is scored as a
Spark job, one task per unit of work: one store Parquet file, or one chunk of
:data:`FILES_PER_UNIT` image files. A task loads the model once per Python worker, scores its unit
with the same predictor as ``cxrflow predict`` and the exported MLflow model
(:mod:`cxrflow.results.score`: calibrated probabilities, flags at the evaluation's thresholds, an
``error`` per unreadable image) and writes one Parquet part, ``PRED/split=<split>/<unit>.parquet``
(``image_id`` then the scored columns), under a temporary name renamed when complete. A killed job
leaves whole parts only (hidden temporary files are removed by the next run); ``--resume`` scores
the units that have no part yet. Store rows are the ETL's pixels as stored, so the probabilities
equal ``cxrflow evaluate``'s for the same rows.

The model travels to the executors as ``PRED/_model/`` (a slim checkpoint and its scoring spec,
:func:`cxrflow.results.score.predictor_spec`), so on a cluster ``PRED`` and the store must be on a
file system every executor sees; ``PRED/_scoring.json`` records what scored it, and a resumed job
must use the same checkpoint, calibration and inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cxrflow.errors import CxrflowError

#: Image files per task with ``--data``.
FILES_PER_UNIT = 256
#: Images per forward pass in a task (``cxrflow predict``'s default batch): a small batch keeps one
#: thread's working set in cache while another task runs on the next core.
TASK_BATCH = 32
#: Largest change of a probability that storing the weights channels-last may make (see
#: :func:`use_channels_last`): a tenth of the 1e-5 by which batch scoring may differ from evaluate.
CHANNELS_LAST_TOLERANCE = 1e-6
MODEL_DIR = "_model"
RECORD_NAME = "_scoring.json"
DONE_NAME = "_done.json"


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch options of ``cxrflow predict`` (``--out`` selects batch scoring)."""
    group = parser.add_argument_group("batch scoring on Spark (with --out)")
    group.add_argument("--out", default=None, metavar="PRED",
                       help="score every row of --store (or the images of --data) as a Spark job into Parquet under PRED")  # fmt: skip
    group.add_argument("--split", default="all", help="with --store: a split (train, val, test) or all (default)")
    group.add_argument(
        "--data", default=None, metavar="DIR", help="score a collection's image files instead of a store"
    )
    group.add_argument("--format", default="auto", help="with --data: the collection's format (default: detected)")
    group.add_argument("--spark-master", default="local[*]", help="Spark master URL (default: local[*])")
    group.add_argument("--resume", action="store_true", help="continue a killed job: score only the parts PRED lacks")


def _units_of_store(store: str, size: int, splits: list[str]) -> list[dict[str, Any]]:
    from cxrflow.data.store import check_partition, read_manifest, split_dir

    manifest = read_manifest(store)
    units = []
    for split in splits:
        check_partition(manifest, store, size, split)
        for file in sorted(split_dir(store, size, split).glob("*.parquet")):
            units.append({"part": f"split={split}/{file.stem}.parquet", "parquet": str(file.absolute())})
    return units


def _units_of_collection(data: str, fmt: str) -> list[dict[str, Any]]:
    from cxrflow.data.formats import load_collection

    collection = load_collection(data, fmt, views="all")
    entries = collection.entries
    rows = []
    for image_id, age, sex, view in zip(entries["image_id"], entries["age"], entries["sex"], entries["view"]):
        file = collection.images.get(image_id)
        rows.append([str(image_id), None if file is None else str(Path(file).absolute()),
                     None if age is None or int(age) < 0 else float(age), str(sex), str(view)])  # fmt: skip
    return [{"part": f"split=data/part-{i // FILES_PER_UNIT:05d}.parquet", "files": rows[i : i + FILES_PER_UNIT]}
            for i in range(0, len(rows), FILES_PER_UNIT)]  # fmt: skip


@functools.lru_cache(maxsize=2)
def _worker_predictor(model_dir: str, stamp: str) -> Any:
    """The predictor of ``model_dir``, loaded once per Python worker (Spark reuses its workers);
    ``stamp`` (the checkpoint's hash) tells a model written later into the same folder from this one."""
    from cxrflow.results.score import predictor_from_spec

    spec = json.loads((Path(model_dir) / "scoring.json").read_text())
    predictor = predictor_from_spec(Path(model_dir) / "model.pt", spec)
    use_channels_last(predictor)
    return predictor


def use_channels_last(predictor: Any, seed: int = 0) -> bool:
    """Store the model's convolution weights channels-last when that gives the same probabilities.

    On one CPU thread channels-last costs 20-25% less CPU per image for convolutional networks
    (resnet50 and densenet121 at 64 px), but its kernels add up in another order: the probabilities
    move by float32 rounding, which grows with the size of the network's activations. A probe
    batch of random images is scored both ways and channels-last kept only where they agree within
    :data:`CHANNELS_LAST_TOLERANCE`, a tenth of what batch scoring may differ from the evaluation.
    Returns whether it was kept.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    s, n = predictor.size, 8
    images = {s: torch.from_numpy(rng.integers(0, 256, (n, 1, s, s), dtype=np.uint8))}
    demo = torch.full((n, 3), float("nan")) if predictor.uses_demographics else None
    want = predictor.probabilities(images, demo)
    predictor.model.to(memory_format=torch.channels_last)
    if float(np.max(np.abs(predictor.probabilities(images, demo) - want))) <= CHANNELS_LAST_TOLERANCE:
        return True
    predictor.model.to(memory_format=torch.contiguous_format)
    return False


def _unit_inputs(predictor: Any, unit: dict[str, Any]) -> tuple[list[str], Any, Any, list[str | None]]:
    """(image ids, uint8 pixels of the readable rows, their demographics or None, error per row)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrflow.data.demographics import encode_arrow
    from cxrflow.data.imaging import preprocess

    s = predictor.size
    if "parquet" in unit:
        table = pq.read_table(unit["parquet"], columns=["image_id", "pixels", "age", "sex", "view"])
        ids = [str(i) for i in table.column("image_id").to_pylist()]
        pixels = np.stack([np.frombuffer(v, np.uint8) for v in table.column("pixels").to_pylist()]).reshape(-1, s, s)
        demo = encode_arrow(table.column("age"), table.column("sex"), table.column("view"))
        return ids, pixels, demo, [None] * len(ids)
    ids, good, errors, kept = [], [], [], []
    for image_id, file, age, sex, view in unit["files"]:
        ids.append(image_id)
        try:
            if file is None:
                raise CxrflowError("no image file for it in the collection")
            good.append(preprocess(file, [s])[s])
            errors.append(None)
            kept.append((age, sex, view))
        except (CxrflowError, OSError) as exc:
            errors.append(getattr(exc, "message", None) or str(exc))
    pixels = np.stack(good) if good else np.zeros((0, s, s), np.uint8)
    age, sex, view = (list(c) for c in zip(*kept)) if kept else ([], [], [])
    demo = encode_arrow(pa.array(age, pa.float64()), pa.array(sex, pa.string()), pa.array(view, pa.string()))
    return ids, pixels, demo, errors


def score_unit(model_dir: str, stamp: str, out: str, unit: dict[str, Any], threads: int = 1) -> tuple[str, int, int]:
    """Score one unit into its Parquet part (written atomically); returns (part, rows, errors)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cxrflow.atomic import atomic_path
    from cxrflow.results.score import result_columns, score_pixels

    torch.set_num_threads(threads)
    predictor = _worker_predictor(model_dir, stamp)
    ids, pixels, demo, errors = _unit_inputs(predictor, unit)
    ok = np.array([e is None for e in errors], dtype=bool)
    probs = score_pixels(predictor, pixels, demo if predictor.uses_demographics else None, batch_size=TASK_BATCH)
    cols = result_columns(predictor.label_names, predictor.thresholds, probs, ok, errors)
    arrays = {"image_id": pa.array(ids, pa.string())}
    for name, values in cols.items():
        if name.startswith("prob_"):
            arrays[name] = pa.array(values, pa.float64(), mask=~ok)
        else:
            arrays[name] = pa.array(values, pa.bool_() if name.startswith("positive_") else pa.string())
    target = Path(out) / unit["part"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        pq.write_table(pa.table(arrays), tmp)
    return unit["part"], len(ids), int((~ok).sum())


def _record(args: argparse.Namespace, predictor: Any, spec: dict, units: list[dict]) -> dict[str, Any]:
    from cxrflow.identity import file_sha256

    return {
        "run": str(Path(args.run).absolute()) if args.run else None,
        "checkpoint_sha256": file_sha256(predictor.checkpoint),
        "spec": spec,
        "input": {"store": str(Path(args.store).absolute()), "split": args.split} if args.data is None
        else {"data": str(Path(args.data).absolute()), "format": args.format},
        "parts": sorted(u["part"] for u in units),
    }  # fmt: skip


def _prepare(out: Path, record: dict, predictor: Any, resume: bool) -> None:
    """Write the model and the record into ``out``, or check a resumed job's record is the same."""
    from cxrflow.atomic import write_json_atomic
    from cxrflow.results.score import save_slim_checkpoint

    existing = out / RECORD_NAME
    if existing.is_file():
        before = json.loads(existing.read_text())
        if not resume:
            raise CxrflowError(
                "holds an earlier batch scoring; pass --resume to continue it, or give another --out", out
            )
        changed = [
            k for k in ("checkpoint_sha256", "spec", "input") if before.get(k) != json.loads(json.dumps(record[k]))
        ]
        if changed:
            raise CxrflowError(
                f"was scored with another {' and '.join(changed)}; give another --out to score afresh", out
            )
        for leftover in out.rglob(".*.tmp"):  # parts a killed job was writing
            leftover.unlink(missing_ok=True)
        return
    import torch

    (out / MODEL_DIR).mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(predictor.checkpoint, map_location="cpu", weights_only=True)
    save_slim_checkpoint(predictor, ckpt, out / MODEL_DIR / "model.pt")
    write_json_atomic(out / MODEL_DIR / "scoring.json", record["spec"])
    write_json_atomic(existing, record)


@contextlib.contextmanager
def _session(master: str) -> Iterator[Any]:
    """This process's running Spark session (a notebook's, a test's), else a new one on ``master``
    that is stopped at the end."""
    from pyspark.sql import SparkSession

    from cxrflow.data.spark import spark_session

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    with spark_session(master, "cxrflow-predict") as spark:
        yield spark


def run_batch(args: argparse.Namespace, predictor: Any) -> int:
    """Score a store's splits (or a collection's images) on Spark into ``args.out``."""
    from cxrflow.outputs import claiming
    from cxrflow.results.score import predictor_spec

    if args.images:
        raise CxrflowError("--out scores a whole --store or --data; give no IMAGE files with it")
    if not hasattr(predictor, "model"):
        raise CxrflowError("batch scoring takes one run, not an ensemble folder", args.run)
    if args.data is None:
        if args.store is None:
            raise CxrflowError("--out needs --store STORE (the store to score) or --data DIR")
        from cxrflow.data.store import read_manifest
        from cxrflow.modelling.inference import check_label_names

        check_label_names(predictor.label_names, read_manifest(args.store), predictor.checkpoint)
        splits = ["train", "val", "test"] if args.split == "all" else [args.split]
        units = _units_of_store(args.store, predictor.size, splits)
    else:
        units = _units_of_collection(args.data, args.format)
    spec = predictor_spec(predictor)
    out = Path(args.out)
    inputs = [p for p in (args.run, args.store, args.data) if p]
    with claiming(out, "predict", resume=args.resume, inputs=inputs, how="pass --resume to continue it"):
        record = _record(args, predictor, spec, units)
        _prepare(out, record, predictor, args.resume)
        todo = [u for u in units if not (out / u["part"]).is_file()]
        done = []
        if todo:
            with _session(args.spark_master) as spark:
                stamp = f"{record['checkpoint_sha256']}:{json.dumps(spec, sort_keys=True)}"
                task = functools.partial(score_unit, str((out / MODEL_DIR).absolute()), stamp, str(out.absolute()))
                done = spark.sparkContext.parallelize(todo, len(todo)).map(task).collect()
        rows, errors = sum(r for _, r, _ in done), sum(e for _, _, e in done)
        from cxrflow.atomic import write_json_atomic

        write_json_atomic(
            out / DONE_NAME, {"parts": len(units), "scored_now": len(done), "rows_now": rows, "errors_now": errors}
        )
    kept = len(units) - len(todo)
    print(f"scored {rows} images in {len(done)} parts into {out}" + (f" ({kept} parts were already there)" if kept else "")
          + (f"; {errors} could not be read (see the 'error' column)" if errors else ""))  # fmt: skip
    if errors:
        print(f"note: {errors} images have an error instead of probabilities", file=sys.stderr)
    return 0
