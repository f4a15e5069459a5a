"""The processed-sequence layout of the text-based recommenders (UniSRec, VQ-Rec and the models
that reuse their files), read back into ordered interactions.

A folder holds, for a dataset `<name>`:
- `<name>.train.inter`, `<name>.valid.inter`, `<name>.test.inter`: RecBole-typed rows
  `user_id:token  item_id_list:token_seq  item_id:token`, a history (space-separated, often cut
  to its last 50 items) and the item that followed it. Train holds one row per train target,
  valid the train part and its next item, test the longest history and the last item.
- `<name>.text` (optional): `item_id:token  text:token_seq`, one text per item.
- `<name>.item2index` / `<name>.user2index` (optional): `original<TAB>index` lines, no header;
  the .inter files hold the indices.

Every user's whole sequence is rebuilt by chaining its rows: start from the shortest history,
then repeatedly take the row whose history is the last L items built so far (L: the longest
history in the files) and append its target. That works whether or not histories were cut, and
in any row order. Positions become timestamps (0, 1, ...). Rows that do not chain (a gap, a
contradiction) are dropped and counted; repeated (user, item) pairs inside a rebuilt sequence are
dropped by preprocessing (the last kept) and counted there as `duplicate_interaction`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import polars as pl

from pipeline.sources.base import RawSource, Report, SourceError, decode_lines
from pipeline.sources.recbole import atomic_name, parse_header

SPLITS = ("train", "valid", "test")
SEQ_FIELDS = ("user_id", "item_id_list", "item_id")

Row = tuple[tuple[str, ...], str]  # (history, target)


def _read_rows(path: Path, report: Report, what: str) -> dict[str, list[Row]]:
    """user -> its (history, target) rows of one .inter file, in file order."""
    lines = decode_lines(path.read_bytes(), "utf-8", report, what)
    if not lines:
        raise SourceError(f"{path}: {what} is empty (it starts with a header)")
    names = parse_header(lines[0], path)
    missing = [f for f in SEQ_FIELDS if f not in names]
    if missing:
        raise SourceError(f"{path}: header lacks fields {missing}; has {names}")
    iu, ih, it = (names.index(f) for f in SEQ_FIELDS)
    rows: dict[str, list[Row]] = defaultdict(list)
    bad: list[str] = []
    for line in lines[1:]:
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) != len(names) or not parts[iu].strip() or not parts[it].strip():
            bad.append(line)
            continue
        rows[parts[iu].strip()].append((tuple(parts[ih].split()), parts[it].strip()))
    report.add("unparseable_sequence_row", "dropped", len(bad), f"{what}: {bad[0] if bad else ''}")
    return rows


def rebuild(rows: list[Row], window: int) -> tuple[list[str], int]:
    """One user's ordered items from its rows; returns (sequence, rows that did not chain)."""
    if not rows:
        return [], 0
    start = min(range(len(rows)), key=lambda i: len(rows[i][0]))
    hist, target = rows[start]
    seq = [*hist, target]
    waiting: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for i, (h, t) in enumerate(rows):
        if i != start:
            waiting[h].append(t)
    left = len(rows) - 1
    while left:
        nxt = waiting.get(tuple(seq[-window:]))
        if not nxt:
            break
        seq.append(nxt.pop(0))
        left -= 1
    return seq, left


def _index_map(path: Path, report: Report, what: str) -> dict[str, str] | None:
    """index -> original id from an `original<TAB>index` file; None when absent."""
    if not path.is_file():
        return None
    out: dict[str, str] = {}
    bad: list[str] = []
    for line in decode_lines(path.read_bytes(), "utf-8", report, what):
        parts = line.rstrip("\r").split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            if line.strip():
                bad.append(line)
            continue
        out[parts[1].strip()] = parts[0].strip()
    report.add("unparseable_index_line", "dropped", len(bad), f"{what}: {bad[0] if bad else ''}")
    return out


