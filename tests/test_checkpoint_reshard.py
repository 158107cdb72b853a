"""Orbax checkpoints of every optimizer state survive a change of mesh.

The cases live in `tests/reshard_checkpoint_cases.py` and run in a
subprocess with 8 forced CPU devices (see `tests/multidevice.py`).
"""

import pytest

from tests.multidevice import run_cases_on_8_cpu_devices


@pytest.mark.multidevice
def test_save_on_4x2_mesh_restore_on_8x1_mesh():
  run_cases_on_8_cpu_devices("reshard_checkpoint_cases.py")
