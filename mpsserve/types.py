"""Transport-free request and response types shared by the core and the protocol codecs.

Wire formats decode into these and encode from them; nothing here knows HTTP, gRPC or Ray.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: A ragged feature travels as two tensors: ``<feature>_values`` (1-D, every row's values one
#: after another) and ``<feature>_lengths`` (one entry per row). Declared here only: the
#: signature (runtime), CUDA-graph padding and TF-Serving's row format all read these.
VALUES_SUFFIX = "_values"
LENGTHS_SUFFIX = "_lengths"


def ragged_feature(name: str, names: Container[str]) -> str | None:
    """The feature whose values tensor ``name`` is, when its lengths partner is in ``names``."""
    if not name.endswith(VALUES_SUFFIX):
        return None
    feature = name.removesuffix(VALUES_SUFFIX)
    return feature if feature + LENGTHS_SUFFIX in names else None


@dataclass(frozen=True)
class RequestedOutput:
    """One output the client asked for, and whether it wants it as raw bytes."""

    name: str
    binary: bool = False


@dataclass
class InferRequest:
    """A decoded inference request: named numpy tensors for one model."""

    model: str
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    id: str | None = None
    version: str | None = None  # a specific version asked for in the path, else None
    binary_output: bool = False  # request-level default for outputs not listed
    parameters: dict[str, Any] = field(default_factory=dict)

    def wants_binary(self, output: str) -> bool:
        """Whether ``output`` should travel as raw bytes in the response."""
        for requested in self.outputs or ():
            if requested.name == output:
                return requested.binary
        return self.binary_output


@dataclass
class InferResponse:
    """The result of one inference: named numpy tensors and the version that produced them."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None
