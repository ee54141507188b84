"""Render the chart with the real Helm engine (helm-python-sdk bundles Helm v4's library)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "shared-volume"
ARGO = ROOT / "argo"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def values_file(name: str) -> dict:
    return yaml.safe_load((CHART / name).read_text()) or {}


def render(chart: Path = CHART, values: dict | None = None, *, release: str = "mlops",
           namespace: str = "mlops") -> list[dict]:
    """Every object the chart renders, parsed; NOTES.txt left out."""
    import helm_python as helm

    loaded = helm.Chart.load(str(chart))
    merged = loaded.merge_values(values or {})
    loaded.validate_schema(merged)
    manifests = loaded.render(values or {}, name=release, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            specs.append((f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "CronJob":
            specs.append((f"CronJob/{obj['metadata']['name']}",
                          obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]
