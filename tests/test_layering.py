"""Imports go one way (issue 13): entry points and tools -> engine, predictor -> modeling ->
data, evaluation -> small shared modules.

Parsed with ``ast`` (nothing is imported), so an import inside a function counts as much as
one at the top of a module. Checked:

- no module of ``regionspot/data/``, ``regionspot/evaluation/`` or the shared modules imports
  ``regionspot.modeling`` (absolute or relative);
- ``data/`` and ``evaluation/`` do not import each other (what both need, e.g. the proposal
  file of a test dataset, lives in a shared module);
- the shared modules import none of ``modeling``, ``data``, ``evaluation``, ``engine``.
"""

import ast
import os

import pytest

PACKAGE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "RegionSpot")
PACKAGE_DIR = os.path.join(PACKAGE_ROOT, "regionspot")

# Small modules that data/, evaluation/ and modeling/ may all import.
SHARED_MODULES = ("io", "transforms", "proposal_sources", "filter_report", "structures", "weights_files")


def _module_name(path: str, root: str = PACKAGE_ROOT) -> str:
    rel = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def _modules_under(sub: str):
    top = os.path.join(PACKAGE_DIR, sub)
    for root, _, files in os.walk(top):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(root, f)


def imported_modules(path: str, root: str = PACKAGE_ROOT):
    """(line, absolute module name) of every import in the file (``root``: the folder holding
    the ``regionspot`` package), relative ones resolved."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    name = _module_name(path, root)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # "from . import modeling" / "from .. import modeling" name a subpackage
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return out


def violations(paths, forbidden, root: str = PACKAGE_ROOT):
    found = []
    for path in paths:
        for line, module in imported_modules(path, root):
            for prefix in forbidden:
                if module == prefix or module.startswith(prefix + "."):
                    found.append(f"{os.path.relpath(path, root)}:{line} imports {module}")
    return found


def _shared_paths():
    return [os.path.join(PACKAGE_DIR, f"{m}.py") for m in SHARED_MODULES]


def test_the_shared_modules_exist():
    missing = [p for p in _shared_paths() if not os.path.isfile(p)]
    assert not missing, missing


def test_data_and_evaluation_do_not_import_modeling():
    paths = list(_modules_under("data")) + list(_modules_under("evaluation"))
    assert len(paths) > 5
    assert violations(paths, ["regionspot.modeling"]) == []


def test_data_and_evaluation_do_not_import_each_other():
    assert violations(_modules_under("data"), ["regionspot.evaluation"]) == []
    assert violations(_modules_under("evaluation"), ["regionspot.data"]) == []


def test_shared_modules_import_no_component():
    assert violations(_shared_paths(), ["regionspot.modeling", "regionspot.data", "regionspot.evaluation",
                                        "regionspot.engine", "regionspot.predictor"]) == []


@pytest.mark.parametrize("source, expected", [
    ("from ...modeling.weights import load_sam", "regionspot.modeling.weights"),
    ("from ... import modeling", "regionspot.modeling"),
    ("import regionspot.modeling", "regionspot.modeling"),
    ("def f():\n    import regionspot.modeling.meta_arch", "regionspot.modeling.meta_arch"),
    ("def f():\n    from ...modeling import proposals", "regionspot.modeling"),
    ("class C:\n    def f(self):\n        from ..evaluation import protocol", "regionspot.data.evaluation"),
])
def test_the_check_sees_relative_absolute_and_function_level_imports(tmp_path, source, expected):
    """What the checks rely on, for a module ``regionspot/data/x/m.py``."""
    module = tmp_path / "regionspot" / "data" / "x" / "m.py"
    module.parent.mkdir(parents=True)
    module.write_text(source + "\n")
    assert violations([str(module)], [expected], root=str(tmp_path)) != []
    assert violations([str(module)], ["regionspot.engine"], root=str(tmp_path)) == []
