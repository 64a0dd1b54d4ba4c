"""The CPU-fallback op audit on real SavedModels: the demo model, and one with fallbacks in
nested functions and loops (a built-in string op, int32 MatMul, a compiled custom op)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mpsserve.model.features import synthetic_inputs
from mpsserve.model.runtime import RuntimeOptions, load_runtime
from mpsserve.model.runtime.tensorflow import TensorFlowRuntime, tf
from mpsserve.ops.audit import (
    NO_GPU_NOTE,
    PLUMBING_OPS,
    SIGNATURE_GRAPH,
    audit_saved_model,
    gpu_kernels_registered,
    placed_on_cpu,
)
from mpsserve.ops.cli import main
from tests.custom_ops.build import OP_NAME, add_one_library_or_skip
from tests.custom_ops.models import write_fallback_model

REPO = Path(__file__).resolve().parents[2]
NO_GPU = not tf.config.list_logical_devices("GPU")


@pytest.fixture(scope="session")
def add_one_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_one_library_or_skip(tmp_path_factory)


@pytest.fixture(scope="module")
def fallback_model(tmp_path_factory: pytest.TempPathFactory, add_one_library: Path) -> Path:
    return write_fallback_model(tmp_path_factory.mktemp("fallbacks") / "1", add_one_library)


def by_op(cpu_ops: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["op"]: o for o in cpu_ops}


def test_the_installed_tensorflow_registers_gpu_kernels_without_a_gpu() -> None:
    """The static check compares against registered GPU kernels; the CUDA build of the
    Linux wheel registers them on a CPU-only host too (a CPU-only build would not)."""
    if not tf.test.is_built_with_cuda():
        pytest.skip("a CPU-only TensorFlow build: the audit reports it cannot tell")
    assert gpu_kernels_registered()


def test_the_demo_model_audits_clean(tf_store: Path) -> None:
    report = audit_saved_model(tf_store / "1")
    assert report.cpu_ops == [] and not report.falls_back
    assert report.gpu_kernels_known
    if NO_GPU:
        assert report.placed_on_cpu is None and report.placement_note == NO_GPU_NOTE
    runtime = load_runtime("tensorflow", tf_store / "1", RuntimeOptions(device="cpu"))
    assert runtime.cpu_ops == []


def test_fallbacks_are_found_through_nested_functions_and_loops(fallback_model: Path) -> None:
    report = audit_saved_model(fallback_model)
    ops = by_op([o.to_dict() for o in report.cpu_ops])
    assert report.falls_back
    assert set(ops) == {"StringToHashBucketFast", "MatMul", OP_NAME, "Mul", "Const"}

    hashing = ops["StringToHashBucketFast"]
    assert hashing["dtypes"] == {"input": "string"}
    assert hashing["reason"] == "no GPU kernel registered for StringToHashBucketFast"
    assert hashing["function"].startswith("__inference_serve")  # not SIGNATURE_GRAPH

    matmul = ops["MatMul"]  # only the int32 one: the float32 MatMul has a GPU kernel
    assert [o.dtypes for o in report.cpu_ops if o.op == "MatMul"] == [{"T": "int32"}]
    assert "no GPU kernel for T=int32" in matmul["reason"] and "float32" in matmul["reason"]
    assert matmul["function"].startswith("__inference_nested")

    custom = ops[OP_NAME]  # inside the while loop's body, a function of the nested function
    assert "while_body" in custom["function"]
    assert custom["dtypes"] == {"x": "float32"}
    assert custom["reason"] == f"no GPU kernel registered for {OP_NAME}"

    assert ops["Mul"]["reason"].startswith("pinned to the CPU by the graph")
    assert all(o.function != SIGNATURE_GRAPH for o in report.cpu_ops)


def test_the_table_and_json_name_every_fallback(fallback_model: Path) -> None:
    report = audit_saved_model(fallback_model)
    table = report.format_table()
    lines = table.splitlines()
    assert lines[0] == f"op audit of {fallback_model} (signature 'serving_default')"
    assert lines[1] == f"{len(report.cpu_ops)} op(s) without a GPU kernel (they run on the CPU):"
    assert lines[2].split() == ["op", "node", "function", "dtypes", "why"]
    for op in report.cpu_ops:
        assert op.node in table and op.reason in table
    assert "T=int32" in table and "input=string" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert data["falls_back"] is True and len(data["cpu_ops"]) == len(report.cpu_ops)
    assert data["placed_on_cpu"] is None if NO_GPU else isinstance(data["placed_on_cpu"], list)


def test_cli_exit_codes_and_json(
    fallback_model: Path, tf_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit-ops", str(tf_store / "1")]) == 0
    assert "every op has a GPU kernel" in capsys.readouterr().out

    assert main(["audit-ops", str(fallback_model), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert {o["op"] for o in data["cpu_ops"]} >= {"StringToHashBucketFast", OP_NAME}

    assert main(["audit-ops", str(tf_store / "1"), "--signature", "nope"]) == 2
    assert "no signature 'nope'" in capsys.readouterr().err


def test_cli_in_a_fresh_process_loads_the_library_first(
    fallback_model: Path, add_one_library: Path
) -> None:
    """A new process has never seen the custom op: --custom-op-library must load it before
    the model (which would not load otherwise)."""
    command = [sys.executable, "-m", "mpsserve.ops.cli", "audit-ops", str(fallback_model), "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [*command, "--custom-op-library", str(add_one_library)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 1, done.stderr
    ops = by_op(json.loads(done.stdout)["cpu_ops"])
    assert OP_NAME in ops and "while_body" in ops[OP_NAME]["function"]


def test_placement_is_read_from_what_tensorflow_ran(tf_store: Path) -> None:
    """The GPU-host check's mechanism, exercised on the CPU: every node of a real request
    comes back with the device it ran on (here all the CPU), plumbing left out."""
    runtime = TensorFlowRuntime.open(tf_store / "1", RuntimeOptions(device="cpu"))
    placed = placed_on_cpu(runtime.function, synthetic_inputs(runtime.signature, rows=4))
    if not NO_GPU:
        pytest.skip("a GPU is visible: the demo model's nodes are not all on the CPU")
    ops = {p.op for p in placed}
    assert {"ResourceGather", "UnsortedSegmentSum", "Sigmoid"} <= ops
    assert not ops & PLUMBING_OPS
    assert all(p.device.endswith("CPU:0") for p in placed)
