"""control.py, the hooks, the guardian and attach verification, against the stand-in daemon."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mpsserve.config import MpsConfig, Placement, ReplicaMpsConfig
from mpsserve.errors import ConfigError, MpsError
from mpsserve.node import hook
from mpsserve.node.control import BUSY, PID_FILE, DaemonBusy, DaemonNotRunning, MpsControl
from mpsserve.node.guardian import Guardian, ReplicaMps
from mpsserve.node.state import read_state, write_state
from mpsserve.settings import settings
from tests.mps import STANDIN, daemon, replica_mps, standin_client, standin_control


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_commands_and_lifecycle(tmp_path: Path) -> None:
    control = standin_control(tmp_path)
    assert not control.running()
    with pytest.raises(DaemonNotRunning):
        control.server_list()
    with daemon(control):
        assert control.running() and control.daemon_pid() is not None
        assert control.start() is False  # already running: not an error
        assert control.server_list() == []
        assert control.set_default_active_thread_percentage(50) == 50.0
        assert control.default_active_thread_percentage() == 50.0
        control.set_default_device_pinned_mem_limit(0, 2048)
        assert control.client_list(12345) == []  # "Server 12345 not found"
        with pytest.raises(MpsError, match="refused 'bogus'"):
            control.command("bogus")
    assert not control.running()


def test_missing_binary_and_unwritable_pipe_dir(tmp_path: Path) -> None:
    missing = standin_control(tmp_path, binary="no-such-mps-control")
    with pytest.raises(MpsError, match="no-such-mps-control not found on PATH"):
        missing.start()
    blocker = tmp_path / "file"
    blocker.write_text("")
    blocked = MpsControl(blocker / "pipe", tmp_path / "log", binary=str(STANDIN))
    with pytest.raises(MpsError, match="cannot create MPS directory"):
        blocked.start()


@pytest.mark.parametrize(
    ("script", "why"),
    [("sleep 30", r"no answer within 0\.\d+s"), (f"echo '{BUSY}'; exit 1", BUSY)],
    ids=["no-answer", "refusal"],
)
def test_a_busy_answer_is_busy_only_while_the_daemon_process_lives(
    tmp_path: Path, script: str, why: str
) -> None:
    binary = tmp_path / "control"
    binary.write_text(f"#!/bin/sh\n{script}\n")
    binary.chmod(0o755)
    control = standin_control(tmp_path, binary=str(binary), timeout_s=0.3, retry_s=1.0)
    with pytest.raises(DaemonNotRunning, match=why):  # no pid file: nothing to wait for
        control.command("get_server_list")
    control.pipe_dir.mkdir(parents=True)
    (control.pipe_dir / PID_FILE).write_text(str(os.getpid()))  # a live "daemon"
    started = time.monotonic()
    with pytest.raises(DaemonBusy, match=rf"'get_server_list' not taken after \d+ tr.*{why}"):
        control.command("get_server_list")
    assert time.monotonic() - started < 3.0  # the budget (1 s), give or take a try
    assert control.running()  # busy is running: nobody starts a second daemon


def test_a_transient_refusal_is_retried_and_a_lasting_one_is_daemon_busy(tmp_path: Path) -> None:
    control = standin_control(tmp_path)
    impatient = dataclasses.replace(control, retry_s=0.8)
    with daemon(control):
        control.command("standin_refuse 3")
        assert control.server_list() == []
        log = control.log_dir / "control.log"
        assert log.read_text().count("Refused (busy):get_server_list") == 3
        control.command("standin_refuse 1000")
        with pytest.raises(DaemonBusy, match=r"is busy: 'get_server_list' not taken"):
            impatient.server_list()
        control.command("standin_refuse 0")
        control.command("standin_delay 2")  # a slow daemon: tries time out, and that is busy
        slow = dataclasses.replace(impatient, timeout_s=0.3)
        with pytest.raises(DaemonBusy, match=r"no answer within"):
            slow.server_list()
        control.command("standin_delay 0")
        assert control.server_list() == []


def _query(pipe: str, log: str, lock: str, results: multiprocessing.Queue[list[list[int]]]) -> None:
    control = MpsControl(
        Path(pipe), Path(log), binary=str(STANDIN), retry_s=60, lock_file=Path(lock)
    )
    results.put([control.server_list() for _ in range(2)])


def test_concurrent_queries_on_a_node_take_turns(tmp_path: Path) -> None:
    control = standin_control(tmp_path, retry_s=60)
    log = control.log_dir / "control.log"

    def ask_together(control: MpsControl, threads: int) -> list[list[list[int]]]:
        start = threading.Barrier(threads)

        def ask(_: int) -> list[list[int]]:
            start.wait()
            return [control.server_list() for _ in range(2)]

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(ask, range(threads)))

    with daemon(control):
        # A daemon that refuses a command arriving while it answers another.
        control.command("standin_exclusive 1")
        control.command("standin_delay 0.05")
        assert ask_together(control, 3) == [[[]] * 2] * 3
        ctx = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue[list[list[int]]] = ctx.Queue()
        assert control.lock_file is not None
        args = (str(control.pipe_dir), str(control.log_dir), str(control.lock_file), results)
        procs = [ctx.Process(target=_query, args=args) for _ in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(120)
        assert [results.get(timeout=5) for _ in procs] == [[[]] * 2] * 2
        assert "Refused" not in log.read_text()
        # Without turns the same daemon refuses overlapping commands; retries absorb them.
        control.command("standin_delay 0.3")
        loose = dataclasses.replace(control, lock_file=None)
        assert ask_together(loose, 3) == [[[]] * 2] * 3
        assert "Refused (busy):get_server_list" in log.read_text()


def _ensure(pipe: str, log: str, lock: str, results: multiprocessing.Queue[bool]) -> None:
    control = MpsControl(Path(pipe), Path(log), binary=str(STANDIN))
    results.put(control.ensure_running(Path(lock)))


def test_racing_processes_start_exactly_one_daemon(tmp_path: Path) -> None:
    control = standin_control(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[bool] = ctx.Queue()
    args = (str(control.pipe_dir), str(control.log_dir), str(tmp_path / "lock"), results)
    procs = [ctx.Process(target=_ensure, args=args) for _ in range(6)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        started = [results.get(timeout=5) for _ in procs]
        assert started.count(True) == 1 and started.count(False) == 5
        assert control.running()
    finally:
        control.quit()


def test_guardian_restarts_a_killed_daemon_and_reports(tmp_path: Path) -> None:
    control = standin_control(tmp_path)
    state_dir = tmp_path / "state"
    with daemon(control):
        guardian = Guardian(control, state_dir, interval_s=0.2)
        first = control.daemon_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: not control.running())
        guardian.start()
        try:
            assert wait_for(lambda: getattr(read_state(state_dir), "restarts", 0) == 1)
        finally:
            guardian.stop()
            guardian.join(5)
        state = read_state(state_dir)
        assert state is not None and state.up and state.restarts == 1
        assert state.daemon_pid not in (None, first)
        assert json.loads((state_dir / "guardian.json").read_text())["restarts"] == 1


def test_guardian_logs_a_first_start_as_a_start_and_counts_only_real_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mpsserve.node")
    control = standin_control(tmp_path, retry_s=0.5)
    guardian = Guardian(control, tmp_path / "state", interval_s=0.2)
    try:
        first = guardian.check()  # nothing ran here before
        assert first.up and first.restarts == 0 and first.daemon_pid is not None
        assert "starting the MPS control daemon" in caplog.text and "restart" not in caplog.text
        assert guardian.check().restarts == 0
        control.command("standin_refuse 1000")  # busy: not down, nothing restarted
        busy = guardian.check()
        assert busy.up and busy.busy and busy.busy_rounds == 1 and busy.restarts == 0
        assert busy.daemon_pid == first.daemon_pid and "is busy" in (busy.last_error or "")
        control.command("standin_refuse 0")
        os.kill(first.daemon_pid, signal.SIGKILL)
        assert wait_for(lambda: not control.running())
        caplog.clear()
        second = guardian.check()
        assert second.restarts == 1 and second.daemon_pid not in (None, first.daemon_pid)
        assert f"is down (was pid {first.daemon_pid}); restarting (restart 1)" in caplog.text
        assert guardian.check().restarts == 1
        assert second.daemon_pid is not None
        os.kill(second.daemon_pid, signal.SIGKILL)  # and a replica's hook restarts it
        assert wait_for(lambda: not control.running())
        control.start()
        assert guardian.check().restarts == 2
        assert f"was {second.daemon_pid}: restart 2" in caplog.text
    finally:
        control.quit()


def test_only_one_guardian_leads_a_node(tmp_path: Path) -> None:
    control = standin_control(tmp_path)
    first, second = (Guardian(control, tmp_path / "state", 0.2) for _ in range(2))
    assert first._lead() and not second._lead()


@pytest.fixture
def clean_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in [k for k in os.environ if k.startswith("MPSSERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(hook, "setup_error", None)
    yield monkeypatch
    settings.cache_clear()


def test_attached_replica_is_healthy_until_its_server_dies(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    control = standin_control(tmp_path)
    s = replica_mps(control, tmp_path, "on")
    with daemon(control), standin_client(control) as client:
        assert wait_for(lambda: control.server_list() != [])
        replica = ReplicaMps(s, pid=client.pid)
        replica.verify()
        assert replica.server is not None and replica.problem() is None
        assert replica.describe()["attached"] is True
        control.command("standin_kill_server")
        assert wait_for(lambda: replica.problem() is not None)
        assert f"lost its MPS server {replica.server}" in (replica.problem() or "")


def test_a_busy_daemon_is_no_verdict_but_a_server_really_gone_is(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    control = standin_control(tmp_path)
    s = replica_mps(control, tmp_path, "on", command_retry_s=1.5)
    with daemon(control), standin_client(control) as client:
        assert wait_for(lambda: control.server_list() != [])
        control.command("standin_refuse 1000")
        hook.worker_setup()  # a busy daemon runs: the hook neither fails nor starts another
        assert hook.setup_error is None
        replica = ReplicaMps(s, pid=client.pid)
        replica.verify()  # after load, the daemon too busy to say: no verdict yet
        assert replica.server is None and replica.detail.startswith("not verified yet")
        assert replica.problem() is None and replica.busy_checks == 1  # mode 'on', still fine
        control.command("standin_refuse 0")
        assert replica.problem() is None and replica.server is not None  # verified now
        server = replica.server
        control.command("standin_refuse 1000")
        assert replica.problem() is None and replica.problem() is None
        assert replica.describe()["busy_checks"] == 3
        control.command("standin_kill_server")
        assert replica.problem() is None  # gone, but the daemon cannot say so yet
        control.command("standin_refuse 1")  # a short refusal: retried, then the verdict
        assert f"lost its MPS server {server}: MPS client of server" in (replica.problem() or "")


def test_a_health_check_reads_the_guardians_state_before_asking_the_daemon(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    control = standin_control(tmp_path)
    s = replica_mps(control, tmp_path, "on")
    log = control.log_dir / "control.log"

    def asked() -> int:
        return log.read_text().count("Cmd:get_server_list")

    with daemon(control), standin_client(control) as client:
        assert wait_for(lambda: control.server_list() != [])
        state = Guardian(control, tmp_path / "state", s.guardian_interval_s).check()
        replica = ReplicaMps(s, pid=client.pid)
        before = asked()
        replica.verify()  # the guardian's fresh state lists it: no question to the daemon
        assert replica.server is not None and str(replica.server) in state.servers
        assert replica.problem() is None and asked() == before
        stale = dataclasses.replace(state, checked_at=time.time() - 60)
        for doubtful in (stale, dataclasses.replace(state, servers={})):
            write_state(tmp_path / "state", doubtful)
            assert replica.problem() is None and asked() == before + 1  # asked, still fine
            before = asked()
        write_state(tmp_path / "state", dataclasses.replace(state, busy=True))
        assert replica.problem() is None and asked() == before  # busy a moment ago: no verdict
        assert replica.busy_checks == 1


def test_mode_on_replica_that_is_not_attached_says_why(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    control = standin_control(tmp_path)
    s = replica_mps(control, tmp_path, "on")
    with daemon(control):
        replica = ReplicaMps(s, pid=os.getpid())
        replica.verify()
        assert "is in no MPS server's client list" in (replica.problem() or "")
    auto = ReplicaMps(replica_mps(control, tmp_path, "auto"), pid=os.getpid())
    auto.verify()  # daemon gone: auto degrades, stays healthy, and says so
    assert auto.problem() is None and "no MPS control daemon answers" in auto.detail


def test_worker_setup_hook_starts_the_daemon_and_sets_limits(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    control = standin_control(tmp_path)
    replica_mps(control, tmp_path, "on", limits={"pinned_mem_limit_mb": 1234})
    clean_settings.delenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", raising=False)
    try:
        hook.worker_setup()
        assert control.running() and hook.setup_error is None
        assert os.environ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=1234M"
        Guardian(control, tmp_path / "state", 1.0).check()
        assert (tmp_path / "state" / hook.STATE_FILE).exists()
        assert hook.stop_daemon_if_ours(
            MpsConfig(
                pipe_dir=str(control.pipe_dir),
                log_dir=str(control.log_dir),
                state_dir=str(tmp_path / "state"),
                control_binary=str(STANDIN),
            )
        )
        assert not control.running()
        assert not (tmp_path / "state" / hook.STATE_FILE).exists()  # next start: a first one
    finally:
        os.environ.pop("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", None)
        control.quit()


def test_worker_setup_hook_reports_a_missing_binary(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    replica_mps(standin_control(tmp_path), tmp_path, "auto", control_binary="no-such-mps-control")
    hook.worker_setup()
    assert hook.setup_error is not None and "not found on PATH" in hook.setup_error


def test_replica_runtime_env() -> None:
    on = hook.replica_runtime_env(MpsConfig(mode="on"), Placement(replicas_per_gpu=8))
    assert "worker_process_setup_hook" not in on  # a no-op in an actor's runtime env (Ray)
    env = on["env_vars"]
    assert hook.PINNED_LIMIT_VAR not in env  # derived in the replica (its GPU's size)
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/mpsserve/mps-pipe"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"  # no SM fence by default
    fenced = MpsConfig(mode="on", limits={"active_thread_percentage": 25})
    fenced_env = hook.replica_runtime_env(fenced, Placement(replicas_per_gpu=8))["env_vars"]
    assert fenced_env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    limited = MpsConfig(mode="on", limits={"pinned_mem_limit_mb": 4096})
    limited_env = hook.replica_runtime_env(limited, Placement(replicas_per_gpu=8))["env_vars"]
    assert limited_env[hook.PINNED_LIMIT_VAR] == "0=4096M"  # CUDA sees it from the start
    sent = ReplicaMpsConfig.from_json(env["MPSSERVE_MPS_CONFIG"])  # what the replica reads
    assert sent == ReplicaMpsConfig(mps=MpsConfig(mode="on"), replicas_per_gpu=8)
    off = hook.replica_runtime_env(MpsConfig(mode="off"), Placement())
    assert off["env_vars"]["CUDA_MPS_PIPE_DIRECTORY"] == hook.NO_MPS_PIPE_DIR
    assert "worker_process_setup_hook" not in off and hook.PINNED_LIMIT_VAR not in off["env_vars"]


def test_guardian_of_an_external_daemon_reports_it_down_and_never_restarts_it(
    tmp_path: Path,
) -> None:
    control = standin_control(tmp_path)
    state_dir = tmp_path / "state"
    with daemon(control):
        guardian = Guardian(control, state_dir, interval_s=0.2, restart=False)
        assert guardian.check().up
        first = control.daemon_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: not control.running())
        state = guardian.check()
        assert not state.up and state.restarts == 0
        assert state.last_error is not None and "does not restart it" in state.last_error
        assert not control.running()


def test_worker_setup_with_an_external_daemon_attaches_but_never_starts_one(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    control = standin_control(tmp_path)
    replica_mps(control, tmp_path, "on", daemon="external")
    hook.worker_setup()
    assert not control.running()
    assert hook.setup_error is not None and "mps.daemon is 'external'" in hook.setup_error
    clean_settings.setattr(hook, "setup_error", None)
    with daemon(control):  # the host's daemon is up: nothing to say
        hook.worker_setup()
        assert hook.setup_error is None
    env = hook.replica_runtime_env(MpsConfig(mode="on", daemon="external"), Placement())
    sent = ReplicaMpsConfig.from_json(env["env_vars"]["MPSSERVE_MPS_CONFIG"])
    assert sent.mps.daemon == "external"


def test_a_ray_start_node_takes_the_mps_section_of_the_service_yaml(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    assert hook.node_config().mode == "off"  # nothing named: the hook does nothing
    service = tmp_path / "service.yaml"
    service.write_text(
        "models: [{name: rec, store: /models/rec}]\n"
        "mps: {mode: on, pipe_dir: /run/mps-pipe, guardian_interval_s: 3}\n"
    )
    clean_settings.setenv("MPSSERVE_SERVICE_CONFIG", str(service))
    settings.cache_clear()
    mps = hook.node_config()
    assert (mps.mode, mps.pipe_dir, mps.guardian_interval_s) == ("on", "/run/mps-pipe", 3.0)


def test_a_bad_mps_config_in_the_environment_names_the_field(
    clean_settings: pytest.MonkeyPatch,
) -> None:
    clean_settings.setenv("MPSSERVE_MPS_CONFIG", '{"mps": {"guardian_interval_s": 0}}')
    settings.cache_clear()
    with pytest.raises(ConfigError, match=r"mps\.guardian_interval_s"):
        hook.replica_config()
    hook.worker_setup()  # reports, never raises
    assert hook.setup_error is not None and "MPSSERVE_MPS_CONFIG" in hook.setup_error
