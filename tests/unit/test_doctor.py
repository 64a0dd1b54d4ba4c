"""``mpsserve doctor``: a verdict in one line, against the stand-in daemon and fake GPUs."""

from __future__ import annotations

from pathlib import Path

from mpsserve.config import ServiceConfig, parse_config
from mpsserve.node.doctor import diagnose
from mpsserve.node.gpu import GpuInfo, Inventory
from tests.mps import STANDIN, daemon, standin_client, standin_control

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-x", (9, 0), 81559, "Default")
P100 = GpuInfo(0, "Tesla P100", "GPU-y", (6, 0), 16280, "Default")


def config(tmp: Path, binary: str = str(STANDIN), mode: str = "on") -> ServiceConfig:
    mps = {
        "mode": mode,
        "pipe_dir": str(tmp / "pipe"),
        "log_dir": str(tmp / "log"),
        "state_dir": str(tmp / "state"),
        "control_binary": binary,
    }
    return parse_config({"models": [{"name": "rec", "store": "/s"}], "mps": mps})


def test_healthy_node(tmp_path: Path) -> None:
    with daemon(standin_control(tmp_path)) as control, standin_client(control):
        report = diagnose(config(tmp_path), Inventory([H100], "580.159.04"))
        assert report.ok, report.to_dict()
        assert report.verdict.startswith("MPS can work here: daemon pid")
        assert (
            any(c.name.startswith("server ") and "of 48 clients" in c.detail for c in report.checks)
            or "0 server(s)" in report.verdict
        )


def test_daemon_not_started_yet_is_fine(tmp_path: Path) -> None:
    report = diagnose(config(tmp_path), Inventory([H100], "580"))
    assert report.ok and "replicas start it" in report.verdict


def test_a_busy_daemon_is_reported_not_failed(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg = cfg.model_copy(update={"mps": cfg.mps.model_copy(update={"command_retry_s": 0.5})})
    with daemon(standin_control(tmp_path)) as control:
        control.command("standin_refuse 1000")
        report = diagnose(cfg, Inventory([H100], "580"))
        assert report.ok, report.to_dict()
        assert "is busy: 'get_server_list' not taken" in report.verdict
        control.command("standin_refuse 0")


def test_each_broken_setup_is_named_in_the_verdict(tmp_path: Path) -> None:
    no_gpu = diagnose(config(tmp_path), Inventory(error="NVML unavailable: no driver"))
    assert not no_gpu.ok
    assert no_gpu.verdict == (
        "MPS cannot work here: GPUs: no NVIDIA GPU visible (NVML unavailable: no driver); "
        "replicas run on the CPU"
    )
    old = diagnose(config(tmp_path), Inventory([P100], "470"))
    assert "GPU 0 (Tesla P100) is below 7.0 (Volta)" in old.verdict
    missing = diagnose(config(tmp_path, "no-such-mps-control"), Inventory([H100], "580"))
    assert "control binary: no-such-mps-control not on PATH" in missing.verdict


def test_pipe_directory_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cfg = config(tmp_path).model_copy(
        update={
            "mps": config(tmp_path).mps.model_copy(
                update={"pipe_dir": str(tmp_path / "file" / "pipe")}
            )
        }
    )
    report = diagnose(cfg, Inventory([H100], "580"))
    assert not report.ok
    assert report.verdict.endswith(
        f"pipe directory: {tmp_path}/file/pipe cannot be created: "
        f"{tmp_path}/file is not a directory"
    )


NO_GPU = Inventory(error="NVML unavailable: no driver")


def test_mode_off_reports_the_facts_and_passes(tmp_path: Path) -> None:
    for gpus in (NO_GPU, Inventory([P100], "470")):
        report = diagnose(config(tmp_path, "no-such-mps-control", mode="off"), gpus)
        assert report.ok, report.to_dict()
        assert report.verdict == "MPS is not used: mps.mode is off (replicas share no MPS daemon)"
        assert not report.to_dict()["mps_needed"]
        facts = {c.name: c for c in report.checks}
        assert facts["control binary"].status == "info"  # what would fail MPS is information
        assert "not on PATH" in facts["control binary"].detail
        assert "mode off" in facts["replicas per GPU"].detail


def test_mode_auto_without_a_gpu_is_skipped_not_failed(tmp_path: Path) -> None:
    report = diagnose(config(tmp_path, "no-such-mps-control", mode="auto"), NO_GPU)
    assert report.ok, report.to_dict()
    assert report.verdict == (
        "MPS is skipped: mps.mode is auto and this node has no GPU (CPU replicas)"
    )
    gpus = next(c for c in report.checks if c.name == "GPUs")
    assert gpus.status == "info" and "no NVIDIA GPU visible" in gpus.detail


def test_mode_auto_with_a_gpu_is_judged_as_on(tmp_path: Path) -> None:
    report = diagnose(
        config(tmp_path, "no-such-mps-control", mode="auto"), Inventory([H100], "580")
    )
    assert not report.ok and report.to_dict()["mps_needed"]
    assert "control binary: no-such-mps-control not on PATH" in report.verdict
    fine = diagnose(config(tmp_path, mode="auto"), Inventory([H100], "580"))
    assert fine.ok and fine.verdict.startswith("MPS can work here")


def test_mode_on_without_a_gpu_fails(tmp_path: Path) -> None:
    report = diagnose(config(tmp_path, "no-such-mps-control", mode="on"), NO_GPU)
    assert not report.ok
    assert report.verdict.startswith("MPS cannot work here: GPUs: no NVIDIA GPU visible")
