"""``cxrflow train``: the options, the config they resolve to, and where the training processes start.

The command chooses the start: one local process (or each process of a ``torchrun`` launch) runs
:func:`cxrflow.modelling.train.run_process`; with ``--spark-master`` the processes start on a Spark
cluster (:func:`cxrflow.modelling.sparktrain.train_on_spark`). ``--resume`` takes the run's saved config
and refuses options that would change its result.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

from cxrflow.atomic import read_json_object
from cxrflow.data.spark import check_local_cluster, check_master
from cxrflow.errors import CxrflowError
from cxrflow.modelling.config import PRESETS, TrainConfig, config_from_dict, option_fields, resolve_config
from cxrflow.modelling.sparktrain import SparkLaunch
from cxrflow.tracking import add_arguments as add_tracking_arguments
from cxrflow.tracking import request_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``cxrflow train`` options (also used by :func:`get_args_parser`): one per
    :class:`~cxrflow.modelling.config.TrainConfig` field marked as an option, with that field's help."""
    settings = parser.add_argument_group(
        "settings (fields of cxrflow.modelling.config.TrainConfig; any other one with --set NAME=VALUE)"
    )
    for f in option_fields():
        add_setting(settings, f, required=f.name == "out")
    settings.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        metavar="E",
        help="epochs per selected stage, in order; one value sets every stage",
    )
    settings.add_argument(
        "--lr",
        type=float,
        nargs="+",
        metavar="LR",
        help="learning rate per selected stage, in order (kt, finetune); one value sets every stage",
    )
    settings.add_argument("--preset", choices=PRESETS, help="starting settings (default: default)")
    settings.add_argument("--config", metavar="FILE", help="settings file (.json, .yaml, .toml)")
    settings.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other setting, e.g. --set optimizer=sgd --set finetune.lr=1e-4 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only one line per epoch (for logs)")
    add_tracking_arguments(parser)
    add_spark_arguments(parser)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = other_settings()


def other_settings() -> str:
    """The settings without an option of their own, with their help (for ``--help``)."""
    others = [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("option") and f.name != "preset"]
    wide = max(len(f.name) for f in others)
    return "other settings (--set NAME=VALUE, or NAME: VALUE in a --config file):\n" + "\n".join(
        f"  {f.name:<{wide}}  {f.metadata['help']}" for f in others
    )


