"""``slca-train``: train on a store; ``eval``, ``predict``, ``export`` and ``sweep`` re-use the result.

The training options are generated from the config (``cli/_options.py``); this module only
parses and calls the ``trainer`` package.
"""

from __future__ import annotations

import inspect
import json
from typing import Optional

import typer

from sam_cache.options import DEVICE_HELP
from trainer.experiment import StudyConfig

from ._common import console, err_console, run, say, user_errors
from ._options import flat_values, given, signature_with, train_parameters

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
        train(cfg, resume=resume, overwrite=overwrite, log=say, progress=console.is_terminal)


def _train_signature() -> inspect.Signature:
    extra = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, help="A config.yaml/best.yaml to rerun; options given too override it.")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--resume", help="Continue from OUT/last.pt (a larger --epochs extends a finished run).")),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--overwrite", help="Replace an existing run folder's results.")),
    ]
    return inspect.Signature(extra + train_parameters())


def train_command(ctx: typer.Context, **kwargs) -> None:
    """Train (the default command). See `slca-train eval|predict|export|sweep --help` for the rest."""
    _train(ctx, kwargs.pop("config"), kwargs.pop("resume"), kwargs.pop("overwrite"), **kwargs)


train_command.__signature__ = _train_signature()
train_command.__annotations__ = {p.name: p.annotation for p in train_command.__signature__.parameters.values()}
app.callback(invoke_without_command=True)(train_command)


