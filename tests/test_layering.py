"""Imports go one way (issues 13 and 24), over every module of ``regionspot/``.

Parsed with ``ast`` (nothing is imported), so an import inside a function or a method counts
as much as one at the top of a module, and so does ``importlib.import_module("regionspot.x")``
with a literal name. ``from X import a`` is an import of the submodule ``X.a`` when ``X/a.py``
(or ``X/a/``) exists, else of ``X``; ``import X.Y`` is an import of ``X.Y``. A parent package's
``__init__`` that Python runs on the way is not counted as an import (the same convention as
import-linter), except where the code names that package itself.

The layers, bottom to top (:data:`LAYERS`); a module may import its own part and any part of a
lower layer, never a higher layer nor another part of its own layer:

0. shared: ``io``, ``transforms``, ``proposal_sources``, ``filter_report``, ``structures``,
   ``weights_files``, ``checkpoint`` (the head's checkpoint layout), ``config_defaults`` (every
   config key, ``ConfigError``, the ``MODEL.DEVICE`` policy), ``environment`` (what a
   benchmark records about the machine);
1. ``data/`` | ``evaluation/`` (peers: neither imports the other);
2. ``modeling/``;
3. ``config`` (loads a config file and checks it, asking data/, evaluation/ and modeling/ for
   their allowed values; the parts import only ``config_defaults``);
4. ``engine/`` | ``predictor`` with ``predictions``, ``predictor_inputs`` and the ONNX route
   (``onnx_export``, ``deploy``) | ``cli`` (the entry
   points' logging and error handling) | ``testing/`` (random-weight fixtures, built with modeling/);
5. ``webapp`` with ``drawing`` and ``attention_maps`` (the app's pictures);
6. ``tools/`` (the console commands);
7. the package itself (``regionspot/__init__.py``: registrations and the public names).

Checked:

- every module of the package belongs to exactly one layer (a new module must be placed);
- no module imports a higher layer or a peer part (the offending import lines are printed);
- no import cycles between modules of the package: the strongly connected components of the
  full import graph (module-level and function-level imports) are single modules.
"""

import ast
import os
from typing import Dict, Iterable, List, Optional, Set, Tuple

import pytest

PACKAGE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "RegionSpot")
PACKAGE_DIR = os.path.join(PACKAGE_ROOT, "regionspot")
PACKAGE = "regionspot"

# Bottom to top. A layer is a tuple of parts; a part is a tuple of module names, each standing
# for that module and everything under it. Parts of one layer are peers: they import only lower layers.
LAYERS: Tuple[Tuple[Tuple[str, ...], ...], ...] = (
    (("io", "transforms", "proposal_sources", "filter_report", "structures", "weights_files", "checkpoint",
      "config_defaults", "environment", "model_zoo", "input_checks"),),
    (("data",), ("evaluation",)),
    (("modeling",),),
    (("config",),),
    (("engine",), ("predictor", "predictions", "predictor_inputs", "deploy", "onnx_export"), ("cli",), ("testing",)),
    (("webapp", "drawing", "attention_maps"),),
    (("tools",),),
    (("",),),  # the package's __init__ (exactly "regionspot", not its submodules)
)


# Small modules that data/, evaluation/ and modeling/ may all import.
SHARED_MODULES = LAYERS[0][0]


def _module_name(path: str, root: str = PACKAGE_ROOT) -> str:
    rel = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def package_modules(root: str = PACKAGE_ROOT) -> Dict[str, str]:
    """{module name: path} of every ``.py`` file under ``root/regionspot``."""
    found = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                found[_module_name(path, root)] = path
    return found


def imported_modules(path: str, root: str = PACKAGE_ROOT, modules: Optional[Iterable[str]] = None):
    """(line, absolute module name) of every import in the file (``root``: the folder holding the
    ``regionspot`` package), relative ones resolved; ``from X import a`` gives ``X.a`` when that is
    a module of ``modules`` (default: the modules under ``root``), else ``X``."""
    modules = set(package_modules(root) if modules is None else modules)
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
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if sub in modules else target))
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def _owner(name: str, modules: Set[str]) -> Optional[str]:
    """The most specific module of the package that ``name`` names (None: not the package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: str = PACKAGE_ROOT) -> Dict[str, List[Tuple[str, int, str]]]:
    """{module: [(imported module, line, path), ...]} over the package's own modules."""
    modules = package_modules(root)
    names = set(modules)
    graph = {}
    for name, path in modules.items():
        edges = []
        for line, target in imported_modules(path, root, names):
            owner = _owner(target, names) if target == PACKAGE or target.startswith(PACKAGE + ".") else None
            if owner is not None and owner != name:
                edges.append((owner, line, path))
        graph[name] = edges
    return graph


def violations(paths, forbidden, root: str = PACKAGE_ROOT):
    found = []
    for path in paths:
        for line, module in imported_modules(path, root):
            for prefix in forbidden:
                if module == prefix or module.startswith(prefix + "."):
                    found.append(f"{os.path.relpath(path, root)}:{line} imports {module}")
    return found


def layer_of(module: str, layers=LAYERS) -> Optional[Tuple[int, int]]:
    """(layer index, part index) of a module: the longest listed name that is the module or a
    package holding it; None for a module no layer lists."""
    best, best_len = None, -1
    for i, layer in enumerate(layers):
        for j, part in enumerate(layer):
            for entry in part:
                full = f"{PACKAGE}.{entry}" if entry else PACKAGE
                matches = module == full or (entry and module.startswith(full + "."))
                if matches and len(full) > best_len:
                    best, best_len = (i, j), len(full)
    return best


