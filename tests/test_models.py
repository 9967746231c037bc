"""Models built by name: shape, finiteness, which parameters train, frozen BatchNorm, weight loading."""

from __future__ import annotations

import re
import urllib.error

import pytest
import torch
from torchvision import models as tvm

from cxrflow.errors import CxrflowError
from cxrflow.models import MODEL_NAMES, ChestClassifier, count_parameters, create_model, load_checkpoint

SIZES = {"simple_cnn": (32, 64, 50), "resnet50": (32, 64), "densenet121": (32, 48)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built() -> dict[str, ChestClassifier]:
    torch.manual_seed(0)
    return {name: create_model(name, 14) for name in MODEL_NAMES}


def test_registry_names():
    assert set(MODEL_NAMES) == {"simple_cnn", "resnet50", "densenet121"}


@pytest.mark.parametrize("name,size", [(n, s) for n in MODEL_NAMES for s in SIZES[n]])
def test_logits_shape_and_finite(built, name, size):
    model = built[name].eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
    assert logits.shape == (2, 14)
    assert torch.isfinite(logits).all()
    assert features.shape == (2, model.num_features)
    assert torch.allclose(model.forward_head(features), logits)
    # logits, not probabilities: no sigmoid inside the model
    assert (logits < 0).any() or (logits > 1).any()


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("frozen", [True, False], ids=["kt", "finetune"])
def test_gradients_reach_exactly_the_trainable_parameters(built, name, frozen):
    model = built[name]
    model.freeze_backbone(frozen)
    model.train()
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    trainable, total = count_parameters(model)
    head = {id(p) for p in model.head.parameters()}
    for pname, p in model.named_parameters():
        should_train = (id(p) in head) or not frozen
        assert p.requires_grad == should_train, pname
        assert (p.grad is not None) == should_train, pname
        if should_train:
            assert torch.isfinite(p.grad).all(), pname
    if frozen:
        assert trainable == sum(p.numel() for p in model.head.parameters()) < total
    else:
        assert trainable == total
    model.freeze_backbone(False)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_frozen_backbone_keeps_batchnorm_statistics(built, name):
    model = built[name]
    model.freeze_backbone(True)
    model.train()
    assert not model.backbone.training and model.head.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model(torch.randn(4, 3, 32, 32) * 3 + 1), torch.ones(4, 14)
    )
    loss.backward()
    opt.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.head.weight)
    # unfrozen, a training forward pass does move the running statistics (the check above can fail)
    model.freeze_backbone(False)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32) * 3 + 1)
    bn_keys = [k for k in before if k.endswith("running_mean")]
    assert bn_keys and any(not torch.equal(before[k], model.backbone.state_dict()[k]) for k in bn_keys)


def test_reset_classifier():
    model = create_model("simple_cnn", 14)
    model.reset_classifier(5)
    assert model.num_classes == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_unknown_model_lists_valid_names():
    with pytest.raises(CxrflowError) as err:
        create_model("vgg16", 14)
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_simple_cnn_has_no_imagenet_weights():
    with pytest.raises(CxrflowError, match="no ImageNet weights"):
        create_model("simple_cnn", 14, pretrained="imagenet")


def test_imagenet_missing_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    with pytest.raises(CxrflowError) as err:
        create_model("densenet121", 14, pretrained="imagenet", download=False)
    assert str(expected) in str(err.value) and "download" in str(err.value)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(CxrflowError) as err:
        create_model("resnet50", 14, pretrained="imagenet")
    message = str(err.value)
    assert "download failed" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    assert "\n" not in message


def test_imagenet_weights_come_from_the_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(1)
    reference = tvm.densenet121()
    # torchvision's published DenseNet file uses the old key style ("norm.1"); write it that way
    old_style = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                 for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(".norm.1." in k for k in old_style)
    torch.save(old_style, cache / "densenet121-a639ec97.pth")
    model = create_model("densenet121", 14, pretrained="imagenet", download=False)
    ref = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref if not k.startswith("classifier."))
    assert model.head.out_features == 14

    # the same torchvision-style file as --pretrained PATH: backbone loaded, old classifier ignored
    from_file = create_model("densenet121", 14, pretrained=str(cache / "densenet121-a639ec97.pth"))
    got = from_file.backbone.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref if not k.startswith("classifier."))
    assert any("ignored 2 keys" in note for note in from_file.load_notes)


def test_pretrained_path_loads_backbone_and_head_when_shapes_fit(tmp_path):
    torch.manual_seed(2)
    source = create_model("simple_cnn", 14)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    same = create_model("simple_cnn", 14, pretrained=str(path))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values()))
    other = create_model("simple_cnn", 3, pretrained=str(path))
    assert torch.equal(other.backbone.features[0].weight, source.backbone.features[0].weight)
    assert other.head.out_features == 3 and "newly initialised" in other.load_notes[-1]
    # a cxrflow checkpoint dict is accepted too
    torch.save({"model": source.state_dict(), "epoch": 1}, tmp_path / "ckpt.pt")
    again = create_model("simple_cnn", 14, pretrained=str(tmp_path / "ckpt.pt"))
    assert torch.equal(again.head.weight, source.head.weight)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(CxrflowError, match="no such weights file"):
        create_model("simple_cnn", 14, pretrained=str(tmp_path / "missing.pt"))
    torch.save(create_model("simple_cnn", 14).state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(CxrflowError) as err:
        create_model("resnet50", 14, pretrained=str(tmp_path / "cnn.pt"))
    assert "missing keys" in str(err.value) and "unexpected keys" in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CxrflowError, match="not a loadable"):
        create_model("simple_cnn", 14, pretrained=str(tmp_path / "junk.pt"))


def test_load_checkpoint_rebuilds_the_model(tmp_path):
    torch.manual_seed(3)
    model = create_model("simple_cnn", 4).eval()
    names = ["A", "B", "C", "D"]
    torch.save({"model": model.state_dict(), "config": {"model": "simple_cnn"}, "label_names": names}, tmp_path / "c.pt")
    loaded, ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["label_names"] == names and not loaded.training
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CxrflowError, match="not a cxrflow checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CxrflowError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
