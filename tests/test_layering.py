"""The package's import layering, checked by parsing every module (nothing is imported).

Layers, lowest first; a module may import its own layer and lower ones only:

0. ``errors``, ``utils``
1. ``parallel``, ``diffusion``, ``models``, ``data``
2. ``pretrained``
3. ``guidance``
4. ``samplers``
5. ``generate``
6. ``metrics``
7. ``training``
8. ``distill``
9. ``experiment`` (the composition layer: the only one that reads a config)

``train/`` and ``sample/`` (the CLIs) sit above all of them.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxdiff"
LAYERS = [
    {"errors", "utils"},
    {"parallel", "diffusion", "models", "data"},
    {"pretrained"},
    {"guidance"},
    {"samplers"},
    {"generate"},
    {"metrics"},
    {"training"},
    {"distill"},
    {"experiment"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
COMPOSITION = "experiment"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0].removesuffix(".py")
        yield path, top


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (function-level imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _jaxdiff_top(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "jaxdiff" and len(parts) > 1 else None


def test_every_top_level_module_has_a_layer():
    tops = {top for _, top in _modules() if top != "__init__"}
    assert tops <= set(RANK), f"add these to LAYERS: {sorted(tops - set(RANK))}"


def test_only_the_composition_layer_reads_configs():
    offenders = [
        str(path.relative_to(ROOT))
        for path, top in _modules()
        if top != COMPOSITION and any(n.split(".")[0] == "ml_collections" for n in _imports(path))
    ]
    assert not offenders, f"ml_collections imported outside jaxdiff/{COMPOSITION}: {offenders}"


def test_metrics_take_samples_not_samplers():
    banned = {"training", "samplers", "guidance", "generate", COMPOSITION}
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            t for n in _imports(path) if (t := _jaxdiff_top(n)) in banned
        )
        for path, top in _modules()
        if top == "metrics"
    }
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("path,top", list(_modules()), ids=lambda x: str(x)[-40:])
def test_no_module_imports_a_higher_layer(path, top):
    if top == "__init__":
        return
    higher = sorted(
        {t for n in _imports(path) if (t := _jaxdiff_top(n)) in RANK and RANK[t] > RANK[top]}
    )
    assert not higher, f"{path.relative_to(ROOT)} (layer {top}) imports higher layers {higher}"


def test_the_checker_sees_violations(tmp_path):
    # Guard against a vacuous test: a planted violation must be found.
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from jaxdiff.experiment import load_run\n    import ml_collections\n"
    )
    names = _imports(bad)
    assert "ml_collections" in names and _jaxdiff_top("jaxdiff.experiment.load_run") == "experiment"


def test_test_fixtures_are_never_module_scoped():
    """See tests/conftest.py: xdist's interleaving rebuilds module fixtures (80 s twice)."""
    tests = Path(__file__).resolve().parent
    offenders = [p.name for p in sorted(tests.glob("*.py")) if 'scope="module"' in p.read_text()]
    offenders.remove(Path(__file__).name)
    assert not offenders, f"use scope='session' for shared fixtures in {offenders}"
