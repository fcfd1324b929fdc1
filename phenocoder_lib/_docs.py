"""Docstring inheritance for the facade: a method that passes its arguments on documents them once.

The ``Phenocoder`` methods take the arguments of the library function they call. Their numpydoc
``Parameters`` and ``Returns`` sections are therefore taken from that function's docstring, read from
its source file with :mod:`ast` (no import: the facade must not load TensorFlow to be documented).
A parameter that the method documents itself keeps the method's text; one documented nowhere is left
out, so that numpydoc's validator (``tests/test_code_shape.py``) reports it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import re
from collections.abc import Callable
from pathlib import Path

_HEADER = re.compile(r"^(?P<title>[A-Z][A-Za-z ]+)\n-{3,}$", re.MULTILINE)


@functools.cache
def _source_docstring(target: str) -> str:
    """Return the docstring of ``module.name`` or ``module.Class`` from the module's source, without importing it."""
    module, _, name = target.rpartition(".")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find the module {module!r} of {target!r}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return inspect.cleandoc(ast.get_docstring(node) or "")
    raise ValueError(f"{target!r} is not a top-level function or class of {module!r}")


def sections(doc: str) -> dict[str, str]:
    """Split a numpydoc docstring into its sections.

    Parameters
    ----------
    doc
        The docstring (already dedented).

    Returns
    -------
    dict of str to str
        ``{"Summary": ..., "Parameters": ..., "Returns": ..., ...}``: each section's body, dedented.
    """
    out: dict[str, str] = {}
    matches = list(_HEADER.finditer(doc))
    out["Summary"] = doc[: matches[0].start()].strip() if matches else doc.strip()
    for match, after in zip(matches, [*matches[1:], None], strict=False):
        body = doc[match.end(): after.start() if after else len(doc)]
        out[match.group("title")] = body.strip("\n")
    return out


def parameter_entries(section: str) -> dict[str, str]:
    r"""Split a ``Parameters`` section into one entry per parameter name.

    Parameters
    ----------
    section
        The section body: entries ``name : type`` (or ``a, b : type``) at the left margin, their
        descriptions indented below.

    Returns
    -------
    dict of str to str
        ``{name: "name : type\\n    description"}``; names documented together share their entry text.
    """
    entries: dict[str, str] = {}
    current: list[str] = []
    names: list[str] = []

    def close() -> None:
        for name in names:
            entries[name] = "\n".join(current).rstrip()

    for line in section.splitlines():
        if line and not line[0].isspace():
            close()
            head = line.split(" : ")[0]
            names = [n.strip().lstrip("*") for n in head.split(",")]
            current = [line]
        elif names:
            current.append(line)
    close()
    return entries


def delegates_to(target: str, returns: str | None = None) -> Callable:
    """Complete a method's docstring with the ``Parameters`` and ``Returns`` of the function it calls.

    Parameters
    ----------
    target
        Dotted name of the library function or class whose docstring documents the parameters
        (``"phenocoder_lib.training.train"``).
    returns
        The ``Returns`` section body for the method; by default the target's own.

    Returns
    -------
    Callable
        A decorator that rewrites ``method.__doc__`` and returns the method.
    """

    def decorate(method: Callable) -> Callable:
        own = sections(inspect.cleandoc(method.__doc__ or ""))
        theirs = sections(_source_docstring(target))
        documented = {**parameter_entries(theirs.get("Parameters", "")),
                      **parameter_entries(own.get("Parameters", ""))}
        wanted = [n for n in inspect.signature(method).parameters if n != "self"]
        seen: list[str] = []
        for name in wanted:
            entry = documented.get(name)
            if entry is None:
                continue
            # an entry documenting several names together keeps only those the method takes
            head, _, rest = entry.partition("\n")
            names, sep, kind = head.partition(" : ")
            kept = [n for n in (x.strip() for x in names.split(",")) if n.lstrip("*") in wanted]
            entry = ", ".join(kept) + sep + kind + ("\n" + rest if rest else "")
            if entry not in seen:
                seen.append(entry)
        parts = [own["Summary"]]
        parts += [f"{title}\n{'-' * len(title)}\n{body}" for title, body in own.items()
                  if title not in ("Summary", "Parameters", "Returns")]
        if seen:
            parts.append("Parameters\n----------\n" + "\n".join(seen))
        result = returns if returns is not None else theirs.get("Returns", own.get("Returns"))
        if result:
            parts.append(f"Returns\n-------\n{result.strip()}")
        parts.append(f"See Also\n--------\n{target}")
        method.__doc__ = "\n\n".join(parts) + "\n"
        return method

    return decorate
