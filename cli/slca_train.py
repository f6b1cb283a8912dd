"""``slca-train``: train on a store; ``eval``, ``predict``, ``export`` and ``sweep`` re-use the result.

The training options are generated from the config (``cli/_options.py``); this module only
parses and calls the ``trainer`` package.
"""

from __future__ import annotations

import inspect
import json
from typing import Optional

import typer

from sam_cache.extract_config import ReadingConfig
from trainer.commands import EvalOptions, ExportOptions, PredictOptions, StudyOptions, SweepOptions, TrainRun

from ._common import console, err_console, run, say, user_errors
from ._options import command, flat_values, given, parameters, train_parameters

app = typer.Typer(add_completion=False, help="Train SLCA plus a timm backbone on cached SAM embeddings. "
                                             "Add --debug anywhere to see the traceback of an error.")


def _train(ctx: typer.Context, config: Optional[str], resume: bool, overwrite: bool, **values) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from trainer import TrainConfig, train

    with user_errors():
        flags = flat_values(values)
        if config is not None:
            flags = {**TrainConfig.load(config).flat(), **{k: v for k, v in flags.items() if given(ctx, k)}}
        if flags.get("cache") is None or flags.get("out") is None:
            err_console.print("[bold red]error:[/] --cache and --out are required (slca-train --help)")
            raise typer.Exit(2)
        cfg = TrainConfig.from_dict(flags, source="options")
        train(cfg, resume=resume, overwrite=overwrite, log=say, progress=True)


def _train_signature() -> inspect.Signature:
    from sam_cache.options import options

    ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    return inspect.Signature([ctx] + parameters(options(TrainRun)) + train_parameters())


def train_command(ctx: typer.Context, **kwargs) -> None:
    """Train (the default command). See `slca-train eval|predict|export|sweep --help` for the rest."""
    _train(ctx, kwargs.pop("config"), kwargs.pop("resume"), kwargs.pop("overwrite"), **kwargs)


train_command.__signature__ = _train_signature()
train_command.__annotations__ = {p.name: p.annotation for p in train_command.__signature__.parameters.values()}
app.callback(invoke_without_command=True)(train_command)


def sweep(o: SweepOptions) -> None:
    """Run a grid or an Optuna search over training options on one cache."""
    from rich.live import Live
    from rich.markup import escape
    from rich.table import Table

    from trainer.sweep import load_space, run_sweep

    with user_errors():
        cache = o.cache
        sp = load_space(o.space)
        columns = ["trial", "status", *sp.params, f"val_{sp.metric}", f"test_{sp.metric}", "seconds"]
        table = Table(title=escape(f"{sp.method} sweep on {cache}"))
        for c in columns:
            table.add_column(c, justify="right")

        def cell(v):
            return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

        try:
            with Live(table, console=console, auto_refresh=False) as live:
                def on_trial(row):
                    table.add_row(*(cell(row.get(c)) for c in columns))
                    live.refresh()

                result = run_sweep(cache, sp, o.out, device=o.device, on_trial=on_trial,
                                   log=lambda s: live.console.print(s, markup=False))
        finally:
            if not console.is_terminal:  # Live leaves a file's last line open: end it before the next line
                console.print()
    best, tied = result["best"], result["tied"]
    say(f"best: trial {best['trial']} with val {sp.metric} {cell(best[f'val_{sp.metric}'])}"
        + (f", tied with trial(s) {', '.join(map(str, tied))}: the lowest val loss "
           f"({cell(best.get('val_loss'))}) breaks the tie" if tied else "")
        + f"; rerun it with: slca-train --config {result['best_config']}")


command(app, "sweep", sweep, SweepOptions)


def eval_command(o: EvalOptions) -> None:
    """Evaluate a checkpoint on a split of a store."""
    from trainer import evaluate_checkpoint
    from trainer.metrics import format_metrics

    with user_errors():
        m = evaluate_checkpoint(o.checkpoint, o.cache, o.split, o.device, allow_partial=o.allow_partial,
                                threads=o.threads)
    if o.as_json:
        print(json.dumps(m, indent=2))
        return
    say(f"{o.split} ({m['n']} samples): {format_metrics(m)}  loss {m['loss']:.4f}")


command(app, "eval", eval_command, EvalOptions)


def predict_command(o: PredictOptions, reading: ReadingConfig) -> None:
    """Predict new data with a trained model; extracts a dataset's embeddings first (resumable)."""
    from trainer.metrics import format_metrics
    from trainer.predict import predict_data

    with user_errors():
        r = predict_data(o.checkpoint, o.data, o.out, store=o.store, encoder_checkpoint=o.encoder_checkpoint,
                         device=o.device, batch_size=o.batch_size, progress=True, log=say,
                         overwrite=o.overwrite, allow_partial=o.allow_partial, results_format=o.results_format,
                         topk=o.topk, reading=reading, threads=o.threads)
    say(f"wrote {r['rows']} predictions to {r['out']}")
    m = r["metrics"]
    if m is not None:
        say(f"labelled ({m['n']} samples): {format_metrics(m)}")


command(app, "predict", predict_command, PredictOptions, ReadingConfig)


def study_command(o: StudyOptions) -> None:
    """The paired study: each method against the same backbone, over train fractions and seeds, with
    paired differences and 95 % intervals (the protocol is trainer/experiment.py's)."""
    from pathlib import Path

    from trainer.experiment import run_study
    from trainer.study_merge import merge_studies

    with user_errors():
        if o.merge:
            merge_studies(o.merge, o.out, note=lambda line: say(f"note: {line}"))
        else:
            if o.cache is None:
                err_console.print("[bold red]error:[/] --cache is required (or --merge)")
                raise typer.Exit(2)
            run_study(o.cache, o.out, o.study_config(), device=o.device, log=say)
    console.print((Path(o.out) / "summary.md").read_text(), markup=False, highlight=False)


command(app, "study", study_command, StudyOptions)


def export_command(o: ExportOptions) -> None:
    """Export a trained backbone as a plain timm state dict (SLCA and fusion weights apart)."""
    from trainer.export import export_checkpoint

    with user_errors():
        info = export_checkpoint(o.checkpoint, o.out)
    say(f"wrote {', '.join(info['files'])} and {o.out}.json; load it with {info['load']}")
    if not info["complete"]:
        say(f"note: {info['note']}")


command(app, "export", export_command, ExportOptions)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
