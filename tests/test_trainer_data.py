"""trainer/data.py: leave-one-out split and training samples by hand; loading from a real warehouse."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from features import store
from tests.trainer_fixtures import ML_CUT, OFFICE_CUT, built_warehouse, warehouse_copy
from trainer.config import DataConfig
from trainer.data import (
    DataError,
    FeatureStack,
    SeqDataset,
    collate,
    eval_cases,
    iterate_batches,
    load_dataset,
    train_samples,
)

# ------------------------------------------------------------------ hand-built sequences


def _toy(max_len: int = 3) -> SeqDataset:
    # user 0: items 1..9 (train 1..7, valid 8, test 9); user 1: 11, 12, 13, 14 (train 11, 12).
    seqs = [np.arange(1, 10), np.array([11, 12, 13, 14])]
    items = np.concatenate(seqs)
    offsets = np.array([0, 9, 13])
    empty = FeatureStack(
        torch.zeros(15, 1, 2, dtype=torch.float16), torch.zeros(15, 1, dtype=torch.bool)
    )
    return SeqDataset(
        "toy",
        0,
        None,
        None,
        [""] + [str(i) for i in range(1, 15)],
        ["a", "b"],
        offsets,
        items,
        {"text": empty},
        max_len,
    )


def test_leave_one_out_cases_by_hand() -> None:
    d = _toy()
    v, t = eval_cases(d, "valid"), eval_cases(d, "test")
    assert v.targets.tolist() == [8, 13] and t.targets.tolist() == [9, 14]
    assert v.inputs.tolist() == [[5, 6, 7], [11, 12, 0]] and v.lengths.tolist() == [3, 2]
    assert t.inputs.tolist() == [[6, 7, 8], [11, 12, 13]] and t.lengths.tolist() == [3, 3]
    assert d.train_counts().tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0]


def test_all_positions_windows_cover_every_prefix_target_once() -> None:
    d = _toy()
    ap, ep = train_samples(d, "all_positions"), train_samples(d, "every_prefix")
    b_ap = collate(d, ap, np.arange(len(ap)))
    b_ep = collate(d, ep, np.argsort(ep.ends, kind="stable"))  # oldest target first
    # user 0: train 1..7 -> windows [4,5,6] -> [5,6,7] and [1,2,3] -> [2,3,4]; user 1: [11] -> [12].
    assert b_ap.inputs.tolist() == [[4, 5, 6], [1, 2, 3], [11, 0, 0]]
    assert b_ap.targets.tolist() == [[5, 6, 7], [2, 3, 4], [12, 0, 0]]
    # every prefix: one target at the last valid position, the last <= 3 items as input.
    assert b_ep.inputs[:3].tolist() == [[1, 0, 0], [1, 2, 0], [1, 2, 3]]
    assert b_ep.inputs[5].tolist() == [4, 5, 6] and b_ep.targets[5].tolist() == [0, 0, 7]
    assert ap.n_targets == ep.n_targets == 7
    assert Counter(b_ap.targets[b_ap.targets > 0].tolist()) == Counter(
        b_ep.targets[b_ep.targets > 0].tolist()
    )


def test_overlapping_windows_give_each_target_its_context_once_per_epoch() -> None:
    """windows mode, stride 2 on max_len 3: every train target is predicted exactly once per
    epoch and sees >= max_len - stride + 1 = 2 items (or its whole history); the cut points
    move between epochs and repeat for the same (seed, epoch)."""
    d = _toy()
    flat_first = d.offsets[:-1]
    seen_layouts = set()
    for epoch in range(1, 6):
        s = train_samples(d, "windows", window_stride=2, seed=7, epoch=epoch)
        b = collate(d, s, np.arange(len(s)))
        targets = b.targets[b.targets > 0].tolist()
        assert sorted(targets) == [2, 3, 4, 5, 6, 7, 12]
        for row in range(len(s)):
            for pos in np.flatnonzero(b.targets[row].numpy() > 0):
                context = pos + 1  # inputs 0..pos precede the target
                target_flat = s.starts[row] + pos + 1
                user = int(np.searchsorted(flat_first, target_flat, side="right") - 1)
                assert context >= min(2, target_flat - flat_first[user])
        assert s.n_targets == 7
        again = train_samples(d, "windows", window_stride=2, seed=7, epoch=epoch)
        assert again.ends.tolist() == s.ends.tolist()
        seen_layouts.add(tuple(s.ends.tolist()))
    assert len(seen_layouts) > 1  # re-drawn


def test_batches_are_measured_in_targets() -> None:
    d = _toy()
    s = train_samples(d, "all_positions")  # windows of 3, 3 and 1 targets
    sizes = [b.n_targets for b in iterate_batches(d, s, 4, seed=1, epoch=1)]
    assert sum(sizes) == 7 and all(n >= 3 for n in sizes[:-1])
    assert len(list(iterate_batches(d, s, 1, seed=1, epoch=1))) == 3  # a window is never split
    assert len(list(iterate_batches(d, s, 100, seed=1, epoch=1))) == 1


def test_batches_depend_only_on_seed_and_epoch() -> None:
    d = _toy(max_len=2)
    s = train_samples(d, "every_prefix")

    def order(seed: int, epoch: int) -> list:
        return [b.inputs.tolist() for b in iterate_batches(d, s, 2, seed, epoch)]

    assert order(1, 3) == order(1, 3)
    assert order(1, 3) != order(1, 4)


# ------------------------------------------------------------------ real warehouse


@pytest.fixture(scope="module")
def wh_ro():
    from features.store import WarehouseConfig

    return WarehouseConfig(root=built_warehouse(), attach=None, data_path=None)


def test_sequences_and_dense_index_follow_the_tables(wh_ro) -> None:
    d = load_dataset(DataConfig(dataset=ML_CUT), wh_ro)
    with store.connect(wh_ro, create=False, read_only=True) as con:
        inter = store.query(
            con,
            "SELECT user_id, item_id, seq FROM interactions WHERE dataset = ? ORDER BY user_id, seq",
            [ML_CUT],
        ).to_pylist()
        snap = store.snapshot_id(con)
    assert d.snapshot == snap
    assert d.item_ids[0] == "" and d.item_ids[1:] == sorted({r["item_id"] for r in inter})
    assert len(d.items) == len(inter) and d.n_users == len({r["user_id"] for r in inter})
    u = d.user_ids.index(inter[0]["user_id"])
    want = [r["item_id"] for r in inter if r["user_id"] == inter[0]["user_id"]]
    assert [d.item_ids[i] for i in d.user_items(u)] == want
    assert d.items.min() >= 1 and d.items.max() == d.n_items


def test_feature_stacks_hold_the_view_vectors(wh_ro) -> None:
    d = load_dataset(DataConfig(dataset=ML_CUT), wh_ro)
    with store.connect(wh_ro, create=False, read_only=True) as con:
        versions = {
            r["kind"]: r["version"]
            for r in store.query(con, "SELECT kind, version FROM model_versions").to_pylist()
        }
        text = store.query(
            con,
            "SELECT item_id, vectors, n FROM item_text_features WHERE dataset = ? AND encoder_version = ?",
            [ML_CUT, versions["encoder"]],
        ).to_pylist()
        image = store.query(
            con, "SELECT item_id, vectors, n FROM item_image_features WHERE dataset = ?", [ML_CUT]
        ).to_pylist()
    assert d.encoder_version == versions["encoder"] and d.tagger_version == versions["tagger"]
    idx = d.item_index()
    for name, rows in (("text", text), ("image", image)):
        stack = d.features[name]
        assert stack.dim == 384 and stack.vectors.dtype == torch.float16
        assert stack.mask[0].sum() == 0 and stack.vectors[0].abs().sum() == 0  # padding row
        rows = [
            r for r in rows if r["item_id"] in idx
        ]  # items without interactions are not indexed
        assert len(rows) >= 20
        for r in rows[:20]:
            i = idx[r["item_id"]]
            assert int(stack.mask[i].sum()) == min(r["n"], 10)
            got = stack.vectors[i, : r["n"]].float()
            assert torch.allclose(got, torch.tensor(r["vectors"]), atol=1e-3)
            # Real MiniLM vectors: unit length.
            assert torch.allclose(got.norm(dim=-1), torch.ones(r["n"]), atol=1e-2)
    assert d.features["text"].n_covered == d.n_items  # every item has a title
    assert d.features["image"].n_covered >= d.n_items - 5  # almost every movie has a poster


def test_text_only_dataset_has_an_empty_image_modality(wh_ro) -> None:
    d = load_dataset(DataConfig(dataset=OFFICE_CUT), wh_ro)
    assert d.tagger_version is None
    img = d.features["image"]
    assert not img.mask.any() and img.dim == d.features["text"].dim
    assert d.features["text"].n_covered == d.n_items


def test_unknown_dataset_or_version_names_the_value(wh_ro) -> None:
    with pytest.raises(DataError, match="no interactions for dataset='nope'"):
        load_dataset(DataConfig(dataset="nope"), wh_ro)
    with pytest.raises(DataError, match="encoder_version='deadbeef'"):
        load_dataset(DataConfig(dataset=ML_CUT, encoder_version="deadbeef"), wh_ro)


def test_reads_at_the_recorded_snapshot(tmp_path: Path) -> None:
    wh = warehouse_copy(tmp_path / "wh")
    before = load_dataset(DataConfig(dataset=ML_CUT), wh)
    with store.connect(wh) as con:
        rows = store.read_table(
            con, "interactions", where="dataset = ?", params=[ML_CUT]
        ).to_pylist()
        first = [r for r in rows if r["user_id"] == rows[0]["user_id"]]
        new = [dict(r, user_id="new-user") for r in first]
        store.upsert(con, "interactions", pa.Table.from_pylist(new))
    pinned = load_dataset(DataConfig(dataset=ML_CUT, snapshot=before.snapshot), wh)
    latest = load_dataset(DataConfig(dataset=ML_CUT), wh)
    assert pinned.n_users == before.n_users and np.array_equal(pinned.items, before.items)
    assert latest.n_users == before.n_users + 1 and latest.snapshot > before.snapshot
