"""A GPU fault under MPS as a node-wide event (mpsserve/node/faults.py): the records, the
replicas' watch, the guardian following the hit clients until they are gone, and the injected
faults' service side (simulated on a CPU replica), against the stand-in daemon."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mpsserve.config import ModelConfig
from mpsserve.errors import InferenceError, ReplicaUnavailable
from mpsserve.model.servable import Servable
from mpsserve.node import faults
from mpsserve.node.guardian import Guardian, ReplicaMps
from mpsserve.ops.status import _fault, _fault_line
from mpsserve.settings import settings
from tests.mps import daemon, replica_mps, standin_client, standin_control
from tests.unit.test_mps import clean_settings, wait_for

__all__ = ["clean_settings"]  # a fixture these tests use


def fault(server: int = 7, gpu: str = "0", reporter: int = 11, at: float = 0.0) -> faults.GpuFault:
    return faults.GpuFault(server, gpu, reporter, at or time.time(), "CUDA error: boom")


def test_records_are_read_back_newest_after_since_and_pruned(tmp_path: Path) -> None:
    old, new = fault(at=time.time() - faults.KEEP_S - 5), fault(reporter=12)
    for f in (old, new):
        faults.report(tmp_path, f)
    (tmp_path / faults.FAULTS_DIR / ".half.partial").write_text("{")
    assert faults.recorded(tmp_path) == [old, new]
    assert faults.recorded(tmp_path, since=new.at - 1) == [new]
    faults.prune(tmp_path)
    assert faults.recorded(tmp_path) == [new]


def test_a_fault_hits_other_clients_of_its_server_and_gpu_that_started_before_it(
    tmp_path: Path,
) -> None:
    started = time.time() - 1
    faults.report(tmp_path, fault(server=7, gpu="0", reporter=11))
    assert faults.hitting(tmp_path, 7, "0", started, me=12) is not None
    assert faults.hitting(tmp_path, 7, "0", started, me=11) is None  # its own report
    assert faults.hitting(tmp_path, 7, "1", started, me=12) is None  # another GPU
    assert faults.hitting(tmp_path, 8, "0", started, me=12) is None  # another server
    assert faults.hitting(tmp_path, 7, "0", time.time() + 1, me=12) is None  # started after


def test_a_process_started_after_the_fault_was_not_hit(tmp_path: Path) -> None:
    import os

    assert faults.started_after(os.getpid(), time.time() - 3600)
    assert not faults.started_after(os.getpid(), time.time())
    assert not faults.started_after(999_999_999, 0.0)  # unknown: not excluded
    faults.note_client(tmp_path, os.getpid(), "0")
    follow = faults.Follow.start(tmp_path, fault(at=time.time() - 3600), [os.getpid()])
    assert follow.clients == [] and follow.others == []


def test_follow_counts_only_the_faulted_gpus_clients_and_clears_when_they_left(
    tmp_path: Path,
) -> None:
    faults.note_client(tmp_path, 21, "0")
    faults.note_client(tmp_path, 22, "1")  # same server, other GPU: not hit
    follow = faults.Follow.start(tmp_path, fault(gpu="0"), [21, 22, 23])  # 23: noted nothing
    assert follow.clients == [21] and follow.others == [23]
    assert not follow.update([21, 22, 23], now=time.time())
    assert follow.remaining == [21]
    assert follow.update([22], now=time.time()) and follow.cleared_at is not None
    assert not follow.update([], now=time.time())  # said once


def test_guardian_follows_a_fault_until_every_hit_client_exited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mpsserve")
    control = standin_control(tmp_path)
    state_dir = tmp_path / "state"
    guardian = Guardian(control, state_dir, 0.2)
    with daemon(control), standin_client(control) as client:
        assert wait_for(lambda: control.clients() != {})
        ((server, clients),) = control.clients().items()
        assert client.pid in clients
        faults.note_client(state_dir, client.pid, "0")
        guardian.check()  # sees the server and its client before the fault
        faults.report(state_dir, fault(server=server, reporter=client.pid))
        faults.report(state_dir, fault(server=server, reporter=4242))  # another client saw it
        state = guardian.check()
        assert state.gpu_faults == 1 and state.faults[0]["remaining"] == [client.pid]
        assert len(state.faults[0]["reports"]) == 2, "one fault, told twice"
        assert "takes no new client until its 1 client(s)" in caplog.text
        client.kill()
        client.wait()
        assert wait_for(lambda: guardian.check().faults[0]["cleared_at"] is not None)
        state = guardian.check()
        assert state.gpu_faults == 1, "a fault is counted once"
        assert "exited" in caplog.text and "takes new clients again" in caplog.text
        shown = _fault(state.faults[0])
        assert shown["clients_hit"] == 1 and shown["cleared_after_s"] is not None
        assert "all 1 client(s) hit exited" in _fault_line(shown)


def test_a_replica_watching_its_server_is_told_once_of_a_peers_fault(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    control = standin_control(tmp_path)
    s = replica_mps(control, tmp_path, "on", guardian_interval_s=0.2)
    with daemon(control), standin_client(control) as client:
        assert wait_for(lambda: control.server_list() != [])
        replica = ReplicaMps(s, pid=client.pid, gpu="0")
        replica.verify()
        assert replica.server is not None
        assert faults.client_gpu(tmp_path / "state", client.pid) == "0"
        told: list[faults.GpuFault] = []
        replica.watch_faults(told.append)
        replica.start_guardian()
        try:
            time.sleep(0.7)
            assert told == []
            faults.report(tmp_path / "state", fault(server=replica.server, reporter=1))
            assert wait_for(lambda: len(told) == 1, timeout_s=5)
            time.sleep(0.7)
            assert len(told) == 1 and told[0].reporter == 1
        finally:
            assert replica.guardian is not None
            replica.guardian.stop()
            replica.guardian.join(5)


def test_a_replica_reports_its_own_fault_only_when_attached(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    control = standin_control(tmp_path)
    s = replica_mps(control, tmp_path, "auto")
    replica = ReplicaMps(s, pid=12345, gpu="0")
    replica.report_fault("CUDA error: boom")  # never attached: nothing to tell the node
    assert faults.recorded(tmp_path / "state") == []
    replica.server = 99
    replica.report_fault("CUDA error: boom")
    (recorded,) = faults.recorded(tmp_path / "state")
    assert (recorded.server, recorded.gpu, recorded.reporter) == (99, "0", 12345)
    peer = ReplicaMps(s, pid=12346, gpu="0")
    peer.server, peer.started_at = 99, replica.started_at
    peer.report_fault("CUDA error: boom")  # the same fault reaching it: the node knows already
    assert len(faults.recorded(tmp_path / "state")) == 1


# -- the injected faults, service side (a CPU replica: simulated CUDA errors) -------------------


@pytest.fixture(scope="module")
def torch_servable(torch_store: Path) -> Iterator[Servable]:
    servable = Servable(ModelConfig(name="rec", store=str(torch_store), runtime="torch"), "cpu")
    servable.load()
    yield servable
    servable.stop()


@pytest.fixture(autouse=True)
def healthy(request: pytest.FixtureRequest) -> None:
    """Each test starts with a servable that has no fault (the fixture is shared)."""
    if "torch_servable" in request.fixturenames:
        servable = request.getfixturevalue("torch_servable")
        servable.fault, servable.memory_limit = None, None


@pytest.fixture
def injecting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    trigger = tmp_path / "inject"
    monkeypatch.setenv("MPSSERVE_INJECT_FAULT_FILE", str(trigger))
    settings.cache_clear()
    yield trigger
    settings.cache_clear()


def test_an_injected_fault_makes_the_replica_unavailable_and_tells_its_owner_once(
    torch_servable: Servable, injecting: Path
) -> None:
    told: list[str] = []
    torch_servable.on_fault = told.append
    inputs = torch_servable_inputs(torch_servable)
    torch_servable.infer(inputs)  # no trigger yet: served
    injecting.write_text("fault address\n")
    with pytest.raises(ReplicaUnavailable, match="illegal memory access"):
        torch_servable.infer(inputs)
    assert not injecting.exists(), "the trigger is taken by exactly one replica"
    with pytest.raises(ReplicaUnavailable, match="has a device fault"):
        torch_servable.infer(inputs)
    assert len(told) == 1 and "simulated" in told[0]
    assert torch_servable.problem() is not None and not torch_servable.ready


def test_an_out_of_memory_request_fails_alone_and_says_what_bounds_memory(
    torch_servable: Servable, injecting: Path
) -> None:
    told: list[str] = []
    torch_servable.on_fault = told.append
    torch_servable.memory_limit = "this replica's MPS device memory limit is 512M"
    inputs = torch_servable_inputs(torch_servable)
    injecting.write_text("alloc 4096")
    with pytest.raises(InferenceError, match=r"out of memory.*limit is 512M") as failed:
        torch_servable.infer(inputs)
    assert not isinstance(failed.value, ReplicaUnavailable)
    torch_servable.infer(inputs)  # the next request is served
    assert told == [] and torch_servable.ready


def test_an_unknown_injected_action_is_an_error_of_that_request_only(
    torch_servable: Servable, injecting: Path
) -> None:
    inputs = torch_servable_inputs(torch_servable)
    injecting.write_text("explode")
    with pytest.raises(InferenceError, match="unknown injected action"):
        torch_servable.infer(inputs)
    torch_servable.infer(inputs)


def torch_servable_inputs(servable: Servable) -> dict[str, np.ndarray]:
    from mpsserve.model.features import synthetic_inputs

    assert servable.runtime is not None
    return synthetic_inputs(servable.runtime.signature, rows=4)