def layering_violations(graph, layers=LAYERS, root: str = PACKAGE_ROOT) -> List[str]:
    found = []
    for module, edges in sorted(graph.items()):
        mine = layer_of(module, layers)
        for target, line, path in edges:
            theirs = layer_of(target, layers)
            if mine is None or theirs is None:
                continue  # reported by test_every_module_has_a_layer
            where = f"{os.path.relpath(path, root)}:{line}: {module} imports {target}"
            if theirs[0] > mine[0]:
                found.append(f"{where} (a higher layer: {theirs[0]} > {mine[0]})")
            elif theirs[0] == mine[0] and theirs[1] != mine[1]:
                found.append(f"{where} (a peer part of layer {mine[0]})")
    return found


def strongly_connected_components(graph) -> List[List[str]]:
    """Tarjan's algorithm, iterative; every component, singletons included."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted({t for t, _, _ in graph[start]})))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted({t for t, _, _ in graph.get(child, ())}))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def import_cycles(graph, root: str = PACKAGE_ROOT) -> Dict[frozenset, List[str]]:
    """{modules of a cycle: the import lines between them} for every component of more than one module."""
    cycles = {}
    for component in strongly_connected_components(graph):
        if len(component) > 1:
            members = set(component)
            cycles[frozenset(component)] = [
                f"{os.path.relpath(path, root)}:{line}: {module} imports {target}"
                for module in component for target, line, path in graph[module] if target in members]
    return cycles


def test_every_module_has_a_layer():
    modules = package_modules()
    assert len(modules) > 50
    assert [m for m in sorted(modules) if layer_of(m) is None] == []
    listed = [f"{PACKAGE}.{entry}" if entry else PACKAGE for layer in LAYERS for part in layer for entry in part]
    assert [m for m in listed if not any(x == m or x.startswith(m + ".") for x in modules)] == [], \
        "a layer lists a module that does not exist"


def test_no_module_imports_a_higher_layer_or_a_peer():
    found = layering_violations(import_graph())
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n\n".join(
        "cycle " + " <-> ".join(sorted(k)) + ":\n  " + "\n  ".join(lines) for k, lines in cycles.items())


def test_data_and_evaluation_do_not_import_modeling():
    paths = [p for m, p in package_modules().items() if m.startswith(("regionspot.data", "regionspot.evaluation"))]
    assert len(paths) > 5
    assert violations(paths, ["regionspot.modeling"]) == []


def test_shared_modules_import_no_component():
    paths = [os.path.join(PACKAGE_DIR, f"{m}.py") for m in SHARED_MODULES]
    assert all(os.path.isfile(p) for p in paths)
    assert violations(paths, ["regionspot.modeling", "regionspot.data", "regionspot.evaluation", "regionspot.engine",
                              "regionspot.predictor", "regionspot.config", "regionspot.tools"]) == []


def _tree(tmp_path, files: Dict[str, str]) -> str:
    """A package ``regionspot`` under ``tmp_path`` with the given {relative path: source}."""
    for rel, source in files.items():
        path = tmp_path / "regionspot" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source + "\n")
    return str(tmp_path)


@pytest.mark.parametrize("source, expected", [
    ("from ...modeling.weights import load_sam", "regionspot.modeling.weights"),
    ("from ... import modeling", "regionspot.modeling"),
    ("import regionspot.modeling", "regionspot.modeling"),
    ("def f():\n    import regionspot.modeling.meta_arch", "regionspot.modeling.meta_arch"),
    ("def f():\n    from ...modeling import proposals", "regionspot.modeling.proposals"),
    ("def f():\n    from ...modeling import build_model", "regionspot.modeling"),
    ("class C:\n    def f(self):\n        from ..evaluation import protocol", "regionspot.data.evaluation"),
    ("def f():\n    importlib.import_module('regionspot.modeling.meta_arch')", "regionspot.modeling.meta_arch"),
])
def test_the_check_sees_relative_absolute_and_function_level_imports(tmp_path, source, expected):
    """What the checks rely on, for a module ``regionspot/data/x/m.py``."""
    root = _tree(tmp_path, {"__init__.py": "", "modeling/__init__.py": "", "modeling/weights.py": "",
                            "modeling/meta_arch.py": "", "modeling/proposals/__init__.py": "",
                            "data/x/m.py": source})
    module = os.path.join(root, "regionspot", "data", "x", "m.py")
    assert expected in [name for _, name in imported_modules(module, root)]
    assert violations([module], [expected], root=root) != []
    assert violations([module], ["regionspot.engine"], root=root) == []


def test_the_checks_see_a_function_level_cycle_and_an_upward_import(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "io.py": "",
        "data/__init__.py": "",
        "data/a.py": "from ..io import x\n\ndef f():\n    from ..modeling import b",
        "modeling/__init__.py": "",
        "modeling/b.py": "from regionspot.data import a",
    })
    layers = ((("io",),), (("data",),), (("modeling",),), (("",),))
    graph = import_graph(root)
    assert layering_violations(graph, layers, root) == [
        os.path.join("regionspot", "data", "a.py") + ":4: regionspot.data.a imports regionspot.modeling.b "
        "(a higher layer: 2 > 1)"]
    cycles = import_cycles(graph, root)
    assert list(cycles) == [frozenset({"regionspot.data.a", "regionspot.modeling.b"})]
    assert len(cycles[frozenset({"regionspot.data.a", "regionspot.modeling.b"})]) == 2
