"""Batches mixing several stores: shares of each store, every row once, labels widened and masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrflow.data.labels import LabelVocabulary
from cxrflow.data.loader import make_loader
from cxrflow.data.mixing import MixedLoader, mix_counts, slot_order, widen
from cxrflow.data.storeset import open_stores
from cxrflow.data.uncertain import masked_bce
from cxrflow.testing.synthstore import write_synthetic_store

A = LabelVocabulary(("Atelectasis", "Effusion", "Mass"))
B = LabelVocabulary(("Pleural Effusion", "Edema"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    write_synthetic_store(root / "a", sizes=(32,), rows={"train": 90, "val": 8}, vocab=A, seed=1, rows_per_file=32)
    write_synthetic_store(root / "b", sizes=(32,), rows={"train": 30, "val": 8}, vocab=B, seed=2, rows_per_file=32)
    return open_stores([root / "a", root / "b"], 32)


def _mixed(stores, weights, *, epoch=0, batch_size=8, drop_last=False):
    loaders = [make_loader(s.path, 32, "train", batch_size=batch_size, seed=3, epoch=epoch) for s in stores.stores]
    return MixedLoader(loaders, [s.model_index for s in stores.stores], len(stores.label_names), weights=weights,
                       batch_size=batch_size, drop_last=drop_last, seed=3, epoch=epoch)  # fmt: skip


def test_counts_follow_rows_times_weights_and_sum_to_the_total():
    assert mix_counts([90, 30], [1, 1], 120) == [90, 30]
    assert mix_counts([90, 30], [1, 3], 120) == [60, 60]
    assert mix_counts([1, 1, 1], [1, 1, 1], 2) == [1, 1, 0]  # largest remainder, ties to the earlier store


def test_slot_order_is_a_seeded_shuffle_of_the_counts():
    slots = slot_order([5, 3], seed=1, epoch=2)
    assert np.bincount(slots).tolist() == [5, 3]
    assert np.array_equal(slots, slot_order([5, 3], seed=1, epoch=2))
    assert not all(np.array_equal(slots, slot_order([5, 3], seed=1, epoch=e)) for e in range(3, 8))


def test_widen_puts_labels_in_the_model_columns_and_masks_the_rest():
    batch = {"labels": torch.tensor([[1.0, 0.0]]), "known": torch.tensor([[1.0, 0.0]])}
    out = widen(batch, [1, 3], 4)
    assert out["labels"].tolist() == [[0, 1, 0, 0]] and out["known"].tolist() == [[0, 1, 0, 0]]


def test_a_finding_a_store_does_not_label_gets_no_loss_and_no_gradient():
    batch = widen({"labels": torch.tensor([[1.0], [0.0]]), "known": torch.ones(2, 1)}, [0], 2)
    logits = torch.tensor([[0.3, -2.0], [0.1, 5.0]], requires_grad=True)
    loss = masked_bce(logits, batch["labels"], batch["known"], torch.tensor([2.0, 9.0]))
    loss.backward()
    assert logits.grad[:, 1].abs().sum() == 0 and logits.grad[:, 0].abs().sum() > 0
    alone = masked_bce(logits[:, :1].detach(), batch["labels"][:, :1], batch["known"][:, :1], torch.tensor([2.0]))
    assert float(loss.detach()) == pytest.approx(float(alone))  # the masked column adds nothing either


def test_an_epoch_yields_every_row_of_every_store_once_in_mixed_batches(stores):
    loader = _mixed(stores, [1.0, 1.0])
    batches = list(loader)
    assert len(batches) == len(loader) == 15
    # both stores name their rows train_000000.png...; a row of store b is one that knows Edema
    rows = [(bool(k), i) for b in batches for k, i in zip(b["known"][:, 3].tolist(), b["image_id"])]
    assert len(set(rows)) == len(rows) == 120  # 90 + 30 rows, none twice
    from_b = [sum(1 for k in b["known"][:, 3].tolist() if k) for b in batches]
    assert sum(from_b) == 30 and sum(1 for n in from_b if 0 < n < 8) >= 10  # mixed within batches
    for b in batches:  # store b's rows know Effusion and Edema only, store a's never Edema
        rows_b = b["known"][:, 3] == 1
        assert (b["known"][rows_b][:, [0, 2]] == 0).all() and (b["known"][~rows_b][:, 3] == 0).all()
        assert b["labels"].shape == (b["image"].shape[0], 4)


def test_store_weights_change_each_store_share(stores):
    loader = _mixed(stores, [1.0, 3.0], epoch=1)
    from_b = sum(int((b["known"][:, 3] == 1).sum()) for b in loader)
    assert loader.counts == [60, 60] and from_b == 60  # store b's 30 rows drawn twice (a second shuffle)


def test_drop_last_yields_only_whole_batches(stores):
    loader = _mixed(stores, [1.0, 1.0], batch_size=7, drop_last=True)
    assert [b["image"].shape[0] for b in loader] == [7] * 17


def _with_label_states(store, seed: int = 5) -> dict:
    """Give a synthetic store CheXpert-like label states (20% uncertain, 10% not mentioned) and the
    manifest's label_counts; returns the states by image id."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrflow.data.store import KNOWN_COLUMN, schema_for
    from cxrflow.data.uncertain import KNOWN, POLICIES, UNCERTAIN, UNMENTIONED, label_counts

    rng = np.random.default_rng(seed)
    manifest = json.loads((store / "_manifest.json").read_text())
    names, by_id, train = manifest["label_names"], {}, ([], [])
    for part in sorted(store.rglob("*.parquet")):
        table = pq.read_table(part)
        lab = np.array(table.column("labels").to_pylist(), dtype=np.uint8)
        draw = rng.random(lab.shape)
        states = np.where(draw < 0.1, UNMENTIONED, np.where(draw < 0.3, UNCERTAIN, KNOWN)).astype(np.uint8)
        column = pa.array([list(map(int, r)) for r in states], pa.list_(pa.uint8()))
        table = table.add_column(table.schema.get_field_index("labels") + 1, KNOWN_COLUMN, column)
        pq.write_table(table.cast(schema_for(True)), part)
        by_id.update(zip(table.column("image_id").to_pylist(), states))
        if "split=train" in str(part):
            train[0].append(lab), train[1].append(states)
    counts = label_counts(np.concatenate(train[0]), np.concatenate(train[1]), names)
    manifest.update(label_counts=counts, uncertain_policies=list(POLICIES))
    (store / "_manifest.json").write_text(json.dumps(manifest))
    return by_id


