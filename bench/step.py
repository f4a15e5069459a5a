"""Step bench: seconds per training step on CPU, CPU dropout kernel vs torch's, fp32 vs bf16.

Times, in one process, the median of N optimizer steps of M2SE fine-tuning (text+image), M2SE
pre-training and SASRec fine-tuning on a dataset's real features, once with the trainer's CPU
dropout (`trainer.layers.dropout`: uniform >= p) and once with `torch.nn.functional.dropout`
(bernoulli_) patched in; plus the two dropout kernels alone on the adaptor's [items, 8, 64] shape.
Then the same steps under CPU bf16 autocast (`--set runtime.amp=bf16`: matrix products in
bfloat16, weights and softmax in float32), against fp32, with whether this CPU has native bf16.

    .venv/bin/python bench/step.py                  # --dataset ml-1m --batch 2048 --steps 7

Writes bench/results/step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer import layers  # noqa: E402
from trainer.config import resolve  # noqa: E402
from trainer.data import iterate_batches, train_samples  # noqa: E402
from trainer.stages import data_for  # noqa: E402
from trainer.trainer import build_model, stage_loss, with_data_defaults  # noqa: E402


def median_seconds(fn: Callable[[], object], n: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training)


def step_fns(dataset: str, batch: int) -> dict[str, Callable[[], object]]:
    fns = {}
    for name, arch, stage in (
        ("m2se_finetune", "m2se", "finetune"),
        ("m2se_pretrain", "m2se", "pretrain"),
        ("sasrec_finetune", "sasrec", "finetune"),
    ):
        cfg = resolve([{"data": {"dataset": dataset}, "model": {"arch": arch}}])
        data = data_for(cfg, None)
        cfg = with_data_defaults(cfg, data)
        model = build_model(cfg, data, stage).train()
        tcfg = getattr(cfg, stage)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        samples = train_samples(data, tcfg.sample_mode, tcfg.window_stride, 2020, 1)
        b = next(iter(iterate_batches(data, samples, batch, 2020, 1)))

        def step(model=model, opt=opt, b=b, tcfg=tcfg, stage=stage, feats=data.features) -> None:
            out = stage_loss(model, feats, b, stage, tcfg)
            opt.zero_grad()
            out.loss.backward()
            opt.step()

        fns[name] = step
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--batch", type=int, default=2048, help="targets per step")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(2020)

    x = torch.randn(3707, 8, 64, requires_grad=True)
    kernels = {
        "torch F.dropout": median_seconds(lambda: F.dropout(x, 0.2, True), 21),
        "trainer.layers.dropout": median_seconds(lambda: layers.dropout(x, 0.2, True), 21),
    }
    print(
        "dropout p=0.2 on [3707, 8, 64], ms: "
        + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in kernels.items())
    )

    fns = step_fns(args.dataset, args.batch)
    ours = layers.dropout
    steps: dict[str, dict[str, float]] = {}
    for name, fn in fns.items():
        layers.dropout = torch_dropout
        native = median_seconds(fn, args.steps)
        layers.dropout = ours
        fast = median_seconds(fn, args.steps)
        steps[name] = {
            "torch_dropout_s": native,
            "trainer_dropout_s": fast,
            "speedup": native / fast,
        }
        print(
            f"{name}: {native:.3f} s with torch's dropout, {fast:.3f} s with the trainer's ({native / fast:.2f}x)"
        )

    bf16: dict[str, dict[str, float]] = {}
    for name, fn in fns.items():

        def under_bf16(fn: Callable[[], object] = fn) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fn()

        fp32, half = median_seconds(fn, args.steps), median_seconds(under_bf16, args.steps)
        bf16[name] = {"fp32_s": fp32, "bf16_autocast_s": half, "speedup": fp32 / half}
        print(f"{name}: {fp32:.3f} s fp32, {half:.3f} s bf16 autocast ({fp32 / half:.2f}x)")

    result = {
        "dataset": args.dataset,
        "batch_targets": args.batch,
        "threads": args.threads,
        "steps_timed": args.steps,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "dropout_kernel_s": kernels,
        "step_seconds": steps,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "bf16_step_seconds": bf16,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
