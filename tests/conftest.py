"""Suite-wide rules: the order tests run in, and skips under CI.

* Order: xdist hands tests to its workers in collection order, so a long
  test that starts last decides the wall time. Multi-device subprocesses
  run first, then tests marked `slow`, then the rest (stable within each).
  `HTMUON_CASES_PART=i/n` keeps every n-th collected test from the i-th on
  (how `tests/multidevice.py` splits a file of cases over subprocesses).
* Skips: every package the tests import is installed by the test command
  (the `test` extra), so a skip means a missing feature or a missing
  dependency, which must be seen. Under CI a skipped test fails the run;
  outside CI (`CI` unset) skips are only reported.
"""

import os

import pytest

_skipped: list[str] = []


def pytest_collection_modifyitems(
  config: pytest.Config, items: list[pytest.Item]
) -> None:
  part = os.environ.get("HTMUON_CASES_PART")
  if part:
    i, n = (int(x) for x in part.split("/"))
    dropped = [it for k, it in enumerate(items) if k % n != i]
    items[:] = [it for k, it in enumerate(items) if k % n == i]
    config.hook.pytest_deselected(items=dropped)

  def rank(item: pytest.Item) -> int:
    if item.get_closest_marker("multidevice"):
      return 0
    return 1 if item.get_closest_marker("slow") else 2

  items.sort(key=rank)


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
