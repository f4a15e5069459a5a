"""Bench of stage 1 on the ML-1M posters: whole stage vs bare model, incremental cost, memory.

    .venv/bin/python bench/tagging.py [--limit N] [--threads 2] [--shards 4] [--movielens PATH]

All numbers come from one run on one machine (shared with other jobs: their load shows up as
noise; the JSON records the load average at the start and the end):
- The posters are ingested by the real ingest (`pipeline.ingest`) from a folder of symlinks to
  the read-only dataset (nothing copied), into a fresh warehouse in a temp folder.
- stage: `tag_dataset` on every poster in a fresh process (`--child`): images/s of read + hash
  check + decode + resize + infer + merge + write; start-up (imports, model load and warm-up,
  finding the missing keys) apart; the process's RSS sampled every 50 ms.
- stage vs bare, interleaved: the posters in `--shards` slices; per slice the stage
  (`tag_dataset` into a second warehouse) and the bare model alternate (which goes first
  alternates too), so both run under the same load. Bare = the stage's own model call
  (ultralytics AutoBackend on the stage's ONNX Runtime session + top-k labels) on inputs
  prepared beforehand, untimed. Target: stage >= 80% of bare. Also, at the end, `session.run`
  of a session with ONNX Runtime's default options (as ultralytics opens it).
- incremental: a copy of the folder (symlinks) with 10 extra posters (movies that had none) and
  1% - 10 changed posters; re-ingest; `tag_dataset` tags only those. Target: its streaming time
  <= 5% of the full run's, plus the fixed start-up. A rerun with nothing new gives the fixed
  cost, in this process and in a fresh one (python start, imports, queries).
- detector: the offline YOLOv8s person detector's bare images/s on 64 posters, to decide the
  default model list.
Writes bench/results/tagging.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

T_IMPORT = time.perf_counter()
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from features import store  # noqa: E402
from features.store import WarehouseConfig  # noqa: E402
from pipeline import tagger_models as tm  # noqa: E402
from pipeline.tagging import Prepared, Tagger, TaggerConfig, tag_dataset  # noqa: E402

IMPORT_S = time.perf_counter() - T_IMPORT  # numpy, torch, pyarrow, duckdb, the pipeline
DATASET = "ml-1m"
DEFAULT_ML1M = REPO.parent / "shared" / "datasets" / "movielens-1m"


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Samples this process's RSS every `every` seconds in a thread: (seconds since start, MB)."""

    def __init__(self, every: float = 0.05) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - t0, rss_mb()))
            time.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def symlink_folder(src: Path, dst: Path, posters: list[Path]) -> None:
    """A MovieLens folder of symlinks: the .dat files and the chosen posters."""
    (dst / "posters").mkdir(parents=True)
    for name in ("ratings.dat", "movies.dat", "users.dat"):
        if (src / name).exists():
            (dst / name).symlink_to(src / name)
    for p in posters:
        (dst / "posters" / p.name).symlink_to(p)


def ingest_folder(folder: Path, wh: WarehouseConfig) -> float:
    from pipeline.ingest import ingest
    from pipeline.sources.movielens import read_movielens

    t = time.perf_counter()
    ingest(read_movielens(folder, DATASET), wh, progress=False)
    return time.perf_counter() - t


class Bare:
    """The stage's model call alone (`predict`: ultralytics backend on the stage's ONNX Runtime
    session, top-k labels) on a shard's inputs, prepared beforehand (untimed), in back-to-back
    batches like the stage's."""

    def __init__(self, tagger: Tagger) -> None:
        self.tagger, self.model = tagger, tagger.models[0]
        self.n, self.t = 0, 0.0

    def inputs(self, paths: list[str], batch: int) -> list[list[np.ndarray]]:
        preps: list[Prepared] = [self.tagger.prepare(None, p) for p in paths]
        arrays = [p.inputs[0] for p in preps if p.inputs is not None]
        return [arrays[i : i + batch] for i in range(0, len(arrays), batch)]

    def run(self, paths: list[str], batch: int) -> None:
        batches = self.inputs(paths, batch)
        t = time.perf_counter()
        for b in batches:
            self.model.predict(b)
        self.t += time.perf_counter() - t
        self.n += sum(len(b) for b in batches)

    def img_s(self) -> float:
        return self.n / self.t


