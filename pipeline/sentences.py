"""Stage 2, text side: clean an item's text and split it into at most 10 sentences.

An item's sentences, in order: its title, then the sentences of its description, then its
categories as one sentence (PAPER.md section 1). Each sentence is later encoded by BERT into one
vector, keyed by the sha256 of the exact string, so the cleaning here decides which strings are
"the same" across items.

Bad text is never fatal: every kind is repaired or dropped and counted in `TextStats`, which the
embed run writes into its summary. Kinds handled: missing/empty fields, whitespace-only fields,
U+FFFD left by an ingest that repaired non-UTF-8 bytes, UTF-8 read as latin-1 ("CafÃ©"),
control and zero-width characters, HTML fragments (tags stripped, entities unescaped, block tags
become sentence breaks), very long descriptions (only the head is split, long sentences are
clipped), and emoji / non-Latin scripts (kept: the tokenizer maps what it cannot read to [UNK]).
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# Kinds of bad text counted by TextStats (the keys of its counter).
EMPTY = "empty"  # a field that is null or ""
WHITESPACE_ONLY = "whitespace_only"  # a field that is only whitespace / invisible characters
HTML = "html"  # a field with tags or entities (stripped / unescaped)
REPLACEMENT_CHAR = "replacement_char"  # U+FFFD from a non-UTF-8 repair (removed)
MOJIBAKE = "mojibake_repaired"  # UTF-8 bytes read as latin-1 / cp1252, decoded back
CONTROL_CHARS = "control_chars"  # C0/C1 controls, zero-width and BOM characters (removed)
LONG_TEXT = "long_text"  # a description over max_text_chars (only its head is split)
SENTENCE_CLIPPED = "sentence_clipped"  # a sentence over max_sentence_chars, clipped at a space
EMOJI = "emoji"  # a field containing emoji / pictographs (kept)
NON_LATIN = "non_latin"  # a field containing letters of a non-Latin script (kept)
DUPLICATE = "duplicate_sentence"  # a sentence repeating an earlier one of the same item (dropped)
OVER_CAP = "over_cap"  # description sentences beyond max_sentences (dropped)
NO_SENTENCE = "item_without_sentence"  # an item left with no sentence at all
BAD_KINDS = (
    EMPTY,
    WHITESPACE_ONLY,
    HTML,
    REPLACEMENT_CHAR,
    MOJIBAKE,
    CONTROL_CHARS,
    LONG_TEXT,
    SENTENCE_CLIPPED,
    EMOJI,
    NON_LATIN,
    DUPLICATE,
    OVER_CAP,
    NO_SENTENCE,
)


@dataclass(frozen=True)
class SentenceConfig:
    """How item text becomes sentences."""

    # Most sentences kept per item (PAPER.md: 10), title and category sentence included.
    max_sentences: int = 10
    # Only this many characters of a description are cleaned and split (a 100k-character
    # description gives its first sentences, not 10k of them).
    max_text_chars: int = 20_000
    # A sentence longer than this is clipped at a word boundary (the encoder reads ~128 tokens,
    # about 500-700 characters; the rest would only bloat the stored string).
    max_sentence_chars: int = 1_000
    # Move a trailing article back to the front: "Usual Suspects, The (1995)" ->
    # "The Usual Suspects (1995)" (MovieLens titles); BERT reads the natural order better.
    fix_trailing_article: bool = True


@dataclass
class TextStats:
    """Counts of bad-text kinds over a batch of items (keys from BAD_KINDS)."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # kind -> first offending value
    n_items: int = 0
    n_sentences: int = 0

    def hit(self, kind: str, example: str | None) -> None:
        """Count one case of `kind`, keeping the first example (clipped to 200 characters)."""
        self.counts[kind] += 1
        if kind not in self.examples:
            self.examples[kind] = repr(example)[:200]

    def as_dict(self) -> dict[str, int]:
        return {k: int(self.counts.get(k, 0)) for k in BAD_KINDS}


def text_sha256(s: str) -> str:
    """sha256 hex of the exact UTF-8 string: the key of text_embeddings (= DuckDB sha256(s))."""
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- cleaning

