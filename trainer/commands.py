"""The options of ``slca-train``'s commands beside training (whose options are :class:`TrainConfig`).

One dataclass per command, one :func:`~sam_cache.options.opt` field per option, defined here once;
``cli/`` generates each command from its dataclass (``cli/_options.py``, :func:`command`). A field
without a default is required; ``positional`` fields are arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from sam_cache.options import DEVICE_HELP, THREADS_HELP, Checked, opt

from .errors import ConfigError
from .experiment import StudyConfig

__all__ = ["TrainRun", "SweepOptions", "EvalOptions", "PredictOptions", "StudyOptions", "ExportOptions"]

EVAL_THREADS_HELP = THREADS_HELP + "the results to the last digit on this machine, whatever the load."

_STUDY = StudyConfig()  # the protocol's defaults, shown in --help


@dataclass(kw_only=True)
class TrainRun(Checked):
    """``slca-train``'s own options beside the recipe's (:class:`trainer.TrainConfig`)."""

    config: str | None = opt(None, help="A config.yaml/best.yaml to rerun; options given too override it.")
    resume: bool = opt(False, help="Continue from OUT/last.pt (a larger --epochs extends a finished run).",
                       flag="--resume")
    overwrite: bool = opt(False, help="Replace an existing run folder's results.", flag="--overwrite")


@dataclass(kw_only=True)
class SweepOptions(Checked):
    """``slca-train sweep``: :func:`trainer.sweep.run_sweep`."""

    cache: str = opt(help="The store; loaded into memory once for all trials.")
    space: str = opt(help="Sweep space YAML (see trainer/sweep.py, examples/sweep_sample.yaml).")
    out: str = opt(help="Sweep folder; an interrupted sweep there resumes.")
    device: str | None = opt(None, help=DEVICE_HELP)


@dataclass(kw_only=True)
class EvalOptions(Checked):
    """``slca-train eval``: :func:`trainer.evaluate_checkpoint`."""

    checkpoint: str = opt(help="best.pt or last.pt of a run.")
    cache: str | None = opt(None, help="Store (default: the one the run trained on; another store made with the "
                                       "same encoder and preprocessing is accepted).")
    split: str = opt("test", help="train, val, test or all.")
    device: str | None = opt(None, help=DEVICE_HELP)
    as_json: bool = opt(False, help="Print JSON for scripts.", flag="--json")
    allow_partial: bool = opt(False, help="Use the done rows of an unfinished store.", flag="--allow-partial")
    threads: int = opt(0, low=0, help=EVAL_THREADS_HELP)


@dataclass(kw_only=True)
class PredictOptions(Checked):
    """``slca-train predict`` (with :class:`sam_cache.ReadingConfig`'s options): :func:`trainer.predict.predict_data`."""

    checkpoint: str = opt(help="best.pt of a run.")
    data: str = opt(help="A store, or a dataset (image folder, CSV, npz; labels optional), read with the reading "
                         "options below, as samcache extract reads it.")
    out: str = opt(help="The file to write: CSV (id, source, p_<class>..., predicted[, top<k>, top<k>_p][, label]) "
                        "or JSON.")
    results_format: str | None = opt(None, help="csv or json (default: json for an OUT ending .json, else csv).")
    topk: int = opt(1, help="How many ranked classes each sample lists.")
    store: str | None = opt(None, help="Where a dataset's embeddings go (default: OUT with .zarr).")
    encoder_checkpoint: str | None = opt(None, help="Encoder weights for SAM ViTs and medsam (the training store's; "
                                                    "checked by sha256).")
    batch_size: int | None = opt(None, help="Default: the run's.")
    device: str | None = opt(None, help=DEVICE_HELP)
    overwrite: bool = opt(False, help="Replace an existing OUT.", flag="--overwrite")
    allow_partial: bool = opt(False, help="Predict the done rows of an unfinished store.", flag="--allow-partial")
    threads: int = opt(0, low=0, help=EVAL_THREADS_HELP)


@dataclass(kw_only=True)
class StudyOptions(Checked):
    """``slca-train study``: :func:`trainer.experiment.run_study`, or :func:`~trainer.study_merge.merge_studies`
    with ``--merge``; :meth:`study_config` parses the text forms into a :class:`StudyConfig`."""

    cache: str | None = opt(None, help="The store (made by samcache extract, with images).")
    out: str = opt(help="The study folder: runs.csv, summary.csv/.md, paired.csv, the plot; a study there resumes.")
    fractions: str = opt(",".join(f"{f:g}" for f in _STUDY.fractions),
                         help="Train fractions, comma-separated (1: all of train).")
    seeds: str = opt(",".join(map(str, _STUDY.seeds)), help="Seeds at every fraction: 0-4, or 0,2,5.")
    extra_seeds: str = opt("", help="More seeds at some fractions: '0.1:5-9;1.0:5-9'.")
    methods: str = opt(",".join(_STUDY.methods),
                       help="Comma-separated: backbone, slca, fuse, fuse_slca, focus, focus_slca, cache_head, "
                            "linear_probe, probe_meanstd, or focus-MODE-SET, focus_slca-MODE-SET, "
                            "focus_fuse_slca-MODE-SET (focus mode MODE on the store's mask set SET, without, with "
                            "SLCA, with SLCA and fusion).")
    focus: str = opt(_STUDY.focus, help="The focus mode of the focus methods.")
    sets: list[str] = opt(help="A recipe option by slca-train's name, NAME=VALUE (YAML); repeat it. Over the study's "
                               "CPU-sized recipe, " + ", ".join(f"{k}={v}" for k, v in _STUDY.train.items()) +
                               " (not slca-train's default backbone: --set backbone=tiny_vit_5m_224 studies that).",
                          factory=list, flag="--set")
    device: str | None = opt(None, help=DEVICE_HELP)
    merge: list[str] = opt(help="Join these study folders into --out instead of training (repeat it).",
                           factory=list)

    def study_config(self) -> StudyConfig:
        """The protocol these options ask for.

        Raises:
          ConfigError: fractions that are not numbers, seeds or ``--set`` values that do not parse.
        """
        from .recipe_args import parse_extra_seeds, parse_seeds, parse_sets

        try:
            fracs = tuple(float(f) for f in self.fractions.split(","))
        except ValueError:
            raise ConfigError(f"--fractions {self.fractions!r}: expected numbers, e.g. 0.1,1.0") from None
        return StudyConfig(fractions=fracs, seeds=parse_seeds(self.seeds),
                           extra_seeds=parse_extra_seeds(self.extra_seeds),
                           methods=tuple(m.strip() for m in self.methods.split(",") if m.strip()), focus=self.focus,
                           train={**_STUDY.train, **parse_sets(self.sets)})


@dataclass(kw_only=True)
class ExportOptions(Checked):
    """``slca-train export``: :func:`trainer.export.export_checkpoint`."""

    checkpoint: str = opt(help="best.pt of a run.")
    out: str = opt(help="The timm state dict to write (.pth); .extras.pth and .json go beside it.")