def add_setting(parser: Any, f: dataclasses.Field, *, required: bool = False) -> None:
    """``--NAME`` for one config field: its help and choices; not given = None (the preset's, the
    file's or --set's value stands)."""
    flag = "--" + f.name.replace("_", "-")
    if f.type in ("bool", bool):
        parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        return
    parse = f.metadata.get("parse") or {"int": int, "float": float}.get(str(f.type), str)
    parser.add_argument(
        flag,
        type=parse,
        action="append" if f.metadata.get("repeat") else "store",
        choices=f.metadata.get("choices"),
        metavar=f.metadata.get("metavar"),
        required=required,
        help=f.metadata["help"],
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """A standalone parser for the train options (for other entry points)."""
    parser = argparse.ArgumentParser(description="cxrflow two-stage training", add_help=add_help)
    add_arguments(parser)
    return parser


def _per_stage(values: list | None, option: str, config_stages: list[str], field: str) -> dict[str, Any]:
    if not values:
        return {}
    if len(values) == 1:
        values = values * len(config_stages)
    if len(values) != len(config_stages):
        raise CxrflowError(f"{option} takes one value or one per stage ({', '.join(config_stages)}), got {len(values)}")
    return {f"{name}.{field}": v for name, v in zip(config_stages, values)}


def _option_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given by --set and the named command-line options (None: not given)."""
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise CxrflowError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    options_given = {f.name: getattr(args, f.name) for f in option_fields()}
    stores = options_given.get("store")
    if isinstance(stores, list):  # --store repeated: several stores (one: exactly as before)
        options_given["store"] = stores[0]
        options_given["stores"] = stores if len(stores) > 1 else []
    overrides.update(
        {k: v for k, v in options_given.items() if v is not None}
    )  # an option not given keeps --set's value
    return overrides


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset -> --config file -> command-line options (later wins); validated."""
    overrides = _option_overrides(args)
    config = resolve_config(args.preset, args.config, overrides)
    names = [s.name for s in config.stages()]
    per_stage = {**_per_stage(args.epochs, "--epochs", names, "epochs"), **_per_stage(args.lr, "--lr", names, "lr")}
    if per_stage:
        config = resolve_config(args.preset, args.config, {**overrides, **per_stage})
    return config


#: Settings ``--resume`` lets differ from the saved run: where it runs, not what it computes.
RESUME_MAY_DIFFER = ("out", "device", "num_workers", "eval_batch_size")


def _resume_config(args: argparse.Namespace) -> TrainConfig | None:
    """The saved config of the run in --out, or None without one.

    Only :data:`RESUME_MAY_DIFFER` may be changed on resuming; any other option given (on the
    command line, by --set, --config or --preset) that differs from the saved run would change the
    result (the batch order, the model, the schedule) and is refused, naming it.
    """
    path = Path(args.out) / "config.json"
    if not path.exists():
        return None
    saved = read_json_object(path, "run config")
    missing = [key for key in ("store", "size", "model") if key not in saved]
    if missing:
        raise CxrflowError(f"run config field {missing[0]!r} is missing; start again with --overwrite", path)
    if getattr(args, "store", None) is None:  # the saved store, found by identity where it moved
        from cxrflow.data.store import run_store

        saved["store"] = str(run_store(saved, run=args.out))
    try:
        config = config_from_dict(saved)
        config.out = args.out
        config.validate()  # a damaged file names itself, not an option the user never gave
    except CxrflowError as exc:
        raise CxrflowError(exc.message, path) from None
    return _checked_resume_config(args, config, saved)


def _checked_resume_config(args: argparse.Namespace, saved: TrainConfig, saved_dict: dict) -> TrainConfig:
    """The saved config with the options given to --resume applied; a CxrflowError naming every
    one that differs from the saved run outside :data:`RESUME_MAY_DIFFER`.

    A different --store is accepted when it holds the same splits (a moved store), by identity.
    """
    from cxrflow.modelling.config import apply_overrides, read_config_file

    requested = config_from_dict(saved.to_dict())
    changed: list[str] = []
    saved_preset = saved_dict.get("preset") or "default"
    if args.preset and args.preset != saved_preset:
        changed.append(f"preset (saved {saved_preset}, given {args.preset})")
    if args.config:
        apply_overrides(
            requested, {k: v for k, v in read_config_file(args.config).items() if k != "preset"}, str(args.config)
        )
    apply_overrides(requested, {k: v for k, v in _option_overrides(args).items() if v is not None})
    names = [s.name for s in saved.stages()]
    apply_overrides(
        requested, {**_per_stage(args.epochs, "--epochs", names, "epochs"), **_per_stage(args.lr, "--lr", names, "lr")}
    )
    requested.validate()
    before, after = saved.to_dict(), requested.to_dict()
    if after["store"] != before["store"] and _same_splits(after["store"], saved_dict):
        before["store"] = after["store"]  # the same data at a new place
    for key, value in after.items():
        if key not in RESUME_MAY_DIFFER and value != before[key]:
            changed.append(f"{key} (saved {_shown(before[key])}, given {_shown(value)})")
    if changed:
        raise CxrflowError(
            f"--resume continues the run with its saved settings, but these options differ and would change the "
            f"result: {'; '.join(changed)}. Drop them (only {', '.join(RESUME_MAY_DIFFER[1:])} may change) "
            "or start again with --overwrite",
            args.out,
        )
    return requested


def _same_splits(store: str, saved: dict) -> bool:
    """Whether ``store`` holds exactly the splits the saved run was trained on (its store moved)."""
    recorded = saved.get("store_identity")
    if not recorded:
        return False
    from cxrflow.data.store import read_manifest, store_identity

    try:
        return store_identity(store, read_manifest(store), int(saved["size"])) == recorded
    except (CxrflowError, KeyError, OSError):
        return False


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {v}" for k, v in value.items()) + "}"
    return str(value)


