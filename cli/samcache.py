"""``samcache``: extract embeddings once, then inspect, verify or convert the store."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import typer

from sam_cache.options import DEVICE_HELP

from ._common import console, err_console, run, say, user_errors, warn
from ._options import flat_values, signature_with

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run a frozen SAM-family encoder over a dataset once and store the embeddings. "
                       "Add --debug anywhere to see the traceback of an error.")

EXIT_SKIPPED = 3


def extract(**values) -> None:
    """Extract one 256x64x64 embedding per image into a store. A rerun resumes."""
    from sam_cache import extract_dataset
    from sam_cache.extract_config import ExtractConfig, extract_options

    dataset, out = values.pop("dataset"), values.pop("out")
    with user_errors():
        config = ExtractConfig(**flat_values(values, extract_options()))
        config.progress = config.progress and console.is_terminal  # no bar in a file or a pipe
        result = extract_dataset(dataset, out, config=config)
    if result.rank != 0:  # under torchrun, rank 0 speaks for all
        raise typer.Exit(EXIT_SKIPPED if result.skipped else 0)
    if result.recreated:
        warn(f"{result.store_path}: an earlier run was stopped while creating this store, before any row was "
             "written; it was created again")
    say(f"stored {result.written} new embeddings in {result.store_path} "
        f"({result.already_done} already done, {result.total} in all) "
        f"in {result.seconds:.1f} s, {result.images_per_second:.1f} img/s")
    if result.suspect:
        warn(f"{len(result.suspect)} stored image(s) hold no picture; check them (all listed by "
             f"`samcache info --json {result.store_path}`):")
        for s in result.suspect[:5]:
            warn(f"  {s['source']}: {s['problem']}")
        if len(result.suspect) > 5:
            warn(f"  ... and {len(result.suspect) - 5} more")
    if result.skipped:
        err_console.print(f"[bold yellow]skipped {len(result.skipped)} image(s)[/] that could not be read:")
        for s in result.skipped:
            warn(f"  {s['source']}: {s['error']}")
        warn("They are recorded in the store (samcache info) and retried by the next run.")
        raise typer.Exit(EXIT_SKIPPED)


def _extract_signature():
    from sam_cache.extract_config import extract_options

    P = inspect.Parameter
    extra = [P("dataset", P.KEYWORD_ONLY, annotation=Path, default=typer.Option(
                 ..., help="Image folder (<split>/<class>/ or <class>/), CSV manifest or .npz.")),
             P("out", P.KEYWORD_ONLY, annotation=str, default=typer.Option(
                 ..., help="Store path: a .zarr folder (default format) or a .h5 file."))]
    return signature_with(extract, extra, extract_options())


app.command()(_extract_signature())


@app.command()
def convert(
    store: str = typer.Argument(..., help="The source store."),
    out: str = typer.Option(..., help="The new store (.zarr or .h5)."),
    dtype: Optional[str] = typer.Option(None, help="Stored dtype: int8, float16, bfloat16 or float32 (default: int8, "
                                                   "or the source's when --grid is given)."),
    grid: Optional[int] = typer.Option(None, help="A compact grid: 32, 16 or 8 (average pooling; 32 in float16 is "
                                                  "0.5 MiB a sample). Default: the source's."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per Zarr shard file (default: the source's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing OUT first (default: resume it)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Re-encode a store's embeddings in another stored form (int8, a compact grid), without the encoder."""
    from sam_cache import convert_store

    with user_errors():
        dtype = dtype or ("int8" if grid is None else None)
        r = convert_store(store, out, dtype, shard_size=shard_size, overwrite=overwrite,
                          progress=progress and console.is_terminal, grid=grid)
    say(f"converted {r['rows']} rows into {out} ({r['done']} done in all): "
        f"{r['src_bytes'] / 2**20:.2f} -> {r['dst_bytes'] / 2**20:.2f} MiB of embedding per sample")


