"""Prometheus and Alertmanager configuration: promtool checks the rules and the
scrape config and runs rules_test.yml (a firing and a quiet case for every rule);
amtool checks the Alertmanager config. Skipped where the tools are missing
(Debian: apt-get install prometheus prometheus-alertmanager), failed on CI."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.support import ROOT

PROM = ROOT / "monitoring" / "prometheus"
ALERTMANAGER = ROOT / "monitoring" / "alertmanager" / "alertmanager.yml"


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing on CI: apt-get install {package}")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=PROM)


def test_promtool_checks_rules_and_config():
    promtool = tool("promtool", "prometheus")
    for argv in (["check", "rules", "rules.yml"], ["check", "config", "prometheus.yml"]):
        proc = run([promtool, *argv])
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass():
    proc = run([tool("promtool", "prometheus"), "test", "rules", "rules_test.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_rule_fires_and_stays_quiet_in_a_test():
    rules = {r["alert"] for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]}
    cases: dict[str, set[str]] = {name: set() for name in rules}
    for test in yaml.safe_load((PROM / "rules_test.yml").read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add("fires" if case["exp_alerts"] else "quiet")
    incomplete = {name: sorted({"fires", "quiet"} - seen) for name, seen in cases.items() if seen != {"fires", "quiet"}}
    assert not incomplete, f"rules_test.yml lacks these cases: {incomplete}"
    assert set(cases) == rules, f"tests name alerts that rules.yml does not have: {set(cases) - rules}"


def test_amtool_checks_alertmanager_config():
    proc = run([tool("amtool", "prometheus-alertmanager"), "check-config", str(ALERTMANAGER)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
