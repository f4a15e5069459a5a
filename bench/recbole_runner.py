"""Runs RecBole's SASRec on one atomic dataset and writes its time-to-quality curve as JSON.

Executed by bench/peer_recbole.py with the python of RecBole's own venv (RecBole 1.2.1 is not a
project dependency): it imports nothing from this project. Usage:

    V/bin/python bench/recbole_runner.py CONFIG.json OUT.json

CONFIG.json holds RecBole's config dict (data_path, dataset and the protocol of
../shared/RECBOLE.md) plus the runner's own keys `_compile` (torch.compile the model's forward,
which halves RecBole's epoch time on CPU) and `_threads`. OUT.json gets, per epoch, the wall
seconds since training started (training + validation) and the validation NDCG@10, then the
best validation score and the test metrics of the best epoch's weights, and each test case's
user and target rank (`test_cases`) for paired comparisons.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

# RecBole's checkpoint holds its Config object: torch >= 2.6 refuses to unpickle it by default.
_load = torch.load
torch.load = lambda *a, **k: _load(*a, **{**k, "weights_only": False})  # noqa: E731

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_seed  # noqa: E402


def main(config_path: str, out_path: str) -> None:
    params = json.loads(open(config_path).read())
    compile_ = params.pop("_compile", True)
    threads = params.pop("_threads", 0)
    if threads:
        torch.set_num_threads(threads)
    config = Config(model="SASRec", dataset=params["dataset"], config_dict=params)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if compile_:
        model.forward = torch.compile(model.forward)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    curve: list[dict] = []
    t0 = time.perf_counter()

    def on_valid(epoch_idx: int, valid_score: float) -> None:
        curve.append(
            {
                "epoch": epoch_idx + 1,
                "seconds": time.perf_counter() - t0,
                "valid_ndcg10": float(valid_score),
            }
        )
        _write(out_path, {"curve": curve, "finished": False})  # readable while it runs

    best_valid, _ = trainer.fit(
        train_data, valid_data, saved=True, show_progress=False, callback_fn=on_valid
    )
    train_seconds = time.perf_counter() - t0
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    cases = case_ranks(trainer, test_data, dataset)  # the best epoch's weights, loaded above
    _write(
        out_path,
        {
            "curve": curve,
            "finished": True,
            "train_seconds": train_seconds,
            "best_valid_ndcg10": float(best_valid),
            "best_epoch": max(curve, key=lambda c: c["valid_ndcg10"])["epoch"] if curve else 0,
            "test": {k: float(v) for k, v in test.items()},
            "n_train_sequences": len(train_data.dataset),
            "n_items": int(dataset.item_num - 1),
            "n_users": int(dataset.user_num - 1),
            "test_cases": cases,
        },
    )


def case_ranks(trainer, test_data, dataset) -> dict:
    """Per test case, the user's token (the source user id) and the 0-based rank of its target
    among all items, scored exactly as RecBole's own full-sort evaluation scores them (its
    `_full_sort_batch_eval`: padding item -inf, history kept for sequential data): what a paired
    comparison with another system on the same cases needs. Rank = items scored strictly higher."""
    uid = trainer.config["USER_ID_FIELD"]
    users: list[str] = []
    ranks: list[int] = []
    trainer.model.eval()
    with torch.no_grad():
        for batch in test_data:
            interaction, scores, pos_u, pos_i = trainer._full_sort_batch_eval(batch)
            pos = scores[pos_u, pos_i]
            ranks += (scores[pos_u] > pos[:, None]).sum(1).tolist()
            users += [str(t) for t in dataset.id2token(uid, interaction[uid][pos_u].cpu().numpy())]
    return {"user_ids": users, "ranks": ranks}


def _write(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
