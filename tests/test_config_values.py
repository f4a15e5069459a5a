"""Issue 12, case 8: trainer settings from --set / --config / flags are converted to their
field's type or refused with one line naming the key, the value and the expected type; ranges
(heads, layers, k, device) are checked before any data is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli_train import build_config
from tests.cli_run import msm4sr, one_line_error
from trainer.config import Config, merge, parse_override


@pytest.fixture(autouse=True)
def empty_warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pretrain", "--set", "model.hidden_size=abc"], "model.hidden_size='abc' is not an int"),
        (["pretrain", "--set", "model.n_layers=1.5"], "model.n_layers=1.5 is not an int"),
        (["finetune", "--set", "finetune.lr=abc"], "finetune.lr='abc' is not a finite float"),
        (["pretrain", "--set", "model.n_heads=0"], "model.n_heads=0 must be >= 1"),
        (["pretrain", "--set", "model.n_heads=3"], "not divisible by n_heads=3"),
        (["finetune", "--set", "finetune.lr_decay=0"], "finetune.lr_decay=0.0 must be in (0, 1]"),
        (["train", "--set", "model.mixup=perhaps"], "model.mixup='perhaps' is not a bool"),
        (["train", "--set", "eval.ks=[10, 0]"], "eval.ks=(10, 0) must be cut-offs >= 1"),
        (["pretrain", "--set", "model.x=[1"], "not valid YAML"),
        (["pretrain", "--device", "tpu"], "runtime.device='tpu' is not one of"),
        (["evaluate", "some-run", "--device", "gpu0"], "runtime.device='gpu0' is not one of"),
        (["recommend", "--run", "r", "--user", "1", "-k", "-5"], "-k -5"),
    ],
)
def test_bad_settings_are_one_line_errors(args: list[str], expected: str) -> None:
    line = one_line_error(msm4sr(*args))
    assert expected in line, line


def test_values_are_converted_to_their_field_types(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-3 as the string "1e-3": it must still be the float 0.001.
    cfg = merge(Config(), parse_override("finetune.lr=1e-3"))
    assert cfg.finetune.lr == 0.001 and isinstance(cfg.finetune.lr, float)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "finetune:\n  lr: 1e-4\n  seed: '7'\nmodel:\n  n_heads: 4\n  mixup: 'false'\n"
        "eval:\n  ks: [5, 10]\ndata:\n  snapshot: null\n"
    )
    cfg = build_config("both", "ml-1m", yaml_file, ["pretrain.max_epochs=2.0", "eval.ks=5,20"])
    assert cfg.finetune.lr == 1e-4 and cfg.finetune.seed == 7
    assert cfg.model.n_heads == 4 and cfg.model.mixup is False
    assert cfg.pretrain.max_epochs == 2 and isinstance(cfg.pretrain.max_epochs, int)
    assert cfg.eval.ks == (5, 20) and cfg.data.snapshot is None
    assert build_config("pretrain", "ml-1m", None, None, device="cuda:1").runtime.device == "cuda:1"
