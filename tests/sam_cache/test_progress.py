import io

import pytest
from rich.console import Console

from sam_cache.progress import progress


def _file_console():
    return Console(file=io.StringIO(), width=200)  # a file: not a terminal


def test_a_job_in_a_file_writes_a_start_line_timed_lines_and_an_end_line():
    console = _file_console()
    with progress("extract tiny", 4, unit="img", console=console, interval=0.0) as bar:
        bar.advance()
        bar.advance(3)
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "extract tiny: 0/4"
    assert lines[1].startswith("extract tiny: 1/4 (25 %), ") and " img/s, " in lines[1] and ", eta " in lines[1]
    assert lines[2].startswith("extract tiny: 4/4 (100 %), ") and "eta" not in lines[2]
    assert len(lines) == 3  # the end is not written twice


def test_lines_are_spaced_by_the_interval_and_a_stopped_job_says_where_it_stopped():
    console = _file_console()
    with pytest.raises(RuntimeError):
        with progress("masks", 10, console=console, interval=3600.0) as bar:
            for _ in range(6):
                bar.advance()
            raise RuntimeError("disk full")
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 2 and lines[0] == "masks: 0/10" and lines[1].startswith("masks: 6/10 (60 %), ")


def test_transient_or_disabled_progress_writes_nothing_in_a_file():
    console = _file_console()
    with progress("epoch 1/3", 5, transient=True, console=console, interval=0.0) as bar:
        bar.advance(5)
    with progress("extract", 5, enabled=False, console=console, interval=0.0) as bar:
        bar.set(5)
    assert console.file.getvalue() == "" and bar.completed == 5


def test_a_terminal_gets_a_live_bar_and_no_lines():
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with progress("convert", 3, unit="row", console=console, interval=0.0) as bar:
        bar.advance(3)
    out = console.file.getvalue()
    assert "convert" in out and "3/3" in out and "convert: " not in out