def _texts(path: Path, item_of: dict[str, str] | None, report: Report, what: str) -> dict[str, str]:
    """item id (original when the maps say so) -> text, from `<name>.text`."""
    if not path.is_file():
        return {}
    lines = decode_lines(path.read_bytes(), "utf-8", report, what)
    start = 0
    if lines and ":token" in lines[0]:
        names = parse_header(lines[0], path)
        if names[:1] != ["item_id"]:
            raise SourceError(f"{path}: the first field must be item_id; has {names}")
        start = 1
    texts: dict[str, str] = {}
    for line in lines[start:]:
        if line.strip():
            item, _, text = line.rstrip("\r").partition("\t")
            texts[item.strip()] = text.strip()
    originals = set(item_of.values()) if item_of else set()
    if item_of and texts and not (texts.keys() & originals):  # keyed by index, not original id
        texts = {item_of.get(k, k): v for k, v in texts.items()}
    return texts


def read_seqrec(folder: Path, dataset: str | None = None, name: str | None = None) -> RawSource:
    """Read a processed-sequence folder into a RawSource (see the module docstring).

    `name` defaults to the folder's name or its only `*.train.inter`; `dataset` to `name`. The
    text of `<name>.text` becomes the item's title (as for the Office preset: one text per item).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"{folder=} is not a folder holding <name>.train/.valid/.test.inter")
    name = atomic_name(folder, name, ".train.inter")
    report = Report()
    per_user: dict[str, list[Row]] = defaultdict(list)
    found = []
    for split in SPLITS:
        path = folder / f"{name}.{split}.inter"
        if path.is_file():
            found.append(split)
            for user, rows in _read_rows(path, report, f"{name}.{split}.inter").items():
                per_user[user].extend(rows)
    if "test" not in found:
        raise SourceError(f"{folder}: {name}.test.inter not found (has {found})")
    window = max((len(h) for rows in per_user.values() for h, _ in rows), default=0)
    item_of = _index_map(folder / f"{name}.item2index", report, f"{name}.item2index")
    user_of = _index_map(folder / f"{name}.user2index", report, f"{name}.user2index")
    users: list[str] = []
    items: list[str] = []
    positions: list[int] = []
    unchained: list[str] = []
    n_unchained = 0
    for user, rows in per_user.items():
        seq, left = rebuild(rows, max(window, 1))
        uid = user_of.get(user, user) if user_of else user
        if left:
            n_unchained += left
            unchained.append(uid)
        users.extend([uid] * len(seq))
        items.extend([item_of.get(i, i) for i in seq] if item_of else seq)
        positions.extend(range(len(seq)))
    report.add(
        "unchained_sequence_row",
        "dropped",
        n_unchained,
        f"{len(unchained)} users, e.g. user {unchained[0] if unchained else ''}",
    )
    known = set(item_of.values()) if item_of is not None else set(items)
    unmapped = sorted(set(items) - known)
    report.add("item_not_in_item2index", "kept", len(unmapped), unmapped[0] if unmapped else "")
    inter = pl.DataFrame(
        {"user_id": users, "item_id": items, "ts": positions},
        schema={"user_id": pl.String, "item_id": pl.String, "ts": pl.Int64},
    ).with_columns(
        pl.lit(None, pl.Float32).alias("rating"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("row"),
    )
    texts = _texts(folder / f"{name}.text", item_of, report, f"{name}.text")
    ids = list(dict.fromkeys([*inter["item_id"].to_list(), *texts]))
    item_df = pl.DataFrame(
        {"item_id": ids, "title": [texts.get(i, "") for i in ids]},
        schema={"item_id": pl.String, "title": pl.String},
    ).with_columns(pl.lit("").alias("text"), pl.lit("").alias("categories"))
    images = pl.DataFrame(schema={"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String})
    return RawSource(dataset or name, item_df, inter, images, report, origin=str(folder.resolve()))
