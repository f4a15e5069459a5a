"""bench/stop_rule.py's stop rule: patience with an optional relative min_delta, read off a curve."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "stop_rule", Path(__file__).resolve().parents[1] / "bench" / "stop_rule.py"
)
stop_rule = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stop_rule)

CREEP = [(1, 0.10), (2, 0.12), (3, 0.1201), (4, 0.1202), (5, 0.1203), (6, 0.13), (7, 0.1301)]


def test_patience_alone_is_the_trainers_rule() -> None:
    # any gain resets the patience: a creeping curve never stops
    assert stop_rule.stop(CREEP, 2) == (0.1301, 7, 7)
    # two epochs in a row below the best (0.10 at 1) stop at the second of them
    assert stop_rule.stop([(1, 0.10), (2, 0.09), (3, 0.095), (4, 0.11)], 2) == (0.10, 1, 3)


def test_min_delta_stops_on_a_creep_and_keeps_the_best_epoch() -> None:
    # 0.1201 and 0.1202 do not beat 0.12 by 1%: stop at 4, the checkpoint still holds epoch 4
    assert stop_rule.stop(CREEP, 2, 0.01) == (0.1202, 4, 4)
    # patience 4 waits for 0.13 (> 0.12 * 1.01), then 0.1301 is not 1% above it: no stop
    assert stop_rule.stop(CREEP, 4, 0.01) == (0.1301, 7, 7)


@pytest.mark.parametrize("patience", [1, 2, 3, 5])
@pytest.mark.parametrize("min_delta", [0.001, 0.01, 0.1])
def test_min_delta_never_stops_later(patience: int, min_delta: float) -> None:
    # what makes it computable from a run logged without it: it is a prefix of that run
    curve = [(e, 0.1 + 0.01 * ((e * 7) % 5) + 0.002 * e) for e in range(1, 40)]
    plain, late = stop_rule.stop(curve, patience), stop_rule.stop(curve, patience, min_delta)
    assert late[2] <= plain[2] and late[0] <= plain[0]


def test_a_trained_run_is_checked_against_the_logged_curve_cut_at_its_stop() -> None:
    logged = (CREEP, 10, 0.0)
    # trained with patience 2, min_delta 1%: the logged curve up to epoch 4
    assert stop_rule.check_trained(logged, (CREEP[:4], 2, 0.01)) == {
        "patience": 2,
        "min_delta": 0.01,
        "predicted": {"best": 0.1202, "best_epoch": 4, "epochs": 4},
        "trained_epochs": 4,
        "curve_is_the_cut_logged_curve": True,
    }
    # one epoch too many, or a different score, is not the predicted run
    assert not stop_rule.check_trained(logged, (CREEP[:5], 2, 0.01))[
        "curve_is_the_cut_logged_curve"
    ]
    other = [*CREEP[:3], (4, 0.1203)]
    assert not stop_rule.check_trained(logged, (other, 2, 0.01))["curve_is_the_cut_logged_curve"]
