"""Warm-up requests a version ships: TF Serving's ``assets.extra/tf_serving_warmup_requests``.

The file is a TFRecord file of ``PredictionLog`` records (``protocol.tfrecord``,
``protocol.tfserving_grpc.warmup_inputs``); each ``predict_log.request`` is one warm-up
request, run before the version takes traffic, as TF Serving runs them. It is just requests,
so it works for every runtime (a PyTorch version warms its CUDA graphs with them).

What TF Serving does, we do: at most ``MAX_RECORDS`` records (a longer file fails the load),
and a file that cannot be read (a bad CRC, a record cut short, a record that is not a
``PredictionLog``, a request the model refuses) fails the version's load with an error naming
the file and the record, so the version is not swapped in: the serving one keeps serving and
the version is tried again when its files change. Records of other kinds (classify, regress,
multi-inference) are skipped and counted in the log: this server does not serve those APIs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpsserve.protocol.tfrecord import read_records
from mpsserve.protocol.tfserving_grpc import warmup_inputs

#: Where a version keeps its warm-up requests (TF Serving's name, inside the version dir).
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
#: The most records TF Serving reads from one warm-up file.
MAX_RECORDS = 1000


def warmup_file(version_dir: Path) -> Path | None:
    """The version's warm-up file, or None when it ships none."""
    path = version_dir / WARMUP_FILE
    return path if path.is_file() else None


@dataclass
class FileRequests:
    """The requests of one warm-up file, read as they are run (one in memory at a time)."""

    path: Path
    skipped: int = 0  # records of kinds this server does not serve

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(record index, inputs) for every predict record, in file order."""
        for index, record in enumerate(read_records(self.path, MAX_RECORDS)):
            inputs = warmup_inputs(record, f"{self.path}: record {index}")
            if inputs is None:
                self.skipped += 1
                continue
            yield index, inputs
