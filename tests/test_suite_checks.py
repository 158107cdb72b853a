"""The suite's own rule (tests/conftest.py): under CI a skip fails the run."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")


@pytest.mark.parametrize("ci,want", [("true", 1), ("", 0)])
def test_a_skip_fails_the_run_under_ci(tmp_path, ci, want):
  shutil.copy(CONFTEST, tmp_path / "conftest.py")
  (tmp_path / "test_one.py").write_text(
    "import pytest\n\ndef test_skips():\n  pytest.skip('missing')\n\n"
    "def test_passes():\n  pass\n"
  )
  env = dict(os.environ, CI=ci)
  out = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "."],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == want, out.stdout[-2000:]
  if want:
    assert "test_one.py::test_skips" in out.stdout
