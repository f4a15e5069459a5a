"""The processed-sequence layout (UniSRec / VQ-Rec files) read back into ordered interactions:
hand-written files with cut histories, repeats and gaps, and a real MovieLens cut written the
way UniSRec's preprocessing writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.store import WarehouseConfig
from pipeline.ingest import ingest
from pipeline.sources import read_source
from pipeline.sources.base import SourceError
from pipeline.sources.seqrec import read_seqrec, rebuild
from tests.ml_cut import write_ml_cut
from tests.test_recbole import sequences

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"


def write_seqrec(
    folder: Path,
    name: str,
    seqs: dict[str, list[str]],
    window: int = 50,
    texts: dict[str, str] | None = None,
    reverse_train: bool = True,
) -> Path:
    """Files as UniSRec's process_amazon.py writes them: 0-based indices, train rows for every
    target but the first (last target first), histories cut to `window`, index maps, `.text`."""
    user2index = {u: i for i, u in enumerate(seqs)}
    item2index: dict[str, int] = {}
    for s in seqs.values():
        for it in s:
            item2index.setdefault(it, len(item2index))
    train, valid, test = [HEADER], [HEADER], [HEADER]
    for u, s in seqs.items():
        idx = [str(item2index[i]) for i in s]
        uid = user2index[u]
        part = idx[:-2]
        for t in sorted(range(1, len(part)), reverse=reverse_train):
            train.append(f"{uid}\t{' '.join(part[:t][-window:])}\t{part[t]}")
        valid.append(f"{uid}\t{' '.join(part[-window:])}\t{idx[-2]}")
        test.append(f"{uid}\t{' '.join(idx[:-1][-window:])}\t{idx[-1]}")
    d = folder / name
    d.mkdir(parents=True)
    for split, lines in (("train", train), ("valid", valid), ("test", test)):
        (d / f"{name}.{split}.inter").write_text("\n".join(lines) + "\n")
    (d / f"{name}.user2index").write_text("".join(f"{u}\t{i}\n" for u, i in user2index.items()))
    (d / f"{name}.item2index").write_text("".join(f"{t}\t{i}\n" for t, i in item2index.items()))
    if texts is not None:
        body = "".join(f"{k}\t{v}\n" for k, v in texts.items())
        (d / f"{name}.text").write_text("item_id:token\ttext:token_seq\n" + body)
    return d


def test_rebuild_chains_cut_histories_in_any_row_order() -> None:
    seq = [str(i) for i in (5, 3, 9, 1, 7, 2, 8)]
    rows = [(tuple(seq[:t][-3:]), seq[t]) for t in range(1, len(seq))]
    assert rebuild(rows[::-1], window=3) == (seq, 0)
    assert rebuild(rows, window=3) == (seq, 0)
    gap = rows[:2] + rows[3:]  # one row missing: the chain stops there
    assert rebuild(gap, window=3) == (seq[:3], 3)


def test_seqrec_folder_rebuilds_users_maps_ids_and_reports_repeats_and_gaps(
    tmp_path: Path, wh: WarehouseConfig
) -> None:
    seqs = {
        "alice": ["A", "B", "C", "D", "E", "F", "G"],
        "bob": ["C", "A", "C", "E", "B", "D"],  # C twice: the last one is kept
        "carol": ["G", "F", "E", "D", "C"],
    }
    texts = {"A": "Pen blue", "B": "Paper A4", "C": "Stapler", "G": "Glue stick"}
    d = write_seqrec(tmp_path, "Office", seqs, window=3, texts=texts)
    # carol's middle train row is lost: her chain stops after 2 items
    lines = (d / "Office.train.inter").read_text().splitlines()
    carol = "2"
    drop = next(ln for ln in lines if ln.startswith(f"{carol}\t") and ln.endswith("\t4"))
    (d / "Office.train.inter").write_text("\n".join(ln for ln in lines if ln != drop) + "\n")
    raw = read_seqrec(d)
    assert raw.dataset == "Office"
    s = ingest(raw, wh, progress=False)
    got = sequences(wh, "Office")
    assert got["alice"] == seqs["alice"]
    assert got["bob"] == ["A", "C", "E", "B", "D"]
    assert "carol" not in got  # 2 items rebuilt: below 5
    checks = {r["check_name"]: (r["n"], r["example"]) for r in s.report}
    assert checks["duplicate_interaction"][0] == 1
    assert "bob" in checks["duplicate_interaction"][1]
    assert checks["unchained_sequence_row"][0] == 2  # carol's valid and test rows, after the gap
    assert "carol" in checks["unchained_sequence_row"][1]
    from features import store

    with store.connect(wh, create=False, read_only=True) as con:
        titles = dict(
            con.execute("SELECT item_id, title FROM items WHERE dataset = 'Office'").fetchall()
        )
    assert titles["A"] == "Pen blue" and titles["E"] == ""


def test_text_keyed_by_index_and_missing_test_file(tmp_path: Path) -> None:
    seqs = {"u": ["x", "y", "z", "w", "v"]}
    d = write_seqrec(tmp_path, "s", seqs, window=50)
    (d / "s.text").write_text("item_id:token\ttext:token_seq\n0\tthe x\n3\tthe w\n")
    raw = read_seqrec(d, dataset="renamed")
    titles = dict(raw.items.select("item_id", "title").iter_rows())
    assert raw.dataset == "renamed" and titles["x"] == "the x" and titles["w"] == "the w"
    (d / "s.test.inter").unlink()
    with pytest.raises(SourceError, match=r"s.test.inter not found"):
        read_seqrec(d)


def test_bad_header_is_one_line(tmp_path: Path) -> None:
    d = write_seqrec(tmp_path, "b", {"u": list("abcde")})
    (d / "b.test.inter").write_text("user_id:token\titems:token_seq\titem_id:token\n0\t1 2\t3\n")
    with pytest.raises(SourceError, match=r"header lacks fields \['item_id_list'\]"):
        read_seqrec(d)


def test_real_movielens_cut_written_as_unisrec_files_round_trips(
    tmp_path: Path, wh: WarehouseConfig
) -> None:
    src = write_ml_cut(tmp_path / "ml", range(1, 201), max_ratings=8000)
    ingest(read_source("movielens", src, "cut"), wh, progress=False)
    original = sequences(wh, "cut")
    assert max(len(s) for s in original.values()) > 60  # histories are cut at 50
    d = write_seqrec(tmp_path / "seq", "mlcut", original, window=50, reverse_train=False)
    back = ingest(read_seqrec(d), wh, progress=False)
    assert sequences(wh, "mlcut") == original
    assert back.n_interactions == sum(len(s) for s in original.values())
    assert not [r for r in back.report if r["action"] == "dropped"]
