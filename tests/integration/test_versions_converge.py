"""One version everywhere, driven as an operator would, under steady load: two model replicas
(and two ingresses) serve version 1; version 2 is uploaded in two steps (saved_model.pb, the
variables seconds later) and is served once complete; a corrupt version 3 appears and a model
replica is killed: its replacement reaches the same verdict as the survivor (version 2, 3
failed), so clients never see the versions alternate; deleting version 3 and publishing 4
moves both. No request fails throughout, and once the replicas agree no answer comes from
another version (the replicas swap one at a time, so a transition itself may mix two)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from mpsserve.ops.demo import write_demo_model
from tests.conftest import SMALL
from tests.processes import Load, Service, service_config, until

HTTP = 28600


def serving(svc: Service) -> dict[str, int]:
    """Version -> replicas serving it, from ``mpsserve status --json``."""
    report = svc.status()
    return dict(report.get("models", {}).get("rec", {}).get("serving", {}))


def upload_slowly(source: Path, target: Path, svc: Service) -> None:
    """saved_model.pb first; the variables once the replicas have seen it incomplete."""
    target.mkdir()
    shutil.copy(source / "saved_model.pb", target / "saved_model.pb")
    until(lambda: "2" in svc.status()["models"]["rec"].get("failed", {}), 60, "2 tried early")
    shutil.copytree(source / "variables", target / ".variables-partial")
    (target / ".variables-partial").rename(target / "variables")


def test_versions_converge_after_slow_publishes_bad_versions_and_restarts(
    tf_store: Path, tmp_path: Path
) -> None:
    store, staging = tmp_path / "store", tmp_path / "staging"
    shutil.copytree(tf_store / "1", store / "1")
    write_demo_model(staging, "tensorflow", version=2, seed=8, spec=SMALL)
    config = service_config(store, HTTP, "converge", model_replicas=2, poll_interval_s=1)
    with Service(tmp_path, config) as svc:
        load = Load(f"{svc.url}/rec/infer", svc.request_body())
        load.start()
        upload_slowly(staging / "2", store / "2", svc)
        until(lambda: serving(svc) == {"2": 2}, 90, "both replicas on version 2")
        on_two = len(load.outcomes)

        (store / "3").mkdir()
        (store / "3" / "saved_model.pb").write_bytes(b"not a SavedModel")
        until(lambda: "3" in svc.status()["models"]["rec"].get("failed", {}), 60, "3 failed")
        victim = svc.status()["replicas"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        report = until(
            lambda: (
                (r := svc.status())["exit_code"] == 0
                and victim not in [x["pid"] for x in r["replicas"]]
                and len(r["replicas"]) == 2
                and r
            ),
            180,
            "a replacement replica answering",
        )
        assert report["models"]["rec"]["serving"] == {"2": 2}, report["models"]
        before_four = len(load.outcomes)

        shutil.rmtree(store / "3")
        write_demo_model(store, "tensorflow", version=4, seed=9, spec=SMALL)
        until(lambda: serving(svc) == {"4": 2}, 90, "both replicas on version 4")
        on_four = len(load.outcomes)
        until(lambda: len(load.outcomes) > on_four + 5, 60, "more answers")
        load.stop.set()
        load.join(60)
    assert svc.returncode == 0, svc.output[-3000:]
    assert [o for o in load.outcomes if not o.ok] == []
    assert {o.version for o in load.outcomes[on_two:before_four]} == {"2"}  # restart included
    assert {o.version for o in load.outcomes[on_four:]} == {"4"}