def test_a_store_with_label_states_follows_the_uncertain_policy_inside_mixed_batches(tmp_path):
    from cxrflow.data.uncertain import KNOWN, UNCERTAIN

    write_synthetic_store(tmp_path / "a", sizes=(32,), rows={"train": 24, "val": 8}, vocab=A, seed=1)
    write_synthetic_store(tmp_path / "b", sizes=(32,), rows={"train": 24, "val": 8}, vocab=B, seed=2)
    states = _with_label_states(tmp_path / "b")
    stores = open_stores([tmp_path / "a", tmp_path / "b"], 32)
    for policy in ("ignore", "ones"):
        loaders = [make_loader(s.path, 32, "train", batch_size=8, seed=3, uncertain=policy) for s in stores.stores]
        mixed = MixedLoader(loaders, [s.model_index for s in stores.stores], 4, weights=[1, 1], batch_size=8,
                            drop_last=False, seed=3, epoch=0)  # fmt: skip
        seen = 0
        for batch in mixed:
            for i, row_known, row_labels in zip(batch["image_id"], batch["known"], batch["labels"]):
                if row_known[0] or row_known[2]:  # a row of store a: Atelectasis or Mass known
                    continue
                s = states[i]  # store b's findings: Pleural Effusion -> model 1, Edema -> model 3
                want = (s == KNOWN) | ((s == UNCERTAIN) & (policy == "ones"))
                assert row_known[[1, 3]].tolist() == want.astype(float).tolist()
                if policy == "ones":  # U-Ones: an uncertain label is a known positive
                    assert (row_labels[[1, 3]][torch.from_numpy(s == UNCERTAIN)] == 1).all()
                seen += 1
        assert seen == 24