def run_config(args: argparse.Namespace) -> TrainConfig:
    """The config a ``cxrflow train`` command runs: the saved one when resuming, else the options'."""
    return (_resume_config(args) if args.resume else None) or config_from_args(args)


def run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise CxrflowError("--resume and --overwrite exclude each other")
    launch = launch_from_args(args)
    request = request_from_args(args)
    config = run_config(args)
    how = {"resume": args.resume, "overwrite": args.overwrite, "quiet": args.quiet}
    check_not_busy(config.out)
    check_inputs(config)
    if launch is not None:
        from cxrflow.modelling.sparktrain import train_on_spark

        train_on_spark(config, launch, tracking=request, **how)
    else:
        from cxrflow.modelling.train import run_process

        run_process(config, tracking=request, **how)
    return 0


def check_not_busy(out: str | os.PathLike) -> None:
    """A run folder another process is writing now names that process first (before the inputs)."""
    from cxrflow.outputs import OutputLock

    lock = OutputLock(out, "train")
    holder = lock.busy()
    if holder is not None:
        raise lock.refusal(holder)


def check_inputs(config: TrainConfig) -> None:
    """The store, its image size and its train and val splits, checked before torch is imported
    (a mistyped --store or --size answers at once)."""
    from cxrflow.data.manifest import check_partition, read_manifest

    if config.multi_store:  # every store, the same one twice, a common size, the weights
        from cxrflow.data.storeset import check_policy_names, open_stores

        check_policy_names(config.uncertain, open_stores(config.all_stores(), config.size).label_names)
        return
    manifest = read_manifest(config.store)
    for split in ("train", "val"):
        check_partition(manifest, config.store, config.size, split)


def main(argv: list[str] | None = None) -> int:
    """``python -m cxrflow.commands.train ...`` (same as ``cxrflow train ...``)."""
    from cxrflow.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


def add_spark_arguments(parser: argparse.ArgumentParser) -> None:
    """The Spark options of ``cxrflow train`` and ``cxrflow sweep``."""
    group = parser.add_argument_group("training on a Spark cluster")
    group.add_argument(
        "--spark-master",
        metavar="URL",
        help="start the training processes on this Spark master through TorchDistributor "
        "(local-cluster[W,C,MB], spark://host:port, yarn, k8s://...)",
    )
    group.add_argument("--processes", type=int, metavar="N", help="training processes on the cluster (default 1)")
    group.add_argument("--gpu", action="store_true", help="train on GPUs (nccl); the cluster must give tasks GPUs")
    group.add_argument(
        "--spark-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any Spark setting, e.g. spark.task.resource.gpu.amount=1 (repeatable)",
    )
    group.add_argument(
        "--spark-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for executors to register (default 60)",
    )


def launch_from_args(args: argparse.Namespace) -> SparkLaunch | None:
    """The launch the options ask for, or None for a local/torchrun start; bad options raise."""
    if not getattr(args, "spark_master", None):
        if getattr(args, "processes", None) or getattr(args, "gpu", False) or getattr(args, "spark_conf", None):
            raise CxrflowError("--processes, --gpu and --spark-conf need --spark-master")
        return None
    master = check_master(args.spark_master)
    processes = 1 if args.processes is None else int(args.processes)
    if processes < 1:
        raise CxrflowError(f"--processes must be at least 1, got {processes}")
    if getattr(args, "device", None) == "cuda" and not args.gpu:
        raise CxrflowError("--device cuda on a Spark cluster: pass --gpu instead")
    conf: dict[str, str] = {}
    for item in args.spark_conf or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CxrflowError(f"--spark-conf expects KEY=VALUE, got {item!r}")
        conf[key.strip()] = value.strip()
    if not 0 < args.spark_wait < math.inf:
        raise CxrflowError(f"--spark-wait must be a positive number of seconds, got {args.spark_wait}")
    check_local_cluster(
        master, conf.get("spark.executor.memory")
    )  # at once; a spark:// master is tried before the JVM starts
    return SparkLaunch(master, processes, bool(args.gpu), conf, float(args.spark_wait))


if __name__ == "__main__":
    sys.exit(main())
