"""The shape a newcomer relies on, checked statically (docs/architecture.md states the same rules).

- every public function and method of ``phenocoder_lib`` has numpydoc ``Parameters`` (all of them) and
  ``Returns`` sections (numpydoc's own validator, checks PR01, PR02, RT01, GL08);
- no module outside ``phenocoder_lib`` imports one of its ``_private`` modules;
- no library module imports a module further down the pipeline than itself;
- the ``Phenocoder`` facade stays at most 300 lines, and each asset function (with its per-well body
  ``_<asset>_one``) at most 30 code lines.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "phenocoder_lib"

#: Pipeline order: a module may import modules of its own rank or lower, never higher.
#: Rank 0 is infrastructure every stage may use.
RANKS = {
    "io": 0, "keys": 0, "warnings": 0, "validation": 0, "_lazy": 0, "_grouping": 0, "_backend": 0, "_docs": 0,
    "radius_graph": 0, "umap_layout": 0, "parallel": 0,
    "synthetic": 1, "ingest": 1,
    "patches": 2,
    "models": 3, "training": 3, "plotting": 3, "model_config": 3, "conditions": 3,
    "encoding": 4, "message_passing": 4,
    "clustering": 5,
    "spatial": 6,
    "embedding": 7,
    "cellprofiler": 8, "profiles": 8, "retrieval": 8,
    "evaluation": 9, "screen_evaluation": 9,
    "pipeline": 10, "phenocoder": 10,
}

#: numpydoc checks: PR01 parameters not documented, PR02 unknown parameters, RT01 no Returns, GL08 no docstring.
CHECKS = ("PR01", "PR02", "RT01", "GL08")


def _public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(LIB)], prefix="phenocoder_lib."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


def _public_callables(module):
    own = getattr(module, "__all__", None)
    for name, obj in vars(module).items():
        if name.startswith("_") or (own is not None and name not in own):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj
        elif inspect.isclass(obj) and not issubclass(obj, Warning | Exception):
            yield f"{module.__name__}.{name}", obj
            for meth_name, meth in vars(obj).items():
                if meth_name.startswith("_"):
                    continue
                if isinstance(meth, staticmethod | classmethod):
                    meth = meth.__func__
                if inspect.isfunction(meth):
                    yield f"{module.__name__}.{name}.{meth_name}", meth
                elif isinstance(meth, property) and meth.fget is not None:
                    continue


def _numpydoc_errors(qualname: str, obj) -> list[str]:
    from numpydoc.validate import validate

    if inspect.isclass(obj):
        # A class documents its constructor's parameters; it has no Returns section.
        checks = ("PR01", "PR02", "GL08")
        if obj.__init__ is object.__init__ or (inspect.signature(obj).parameters == {}):
            checks = ("GL08",)
    else:
        checks = CHECKS
        try:
            returns_none = inspect.signature(obj).return_annotation in (None, "None")
        except (TypeError, ValueError):
            returns_none = False
        if returns_none or inspect.isgeneratorfunction(obj):
            checks = tuple(c for c in checks if c != "RT01")
    result = validate(qualname)
    return [f"{qualname}: {code} {msg}" for code, msg in result["errors"] if code in checks]


@pytest.mark.parametrize("module_name", _public_modules())
def test_public_functions_have_numpydoc_sections(module_name):
    module = importlib.import_module(module_name)
    errors = []
    for qualname, obj in _public_callables(module):
        errors += _numpydoc_errors(qualname, obj)
    assert not errors, "\n".join(errors)


def test_the_facade_methods_have_numpydoc_sections():
    from phenocoder_lib import Phenocoder

    errors = []
    for name in dir(Phenocoder):
        if name.startswith("_") or not inspect.isfunction(getattr(Phenocoder, name)):
            continue
        method = getattr(Phenocoder, name)
        errors += _numpydoc_errors(f"{method.__module__}.{method.__qualname__}", method)
    assert not errors, "\n".join(errors)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def test_no_private_library_module_is_imported_from_outside():
    offenders = []
    for path in _python_files("phenocoder_assets", "tests", "benchmarks", "examples"):
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] == "phenocoder_lib" and any(p.startswith("_") and p != "__version__" for p in parts[1:]):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offenders, "\n".join(offenders)


def _stage(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "phenocoder_lib" or len(parts) < 2:
        return None
    return parts[1]


def test_no_library_module_imports_up_the_pipeline():
    offenders = []
    for path in _python_files("phenocoder_lib"):
        own = _stage(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if own in (None, "__init__"):
            continue
        assert own in RANKS, f"{path.relative_to(ROOT)}: give the module a rank in RANKS (tests/test_code_shape.py)"
        for line, name in _imports(path):
            other = _stage(name)
            if other is None or other not in RANKS:
                continue
            if RANKS[other] > RANKS[own]:
                offenders.append(f"{path.relative_to(ROOT)}:{line} ({own}, rank {RANKS[own]}) imports {name} "
                                 f"(rank {RANKS[other]})")
    assert not offenders, "\n".join(offenders)


def test_no_dagster_in_the_library():
    offenders = [f"{p.relative_to(ROOT)}:{line}" for p in _python_files("phenocoder_lib")
                 for line, name in _imports(p) if name.split(".")[0] == "dagster"]
    assert not offenders


def _code_lines(source: str, node: ast.AST) -> int:
    """Lines of a function that hold code: no blank lines, comments or docstring."""
    lines = source.splitlines()[node.lineno - 1: node.end_lineno]
    doc = ast.get_docstring(node, clean=False)
    body = node.body
    skip = set()
    if doc is not None and isinstance(body[0], ast.Expr):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    count = 0
    for offset, text in enumerate(lines):
        number = node.lineno + offset
        if number in skip or not text.strip() or text.strip().startswith("#"):
            continue
        count += 1
    return count


def test_the_facade_is_at_most_300_lines():
    files = [LIB / "phenocoder.py", *sorted(LIB.glob("_facade_*.py"))]
    total = sum(len(p.read_text().splitlines()) for p in files)
    assert total <= 300, f"the Phenocoder facade is {total} lines over {[p.name for p in files]}"


def _is_asset(node: ast.FunctionDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name in {"asset", "multi_asset", "per_sample_asset", "asset_check", "graph_asset"}:
            return True
    return False


def test_every_asset_is_at_most_30_code_lines():
    long = []
    for path in sorted((ROOT / "phenocoder_assets" / "assets").glob("*.py")):
        source = path.read_text()
        functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
        assets = {n.name for n in functions if _is_asset(n)}
        for node in functions:
            # A per-well asset's body for one well (``_<asset>_one``) is part of the asset.
            if node.name in assets or node.name.removeprefix("_").removesuffix("_one") in assets:
                n = _code_lines(source, node)
                if n > 30:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} code lines")
    assert not long, "\n".join(long)
