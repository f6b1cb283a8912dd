"""``samcache``: extract embeddings once, then inspect, verify or convert the store."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sam_cache.commands import ConvertOptions, ExportOptions, ExtractTarget, InfoOptions, MasksOptions, VerifyOptions
from sam_cache.extract_config import ExtractConfig, extract_options

from ._common import console, err_console, run, say, user_errors, warn
from ._options import command

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run a frozen SAM-family encoder over a dataset once and store the embeddings. "
                       "Add --debug anywhere to see the traceback of an error.")

EXIT_SKIPPED = 3


def extract(target: ExtractTarget, config: ExtractConfig) -> None:
    """Extract one 256x64x64 embedding per image into a store. A rerun resumes."""
    from sam_cache import extract_dataset

    with user_errors():
        result = extract_dataset(Path(target.dataset), target.out, config=config)
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


command(app, "extract", extract, ExtractTarget, (ExtractConfig, extract_options()))


def convert(o: ConvertOptions) -> None:
    """Re-encode a store's embeddings in another stored form (int8, a compact grid), without the encoder."""
    from sam_cache import convert_store

    with user_errors():
        dtype = o.dtype or ("int8" if o.grid is None else None)
        r = convert_store(o.store, o.out, dtype, shard_size=o.shard_size, overwrite=o.overwrite,
                          progress=o.progress, grid=o.grid)
    say(f"converted {r['rows']} rows into {o.out} ({r['done']} done in all): "
        f"{r['src_bytes'] / 2**20:.2f} -> {r['dst_bytes'] / 2**20:.2f} MiB of embedding per sample")


command(app, "convert", convert, ConvertOptions)


def masks(o: MasksOptions) -> None:
    """Decode a SAM mask per sample from the cached embeddings (no encoder pass), or bring your own masks
    (--from-masks), into the store. A rerun resumes."""
    from sam_cache.masks import decode_masks
    from sam_cache.user_masks import import_masks

    with user_errors():
        if o.from_masks is not None:
            r = import_masks(o.store, o.from_masks, mask_name=o.mask_name, allow_missing=o.allow_missing,
                             overwrite=o.overwrite, batch_size=o.batch_size, progress=o.progress, mask_set=o.mask_set)
        else:
            from sam_cache.learned_prompt import HeadRecipe

            recipe = HeadRecipe(epochs=o.learn_epochs, seed=o.learn_seed, grow=o.learn_grow, context=o.learn_context,
                                presence=o.learn_presence)
            r = decode_masks(o.store, prompt=o.prompt, boxes=o.boxes, checkpoint=o.checkpoint, threshold=o.threshold,
                             batch_size=o.batch_size, device=o.device, overwrite=o.overwrite, progress=o.progress,
                             split=o.split, mask_set=o.mask_set, learn_from=o.learn_from, recipe=recipe,
                             head_from=o.head_from, threads=o.threads)
    quality = f"; mean predicted IoU {r['mean_iou']:.3f}, {r['empty']} empty" if r["written"] and "mean_iou" in r \
        else (f"; {r['empty']} empty" if r["written"] else "")
    where = o.store if o.mask_set == "default" else f"{o.store}, mask set {o.mask_set}"
    scope = f"in the {o.split} split" if o.split and o.from_masks is None else "in all"
    say(f"stored {r['written']} new masks in {where} ({r['already_done']} already done, {r['total']} {scope})"
        + quality)


command(app, "masks", masks, MasksOptions)


def export_command(o: ExportOptions) -> None:
    """Write one pooled embedding vector per sample, with labels, ids and splits, to an .npz."""
    from sam_cache import export_pooled

    with user_errors():
        r = export_pooled(o.store, Path(o.out), o.stats, allow_partial=o.allow_partial)
    say(f"wrote {r['rows']} x {r['dim']} features to {r['out']} "
        "(np.load: features, labels, ids, splits, class_names)")


command(app, "export", export_command, ExportOptions)


def info(o: InfoOptions) -> None:
    """Summarize a store: samples, encoder, signature, labels per split."""
    from sam_cache import summarize_store

    with user_errors():
        summary = summarize_store(o.store)
    if o.as_json:
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


command(app, "info", info, InfoOptions)


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


def verify(o: VerifyOptions) -> None:
    """Check that every done sample is present, finite and of the right shape. Exit 1 if not."""
    from rich.text import Text

    from sam_cache import EmbeddingStore, verify_store
    from sam_cache.progress import progress

    store = o.store
    with user_errors():
        with EmbeddingStore.open(store) as s:
            n = int(s.done.sum())
        with progress("verify", n, unit="row", console=err_console) as bar:
            problems = verify_store(store, progress=bar.set)
    if problems:
        for p in problems:
            err_console.print(Text(p, style="red"))
        err_console.print(Text(f"{len(problems)} problem(s) in {store}", style="bold red"))
        raise typer.Exit(1)
    say(f"{store}: {n} done samples verified: finite, not empty, matching their checksums")


command(app, "verify", verify, VerifyOptions)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
