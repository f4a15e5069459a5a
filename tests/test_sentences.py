"""Sentence splitting and text cleaning (pure functions, no model)."""

from __future__ import annotations

import hashlib

import pytest

from pipeline import sentences as s
from pipeline.sentences import SentenceConfig, TextStats, item_sentences


def split(title, text, cats):
    st = TextStats()
    return item_sentences(title, text, cats, st), st


def test_movielens_item_title_then_genres():
    out, st = split("Usual Suspects, The (1995)", "", "Crime, Thriller")
    assert out == ["The Usual Suspects (1995)", "Crime, Thriller"]
    out, _ = split("Toy Story (1995)", None, "Animation|Children's|Comedy")
    assert out == ["Toy Story (1995)", "Animation, Children's, Comedy"]
    assert s.fix_title("Enfer, L' (1994)") == "L'Enfer (1994)"
    assert s.fix_title("Confessional, The (Le Confessionnal) (1995)") == (
        "The Confessional (Le Confessionnal) (1995)"
    )
    assert s.fix_title("Seven (Se7en) (1995)") == "Seven (Se7en) (1995)"


def test_text_repeating_title_and_categories_adds_nothing():
    out, st = split("Heat (1995)", "Heat (1995) Action|Crime|Thriller", "Action|Crime|Thriller")
    assert out == ["Heat (1995)", "Action, Crime, Thriller"]
    assert st.counts[s.DUPLICATE] == 1
    # Amazon-style text "title + category + brand": the remainder becomes one sentence.
    out, _ = split("HP 12C Financial Calculator", "HP 12C Financial Calculator Scientific HP", None)
    assert out == ["HP 12C Financial Calculator", "Scientific HP"]


def test_description_split_keeps_abbreviations_and_order():
    text = "Made by Dr. Smith in the U.S. for you. It writes e.g. on paper! Really? Yes."
    out, _ = split("Pen", text, "Office Products > Pens")
    assert out == [
        "Pen",
        "Made by Dr. Smith in the U.S. for you.",
        "It writes e.g. on paper!",
        "Really?",
        "Yes.",
        "Office Products > Pens",
    ]
    assert s.split_sentences("日本の映画。すごい！次") == ["日本の映画。", "すごい！", "次"]


def test_at_most_ten_sentences_and_category_kept():
    text = " ".join(f"Sentence number {i}." for i in range(30))
    out, st = split("Title", text, "Cat A|Cat B")
    assert len(out) == 10
    assert out[0] == "Title" and out[-1] == "Cat A, Cat B"
    assert out[1:9] == [f"Sentence number {i}." for i in range(8)]
    assert st.counts[s.OVER_CAP] == 22


def test_html_stripped_and_block_tags_split():
    out, st = split(
        "Stapler",
        "<p>Heavy duty &amp; quiet.</p><ul><li>Blue</li><li>20 sheets</li></ul>"
        "<script>alert(1)</script><br/>Made of <b>steel</b>",
        None,
    )
    assert out == ["Stapler", "Heavy duty & quiet.", "Blue", "20 sheets", "Made of steel"]
    assert st.counts[s.HTML] == 1
    assert not any("<" in x or "alert" in x for x in out)


def test_bad_text_kinds_are_repaired_and_counted():
    st = TextStats()
    assert item_sentences(None, "   \t\n ", "", st) == []
    assert st.counts[s.EMPTY] == 2 and st.counts[s.WHITESPACE_ONLY] == 1
    assert st.counts[s.NO_SENTENCE] == 1

    out = item_sentences("Caf\u00c3\u00a9 \u00e2\u20ac\u0153Noir\u00e2\u20ac\u009d", None, None, st)
    assert out == ["Café “Noir”"] and st.counts[s.MOJIBAKE] == 1

    out = item_sentences("Bad \ufffd bytes\x00 here\u200b", None, None, st)
    assert out == ["Bad bytes here"]
    assert st.counts[s.REPLACEMENT_CHAR] == 1 and st.counts[s.CONTROL_CHARS] == 1

    out = item_sentences("Пишущая машинка 😀 打字机", None, None, st)
    assert out == ["Пишущая машинка 😀 打字机"]  # kept as is
    assert st.counts[s.EMOJI] == 1 and st.counts[s.NON_LATIN] == 1

    huge = "word " * 20_000 + "end."  # 100k characters, no sentence end before the last
    out = item_sentences("Long", huge, None, st)
    assert st.counts[s.LONG_TEXT] == 1 and st.counts[s.SENTENCE_CLIPPED] == 1
    assert len(out) == 2 and len(out[1]) <= SentenceConfig().max_sentence_chars
    assert out[1].endswith("word")  # clipped at a word boundary
    assert set(st.examples) >= {s.EMPTY, s.MOJIBAKE, s.LONG_TEXT, s.EMOJI}


@pytest.mark.parametrize("text", ["a cat", "Café 😀 打字机", "", "x" * 1000])
def test_text_sha256_is_utf8_sha256(text):
    assert s.text_sha256(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
