"""Facts about the code's shape that issue 22 asks a command to check."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 450


def _modules(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_module_in_the_packages_is_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules("sam_cache", "trainer")
            if (n := len(p.read_text().splitlines())) > LIMIT}
    assert not long, f"modules over {LIMIT} lines: {long}"


def test_nothing_outside_the_store_package_touches_its_raw_arrays():
    store = ROOT / "sam_cache" / "store"
    raw = re.compile(r"\._b\b|\bstore\.backends\b|from \.backends\b|\b(?:Zarr|H5)Backend\b")
    offenders = [f"{p.relative_to(ROOT)}:{k}" for p in _modules("sam_cache", "trainer", "cli", "bench")
                 if store not in p.parents
                 for k, line in enumerate(p.read_text().splitlines(), 1) if raw.search(line)]
    assert not offenders, f"raw store access outside sam_cache/store: {offenders}"
    assert (store / "__init__.py").is_file() and not (ROOT / "sam_cache" / "store.py").exists()
