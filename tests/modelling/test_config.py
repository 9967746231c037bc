"""Training config: presets, files in three formats, override order, validation."""

from __future__ import annotations

import json

import pytest

from cxrflow.errors import CxrflowError
from cxrflow.modelling.config import (
    Stage,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    preset,
    read_config_file,
    resolve_config,
)

REQUIRED = {"store": "s", "size": 32, "model": "densenet121", "out": "run"}


def test_paper_preset_is_the_papers_recipe():
    cfg = resolve_config("paper", None, REQUIRED)
    assert cfg.batch_size == 5
    assert [(s.name, s.trainable, s.epochs) for s in cfg.stages()] == [("kt", "head", 8), ("finetune", "all", 8)]
    assert cfg.stages()[1].lr < cfg.stages()[0].lr
    assert cfg.scheduler == "none" and cfg.early_stopping_patience == 0


def test_default_preset_for_real_use():
    cfg = resolve_config(None, None, REQUIRED)
    assert cfg.preset == "default" and cfg.batch_size > 5
    assert cfg.optimizer == "adam" and cfg.scheduler == "cosine" and cfg.min_steps >= 1000 and cfg.warmup_steps > 0


def test_stage_selection_and_simple_cnn_single_stage():
    cfg = resolve_config(None, None, {**REQUIRED, "stage": "kt"})
    assert [s.name for s in cfg.stages()] == ["kt"]
    cnn = resolve_config(None, None, {**REQUIRED, "model": "simple_cnn"})
    assert cnn.stages() == [Stage("finetune", "all", cnn.finetune.epochs, cnn.finetune.lr)]
    assert cnn.pretrained == "none"  # it has no ImageNet weights
    with pytest.raises(CxrflowError, match="no kt stage"):
        resolve_config(None, None, {**REQUIRED, "model": "simple_cnn", "stage": "kt"})


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_file_then_command_line_override_the_preset(tmp_path, suffix):
    body = {
        ".json": json.dumps({"preset": "paper", "batch_size": 7, "kt": {"epochs": 2}, "augment": "yes"}),
        ".yaml": "preset: paper\nbatch_size: 7\nkt:\n  epochs: 2\naugment: yes\n",
        ".toml": 'preset = "paper"\nbatch_size = 7\naugment = true\n[kt]\nepochs = 2\n',
    }[suffix]
    path = tmp_path / f"cfg{suffix}"
    path.write_text(body)
    cfg = resolve_config(None, path, {**REQUIRED, "seed": 3, "finetune.lr": "0.5"})
    assert cfg.preset == "paper" and cfg.batch_size == 7 and cfg.augment is True
    assert cfg.kt.epochs == 2 and cfg.kt.lr == preset("paper").kt.lr  # only epochs was set in the table
    assert cfg.seed == 3 and cfg.finetune.lr == 0.5
    # the command line wins over the file
    assert resolve_config(None, path, {**REQUIRED, "batch_size": 9}).batch_size == 9
    # an explicit preset wins over the file's preset, the file's values still apply
    cfg = resolve_config("default", path, REQUIRED)
    assert cfg.optimizer == "adam" and cfg.batch_size == 7


def test_bad_files_and_values(tmp_path):
    with pytest.raises(CxrflowError, match="no such config file"):
        read_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 4\nkt: [unclosed\n")
    with pytest.raises(CxrflowError) as err:
        read_config_file(bad)
    assert err.value.path == str(bad) and err.value.line is not None
    ini = tmp_path / "x.ini"
    ini.write_text("a=1")
    with pytest.raises(CxrflowError, match=r"\.json, \.yaml"):
        read_config_file(ini)
    unknown = tmp_path / "u.json"
    unknown.write_text('{"batchsize": 4}')
    with pytest.raises(CxrflowError, match="unknown setting 'batchsize'.*batch_size"):
        resolve_config(None, unknown, REQUIRED)
    with pytest.raises(CxrflowError, match="batch_size: expected int"):
        apply_overrides(TrainConfig(), {"batch_size": "four"})
    with pytest.raises(CxrflowError, match="unknown preset"):
        resolve_config("fast", None, REQUIRED)
    with pytest.raises(CxrflowError, match="unknown model 'vgg'.*simple_cnn"):
        resolve_config(None, None, {**REQUIRED, "model": "vgg"})
    with pytest.raises(CxrflowError, match="optimizer must be one of"):
        resolve_config(None, None, {**REQUIRED, "optimizer": "lbfgs"})
    with pytest.raises(CxrflowError, match="at least 1 epoch"):
        resolve_config(None, None, {**REQUIRED, "kt.epochs": 0})
    with pytest.raises(CxrflowError, match="--size"):
        resolve_config(None, None, {**REQUIRED, "size": 0})


def test_round_trip_through_a_dict():
    cfg = resolve_config("paper", None, {**REQUIRED, "kt.lr": 0.02})
    saved = json.loads(json.dumps({**cfg.to_dict(), "label_names": ["A"]}))
    assert config_from_dict(saved) == cfg
