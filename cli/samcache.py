"""``samcache``: extract embeddings once, then inspect, verify or convert the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ._common import console, err_console, run, say, user_errors, warn

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run a frozen SAM-family encoder over a dataset once and store the embeddings. "
                       "Add --debug anywhere to see the traceback of an error.")

EXIT_SKIPPED = 3


@app.command()
def extract(
    dataset: Path = typer.Option(..., help="Image folder (<split>/<class>/ or <class>/), CSV manifest or .npz."),
    out: str = typer.Option(..., help="Store path: a .zarr folder (default format) or a .h5 file."),
    encoder: str = typer.Option("litemedsam", help="vit_b, vit_l, vit_h, medsam, litemedsam or tiny (tests)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Encoder weights file (required for SAM ViTs and medsam)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Use seeded random weights (benchmarks only)."),
    dtype: str = typer.Option("float16", help="Stored embedding dtype: float16, bfloat16, float32 or int8 (per-channel scales, half the size)."),
    image_size: int = typer.Option(224, help="Also store each image at this size in the embedding's frame; 0: don't."),
    batch_size: int = typer.Option(8, help="Images per encoder batch."),
    workers: int = typer.Option(2, help="DataLoader processes that decode and resize."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ...; default: cuda when available."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing store and start over (default: resume)."),
    shard_size: int = typer.Option(16, help="Samples per Zarr shard file."),
    block_size: Optional[int] = typer.Option(None, help="Rows per unit of torchrun work (multiple of --shard-size)."),
    window: str = typer.Option("auto", help="Deep (16-bit, DICOM) images to 8 bits: auto, minmax or LO,HI."),
    seed: int = typer.Option(0, help="Seed of the stratified split, for data without split folders."),
    val_fraction: float = typer.Option(0.1, help="Validation fraction of a drawn split."),
    test_fraction: float = typer.Option(0.2, help="Test fraction of a drawn split."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    attention: str = typer.Option("auto", help="SAM ViT attention: sdpa (fused, equal to stock), stock, or auto (sdpa on CUDA)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder."),
) -> None:
    """Extract one 256x64x64 embedding per image into a store. A rerun resumes."""
    from sam_cache import extract_dataset

    with user_errors():
        result = extract_dataset(
            dataset, out, encoder, checkpoint=checkpoint, random_weights=random_weights, dtype=dtype,
            image_size=image_size, batch_size=batch_size, num_workers=workers, device=device,
            overwrite=overwrite, shard_size=shard_size, block_size=block_size, window=window, seed=seed,
            val_fraction=val_fraction, test_fraction=test_fraction, progress=progress, attention=attention,
            compile=compile,
        )
    if result.rank != 0:  # under torchrun, rank 0 speaks for all
        raise typer.Exit(EXIT_SKIPPED if result.skipped else 0)
    console.print(
        f"stored {result.written} new embeddings in {result.store_path} "
        f"({result.already_done} already done, {result.total} in all) "
        f"in {result.seconds:.1f} s, {result.images_per_second:.1f} img/s"
    )
    if result.skipped:
        err_console.print(f"[bold yellow]skipped {len(result.skipped)} image(s)[/] that could not be read:")
        for s in result.skipped:
            warn(f"  {s['source']}: {s['error']}")
        err_console.print("They are recorded in the store (samcache info) and retried by the next run.")
        raise typer.Exit(EXIT_SKIPPED)


@app.command()
def convert(
    store: str = typer.Argument(..., help="The source store."),
    out: str = typer.Option(..., help="The new store (.zarr or .h5)."),
    dtype: str = typer.Option("int8", help="Stored embedding dtype of the new store: int8, float16, bfloat16 or float32."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per Zarr shard file (default: the source's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing OUT first (default: resume it)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Re-encode a store's embeddings in another stored form, without running the encoder."""
    from sam_cache import convert_store

    with user_errors():
        r = convert_store(store, out, dtype, shard_size=shard_size, overwrite=overwrite, progress=progress)
    console.print(f"converted {r['rows']} rows into {out} ({r['done']} done in all): "
                  f"{r['src_bytes'] / 2**20:.2f} -> {r['dst_bytes'] / 2**20:.2f} MiB of embedding per sample")


