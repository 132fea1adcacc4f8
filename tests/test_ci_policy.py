"""What CI may skip (tests/conftest.py): under ``CI=true`` a skipped test fails with one line
naming why it would have skipped (a missing tool such as Chromium or Playwright), except a CUDA
test (marker ``cuda``) on a machine where torch sees no CUDA device. Run in a pytest subprocess on
small test files, with the project's conftest as a plugin."""

import os
import subprocess
import sys
import textwrap

from conftest import REPO

TESTS = os.path.join(REPO, "tests")
PROBE = textwrap.dedent('''
    import pytest

    def test_tool():
        pytest.skip("no Chromium at /nowhere/chromium")

    @pytest.mark.cuda
    @pytest.mark.skipif(True, reason="needs a CUDA device")
    def test_on_the_gpu():
        pass

    def test_runs():
        assert 1 + 1 == 2
''')


def _pytest(tmp_path, ci: bool):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    env["CUDA_VISIBLE_DEVICES"] = ""  # a machine without CUDA, even on a GPU machine
    env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-rfEs", "-p", "no:cacheprovider",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning",
                           "-c", os.devnull, "--rootdir", str(tmp_path), "test_probe.py"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)


def test_in_ci_a_missing_tool_fails_with_one_line_and_only_cuda_skips(tmp_path):
    proc = _pytest(tmp_path, ci=True)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "1 failed, 1 passed, 1 skipped in" in out, out
    assert "CI=true: this test may not skip in CI: no Chromium at /nowhere/chromium" in out, out
    assert "FAILED test_probe.py::test_tool - CI=true: this test may not skip in CI: no Chromium" in out, out
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and skipped[0].endswith("needs a CUDA device"), out


def test_outside_ci_a_missing_tool_is_a_listed_skip(tmp_path):
    proc = _pytest(tmp_path, ci=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "1 passed, 2 skipped in" in out, out
    skipped = sorted(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("SKIPPED"))
    assert skipped == ["needs a CUDA device", "no Chromium at /nowhere/chromium"], out
