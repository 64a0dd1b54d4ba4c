"""A redeploy that changes one model's settings touches that model only, driven as an operator
would: `mpsserve serve` runs two models (two replicas of `rec`, one of `rec-b`) behind two
ingresses while clients keep sending to both; `mpsserve deploy` of the same service with one
setting of `rec` changed (one that needs new processes) prints what it will restart, replaces
`rec`'s replicas, rolling, and nothing else: no request fails, the ingresses and `rec-b` keep
their processes, every `rec` replica is a new one."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.integration.conftest import PORT_OFFSET
from tests.processes import Load, Service, service_config, until

HTTP = 31000 + PORT_OFFSET  # gRPC: + 1000; apart from the other tests' ports


def two_models(store: Path, store_b: Path) -> dict[str, Any]:
    config = service_config(store, HTTP, "redeploy-one", model_replicas=2)
    (rec,) = config["models"]
    config["models"].append({**copy.deepcopy(rec), "name": "rec-b", "store": str(store_b)})
    config["models"][1]["placement"]["cpu_replicas"] = 1
    for model in config["models"]:
        model["placement"]["gpu_share"] = 0.5
    # room for one replica beyond the target, so the new ones start before old ones stop
    config["ray"]["num_cpus"] = 4
    return config


def pids(svc: Service) -> dict[str, set[int]]:
    """Processes per deployment, from ``mpsserve status --json``."""
    report = svc.status()
    found: dict[str, set[int]] = {"ingress": {int(i["pid"]) for i in report["ingresses"]}}
    for row in report["replicas"]:
        found.setdefault(f"model-{row['model']}", set()).add(int(row["pid"]))
    return found


def two_rec_replicas(found: dict[str, set[int]]) -> dict[str, set[int]] | None:
    return found if len(found.get("model-rec", ())) == 2 else None


def test_a_model_settings_redeploy_replaces_only_that_models_replicas(
    tf_store: Path, tmp_path: Path
) -> None:
    store_b = tmp_path / "store-b"
    shutil.copytree(tf_store, store_b)
    config = two_models(tf_store, store_b)
    changed = copy.deepcopy(config)
    changed["models"][0]["warmup_rows"] = 4  # read when the process loads the model
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    with Service(tmp_path, config) as svc:
        before = until(lambda: two_rec_replicas(pids(svc)), 60, "two rec replicas answering")
        body = svc.request_body("rec")  # rec-b is the same model: the same inputs
        loads = [Load(f"{svc.url}/{m}/infer", body) for m in ("rec", "rec-b")]
        for load in loads:
            load.start()
        try:
            until(lambda: all(len(x.outcomes) >= 5 for x in loads), 60, "answers from both")
            deploy = svc.cli("deploy", config="changed.yaml", timeout_s=600)
            output = deploy.stdout + deploy.stderr
            assert deploy.returncode == 0, output[-4000:]
            counted = [len(x.outcomes) for x in loads]
            until(
                lambda: all(len(x.outcomes) > n + 5 for x, n in zip(loads, counted, strict=True)),
                60,
                "answers after the deploy",
            )
        finally:
            for load in loads:
                load.stop.set()
            for load in loads:
                load.join(60)
        after = pids(svc)
    print(output)
    for load, model in zip(loads, ("rec", "rec-b"), strict=True):
        failed = sum(not o.ok for o in load.outcomes)
        print(f"{model}: {len(load.outcomes)} requests, {failed} failed")
    assert svc.returncode == 0, svc.output[-3000:]
    # what it said it would restart, before doing it; then the endpoints and what runs
    assert "  ingress: unchanged" in output
    assert "  model-rec-b: unchanged" in output
    assert "  model-rec: rolling replace of 2 replica(s), 1 at a time, new ones start" in output
    assert "(warmup_rows 8 -> 4)" in output
    assert output.index("what restarts:") < output.index("deploying ")
    assert f"HTTP (KServe v2): http://127.0.0.1:{HTTP}/v2/models/rec-b/infer" in output
    assert "now live:" in output and "model-rec: HEALTHY, replicas 2 RUNNING" in output
    # no request failed, on either model
    for load in loads:
        assert [o for o in load.outcomes if not o.ok] == []
    # only rec's processes are new
    assert after["ingress"] == before["ingress"]
    assert after["model-rec-b"] == before["model-rec-b"]
    assert len(after["model-rec"]) == 2 and not after["model-rec"] & before["model-rec"]
