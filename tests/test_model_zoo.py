"""The bundled configs (regionspot.model_zoo) and the rule that lets the package work wherever it
is installed: no module finds files by walking up from its own ``__file__`` to a checkout."""

import ast
import os

import pytest

from conftest import REPO

PACKAGE_DIR = os.path.join(REPO, "projects", "RegionSpot", "regionspot")


def _file_expr(node) -> bool:
    """``__file__`` itself, or wrapped in abspath/realpath/Path/resolve (one folder: its own)."""
    if isinstance(node, ast.Name) and node.id == "__file__":
        return True
    if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in ("abspath", "realpath", "Path", "resolve", "absolute", "normpath") and node.args:
            return _file_expr(node.args[0])
        if name in ("resolve", "absolute") and isinstance(node.func, ast.Attribute):
            return _file_expr(node.func.value)
    return False


def _dirname_depth(node) -> int:
    """How many folders ``dirname(...)`` / ``.parent`` steps up from ``__file__`` (0: not from it)."""
    if _file_expr(node):
        return 0.5  # the file itself
    if isinstance(node, ast.Call) and node.args:
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name == "dirname":
            inner = _dirname_depth(node.args[0])
            return inner + 1 if inner else 0
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        inner = _dirname_depth(node.value)
        return inner + 1 if inner else 0
    return 0


def walks_up_from_file(source: str):
    """Lines of ``source`` that reach above the module's own folder from ``__file__``:
    ``dirname(dirname(__file__))`` and longer chains, ``Path(__file__).parent.parent``,
    ``Path(__file__).parents[k]`` and ``".."`` joined to a path made from ``__file__``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        depth = _dirname_depth(node)
        if depth and depth > 1.5:
            found.append(node.lineno)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "parents" and _dirname_depth(node.value.value) == 0.5:
            found.append(node.lineno)
        elif isinstance(node, ast.Call) and any(_dirname_depth(a) for a in node.args) \
                and any(isinstance(a, ast.Constant) and a.value in ("..", "../") for a in node.args):
            found.append(node.lineno)
    return sorted(set(found))


@pytest.mark.parametrize("source, bad", [
    ("import os\nR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))", [2]),
    ("from os.path import dirname\nR = dirname(dirname(dirname(__file__)))", [2]),
    ("from pathlib import Path\nR = Path(__file__).resolve().parents[2]", [2]),
    ("from pathlib import Path\nR = Path(__file__).parent.parent", [2]),
    ("import os\nR = os.path.join(os.path.dirname(__file__), '..', 'configs')", [2]),
    ("import os\nHERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data.json')", []),
    ("from pathlib import Path\nHERE = Path(__file__).parent / 'x.yaml'", []),
])
def test_the_check_finds_walks_up(source, bad):
    assert walks_up_from_file(source) == bad


def test_no_module_walks_up_from_its_file():
    offenders = []
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    lines = walks_up_from_file(f.read())
                offenders += [f"{os.path.relpath(path, REPO)}:{line}" for line in lines]
    assert offenders == []


def test_every_config_of_the_repository_is_bundled_under_its_name():
    from regionspot import model_zoo

    configs = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".yaml"))
    assert model_zoo.list_config_files() == configs
    for name in ("regionspot_bl.yaml", "regionspot_bl", "configs/regionspot_bl.yaml"):
        path = model_zoo.get_config_file(name)
        assert os.path.isabs(path) and os.path.basename(path) == "regionspot_bl.yaml"
        assert os.path.dirname(path) == model_zoo.CONFIG_DIR
    with pytest.raises(FileNotFoundError, match="'regionspot_xl' is not one of the bundled configs: .*regionspot_bl"):
        model_zoo.get_config_file("regionspot_xl")


def test_a_bundled_name_loads_with_its_base_chain_and_a_path_wins(tmp_path, monkeypatch):
    from regionspot.config import ConfigError, load_config
    from regionspot.model_zoo import resolve_config_file
    from regionspot.tools.common import ToolError
    from regionspot.tools.common import load_config as tool_load_config

    monkeypatch.chdir(tmp_path)  # outside the checkout
    cfg = load_config("regionspot_bl_stage2.yaml")  # stage2 -> regionspot_bl -> Base-RegionSpot
    assert cfg.MODEL.META_ARCHITECTURE == "RegionSpot"
    assert cfg.MODEL.REGIONSPOT.CLIP_WEIGHTS.endswith("ViT-L-14.pt")
    # a file of the same name in the current folder is a path, and a path comes first
    (tmp_path / "regionspot_bl.yaml").write_text('_BASE_: "x.yaml"\n')
    assert resolve_config_file("regionspot_bl.yaml") == "regionspot_bl.yaml"
    with pytest.raises(FileNotFoundError, match="config file not found: 'nope.yaml' is neither a file nor"):
        resolve_config_file("nope.yaml")
    with pytest.raises(ToolError, match="config file not found: 'nope.yaml'"):
        tool_load_config("nope.yaml")
    assert issubclass(ToolError, ValueError) and ConfigError


def test_tool_defaults_are_under_the_current_folder():
    from regionspot.tools import common
    from regionspot.tools.app import build_parser
    from regionspot.tools.run_sample import main  # noqa: F401  (imports without a checkout path)

    assert common.output_path("benchmark", "x.json") == os.path.join("output", "benchmark", "x.json")
    assert build_parser().parse_args([]).sample_dir == os.path.join("output", "app_sample")