_TAG = re.compile(r"<\s*/?\s*[a-zA-Z][^<>]*>|<!--.*?-->", re.S)
_SCRIPT = re.compile(r"<\s*(script|style)\b[^>]*>.*?<\s*/\s*\1\s*>", re.S | re.I)
_BLOCK_TAG = re.compile(r"<\s*/?\s*(br|p|div|li|ul|ol|tr|td|h[1-6]|table|section)\b[^>]*>", re.I)
_ENTITY = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]{2,8});")
# Latin-1 / cp1252 renderings of a UTF-8 multi-byte sequence: a lead byte (U+00C2-U+00F4)
# followed by 1-3 continuation bytes (U+0080-U+00BF, or their cp1252 glyphs such as U+20AC).
_CONT = "\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122"
_MOJIBAKE = re.compile(f"(?:[\u00c2-\u00f4][{_CONT}]{{1,3}})+")
_INVISIBLE = re.compile(r"[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\u00ad]")
_SPACE = re.compile(r"\s+")
_EMOJI = re.compile(r"[\U0001F000-\U0001FAFF\u2600-\u27BF\U0001F900-\U0001F9FF]")


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc" and ch not in "\t\n\r"


def repair_mojibake(s: str) -> str | None:
    """Decode runs of UTF-8 read as cp1252/latin-1 back ("CafÃ©" -> "Café"); None if none."""
    changed = False

    def byte(ch: str) -> bytes:
        try:
            return ch.encode("cp1252")
        except UnicodeEncodeError:
            return bytes([ord(ch)])  # latin-1 (C1 range), which cp1252 leaves undefined

    def fix(m: re.Match[str]) -> str:
        nonlocal changed
        try:
            out = b"".join(byte(ch) for ch in m[0]).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return m[0]
        changed = True
        return out

    fixed = _MOJIBAKE.sub(fix, s)
    return fixed if changed else None


def _has_non_latin(s: str) -> bool:
    for ch in s:
        if ord(ch) > 0x24F and ch.isalpha():
            return True
    return False


def clean_text(s: str | None, stats: TextStats, *, keep_breaks: bool = False) -> str:
    """One field cleaned: NFC, mojibake repaired, HTML stripped, invisible chars removed.

    With keep_breaks, paragraph-like breaks (newlines, block tags) survive as "\\n" so the
    sentence splitter can use them; otherwise all whitespace runs become one space.
    """
    raw = s
    if s is None or s == "":
        stats.hit(EMPTY, s)
        return ""
    if "\ufffd" in s:
        stats.hit(REPLACEMENT_CHAR, raw)
        s = s.replace("\ufffd", " ")
    fixed = repair_mojibake(s)
    if fixed is not None:
        stats.hit(MOJIBAKE, raw)
        s = fixed
    if "<" in s and (_TAG.search(s) or _SCRIPT.search(s)):
        stats.hit(HTML, raw)
        s = _SCRIPT.sub(" ", s)
        s = _BLOCK_TAG.sub("\n", s)
        s = _TAG.sub(" ", s)
        s = html.unescape(s)
    elif "&" in s and _ENTITY.search(s):
        stats.hit(HTML, raw)
        s = html.unescape(s)
    s = unicodedata.normalize("NFC", s)
    if _INVISIBLE.search(s) or any(_is_control(ch) for ch in s):
        stats.hit(CONTROL_CHARS, raw)
        s = _INVISIBLE.sub("", s)
        s = "".join(" " if _is_control(ch) else ch for ch in s)
    if keep_breaks:
        lines = (_SPACE.sub(" ", ln).strip() for ln in re.split(r"[\r\n\u2028\u2029]+", s))
        out = "\n".join(ln for ln in lines if ln)
    else:
        out = _SPACE.sub(" ", s).strip()
    if not out:
        stats.hit(WHITESPACE_ONLY, raw)
        return ""
    if _EMOJI.search(out):
        stats.hit(EMOJI, raw)
    if _has_non_latin(out):
        stats.hit(NON_LATIN, raw)
    return out


# --------------------------------------------------------------------------- splitting

_ARTICLES = "The|A|An|Les|La|Le|L'|Il|El|Lo|Los|Las|Das|Die|Der|Det|Den|De|Un|Une|O|Os"
_TRAILING_ARTICLE = re.compile(
    rf"^(?P<head>[^(]+?), (?P<art>{_ARTICLES})(?P<rest>(?: \([^()]*\))*)$"
)
# Sentence end: . ! ? or … (plus closing quotes/brackets) then whitespace; CJK full stops
# end a sentence without whitespace.
_SENT_END = re.compile(r"(?<=[.!?\u2026])[\"'\u201d\u2019)\]]*\s+|(?<=[\u3002\uff01\uff1f])\s*")
# Words after which a period does not end a sentence.
_ABBREV = re.compile(
    r"(?:\b(?:mr|mrs|ms|dr|prof|sr|jr|st|vs|etc|inc|ltd|co|corp|no|vol|approx|fig|ca|e\.g|i\.e"
    r"|u\.s|u\.k|oz|lb|lbs|in|ft|pcs|pk|qty|min|max|ref|dept|est|jan|feb|mar|apr|jun|jul|aug"
    r"|sep|sept|oct|nov|dec)|\b[a-z])\.$",
    re.I,
)