def bare_onnxruntime_default(tagger: Tagger, paths: list[str], batch: int) -> float:
    """`session.run` of a session with ONNX Runtime's default options (thread spinning on, as
    ultralytics opens it) on the same inputs; measured last: its spinning threads linger."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tagger.models[0].ref.path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    xs = [np.stack(b) for b in Bare(tagger).inputs(paths, batch)]  # (B, 3, S, S) float32
    sess.run(None, {name: xs[0]})  # warm-up
    t = time.perf_counter()
    for x in xs:
        sess.run(None, {name: x})
    return sum(len(x) for x in xs) / (time.perf_counter() - t)


def interleaved(
    wh_src: WarehouseConfig, wh: WarehouseConfig, cfg: TaggerConfig, tagger: Tagger, k: int
) -> dict:
    """Stage and bare model alternated shard by shard over all posters (the machine's load
    drifts; alternating in ~10 s slices puts both under the same load)."""
    with store.connect(wh_src) as con:
        rows = store.read_table(con, "item_images", where="dataset = ?", params=[DATASET])
    rows = rows.sort_by("local_path")
    bare = Bare(tagger)
    stage_s, n_stage = 0.0, 0
    per_shard = []
    for i in range(k):
        part = rows.slice(
            i * rows.num_rows // k, (i + 1) * rows.num_rows // k - i * rows.num_rows // k
        )
        name = f"{DATASET}-shard{i}"
        part = part.set_column(0, "dataset", pa.array([name] * part.num_rows))
        with store.connect(wh) as con:
            store.replace_dataset(con, "item_images", name, part)
        paths = part["local_path"].to_pylist()

        if i % 2:  # alternate which goes first
            bare.run(paths, tagger.batch_size)
        s = tag_dataset(name, cfg, wh, progress=False)
        if not i % 2:
            bare.run(paths, tagger.batch_size)
        stage_s += s.seconds - s.startup_seconds
        n_stage += s.n_new
        per_shard.append(s.images_per_s)
        print(
            f"shard {i}: stage {per_shard[-1]:.1f} img/s, load {os.getloadavg()[0]:.1f}", flush=True
        )
    b = bare.img_s()
    st = n_stage / stage_s
    return {
        "shards": k,
        "n": n_stage,
        "stage_img_s": st,
        "stage_img_s_per_shard": per_shard,
        "bare_predict_img_s": b,
        "ratio_stage_vs_bare": st / b,
    }


def detector_bare(paths: list[str], batch: int) -> dict[str, float]:
    tagger = Tagger(TaggerConfig(models=[tm.FALL_DETECTOR]))
    model = tagger.models[0]
    preps = [tagger.prepare(None, p) for p in paths]
    arrays = [p.inputs[0] for p in preps if p.inputs is not None]
    t = time.perf_counter()
    for i in range(0, len(arrays), batch):
        model.predict(arrays[i : i + batch])
    dt = time.perf_counter() - t
    return {
        "model": tm.FALL_DETECTOR,
        "imgsz": model.imgsz,
        "n": len(arrays),
        "img_s": len(arrays) / dt,
    }


def child(root: Path, cfg: TaggerConfig) -> None:
    """`--child`: tag the warehouse at root in this fresh process; print one JSON line."""
    wh = WarehouseConfig(root=root, attach=None, data_path=None)
    rss0 = rss_mb()
    with RssSampler() as rs:
        s = tag_dataset(DATASET, cfg, wh, progress=False)
    # Streaming samples only (after the models are loaded), in halves: flat = streamed.
    stream = [m for t, m in rs.samples if t > s.startup_seconds] or [rs.samples[-1][1]]
    half = max(1, len(stream) // 2)
    out = {
        "summary": asdict(s),
        "img_s": s.images_per_s,
        "import_s": IMPORT_S,
        "rss_mb_before": rss0,
        "rss_mb_after_startup": stream[0],
        "rss_mb_peak": max(m for _, m in rs.samples),
        "rss_mb_max_first_half_of_streaming": max(stream[:half]),
        "rss_mb_max_second_half_of_streaming": max(stream[half:] or stream),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(out))


def run_child(root: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """Run `child` in a new Python process; (its JSON, wall seconds including Python start)."""
    cmd = [sys.executable, __file__, "--child", str(root), "--threads", str(args.threads)]
    cmd += ["--workers", str(args.workers)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    t = time.perf_counter()
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--movielens", type=Path, default=DEFAULT_ML1M)
    ap.add_argument("--limit", type=int, default=0, help="use the first N posters (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=TaggerConfig.batch_size)
    ap.add_argument("--workers", type=int, default=TaggerConfig.decode_workers)
    ap.add_argument("--shards", type=int, default=4, help="slices of the stage/bare alternation")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tagging.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TaggerConfig(batch_size=args.batch_size, decode_workers=args.workers)
    if args.child:
        return child(args.child, cfg)
    load0 = os.getloadavg()
    posters = sorted((args.movielens / "posters").glob("*.jpg"), key=lambda p: int(p.stem))
    if args.limit:
        posters = posters[: args.limit]
    tmp = Path(tempfile.mkdtemp(prefix="bench-tagging-"))
    try:
        wh = WarehouseConfig(root=tmp / "warehouse", attach=None, data_path=None)
        a = tmp / "ml1m-a"
        symlink_folder(args.movielens, a, posters)
        ingest_s = ingest_folder(a, wh)
        paths = [str(a / "posters" / p.name) for p in posters]
        print(f"{len(paths)} posters ingested in {ingest_s:.1f}s; load {load0}", flush=True)

        # The whole stage on every poster in one run, in a fresh process (its memory alone).
        full, full_wall = run_child(wh.root, args)
        fs = full["summary"]
        print(f"stage: {full}", flush=True)
        noop_child, noop_process_s = run_child(wh.root, args)  # nothing new: the fixed cost
        assert noop_child["summary"]["n_new"] == 0, noop_child

        t = time.perf_counter()
        tagger = Tagger(cfg)  # in this process: imports ultralytics, opens the model
        tagger.warm_up()
        first_load_s = time.perf_counter() - t
        noop = tag_dataset(DATASET, cfg, wh, progress=False)

        # Stage vs bare model, alternated shard by shard, into a second warehouse.
        wh2 = WarehouseConfig(root=tmp / "warehouse2", attach=None, data_path=None)
        inter = interleaved(wh, wh2, cfg, tagger, args.shards)
        print(f"interleaved: {inter}", flush=True)

        # Incremental: 10 extra posters (movies that had none) + changed posters = 1%.
        with open(args.movielens / "movies.dat", encoding="latin-1") as fh:
            movie_ids = [line.split("::")[0] for line in fh if line.strip()]
        have = {p.stem for p in posters}
        extra_ids = [m for m in movie_ids if m not in have][:10]
        n_changed = max(0, round(0.01 * len(posters)) - len(extra_ids))
        b = tmp / "ml1m-b"
        keep = posters[n_changed:]
        symlink_folder(args.movielens, b, keep)
        for i, p in enumerate(posters[:n_changed]):
            (b / "posters" / p.name).write_bytes(p.read_bytes() + b"msm4sr-changed-%d" % i)
        for i, m in enumerate(extra_ids):
            src = posters[(i * 97) % len(posters)]
            (b / "posters" / f"{m}.jpg").write_bytes(src.read_bytes() + b"msm4sr-new-%d" % i)
        reingest_s = ingest_folder(b, wh)
        incr = tag_dataset(DATASET, cfg, wh, progress=False)
        print(f"incremental: {incr}", flush=True)

        det = detector_bare(paths[:64], 16)
        ort_default = bare_onnxruntime_default(tagger, paths, tagger.batch_size)
        print(f"detector: {det}", flush=True)

        stream_full = fs["seconds"] - fs["startup_seconds"]
        stream_incr = incr.seconds - incr.startup_seconds
        res = {
            "dataset": str(args.movielens),
            "n_posters": len(paths),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "loadavg_start": load0,
                "loadavg_end": os.getloadavg(),
                "note": "shared machine: other jobs ran at the same time",
            },
            "config": {
                "models": cfg.models,
                "batch_size": tagger.batch_size,
                "decode_workers": cfg.decode_workers,
                "chunk_size": cfg.chunk_size,
                "torch_threads": args.threads,
            },
            "tagger_version": fs["tagger_version"],
            "stage": {
                "n_new": fs["n_new"],
                "n_tagged": fs["n_tagged"],
                "seconds": fs["seconds"],
                "startup_s": fs["startup_seconds"],
                "streaming_s": stream_full,
                "img_s": full["img_s"],
                "img_s_including_startup": fs["n_new"] / fs["seconds"],
                "process_wall_s": full_wall,
                "import_s": full["import_s"],
            },
            "stage_vs_bare_interleaved": inter,
            "ratio_full_run_vs_bare_predict": full["img_s"] / inter["bare_predict_img_s"],
            "bare_onnxruntime_default_options_img_s": ort_default,
            "ratio_full_run_vs_bare_onnxruntime_default": full["img_s"] / ort_default,
            "startup": {
                "in_process_model_load_s": first_load_s,
                "noop_rerun_in_process_s": noop.seconds,
                "noop_rerun_fresh_process_s": noop_process_s,
            },
            "incremental": {
                "n_new": incr.n_new,
                "n_extra_posters": len(extra_ids),
                "n_changed_posters": n_changed,
                "seconds": incr.seconds,
                "startup_s": incr.startup_seconds,
                "streaming_s": stream_incr,
                "streaming_fraction_of_full": stream_incr / stream_full,
                "seconds_fraction_of_full": incr.seconds / fs["seconds"],
                "reingest_s": reingest_s,
            },
            "memory_of_the_stage_process": {
                k: full[k]
                for k in (
                    "rss_mb_before",
                    "rss_mb_after_startup",
                    "rss_mb_peak",
                    "rss_mb_max_first_half_of_streaming",
                    "rss_mb_max_second_half_of_streaming",
                    "ru_maxrss_mb",
                )
            },
            "detector": det,
        }
        print(json.dumps(res, indent=2))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
