"""In CI a missing dependency fails the suite instead of skipping modules (issue 17): tests/support/ci_skips.py,
checked on a throwaway test file run by pytest in a subprocess, with and without CI set."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

def test_runs():
    assert True

def test_allowed():
    pytest.skip("CUDA is available here")

def test_needs_chromium():
    pytest.skip("no Chromium at /usr/bin/chromium")
'''
MODULE_SKIP = '''
import pytest
pytest.importorskip("likeness_no_such_module_xyz")

def test_never():
    pass
'''


def _run(tmp_path, ci, *files):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "support.ci_skips",
                        "--rootdir", str(tmp_path), "-c", os.devnull, "-rA"] + [str(tmp_path / f) for f in files],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_skips_stay_skips_locally(tmp_path):
    rc, out = _run(tmp_path, None, "test_sample.py", "test_module_skip.py")
    assert rc == 0, out
    assert "1 passed, 3 skipped" in out, out


def test_missing_dependencies_fail_in_ci(tmp_path):
    rc, out = _run(tmp_path, "true", "test_sample.py", "test_module_skip.py")
    assert rc != 0, out  # a module skipped for a missing import stops the run at collection
    assert "likeness_no_such_module_xyz" in out and "CI is set" in out and "1 error" in out, out
    rc, out = _run(tmp_path, "true", "test_sample.py")
    assert rc != 0, out
    assert "1 failed, 1 passed, 1 skipped" in out and "no Chromium" in out, out  # CUDA-present stays a skip


def test_ci_false_means_local(tmp_path):
    rc, out = _run(tmp_path, "false", "test_sample.py", "test_module_skip.py")
    assert rc == 0, out
