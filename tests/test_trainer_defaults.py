"""Each architecture carries its own defaults: `model.arch=sasrec` alone gives SASRec's, and
whatever the user sets wins over them, from a YAML file, --set or a flag, in any order."""

from __future__ import annotations

from pathlib import Path

from flows.cli_train import build_config
from trainer.config import ARCH_DEFAULTS, Config, defaults, resolve


def test_sasrec_gets_its_own_defaults_from_the_arch_alone() -> None:
    sas = build_config("finetune", "x", None, ["model.arch=sasrec"])
    want = ARCH_DEFAULTS["sasrec"]
    assert sas.model.arch == "sasrec"
    for section, values in want.items():
        for k, v in values.items():
            assert getattr(getattr(sas, section), k) == v, (section, k)
    m2se = build_config("finetune", "x", None, [])
    assert m2se.model.arch == "m2se" and m2se == resolve(
        [{"data": {"dataset": "x"}, **_runtime(m2se)}]
    )
    # The two really differ where the table says so (else the table would be dead).
    assert any(
        getattr(getattr(sas, s), k) != getattr(getattr(m2se, s), k)
        for s, values in want.items()
        for k in values
    )


def test_user_values_win_over_the_arch_defaults_in_any_order(tmp_path: Path) -> None:
    a = build_config("finetune", "x", None, ["model.hidden_dropout=0.1", "model.arch=sasrec"])
    b = build_config("finetune", "x", None, ["model.arch=sasrec", "model.hidden_dropout=0.1"])
    assert a.model.hidden_dropout == b.model.hidden_dropout == 0.1
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model: {arch: sasrec}\nfinetune: {lr: 0.005}\n")
    c = build_config("finetune", "x", yaml, None, lr=None)
    assert (c.model.arch, c.finetune.lr) == ("sasrec", 0.005)
    assert c.model.hidden_dropout == defaults("sasrec").model.hidden_dropout
    d = build_config("finetune", "x", yaml, None, lr=0.002)  # a flag beats the file
    assert d.finetune.lr == 0.002


def test_a_saved_config_round_trips_for_every_arch() -> None:
    for arch in ARCH_DEFAULTS:
        cfg = defaults(arch)
        assert Config.from_dict(cfg.to_dict()) == cfg


def _runtime(cfg: Config) -> dict:
    return {"runtime": cfg.to_dict()["runtime"]}


def test_sasrec_dropout_follows_the_datas_density() -> None:
    """SASRec's dropout is chosen when the run sees its data (the SASRec paper's rule): 0.2 when
    the users' train sequences fill the window on average (ML-1M), 0.5 when they do not
    (Amazon); a value the user set is kept, and M2SE's stays its own."""
    from tests.test_trainer_data import _toy
    from trainer.trainer import with_data_defaults

    sas = defaults("sasrec")
    assert sas.model.hidden_dropout is None  # resolved per dataset, not here
    # toy: mean train length (7 + 2) / 2 = 4.5 items
    dense, sparse = _toy(max_len=3), _toy(max_len=50)
    assert (
        with_data_defaults(sas, dense).model.hidden_dropout,
        with_data_defaults(sas, dense).model.attn_dropout,
    ) == (0.2, 0.2)
    assert (
        with_data_defaults(sas, sparse).model.hidden_dropout,
        with_data_defaults(sas, sparse).model.attn_dropout,
    ) == (0.5, 0.5)
    mine = resolve([{"model": {"arch": "sasrec", "attn_dropout": 0.1}}])
    assert (
        with_data_defaults(mine, sparse).model.hidden_dropout,
        with_data_defaults(mine, sparse).model.attn_dropout,
    ) == (0.5, 0.1)
    assert with_data_defaults(defaults("m2se"), sparse).model.hidden_dropout == 0.2


def test_batch_and_lr_follow_the_data_and_the_stage() -> None:
    """Fine-tuning batches hold ~1/512 of an epoch's targets within [256, 2048] for both models;
    only M2SE's pre-training takes larger ones. M2SE's fine-tuning lr follows the batch (1e-3 up
    to 512 targets, in proportion above: 4e-3 at 2048); SASRec's is 2e-3; a set lr is kept."""
    from trainer.config import auto_batch, batch_lr

    office, ml1m = 38_500, 982_000
    for arch in ("sasrec", "m2se"):
        assert (auto_batch(office, arch), auto_batch(ml1m, arch)) == (256, 2048)
    assert auto_batch(ml1m, "m2se", "pretrain") == 8192
    assert batch_lr(256) == batch_lr(512) == 1e-3
    assert batch_lr(1024) == 2e-3 and batch_lr(2048) == 4e-3
    assert defaults("m2se").finetune.lr is None and defaults("m2se").pretrain.lr == 1e-3
    assert defaults("sasrec").finetune.lr == 2e-3
