"""Demographics: the one encoding (unknown is never a number), fused models of every registry entry,
activation checkpointing, and the user-facing parsing of predict's inputs (the fusion term itself:
tests/modelling/test_fusion_head.py)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from cxrflow.data.demographics import (
    count_unknown,
    encode,
    encode_arrow,
    parse_age,
    parse_choice,
    read_metadata_csv,
)
from cxrflow.errors import CxrflowError
from cxrflow.modelling.config import resolve_config
from cxrflow.modelling.models import CHECKPOINTING_MODELS, MODEL_NAMES, count_parameters, create_model, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_encoding_of_known_and_unknown_values():
    got = encode([(63, "F", "AP"), (0, "M", "PA"), (414, "female", "ap"), (None, "X", "LL"), (120, " male ", None)])
    expected = [
        [0.63, 1, 1],
        [math.nan, 0, 0],  # age 0: a data-entry error in the release, not a newborn we can trust
        [math.nan, 1, 1],  # 414 (the real v2017 file has it); spellings are case-insensitive
        [math.nan, math.nan, math.nan],
        [1.2, 0, math.nan],
    ]
    assert got.dtype == np.float32 and got.shape == (5, 3)
    np.testing.assert_allclose(got, np.array(expected, dtype=np.float32), equal_nan=True)


def test_arrow_columns_with_nulls_and_counts():
    age = pa.array([30, None, 121, 1, -4], pa.int16())
    sex = pa.array(["M", "F", None, "U", "F"])
    view = pa.array(["PA", "AP", "AP", "PA", "lateral"])
    unknown = np.isnan(encode_arrow(age, sex, view))
    assert unknown.tolist() == [
        [False, False, False],
        [True, False, False],
        [True, True, False],
        [False, True, False],
        [True, False, True],
    ]
    assert count_unknown([30, None, 121, 1, -4], ["M", "F", None, "U", "F"], ["PA", "AP", "AP", "PA", "lateral"]) == {
        "age": 3,
        "sex": 2,
        "view": 1,
        "any": 4,
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fused_model_of_every_entry_trains_head_and_fusion_in_kt(name):
    torch.manual_seed(0)
    model = create_model(name, 14, fusion="demographics")
    image_only = create_model(name, 14)
    # the demographic term is added to the logits: the head sees the image features only
    assert model.head.in_features == image_only.head.in_features and model.fusion.out_features == 14
    x = torch.randn(3, 3, 32, 32)
    d = torch.tensor(encode([(63, "F", "AP"), (414, "M", "PA"), (None, None, None)]))
    model.freeze_backbone(name != "simple_cnn")
    model.train()
    logits = model(x, demographics=d)
    assert logits.shape == (3, 14) and torch.isfinite(logits).all()
    logits.sum().backward()
    on_top = {id(p) for p in model.trainable_on_top().parameters()}
    assert {id(p) for p in model.fusion.parameters()} <= on_top
    for pname, p in model.named_parameters():
        if pname.startswith(("fusion.", "head.")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, pname
    # the demographics change the logits; an image-only model ignores them
    model.eval()
    with torch.no_grad():
        other = torch.tensor(encode([(20, "M", "PA")] * 3))
        assert not torch.allclose(model(x, demographics=d), model(x, demographics=other))
        image_only.eval()
        assert torch.equal(image_only(x, demographics=d), image_only(x))
    with pytest.raises(CxrflowError, match="fuses demographics"):
        model(x)


def test_fused_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("simple_cnn", 14, fusion="demographics").eval()
    torch.save(
        {
            "model": model.state_dict(),
            "config": {"model": "simple_cnn", "fusion": "demographics"},
            "label_names": [str(i) for i in range(14)],
        },
        tmp_path / "c.pt",
    )
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    x, d = torch.randn(2, 3, 32, 32), torch.tensor(encode([(40, "F", "PA"), (80, "M", "AP")]))
    with torch.no_grad():
        assert torch.equal(loaded(x, demographics=d), model(x, demographics=d))
    # a fused checkpoint as starting weights of a fused model: backbone, head and fusion load
    again = create_model("simple_cnn", 14, pretrained=str(tmp_path / "c.pt"), fusion="demographics")
    assert "loaded fusion layers" in again.load_notes
    # ... and of an image-only model: backbone and head (the image part of the logits) load, the fusion term does not
    plain = create_model("simple_cnn", 14, pretrained=str(tmp_path / "c.pt"))
    assert "loaded backbone and head" in plain.load_notes and plain.fusion is None
    assert torch.equal(plain.head.weight, model.head.weight)


@pytest.mark.parametrize("name", CHECKPOINTING_MODELS)
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    plain = create_model(name, 3)
    ckpt = create_model(name, 3, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())  # same keys with and without checkpointing
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n
    assert set(plain.state_dict()) == set(ckpt.state_dict())
    _, total = count_parameters(ckpt)
    assert total == count_parameters(plain)[1]


def test_config_checks_fusion_and_checkpointing():
    base = {"store": "s", "out": "o", "size": 32}
    assert resolve_config(None, None, {**base, "fusion": "demographics"}).fusion == "demographics"
    with pytest.raises(CxrflowError, match="unknown fusion 'age'; choose one of none, demographics"):
        resolve_config(None, None, {**base, "fusion": "age"})
    with pytest.raises(CxrflowError, match="grad-checkpointing is available for resnet50, densenet121"):
        resolve_config(None, None, {**base, "model": "simple_cnn", "grad_checkpointing": True})
    with pytest.raises(CxrflowError):
        create_model("simple_cnn", 2, fusion="text")


def test_parsing_what_a_user_types(tmp_path):
    assert parse_age("63") == 63.0 and parse_age(" 7.5 ") == 7.5 and parse_age("unknown") is None
    for bad in ("sixty", "nan", "inf", "63y"):
        with pytest.raises(CxrflowError, match="age must be a number"):
            parse_age(bad)
    assert parse_choice("f", "sex", "--sex") == "f" and parse_choice("", "view", "x") is None
    with pytest.raises(CxrflowError, match="view must be PA or AP"):
        parse_choice("LL", "view", "--view")
    csv = tmp_path / "m.csv"
    csv.write_text("image,age,sex,view\na.png,63,F,AP\nb.png,,unknown,PA\n")
    assert read_metadata_csv(csv) == {"a.png": (63.0, "F", "AP"), "b.png": (None, None, "PA")}
    csv.write_text("image,age,sex,view\na.png,63,F,AP\nb.png,old,M,PA\n")
    with pytest.raises(CxrflowError, match=r"m.csv:3: age must be a number"):
        read_metadata_csv(csv)
    csv.write_text("image,age,sex\na.png,63,F\n")
    with pytest.raises(CxrflowError, match="missing view"):
        read_metadata_csv(csv)


def test_predict_takes_demographics_from_flags_or_a_csv(tmp_path):
    from argparse import Namespace

    from cxrflow.commands.predict import demographics_from_args

    def args(**kw):
        return Namespace(**{"images": [], "age": None, "sex": None, "view": None, "metadata": None, **kw})

    assert demographics_from_args(args(images=["a.png"])) == (["a.png"], None)
    images, table = demographics_from_args(args(images=["a.png", "b.png"], age="63", sex="F", view="unknown"))
    assert images == ["a.png", "b.png"] and table == {"a.png": (63.0, "F", None), "b.png": (63.0, "F", None)}
    csv = tmp_path / "sub" / "m.csv"
    csv.parent.mkdir()
    csv.write_text("image,age,sex,view\nx.png,70,M,PA\n")
    images, table = demographics_from_args(args(metadata=str(csv)))  # no IMAGE: the CSV's, beside it
    assert images == [str(tmp_path / "sub" / "x.png")] and table[images[0]] == (70.0, "M", "PA")
    with pytest.raises(CxrflowError, match="--metadata and --age exclude each other"):
        demographics_from_args(args(images=["a.png"], metadata=str(csv), age="5"))
    with pytest.raises(CxrflowError, match="give at least one IMAGE"):
        demographics_from_args(args())
