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


def test_a_gpu_fault_in_one_client_replaces_every_replica_of_the_server(
    tf_store: Path, tmp_path: Path
) -> None:
    """One replica's request faults the GPU (simulated on CPU): that replica reports it and
    exits, its peer on the same server reads the report and exits too, Ray Serve starts two
    new ones that attach to the same server, and status shows the fault followed to the end."""
    config = mps_service_config(
        tmp_path,
        tf_store,
        "tensorflow",
        replicas=2,
        port=28310,
        control_binary=str(STANDIN),
        num_gpus=1,
        num_cpus=4,
    )
    env = {"MPSSERVE_STANDIN_CLIENT": "1", "MPSSERVE_INJECT_FAULT_FILE": str(tmp_path / "inject")}
    seen = mps_scenario.run(tmp_path, config, 2, env, strike=mps_scenario.client_fault)
    print(seen.to_dict())
    assert not set(seen.replicas_after) & set(seen.replicas_before)  # both replaced
    assert seen.daemon_after == seen.daemon_before  # a client's fault leaves the daemon
    assert seen.clients_after.keys() == seen.clients_before.keys()  # ... and its server
    assert seen.requests > 0 and seen.failed_after_recovery == 0
    ((_node, state),) = seen.status_mps_nodes.items()
    assert state["gpu_faults"] == 1, state
    (fault,) = state["faults"]
    assert fault["clients_hit"] == 2 and fault["remaining"] == []
    assert fault["cleared_after_s"] is not None and "illegal memory access" in fault["message"]
    assert seen.status_rc == 0 and seen.status_verdict.startswith("OK"), seen.status_verdict
    assert seen.exit_code == 0, seen.output_tail