def fix_title(title: str) -> str:
    """ "Usual Suspects, The (1995)" -> "The Usual Suspects (1995)"; other titles unchanged."""
    m = _TRAILING_ARTICLE.match(title)
    if not m:
        return title
    art = m["art"]
    sep = "" if art.endswith("'") else " "
    return f"{art}{sep}{m['head']}{m['rest']}"


def split_sentences(text: str) -> list[str]:
    """Split cleaned text (lines joined by "\\n") into sentences; abbreviations do not split."""
    out: list[str] = []
    for line in text.split("\n"):
        parts: list[str] = []
        start = 0
        for m in _SENT_END.finditer(line):
            piece = line[start : m.start()].rstrip()
            if parts and _ABBREV.search(parts[-1]):
                parts[-1] = f"{parts[-1]} {piece}" if piece else parts[-1]
            elif piece:
                parts.append(piece + line[m.start() : m.end()].strip())
            start = m.end()
        tail = line[start:].strip()
        if tail:
            if parts and _ABBREV.search(parts[-1]):
                parts[-1] = f"{parts[-1]} {tail}"
            else:
                parts.append(tail)
        out.extend(p.strip() for p in parts if p.strip())
    return out


def _clip(s: str, limit: int, stats: TextStats) -> str:
    if len(s) <= limit:
        return s
    stats.hit(SENTENCE_CLIPPED, s)
    cut = s.rfind(" ", 0, limit + 1)
    return s[: cut if cut > limit // 2 else limit].rstrip()


def categories_sentence(categories: str | None, stats: TextStats) -> str:
    """ "Animation|Children's|Comedy" -> "Animation, Children's, Comedy" (one sentence)."""
    s = clean_text(categories, stats)
    parts = [p.strip() for p in s.split("|")]
    seen: list[str] = []
    for p in parts:
        if p and p not in seen:
            seen.append(p)
    return ", ".join(seen)


def _norm(s: str) -> str:
    return re.sub(r"[\W_]+", " ", s.casefold()).strip()


def item_sentences(
    title: str | None,
    text: str | None,
    categories: str | None,
    stats: TextStats,
    cfg: SentenceConfig = SentenceConfig(),
) -> list[str]:
    """An item's sentences: title, description sentences, the category sentence (<= max).

    A description that repeats the title or the categories (MovieLens items carry
    "title + genres" as text) does not add them again: sentences equal (case- and
    punctuation-insensitively) to an earlier one are dropped and counted.
    """
    stats.n_items += 1
    t = clean_text(title, stats)
    if t and cfg.fix_trailing_article:
        t = fix_title(t)
    t = _clip(t, cfg.max_sentence_chars, stats) if t else t
    cat = categories_sentence(categories, stats)
    cat = _clip(cat, cfg.max_sentence_chars, stats) if cat else cat

    raw = text
    if raw is not None and len(raw) > cfg.max_text_chars:
        stats.hit(LONG_TEXT, raw[:100] + "...")
        raw = raw[: cfg.max_text_chars]
    body = clean_text(raw, stats, keep_breaks=True)
    # Text that starts with the (raw or fixed) title: drop that prefix, keep what follows.
    raw_title = clean_text(title, TextStats()) if title else ""
    for prefix in {raw_title, t} - {""}:
        if body.casefold().startswith(prefix.casefold()):
            body = body[len(prefix) :].lstrip(" \n.,;:-|")
            break
    desc = [_clip(s, cfg.max_sentence_chars, stats) for s in split_sentences(body)] if body else []

    seen: set[str] = set()
    out: list[str] = []

    def add(s: str) -> bool:
        key = _norm(s) or s
        if key in seen:
            stats.hit(DUPLICATE, s)
            return False
        seen.add(key)
        out.append(s)
        return True

    if t:
        add(t)
    cat_key = _norm(cat) if cat else None
    if cat_key and cat_key in seen:  # categories equal to the title
        stats.hit(DUPLICATE, cat)
        cat, cat_key = "", None
    if cat_key:
        seen.add(cat_key)  # so a description repeating the categories is a duplicate
    room = cfg.max_sentences - len(out) - (1 if cat else 0)
    for s in desc:
        if _norm(s.replace("|", " ")) == cat_key:
            stats.hit(DUPLICATE, s)
            continue
        if room <= 0:
            stats.hit(OVER_CAP, s)
            continue
        if add(s):
            room -= 1
    if cat:
        out.append(cat)
    if not out:
        stats.hit(NO_SENTENCE, f"title={title!r} text={str(text)[:80]!r}")
    stats.n_sentences += len(out)
    return out
