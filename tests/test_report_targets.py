"""The report's target lines: judged on test NDCG@10 between trained rows, never between two rows
that are the same runs, never on a small subset."""

from __future__ import annotations

from trainer.report import Row, runs_of, summarise, targets


def _rows(model: str, run: str, ndcg: float, recall: float, best: int = 5, epochs: int = 9,
          ds: str = "d", n_cold: int = 500) -> list[Row]:  # fmt: skip
    vals = [
        ("test", "all", "NDCG@10", ndcg),
        ("test", "all", "Recall@10", recall),
        ("test", "cold", "NDCG@10", ndcg),
        ("test", "cold", "Recall@10", recall),
        ("test", "cold", "n_cases", n_cold),
        ("train", "all", "best_epoch", best),
        ("train", "all", "epochs", epochs),
    ]
    return [Row(ds, "main", model, 1, run, sp, sub, m, v) for sp, sub, m, v in vals]


def _line(lines: list[str], ours: str, ref: str, subset: str = "all") -> str:
    return next(x for x in lines if f"`{subset}`" in x and f"{ours} vs {ref} " in x)


def test_judged_on_ndcg_with_recall_shown() -> None:
    rows = _rows("MSM4SR", "a", 0.117, 0.111) + _rows("SASRec (ID)", "b", 0.100, 0.100)
    line = _line(targets(summarise(rows), ["d"], runs_of(rows)), "MSM4SR", "SASRec (ID)")
    assert "+17.0%" in line and "+11.0%" in line and line.endswith("**reached**")
    rows = _rows("MSM4SR", "a", 0.114, 0.200) + _rows("SASRec (ID)", "b", 0.100, 0.100)
    line = _line(targets(summarise(rows), ["d"], runs_of(rows)), "MSM4SR", "SASRec (ID)")
    assert line.endswith("**NOT reached**")


def test_the_same_runs_are_not_compared() -> None:
    rows = _rows("MSM4SR", "a", 0.1, 0.2) + _rows("Text-only pre-trained", "a", 0.1, 0.2)
    line = _line(targets(summarise(rows), ["d"], runs_of(rows)), "MSM4SR", "Text-only pre-trained")
    assert "not judged: the same runs" in line
    rows = _rows("MSM4SR", "a", 0.1, 0.2) + _rows("Text-only pre-trained", "c", 0.1, 0.2)
    line = _line(targets(summarise(rows), ["d"], runs_of(rows)), "MSM4SR", "Text-only pre-trained")
    assert line.endswith("**NOT reached**")


def test_untrained_rows_and_small_subsets_are_not_judged() -> None:
    rows = _rows("MSM4SR", "a", 0.2, 0.2) + _rows("SASRec (ID)", "b", 0.1, 0.1, best=9)
    line = _line(targets(summarise(rows), ["d"], runs_of(rows)), "MSM4SR", "SASRec (ID)")
    assert "not judged: SASRec (ID) not trained to early stop" in line
    rows = _rows("MSM4SR", "a", 0.2, 0.2, n_cold=40) + _rows("SASRec (ID)", "b", 0.1, 0.1)
    line = _line(targets(summarise(rows), ["d"], runs_of(rows)), "MSM4SR", "SASRec (ID)", "cold")
    assert "not judged: fewer than 100 test cases" in line


def test_zero_against_zero_is_no_gain_not_plus_zero() -> None:
    rows = _rows("MSM4SR", "a", 0.0, 0.0) + _rows("SASRec (ID)", "b", 0.0, 0.0)
    line = _line(targets(summarise(rows), ["d"], runs_of(rows)), "MSM4SR", "SASRec (ID)")
    assert "NDCG@10 0.0000 vs 0 (no gain: both 0)" in line and "+0.0%" not in line, line
    assert line.endswith("**NOT reached**")
    rows = _rows("MSM4SR", "a", 0.01, 0.02) + _rows("SASRec (ID)", "b", 0.0, 0.0)
    line = _line(targets(summarise(rows), ["d"], runs_of(rows)), "MSM4SR", "SASRec (ID)")
    assert "NDCG@10 0.0100 vs 0 (+inf%)" in line and line.endswith("**reached**"), line
