"""MPS on the GPU host with the real control daemon (PyTorch runtime: no TensorFlow there).

8 replicas of the demo model share the GPU and all 8 are in the daemon's client list; the
daemon is SIGKILLed under load and serving recovers with no person involved; doctor passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests import mps_scenario
from tests.mps import mps_service_config

REPLICAS = 8


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None, reason="no MPS binary")
def test_eight_replicas_attach_and_recover_from_a_killed_daemon(
    torch_store: Path, tmp_path: Path
) -> None:
    config = mps_service_config(
        tmp_path,
        torch_store,
        "torch",
        replicas=REPLICAS,
        port=28400,
        control_binary="nvidia-cuda-mps-control",
    )
    seen = mps_scenario.run(tmp_path, config, replicas=REPLICAS, env={})
    print("MPS_SCENARIO", json.dumps(seen.to_dict()))
    # The real daemon lists exactly the processes that made a CUDA context: the replicas.
    assert [sorted(c) for c in seen.clients_before.values()] == [seen.replicas_before]
    assert len(seen.replicas_before) == REPLICAS
    assert seen.daemon_after not in (None, seen.daemon_before)
    assert [sorted(c) for c in seen.clients_after.values()] == [seen.replicas_after]
    assert not set(seen.replicas_after) & set(seen.replicas_before)
    assert seen.requests > 0 and seen.failed_after_recovery == 0
    assert seen.doctor_rc == 0, seen.doctor_verdict
    assert seen.exit_code == 0, seen.output_tail
