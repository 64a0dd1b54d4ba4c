"""Placement: config -> Ray Serve options, for CPU-only, one-GPU and two-GPU clusters."""

from __future__ import annotations

import pytest

from mpsserve.config import ModelConfig, parse_config
from mpsserve.errors import ConfigError
from mpsserve.serving.app import MODEL_CONFIG_VAR, PROCESS_ENV, build_app, model_options


def model(**placement: object) -> ModelConfig:
    return ModelConfig.model_validate({"name": "rec", "store": "/s", "placement": placement})


def test_no_gpu_gives_cpu_replicas() -> None:
    got = model_options(model(cpu_replicas=2, cpus_per_replica=0.5), cluster_gpus=0)
    assert got["num_replicas"] == 2
    actor = got["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (0.5, 0)
    env = actor["runtime_env"]["env_vars"]
    assert env == {**PROCESS_ENV, MODEL_CONFIG_VAR: env[MODEL_CONFIG_VAR]}
    assert ModelConfig.model_validate_json(env[MODEL_CONFIG_VAR]).placement.cpu_replicas == 2


def test_gpu_replicas_keep_the_mps_env_and_get_the_malloc_settings() -> None:
    env = model_options(model(), cluster_gpus=1)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["MALLOC_MMAP_THRESHOLD_"] == PROCESS_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert "CUDA_MPS_PIPE_DIRECTORY" in env


@pytest.mark.parametrize(("gpus", "replicas"), [(1, 6), (2, 12)])
def test_replicas_per_gpu_spread_over_every_gpu(gpus: int, replicas: int) -> None:
    got = model_options(model(replicas_per_gpu=6), cluster_gpus=gpus)
    assert got["num_replicas"] == replicas
    assert got["ray_actor_options"]["num_gpus"] == pytest.approx(1 / 6)


def test_shared_gpu_share_halves_the_fraction() -> None:
    got = model_options(model(replicas_per_gpu=4, gpu_share=0.5, gpus=1), cluster_gpus=2)
    assert got["num_replicas"] == 4 and got["ray_actor_options"]["num_gpus"] == 0.125


def test_more_gpus_than_the_cluster_has_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"placement\.gpus is 4 but the cluster has 1 GPU"):
        model_options(model(gpus=4), cluster_gpus=1)


def test_replicas_that_need_more_cpus_than_the_cluster_are_refused() -> None:
    config = parse_config(
        {"models": [{"name": "rec", "store": "/s", "placement": {"replicas_per_gpu": 8}}]}
    )
    with pytest.raises(ConfigError, match=r"need 9 CPUs \(rec: 8 x 1; ingress: 2 x 0.5\).* has 4"):
        build_app(config, cluster_gpus=1, cluster_cpus=4)


def test_mps_on_without_gpu_is_refused() -> None:
    config = parse_config({"models": [{"name": "rec", "store": "/s"}], "mps": {"mode": "on"}})
    with pytest.raises(ConfigError, match=r"mps\.mode is 'on' but the Ray cluster has no GPU"):
        build_app(config, cluster_gpus=0, cluster_cpus=8)