@app.command()
def sweep(
    cache: str = typer.Option(..., help="The store; loaded into memory once for all trials."),
    space: str = typer.Option(..., help="Sweep space YAML (see trainer/sweep.py, examples/sweep_sample.yaml)."),
    out: str = typer.Option(..., help="Sweep folder; an interrupted sweep there resumes."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Run a grid or an Optuna search over training options on one cache."""
    from rich.live import Live
    from rich.markup import escape
    from rich.table import Table

    from trainer.sweep import load_space, run_sweep

    with user_errors():
        sp = load_space(space)
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

                result = run_sweep(cache, sp, out, device=device, on_trial=on_trial,
                                   log=lambda s: live.console.print(s, markup=False))
        finally:
            if not console.is_terminal:  # Live leaves a file's last line open: end it before the next line
                console.print()
    best, tied = result["best"], result["tied"]
    say(f"best: trial {best['trial']} with val {sp.metric} {cell(best[f'val_{sp.metric}'])}"
        + (f", tied with trial(s) {', '.join(map(str, tied))}: the lowest val loss "
           f"({cell(best.get('val_loss'))}) breaks the tie" if tied else "")
        + f"; rerun it with: slca-train --config {result['best_config']}")


@app.command("eval")
def eval_command(
    checkpoint: str = typer.Option(..., help="best.pt or last.pt of a run."),
    cache: Optional[str] = typer.Option(None, help="Store (default: the one the run trained on; another store made "
                                                   "with the same encoder and preprocessing is accepted)."),
    split: str = typer.Option("test", help="train, val, test or all."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Use the done rows of an unfinished store."),
) -> None:
    """Evaluate a checkpoint on a split of a store."""
    from trainer import evaluate_checkpoint
    from trainer.metrics import format_metrics

    with user_errors():
        m = evaluate_checkpoint(checkpoint, cache, split, device, allow_partial=allow_partial)
    if as_json:
        print(json.dumps(m, indent=2))
        return
    say(f"{split} ({m['n']} samples): {format_metrics(m)}  loss {m['loss']:.4f}")


def predict_command(
    checkpoint: str = typer.Option(..., help="best.pt of a run."),
    data: str = typer.Option(..., help="A store, or a dataset (image folder, CSV, npz; labels optional), read with "
                                       "the reading options below, as samcache extract reads it."),
    out: str = typer.Option(..., help="The file to write: CSV (id, source, p_<class>..., predicted[, top<k>, "
                                      "top<k>_p][, label]) or JSON."),
    results_format: Optional[str] = typer.Option(None, help="csv or json (default: json for an OUT ending .json, "
                                                            "else csv)."),
    topk: int = typer.Option(1, help="How many ranked classes each sample lists."),
    store: Optional[str] = typer.Option(None, help="Where a dataset's embeddings go (default: OUT with .zarr)."),
    encoder_checkpoint: Optional[str] = typer.Option(None, help="Encoder weights for SAM ViTs and medsam (the "
                                                                "training store's; checked by sha256)."),
    batch_size: Optional[int] = typer.Option(None, help="Default: the run's."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Predict the done rows of an unfinished store."),
    **reading,
) -> None:
    """Predict new data with a trained model; extracts a dataset's embeddings first (resumable)."""
    from sam_cache.extract_config import ReadingConfig, reading_options
    from trainer.metrics import format_metrics
    from trainer.predict import predict_data

    with user_errors():
        r = predict_data(checkpoint, data, out, store=store, encoder_checkpoint=encoder_checkpoint, device=device,
                         batch_size=batch_size, progress=console.is_terminal, log=say, overwrite=overwrite,
                         allow_partial=allow_partial, results_format=results_format, topk=topk,
                         reading=ReadingConfig(**flat_values(reading, reading_options())))
    say(f"wrote {r['rows']} predictions to {r['out']}")
    m = r["metrics"]
    if m is not None:
        say(f"labelled ({m['n']} samples): {format_metrics(m)}")


def _with_reading_options(fn):
    from sam_cache.extract_config import reading_options

    own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return signature_with(fn, own, reading_options())


app.command("predict")(_with_reading_options(predict_command))


_STUDY = StudyConfig()  # the protocol's defaults, shown in --help


@app.command("study")
def study_command(
    cache: Optional[str] = typer.Option(None, help="The store (made by samcache extract, with images)."),
    out: str = typer.Option(..., help="The study folder: runs.csv, summary.csv/.md, paired.csv, the plot; a "
                                      "study there resumes."),
    fractions: str = typer.Option(",".join(f"{f:g}" for f in _STUDY.fractions),
                                  help="Train fractions, comma-separated (1: all of train)."),
    seeds: str = typer.Option(",".join(map(str, _STUDY.seeds)), help="Seeds at every fraction: 0-4, or 0,2,5."),
    extra_seeds: str = typer.Option("", help="More seeds at some fractions: '0.1:5-9;1.0:5-9'."),
    methods: str = typer.Option(",".join(_STUDY.methods),
                                help="Comma-separated: backbone, slca, fuse, fuse_slca, focus, focus_slca, cache_head, "
                                     "linear_probe, probe_meanstd, or focus-MODE-SET (a mask set of the store)."),
    focus: str = typer.Option(_STUDY.focus, help="The focus mode of the focus methods."),
    set_: list[str] = typer.Option([], "--set", help="A recipe option by slca-train's name, NAME=VALUE (YAML); "
                                                     "repeat it. Over the study's CPU-sized defaults."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    merge: list[str] = typer.Option([], "--merge", help="Join these study folders into --out instead of training "
                                                        "(repeat it)."),
) -> None:
    """The paired study: each method against the same backbone, over train fractions and seeds, with
    paired differences and 95 % intervals (the protocol is trainer/experiment.py's)."""
    from pathlib import Path

    from trainer.experiment import merge_studies, run_study
    from trainer.recipe_args import parse_extra_seeds, parse_seeds, parse_sets

    with user_errors():
        if merge:
            merge_studies(merge, out)
        else:
            if cache is None:
                err_console.print("[bold red]error:[/] --cache is required (or --merge)")
                raise typer.Exit(2)
            try:
                fracs = tuple(float(f) for f in fractions.split(","))
            except ValueError:
                from trainer.errors import ConfigError

                raise ConfigError(f"--fractions {fractions!r}: expected numbers, e.g. 0.1,1.0") from None
            cfg = StudyConfig(fractions=fracs, seeds=parse_seeds(seeds), extra_seeds=parse_extra_seeds(extra_seeds),
                              methods=tuple(m.strip() for m in methods.split(",") if m.strip()), focus=focus,
                              train={**_STUDY.train, **parse_sets(set_)})
            run_study(cache, out, cfg, device=device, log=say)
    console.print((Path(out) / "summary.md").read_text(), markup=False, highlight=False)


@app.command("export")
def export_command(
    checkpoint: str = typer.Option(..., help="best.pt of a run."),
    out: str = typer.Option(..., help="The timm state dict to write (.pth); .extras.pth and .json go beside it."),
) -> None:
    """Export a trained backbone as a plain timm state dict (SLCA and fusion weights apart)."""
    from trainer.export import export_checkpoint

    with user_errors():
        info = export_checkpoint(checkpoint, out)
    say(f"wrote {', '.join(info['files'])} and {out}.json; load it with {info['load']}")
    if not info["complete"]:
        say(f"note: {info['note']}")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
