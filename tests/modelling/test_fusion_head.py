"""The fused model's demographic term (cxrflow.modelling.fusion): shape, gradients, unknown fields,
its start from a logistic-regression fit on the training split, and its own optimiser group."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cxrflow.data.demographics import encode
from cxrflow.metrics import per_class_auc
from cxrflow.modelling.fusion import (
    FUSION_LR_FACTOR,
    DemographicLogits,
    design,
    fit_logistic,
    init_from_store,
    logistic_scores,
    param_groups,
    read_split_demographics,
    standardisation,
)
from cxrflow.modelling.models import create_model, load_checkpoint
from cxrflow.testing.synthstore import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shape_and_gradients_of_every_parameter():
    term = DemographicLogits(4)
    d = torch.tensor(encode([(63, "F", "AP"), (30, "M", "PA"), (None, None, None)]))
    out = term(d)
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert term.weight.grad.abs().sum() > 0 and term.bias.grad.abs().sum() > 0
    assert {n for n, _ in term.named_buffers()} == {"center", "scale"}  # the standardisation is saved with it
    with pytest.raises(ValueError, match=r"expected demographics \[N, 3\]"):
        term(torch.zeros(2, 4))


def test_unknown_field_gives_its_flag_only():
    """An unknown age is (value 0, flag 0): whatever weight the age value has, the output is the same."""
    term = DemographicLogits(2)
    unknown_age = torch.tensor(encode([(None, "F", "AP")]))
    before = term(unknown_age).detach()
    with torch.no_grad():
        term.weight[:, 0] += 100.0
    assert torch.equal(term(unknown_age).detach(), before)
    assert not torch.allclose(term(torch.tensor(encode([(70, "F", "AP")]))).detach(), before)
    np.testing.assert_allclose(term.features(unknown_age)[0].tolist(), [0, 1, 1, 0, 1, 1], atol=1e-6)


def test_standardisation_by_hand_and_a_missing_field():
    d = encode([(20, "M", None), (40, "F", None), (60, "F", None)])
    center, scale, missing = standardisation(d)
    assert center[0] == pytest.approx(0.4) and scale[0] == pytest.approx(math.sqrt(2 / 3) * 0.2)
    assert center[1] == pytest.approx(2 / 3) and missing == ["view"]
    x = design(d, center, scale)
    np.testing.assert_allclose(x[:, 0], [-math.sqrt(1.5), 0, math.sqrt(1.5)], atol=1e-6)
    assert (x[:, 2] == 0).all() and (x[:, 5] == 0).all() and (x[:, 3] == 1).all()


def _demographic_sample(n: int, seed: int):
    rng = np.random.default_rng(seed)
    age = rng.integers(20, 90, n)
    male = rng.random(n) < 0.5
    ap = rng.random(n) < 0.4
    logit = -1 + 0.08 * (age - 55) + 1.5 * male - 1.0 * ap
    labels = np.stack([rng.random(n) < 1 / (1 + np.exp(-logit)), rng.random(n) < 0.3], axis=1).astype(np.uint8)
    rows = [(float(a), "M" if m else "F", "AP" if v else "PA") for a, m, v in zip(age, male, ap)]
    return encode(rows), labels


def test_fit_matches_scikit_learn_and_the_module_reproduces_it():
    from sklearn.linear_model import LogisticRegression

    d, labels = _demographic_sample(2000, 0)
    fit = fit_logistic(d, labels)
    x = design(d, fit["center"], fit["scale"])
    ref = LogisticRegression(max_iter=1000).fit(x, labels[:, 0]).decision_function(x)
    np.testing.assert_allclose(logistic_scores(fit, d)[:, 0], ref, atol=1e-4)
    term = DemographicLogits(2)
    term.load_fit(fit)
    np.testing.assert_allclose(term(torch.tensor(d)).detach().numpy()[:, 0], ref, atol=1e-3)
    test_d, test_labels = _demographic_sample(2000, 1)
    auc = per_class_auc(test_labels, logistic_scores(fit, test_d))
    assert auc[0] > 0.8 and abs(auc[1] - 0.5) < 0.05  # the signal where there is one, none where there is none


def test_init_from_store_is_the_training_split_fit_shifted_by_log_pos_weight(tmp_path):
    write_synthetic_store(tmp_path / "s", rows={"train": 96, "val": 16, "test": 16})
    model = create_model("simple_cnn", 14, fusion="demographics")
    note = init_from_store(model, tmp_path / "s", 32, pos_weight=[4.0] * 14)
    assert note.startswith("demographic term fitted by logistic regression on 96 training images")
    names = [str(n) for n in range(14)]
    rows = read_split_demographics(tmp_path / "s", 32, "train", names)
    fit = fit_logistic(rows["demographics"], rows["labels"], rows["known"])
    np.testing.assert_allclose(model.fusion.weight.detach().numpy(), fit["weight"], atol=1e-5)
    np.testing.assert_allclose(model.fusion.bias.detach().numpy(), fit["bias"] + math.log(4.0), atol=1e-5)
    np.testing.assert_allclose(model.fusion.center.numpy(), fit["center"], atol=1e-6)
    # the fit travels in the checkpoint
    torch.save(
        {
            "model": model.state_dict(),
            "config": {"model": "simple_cnn", "fusion": "demographics"},
            "label_names": names,
        },
        tmp_path / "c.pt",
    )
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded.fusion.center, model.fusion.center) and torch.equal(loaded.fusion.bias, model.fusion.bias)


def test_a_field_the_store_lacks_is_left_out(tmp_path):
    write_synthetic_store(tmp_path / "s", rows={"train": 64, "val": 16, "test": 16})
    for part in (tmp_path / "s" / "size=32" / "split=train").glob("*.parquet"):
        table = pq.read_table(part)
        ages = pa.nulls(table.num_rows, pa.int16())
        pq.write_table(table.set_column(table.schema.get_field_index("age"), "age", ages), part)
    model = create_model("simple_cnn", 14, fusion="demographics")
    note = init_from_store(model, tmp_path / "s", 32)
    assert note.endswith("no known age in the training split (left out)")
    assert model.fusion.weight[:, [0, 3]].abs().max() == 0  # constant features get no weight


def test_own_group_without_weight_decay_in_every_stage():
    model = create_model("resnet50", 3, fusion="demographics")
    model.freeze_backbone(True)  # the knowledge-transfer stage: the term trains there too
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in model.fusion.parameters()} <= {id(p) for p in params}
    groups = param_groups(model, params, 1e-3, 1e-4)
    assert [len(g["params"]) for g in groups] == [2, 2]
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["lr"] == pytest.approx(1e-3 * FUSION_LR_FACTOR)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.fusion.parameters()}
    plain = create_model("simple_cnn", 3)
    assert len(param_groups(plain, list(plain.parameters()), 1e-3, 0.0)) == 1
