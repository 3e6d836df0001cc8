"""A node of a 2-node cluster removed during training: the run finishes from its last checkpoint, and every
step's cells are accounted for (tests/faults/node_loss_drill.py does the work in a process of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_training_survives_the_loss_of_a_node(tiny_store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/faults/node_loss_drill.py"), str(tiny_store), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"final_step": 16, "plan_ok": {"0": True, "1": True}, "removed": True}
