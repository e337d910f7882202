"""Builds jaxdiff's HTML API reference from its docstrings with pdoc.

Usage (from the repository root, with the test extras installed)::

    python docs/build_api.py                # writes docs/_build/api/; open index.html
    python docs/build_api.py --out=DIR      # anywhere else

Every module of the ``jaxdiff`` package gets a page. A package's page documents the names
in its ``__all__`` (the public API) and links every module under it. Docstrings are read
as Google style. The command exits with status 1, printing one line per problem, when

* pdoc warns: a module that does not import, an annotation it cannot resolve, and so on;
* a Sphinx-style role in a docstring (``:func:`name```, ``:class:`~pkg.mod.Name```, ...)
  names nothing, resolved from the module that defines the docstring, so a renamed or
  removed function cannot leave a dead reference behind.

``tests/test_api_docs.py`` runs the same build, so the reference cannot rot.
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import importlib
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pdoc
import pdoc.doc
import pdoc.render

PACKAGE = "jaxdiff"
DOCS = Path(__file__).resolve().parent
DEFAULT_OUT = DOCS / "_build" / "api"
TEMPLATES = DOCS / "api_templates"

# A Sphinx cross-reference role: the kind and the target (a leading "~" only shortens the
# displayed name in Sphinx; "()" after a function name is allowed).
_ROLE = re.compile(r":(?:py:)?(mod|func|class|meth|attr|data|const|exc|obj):`~?([^`]+?)(?:\(\))?`")
# pdoc's "Error parsing type annotation <t> for <fullname>..." warning.
_ANNOTATION = re.compile(
    r"^Error parsing type annotation .* for (?P<name>[\w.]+?)(?:\. Import of |: | after )",
    re.DOTALL,
)
_MISSING = object()


@dataclasses.dataclass
class Reference:
    """The result of a build.

    Attributes:
        modules: pdoc's description of every documented module, by module name.
        problems: one line per problem (pdoc warnings, broken references); empty when the
            reference is clean.
    """

    modules: dict[str, pdoc.doc.Module]
    problems: list[str]


def module_names(package: str = PACKAGE) -> list[str]:
    """The package and every module under it, in ``pkgutil.walk_packages`` order."""
    root = importlib.import_module(package)
    return [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]


def configure() -> None:
    """Sets pdoc's rendering options for jaxdiff (global to pdoc, so call before rendering)."""
    version = getattr(importlib.import_module(PACKAGE), "__version__", "")
    pdoc.render.configure(
        docformat="google",
        footer_text=f"{PACKAGE} {version}".strip(),
        template_directory=TEMPLATES,
    )


def build(out_dir: str | Path = DEFAULT_OUT, names: Sequence[str] | None = None) -> Reference:
    """Writes the HTML reference to ``out_dir`` and checks it.

    This is what ``pdoc.pdoc`` does, except that every module is listed explicitly (pdoc
    walks into only the submodules a package names in ``__all__``) and that pdoc's
    warnings are collected instead of printed.

    Args:
        out_dir: folder for the pages (created; existing pages are overwritten).
        names: modules to document; default: :func:`module_names`.

    Returns:
        The documented modules and the problems found.
    """
    out_dir = Path(out_dir)
    configure()
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modules: dict[str, pdoc.doc.Module] = {}
        for name in names or module_names():
            try:
                modules[name] = pdoc.doc.Module.from_name(name)
            except RuntimeError as err:  # pdoc wraps the import error
                problems.append(f"{name}: cannot import: {err.__cause__ or err}")
        for module in modules.values():
            page = out_dir / f"{module.fullname.replace('.', '/')}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_bytes(pdoc.render.html_module(module, modules).encode())
        (out_dir / "index.html").write_bytes(pdoc.render.html_index(modules).encode())
        (out_dir / "search.js").write_bytes(pdoc.render.search_index(modules).encode())
    pdoc_dir = str(Path(pdoc.__file__).parent)
    for w in caught:
        # Only pdoc's own reports: a third-party deprecation warning raised while a module
        # is imported says nothing about the reference.
        if w.filename.startswith(pdoc_dir) and not _pdoc_limitation(str(w.message)):
            problems.append(f"pdoc: {w.message}")
    problems.extend(broken_references(modules))
    return Reference(modules, sorted(set(problems)))


