"""Unit tier: no Ray. Starting a cluster here is a bug, so ``ray.init`` raises."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from mpsserve import metrics
from mpsserve.metrics import MetricSpec


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("unit tests must not start Ray; put this test in tests/integration")

    monkeypatch.setattr(ray, "init", refuse)


Recorded = tuple[str, float, dict[str, str]]


class Recorder:
    """A backend that keeps what it was given."""

    def __init__(self) -> None:
        self.values: list[Recorded] = []
        self._lock = threading.Lock()

    def record(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(spec.tags), f"{spec.name} got tags {sorted(tags)}"
        with self._lock:
            self.values.append((spec.name, value, tags))

    def of(self, name: str) -> list[tuple[float, dict[str, str]]]:
        return [(value, tags) for n, value, tags in self.values if n == name]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    """Metrics recorded while the test runs, instead of Ray's export."""
    backend = Recorder()
    previous = metrics.use_backend(backend)
    yield backend
    metrics.use_backend(previous)
