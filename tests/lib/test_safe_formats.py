"""Nothing unsafe: no pickle anywhere on disk; NumPy and Keras files are read in their safe modes.

A source scan (AST, not grep, so comments and strings do not count) over both packages, the examples and
the benchmarks, plus a check that a pickled array planted in a cluster reference is refused.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("phenocoder_lib", "phenocoder_assets", "examples", "benchmarks")
                 for p in (REPO / folder).rglob("*.py"))
#: Modules that execute code when they read data.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "joblib", "cloudpickle", "dill", "shelve", "marshal", "torch"}
#: Calls that unpickle (or pickle for later unpickling) whatever object they are given.
UNSAFE_CALLS = {"read_pickle", "to_pickle", "loads_pickle"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            yield node, name, owner


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else "<expr>"
    return "<missing>"


def test_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"io.py", "training.py", "resources.py", "sensors.py"} <= names


def unsafe_uses(path: Path) -> list[str]:
    """What in ``path`` pickles or reads a file in an unsafe mode (empty list: nothing)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            problems.append(f"from {node.module} import ...")
    for node, name, owner in _calls(tree):
        where = f"line {node.lineno}: {ast.unparse(node)[:80]}"
        if name in UNSAFE_CALLS:
            problems.append(where)
        if _keyword(node, "allow_pickle") is True or _keyword(node, "safe_mode") is False:
            problems.append(where)
        if name == "load" and owner in {"np", "numpy"} and _keyword(node, "allow_pickle") is not False:
            problems.append(f"{where} (np.load needs allow_pickle=False)")
        if name == "load_model" and owner.endswith("saving") and _keyword(node, "safe_mode") is not True:
            problems.append(f"{where} (keras.saving.load_model needs safe_mode=True)")
        if name == "load" and owner == "yaml":
            problems.append(f"{where} (use yaml.safe_load)")
    return problems


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pickle_and_safe_loaders(path):
    assert unsafe_uses(path) == []


def test_the_scan_catches_what_it_forbids(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import pickle\nimport numpy as np\nimport keras\nimport yaml\nx = np.load('a.npy')\n"
                    "m = keras.saving.load_model('m.keras', safe_mode=False)\n"
                    "n = keras.saving.load_model('m.keras')\nimport pandas as pd\npd.read_pickle('f')\n"
                    "y = yaml.load(open('c.yaml'))\nfrom joblib import load\n")
    found = unsafe_uses(path)
    text = " | ".join(found)
    assert {int(f.split(":")[0][5:]) for f in found if f.startswith("line ")} == {5, 6, 7, 9, 10}, text
    assert "import pickle" in text and "from joblib" in text
    assert "allow_pickle=False" in text and "safe_mode=True" in text and "read_pickle" in text
    assert "yaml.safe_load" in text


def test_a_pickled_array_in_a_cluster_reference_is_refused(tmp_path):
    from phenocoder_lib.clustering import REFERENCE_FORMAT, ClusterReference

    header = {"format": REFERENCE_FORMAT, "categories": ["0"], "var_names": ["a"], "source": {}, "params": {},
              "scaled": False}
    path = tmp_path / "evil.npz"
    np.savez(path, header=np.array(json.dumps(header)), pca_mean=np.zeros(1),
             pca_components=np.array([object()], dtype=object), ref_embedding=np.zeros((1, 1)),
             ref_labels=np.zeros(1, dtype=int))
    with pytest.raises(ValueError, match="pickle"):
        ClusterReference.load(path)
