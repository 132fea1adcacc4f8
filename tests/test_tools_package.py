"""The tools as the package ``regionspot.tools``: no file edits ``sys.path``, every console script
of setup.py names a tool module whose ``main(["--help"])`` exits 0, the wrappers in tools/ only
call the package, and the end-to-end benchmark's stage figures come from profiler labels."""

import ast
import importlib
import io
import os
import re
import runpy
import subprocess
import sys
import time
from contextlib import redirect_stdout

import pytest
import torch

from conftest import REPO

SYS_PATH_EDIT = re.compile(r"sys\.path\.(insert|append)\s*\(")


def _project_python_files():
    """The repository's tracked .py files outside tests/ (git's list: no venvs or outputs)."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    return [f for f in files.stdout.split() if not f.startswith("tests/")]


def test_no_project_file_edits_sys_path():
    files = _project_python_files()
    assert "train_net.py" in files and any(f.startswith("tools/") for f in files)
    offenders = []
    for path in files:
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            if SYS_PATH_EDIT.search(f.read()):
                offenders.append(path)
    assert offenders == []


def _setup_kwargs(monkeypatch):
    """The keyword arguments setup.py passes to setuptools.setup, read without torch."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setitem(sys.modules, "torch", None)  # setup.py must not need torch
    monkeypatch.chdir(REPO)
    runpy.run_path(os.path.join(REPO, "setup.py"), run_name="__main__")
    return captured


def test_console_scripts_name_tool_modules_whose_help_exits_0(monkeypatch):
    scripts = _setup_kwargs(monkeypatch)["entry_points"]["console_scripts"]
    monkeypatch.undo()  # torch back for the tools
    names = {}
    for entry in scripts:
        name, target = (part.strip() for part in entry.split("="))
        module_name, function = target.split(":")
        assert module_name.startswith("regionspot.tools.") and function == "main", entry
        names[name] = module_name
    for wanted in ("regionspot-benchmark", "regionspot-proposals", "regionspot-summarize",
                   "regionspot-dump-text-embeddings", "regionspot-extract-sam-tokens",
                   "regionspot-convert-openimages", "regionspot-run-sample", "regionspot-train", "regionspot-demo",
                   "regionspot-app"):
        assert wanted in names
    for name, module_name in names.items():
        main = importlib.import_module(module_name).main
        assert callable(main)
        out = io.StringIO()
        with redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0, name
        assert "usage:" in out.getvalue(), name


# The tool modules whose checkout wrapper is not tools/<name>.py (regionspot-train, -demo, -app).
WRAPPED_ELSEWHERE = {"train_net": "train_net.py", "demo": os.path.join("demo", "demo.py"),
                     "app": os.path.join("demo", "app.py")}


def test_wrappers_only_call_the_package():
    """tools/<name>.py (demo/demo.py, demo/app.py): a docstring, ``from regionspot.tools.<name>
    import main`` and the ``__main__`` call; one wrapper per tool module. train_net.py re-exports
    the names Detectron2-style scripts use and runs the package's ``run``."""
    package = os.path.join(REPO, "projects", "RegionSpot", "regionspot", "tools")
    modules = sorted(f[:-3] for f in os.listdir(package) if f.endswith(".py") and f not in ("__init__.py", "common.py"))
    wrappers = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "tools")) if f.endswith(".py"))
    assert wrappers == sorted(set(modules) - set(WRAPPED_ELSEWHERE))
    for name in set(modules) - set(wrappers):
        path = os.path.join(REPO, WRAPPED_ELSEWHERE[name])
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        assert ast.get_docstring(tree), path
        defined = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        imports = [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
        assert defined == [] and set(imports) == {f"regionspot.tools.{name}"}, path
    for name in wrappers:
        with open(os.path.join(REPO, "tools", f"{name}.py"), encoding="utf-8") as f:
            text = f.read()
        tree = ast.parse(text)
        assert ast.get_docstring(tree), name
        # the lines after the module docstring (which may span several lines)
        code = [line for line in text.splitlines()[tree.body[0].end_lineno:] if line.strip()]
        assert code == ["import sys", f"from regionspot.tools.{name} import main", 'if __name__ == "__main__":',
                        "    sys.exit(main())"], name


def test_one_error_type_and_one_synchronize():
    """What the tools share is defined once, in regionspot.tools.common."""
    from regionspot.cli import USER_ERRORS
    from regionspot.tools import common, dump_text_embeddings, extract_sam_tokens

    assert dump_text_embeddings.ToolError is extract_sam_tokens.ToolError is common.ToolError
    assert issubclass(common.ToolError, USER_ERRORS)
    package = os.path.dirname(common.__file__)
    for path in sorted(os.listdir(package)):
        if path.endswith(".py") and path != "common.py":
            with open(os.path.join(package, path), encoding="utf-8") as f:
                text = f.read()
            for definition in ("class ToolError", "def synchronize", "def usable_device", "def load_cfg"):
                assert definition not in text, (path, definition)


def test_device_and_config_errors_are_tool_errors(tmp_path):
    from regionspot.tools.common import ToolError, load_config, resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cpu", "cuda")
    with pytest.raises(ToolError, match="--device gpu0"):
        resolve_device("gpu0")
    with pytest.raises(ToolError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


class _Staged(torch.nn.Module):
    """A stand-in model that spends known times under two of the stage labels."""

    def forward(self, batch):
        from torch.profiler import record_function

        from regionspot.modeling.profiling import STAGE_LABELS

        with record_function(STAGE_LABELS["sam_image_encoder"]):
            time.sleep(0.03)
        with record_function(STAGE_LABELS["head"]):
            time.sleep(0.01)
        with record_function("not.a.stage"):
            time.sleep(0.02)
        return batch


def test_profile_stages_sums_the_model_labels():
    from regionspot.modeling.profiling import STAGE_LABELS
    from regionspot.tools.benchmarks.e2e_probes import profile_stages

    stages = profile_stages(_Staged(), [[1], [2]], torch.device("cpu"))
    wall = stages.pop("profiled_pass_s")
    assert set(stages) == set(STAGE_LABELS)
    assert 0.055 <= stages["sam_image_encoder"] <= wall and 0.015 <= stages["head"] <= 0.05
    assert stages["clip_semantic"] == stages["proposals"] == stages["postprocess"] == 0.0
    assert wall >= 0.12
