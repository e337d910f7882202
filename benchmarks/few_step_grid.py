"""One row per few-step student, digits 0..9 in columns: docs/few_step_grid.png.

Usage (after ``python -m sample --workdir=W --steps=k --out=W/samples/stepsk.png``, which
writes the samples beside the PNG as ``stepsk.npz``, labels cycling 0..9)::

    python -m benchmarks.few_step_grid --out=docs/few_step_grid.png \\
        "CT, 1 step=runs/ct/samples/steps1.npz" "CD, 4 steps=runs/cd/samples/steps4.npz"

Each ``NAME=FILE`` argument is one row: the first sample of each class 0..9 in FILE.
"""

import argparse

import numpy as np

from benchmarks.common import save_labelled_rows
from jaxdiff.utils import storage


def first_of_each_class(path: str, classes: int = 10) -> np.ndarray:
    """The first sample of each class ``0..classes-1`` in a ``python -m sample`` .npz."""
    data = storage.load_npz(path)
    labels = np.asarray(data["labels"]).reshape(-1)
    picks = []
    for c in range(classes):
        where = np.flatnonzero(labels == c)
        if not where.size:
            raise SystemExit(f"{path} has no sample of class {c}")
        picks.append(where[0])
    return np.asarray(data["samples"])[picks]


def main(argv: list[str] | None = None) -> None:
    """Parses the rows (``argv``, default the command line) and writes the grid."""
    parser = argparse.ArgumentParser(description=__doc__.split("\\n")[0])
    parser.add_argument("rows", nargs="+", help="NAME=FILE.npz, one per row")
    parser.add_argument("--out", default="docs/few_step_grid.png")
    args = parser.parse_args(argv)
    names, rows = [], []
    for item in args.rows:
        name, sep, path = item.rpartition("=")
        if not sep:
            raise SystemExit(f"row {item!r}: write NAME=FILE.npz")
        names.append(name)
        rows.append(first_of_each_class(path))
    save_labelled_rows(rows, names, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
