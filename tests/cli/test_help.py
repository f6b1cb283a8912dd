"""Every command answers --help, and each option that a config defines appears in its command's help.

A command lost in a refactor (``samcache masks`` once was) fails here by name.
"""

import dataclasses
import re

import pytest
from typer.testing import CliRunner

from cli.samcache import app as samcache
from cli.slca_train import app as slca_train
from sam_cache.extract_config import extract_options, reading_options
from trainer.config import options as train_options
from trainer.experiment import StudyConfig

runner = CliRunner()


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag(option) -> str:
    """The flag an option is given by: its own (``--workers``), else its dashed name."""
    return re.split(r"[ /]", option.flag)[0] if option.flag else _dash(option.name)
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # rich wraps and cuts option names at 80 columns

# the config that defines each command's options, where one does (None: declared in cli/)
COMMANDS = {
    (samcache, "extract"): lambda: [_flag(o) for o in extract_options()] + ["--dataset", "--out"],
    (samcache, "masks"): None,
    (samcache, "convert"): None,
    (samcache, "export"): None,
    (samcache, "info"): None,
    (samcache, "verify"): None,
    (slca_train, None): lambda: [_flag(o) for o in train_options()],
    (slca_train, "sweep"): None,
    (slca_train, "eval"): None,
    (slca_train, "predict"): lambda: [_flag(o) for o in reading_options()],
    (slca_train, "study"): lambda: [_dash(f.name) for f in dataclasses.fields(StudyConfig) if f.name != "train"] + ["--set"],
    (slca_train, "export"): None,
}


def _flags(text: str) -> set[str]:
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", text))


@pytest.mark.parametrize("app,command", list(COMMANDS), ids=lambda v: v if isinstance(v, str) else None)
def test_every_command_answers_help_with_its_config_options(app, command):
    result = runner.invoke(app, ([command] if command else []) + ["--help"], env=WIDE)
    assert result.exit_code == 0, (command, result.output)
    fields = COMMANDS[(app, command)]
    if fields is not None:
        missing = sorted(set(fields()) - _flags(result.output))
        assert not missing, f"{command or 'train'} --help lacks {missing}"


def test_no_command_is_left_out_of_the_list():
    registered = {(samcache, c.name or c.callback.__name__) for c in samcache.registered_commands}
    registered |= {(slca_train, c.name or c.callback.__name__) for c in slca_train.registered_commands}
    registered.add((slca_train, None))
    assert registered == set(COMMANDS)
