"""Build the test custom op library (``add_one.cc``) against the installed TensorFlow.

g++ with ``tf.sysconfig``'s compile and link flags, as TensorFlow's guide to custom ops does.
Built once per test process, whichever module asks first.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_name("add_one.cc")
#: The op the library registers, and its generated Python wrapper's name.
OP_NAME = "MpsserveAddOne"
WRAPPER = "mpsserve_add_one"
COMPILER = "g++"
BUILD_TIMEOUT_S = 300


@functools.cache
def build_add_one(out_dir: Path) -> Path:
    """Compile ``add_one.cc`` into ``out_dir/add_one.so``; a compiler error fails loudly."""
    import tensorflow as tf

    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / "add_one.so"
    command = [
        COMPILER,
        "-shared",
        "-fPIC",
        "-O2",
        "-w",  # TensorFlow's headers warn about their own deprecations by the hundred
        *tf.sysconfig.get_compile_flags(),
        str(SOURCE),
        "-o",
        str(library),
        *tf.sysconfig.get_link_flags(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"building {SOURCE.name} failed:\n{' '.join(command)}\n{done.stderr}")
    return library


def add_one_library_or_skip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built library; skips (saying why) only when there is no C++ compiler."""
    if shutil.which(COMPILER) is None:
        pytest.skip(f"no C++ compiler ({COMPILER}) on PATH: cannot build the test custom op")
    return build_add_one(tmp_path_factory.getbasetemp() / "custom-ops")
