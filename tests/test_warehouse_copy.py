"""Issue 12, case 7: a warehouse folder copied (`cp -r`) or moved opens where it lies, reads the
same rows, and writes to a copy land in the copy only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli_run import ok, scalar
from tests.helpers import warehouse_fingerprint, write_office_cut

OFFICE_COLS = ("--item-key-col", "id", "--title-col", "text")


def counts(monkeypatch: pytest.MonkeyPatch, wh: Path) -> tuple[int, int]:
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(wh))
    n_inter = int(scalar(ok("sql", "select count(*) from interactions", "--csv")))
    n_items = int(scalar(ok("sql", "select count(*) from items", "--csv")))
    return n_inter, n_items


def test_a_copied_or_moved_warehouse_opens_where_it_lies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = tmp_path / "warehouse"
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(original))
    inter, items = write_office_cut(tmp_path / "office", n_users=30)
    ok("ingest", "generic", str(inter), str(items), "--dataset", "office", *OFFICE_COLS)
    expected = counts(monkeypatch, original)

    copy = tmp_path / "backup" / "w2"
    shutil.copytree(original, copy)  # cp -r warehouse backup/w2
    assert counts(monkeypatch, copy) == expected
    assert "interactions" in ok("tables")

    # a write to the copy lands in the copy; the original is untouched and still opens
    before = warehouse_fingerprint(original)
    more, more_items = write_office_cut(tmp_path / "office2", n_users=35)
    ok("ingest", "generic", str(more), str(more_items), "--dataset", "office", *OFFICE_COLS)
    grown = counts(monkeypatch, copy)
    assert grown[0] > expected[0]
    assert warehouse_fingerprint(original) == before
    assert counts(monkeypatch, original) == expected

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(copy), str(moved))  # mv backup/w2 elsewhere/moved
    assert counts(monkeypatch, moved) == grown
    snap = scalar(ok("sql", "select max(snapshot_id) from lake.snapshots()", "--csv"))
    assert int(snap) > 0
