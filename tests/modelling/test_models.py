"""Models built by name: shape, finiteness, which parameters train, frozen BatchNorm, weight loading."""

from __future__ import annotations

import hashlib
import re
import urllib.error

import pytest
import torch
from torchvision import models as tvm

from cxrflow.errors import CxrflowError
from cxrflow.modelling import models
from cxrflow.modelling.models import MODEL_NAMES, ChestClassifier, count_parameters, create_model, load_checkpoint

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

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
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
    old_style = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert any(".norm.1." in k for k in old_style)
    # a file whose name carries its own sha256 prefix, as torchvision's do (the real one is 30 MB)
    torch.save(old_style, cache / "densenet121.pth")
    prefix = hashlib.sha256((cache / "densenet121.pth").read_bytes()).hexdigest()[:8]
    cached = cache / f"densenet121-{prefix}.pth"
    (cache / "densenet121.pth").rename(cached)
    monkeypatch.setattr(models, "_weights_cache_file", lambda weights: cached)
    model = create_model("densenet121", 14, pretrained="imagenet", download=False)
    ref = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref if not k.startswith("classifier."))
    assert model.head.out_features == 14

    # the same torchvision-style file as --pretrained PATH: backbone loaded, old classifier ignored
    from_file = create_model("densenet121", 14, pretrained=str(cached))
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
    torch.save(
        {"model": model.state_dict(), "config": {"model": "simple_cnn"}, "label_names": names}, tmp_path / "c.pt"
    )
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


def test_planted_pickle_in_the_weights_cache_is_refused_and_never_run(tmp_path, monkeypatch):
    import pickle

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    # under torchvision's own file name: the hash in the name does not match
    (cache / "densenet121-a639ec97.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CxrflowError, match="does not match the hash in its name"):
        create_model("densenet121", 14, pretrained="imagenet", download=False)
    # with a name that matches its hash: read with weights_only, so the pickle is refused unrun
    data = pickle.dumps({"x": Evil()})
    planted = cache / f"evil-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    planted.write_bytes(data)
    with pytest.raises(CxrflowError, match="not a plain state dict"):
        models.load_cached_weights(planted)
    assert not canary.exists()


def test_checkpoint_of_the_wrong_shape_names_the_field_or_the_layers(tmp_path):
    model = create_model("simple_cnn", 4)
    good = {"model": model.state_dict(), "config": {"model": "simple_cnn", "size": 32}, "label_names": list("ABCD")}
    cases = {
        "config": ({**good, "config": []}, "'config' must be a mapping"),
        "model": ({**good, "config": {"model": "vgg", "size": 32}}, "'config.model' must be one of"),
        "size": ({**good, "config": {"model": "simple_cnn", "size": 0}}, "'config.size' must be a positive integer"),
        "names": ({**good, "label_names": "ABCD"}, "'label_names' must be a non-empty list"),
        "std": ({**good, "config": {"model": "simple_cnn", "size": 32, "pixel_std": 0.0}}, "'config.pixel_std'"),
        "head": (
            {**good, "label_names": list("ABC")},
            r"2 wrong shape \(head.bias \(4,\) vs \(3,\), head.weight \(4, 2048\) vs \(3, 2048\)\)",
        ),
    }
    for name, (ckpt, message) in cases.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
        with pytest.raises(CxrflowError, match=message) as err:
            load_checkpoint(tmp_path / f"{name}.pt")
        assert "\n" not in str(err.value) and str(tmp_path / f"{name}.pt") in str(err.value)
