"""Unit tier: no Ray. Starting a cluster here is a bug, so ``ray.init`` raises."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("unit tests must not start Ray; put this test in tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
