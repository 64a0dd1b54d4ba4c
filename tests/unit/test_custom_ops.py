"""Custom op libraries: a real op compiled against the installed TensorFlow, loaded before
the model that uses it, served through the runtime and a Servable, refused where it cannot
work; and the ``cpu_fallback`` policy on that op, which has a CPU kernel only."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from mpsserve.config import ModelConfig, load_config
from mpsserve.errors import ConfigError, ModelLoadError
from mpsserve.model.runtime import RuntimeOptions, load_runtime
from mpsserve.model.runtime.tensorflow import load_op_library
from mpsserve.model.servable import Servable
from tests.custom_ops.build import OP_NAME, add_one_library_or_skip
from tests.custom_ops.models import write_add_one_model

REPO = Path(__file__).resolve().parents[2]
X = np.array([1.0, 2.5, -4.0], dtype=np.float32)


@pytest.fixture(scope="session")
def add_one_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_one_library_or_skip(tmp_path_factory)


@pytest.fixture(scope="module")
def add_one_store(tmp_path_factory: pytest.TempPathFactory, add_one_library: Path) -> Path:
    store = tmp_path_factory.mktemp("add-one-store")
    write_add_one_model(store, add_one_library)
    return store


def options(library: Path, cpu_fallback: Literal["warn", "fail"] = "warn") -> RuntimeOptions:
    return RuntimeOptions(
        device="cpu", custom_op_libraries=(str(library),), cpu_fallback=cpu_fallback
    )


def test_a_custom_op_model_serves_through_the_runtime(
    add_one_store: Path, add_one_library: Path
) -> None:
    runtime = load_runtime("tensorflow", add_one_store / "1", options(add_one_library))
    np.testing.assert_array_equal(runtime.predict({"x": X})["y"], X + 1)
    assert [(o["op"], o["dtypes"]) for o in runtime.cpu_ops] == [(OP_NAME, {"x": "float32"})]
    assert runtime.cpu_ops[0]["reason"] == f"no GPU kernel registered for {OP_NAME}"


SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from mpsserve.errors import ModelLoadError
from mpsserve.model.runtime import RuntimeOptions, load_runtime
model, library = Path(sys.argv[1]), sys.argv[2]
try:
    load_runtime("tensorflow", model, RuntimeOptions(device="cpu"))
    without = "loaded"
except ModelLoadError as exc:
    without = exc.message
options = RuntimeOptions(device="cpu", custom_op_libraries=(library,))
runtime = load_runtime("tensorflow", model, options)
y = runtime.predict({"x": np.array([1.0, 2.5], dtype=np.float32)})["y"]
print(json.dumps({"without": without, "y": y.tolist()}))
"""


def test_a_fresh_process_needs_the_library_and_serves_with_it(
    add_one_store: Path, add_one_library: Path
) -> None:
    """What a replica process goes through: the op is unknown until its library loads."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(add_one_store / "1"), str(add_one_library)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    without = result["without"]
    assert "cannot load SavedModel" in without and f"not registered '{OP_NAME}'" in without
    assert without.endswith("list it in custom_op_libraries)")
    assert result["y"] == [2.0, 3.5]


def test_the_same_library_loads_once_per_real_path(add_one_library: Path, tmp_path: Path) -> None:
    link = tmp_path / "alias.so"
    link.symlink_to(add_one_library)
    module = load_op_library(str(add_one_library))
    assert load_op_library(str(link)) is module
    assert load_op_library(str(add_one_library)) is module
    assert hasattr(module, "mpsserve_add_one")


def test_a_library_that_does_not_load_is_a_load_error(tf_store: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.so"
    with pytest.raises(ModelLoadError, match=rf"{missing}: .*No such file"):
        load_runtime("tensorflow", tf_store / "1", options(missing))
    broken = tmp_path / "broken.so"
    broken.write_text("not a shared object")
    with pytest.raises(ModelLoadError, match=rf"custom op library {broken}: .*(ELF|too short)"):
        load_runtime("tensorflow", tf_store / "1", options(broken))


def test_cpu_fallback_fail_refuses_the_model_naming_the_op(
    add_one_store: Path, add_one_library: Path
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_runtime(
            "tensorflow", add_one_store / "1", options(add_one_library, cpu_fallback="fail")
        )
    message = caught.value.message
    assert "1 op(s) without a GPU kernel" in message and "cpu_fallback is 'fail'" in message
    assert f"{OP_NAME} (node " in message and "no GPU kernel registered" in message


def test_cpu_fallback_warn_logs_the_ops_and_serves(
    add_one_store: Path, add_one_library: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mpsserve.model.runtime.tensorflow"):
        runtime = load_runtime("tensorflow", add_one_store / "1", options(add_one_library))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "1 op(s) without a GPU kernel run on the CPU" in w and OP_NAME in w for w in warnings
    )
    np.testing.assert_array_equal(runtime.predict({"x": X})["y"], X + 1)


def test_the_torch_runtime_refuses_custom_op_libraries(torch_store: Path) -> None:
    with pytest.raises(ModelLoadError, match="custom_op_libraries is for the tensorflow runtime"):
        load_runtime("torch", torch_store / "1", options(Path("ops.so")))


def test_a_servable_serves_the_custom_op_model(add_one_store: Path, add_one_library: Path) -> None:
    config = ModelConfig(
        name=f"add-one-{os.getpid()}",
        store=str(add_one_store),
        custom_op_libraries=[str(add_one_library)],
    )
    servable = Servable(config, device="cpu")
    servable.load()
    try:
        version, outputs = servable.infer({"x": X})
        assert version == "1"
        np.testing.assert_array_equal(outputs["y"], X + 1)
    finally:
        servable.stop()


def test_config_takes_the_fields_and_resolves_library_paths(tmp_path: Path) -> None:
    path = tmp_path / "service.yaml"
    path.write_text(
        "models:\n"
        "  - name: rec\n"
        "    store: models/rec\n"
        "    cpu_fallback: fail\n"
        "    custom_op_libraries: [ops/add_one.so, /opt/ops/other.so]\n"
    )
    model = load_config(path).models[0]
    assert model.cpu_fallback == "fail"
    assert model.custom_op_libraries == [str(tmp_path / "ops/add_one.so"), "/opt/ops/other.so"]
    assert ModelConfig(name="rec", store="/m").cpu_fallback == "warn"
    path.write_text("models:\n  - name: rec\n    store: /m\n    cpu_fallback: maybe\n")
    with pytest.raises(ConfigError, match=r"models\.0\.cpu_fallback"):
        load_config(path)
