"""Argo CD: the root app and the children it renders, valid against the CRD
schemas, with the resources finalizer, automated prune and self-heal, and
CreateNamespace=true; pointing at folders that exist in this repository."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from tests.deploy.chart import ARGO, ROOT, SCHEMAS, render

APPLICATION_SCHEMA = json.loads((SCHEMAS / "argoproj.io" / "application_v1alpha1.json").read_text())


@pytest.fixture(scope="module")
def root():
    return yaml.safe_load((ARGO / "application.yaml").read_text())


@pytest.fixture(scope="module")
def children(root):
    values = root["spec"]["source"]["helm"]["valuesObject"]
    return render(ARGO / "apps", values, release="mlops-root", namespace="argocd")


def test_root_and_children_are_valid_applications(root, children):
    assert children, "the root app renders no child"
    for app in [root, *children]:
        jsonschema.validate(app, APPLICATION_SCHEMA)
        assert app["kind"] == "Application" and app["metadata"]["namespace"] == "argocd"
        assert "resources-finalizer.argocd.argoproj.io" in app["metadata"]["finalizers"]
        assert app["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}


def test_root_renders_the_children_from_argo_apps(root):
    assert root["spec"]["source"]["path"] == "argo/apps"
    assert (ROOT / root["spec"]["source"]["path"] / "Chart.yaml").is_file()


def test_children_deploy_the_chart_into_mlops(root, children):
    repo = root["spec"]["source"]["repoURL"]
    for app in children:
        src = app["spec"]["source"]
        assert src["repoURL"] == repo  # one documented value sets both
        assert app["spec"]["destination"]["namespace"] == "mlops"
        assert "CreateNamespace=true" in app["spec"]["syncPolicy"]["syncOptions"]
        chart = ROOT / src["path"]
        assert (chart / "Chart.yaml").is_file()
        for name in src["helm"]["valueFiles"]:
            assert (chart / name).is_file(), name


def test_the_argocd_values_render_a_valid_release(children):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    from tests.deploy.chart import CHART, by_kind, values_file

    app = children[0]
    values = {}
    for name in app["spec"]["source"]["helm"]["valueFiles"]:
        values.update(values_file(name))
    objects = render(CHART, values, release=app["spec"]["source"]["helm"]["releaseName"])
    assert by_kind(objects, "Secret") == []  # under Argo CD the password lives outside Git
    for obj in objects:
        kubernetes_validate.validate(obj, latest_version(), strict=True)


def test_a_nox_session_can_set_the_repository_url():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from minikube import root_application

    app = yaml.safe_load(root_application("https://git.example/me/fork.git", "v1"))
    assert app["spec"]["source"]["repoURL"] == "https://git.example/me/fork.git"
    assert app["spec"]["source"]["helm"]["valuesObject"]["repoURL"] == "https://git.example/me/fork.git"
    assert app["spec"]["source"]["targetRevision"] == "v1"
    jsonschema.validate(app, APPLICATION_SCHEMA)
