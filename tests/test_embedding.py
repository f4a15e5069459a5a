"""Stage 2 with the real offline MiniLM and a real DuckLake warehouse in tmp_path."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import typer
from typer.testing import CliRunner

from features import store
from features.contract import spec
from pipeline import sentences as sent
from pipeline.embedding import (
    EncoderConfig,
    embed_dataset,
    encoder_version,
    load_encoder,
)

torch.set_num_threads(2)
DS = "test-ds"


@pytest.fixture(scope="module")
def enc():
    return load_encoder(EncoderConfig(device="cpu"))


def cfg(**kw) -> EncoderConfig:
    return EncoderConfig(device="cpu", **kw)


def put_items(wh, rows: list[tuple[str, str | None, str | None, str | None]], dataset: str = DS):
    t = pa.table(
        {
            "dataset": [dataset] * len(rows),
            "item_id": [r[0] for r in rows],
            "title": [r[1] for r in rows],
            "text": [r[2] for r in rows],
            "categories": [r[3] for r in rows],
            "n_images": pa.array([0] * len(rows), pa.int32()),
        }
    )
    with store.connect(wh) as con:
        store.replace_dataset(con, "items", dataset, t)


def put_images(
    wh, images: list[tuple[str, int, str]], keywords: list[tuple[str, str, str, str | None]]
):
    """images: (item_id, image_idx, sha256); keywords: (sha256, tagger_version, status, text)."""
    n = len(images)
    img = {c: [None] * n for c in spec("item_images").columns}
    img.update(
        dataset=[DS] * n,
        item_id=[i[0] for i in images],
        image_idx=[i[1] for i in images],
        uri=[f"/x/{i[2]}.jpg" for i in images],
        sha256=[i[2] for i in images],
        status=["ok"] * n,
    )
    kw = {
        "sha256": [k[0] for k in keywords],
        "tagger_version": [k[1] for k in keywords],
        "status": [k[2] for k in keywords],
        "keywords": pa.array(
            [[] for _ in keywords], spec("image_keywords").schema.field("keywords").type
        ),
        "text": [k[3] for k in keywords],
    }
    with store.connect(wh) as con:
        store.replace_dataset(con, "item_images", DS, pa.table(img))
        store.upsert(con, "image_keywords", pa.table(kw))


def fetch(wh, sql: str, params: list | None = None) -> list[tuple]:
    with store.connect(wh) as con:
        return con.execute(sql, params or []).fetchall()


# --------------------------------------------------------------------------- the encoder


def test_cat_is_closer_to_kitten_than_to_bus(enc):
    v = enc.encode(["a cat", "a kitten", "a bus"]).vectors  # (3, 384)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


def test_batching_by_length_changes_no_vector_and_keeps_order(enc):
    texts = ["a short one", "a much longer sentence about office supplies and staplers", "x"]
    together = enc.encode(texts).vectors
    alone = np.stack([enc.encode([t]).vectors[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding is masked out


def test_truncation_keeps_the_end_token_and_is_counted(enc):
    long = "stapler " * 300
    ids = enc.tokenize([long, "a cat"])
    out = enc.encode_ids(ids)
    assert out.truncated.tolist() == [True, False]
    assert out.n_tokens[0] > 128
    batch = enc.make_batch(ids[:1])
    assert batch["input_ids"].shape == (1, 128)
    assert batch["input_ids"][0, -1].item() == enc.tokenizer.sep_token_id
    assert batch["input_ids"][0, 0].item() == enc.tokenizer.cls_token_id


def test_version_follows_settings_not_batch_size():
    base = encoder_version(cfg())
    assert re.fullmatch(r"[0-9a-f]{12}", base)
    assert encoder_version(cfg(batch_size=7)) == base
    assert encoder_version(cfg(pooling="cls")) != base
    assert encoder_version(cfg(max_length=64)) != base
    with pytest.raises(ValueError, match="pooling='max'"):
        cfg(pooling="max")
    with pytest.raises(ValueError, match="no/such/model"):
        encoder_version(cfg(model="no/such/model"))


@pytest.mark.parametrize("text", ["a cat", "Café 😀 打字机 Пишущая", "tabby cat, tiger cat, 0.91"])
def test_duckdb_sha256_equals_hashlib(wh, text):
    # item_image_features joins on DuckDB's sha256(keyword text): it must equal ours.
    row = fetch(wh, "SELECT sha256(?)", [text])[0]
    assert row[0] == hashlib.sha256(text.encode("utf-8")).hexdigest() == sent.text_sha256(text)


# --------------------------------------------------------------------------- the stage


ITEMS = [
    ("1", "Toy Story (1995)", "", "Animation|Children's|Comedy"),
    ("2", "Heat (1995)", "", "Action|Crime|Thriller"),
    ("3", "Jumanji (1995)", "", "Animation|Children's|Comedy"),  # same genres as item 1
]


def test_embed_dataset_shares_strings_and_feeds_the_views(wh):
    put_items(wh, ITEMS)
    put_images(
        wh,
        [("1", 0, "img-a"), ("2", 0, "img-b"), ("3", 0, "img-c"), ("3", 1, "img-d")],
        [
            ("img-a", "t1", "tagged", "toy, cowboy, comic book"),
            ("img-b", "t1", "tagged", "pistol, street"),
            ("img-c", "t1", "tagged", "toy, cowboy, comic book"),  # same text as img-a
            ("img-d", "t1", "decode_error: truncated", None),
        ],
    )
    s = embed_dataset(DS, cfg(), wh, progress=False)
    # 3 titles + 2 distinct genre sentences + 2 distinct keyword texts.
    assert (s.n_items, s.n_sentences, s.n_keyword_texts) == (3, 6, 2)
    assert s.n_strings == s.n_encoded == 7 and s.n_cached == 0

    shared = "Animation, Children's, Comedy"
    assert fetch(wh, "SELECT count(*) FROM text_embeddings WHERE text = ?", [shared]) == [(1,)]
    text_feat = fetch(
        wh, "SELECT item_id, n, len(vectors[1]) FROM item_text_features ORDER BY item_id"
    )
    assert text_feat == [("1", 2, 384), ("2", 2, 384), ("3", 2, 384)]
    img = fetch(
        wh,
        "SELECT item_id, tagger_version, encoder_version, n FROM item_image_features ORDER BY item_id",
    )
    assert img == [
        ("1", "t1", s.encoder_version, 1),
        ("2", "t1", s.encoder_version, 1),
        ("3", "t1", s.encoder_version, 1),
    ]  # the undecodable image has no vector
    # The view's vector is the stored vector of the keyword text.
    same = fetch(
        wh,
        "SELECT f.vectors[1] = e.vector FROM item_image_features f, text_embeddings e "
        "WHERE f.item_id = '2' AND e.text = 'pistol, street'",
    )
    assert same == [(True,)]

    runs = fetch(wh, "SELECT stage, status, summary, snapshot_id FROM pipeline_runs")
    assert len(runs) == 1 and runs[0][:2] == ("embed", "finished")
    summary = json.loads(runs[0][2])
    assert summary["n_encoded"] == 7 and summary["encoder_version"] == s.encoder_version
    assert runs[0][3] == s.snapshot_id > 0
    assert fetch(wh, "SELECT kind FROM model_versions WHERE version = ?", [s.encoder_version]) == [
        ("encoder",)
    ]

    # Rerun: nothing encoded, no data commit (only the run log row).
    again = embed_dataset(DS, cfg(), wh, progress=False)
    assert again.n_encoded == 0 and again.n_cached == 7
    assert (
        again.snapshot_id == s.snapshot_id + 1
    )  # s's run log: pipeline_runs + data_report, one commit

    # New items: only their strings are encoded.
    put_items(wh, [*ITEMS, ("4", "Heat (1995)", "", "Drama"), ("5", "Casino (1995)", "", "Drama")])
    more = embed_dataset(DS, cfg(), wh, progress=False)
    assert more.n_encoded == 2  # "Casino (1995)" and "Drama"; "Heat (1995)" is stored
    assert fetch(wh, "SELECT count(*) FROM item_text_features") == [(5,)]


def test_new_encoder_settings_make_a_new_version_and_keep_the_old(wh):
    put_items(wh, ITEMS[:2])
    a = embed_dataset(DS, cfg(), wh, progress=False)
    b = embed_dataset(DS, cfg(pooling="cls", max_length=32), wh, progress=False)
    assert a.encoder_version != b.encoder_version
    assert b.n_encoded == a.n_encoded == 4
    rows = fetch(wh, "SELECT encoder_version, count(*) FROM text_embeddings GROUP BY 1 ORDER BY 1")
    assert sorted(rows) == sorted([(a.encoder_version, 4), (b.encoder_version, 4)])
    per_version = fetch(
        wh, "SELECT encoder_version, count(*) FROM item_text_features GROUP BY 1 ORDER BY 1"
    )
    assert sorted(per_version) == sorted([(a.encoder_version, 2), (b.encoder_version, 2)])
    assert len(fetch(wh, "SELECT * FROM model_versions WHERE kind = 'encoder'")) == 2


def test_bad_text_is_handled_and_counted(wh):
    put_items(
        wh,
        [
            ("e", None, "", None),  # nothing at all
            ("w", "   ", " \t\n ", "Misc"),
            ("h", "Pen", "<p>Blue ink &amp; fine tip.</p><br>Refillable", "Office"),
            ("l", "Long", "word " * 20_000 + "end.", None),  # 100k characters
            ("u", "Caf\u00c3\u00a9 \ufffd 😀 打字机", "Пишущая машинка.", None),
        ],
    )
    s = embed_dataset(DS, cfg(), wh, progress=False)
    b = s.bad_text
    for kind in (
        sent.EMPTY,
        sent.WHITESPACE_ONLY,
        sent.HTML,
        sent.LONG_TEXT,
        sent.SENTENCE_CLIPPED,
        sent.MOJIBAKE,
        sent.REPLACEMENT_CHAR,
        sent.EMOJI,
        sent.NON_LATIN,
    ):
        assert b[kind] >= 1, kind
    assert s.n_items_without_text == b[sent.NO_SENTENCE] == 1
    assert b["token_truncated"] == s.n_truncated == 1  # the clipped 1,000-char sentence
    sentences = dict(
        fetch(wh, "SELECT item_id || ':' || sentence_idx, sentence FROM item_sentences")
    )
    assert sentences["h:1"] == "Blue ink & fine tip." and sentences["h:2"] == "Refillable"
    assert sentences["u:0"] == "Café 😀 打字机"
    assert "e:0" not in sentences and sentences["w:0"] == "Misc"
    feats = dict(fetch(wh, "SELECT item_id, n FROM item_text_features"))
    assert feats == {"w": 1, "h": 4, "l": 2, "u": 2}
    report = dict(fetch(wh, "SELECT check_name, n FROM data_report WHERE run_id = ?", [s.run_id]))
    assert report[sent.HTML] == b[sent.HTML] and report[sent.NO_SENTENCE] == 1


def test_unknown_dataset_names_the_known_ones(wh):
    put_items(wh, ITEMS[:1])
    with pytest.raises(ValueError, match=r"dataset='nope'.*test-ds"):
        embed_dataset("nope", cfg(), wh, progress=False)
    assert fetch(wh, "SELECT status FROM pipeline_runs") == [("failed",)]


def test_nearest_items_sql_from_the_docs(wh):
    put_items(
        wh,
        [
            ("cat", "Cat food for kittens", "", None),
            ("kit", "Kitten treats", "", None),
            ("bus", "City bus timetable", "", None),
        ],
    )
    embed_dataset(DS, cfg(), wh, progress=False)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "embedding.md").read_text()
    for block in re.findall(r"```sql\n(.*?)```", doc, re.S):  # every documented query runs
        assert not block.lstrip().startswith("--")  # `msm4sr sql` would take it for an option
        fetch(wh, block.replace("'ml-1m'", f"'{DS}'"))
    sql = re.search(r'id="nearest-items".*?```sql\n(.*?)```', doc, re.S)[1]
    rows = fetch(wh, sql.replace("'ml-1m'", f"'{DS}'").replace("'1'", "'cat'"))
    assert [r[0] for r in rows] == ["kit", "bus"]


def test_cli_embed(wh, monkeypatch):
    from flows import cli_embed

    put_items(wh, ITEMS[:2])
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(wh.root))
    monkeypatch.delenv("MSM4SR_LAKE_ATTACH", raising=False)
    app = typer.Typer()
    cli_embed.register(app)
    app.command("noop")(lambda: None)  # two commands: typer keeps `embed` as a subcommand
    res = CliRunner().invoke(
        app, ["embed", "--dataset", DS, "--device", "cpu", "--batch-size", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "encoded 4" in res.output and "2 items" in res.output
    res = CliRunner().invoke(app, ["embed", "--dataset", "nope", "--device", "cpu"])
    assert res.exit_code == 2 and "nope" in res.output
