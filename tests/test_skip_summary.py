"""``make test`` says what it skipped and how to get it: tests/conftest.py prints one line per reason.

A real pytest run in a child process over a small test file, with tests/conftest.py loaded as a plugin
(``-p tests.conftest``), as ``make test`` loads it.
"""
from __future__ import annotations

import os
import subprocess
import sys

from .helpers import ROOT

SAMPLE = '''
import pytest

@pytest.mark.skipif(True, reason="headless Chromium needs Debian's chromium (.ci/run installs it)")
def test_in_a_browser():
    pass

@pytest.mark.skipif(True, reason="headless Chromium needs Debian's chromium (.ci/run installs it)")
def test_in_a_browser_again():
    pass

def test_promtool():
    pytest.skip("promtool is not installed (Debian package prometheus)")

def test_runs():
    pass
'''


def test_a_quiet_run_ends_with_what_was_skipped_and_why(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = [index for index, line in enumerate(lines) if "skipped tests: what they need" in line]
    assert len(header) == 1, result.stdout
    summary = lines[header[0] + 1:header[0] + 3]
    assert summary == ["  2 x headless Chromium needs Debian's chromium (.ci/run installs it)",
                       "  1 x promtool is not installed (Debian package prometheus)"], result.stdout
    assert "docs/dependencies.md" in "\n".join(lines[header[0]:])


def test_a_run_without_skips_prints_no_summary(tmp_path):
    (tmp_path / "test_sample.py").write_text("def test_runs():\n    pass\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert result.returncode == 0 and "skipped tests" not in result.stdout, result.stdout
