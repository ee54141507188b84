"""Settings are declared once (pipeline/settings.py): the docs table is generated
from them, and compose.yaml and the chart set no MLOPS_* name they do not know
(a typo there would silently do nothing)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.settings import Settings, known_variables
from pipeline.settings_doc import configuration_table
from tests.conftest import ROOT
from tests.deploy.chart import by_kind, pod_specs, render


def test_every_setting_is_described_and_the_docs_table_is_generated_from_them():
    assert all(info.description for info in Settings.model_fields.values())
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == configuration_table(), \
        "docs/configuration.md differs from pipeline/settings.py: run `python -m pipeline.settings_doc > " \
        "docs/configuration.md`"


def unknown(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.startswith("MLOPS_") and n not in known_variables())


def test_compose_sets_only_variables_the_settings_know():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        names = set(env) if isinstance(env, dict) else {item.split("=", 1)[0] for item in env}
        assert not unknown(names), f"compose service {name} sets {unknown(names)}, unknown to Settings"


@pytest.mark.parametrize("values", [{}, {"sharedVolume": {"useHostPath": True}}], ids=["pvc", "hostPath"])
def test_the_chart_sets_only_variables_the_settings_know(values):
    objects = render(values=values)
    for config in by_kind(objects, "ConfigMap"):
        assert not unknown(set(config.get("data", {}))), config["metadata"]["name"]
    for name, spec in pod_specs(objects):
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            names = {e["name"] for e in container.get("env", [])}
            assert not unknown(names), f"{name} container {container['name']} sets {unknown(names)}"


def test_a_misspelt_variable_is_caught():
    assert unknown({"MLOPS_REDIS_URL", "MLOPS_REDIS_ULR"}) == ["MLOPS_REDIS_ULR"]
