"""Joining studies: one study from several runs on the same store with the same recipe (say, in two
processes side by side, or one fraction at a time), checked and summarized as if run at once."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

from sam_cache.outputs import atomic_write

from .config import TrainConfig
from .errors import ConfigError
from .experiment import PER_RUN_OPTIONS, method_options, summarize_study
from .records import read_rows, write_rows

_LOG = logging.getLogger(__name__)

__all__ = ["merge_studies"]


def _run_recipes(study: Path) -> dict[str, dict]:
    """``{run folder: its recipe}`` from each trained run's ``config.yaml`` (per-run options dropped)."""
    out = {}
    for cfg in sorted((study / "runs").glob("*/config.yaml")):
        flat = TrainConfig.load(cfg).flat()
        method = _RUN_FOLDER.match(cfg.parent.name)
        own = set(method_options(method["method"]) or ()) if method else set()  # what the method sets itself
        if "backbone" in own:  # a cache-only head: the backbone's own options do not apply to it
            own |= {"pretrained", "pretrained_path", "backbone_kwargs"}
        out[str(cfg.parent)] = {k: v for k, v in flat.items() if k not in PER_RUN_OPTIONS and k not in own}
    return out


_RUN_FOLDER = re.compile(r"(?P<method>.+)-f[0-9.]+-s\d+$")


def merge_studies(sources: list[str | Path], out: str | Path, note: Callable[[str], None] | None = None) -> list[dict]:
    """One study from several studies run on the same store with the same recipe (say, in two processes
    side by side): their ``runs.csv`` rows joined into ``out``, then summarized.

    The recipe check reads every trained run's ``config.yaml``, so it covers studies from before
    ``study.json`` recorded the recipe. Where a source recorded no content digest, the store is checked
    by its path alone (a store extracted again at that path passes); ``note`` is told which studies,
    and the merged ``study.json`` records ``store_check``: ``"content digest"`` or ``"path"``.

    Arguments:
      sources: the study folders.
      out: the merge's folder (new, or an earlier merge).
      note: where the line on a path-only store check goes (default: this module's logger, WARNING).

    Returns:
      The summary rows (see :func:`summarize_study`).

    Raises:
      ConfigError: no source, a source has no ``runs.csv``, two trained runs had different recipes (the message
        names the runs and options), the sources' stores differ (by path where a study did not record
        the store's content digest, else by digest), a (method, fraction, seed) is
        in two sources with different results, or ``out`` holds a study that is not a merge (its
        rows would be replaced: an earlier merge is the only study a merge writes over).
    """
    out = Path(out)
    if not sources:
        raise ConfigError("no study to merge: give one or more study folders")
    _refuse_a_study(out)
    rows, seen, recipes, record = [], {}, {}, {"merged_from": []}
    for src in map(Path, sources):
        if not (src / "runs.csv").exists():
            raise ConfigError(f"{src / 'runs.csv'}: not found; is {src} a study folder?")
        info = json.loads((src / "study.json").read_text()) if (src / "study.json").exists() else {}
        known = {m["study"] for m in record["merged_from"]}
        record["merged_from"] += [m for m in _provenance(src, info) if m["study"] not in known]
        bare = _check_one_store(record["merged_from"])  # the studies checked by path only
        record["store_check"] = "path" if bare else "content digest"
        recipes.update(_run_recipes(src))
        for r in read_rows(src / "runs.csv"):
            key = (r["method"], float(r["fraction"]), int(r["seed"]))
            if key in seen:
                if seen[key]["balanced_accuracy"] != r["balanced_accuracy"]:
                    raise ConfigError(f"{src / 'runs.csv'}: {key} is also in {seen[key]['_from']} with another result")
                continue
            seen[key] = {**r, "_from": str(src)}
            rows.append(r)
    if recipes:
        # the reference: a run with the fullest recipe (a method's own options are left out of its runs')
        first, ref = max(recipes.items(), key=lambda kv: len(kv[1]))
        for run, recipe in recipes.items():
            diff = sorted(k for k in set(ref) & set(recipe) if ref.get(k) != recipe.get(k))
            if diff:
                raise ConfigError(f"{run} and {first} were trained with different recipes: "
                                  + ", ".join(f"{k} ({ref.get(k)!r} vs {recipe.get(k)!r})" for k in diff))
        record["recipe"] = json.loads(json.dumps(ref))
    if bare:
        (note or _LOG.warning)(f"no content digest of the store recorded in {', '.join(bare)}, so only the store's "
                               "path says the studies share one; a store extracted again at that path would pass "
                               "(compare a probe's rows in both to be sure)")
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / "runs.csv")
    atomic_write(out / "study.json", lambda p: p.write_text(json.dumps(record, indent=2)))
    return summarize_study(out)


def _check_one_store(sources: list[dict]) -> list[str]:
    """The sources ran on one store: one content digest where every invocation recorded one (a store
    at another path with the same digest holds the same rows), else one path and no two digests (the
    same path extracted again with other bytes is another store). Returns the studies with an
    invocation that recorded no digest, sorted: empty where the digest checked them all."""
    runs = [(m["study"], inv) for m in sources for inv in (m.get("invocations") or [m])]
    digests: dict[str, list[str]] = {}
    for study, inv in runs:
        if inv.get("store_digest"):
            digests.setdefault(inv["store_digest"], []).append(f"{study} ({inv.get('store')})")
    if len(digests) > 1:
        raise ConfigError("the studies were run on stores that hold different rows (content digests "
                          + "; ".join(f"{d}: {', '.join(sorted(set(w)))}" for d, w in sorted(digests.items()))
                          + "), so their seeds are not paired; was a store extracted again?")
    bare = sorted({study for study, inv in runs if not inv.get("store_digest")})
    paths = {st for m in sources for st in m["stores"]}
    if len(paths) > 1 and bare:
        raise ConfigError(f"the studies were run on different stores: {sorted(paths)}")
    return bare


def _refuse_a_study(out: Path) -> None:
    """A merge is derived from its sources and may be written again; a study's own ``runs.csv`` is not."""
    if not (out / "runs.csv").exists():
        return
    try:
        merged = "merged_from" in json.loads((out / "study.json").read_text())
    except (OSError, ValueError):
        merged = False
    if not merged:
        raise ConfigError(f"--out {out} holds a study (runs.csv) that is not a merge: merging into it would replace "
                          "its rows; give the merge a folder of its own")


def _provenance(src: Path, info: dict) -> list[dict]:
    """What a merged ``study.json`` keeps of a source: its folder, stores and invocations. Not its
    recipe, which the merge checks against the others and keeps once; a merged source gives its
    own sources, so a merge of merges stays flat (a folder named twice is kept once)."""
    if "merged_from" in info:
        return [{k: v for k, v in m.items() if k != "recipe"} for m in info["merged_from"]]
    stores = {i.get("store") for i in info.get("invocations", [info]) if i.get("store")}
    return [{"study": str(src), "stores": sorted(stores), **{k: v for k, v in info.items() if k != "recipe"}}]
