"""Render helm/shared-volume with the real Helm engine into plain manifests.

    python scripts/render_chart.py OUT_DIR [values.yaml ...]

One file per values set: default.yaml, and one per extra values file. Used by
`nox -s helm_check` for kubernetes-validate and checkov, which read files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "shared-volume"
# Every optional object on: the monitor, the policies, a data set, the autoscaler and (with
# more than one server pod) the disruption budget.
EVERYTHING = {
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "dataset": {"declaration": "name: housing\nsource:\n  path: /shared/incoming/housing.csv\n"
                               "entity:\n  column: house_id\ntarget: price\nfeatures: [rooms, area]\n"},
    "serve": {"autoscaling": {"enabled": True, "minReplicas": 2}},
}


def render(values: dict) -> str:
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(chart.merge_values(values))
    manifests = chart.render(values, name="mlops", namespace="mlops", is_install=True)
    return "".join(f"---\n# Source: {path}\n{text}\n" for path, text in sorted(manifests.items())
                   if not path.endswith("NOTES.txt") and text.strip())


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    sets = {"default": {}, "everything": EVERYTHING}
    for extra in argv[1:]:
        sets[Path(extra).stem] = yaml.safe_load(Path(extra).read_text()) or {}
    for name, values in sets.items():
        (out / f"{name}.yaml").write_text(render(values))
        print(f"rendered {out / name}.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
