"""Sources as configuration: a YAML file describes one source, or several named ones.

One source per file:

    kind: generic                  # movielens | amazon | generic | recbole | seqrec
    dataset: my-shop               # warehouse dataset name (default: the entry's name)
    interactions: purchases.csv    # generic: interactions + items files; amazon: reviews + meta
    items: products.tsv
    columns: {user: customer, item: sku, ts: time, item_key: sku, title: name}
    min_interactions: 5            # keep users with at least this many (default 5)

Several per file: `sources: {NAME: {kind: ..., ...}, ...}`. `path` is the folder of a movielens,
recbole or seqrec source (and the base of relative `interactions` / `items`); `name` is the file
stem of a recbole or seqrec folder (default: the folder's name). `columns` maps the adapter's
fields (generic: ColumnMap; recbole: AtomicFields) to the file's column names. Relative paths
resolve against the YAML file's folder; `{data}` stands for the data root (--data /
MSM4SR_DATA / ./data). The built-in sources are the entries of the repo's `sources.yaml`.

A bad file is a SourceError of one line naming the file and the key (`x.yaml: sources.shop.
min_interactions: ...`). Files are read when a source is read, so a scheduled flow that names a
file sees its latest content on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.paths import REPO_ROOT, data_root
from pipeline.sources.base import RawSource, SourceError

BUILTIN_FILE = REPO_ROOT / "sources.yaml"
KINDS = ("movielens", "amazon", "generic", "recbole", "seqrec")
DEFAULT_MIN_INTERACTIONS = 5

# Keys each kind takes besides the common ones (dataset, min_interactions).
KIND_KEYS: dict[str, set[str]] = {
    "movielens": {"path"},
    "amazon": {"path", "interactions", "items"},
    "generic": {"path", "interactions", "items", "columns"},
    "recbole": {"path", "name", "columns"},
    "seqrec": {"path", "name"},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "movielens": ("path",),
    "amazon": ("interactions", "items"),
    "generic": ("interactions", "items"),
    "recbole": ("path",),
    "seqrec": ("path",),
}
COMMON_KEYS = {"kind", "dataset", "min_interactions"}


@dataclass(frozen=True)
class SourceSpec:
    """One configured source: which adapter reads which files into which dataset."""

    entry: str  # the entry's name (its key under `sources:`, or the file's stem)
    kind: str  # one of KINDS
    dataset: str  # warehouse dataset name
    min_interactions: int = DEFAULT_MIN_INTERACTIONS
    path: str | None = None  # as written; see `resolve`
    interactions: str | None = None
    items: str | None = None
    name: str | None = None  # recbole / seqrec file stem
    columns: dict[str, str | None] = field(default_factory=dict)
    base: str = "."  # folder of the YAML file: relative paths start there
    file: str = ""  # the YAML file, for messages
    prefix: str = ""  # "sources.<entry>" in a several-source file, "" in a one-source file

    def key(self, key: str) -> str:
        """Where a key of this entry is, for messages: `file: sources.entry.key`."""
        return _where(self.file, self.prefix, key)

    def resolve(self, value: str) -> Path:
        """A path of the file: `{data}` expanded, relative paths under `base` (or `path`)."""
        p = Path(value.replace("{data}", str(data_root())))
        return p if p.is_absolute() else Path(self.base) / p

    def with_overrides(
        self, path: str | Path | None = None, dataset: str | None = None
    ) -> SourceSpec:
        """The same source read from another folder and/or into another dataset."""
        spec = self
        if path is not None:
            if "path" not in KIND_KEYS[self.kind]:
                raise SourceError(f"{self.key('path')}: a {self.kind} source has no folder")
            spec = replace(spec, path=str(Path(path).resolve()))
        return replace(spec, dataset=dataset) if dataset else spec


def _where(file: str, prefix: str, key: str = "") -> str:
    loc = ".".join(p for p in (prefix, key) if p)
    return f"{file}: {loc}" if loc else file


def parse_entry(entry: str, body: Any, file: str, prefix: str, base: Path) -> SourceSpec:
    """Validate one entry's mapping into a SourceSpec; errors name the key."""

    def _fail(key: str, msg: str) -> SourceError:
        return SourceError(f"{_where(file, prefix, key)}: {msg}")

    if not isinstance(body, dict):
        raise _fail("", f"an entry is a mapping of keys, got {type(body).__name__}")
    kind = body.get("kind")
    if kind not in KINDS:
        raise _fail("kind", f"{kind!r} is not one of {list(KINDS)}")
    allowed = COMMON_KEYS | KIND_KEYS[kind]
    for key in body:
        if key not in allowed:
            raise _fail(str(key), f"unknown key for kind {kind}; allowed: {sorted(allowed)}")
    for key in REQUIRED[kind]:
        if not body.get(key):
            raise _fail(key, f"required for kind {kind}")
    for key in ("path", "interactions", "items", "name", "dataset"):
        if key in body and (not isinstance(body[key], str | int) or body[key] == ""):
            raise _fail(key, f"must be a non-empty string, got {body[key]!r}")
    n = body.get("min_interactions", DEFAULT_MIN_INTERACTIONS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _fail("min_interactions", f"must be an integer >= 1, got {n!r}")
    columns = body.get("columns") or {}
    if not isinstance(columns, dict):
        raise _fail("columns", f"a mapping of field: column, got {type(columns).__name__}")
    known = _column_fields(kind)
    for key, value in columns.items():
        if key not in known:
            raise _fail(f"columns.{key}", f"unknown field; fields: {sorted(known)}")
        if value is not None and not isinstance(value, str):
            raise _fail(f"columns.{key}", f"a column name or null, got {value!r}")
    return SourceSpec(
        entry=entry,
        kind=kind,
        dataset=str(body.get("dataset") or entry),
        min_interactions=n,
        path=_str(body.get("path")),
        interactions=_str(body.get("interactions")),
        items=_str(body.get("items")),
        name=_str(body.get("name")),
        columns=dict(columns),
        base=str(base),
        file=file,
        prefix=prefix,
    )


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


# ColumnMap fields that name a column (its other fields are settings, e.g. rating bounds).
GENERIC_COLUMNS = {
    "user",
    "item",
    "ts",
    "rating",
    "item_key",
    "title",
    "text",
    "categories",
    "images",
}


def _column_fields(kind: str) -> set[str]:
    if kind == "generic":
        from pipeline.sources.generic import ColumnMap

        return GENERIC_COLUMNS & {f.name for f in fields(ColumnMap)}
    if kind == "recbole":
        from pipeline.sources.recbole import AtomicFields

        return {f.name for f in fields(AtomicFields)}
    return set()


def load_sources(path: Path) -> dict[str, SourceSpec]:
    """Every source of a YAML file: name -> spec (a one-source file: its stem -> spec)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"sources file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise SourceError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise SourceError(
            f"{path}: holds a source (kind: ...) or `sources:`, got {type(data).__name__}"
        )
    base = path.resolve().parent
    if "sources" in data:
        extra = sorted(set(data) - {"sources"})
        if extra:
            raise SourceError(f"{path}: {extra[0]}: unknown top-level key; only `sources:`")
        entries = data["sources"]
        if not isinstance(entries, dict) or not entries:
            raise SourceError(f"{path}: sources: a non-empty mapping of name: source")
        return {
            str(k): parse_entry(str(k), v, str(path), f"sources.{k}", base)
            for k, v in entries.items()
        }
    return {path.stem: parse_entry(path.stem, data, str(path), "", base)}


def find_source(name: str | None = None, source_file: str | Path | None = None) -> SourceSpec:
    """The source `name` of `source_file` (its only one when name is None), or a built-in."""
    file = Path(source_file) if source_file else BUILTIN_FILE
    specs = load_sources(file)
    if name is None:
        if len(specs) != 1:
            raise SourceError(f"{file} holds several sources: name one of {sorted(specs)}")
        return next(iter(specs.values()))
    if name not in specs:
        where = f"{file}" if source_file else "the built-in sources"
        raise SourceError(f"{name=} is not a source of {where}; known: {sorted(specs)}")
    return specs[name]


def configured_source(
    source: str | None = None,
    source_file: str | Path | None = None,
    path: str | Path | None = None,
    dataset: str | None = None,
) -> SourceSpec:
    """What the features flow and the CLI read: `source` of `source_file` (its only one when
    None), else a built-in (`movielens` when no name either), with `path` / `dataset` overrides."""
    name = source if source or source_file else "movielens"
    return find_source(name, source_file).with_overrides(path, dataset)


def read_spec(spec: SourceSpec) -> RawSource:
    """Read the configured source with its adapter."""
    cols = {k: v for k, v in spec.columns.items()}
    folder = spec.resolve(spec.path) if spec.path else None
    within = replace(spec, base=str(folder)) if folder and folder.is_dir() else spec
    if spec.kind == "movielens":
        from pipeline.sources.movielens import read_movielens

        assert folder is not None
        if not (folder / "ratings.dat").is_file():
            raise SourceError(
                f"MovieLens not found at {folder}: put ratings.dat, movies.dat (and optionally "
                f"posters/<MovieID>.jpg) there, pass the folder, or set --data / MSM4SR_DATA"
            )
        return read_movielens(folder, spec.dataset)
    if spec.kind in ("generic", "amazon"):
        assert spec.interactions and spec.items
        inter, items = within.resolve(spec.interactions), within.resolve(spec.items)
        for p, what in ((inter, "interactions"), (items, "items")):
            if not p.is_file():
                raise SourceError(f"{spec.key(what)}: file not found: {p}")
        if spec.kind == "amazon":
            from pipeline.sources.amazon import read_amazon

            return read_amazon(inter, items, spec.dataset)
        from pipeline.sources.generic import ColumnMap, read_generic

        return read_generic(inter, items, spec.dataset, ColumnMap(**cols))
    assert folder is not None
    if spec.kind == "recbole":
        from pipeline.sources.recbole import AtomicFields, read_recbole

        return read_recbole(folder, spec.dataset, spec.name, AtomicFields(**cols))
    from pipeline.sources.seqrec import read_seqrec

    return read_seqrec(folder, spec.dataset, spec.name)
