"""Every command answers --help, and each option that a config defines appears in its command's help.

A command lost in a refactor (``samcache masks`` once was) fails here by name.
"""

import re

import pytest
from typer.testing import CliRunner

from cli.samcache import app as samcache
from cli.slca_train import app as slca_train
from sam_cache.commands import (ConvertOptions, ExportOptions, ExtractTarget, InfoOptions, MasksOptions,
                               VerifyOptions)
from sam_cache.extract_config import ExtractConfig, ReadingConfig
from sam_cache.options import options
from trainer.commands import EvalOptions, PredictOptions, StudyOptions, SweepOptions, TrainRun
from trainer.commands import ExportOptions as TrainExportOptions
from trainer.config import options as train_options

runner = CliRunner()


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag(option) -> str:
    """The flag an option is given by: its own (``--workers``), else its dashed name."""
    return re.split(r"[ /]", option.flag)[0] if option.flag else _dash(option.name)
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # rich wraps and cuts option names at 80 columns

def _of(*configs):
    """The flags, or for an argument its name, of every option of ``configs``."""
    return lambda: [o.name.upper() if o.positional else _flag(o) for c in configs for o in options(c)]


# the config that defines each command's options: every command has one
COMMANDS = {
    (samcache, "extract"): _of(ExtractTarget, ExtractConfig),
    (samcache, "masks"): _of(MasksOptions),
    (samcache, "convert"): _of(ConvertOptions),
    (samcache, "export"): _of(ExportOptions),
    (samcache, "info"): _of(InfoOptions),
    (samcache, "verify"): _of(VerifyOptions),
    (slca_train, None): lambda: [_flag(o) for o in train_options()] + _of(TrainRun)(),
    (slca_train, "sweep"): _of(SweepOptions),
    (slca_train, "eval"): _of(EvalOptions),
    (slca_train, "predict"): _of(PredictOptions, ReadingConfig),
    (slca_train, "study"): _of(StudyOptions),
    (slca_train, "export"): _of(TrainExportOptions),
}


def _flags(text: str) -> set[str]:
    """The --flags of a help text, and its arguments' names (``Usage: ... {store}``) in capitals."""
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", text)) | {a.upper() for a in re.findall(r"\{([a-z_]+)\}", text)}


@pytest.mark.parametrize("app,command", list(COMMANDS), ids=lambda v: v if isinstance(v, str) else None)
def test_every_command_answers_help_with_its_config_options(app, command):
    result = runner.invoke(app, ([command] if command else []) + ["--help"], env=WIDE)
    assert result.exit_code == 0, (command, result.output)
    missing = sorted(set(COMMANDS[(app, command)]()) - _flags(result.output))
    assert not missing, f"{command or 'train'} --help lacks {missing}"


def test_no_command_is_left_out_of_the_list():
    registered = {(samcache, c.name or c.callback.__name__) for c in samcache.registered_commands}
    registered |= {(slca_train, c.name or c.callback.__name__) for c in slca_train.registered_commands}
    registered.add((slca_train, None))
    assert registered == set(COMMANDS)
