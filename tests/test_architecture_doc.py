"""docs/architecture.md stays current: its layer table names every package, in the order
tests/test_layering.py enforces, and every module of the composition layer."""

import re
from pathlib import Path

from test_layering import LAYERS, RANK

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _layer_rows() -> list[str]:
    table = DOC.split("## The layers, top to bottom", 1)[1].split("\n## ", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]


def _row_of(name: str, rows: list[str]) -> int:
    path = f"`jaxdiff/{name}/`" if (ROOT / "jaxdiff" / name).is_dir() else f"`jaxdiff/{name}.py`"
    hits = [i for i, row in enumerate(rows) if path in row.split("|")[2]]
    assert len(hits) == 1, f"docs/architecture.md's layer table should name {path} in one row"
    return hits[0]


def test_every_package_is_in_the_layer_table():
    on_disk = {p.stem for p in (ROOT / "jaxdiff").iterdir() if p.name != "__init__.py"}
    on_disk = {n for n in on_disk if not n.startswith("__")}
    assert on_disk == set(RANK), "a new package: add it to LAYERS in test_layering.py"
    rows = _layer_rows()
    for name in RANK:
        _row_of(name, rows)


def test_the_table_lists_layers_top_down_in_the_enforced_order():
    rows = _layer_rows()
    position = {name: _row_of(name, rows) for name in RANK}
    for lower, higher in zip(LAYERS, LAYERS[1:], strict=False):
        for a in lower:
            for b in higher:
                assert position[b] < position[a], f"{b} (above {a}) must come first"


def test_every_composition_module_is_described():
    rows = _layer_rows()
    row = rows[_row_of("experiment", rows)]
    named = set(re.findall(r"`(\w+)\.py`", row))
    modules = {p.stem for p in (ROOT / "jaxdiff" / "experiment").glob("*.py")} - {"__init__"}
    missing = sorted(modules - named)
    assert not missing, f"docs/architecture.md's composition row does not describe {missing}"
