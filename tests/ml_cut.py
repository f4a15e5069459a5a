"""Small real MovieLens cuts, written at test time in the GroupLens layout (never committed)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import ML1M, require


def write_ml_cut(dest: Path, movie_ids: range | list[int], max_ratings: int = 3000) -> Path:
    """movies.dat, ratings.dat and posters/ restricted to `movie_ids` (real rows, real posters)."""
    src = require(ML1M)
    keep = {str(m) for m in movie_ids}
    dest.mkdir(parents=True, exist_ok=True)
    movies = [
        ln
        for ln in (src / "movies.dat").read_bytes().split(b"\n")
        if ln and ln.split(b"::")[0].decode() in keep
    ]
    (dest / "movies.dat").write_bytes(b"\n".join(movies) + b"\n")
    out: list[str] = []
    with open(src / "ratings.dat") as f:
        for line in f:
            if line.split("::")[1] in keep:
                out.append(line)
                if len(out) >= max_ratings:
                    break
    (dest / "ratings.dat").write_text("".join(out))
    (dest / "posters").mkdir(exist_ok=True)
    for m in keep:
        p = src / "posters" / f"{m}.jpg"
        if p.exists():
            shutil.copy(p, dest / "posters" / p.name)
    return dest
