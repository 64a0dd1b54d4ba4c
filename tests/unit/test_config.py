from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mpsserve.config import VersionPolicy, load_config, parse_config
from mpsserve.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def minimal(**model: object) -> dict[str, object]:
    return {"models": [{"name": "rec", "store": "/models/rec", **model}]}


def test_embedded_default_loads_and_resolves_store_from_its_folder() -> None:
    config = load_config(ROOT / "deployments" / "local.yaml")
    assert config.models[0].store == str(ROOT / "models" / "rec")
    assert config.ingress.http_port == 8000 and config.mps.mode == "auto"


def test_default_ingress_is_two_replicas_that_fit_a_two_core_machine() -> None:
    """No single point of failure by default, and room for it beside one 1-CPU model replica."""
    from mpsserve.serving.app import check_cpus, ingress_replicas, model_options

    for config in (parse_config(minimal()), load_config(ROOT / "deployments" / "local.yaml")):
        options = {m.name: model_options(m, 0, config.mps) for m in config.models}
        assert config.ingress.replicas == "auto"
        assert ingress_replicas(config, options, cpus=2) == 2
        check_cpus(config, options, 2, ingresses=2)


@pytest.mark.parametrize(
    ("gpus", "cpus", "per_gpu", "ingress_cpus", "want"),
    [
        (1, 16, 8, 1.0, 8),  # the H200 host: one ingress per model replica
        (1, 12, 8, 1.0, 4),  # only the cores the model replicas leave
        (1, 12, 8, 0.5, 4),  # whole cores, whatever the reservation
        (2, 40, 8, 1.0, 16),  # any number of GPUs
        (1, 9, 8, 1.0, 2),  # never fewer than two
        (1, 16, 8, 3.0, 2),  # reservations that do not fit: two, and check_cpus says so
    ],
)
def test_auto_ingress_replicas_follow_cores_and_model_replicas(
    gpus: int, cpus: int, per_gpu: int, ingress_cpus: float, want: int
) -> None:
    from mpsserve.serving.app import ingress_replicas, model_options

    config = parse_config(
        {
            **minimal(placement={"replicas_per_gpu": per_gpu, "cpus_per_replica": 1}),
            "ingress": {"cpus_per_replica": ingress_cpus},
        }
    )
    options = {m.name: model_options(m, gpus, config.mps) for m in config.models}
    assert ingress_replicas(config, options, cpus) == want


def test_explicit_ingress_replicas_are_kept() -> None:
    from mpsserve.serving.app import ingress_replicas, model_options

    config = parse_config({**minimal(), "ingress": {"replicas": 3}})
    options = {m.name: model_options(m, 1, config.mps) for m in config.models}
    assert ingress_replicas(config, options, 64) == 3
    with pytest.raises(ConfigError, match=r"ingress\.replicas"):
        parse_config({**minimal(), "ingress": {"replicas": 0}})


def test_placement_gives_fractional_gpus() -> None:
    config = parse_config(minimal(placement={"replicas_per_gpu": 8, "gpu_share": 0.5}))
    assert config.models[0].placement.num_gpus_per_replica() == pytest.approx(0.0625)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (minimal(placement={"replicas_per_gpu": 0}), "models.0.placement.replicas_per_gpu"),
        (minimal(runtime="onnx"), "models.0.runtime"),
        (minimal(colour="red"), "models.0.colour: Extra inputs are not permitted"),
        ({"models": []}, "models: List should have at least 1 item"),
        ({**minimal(), "ingress": {"http_port": 70000}}, "ingress.http_port"),
        ({**minimal(), "mps": {"mode": "maybe"}}, "mps.mode"),
        (minimal(name="has space"), "models.0.name"),
    ],
)
def test_bad_field_is_named(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    assert expected in info.value.message and "test.yaml" in info.value.message


def test_more_than_48_clients_per_gpu_is_refused() -> None:
    models = [
        {"name": f"m{i}", "store": "/s", "placement": {"replicas_per_gpu": 25, "gpu_share": 0.5}}
        for i in range(2)
    ]
    with pytest.raises(ConfigError, match="at most 48 clients per GPU"):
        parse_config({"models": models})


def test_gpu_shares_over_one_gpu_are_refused() -> None:
    models = [{"name": f"m{i}", "store": "/s", "placement": {"gpu_share": 0.6}} for i in range(2)]
    with pytest.raises(ConfigError, match="more than 1 GPU"):
        parse_config({"models": models})


def test_a_control_daemon_retry_budget_past_the_health_check_timeout_is_refused() -> None:
    model = {"name": "rec", "store": "/s", "placement": {"health_check_timeout_s": 6}}
    with pytest.raises(ConfigError, match="command_retry_s \\(8\\) must be below model 'rec'"):
        parse_config({"models": [model], "mps": {"command_retry_s": 8}})
    assert parse_config({"models": [model], "mps": {"command_retry_s": 8, "mode": "off"}})
    assert parse_config({"models": [model], "mps": {"command_retry_s": 5}}).mps.command_retry_s == 5


def test_duplicate_model_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="repeated: \\['rec'\\]"):
        parse_config({"models": [{"name": "rec", "store": "/a"}, {"name": "rec", "store": "/b"}]})


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unquoted_yaml_on_and_off_mean_the_modes(tmp_path: Path) -> None:
    for text, mode in (("on", "on"), ("off", "off"), ("auto", "auto")):
        path = tmp_path / f"{mode}.yaml"
        path.write_text(f"models: [{{name: rec, store: /s}}]\nmps: {{mode: {text}}}\n")
        assert load_config(path).mps.mode == mode


def test_a_version_policy_selects_and_names_itself() -> None:
    latest, pinned = VersionPolicy(latest=2), VersionPolicy(specific=[3, 1])
    assert (latest.text(), pinned.text()) == ("latest 2", "specific [3, 1]")
    assert latest.selected([3, 1, 2]) == [2, 3] and pinned.selected([1, 2]) == [1]
    assert latest.candidates([1, 3, 2]) == [3, 2, 1] and pinned.candidates([1, 2, 3]) == [3, 1]
    with pytest.raises(ValidationError):
        VersionPolicy(specific=[])  # pinned to nothing: a mistake, not a policy


def test_shared_config_is_the_service_config_less_its_models() -> None:
    """The app's args carry SharedConfig: it must stay ServiceConfig's sections, field for
    field, or a section would silently not reach the deployments."""
    from mpsserve.config import ServiceConfig, SharedConfig

    service = ServiceConfig.model_fields
    shared = SharedConfig.model_fields
    assert set(service) - {"models"} == set(shared)
    for name, field in shared.items():
        assert field.annotation == service[name].annotation, name
