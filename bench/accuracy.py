"""The study, as ``slca-train study`` runs it; this wrapper keeps the older command lines working.

    slca-train study --cache runs/busi.zarr --out runs/study-busi                 # the command
    python bench/accuracy.py --store runs/busi.zarr --out runs/study-busi         # the same study
    python bench/accuracy.py --store runs/busi.zarr --out runs/study-busi-focus --methods backbone,focus \\
        --set focus=crop img_size=96
    python bench/accuracy.py --merge runs/study-busi runs/study-busi-focus --out runs/study-busi-all

``--store`` is ``--cache``; ``--set`` and ``--merge`` take several values after one flag here, where
``slca-train study`` repeats the flag. Everything else passes through unchanged.
"""

from __future__ import annotations

import sys


def translate(argv: list[str]) -> list[str]:
    """This script's arguments as ``slca-train study`` takes them."""
    out, repeat = ["study"], None
    for arg in argv:
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            flag = "--cache" if flag == "--store" else flag
            repeat = flag if flag in ("--set", "--merge") and not eq else None
            if repeat is None:
                out.append(flag + eq + value)
        elif repeat is not None:
            out += [repeat, arg]
        else:
            out.append(arg)
    return out


def main() -> None:
    from cli.slca_train import app

    app(translate(sys.argv[1:]), prog_name="slca-train")


if __name__ == "__main__":
    main()
