"""Warehouse tables -> tensors: user sequences, the leave-one-out split, item feature stacks.

Everything is read through `features.store` at ONE warehouse snapshot (recorded by the run), so a
run can be reproduced while stages keep writing. Items are indexed densely, 1..n_items, with 0 as
padding; the text and image feature stacks are held once, as float16 `[n_items + 1, S, d]` with
a boolean mask `[n_items + 1, S]`, and looked up per batch (computation is float32).

Training samples (PAPER.md section 5: every prefix of a user's train part predicts its next item).
A sample is a window of at most `max_len` consecutive items of one user's train part; one causal
pass over it predicts the items that follow its last `stride` positions (all its positions for
the user's oldest window). So every target of the train part is predicted exactly once per epoch
with at least `max_len - stride + 1` items of context (its whole history when shorter), at about
1/stride of the sequence passes of one pass per target:
- `windows` (default): stride `window_stride`; the cut points between windows are re-drawn every
  epoch (a random shift per user, from (seed, epoch)), so a target's window varies over epochs.
- `every_prefix`: stride 1, one target per window with its full context, as the paper.
- `all_positions`: stride `max_len`, non-overlapping fixed windows (a target early in a window
  sees little context; kept for comparison).
Batches are measured in targets (`batch_size`): shuffled windows are grouped until their targets
reach it, so one step sees about the same number of targets in every mode and on every dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from features import store
from features.store import WarehouseConfig
from trainer.config import DataConfig

log = logging.getLogger(__name__)

MODALITY_VIEWS = {"text": "item_text_features", "image": "item_image_features"}


class DataError(ValueError):
    """The warehouse lacks what a run needs; the message says what to run."""


@dataclass
class FeatureStack:
    """One modality's vectors of every item, held once."""

    vectors: torch.Tensor  # [n_items + 1, S, d] float16; row 0 (padding) is zero
    mask: torch.Tensor  # [n_items + 1, S] bool; all False for padding and items without vectors

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[-1])

    @property
    def n_covered(self) -> int:
        """Items (padding excluded) with at least one vector."""
        return int(self.mask[1:].any(-1).sum())

    def to(self, device: torch.device | str) -> FeatureStack:
        return FeatureStack(self.vectors.to(device), self.mask.to(device))


