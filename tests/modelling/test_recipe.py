"""The recipe that follows the amount of data: a step budget per stage, warm-up then cosine decay."""

from __future__ import annotations

import json
import math

import pytest

from cxrflow.modelling.config import preset, resolve_config
from cxrflow.modelling.train import train, warmup_cosine
from cxrflow.testing.synthstore import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_warmup_then_cosine():
    factors = [warmup_cosine(s, 4, 20) for s in range(21)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0) and factors[12] == pytest.approx(0.5) and factors[20] == pytest.approx(0.0)
    after = factors[4:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert warmup_cosine(50, 4, 20) == 0.0  # past the end it stays at the floor
    assert warmup_cosine(0, 0, 10) == 1.0


def test_stage_plan_follows_the_amount_of_data():
    config = preset("default")
    config.model, config.min_steps, config.batch_size = "densenet121", 1000, 32
    small = {s.name: s.epochs for s in config.stage_plan(train_rows=640)}  # 20 steps per epoch
    assert small == {"kt": 50, "finetune": 50}
    large = {s.name: s.epochs for s in config.stage_plan(train_rows=320_000)}  # 10,000 steps per epoch
    assert large == {"kt": config.kt.epochs, "finetune": config.finetune.epochs}
    assert {s.name: s.epochs for s in config.stage_plan(train_rows=640, world_size=2)} == {"kt": 100, "finetune": 100}


def test_neither_preset_augments_unless_asked():
    base = {"store": "s", "out": "o", "size": 32}
    assert resolve_config(None, None, base).augment is False and resolve_config("paper", None, base).augment is False
    assert resolve_config(None, None, {**base, "augment": "true"}).augment is True


def test_explicit_epochs_are_the_epochs_run():
    base = {"store": "s", "out": "o", "size": 32}
    assert resolve_config(None, None, base).min_steps == preset("default").min_steps
    assert resolve_config(None, None, {**base, "finetune.epochs": 4}).min_steps == 0
    assert resolve_config(None, None, {**base, "finetune": {"epochs": 4}}).min_steps == 0
    assert resolve_config(None, None, {**base, "finetune.epochs": 4, "min_steps": 30}).min_steps == 30
    assert resolve_config("paper", None, base).min_steps == 0  # the paper's recipe is in epochs


def test_a_small_split_gets_more_epochs_and_a_cosine_schedule(tmp_path):
    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 64, "val": 32, "test": 8}, seed=0)
    config = resolve_config(
        "default",
        None,
        {
            "store": str(store),
            "size": 32,
            "model": "simple_cnn",
            "out": str(tmp_path / "run"),
            "batch_size": 16,
            "min_steps": 18,
            "warmup_steps": 40,
            "scheduler": "cosine",
            "finetune.epochs": 1,
            "device": "cpu",
            "finetune.lr": 1e-3,
        },
    )
    lrs = []
    train(config, quiet=True, log=lambda _: None, step_hook=lambda model, stage, epoch, step: lrs.append(None))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == math.ceil(18 / 4) == 5  # 4 steps per epoch: epochs follow the step budget
    assert len(lrs) == 20
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["stages"][0]["epochs"] == 5 and saved["min_steps"] == 18
    # the rate each epoch starts at: a warm-up of 2 steps (10% of the stage), then a cosine to 0
    starts = [r["lr"] for r in rows]
    assert starts == pytest.approx([1e-3 * warmup_cosine(4 * e, 2, 20) for e in range(5)])
    assert starts[0] == pytest.approx(0.5e-3) and starts[1] > starts[2] > starts[3] > starts[4] > 0
