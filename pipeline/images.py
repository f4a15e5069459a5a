"""Images: fetch (local path, file:// or http(s):// URL), validate, hash.

Downloads go into a content-addressed cache (`<cache>/<sha[:2]>/<sha>`), with timeouts,
retries with backoff on transient failures (timeouts, 5xx, cut connections), a byte cap and a
concurrency limit. Every image ends with a status (features.contract.IMAGE_STATUSES) and, when
bytes could be read, the sha256 of those bytes.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from features.contract import (
    IMAGE_CORRUPT,
    IMAGE_MISSING,
    IMAGE_OK,
    IMAGE_TOO_LARGE,
    IMAGE_UNSUPPORTED,
)

# Bytes that mark a known non-raster format (we do not rasterise vector or document files).
_UNSUPPORTED_MAGIC = (b"<svg", b"<?xml", b"%PDF", b"<!DOCTYPE", b"<html")


@dataclass
class ImageConfig:
    max_bytes: int = 20 * 2**20  # larger files are `too_large` (not downloaded past the cap)
    max_pixels: int = 64_000_000  # width*height cap (a 10000x10000 image is too_large)
    timeout_s: float = 10.0  # per HTTP request
    retries: int = 3  # extra attempts on transient HTTP failures
    backoff_s: float = 0.5  # first retry delay; doubles each time
    concurrency: int = 8  # simultaneous downloads / file checks
    user_agent: str = "msm4sr/0.1 (+image ingest)"


@dataclass
class ImageResult:
    uri: str
    local_path: str | None = None
    sha256: str | None = None
    status: str = IMAGE_MISSING
    width: int | None = None
    height: int | None = None
    n_bytes: int | None = None
    error: str | None = None


class _Transient(Exception):
    pass


def validate_bytes(data: bytes, cfg: ImageConfig) -> tuple[str, int | None, int | None, str | None]:
    """(status, width, height, error) of image bytes; decodes fully to catch truncation."""
    if not data:
        return IMAGE_CORRUPT, None, None, "empty file (0 bytes)"
    head = data[:64].lstrip().lower()
    try:
        with Image.open(BytesIO(data)) as im:
            w, h = im.size
            if w * h > cfg.max_pixels:
                return IMAGE_TOO_LARGE, w, h, f"{w}x{h} pixels > max_pixels={cfg.max_pixels}"
            im.load()  # raises on truncated data
            return IMAGE_OK, w, h, None
    except (UnidentifiedImageError, ImportError):
        # ImportError: once ultralytics is imported it wraps Image.open and, offline, fails
        # loading an optional HEIF plugin for bytes PIL cannot identify.
        if any(head.startswith(m.lower()) for m in _UNSUPPORTED_MAGIC):
            return IMAGE_UNSUPPORTED, None, None, "not a raster image (SVG/XML/PDF/HTML)"
        return IMAGE_CORRUPT, None, None, "not a decodable image"
    except Image.DecompressionBombError as e:
        return IMAGE_TOO_LARGE, None, None, str(e)[:200]
    except (OSError, SyntaxError, ValueError) as e:
        return IMAGE_CORRUPT, None, None, f"decode failed: {e}"[:200]


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    if "://" not in uri:
        return Path(uri)
    return None


def _download(url: str, cfg: ImageConfig) -> bytes:
    """GET url with the byte cap; raises _Transient for retryable failures."""
    req = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent})
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length and int(length) > cfg.max_bytes:
                raise ValueError(f"Content-Length {length} > max_bytes={cfg.max_bytes}")
            data = resp.read(cfg.max_bytes + 1)
            if len(data) > cfg.max_bytes:
                raise ValueError(f"body over max_bytes={cfg.max_bytes}")
            if length and len(data) < int(length):
                raise _Transient(f"truncated download: {len(data)} of {length} bytes")
            return data
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise _Transient(f"HTTP {e.code}") from e
        raise
    except http.client.IncompleteRead as e:
        raise _Transient(f"truncated download: {len(e.partial)} bytes") from e
    except (TimeoutError, ConnectionError) as e:
        raise _Transient(f"{type(e).__name__}: {e}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout, ConnectionError)):
            raise _Transient(f"{e.reason}") from e
        raise


def fetch_one(uri: str, cache_dir: Path, cfg: ImageConfig) -> ImageResult:
    """Resolve one image reference to a readable, validated, hashed file."""
    res = ImageResult(uri)
    local = _local_path(uri)
    if local is not None:
        if not local.is_file():
            res.error = f"no such file: {local}"
            return res
        size = local.stat().st_size
        res.n_bytes = size
        if size > cfg.max_bytes:
            res.status, res.error = IMAGE_TOO_LARGE, f"{size} bytes > max_bytes={cfg.max_bytes}"
            return res
        data = local.read_bytes()
        res.local_path = str(local.resolve())
    else:
        if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
            res.status, res.error = IMAGE_UNSUPPORTED, f"unsupported URI scheme in {uri!r}"
            return res
        data = b""
        delay = cfg.backoff_s
        for attempt in range(cfg.retries + 1):
            try:
                data = _download(uri, cfg)
                res.error = None
                break
            except _Transient as e:
                res.error = str(e)
                if attempt < cfg.retries:
                    time.sleep(delay)
                    delay *= 2
            except ValueError as e:
                res.status, res.error = IMAGE_TOO_LARGE, str(e)
                return res
            except urllib.error.HTTPError as e:
                res.error = f"HTTP {e.code}"
                return res
            except urllib.error.URLError as e:
                res.error = f"unreachable: {e.reason}"
                return res
        if res.error is not None:
            # Exhausted retries: a cut-off body is corrupt, an unreachable server is missing.
            res.status = IMAGE_CORRUPT if res.error.startswith("truncated") else IMAGE_MISSING
            return res
        res.n_bytes = len(data)
    res.sha256 = hashlib.sha256(data).hexdigest()
    res.status, res.width, res.height, err = validate_bytes(data, cfg)
    res.error = err
    if local is None:
        target = cache_dir / res.sha256[:2] / res.sha256
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(target)  # atomic: a killed run never leaves a half-written cache file
        res.local_path = str(target)
    return res


def fetch_all(
    uris: Iterable[str],
    cache_dir: Path,
    cfg: ImageConfig | None = None,
    on_done: Callable[[ImageResult], None] | None = None,
) -> list[ImageResult]:
    """fetch_one over many URIs with `cfg.concurrency` threads; results in input order."""
    cfg = cfg or ImageConfig()
    uris = list(uris)

    def work(u: str) -> ImageResult:
        r = fetch_one(u, cache_dir, cfg)
        if on_done:
            on_done(r)
        return r

    with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
        return list(pool.map(work, uris))