@app.command()
def masks(
    store: str = typer.Argument(..., help="A store with images (samcache extract --image-size)."),
    prompt: str = typer.Option("candidates", help="candidates (13 boxes, best predicted IoU), box (the whole image), "
                                                 "csv (--boxes) or learned (--learn-from)."),
    boxes: Optional[Path] = typer.Option(None, help="CSV of boxes for --prompt csv: id,x0,y0,x1,y1 in image pixels."),
    checkpoint: Optional[Path] = typer.Option(None, help="The encoder checkpoint the store was made with (SAM ViTs, "
                                                        "medsam; litemedsam uses its packaged one)."),
    threshold: float = typer.Option(0.0, help="Mask logit threshold (0: probability 0.5)."),
    batch_size: int = typer.Option(16, help="Samples read and written per step."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace masks made differently (embeddings are kept)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    from_masks: Optional[str] = typer.Option(None, help="Your own masks instead of a decoder: csv:COLUMN of the "
                                                        "dataset's CSV, or a folder mirroring the dataset."),
    mask_name: str = typer.Option("{stem}{suffix}", help="With a folder for --from-masks: a mask's file name from "
                                                         "its image's {stem}, {suffix}, {name}."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="With --from-masks: an empty mask where a "
                                                                      "sample has no mask file."),
    split: Optional[str] = typer.Option(None, help="Decode only this split's rows (train, val, test)."),
    mask_set: str = typer.Option("default", help="The mask set to write; a store holds several (e.g. gt, learned), "
                                                 "and training names one with --mask-set."),
    learn_from: Optional[str] = typer.Option(None, help="With --prompt learned: the mask set whose train-split masks "
                                                        "the prompt is learned from."),
    learn_epochs: int = typer.Option(30, help="With --prompt learned: epochs of the lesion head."),
    learn_seed: int = typer.Option(0, help="With --prompt learned: the lesion head's seed."),
    learn_grow: float = typer.Option(1.0, help="With --prompt learned: grid cells added around the predicted box."),
    learn_context: int = typer.Option(3, help="With --prompt learned: dilated layers that widen what the lesion "
                                              "head sees (0-5; 3: 33x33 grid cells)."),
    learn_presence: Optional[float] = typer.Option(None, help="With --prompt learned: an image whose lesion map "
                                                              "never reaches this probability gets an empty mask "
                                                              "(no lesion) instead of a decoded box (e.g. 0.5)."),
    head_from: Optional[str] = typer.Option(None, help="With --prompt learned, instead of --learn-from: STORE:SET, "
                                                       "the head another store's learned set keeps (e.g. masks for "
                                                       "new images from the head learned on the training store)."),
) -> None:
    """Decode a SAM mask per sample from the cached embeddings (no encoder pass), or bring your own masks
    (--from-masks), into the store. A rerun resumes."""
    from sam_cache.masks import decode_masks
    from sam_cache.user_masks import import_masks

    progress = progress and console.is_terminal  # no bar in a file or a pipe
    with user_errors():
        if from_masks is not None:
            r = import_masks(store, from_masks, mask_name=mask_name, allow_missing=allow_missing, overwrite=overwrite,
                             batch_size=batch_size, progress=progress, mask_set=mask_set)
        else:
            from sam_cache.learned_prompt import HeadRecipe

            recipe = HeadRecipe(epochs=learn_epochs, seed=learn_seed, grow=learn_grow, context=learn_context,
                                presence=learn_presence)
            r = decode_masks(store, prompt=prompt, boxes=boxes, checkpoint=checkpoint, threshold=threshold,
                             batch_size=batch_size, device=device, overwrite=overwrite, progress=progress,
                             split=split, mask_set=mask_set, learn_from=learn_from, recipe=recipe,
                             head_from=head_from)
    quality = f"; mean predicted IoU {r['mean_iou']:.3f}, {r['empty']} empty" if r["written"] and "mean_iou" in r \
        else (f"; {r['empty']} empty" if r["written"] else "")
    where = store if mask_set == "default" else f"{store}, mask set {mask_set}"
    scope = f"in the {split} split" if split and from_masks is None else "in all"
    say(f"stored {r['written']} new masks in {where} ({r['already_done']} already done, {r['total']} {scope})"
        + quality)


@app.command("export")
def export_command(
    store: str = typer.Argument(..., help="The store."),
    out: Path = typer.Option(..., help="The .npz to write."),
    pooled: bool = typer.Option(True, "--pooled", help="One pooled vector per sample (the only export so far)."),
    stats: str = typer.Option("mean", help="mean (256 per sample) or meanstd (512)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Export the done rows of an unfinished store."),
) -> None:
    """Write one pooled embedding vector per sample, with labels, ids and splits, to an .npz."""
    from sam_cache import export_pooled

    with user_errors():
        r = export_pooled(store, out, stats, allow_partial=allow_partial)
    say(f"wrote {r['rows']} x {r['dim']} features to {r['out']} "
        "(np.load: features, labels, ids, splits, class_names)")


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
    from rich.text import Text

    head = Table(show_header=False, box=None)
    shape = "x".join(map(str, summary["embedding_shape"]))
    rows = [
        ("store", f"{summary['path']} ({summary['format']}, {_size(summary['disk_bytes'])})"),
        ("samples", f"{summary['done']} of {summary['samples']} done, {shape} {summary['dtype']}"
                    + ("" if summary["checksums"] else " (schema 1: no checksums)")),
        ("encoder", summary["encoder"] + (" (random weights)" if summary["random_weights"] else "")),
        ("checkpoint", str(summary["checkpoint_sha256"] or "-")[:16]),
        ("input", f"{summary['preprocessing']['input_size']} px, window {summary['preprocessing']['window']}"),
        ("images", f"{summary['image_size']} px" if summary["image_size"] else "not stored"),
        ("masks", _mask_sets_line(summary["mask_sets"])),
        *([("high-res", ", ".join("x".join(map(str, level)) for level in summary["high_res"])
            + f" {'float32' if summary['dtype'] == 'float32' else 'float16'} a sample (SAM 2's mask decoder "
            "reads them)")] if summary.get("high_res") else []),
        ("skipped", str(len(summary["skipped"]))),
        ("suspect", f"{len(summary['suspect'])} image(s) with no picture (one colour or stripes)"
                    if summary["suspect"] else "0"),
        ("created", f"{summary['created']} by samcache {summary['package_version']}"),
    ]
    for k, v in rows:
        head.add_row(Text(k, style="bold"), Text(v))  # user text (paths, ids) is never markup
    console.print(head)
    counts = Table(title="labels per split")
    counts.add_column("class")
    for split in summary["label_counts"]:
        counts.add_column(split, justify="right")
    for name in summary["class_names"]:
        counts.add_row(Text(name), *(str(summary["label_counts"][s][name]) for s in summary["label_counts"]))
    console.print(counts)


def _mask_sets_line(sets: dict) -> str:
    if not sets:
        return "none (samcache masks adds them)"
    lines = []
    for name, m in sets.items():
        made = (f"from {m['source']}" if m["prompt"] == "file" else
                f"prompt {m['prompt']}, decoder {m['decoder']}, mean predicted IoU {m['mean_iou']:.3f}")
        lines.append(f"{name}: {m['done']} done, {made}")
    return "\n".join(lines)


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
    from rich.text import Text

    from sam_cache import EmbeddingStore, verify_store

    with user_errors():
        with EmbeddingStore.open(store) as s:
            n = int(s.done.sum())
        with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
            task = bar.add_task("verify", total=n)
            problems = verify_store(store, progress=lambda k: bar.update(task, completed=k))
    if problems:
        for p in problems:
            err_console.print(Text(p, style="red"))
        err_console.print(Text(f"{len(problems)} problem(s) in {store}", style="bold red"))
        raise typer.Exit(1)
    say(f"{store}: {n} done samples verified: finite, not empty, matching their checksums")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