def broken_references(modules: dict[str, pdoc.doc.Module], package: str = PACKAGE) -> list[str]:
    """Sphinx-style roles in ``package``'s docstrings whose target does not exist.

    A target resolves like a Python name seen from the docstring's own place: a member of
    the enclosing classes (pdoc's view, so attributes set in ``__init__`` count), a name
    in the defining module, a builtin, or an importable dotted path. A leading ``.`` is
    relative to the defining module's package, as pdoc reads it. Docstrings that other
    packages define (inherited methods, re-exported objects) are not checked.

    Args:
        modules: pdoc's modules, by name (as in :attr:`Reference.modules`).
        package: the top-level package whose docstrings are checked.

    Returns:
        One sorted line per broken reference: where it is and the role.
    """
    broken = {}
    for module in modules.values():
        for doc in _walk(module):
            modname, qualname = doc.taken_from
            if modname != package and not modname.startswith(package + "."):
                continue
            for kind, target in _ROLE.findall(doc.docstring):
                target = target.strip()
                if not _resolves(target, modname, qualname, modules):
                    where = f"{modname}.{qualname}".rstrip(".")
                    broken[(where, target)] = f"{where}: :{kind}:`{target}` names nothing"
    return sorted(broken.values())


def _walk(doc: pdoc.doc.Doc) -> Iterator[pdoc.doc.Doc]:
    yield doc
    if isinstance(doc, pdoc.doc.Namespace):
        for member in doc.own_members:
            yield from _walk(member)


def _resolves(
    target: str, modname: str, qualname: str, modules: dict[str, pdoc.doc.Module]
) -> bool:
    if target.startswith("."):
        module = sys.modules.get(modname)
        base = modname if hasattr(module, "__path__") else modname.rpartition(".")[0]
        target = target[1:]
        while target.startswith("."):
            target, base = target[1:], base.rpartition(".")[0]
        return _import_path(f"{base}.{target}") is not _MISSING
    module_doc = modules.get(modname) or pdoc.doc.Module.from_name(modname)
    parts = qualname.split(".") if qualname else []
    for i in range(len(parts), 0, -1):  # innermost enclosing class first
        scope = module_doc.get(".".join(parts[:i]))
        if isinstance(scope, pdoc.doc.Class) and scope.get(target) is not None:
            return True
    if module_doc.get(target) is not None:
        return True
    for scope in (sys.modules[modname], builtins):
        if _getattr_path(scope, target) is not _MISSING:
            return True
    return _import_path(target) is not _MISSING


def _getattr_path(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            break
    return obj


def _import_path(dotted: str) -> object:
    """The object at an absolute dotted path (a module, then attributes), or _MISSING."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return _getattr_path(module, ".".join(parts[i:])) if parts[i:] else module
    return _MISSING


def _pdoc_limitation(message: str) -> bool:
    """True for pdoc annotation warnings that no change to jaxdiff's code can avoid.

    Two cases, each checked on the object itself rather than by a pattern on the text:

    * the constructor of a ``NamedTuple`` in a module with postponed annotations: Python
      generates it in a namespace of its own, where pdoc cannot evaluate the annotation
      strings (it shows them as written);
    * an object defined outside jaxdiff that a jaxdiff module holds in a variable (such
      as a JAX initializer): its annotations belong to the other package.
    """
    match = _ANNOTATION.match(message)
    if not match or not match["name"].startswith(PACKAGE + "."):
        return False
    name = match["name"]
    owner = _import_path(name.rpartition(".")[0])
    if name.endswith(".__init__") and isinstance(owner, type) and hasattr(owner, "_fields"):
        return issubclass(owner, tuple)
    obj = _import_path(name)
    return obj is not _MISSING and not getattr(obj, "__module__", PACKAGE).startswith(PACKAGE)


def main(argv: Sequence[str] | None = None) -> int:
    """Builds the reference; returns 1 (after printing the problems) if it is not clean."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    reference = build(args.out)
    for problem in reference.problems:
        print(problem, file=sys.stderr)
    print(f"wrote {len(reference.modules)} module pages to {args.out / 'index.html'}")
    return 1 if reference.problems else 0


if __name__ == "__main__":
    sys.exit(main())
