"""Suite-wide checks: under CI, a skipped test fails the run.

Every package the tests import is installed by the test command (the
`test` extra), so a skip means a missing feature or a missing dependency,
which must be seen. Outside CI (`CI` unset) skips are only reported.
"""

import os

import pytest

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
  if report.skipped and not hasattr(report, "wasxfail"):
    _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
  if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
    return
  if _skipped and exitstatus == 0:
    session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
  if _skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    terminalreporter.write_line(
      f"CI: {len(_skipped)} skipped test(s) fail the run (every dependency "
      "of the suite is installed by the test extra): " + ", ".join(_skipped),
      red=True,
    )
