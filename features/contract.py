"""THE table contract: every warehouse table's name, Arrow schema, key and meaning.

This is the only module that names tables and columns for writing. Pipeline stages produce Arrow
tables in these schemas; the trainer reads them (through the views at the bottom). Keys are what
`features.store.upsert` merges on, so every write is idempotent.

Content-addressed keys make incremental work fall out naturally: `image_keywords` is keyed by
the image's sha256 and the tagger version, `text_embeddings` by the sha256 of the exact string
and the encoder version, so a stage computes only the keys that are missing for its version.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

CONTRACT_VERSION = 1

# Image status values (item_images.status).
IMAGE_OK = "ok"
IMAGE_MISSING = "missing"  # file absent, URL 404 / unreachable
IMAGE_CORRUPT = "corrupt"  # zero bytes, truncated, not decodable
IMAGE_TOO_LARGE = "too_large"  # over the byte or pixel cap
IMAGE_UNSUPPORTED = "unsupported"  # decodable bytes of a format we do not take (e.g. SVG, PDF)
IMAGE_UNREADABLE = "unreadable"  # there but not readable: permission, I/O error, a directory
IMAGE_STATUSES = (
    IMAGE_OK,
    IMAGE_MISSING,
    IMAGE_CORRUPT,
    IMAGE_TOO_LARGE,
    IMAGE_UNSUPPORTED,
    IMAGE_UNREADABLE,
)


@dataclass(frozen=True)
class TableSpec:
    """One warehouse table: its Arrow schema, merge key and a one-line description."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    doc: str
    # Tables partitioned by dataset are mirrored per dataset by `store.replace_dataset`.
    per_dataset: bool = False

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def empty(self) -> pa.Table:
        return self.schema.empty_table()


KEYWORD = pa.struct([("word", pa.string()), ("score", pa.float32()), ("source", pa.string())])

ITEMS = TableSpec(
    "items",
    pa.schema(
        [
            ("dataset", pa.string()),
            ("item_id", pa.string()),  # the source's id as text (MovieID, ASIN, ...)
            ("title", pa.string()),
            (
                "text",
                pa.string(),
            ),  # description / body text ("" when none); title and categories are separate
            ("categories", pa.string()),  # "Action|Comedy", "Office Products > Paper", ...
            ("n_images", pa.int32()),  # rows in item_images with status ok
        ]
    ),
    ("dataset", "item_id"),
    "one row per item of a dataset",
    per_dataset=True,
)

INTERACTIONS = TableSpec(
    "interactions",
    pa.schema(
        [
            ("dataset", pa.string()),
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("ts", pa.int64()),  # unix seconds
            ("rating", pa.float32()),  # null when the source has none
            (
                "seq",
                pa.int32(),
            ),  # 0-based position in the user's time order (ties: source row order)
        ]
    ),
    ("dataset", "user_id", "item_id"),
    "user-item interactions after preprocessing (>=5 per user, duplicates keep the last)",
    per_dataset=True,
)

ITEM_IMAGES = TableSpec(
    "item_images",
    pa.schema(
        [
            ("dataset", pa.string()),
            ("item_id", pa.string()),
            ("image_idx", pa.int32()),  # order of the image in the source
            ("uri", pa.string()),  # as given by the source: path, file:// or http(s):// URL
            ("local_path", pa.string()),  # readable file (the path itself or the cache copy)
            ("sha256", pa.string()),  # of the bytes; null when no bytes could be read
            ("status", pa.string()),  # one of IMAGE_STATUSES
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("n_bytes", pa.int64()),
            ("error", pa.string()),  # why the status is not ok
        ]
    ),
    ("dataset", "item_id", "image_idx"),
    "every image reference of every item, with its content hash and status",
    per_dataset=True,
)

IMAGE_KEYWORDS = TableSpec(
    "image_keywords",
    pa.schema(
        [
            ("sha256", pa.string()),
            ("tagger_version", pa.string()),
            ("status", pa.string()),  # "tagged" or why not ("decode_error: ...")
            ("keywords", pa.list_(KEYWORD)),  # ranked by score, top N
            ("text", pa.string()),  # keywords joined with ", "; null unless status = tagged
        ]
    ),
    ("sha256", "tagger_version"),
    "stage 1: ranked keywords of one image (by content) under one tagger version",
)

ITEM_SENTENCES = TableSpec(
    "item_sentences",
    pa.schema(
        [
            ("dataset", pa.string()),
            ("item_id", pa.string()),
            (
                "sentence_idx",
                pa.int32(),
            ),  # 0 = title, then description sentences, then category/brand
            ("sentence", pa.string()),
            ("text_sha256", pa.string()),  # sha256 of the exact sentence string (utf-8)
        ]
    ),
    ("dataset", "item_id", "sentence_idx"),
    "stage 2: an item's text split into at most 10 sentences",
    per_dataset=True,
)

TEXT_EMBEDDINGS = TableSpec(
    "text_embeddings",
    pa.schema(
        [
            ("text_sha256", pa.string()),
            ("encoder_version", pa.string()),
            ("text", pa.string()),
            ("vector", pa.list_(pa.float32())),  # L2-normalised; FLOAT[] (DuckLake has no FLOAT[d])
            ("n_tokens", pa.int32()),
            ("truncated", pa.bool_()),
        ]
    ),
    ("text_sha256", "encoder_version"),
    "stage 2: one vector per distinct string (sentence or keyword text) per encoder version",
)

