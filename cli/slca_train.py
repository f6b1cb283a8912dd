"""``slca-train``: train SLCA + a timm backbone on a store; ``slca-train eval`` re-evaluates."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ._common import console, err_console, run, user_errors

app = typer.Typer(add_completion=False, help="Train SLCA plus a timm backbone on cached SAM embeddings.")


def _errors():
    from sam_cache import StoreError
    from trainer import TrainError
    from trainer.backbone import BackboneError

    return user_errors(TrainError, StoreError, BackboneError, ValueError)


def _stages(text: Optional[str]) -> Optional[list[int]]:
    return None if text is None else [int(s) for s in text.split(",") if s.strip()]


@app.callback(invoke_without_command=True)
def main_command(
    ctx: typer.Context,
    cache: Optional[str] = typer.Option(None, help="Store made by `samcache extract` (with --image-size)."),
    out: Optional[str] = typer.Option(None, help="Run folder (config, metrics, checkpoints, figures)."),
    backbone: str = typer.Option("resnet18", help="timm model name with feature_info."),
    backbone_kwargs: str = typer.Option("{}", help="JSON of extra timm model arguments."),
    pretrained: Optional[str] = typer.Option(None, help="Local backbone weights file (default: random init)."),
    slca: bool = typer.Option(True, "--slca/--no-slca", help="--no-slca: the same backbone and recipe without SLCA."),
    window: int = typer.Option(4, help="SLCA local region side, in embedding cells (divides 64)."),
    pool: str = typer.Option("avg", help="SLCA region pooling: avg, max or avgmax."),
    reduction: int = typer.Option(4, help="SLCA MLP bottleneck ratio."),
    stages: Optional[str] = typer.Option(None, help="Gated stages as feature_info indices, e.g. 1,2,3,4."),
    gate: str = typer.Option("scaled", help="Gate form: scaled or residual (both identity at init)."),
    epochs: int = typer.Option(30),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-3),
    weight_decay: float = typer.Option(0.05),
    label_smoothing: float = typer.Option(0.0),
    img_size: int = typer.Option(224, help="Training image side."),
    hflip: bool = typer.Option(True, "--hflip/--no-hflip"),
    crop_scale_min: float = typer.Option(0.5, help="Smallest random-resized-crop area fraction (1: no crop)."),
    train_fraction: Optional[float] = typer.Option(None, help="Stratified fraction of the train split."),
    shots: Optional[int] = typer.Option(None, help="Stratified k images per class of the train split."),
    subset_seed: int = typer.Option(0),
    seed: int = typer.Option(0),
    patience: Optional[int] = typer.Option(None, help="Early stop after this many epochs without val improvement."),
    select_metric: str = typer.Option("balanced_accuracy", help="accuracy, balanced_accuracy, macro_f1 or auc."),
    device: Optional[str] = typer.Option(None),
    residency: str = typer.Option("auto", help="Cache residency: auto, gpu, host or stream."),
    shuffle: str = typer.Option("auto", help="Epoch order: global, shards (shard by shard through a buffer) or "
                                "auto (shards when the embeddings would stream)."),
    shuffle_buffer: int = typer.Option(512, help="Samples held at once by shard-by-shard streaming."),
    config: Optional[str] = typer.Option(None, help="A config.yaml/best.yaml to rerun; flags given too override it."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Under torchrun on CUDA: SyncBatchNorm."),
    resume: bool = typer.Option(False, "--resume", help="Continue from out/last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder's results."),
) -> None:
    """Train (the default command). See `slca-train eval --help` to re-evaluate a checkpoint."""
    if ctx.invoked_subcommand is not None:
        return
    from trainer import TrainConfig, train

    with _errors():
        flags = dict(
            cache=cache, out=out, backbone=backbone, backbone_kwargs=json.loads(backbone_kwargs), pretrained=pretrained,
            slca=slca, window=window, pool=pool, reduction=reduction, stages=_stages(stages), gate=gate, epochs=epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, img_size=img_size,
            hflip=hflip, crop_scale=(crop_scale_min, 1.0), train_fraction=train_fraction, shots=shots,
            subset_seed=subset_seed, seed=seed, patience=patience, select_metric=select_metric, device=device,
            residency=residency, shuffle=shuffle, shuffle_buffer=shuffle_buffer, sync_bn=sync_bn,
        )
        if config is not None:
            base = TrainConfig.load(config).to_dict()
            given = {k: v for k, v in flags.items() if _given(ctx, k)}
            flags = {**base, **given}
        if flags["cache"] is None or flags["out"] is None:
            err_console.print("[bold red]error:[/] --cache and --out are required (slca-train --help)")
            raise typer.Exit(2)
        cfg = TrainConfig.from_dict(flags)
        cfg.slca_config()  # refuse a bad SLCA design before loading anything
        train(cfg, resume=resume, overwrite=overwrite, log=lambda s: console.print(s, highlight=False))


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether a flag was typed on the command line (so it overrides --config)."""
    from click.core import ParameterSource

    key = {"crop_scale": "crop_scale_min"}.get(name, name)
    return ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE


@app.command()
def sweep(
    cache: str = typer.Option(..., help="The store; loaded into memory once for all trials."),
    space: str = typer.Option(..., help="Sweep space YAML (see trainer/sweep.py, examples/sweep_sample.yaml)."),
    out: str = typer.Option(..., help="Sweep folder; an interrupted sweep there resumes."),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Run a grid or an Optuna search over training flags on one cache."""
    from rich.live import Live
    from rich.table import Table

    from trainer.sweep import load_space, run_sweep

    with _errors():
        sp = load_space(space)
        columns = ["trial", "status", *sp.params, f"val_{sp.metric}", f"test_{sp.metric}", "seconds"]
        table = Table(title=f"{sp.method} sweep on {cache}")
        for c in columns:
            table.add_column(c, justify="right")

        def cell(v):
            return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

        with Live(table, console=console, auto_refresh=False) as live:
            def on_trial(row):
                table.add_row(*(cell(row.get(c)) for c in columns))
                live.refresh()

            result = run_sweep(cache, sp, out, device=device, on_trial=on_trial,
                               log=lambda s: live.console.print(s, highlight=False))
    best = result["best"]
    console.print(f"best: trial {best['trial']} with val {sp.metric} {cell(best[f'val_{sp.metric}'])}; "
                  f"rerun it with: slca-train --config {result['best_config']}", highlight=False)


@app.command("eval")
def eval_command(
    checkpoint: str = typer.Option(..., help="best.pt or last.pt of a run."),
    cache: Optional[str] = typer.Option(None, help="Store (default: the one the run trained on)."),
    split: str = typer.Option("test", help="train, val or test."),
    device: Optional[str] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-evaluate a checkpoint on a split of a store."""
    from trainer import evaluate_checkpoint

    with _errors():
        m = evaluate_checkpoint(checkpoint, cache, split, device)
    if as_json:
        print(json.dumps(m, indent=2))
        return
    auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
    console.print(f"{split} ({m['n']} samples): accuracy {m['accuracy']:.3f}  balanced accuracy "
                  f"{m['balanced_accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  AUC {auc}  loss {m['loss']:.4f}")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
