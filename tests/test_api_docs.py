"""The API reference (docs/build_api.py, pdoc) builds cleanly and covers the public API.

The build takes about 15 s (172 modules); one worker builds it once per test session.
"""

import importlib
import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("api_docs")


def _builder():
    if "build_api" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_api"] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules["build_api"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    return out, _builder().build(out)


def _public_modules(modules):
    """(module name, imported module, its __all__) for every documented module with one."""
    for name in modules:
        module = importlib.import_module(name)
        if hasattr(module, "__all__"):
            yield name, module, module.__all__


def test_the_reference_builds_without_warnings_or_broken_references(reference):
    out, ref = reference
    assert not ref.problems, "docs/build_api.py reports:\n" + "\n".join(ref.problems)
    assert (out / "index.html").is_file() and (out / "search.js").is_file()
    packages = [n for n in ref.modules if hasattr(sys.modules[n], "__path__")]
    assert len(packages) >= 12 and "jaxdiff.utils.storage" in ref.modules


def test_every_name_in_an_all_is_on_its_module_page(reference):
    out, ref = reference
    missing = []
    for name, _, public in _public_modules(ref.modules):
        page = (out / f"{name.replace('.', '/')}.html").read_text()
        missing += [f"{name}.{n}" for n in public if f'<section id="{n}">' not in page]
    assert not missing, "public names missing from the reference:\n" + "\n".join(missing)


def _own_docstring(obj):
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        # dataclasses and NamedTuples make up "Name(field, ...)" when the class has none.
        return "" if doc.startswith(f"{obj.__name__}(") else doc.strip()
    return (getattr(obj, "__doc__", None) or "").strip()


def test_every_public_function_and_class_has_a_docstring(reference):
    _, ref = reference
    offenders = []
    for name, module, public in _public_modules(ref.modules):
        for n in public:
            obj = getattr(module, n)
            if not (callable(obj) and getattr(obj, "__module__", "").startswith("jaxdiff")):
                continue  # constants, type aliases (typing.Any is a class) and others' code
            shown = ref.modules[name].get(n)
            if not _own_docstring(obj):
                offenders.append(f"{name}.{n}: no docstring")
            elif shown is None or shown.kind not in ("class", "function") or not shown.docstring:
                offenders.append(f"{name}.{n}: pdoc shows it as an undocumented {shown.kind}")
    assert not offenders, "public functions and classes need docstrings:\n" + "\n".join(offenders)


def test_a_role_naming_nothing_is_reported(tmp_path, monkeypatch):
    (tmp_path / "apidoc_probe.py").write_text(
        textwrap.dedent('''
            """Uses :func:`present`, :class:`Box`, :attr:`Box.size` and :func:`gone`."""


            class Box:
                """See :meth:`grow` and :attr:`size`; not :meth:`shrink`."""

                def __init__(self):
                    self.size = 1

                def grow(self):
                    """Grows."""


            def present():
                """Calls :func:`jaxdiff.diffusion.karras_sigmas` and :func:`os.path.nope`."""
        ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import pdoc.doc

    modules = {"apidoc_probe": pdoc.doc.Module.from_name("apidoc_probe")}
    broken = _builder().broken_references(modules, package="apidoc_probe")
    assert broken == [
        "apidoc_probe.Box: :meth:`shrink` names nothing",
        "apidoc_probe.present: :func:`os.path.nope` names nothing",
        "apidoc_probe: :func:`gone` names nothing",
    ]
