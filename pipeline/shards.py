"""Shards of a stage's missing keys, so that several processes (Dask workers) share one stage.

A stage (tagging, embedding) is split in three plain functions, wired by flows/ onto any task
runner:
- plan (one process): find what is missing, write what must precede the shards, and return a
  small picklable plan: versions, counts and the shards, never the key lists;
- shard (any process, many at once): load the model once per process, find the missing keys of
  its shard, process them and commit them to the warehouse in chunks;
- finish (one process): record the model version and one pipeline_runs row for the stage.

A key belongs to shard `int(key[:8], 16) % n`: keys are sha256 hex digests, so the split is
even, needs no coordination and is computed in SQL as well as in Python. Each worker queries
its own missing keys, so nothing proportional to the catalog travels through the scheduler.

Writes happen in the shards (store.upsert per chunk, lock conflicts retried): a killed run
keeps every committed chunk, a rerun finds only the keys still missing, and no rows cross the
network twice. Returning the rows to the flow for a single write would hold every vector of the
stage in the flow process and lose all of them if it died before that write.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Hex digits of a key that choose its shard (32 bits: even for any practical shard count).
SHARD_HEX = 8


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the keys k with int(k[:8], 16) % count == index."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"Shard.count={self.count!r} must be an integer >= 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"Shard.index={self.index!r} must be in [0, {self.count})")

    def owns(self, key: str) -> bool:
        return shard_of(key, self.count) == self.index

    def sql(self, column: str) -> str:
        """A SQL predicate true for the rows whose `column` (a hex digest) is in this shard."""
        if self.count == 1:
            return "TRUE"
        return (
            f"(('0x' || substr({column}, 1, {SHARD_HEX}))::UBIGINT % {self.count} = {self.index})"
        )


def shard_of(key: str, n: int) -> int:
    """The shard (0..n-1) of a hex-digest key."""
    try:
        return int(key[:SHARD_HEX], 16) % n
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key=} is not a hex digest: cannot be sharded") from e


def split(n: int) -> list[Shard]:
    """The n shards of a stage."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"shards={n!r} must be an integer >= 1")
    return [Shard(i, n) for i in range(n)]


@dataclass
class ShardResult:
    """What one shard did, with the costs the bench turns into per-item numbers."""

    index: int
    n_done: int = 0  # keys processed and committed by this shard
    counts: dict[str, int] = field(default_factory=dict)  # stage-specific counts (status, ...)
    seconds: dict[str, float] = field(default_factory=dict)  # step -> wall seconds, and "total"
    cpu_seconds: float = 0.0  # CPU time of the whole worker process (all threads) in the shard
    startup_cpu_seconds: float = 0.0  # of cpu_seconds: loading the model, finding the keys
    loaded_model: bool = False  # this call loaded the model (first shard of the process)
    worker: str = ""  # host:pid that ran it


@contextmanager
def measure(result: ShardResult) -> Iterator[None]:
    """Fill result.seconds["total"], cpu_seconds and worker around a shard's work."""
    t, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        result.seconds["total"] = round(time.perf_counter() - t, 3)
        result.cpu_seconds = round(time.process_time() - c, 3)
        result.worker = f"{socket.gethostname()}:{os.getpid()}"


def set_threads(threads: int | None) -> None:
    """torch intra-op threads of this process (None: leave them)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))
