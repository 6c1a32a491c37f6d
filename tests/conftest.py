"""Suite-wide rule: in CI a test never skips for a missing tool.

Tests skip with a reason containing "not installed" when a Debian tool is absent on a developer's
machine; `make test` installs every one of them, so in CI (env CI set) such a skip would only
hide a broken install step. It is turned into a failure here, in one place for every suite.
"""

import os

import pytest

MISSING_TOOL = "not installed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if MISSING_TOOL in reason:
            report.outcome = "failed"
            report.longrepr = f"in CI a missing tool is a failure, not a skip: {reason}"