MODEL_VERSIONS = TableSpec(
    "model_versions",
    pa.schema(
        [
            ("version", pa.string()),
            ("kind", pa.string()),  # "tagger" | "encoder"
            ("name", pa.string()),
            ("settings", pa.string()),  # JSON of the config that produced the version hash
            ("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    ("version", "kind"),
    "what each tagger_version / encoder_version hash stands for",
)

PIPELINE_RUNS = TableSpec(
    "pipeline_runs",
    pa.schema(
        [
            ("run_id", pa.string()),
            ("stage", pa.string()),  # ingest | tag | embed | validate
            ("dataset", pa.string()),
            ("started_at", pa.timestamp("us", tz="UTC")),
            ("finished_at", pa.timestamp("us", tz="UTC")),
            ("status", pa.string()),
            ("summary", pa.string()),  # JSON: counts and seconds
            ("snapshot_id", pa.int64()),  # warehouse snapshot after the stage's last commit
        ]
    ),
    ("run_id",),
    "one row per pipeline stage run",
)

DATA_REPORT = TableSpec(
    "data_report",
    pa.schema(
        [
            ("run_id", pa.string()),
            ("dataset", pa.string()),
            ("stage", pa.string()),
            (
                "check_name",
                pa.string(),
            ),  # e.g. "unparseable_line", "duplicate_item", "image_corrupt"
            ("action", pa.string()),  # dropped | repaired | kept | info
            ("n", pa.int64()),  # rows affected
            ("example", pa.string()),  # one offending value, for the user to look at
        ]
    ),
    ("run_id", "check_name"),
    "what a run dropped or repaired and why: nothing is dropped silently",
)

RUNS = TableSpec(
    "runs",
    pa.schema(
        [
            ("run_id", pa.string()),
            ("kind", pa.string()),  # pretrain | finetune | evaluate | baseline
            ("dataset", pa.string()),
            ("parent_run_id", pa.string()),
            ("model", pa.string()),
            ("config", pa.string()),  # JSON of every config dataclass
            ("snapshot_id", pa.int64()),  # warehouse snapshot the run read
            ("git_commit", pa.string()),
            ("seed", pa.int64()),
            ("status", pa.string()),  # running | finished | failed
            ("started_at", pa.timestamp("us", tz="UTC")),
            ("finished_at", pa.timestamp("us", tz="UTC")),
            ("checkpoint", pa.string()),
        ]
    ),
    ("run_id",),
    "every training / evaluation run",
)

METRICS = TableSpec(
    "metrics",
    pa.schema(
        [
            ("run_id", pa.string()),
            ("epoch", pa.int32()),  # -1 for final evaluation
            ("split", pa.string()),  # train | valid | test
            ("subset", pa.string()),  # all | cold (<=5 train interactions) | ...
            ("metric", pa.string()),  # "NDCG@10", "Recall@20", "loss", "loss_nip_text", ...
            ("value", pa.float64()),
        ]
    ),
    ("run_id", "epoch", "split", "subset", "metric"),
    "per-epoch losses and metrics of every run",
)

RECOMMENDATIONS = TableSpec(
    "recommendations",
    pa.schema(
        [
            ("run_id", pa.string()),  # the training run whose best checkpoint scored
            ("dataset", pa.string()),
            ("user_id", pa.string()),
            ("rank", pa.int32()),  # 1 = best
            ("item_id", pa.string()),
            ("score", pa.float32()),  # the model's score (higher is better)
            ("snapshot_id", pa.int64()),  # warehouse snapshot of the histories and features read
        ]
    ),
    ("run_id", "user_id", "rank"),
    "top-k items per user after their whole history (msm4sr recommend); rescoring a run's users "
    "replaces their rows",
)

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        ITEMS,
        INTERACTIONS,
        ITEM_IMAGES,
        IMAGE_KEYWORDS,
        ITEM_SENTENCES,
        TEXT_EMBEDDINGS,
        MODEL_VERSIONS,
        PIPELINE_RUNS,
        DATA_REPORT,
        RUNS,
        METRICS,
        RECOMMENDATIONS,
    )
}


# Bookkeeping, not data: one row per table of TABLES. DuckLake has no key constraints and lets two
# concurrent commits that both append to a table both land, so two machines adding the same
# content-addressed key at once (one string embedded by two flows) would leave it twice. Every
# commit that adds keys to a table also bumps that table's row here; of two such commits one then
# conflicts, and `features.store.write` retries it against the other's rows.
WRITE_GUARDS = TableSpec(
    "write_guards",
    pa.schema([("table_name", pa.string()), ("n_commits", pa.int64())]),
    ("table_name",),
    "one row per table: bumped by every commit that adds keys to it (serialises such commits)",
)


def spec(name: str) -> TableSpec:
    """The spec of table `name`; a clear error for an unknown name."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"{name=} is not a warehouse table; known: {sorted(TABLES)}") from None
