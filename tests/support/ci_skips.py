"""No silent skips in CI: when the environment variable CI is set (true/1/yes; GitHub Actions and most CI services set
it), a test or a whole test module that skips (pytest.importorskip of a missing dependency such as diffusers,
insightface, timm, onnx, cv2; a missing Chromium) fails the run instead, naming what was missing. Locally skips stay
skips. Skips that do not mean a missing dependency are listed in ALLOWED.

Loaded by tests/conftest.py (the hooks are imported there) and usable as a plugin: -p support.ci_skips.
"""

import os

import pytest

# reasons that are not a missing dependency (matched at the start of the skip reason)
ALLOWED = ("CUDA is available here", "not in this ComfyUI version:")


def in_ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _reason(longrepr):
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _allowed(reason):
    text = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    return text.startswith(ALLOWED)


def _fail(report, what):
    reason = _reason(report.longrepr)
    if _allowed(reason):
        return
    report.outcome = "failed"
    report.longrepr = (f"{what} was skipped, and CI is set: a skip in CI is a failure ({reason}). Install what it needs "
                       "(pip install -r requirements.txt -r tests/requirements.txt; make setup-browser for Chromium) "
                       "or unset CI to run locally with skips.")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        _fail(report, f"Test module {collector.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report, f"Test {item.nodeid}")
