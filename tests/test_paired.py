"""The report's paired bootstrap (trainer/paired.py): the gain of one row over another on the
same test cases, with a 95% interval over resamples of the cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.store import WarehouseConfig
from trainer.paired import bootstrap_gain
from trainer.report import Row, paired_intervals


def test_identical_rows_gain_nothing_and_a_constant_ratio_is_exact() -> None:
    ref = np.random.default_rng(1).exponential(size=2000)
    assert bootstrap_gain(ref, ref) == (0.0, 0.0, 0.0)
    gain, low, high = bootstrap_gain(1.2 * ref, ref)
    assert gain == pytest.approx(0.2) and low == pytest.approx(0.2) and high == pytest.approx(0.2)


def test_the_interval_covers_zero_for_equal_models_and_pairing_narrows_it() -> None:
    rng = np.random.default_rng(2)
    n = 4000
    # two equal models scored independently: no gain, the interval straddles 0
    gain, low, high = bootstrap_gain(rng.exponential(size=n), rng.exponential(size=n))
    assert low < 0 < high and abs(gain) < 0.1
    # a 5% better model on the same cases whose difficulty varies a lot: unpaired, a 5% gain is
    # inside the cases' noise (the interval above is ~ +-6%); paired, it is clearly above 0
    hard = rng.exponential(size=n)
    ours = hard * 1.05 + rng.normal(0, 0.01, size=n)
    gain, low, high = bootstrap_gain(ours, hard)
    assert 0.04 < low < gain < high < 0.06


def test_unpaired_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="paired cases"):
        bootstrap_gain(np.ones(3), np.ones(4))


def test_a_missing_checkpoint_is_said_in_the_target_line_not_raised(tmp_path: Path) -> None:
    rows = [
        Row("d", "main", model, 1, run, "test", "all", "NDCG@10", v)
        for model, run, v in (("MSM4SR", "run-a", 0.06), ("SASRec (ID)", "run-b", 0.05))
    ]
    got = paired_intervals(rows, ["d"], WarehouseConfig(root=tmp_path))
    assert list(got) == [("d", "MSM4SR", "SASRec (ID)", "all")]
    text = got[("d", "MSM4SR", "SASRec (ID)", "all")]
    assert text.startswith("no paired interval: run 'run-a' has no checkpoint")
