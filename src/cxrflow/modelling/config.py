"""Training configuration: typed dataclasses, named presets, a config file, command-line overrides.

Resolution order (later wins): the preset (``paper`` or ``default``) -> the config file (JSON,
YAML or TOML; keys are :class:`TrainConfig` fields, ``kt``/``finetune`` are tables with ``epochs``
and ``lr``) -> command-line options. The resolved config is saved as ``config.json`` in the run
folder and inside every checkpoint, so a run can be reproduced from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxrflow import options, safeio
from cxrflow.data.uncertain import POLICIES, check_policy
from cxrflow.errors import CxrflowError
from cxrflow.modelling.catalog import CHECKPOINTING_MODELS, FUSIONS, MODEL_NAMES, check_fusion
from cxrflow.options import DEVICE_CHOICES, check_device

STAGE_CHOICES = ("kt", "finetune", "both")
OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("none", "plateau", "cosine")
DEVICES = DEVICE_CHOICES
UNCERTAIN_POLICIES = POLICIES


@dataclass
class Stage:
    """One training stage: what trains, for how long, at which learning rate.

    ``trainable="head"`` freezes the backbone (weights and BatchNorm statistics); ``"all"`` trains
    everything.
    """

    name: str
    trainable: str
    epochs: int
    lr: float


@dataclass
class StageSettings:
    """Epochs and learning rate of a named stage, as set in a preset or file."""

    epochs: int
    lr: float


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    option: bool = False,
    factory: Any = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    parse: Any = None,
    repeat: bool = False,
) -> Any:
    """A :class:`TrainConfig` field with its help text. ``option``: ``cxrflow train --NAME`` sets it
    (every field can be set by ``--set NAME=VALUE`` and in a settings file); ``choices`` (refused by
    the parser) and ``metavar`` are what ``--help`` shows; ``parse``: the option's argparse type
    (default: the field's type); ``repeat``: the option may be given several times."""
    meta = {"help": help, "option": option, "choices": choices, "metavar": metavar, "parse": parse, "repeat": repeat}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run depends on (besides the store's content)."""

    store: str = setting(
        "",
        "store folder written by 'cxrflow etl'; repeat it to train on several stores at once "
        "(docs/cross-collection.md)",
        option=True,
        metavar="STORE",
        repeat=True,
    )
    #: every store of a run trained on several (absolute paths; ``store`` is the first); empty for one store
    stores: list[str] = setting(help="the stores of a run trained on several (--store repeated)", factory=list)
    #: per store, how often its rows are drawn relative to the others' (empty: every store weighs 1)
    store_weights: list[float] = setting(
        help="per --store, how often its rows are drawn (comma-separated, default all 1)",
        factory=list,
        option=True,
        metavar="W1,W2,...",
    )
    size: int = setting(0, "image size to train at (one the store holds)", option=True)
    model: str = setting("densenet121", "model name", option=True, metavar="|".join(MODEL_NAMES))
    out: str = setting("", "run folder to create (or resume)", option=True)
    preset: str = setting("default", "starting settings: paper or default")
    stage: str = setting("both", "which stages to run (default: both)", option=True, choices=STAGE_CHOICES)
    pretrained: str = setting(
        "imagenet",
        "backbone weights: torchvision's ImageNet weights (from $TORCH_HOME; the default), "
        "none (random initialisation) or a state dict file",
        option=True,
        metavar="imagenet|none|PATH",
    )
    batch_size: int = setting(32, "images per optimiser step", option=True, parse=options.positive_int)
    eval_batch_size: int = setting(64, "images per forward pass when scoring validation")
    optimizer: str = setting("adam", "adam or sgd", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(0.0, "L2 weight decay of the optimizer")
    kt: StageSettings = setting(
        help="knowledge transfer (head only): epochs and lr", factory=lambda: StageSettings(epochs=3, lr=1e-3)
    )
    finetune: StageSettings = setting(
        help="fine-tuning (everything): epochs and lr", factory=lambda: StageSettings(epochs=10, lr=1e-4)
    )
    scheduler: str = setting("plateau", "learning-rate schedule: none, plateau or cosine", choices=SCHEDULERS)
    plateau_factor: float = setting(0.1, "plateau: the factor the learning rate is multiplied by")
    plateau_patience: int = setting(1, "plateau: epochs without improvement before the rate drops")
    #: every stage runs at least this many optimiser steps: a small train split gets more epochs
    #: than the stage's ``epochs`` (0: exactly ``epochs``); see :meth:`stage_plan`
    min_steps: int = setting(0, "optimiser steps every stage runs at least (a small train split gets more epochs)")
    #: cosine: the learning rate rises linearly over this many steps, then decays to 0 by the stage's end
    warmup_steps: int = setting(0, "cosine: steps of linear warm-up")
    early_stopping_patience: int = setting(3, "epochs without a better validation AUC before a stage stops (0: off)")
    augment: bool = setting(True, "random affine jitter of the training images")
    seed: int = setting(0, "seed of the weights, the batch order and the augmentation", option=True, parse=options.seed)
    device: str = setting(
        "auto", options.DEVICE_HELP, option=True, parse=options.device, metavar="|".join(options.DEVICE_CHOICES)
    )
    num_workers: int = setting(0, "loader worker processes", option=True)
    #: uncertain labels of stores that have them: ignore | ones | zeros [,Finding=policy ...] (cxrflow.data.uncertain)
    uncertain: str = setting(
        "ignore",
        "uncertain labels (stores that have them): ignore (U-Ignore, default), ones or zeros, optionally "
        "per finding: zeros,Atelectasis=ones,Edema=ones",
        option=True,
        metavar="|".join(UNCERTAIN_POLICIES),
    )
    #: "none" (image only) or "demographics" (age, sex, view fused before the head)
    fusion: str = setting(
        "none",
        "demographics: fuse age, sex and view with the image features (default: none)",
        option=True,
        metavar="|".join(FUSIONS),
    )
    #: activation checkpointing (less memory, more compute; densenet121 and resnet50)
    grad_checkpointing: bool = setting(
        False,
        f"activation checkpointing: less memory, about a third more compute ({', '.join(CHECKPOINTING_MODELS)})",
        option=True,
    )

    def stages(self) -> list[Stage]:
        """The stages this run trains, in order (a single-stage model, such as ``simple_cnn``, trains
        one all-trainable "finetune" stage; see its registry entry)."""
        from cxrflow.modelling.registry import model_entry

        kt = Stage("kt", "head", self.kt.epochs, self.kt.lr)
        ft = Stage("finetune", "all", self.finetune.epochs, self.finetune.lr)
        if not model_entry(self.model).two_stage:
            return [ft]
        return {"kt": [kt], "finetune": [ft], "both": [kt, ft]}[self.stage]

    def stage_plan(self, train_rows: int, world_size: int = 1) -> list[Stage]:
        """The stages with the epochs this train split gets: at least ``epochs``, and enough for
        ``min_steps`` optimiser steps at this batch size (so the recipe follows the amount of data)."""
        per_epoch = max(1, train_rows // max(1, self.batch_size * world_size))
        return [
            dataclasses.replace(st, epochs=max(st.epochs, math.ceil(self.min_steps / per_epoch)))
            for st in self.stages()
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def multi_store(self) -> bool:
        """Whether the run trains on several stores at once (:mod:`cxrflow.data.storeset`)."""
        return len(self.stores) > 1

    def all_stores(self) -> list[str]:
        """The stores the run trains on: ``stores``, or ``store`` alone."""
        return list(self.stores) if self.multi_store else [self.store]

    def _normalise_stores(self) -> None:
        """One store in ``stores`` is ``store``; several are absolute paths, ``store`` the first."""
        if len(self.stores) == 1:
            self.store, self.stores = self.stores[0], []
        elif self.stores:
            self.stores = [os.path.abspath(os.path.expanduser(s)) for s in self.stores]
            self.store = self.stores[0]
        if self.store_weights:
            from cxrflow.data.storeset import check_store_weights

            check_store_weights(self.store_weights, len(self.all_stores()))

    def validate(self) -> TrainConfig:
        """Raise a CxrflowError naming the first invalid setting; returns self."""
        from cxrflow.modelling.registry import checkpointing_models, model_entry

        self._normalise_stores()
        if not self.store:
            raise CxrflowError("no store given (--store)")
        if not self.out:
            raise CxrflowError("no run folder given (--out)")
        if self.size <= 0:
            raise CxrflowError("no image size given (--size)")
        entry = model_entry(self.model)  # an unknown name is an error listing the registered ones
        try:
            check_device(self.device)
        except ValueError as exc:
            raise CxrflowError(str(exc)) from None
        for name, value, choices in (
            ("stage", self.stage, STAGE_CHOICES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("scheduler", self.scheduler, SCHEDULERS),
        ):
            if value not in choices:
                raise CxrflowError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        check_fusion(self.fusion)
        if self.grad_checkpointing and entry.grad_checkpointing is None:
            raise CxrflowError(
                f"--grad-checkpointing is available for {', '.join(checkpointing_models())}, not {self.model}"
            )
        if self.fusion != "none" and not entry.demographics:
            raise CxrflowError(f"{self.model} does not fuse demographics; use --fusion none")
        if not entry.two_stage and self.stage == "kt":
            raise CxrflowError(f"{self.model} trains in one stage, so no kt stage; use --stage finetune or both")
        if entry.imagenet_weights is None and self.pretrained == "imagenet":
            self.pretrained = "none"  # it has no ImageNet weights; the preset's default does not apply
        for label, n in (("batch_size", self.batch_size), ("eval_batch_size", self.eval_batch_size)):
            if n < 1:
                raise CxrflowError(f"{label} must be at least 1, got {n}")
        for st in self.stages():
            if st.epochs < 1:
                raise CxrflowError(f"stage {st.name} needs at least 1 epoch, got {st.epochs}")
            if not st.lr > 0:
                raise CxrflowError(f"stage {st.name} needs a positive learning rate, got {st.lr}")
        check_policy(self.uncertain)
        for label, n in (("min_steps", self.min_steps), ("warmup_steps", self.warmup_steps)):
            if n < 0:
                raise CxrflowError(f"{label} must be >= 0, got {n}")
        if self.num_workers < 0:
            raise CxrflowError(f"num_workers must be >= 0, got {self.num_workers}")
        self._check_ranges()
        return self

    def _check_ranges(self) -> None:
        """Settings that parse but cannot work: one line naming the setting and its range."""
        from cxrflow.options import SEED_MAX

        checks = (
            ("seed", self.seed, 0 <= self.seed <= SEED_MAX, f"an integer in 0..{SEED_MAX}"),
            ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay, 0 <= self.weight_decay < math.inf, "a finite number >= 0"),
            (
                "plateau_factor",
                self.plateau_factor,
                0 < self.plateau_factor < 1,
                "in (0, 1): the learning rate is multiplied by it",
            ),
            ("plateau_patience", self.plateau_patience, self.plateau_patience >= 0, ">= 0"),
            (
                "early_stopping_patience",
                self.early_stopping_patience,
                self.early_stopping_patience >= 0,
                ">= 0 (0 = off)",
            ),
            (
                "num_workers",
                self.num_workers,
                self.num_workers <= MAX_WORKERS,
                f"at most {MAX_WORKERS} (each is a process)",
            ),
            ("min_steps", self.min_steps, self.min_steps <= MAX_STEPS, f"at most {MAX_STEPS:,}"),
            ("warmup_steps", self.warmup_steps, self.warmup_steps <= MAX_STEPS, f"at most {MAX_STEPS:,}"),
        )
        for name, value, ok, expected in checks:
            if not ok:
                raise CxrflowError(f"{name} must be {expected}, got {value!r}")
        for st in self.stages():
            if not math.isfinite(st.lr):
                raise CxrflowError(f"stage {st.name} needs a finite learning rate, got {st.lr}")
            if st.epochs > MAX_EPOCHS:
                raise CxrflowError(f"stage {st.name} needs at most {MAX_EPOCHS:,} epochs, got {st.epochs}")


def preset(name: str) -> TrainConfig:
    """A named starting point.

    ``paper``: the paper's recipe -- batch size 5, knowledge transfer then fine-tuning, 8 epochs
    each, plain SGD with momentum at a constant learning rate, no early stopping (the issue fixes
    the batch size, stages and epochs; optimizer and rates are ours).
    ``default``: for real use, sized by the amount of data -- batch 32, Adam 1e-3 in both stages
    (CheXNet's rate; the decay comes from the schedule), and per stage at least :data:`DEFAULT_MIN_STEPS`
    optimiser steps (a small train split gets more epochs than the stage's 3 or 10; a large one
    gets exactly those), with a 100-step linear warm-up and a cosine decay to 0 over the stage. The
    best epoch by validation AUC is kept; no early stopping, the schedule sets the length. No
    augmentation (``augment=true`` turns it on): measured by ``benchmarks/recipe.py``, the affine
    jitter cost 0.03-0.04 mean AUC on findings that are faint on the image, at 32 and 64 px, 1k to
    10k images, and it was what made the default lose to the paper's recipe at 10k.
    (The dataclass defaults keep the earlier plateau recipe, so configs saved before this one
    resume unchanged.)
    """
    if name == "paper":
        return TrainConfig(
            preset="paper",
            batch_size=5,
            optimizer="sgd",
            momentum=0.9,
            kt=StageSettings(epochs=8, lr=1e-2),
            finetune=StageSettings(epochs=8, lr=1e-3),
            scheduler="none",
            early_stopping_patience=0,
            augment=False,
        )
    if name == "default":
        return TrainConfig(
            finetune=StageSettings(epochs=10, lr=1e-3),
            scheduler="cosine",
            warmup_steps=100,
            min_steps=DEFAULT_MIN_STEPS,
            early_stopping_patience=0,
            augment=False,
        )
    raise CxrflowError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


PRESETS = ("paper", "default")
#: The default preset's step budget per stage (about 32,000 images at batch 32).
DEFAULT_MIN_STEPS = 1000
#: Ceilings of settings that parse but could never finish (10^20 epochs) or would fork a process per
#: loader worker asked for (--num-workers 100000).
MAX_EPOCHS = 100_000
MAX_STEPS = 1_000_000_000
MAX_WORKERS = 256


def _coerce(value: Any, kind: Any, key: str, source: str) -> Any:
    """Convert a file or command-line value to a field's declared type."""
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(kind, kind) if isinstance(kind, str) else kind
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is int:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
        if kind in ("list[str]", "list[float]"):
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            return [(str if kind == "list[str]" else float)(str(v).strip() if isinstance(v, str) else v) for v in items]
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("1e400"))
        expected = {"list[float]": "comma-separated numbers"}.get(kind, getattr(kind, "__name__", kind))
        raise CxrflowError(f"{key}: expected {expected}, got {value!r}", source) from None
    raise TypeError(f"unsupported field type {kind!r}")


def apply_overrides(config: TrainConfig, values: dict[str, Any], source: str = "command line") -> TrainConfig:
    """Set fields from a mapping (nested ``kt``/``finetune`` tables or ``kt.lr`` keys allowed).

    Epochs set here are the epochs run: they turn ``min_steps`` off unless it is set here too.
    """
    if "min_steps" not in values and _sets_epochs(values):
        config.min_steps = 0
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        top, _, sub = key.partition(".")
        if top not in fields:
            raise CxrflowError(f"unknown setting {key!r}; valid settings: {', '.join(fields)}", source)
        if top in ("kt", "finetune"):
            settings = getattr(config, top)
            items = {sub: value} if sub else value
            if not isinstance(items, dict):
                raise CxrflowError(f"{top} must be a table with epochs and lr", source)
            for name, v in items.items():
                if name not in ("epochs", "lr"):
                    raise CxrflowError(f"unknown setting {top}.{name}; valid: epochs, lr", source)
                setattr(settings, name, _coerce(v, int if name == "epochs" else float, f"{top}.{name}", source))
        elif sub:
            raise CxrflowError(f"unknown setting {key!r}", source)
        else:
            setattr(config, top, _coerce(value, fields[top].type, key, source))
    return config


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a JSON, YAML or TOML file (chosen by extension)."""
    file = Path(path)
    if not file.exists():
        raise CxrflowError("no such config file", file)
    if not file.is_file():
        raise CxrflowError(
            "is not a regular file (a folder, pipe or device); expected a settings file (.json, .yaml, .toml)", file
        )
    suffix = file.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml", ".toml"):
        raise CxrflowError("config file must end in .json, .yaml, .yml or .toml", file)
    try:
        text = safeio.read_bytes(file, "settings file", safeio.CONFIG_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CxrflowError(f"cannot parse config: not UTF-8 text ({exc.reason} at byte {exc.start})", file) from None
    except OSError as exc:
        raise CxrflowError(f"cannot read config: {exc.strerror or exc}", file) from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = safeio.load_yaml(text, file)
    except (json.JSONDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        raise CxrflowError(f"cannot parse config: {str(exc).splitlines()[0]}", file, line) from None
    except RecursionError:
        raise CxrflowError("cannot parse config: nested too deeply", file) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CxrflowError("config file must hold a mapping of settings", file)
    return data


def resolve_config(
    preset_name: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Preset, then file, then overrides; validated."""
    from_file = read_config_file(config_file) if config_file else {}
    name = preset_name or from_file.get("preset") or "default"
    config = preset(str(name))
    file_values = {k: v for k, v in from_file.items() if k != "preset"}
    apply_overrides(config, file_values, str(config_file) if config_file else "config")
    apply_overrides(config, {k: v for k, v in (overrides or {}).items() if v is not None})
    return config.validate()


def _sets_epochs(values: dict[str, Any]) -> bool:
    return any(
        key in ("kt.epochs", "finetune.epochs") or (key in ("kt", "finetune") and isinstance(v, dict) and "epochs" in v)
        for key, v in values.items()
    )


def option_fields() -> list[dataclasses.Field]:
    """The fields ``cxrflow train`` has a ``--NAME`` option for, in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("option")]


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig saved with :meth:`TrainConfig.to_dict` (extra keys are ignored)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig()
    return apply_overrides(config, {k: v for k, v in values.items() if k in names}, "saved config")