@app.command()
def masks(
    store: str = typer.Argument(..., help="A store with images (samcache extract --image-size)."),
    prompt: str = typer.Option("box", help="box (the whole image), candidates (7 boxes, best predicted IoU) or "
                                          "csv (--boxes)."),
    boxes: Optional[Path] = typer.Option(None, help="CSV of boxes for --prompt csv: id,x0,y0,x1,y1 in image pixels."),
    checkpoint: Optional[Path] = typer.Option(None, help="The encoder checkpoint the store was made with (SAM ViTs, "
                                                        "medsam; litemedsam uses its packaged one)."),
    threshold: float = typer.Option(0.0, help="Mask logit threshold (0: probability 0.5)."),
    batch_size: int = typer.Option(16, help="Samples read and written per step."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ...; default: cuda when available."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace masks made differently (embeddings are kept)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Decode a SAM mask per sample from the cached embeddings (no encoder pass) into the store. A rerun resumes."""
    from sam_cache.masks import decode_masks

    with user_errors():
        r = decode_masks(store, prompt=prompt, boxes=boxes, checkpoint=checkpoint, threshold=threshold,
                         batch_size=batch_size, device=device, overwrite=overwrite, progress=progress)
    say(f"stored {r['written']} new masks in {store} ({r['already_done']} already done, {r['total']} in all); "
        f"mean predicted IoU {r['mean_iou']:.3f}, {r['empty']} empty")


@app.command()
def info(
    store: str = typer.Argument(..., help="Store path."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Summarize a store: samples, encoder, signature, labels per split."""
    from sam_cache import summarize_store

    with user_errors():
        summary = summarize_store(store)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    from rich.table import Table

    head = Table(show_header=False, box=None)
    shape = "x".join(map(str, summary["embedding_shape"]))
    rows = [
        ("store", f"{summary['path']} ({summary['format']}, {_size(summary['disk_bytes'])})"),
        ("samples", f"{summary['done']} of {summary['samples']} done, {shape} {summary['dtype']}"),
        ("encoder", summary["encoder"] + (" (random weights)" if summary["random_weights"] else "")),
        ("checkpoint", str(summary["checkpoint_sha256"] or "-")[:16]),
        ("input", f"{summary['preprocessing']['input_size']} px, window {summary['preprocessing']['window']}"),
        ("images", f"{summary['image_size']} px" if summary["image_size"] else "not stored"),
        ("masks", _masks_line(summary["masks"])),
        ("skipped", str(len(summary["skipped"]))),
        ("created", f"{summary['created']} by samcache {summary['package_version']}"),
    ]
    for k, v in rows:
        head.add_row(f"[bold]{k}", v)
    console.print(head)
    counts = Table(title="labels per split")
    counts.add_column("class")
    for split in summary["label_counts"]:
        counts.add_column(split, justify="right")
    for name in summary["class_names"]:
        counts.add_row(name, *(str(summary["label_counts"][s][name]) for s in summary["label_counts"]))
    console.print(counts)


def _masks_line(m: dict | None) -> str:
    if not m:
        return "none (samcache masks adds them)"
    return f"{m['done']} done, prompt {m['prompt']}, decoder {m['decoder']}, mean predicted IoU {m['mean_iou']:.3f}"


def _size(n: int | None) -> str:
    if n is None:
        return "remote"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


@app.command()
def verify(store: str = typer.Argument(..., help="Store path.")) -> None:
    """Check that every done sample is present, finite and of the right shape. Exit 1 if not."""
    from rich.progress import Progress

    from sam_cache import EmbeddingStore, verify_store

    with user_errors():
        with EmbeddingStore.open(store) as s:
            n = int(s.done.sum())
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("verify", total=n)
            problems = verify_store(store, progress=lambda k: bar.update(task, completed=k))
    if problems:
        for p in problems:
            err_console.print(f"[red]{p}", highlight=False)
        err_console.print(f"[bold red]{len(problems)} problem(s)[/] in {store}")
        raise typer.Exit(1)
    console.print(f"{store}: {n} done samples verified, all finite and 256x64x64")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
