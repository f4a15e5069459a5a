"""A small real warehouse for the trainer tests, built ONCE per test process by the real pipeline.

- "ml-cut": MovieLens-1M movies 1..120 (real ratings, titles, genres and posters, cut at test
  time by tests/ml_cut.py), ingested, posters tagged by the offline EfficientNet-Lite0 tagger,
  sentences and keyword texts encoded by the offline MiniLM encoder.
- "office-cut": the first 120 items of Amazon Office (text only, no images at all), ingested
  and encoded.

Tests that write (runs, metrics, new rows) get a private copy of this warehouse.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import sqlite3
import tempfile
from pathlib import Path

from features.store import WarehouseConfig
from tests.conftest import ML1M, OFFICE, require
from tests.ml_cut import write_ml_cut

ML_CUT = "ml-cut"
OFFICE_CUT = "office-cut"


def _office_cut(dest: Path, n_items: int = 120) -> Path:
    src = require(OFFICE)
    dest.mkdir(parents=True, exist_ok=True)
    lines = (src / "items.tsv").read_text().splitlines()
    (dest / "items.tsv").write_text("\n".join(lines[: n_items + 1]) + "\n")
    keep = {ln.split("\t", 1)[0] for ln in lines[1 : n_items + 1]}
    inter = (src / "interactions.csv").read_text().splitlines()
    rows = [ln for ln in inter[1:] if ln.split(",")[1] in keep]
    (dest / "interactions.csv").write_text("\n".join([inter[0], *rows]) + "\n")
    return dest


@functools.cache
def built_warehouse() -> Path:
    """Root of the shared read-only warehouse (deleted at exit)."""
    require(ML1M)
    require(OFFICE)
    from pipeline.embedding import EncoderConfig, embed_dataset
    from pipeline.ingest import ingest
    from pipeline.sources.generic import OFFICE as OFFICE_COLUMNS
    from pipeline.sources.generic import read_generic
    from pipeline.sources.movielens import read_movielens
    from pipeline.tagging import TaggerConfig, tag_dataset

    root = Path(tempfile.mkdtemp(prefix="msm4sr-trainer-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    wh = WarehouseConfig(root=root / "wh", attach=None, data_path=None)
    ml = write_ml_cut(root / "raw" / "movielens", range(1, 121), max_ratings=4000)
    ingest(read_movielens(ml, ML_CUT), wh, progress=False)
    tag_dataset(ML_CUT, TaggerConfig(), wh, progress=False)
    embed_dataset(ML_CUT, EncoderConfig(), wh, progress=False)
    office = _office_cut(root / "raw" / "office")
    ingest(
        read_generic(office / "interactions.csv", office / "items.tsv", OFFICE_CUT, OFFICE_COLUMNS),
        wh,
        progress=False,
    )
    embed_dataset(OFFICE_CUT, EncoderConfig(), wh, progress=False)
    return root / "wh"


def warehouse_copy(dest: Path) -> WarehouseConfig:
    """A private, writable copy of the built warehouse.

    DuckLake records its data path in the catalog (file paths are relative to it), so the copy's
    catalog is pointed at the copied data folder.
    """
    shutil.copytree(built_warehouse(), dest)
    with contextlib.closing(sqlite3.connect(dest / "catalog.sqlite")) as con:
        con.execute(
            "UPDATE ducklake_metadata SET value = ? WHERE key = 'data_path'", [f"{dest / 'data'}/"]
        )
        con.commit()
    return WarehouseConfig(root=dest, attach=None, data_path=None)