@dataclass
class SeqDataset:
    """A dataset's sequences and item features at one snapshot."""

    dataset: str
    snapshot: int
    encoder_version: str | None
    tagger_version: str | None
    item_ids: list[str]  # dense index -> source item id; index 0 = "" (padding)
    user_ids: list[str]  # user index -> source user id
    offsets: np.ndarray  # [n_users + 1] int64: user u's items are items[offsets[u]:offsets[u+1]]
    items: np.ndarray  # [n_interactions] int64 dense item indices, each user in seq order
    features: dict[str, FeatureStack]  # "text" / "image" (only the modalities asked for)
    max_len: int = 50

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user_items(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def train_counts(self) -> np.ndarray:
        """[n_items + 1] interactions of each item in the train parts (last two of a user excluded)."""
        keep = np.ones(len(self.items), dtype=bool)
        ends = self.offsets[1:]
        keep[ends - 1] = False
        keep[ends - 2] = False
        return np.bincount(self.items[keep], minlength=self.n_items + 1)

    def item_index(self) -> dict[str, int]:
        return {iid: i for i, iid in enumerate(self.item_ids) if i}


# --------------------------------------------------------------------------- splits and samples


@dataclass
class EvalCases:
    """Next-item cases of one split: input sequences (left-aligned, 0-padded) and their target."""

    users: np.ndarray  # [n] user indices
    inputs: np.ndarray  # [n, max_len] int64
    lengths: np.ndarray  # [n] valid input positions
    targets: np.ndarray  # [n] int64 target item
    history_end: np.ndarray  # [n] flat index (into SeqDataset.items) where the input ends

    def __len__(self) -> int:
        return len(self.targets)


def _left_aligned(
    items: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int
) -> np.ndarray:
    """Rows items[start:end] (end - start <= max_len) left-aligned into [n, max_len], 0-padded."""
    pos = np.arange(max_len)[None, :]
    idx = starts[:, None] + pos  # [n, L]
    valid = pos < (ends - starts)[:, None]
    return np.where(valid, items[np.minimum(idx, len(items) - 1)], 0).astype(np.int64)


def eval_cases(data: SeqDataset, split: str) -> EvalCases:
    """Leave-one-out: `test` targets the last item, `valid` the second last; inputs end before."""
    if split not in ("valid", "test"):
        raise ValueError(f"{split=} is not 'valid' or 'test'")
    shift = 1 if split == "test" else 2
    target_pos = data.offsets[1:] - shift  # flat index of the target
    starts = np.maximum(data.offsets[:-1], target_pos - data.max_len)
    inputs = _left_aligned(data.items, starts, target_pos, data.max_len)
    return EvalCases(
        users=np.arange(data.n_users),
        inputs=inputs,
        lengths=(target_pos - starts).astype(np.int64),
        targets=data.items[target_pos].astype(np.int64),
        history_end=target_pos,
    )


@dataclass
class TrainSamples:
    """Training windows as flat index ranges: the inputs are items[start:end], and the window
    predicts the targets items[first_target..end] (each the item after an input position)."""

    starts: np.ndarray  # [n] int64 first input
    ends: np.ndarray  # [n] int64 flat index of the last target; end - start in 1..max_len
    first_targets: np.ndarray  # [n] int64 flat index of the first target; start < it <= end
    mode: str  # windows | all_positions | every_prefix

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def targets_each(self) -> np.ndarray:
        return self.ends - self.first_targets + 1

    @property
    def n_targets(self) -> int:
        return int(self.targets_each.sum())


def mode_stride(mode: str, max_len: int, window_stride: int) -> int:
    """Targets per window of a sample mode."""
    if mode == "every_prefix":
        return 1
    if mode == "all_positions":
        return max_len
    if mode == "windows":
        return max(1, min(window_stride, max_len))
    raise ValueError(f"sample mode {mode!r} is not windows, all_positions or every_prefix")


def train_samples(
    data: SeqDataset,
    mode: str = "windows",
    window_stride: int = 10,
    seed: int = 0,
    epoch: int = 0,
) -> TrainSamples:
    """The training windows of every user's train part (all but the last two items).

    Counting back from a user's last train target, the first window predicts its newest
    `stride - shift` targets and every further window the `stride` before; `shift` is drawn per
    user from (seed, epoch) in `windows` mode (0 otherwise). A window's inputs are the up to
    `max_len` items before its last target.
    """
    first = data.offsets[:-1]
    train_end = data.offsets[1:] - 2  # exclusive end of the train part
    n_t = np.maximum(train_end - first - 1, 0)  # targets per user: train items 1..m-1
    L, s = data.max_len, mode_stride(mode, data.max_len, window_stride)
    if mode == "windows" and s > 1:
        rng = np.random.default_rng([seed, epoch, 7])
        shift = rng.integers(0, s, size=data.n_users)
    else:
        shift = np.zeros(data.n_users, dtype=np.int64)
    head = s - shift  # targets of the newest window, 1..s
    n_w = np.where(n_t > 0, 1 + -(-np.maximum(n_t - head, 0) // s), 0)
    user = np.repeat(np.arange(data.n_users), n_w)
    k = np.arange(n_w.sum()) - np.repeat(np.cumsum(n_w) - n_w, n_w)  # window rank, newest = 0
    last = train_end[user] - 1  # flat index of the user's last train target
    end = np.where(k == 0, last, last - head[user] - (k - 1) * s)
    size = np.where(k == 0, head[user], s)
    first_target = np.maximum(end - size + 1, first[user] + 1)
    start = np.maximum(first[user], end - L)
    return TrainSamples(
        start.astype(np.int64), end.astype(np.int64), first_target.astype(np.int64), mode
    )


@dataclass
class Batch:
    """One training batch: left-aligned inputs and, per position, the item that follows (0: none)."""

    inputs: torch.Tensor  # [B, L] int64
    targets: torch.Tensor  # [B, L] int64; 0 where the position predicts nothing

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True)
        )

    @property
    def n_targets(self) -> int:
        return int((self.targets > 0).sum())


def collate(data: SeqDataset, samples: TrainSamples, idx: np.ndarray) -> Batch:
    """Samples `idx` as a Batch, [B, Lb] with Lb the longest input of the batch (<= max_len):
    trailing all-padding columns are cut, which changes nothing for left-aligned sequences."""
    starts, ends = samples.starts[idx], samples.ends[idx]
    L = int((ends - starts).max())
    inputs = _left_aligned(data.items, starts, ends, L)
    pos = np.arange(L)[None, :]
    n = (ends - starts)[:, None]
    nxt = data.items[np.minimum(starts[:, None] + pos + 1, len(data.items) - 1)]
    lo = (samples.first_targets[idx] - starts - 1)[:, None]  # first position with a target
    targets = np.where((pos < n) & (pos >= lo), nxt, 0).astype(np.int64)
    return Batch(torch.from_numpy(inputs), torch.from_numpy(targets))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled window order of an epoch; it depends only on (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).numpy()


def epoch_batches(
    samples: TrainSamples, batch_targets: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """The epoch's windows grouped into batches of about `batch_targets` targets each (a window is
    never split), in random order.

    Windows of similar length share a batch (shuffled, then sorted by length, stably), so a batch
    is padded only to about its own windows' length: on a dataset of short histories (Amazon
    Office: most windows hold < 10 items) this removes most of the padded positions a
    max_len-wide batch would compute. Which windows meet in a batch and the order of the batches
    still change every epoch. Depends only on (seed, epoch): a resumed run repeats it.
    """
    order = epoch_order(len(samples), seed, epoch)
    if len(order) == 0:
        return []
    order = order[np.argsort((samples.ends - samples.starts)[order], kind="stable")]
    cum = np.cumsum(samples.targets_each[order])
    bid = (cum - 1) // max(1, batch_targets)
    batches = np.split(order, np.flatnonzero(np.diff(bid)) + 1)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def iterate_batches(
    data: SeqDataset, samples: TrainSamples, batch_targets: int, seed: int, epoch: int
) -> Iterator[Batch]:
    """The batches of `epoch_batches`, collated."""
    for idx in epoch_batches(samples, batch_targets, seed, epoch):
        yield collate(data, samples, idx)


# --------------------------------------------------------------------------- loading


def _at(snapshot: int) -> str:
    return f" AT (VERSION => {int(snapshot)})"


def latest_version(
    con,
    view: str,
    column: str,
    kind: str,
    dataset: str,
    snapshot: int,
    where: str = "",
    params: list | None = None,
) -> str | None:
    """The `column` value present in `view` for `dataset` whose model_versions row is newest."""
    sql = (
        f"SELECT f.{column} AS v, max(m.created_at) AS created "
        f"FROM (SELECT DISTINCT {column} FROM {view}{_at(snapshot)} WHERE dataset = ? {where}) f "
        f"LEFT JOIN model_versions AS m{_at(snapshot)} ON m.version = f.{column} AND m.kind = ? "
        f"GROUP BY f.{column} ORDER BY created DESC NULLS LAST, v DESC LIMIT 1"
    )
    rows = store.query(con, sql, [dataset, *(params or []), kind]).to_pylist()
    return rows[0]["v"] if rows else None


def _stack(
    table: pa.Table, index: dict[str, int], n_items: int, max_slots: int, what: str
) -> FeatureStack:
    """Rows (item_id, vectors FLOAT[][]) -> FeatureStack; items absent from `table` stay empty."""
    table = table.filter(pc.is_in(table["item_id"], pa.array(list(index))))
    if table.num_rows == 0:
        return FeatureStack(
            torch.zeros(n_items + 1, 1, 1, dtype=torch.float16),
            torch.zeros(n_items + 1, 1, dtype=torch.bool),
        )
    vecs = table["vectors"].combine_chunks()  # list<list<float>>
    per_item = pc.list_value_length(vecs).to_numpy(zero_copy_only=False)
    inner = pc.list_flatten(vecs)  # list<float>, one per vector
    lens = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    d = int(lens[0])
    if (lens != d).any():
        bad = table["item_id"][
            int(np.repeat(np.arange(len(per_item)), per_item)[np.argmax(lens != d)])
        ]
        raise DataError(
            f"{what}: vectors of differing sizes (item_id={bad}, {sorted(set(lens.tolist()))})"
        )
    flat = pc.list_flatten(inner).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    rows = np.array([index[i] for i in table["item_id"].to_pylist()], dtype=np.int64)
    slot = np.arange(len(flat)) - np.repeat(np.cumsum(per_item) - per_item, per_item)
    row = np.repeat(rows, per_item)
    keep = slot < max_slots
    S = int(min(max_slots, per_item.max()))
    vectors = torch.zeros(n_items + 1, S, d, dtype=torch.float16)
    mask = torch.zeros(n_items + 1, S, dtype=torch.bool)
    r, s = torch.from_numpy(row[keep]), torch.from_numpy(slot[keep])
    vectors[r, s] = torch.from_numpy(flat[keep]).to(torch.float16)
    mask[r, s] = True
    return FeatureStack(vectors, mask)


def hold_out_items(
    items: np.ndarray,
    offsets: np.ndarray,
    user_ids: list[str],
    n_items: int,
    fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Remove a random `fraction` of the items (1..n_items) from every user's train part.

    The last two items of each sequence (valid and test targets) are kept, so held-out items are
    still targets there; a user left with fewer than 3 items is dropped. Returns the new
    (items, offsets, user_ids).
    """
    rng = np.random.default_rng(seed)
    n_hold = int(round(fraction * n_items))
    held = np.zeros(n_items + 1, dtype=bool)
    held[rng.choice(np.arange(1, n_items + 1), n_hold, replace=False)] = True
    lens = np.diff(offsets)
    user = np.repeat(np.arange(len(lens)), lens)
    pos = np.arange(len(items)) - offsets[user]
    keep = ~(held[items] & (pos < lens[user] - 2))
    new_lens = np.bincount(user[keep], minlength=len(lens))
    ok_user = new_lens >= 3
    keep &= ok_user[user]
    new_lens = new_lens[ok_user]
    return (
        items[keep],
        np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64),
        [u for u, ok in zip(user_ids, ok_user, strict=True) if ok],
    )


def load_dataset(
    cfg: DataConfig, wh: WarehouseConfig | None = None, modalities: str | None = "both"
) -> SeqDataset:
    """Read `cfg.dataset` at one snapshot into a SeqDataset (sequences + the asked modalities)."""
    if modalities is None:  # an ID-only model (SASRec): sequences only
        want: tuple[str, ...] = ()
    else:
        want = ("text", "image") if modalities == "both" else (modalities,)
    with store.connect(wh, create=False, read_only=True) as con:
        snap = cfg.snapshot if cfg.snapshot is not None else store.snapshot_id(con)
        # Dense indices are assigned in SQL: only integers cross into Python.
        base = f"SELECT user_id, item_id, seq FROM interactions{_at(snap)} WHERE dataset = ?"
        item_ids = [
            r[0]
            for r in con.execute(
                f"SELECT DISTINCT item_id FROM ({base}) ORDER BY 1", [cfg.dataset]
            ).fetchall()
        ]
        if not item_ids:
            known = [
                r[0]
                for r in con.execute(
                    f"SELECT DISTINCT dataset FROM interactions{_at(snap)}"
                ).fetchall()
            ]
            raise DataError(
                f"no interactions for dataset={cfg.dataset!r} at snapshot {snap} (datasets there: "
                f"{known}); run `msm4sr ingest ...` first"
            )
        user_ids = [
            r[0]
            for r in con.execute(
                f"SELECT DISTINCT user_id FROM ({base}) ORDER BY 1", [cfg.dataset]
            ).fetchall()
        ]
        inter = store.query(
            con,
            f"WITH x AS ({base}), "
            "it AS (SELECT item_id, (row_number() OVER (ORDER BY item_id))::BIGINT AS i FROM (SELECT DISTINCT item_id FROM x)), "
            "us AS (SELECT user_id, (row_number() OVER (ORDER BY user_id) - 1)::BIGINT AS u FROM (SELECT DISTINCT user_id FROM x)) "
            "SELECT us.u, it.i FROM x JOIN it USING (item_id) JOIN us USING (user_id) ORDER BY us.u, x.seq, x.item_id",
            [cfg.dataset],
        )
        users = inter["u"].to_numpy()
        items = inter["i"].to_numpy().astype(np.int64)
        index = {iid: i + 1 for i, iid in enumerate(item_ids)}
        counts = np.bincount(users, minlength=len(user_ids))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        del inter, users
        if cfg.holdout_items > 0:
            items, offsets, user_ids = hold_out_items(
                items, offsets, user_ids, len(item_ids), cfg.holdout_items, cfg.holdout_seed
            )
        lens = np.diff(offsets)
        if (lens < 3).any():
            short = user_ids[int(np.argmax(lens < 3))]
            raise DataError(
                f"user {short!r} of {cfg.dataset!r} has fewer than 3 interactions: leave-one-out needs "
                f"train + valid + test; the ingest keeps users with >= 5"
            )

        enc = cfg.encoder_version
        if enc is None and want:
            enc = latest_version(
                con, "item_text_features", "encoder_version", "encoder", cfg.dataset, snap
            )
            if enc is None and "text" not in want:
                enc = latest_version(
                    con, "item_image_features", "encoder_version", "encoder", cfg.dataset, snap
                )
        tagger = cfg.tagger_version
        if tagger is None and "image" in want and enc is not None:
            tagger = latest_version(
                con,
                "item_image_features",
                "tagger_version",
                "tagger",
                cfg.dataset,
                snap,
                "AND encoder_version = ?",
                [enc],
            )

        features: dict[str, FeatureStack] = {}
        n = len(item_ids)
        for m in want:
            view = MODALITY_VIEWS[m]
            if m == "text" or tagger is not None:
                sql = f"SELECT item_id, vectors FROM {view}{_at(snap)} WHERE dataset = ? AND encoder_version = ?"
                params: list = [cfg.dataset, enc]
                if m == "image":
                    sql += " AND tagger_version = ?"
                    params.append(tagger)
                rows = store.query(con, sql, params)
            else:
                rows = pa.table(
                    {
                        "item_id": pa.array([], pa.string()),
                        "vectors": pa.array([], pa.list_(pa.list_(pa.float32()))),
                    }
                )
            stack = _stack(rows, index, n, cfg.max_slots, f"{view} of {cfg.dataset!r}")
            if m == "text" and stack.n_covered == 0:
                raise DataError(
                    f"no text vectors for dataset={cfg.dataset!r}, encoder_version={enc!r} at snapshot {snap}: "
                    f"run the embedding stage (pipeline.embedding.embed_dataset) first"
                )
            if m == "image" and stack.n_covered == 0:
                log.warning(
                    "%s has no image vectors: the image modality is empty (zeros, all masked)",
                    cfg.dataset,
                )
            features[m] = stack
    # One modality may be empty (e.g. no images): its stack then gets the other's width.
    dims = {s.dim for s in features.values() if s.n_covered}
    if len(dims) > 1:
        raise DataError(
            f"text and image vectors differ in size {sorted(dims)}: use one encoder_version"
        )
    d = dims.pop() if dims else 1
    for m, s in features.items():
        if s.dim != d:
            features[m] = FeatureStack(
                torch.zeros(n + 1, 1, d, dtype=torch.float16), s.mask[:, :1] & False
            )
    return SeqDataset(
        dataset=cfg.dataset,
        snapshot=int(snap),
        encoder_version=enc,
        tagger_version=tagger if "image" in want else None,
        item_ids=["", *item_ids],
        user_ids=user_ids,
        offsets=offsets,
        items=items,
        features=features,
        max_len=cfg.max_len,
    )


def item_titles(
    wh: WarehouseConfig | None, dataset: str, snapshot: int, item_ids: list[str]
) -> dict[str, str]:
    """item_id -> title for the given items (read at `snapshot`)."""
    with store.connect(wh, create=False, read_only=True) as con:
        rows = store.query(
            con,
            f"SELECT item_id, title FROM items{_at(snapshot)} WHERE dataset = ? "
            "AND item_id IN (SELECT unnest(?::VARCHAR[]))",
            [dataset, item_ids],
        ).to_pylist()
    return {r["item_id"]: r["title"] for r in rows}
