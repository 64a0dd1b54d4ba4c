"""One version everywhere: a process's verdict depends only on the store and on failures,
failed versions are retried when their files change or after a backoff, and a slow upload
is served once complete. Real PyTorch demo models on disk; no Ray."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from mpsserve.config import ModelConfig, VersionPolicy
from mpsserve.model.features import synthetic_like
from mpsserve.model.servable import Servable
from mpsserve.ops.demo import make_request
from mpsserve.ops.demo import signature as demo_signature
from tests.conftest import SMALL


@pytest.fixture
def store(torch_store: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(torch_store / "1", root / "1")
    return root


def servable(store: Path, **policy: object) -> Servable:
    config = ModelConfig.model_validate(
        {
            "name": "rec",
            "store": str(store),
            "runtime": "torch",
            "intra_op_threads": 1,
            "version_policy": policy or {"latest": 1},
        }
    )
    served = Servable(config, device="cpu")
    served.load()
    return served


def publish(store: Path, version: int, source: int = 1) -> None:
    shutil.copytree(store / str(source), store / f".tmp-{version}")
    (store / f".tmp-{version}").rename(store / str(version))


def corrupt(store: Path, version: int) -> None:
    (store / str(version)).mkdir()
    shutil.copy(store / "1" / "signature.json", store / str(version) / "signature.json")
    (store / str(version) / "model.pt2").write_bytes(b"not a model")


def test_a_slow_upload_is_served_once_its_files_are_complete(store: Path) -> None:
    served = servable(store)
    target = store / "2"
    target.mkdir()
    shutil.copy(store / "1" / "signature.json", target / "signature.json")
    whole = (store / "1" / "model.pt2").read_bytes()
    (target / "model.pt2").write_bytes(whole[: len(whole) // 2])  # still arriving
    served.poll()
    assert served.version == 1 and "2" in served.store_status()["failed"]
    (target / "model.pt2").write_bytes(whole)  # the rest arrives: size and mtime change
    served.poll()
    assert served.version == 2 and served.store_status()["failed"] == {}


def test_a_failed_version_waits_for_its_backoff_when_its_files_do_not_change(
    store: Path,
) -> None:
    served = servable(store)
    corrupt(store, 2)
    served.poll()
    first = served.failed[2]
    served.poll()  # unchanged files, backoff not over: not tried again
    assert served.failed[2].attempts == 1
    first.retry_at = time.monotonic() - 1  # the backoff is over
    served.poll()
    assert served.failed[2].attempts == 2 and served.failed[2].retry_at > first.retry_at
    assert served.version == 1


def test_a_new_process_and_an_old_one_reach_the_same_verdict(store: Path) -> None:
    old = servable(store)
    corrupt(store, 2)
    old.poll()
    new = servable(store)  # started after the bad publish: falls back past it
    assert old.version == new.version == 1
    publish(store, 3)
    old.poll()
    new.poll()
    assert old.version == new.version == 3


def test_unpinning_moves_to_the_newest_good_version(store: Path) -> None:
    publish(store, 2)
    corrupt(store, 3)
    pinned = servable(store, specific=[1])
    assert pinned.version == 1
    pinned.set_policy(VersionPolicy(latest=1))
    pinned.poll()
    fresh = servable(store)
    assert pinned.version == fresh.version == 2
    assert set(pinned.store_status()["failed"]) == {"3"} == set(fresh.store_status()["failed"])


def test_a_deleted_failed_version_is_forgotten(store: Path) -> None:
    served = servable(store)
    corrupt(store, 2)
    served.poll()
    assert 2 in served.failed
    shutil.rmtree(store / "2")
    served.poll()
    assert served.failed == {}


def test_status_reports_when_the_version_started_and_the_bound(store: Path) -> None:
    before = time.time()
    served = servable(store)
    status = served.store_status()
    assert status["serving"] == 1 and before <= status["serving_since"] <= time.time()
    assert status["converge_within_s"] > 2 * served.config.poll_interval_s
    assert served.metadata()["graphs"] is not None  # the torch runtime reports its graphs


def test_warm_up_requests_take_the_shapes_of_real_requests() -> None:
    signature = demo_signature(SMALL)
    request = make_request(SMALL, rows=37, seed=3)
    shapes = {name: array.shape for name, array in request.items()}
    warm = synthetic_like(signature, shapes)
    assert {n: a.shape for n, a in warm.items()} == shapes
    assert int(warm["history_lengths"].sum()) == shapes["history_values"][0]
    assert np.all(warm["history_lengths"] >= 0)


def test_a_swap_says_busy_and_drains_first_a_first_load_does_not(store: Path) -> None:
    served = servable(store)  # the first load: nobody to drain
    seen: list[bool] = []
    served.drain = lambda: seen.append(served.busy)
    publish(store, 2)
    served.poll()
    assert served.version == 2 and seen == [True] and not served.busy
