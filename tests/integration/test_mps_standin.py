"""MPS end to end on a CPU machine: Ray with a logical GPU, the stand-in control daemon."""

from __future__ import annotations

from pathlib import Path

from tests import mps_scenario
from tests.mps import STANDIN, mps_service_config


def test_replicas_attach_and_recover_from_a_killed_daemon(tf_store: Path, tmp_path: Path) -> None:
    config = mps_service_config(
        tmp_path,
        tf_store,
        "tensorflow",
        replicas=2,
        port=28300,
        control_binary=str(STANDIN),
        num_gpus=1,
        num_cpus=4,
    )
    seen = mps_scenario.run(tmp_path, config, replicas=2, env={"MPSSERVE_STANDIN_CLIENT": "1"})
    print(seen.to_dict())
    # The stand-in counts every process carrying the replicas' environment as a client (Ray's
    # idle workers for that runtime env too), so check the replicas, not the count.
    ((server, clients),) = seen.clients_before.items()
    assert len(seen.replicas_before) == 2 and set(seen.replicas_before) <= set(clients)
    assert seen.daemon_after not in (None, seen.daemon_before)
    ((new_server, new_clients),) = seen.clients_after.items()
    assert new_server != server and set(seen.replicas_after) <= set(new_clients)
    assert not set(seen.replicas_after) & set(seen.replicas_before)  # replaced, not reused
    assert seen.requests > 0 and seen.failed_after_recovery == 0
    # mpsserve status, run as an operator would against the serving cluster, after recovery
    assert seen.status_rc == 0 and seen.status_verdict.startswith("OK"), seen.status_verdict
    assert seen.status_attached == 2
    assert seen.exit_code == 0, seen.output_tail
    assert "stopped the MPS control daemon" in seen.output_tail
