"""compose.yaml and the Helm chart held to the one declaration of the pipeline
(pipeline/dag.py): a stage declared there without its compose service or its
Job, or ordered differently, fails here with the name of what is missing."""

from __future__ import annotations

import pytest
import yaml

from pipeline.dag import PIPELINE, STAGE_NAMES, StageSpec, check
from tests.conftest import ROOT
from tests.deploy.chart import by_kind, render


def upstream_closure(graph: dict[str, set[str]], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(name, ()))
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(graph.get(current, ()))
    return seen


def test_the_declaration_is_a_dag_in_its_own_order():
    check()
    with pytest.raises(ValueError, match="'b' needs \\['c'\\]"):
        check((StageSpec("a", ""), StageSpec("b", "", needs=("c",)), StageSpec("c", "")))


def test_each_stage_lives_in_the_module_of_its_name():
    import importlib

    for stage in PIPELINE:
        assert callable(importlib.import_module(stage.module).run), stage.module


@pytest.fixture(scope="module")
def compose_services() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def test_compose_has_a_service_per_stage_ordered_by_what_it_needs(compose_services):
    missing = [name for name in STAGE_NAMES if name not in compose_services]
    assert not missing, f"compose.yaml has no service for the declared stage(s) {missing}"
    stage_set = set(STAGE_NAMES)
    graph = {name: set(compose_services[name].get("depends_on", {})) & stage_set for name in STAGE_NAMES}
    for stage in PIPELINE:
        after = upstream_closure(graph, stage.name)
        assert set(stage.needs) <= after, (
            f"compose service {stage.name} does not wait (depends_on) for {sorted(set(stage.needs) - after)}")
        for upstream in graph[stage.name]:
            condition = compose_services[stage.name]["depends_on"][upstream]["condition"]
            assert condition == "service_completed_successfully", (stage.name, upstream)
    served = upstream_closure({**graph, "serve": set(compose_services["serve"]["depends_on"]) & stage_set},
                              "serve")
    assert served == stage_set, f"compose service serve starts before {sorted(stage_set - served)}"


@pytest.mark.parametrize("values", [{}, {"sharedVolume": {"useHostPath": True}}], ids=["pvc", "hostPath"])
def test_the_chart_has_a_job_per_stage_in_sync_waves_after_what_it_needs(values):
    objects = render(values=values)
    jobs = {j["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: j
            for j in by_kind(objects, "Job")}
    missing = [name for name in STAGE_NAMES if name not in jobs]
    assert not missing, f"the chart renders no Job for the declared stage(s) {missing}"
    extra = sorted(set(jobs) - set(STAGE_NAMES))
    assert not extra, f"the chart renders Jobs for {extra}, which pipeline/dag.py does not declare"
    wave = {name: int(job["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
            for name, job in jobs.items()}
    for stage in PIPELINE:
        command = jobs[stage.name]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[-1] == stage.name, (stage.name, command)
        early = [n for n in stage.needs if wave[n] >= wave[stage.name]]
        assert not early, f"Job {stage.name} is in sync wave {wave[stage.name]}, not after {early}"
    serve = next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-serve"))
    assert int(serve["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) > max(wave.values())
