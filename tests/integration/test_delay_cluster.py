"""Delayed delivery on a 3-node Ray cluster that loses a node mid-stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


@pytest.mark.timeout(600)
def test_node_loss_mid_stream_loses_nothing(kafka_bootstrap: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(HERE / "cluster_scenario.py"), kafka_bootstrap],
                         capture_output=True, text=True, timeout=540, env=env, cwd=HERE)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["nodes"] >= 2, "the bucket actors were spread over the nodes"
    # their placement group takes no CPU: each 1-CPU node still runs a 1-CPU task
    assert result["cpu_free"] == pytest.approx(3.0)
    assert len(result["tasks_ran"]) == 3 and len(set(result["tasks_ran"])) == 3
    assert result["removed"] is not None, "a node running a DelayBucketActor was removed"
    assert result["moved_to"] not in (None, result["removed"])
    assert result["sent"] == result["received"] == result["unique"] == 320
    assert result["early"] == 0
