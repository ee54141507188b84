#!/usr/bin/env bash
# Build stand-in base images from Debian packages, for machines that reach no
# container registry (the project's development machines and CI).
#
# Users with a registry do not need this: compose.yaml and the tests default to
# the official images (python:3.11-slim-bookworm, redis:7-bookworm).
#
#   scripts/build_offline_images.sh            # build what is missing
#   FORCE=1 scripts/build_offline_images.sh    # rebuild
#
# The Debian mirror is $MLOPS_DEBIAN_MIRROR, else the one this machine's apt
# already uses for the suite (/etc/apt/sources.list, sources.list.d/*.list or
# *.sources): the build reaches only what apt here reaches.
#
# Images built (names overridable through the environment):
#   $MLOPS_OFFLINE_PYTHON_IMAGE  (default mlops-offline/python:3.11-bookworm)
#       Debian bookworm with python3 (3.11), venv and pip: the base image.
#   $MLOPS_OFFLINE_REDIS_IMAGE   (default mlops-offline/redis:7-bookworm)
#       Debian bookworm with redis-server, started like the official image.
#   $MLOPS_OFFLINE_PROMETHEUS_IMAGE    (default mlops-offline/prometheus:bookworm)
#   $MLOPS_OFFLINE_ALERTMANAGER_IMAGE  (default mlops-offline/alertmanager:bookworm)
#       Debian's prometheus (2.42) and prometheus-alertmanager (0.25) packages, laid
#       out like the official prom/* images so compose.yaml runs either: the binary
#       at /bin/prometheus or /bin/alertmanager (the official ENTRYPOINT), wget for
#       the healthcheck, a /prometheus or /alertmanager data folder owned by nobody.
#
# Only what is missing is built; `time scripts/build_offline_images.sh` reports
# each image's build (about a minute per image from a nearby mirror).
set -euo pipefail

PYTHON_IMAGE=${MLOPS_OFFLINE_PYTHON_IMAGE:-mlops-offline/python:3.11-bookworm}
REDIS_IMAGE=${MLOPS_OFFLINE_REDIS_IMAGE:-mlops-offline/redis:7-bookworm}
PROMETHEUS_IMAGE=${MLOPS_OFFLINE_PROMETHEUS_IMAGE:-mlops-offline/prometheus:bookworm}
ALERTMANAGER_IMAGE=${MLOPS_OFFLINE_ALERTMANAGER_IMAGE:-mlops-offline/alertmanager:bookworm}
SUITE=bookworm

# apt_mirror SUITE: the first URI apt's sources give for exactly SUITE (not
# SUITE-security or -updates), from one-line .list files and deb822 .sources files.
apt_mirror() {
  local suite=$1 files=()
  [ -r /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] && files+=("$f")
  done
  ((${#files[@]})) || return 0
  awk -v suite="$suite" '
    function has(list, word,   n, i, parts) { n = split(list, parts, /[ \t]+/)
      for (i = 1; i <= n; i++) if (parts[i] == word) return 1; return 0 }
    function stanza() { if (!found && types ~ /(^|[ \t])deb([ \t]|$)/ && has(suites, suite) && uri != "") {
        print uri; found = 1; exit }
      types = ""; uri = ""; suites = "" }
    FNR == 1 { stanza() }
    FILENAME ~ /\.sources$/ {
      if ($0 ~ /^[ \t]*$/) { stanza(); next }
      if ($1 == "Types:") { types = $0; sub(/^Types:/, "", types) }
      if ($1 == "URIs:") uri = $2
      if ($1 == "Suites:") { suites = $0; sub(/^Suites:[ \t]*/, "", suites) }
      next }
    $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                  if ($(i + 1) == suite) { print $i; found = 1; exit } }
    END { stanza() }
  ' "${files[@]}"
}
MIRROR=${MLOPS_DEBIAN_MIRROR:-$(apt_mirror "$SUITE")}

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' not found; install it with: $2" >&2; exit 1; }; }
need docker "apt-get install docker.io (and start dockerd)"
need debootstrap "apt-get install debootstrap"
docker info >/dev/null 2>&1 || { echo "error: the Docker engine does not answer; start it (dockerd &) and retry" >&2; exit 1; }
[ -n "$MIRROR" ] || { echo "error: no Debian $SUITE mirror in this machine's apt sources; set MLOPS_DEBIAN_MIRROR to one" >&2; exit 1; }

have_image() { [ -z "${FORCE:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }

# build IMAGE PACKAGES [--setup FUNCTION] CHANGE...: debootstrap a minimal bookworm
# root with PACKAGES, trim it, run FUNCTION ROOT on it (if given), and `docker
# import` it with the given Dockerfile changes.
build() {
  local image=$1 packages=$2 setup=""; shift 2
  if [ "${1:-}" = --setup ]; then setup=$2; shift 2; fi
  if have_image "$image"; then echo "== $image: present"; return; fi
  local root; root=$(mktemp -d /tmp/mlops-rootfs.XXXXXX)
  trap 'rm -rf "$root"' RETURN
  local started=$SECONDS
  echo "== $image: debootstrap $SUITE with $packages"
  debootstrap --variant=minbase --include="$packages" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
  [ -z "$setup" ] || "$setup" "$root"
  rm -f "$root.log"
  local args=()
  for change in "$@"; do args+=(--change "$change"); done
  tar -C "$root" -c . | docker import "${args[@]}" - "$image" >/dev/null
  echo "== $image: built in $((SECONDS - started))s ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
}

build "$PYTHON_IMAGE" "python3,python3-venv,python3-pip,ca-certificates,tini" \
  'ENV LANG=C.UTF-8' 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  'CMD ["python3"]'

# Like the official redis image: listens on 6379 on all interfaces, no
# persistence file in the image, runs redis-server in the foreground.
build "$REDIS_IMAGE" "redis-server,redis-tools" \
  'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  'EXPOSE 6379' 'WORKDIR /data' \
  'CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]'

# Like prom/prometheus and prom/alertmanager: the binary where their ENTRYPOINT names
# it, a data folder nobody (65534, compose's user) owns, so a fresh named volume
# mounted there takes that ownership. No web UI assets beyond what the package
# needs: the API is what compose and the tests use. The Debian packages' own
# service users and configs are left unused (compose mounts monitoring/*).
# (bookworm's /bin is /usr/bin: /bin/prometheus is there already.) The classic UI
# loads one moment-timezone file; the other 200 MB of its package are dropped, and
# the translations of the base system, which neither server reads.
prometheus_layout() {
  [ -e "$1/bin/prometheus" ] || ln -s /usr/bin/prometheus "$1/bin/prometheus"
  rm -rf "$1"/usr/share/locale/*
  find "$1/usr/share/javascript/moment-timezone" -mindepth 1 -maxdepth 1 \
    ! -name moment-timezone-with-data.min.js -exec rm -rf {} +
  install -d -o 65534 -g 65534 "$1/prometheus"
}
alertmanager_layout() {
  [ -e "$1/bin/alertmanager" ] || ln -s prometheus-alertmanager "$1/usr/bin/alertmanager"
  rm -rf "$1"/usr/share/locale/*
  install -d -o 65534 -g 65534 "$1/alertmanager"
}

# The two monitoring images are built side by side (debootstrap waits mostly on the
# mirror and dpkg), each in its own subshell; either failing fails the script.
build "$PROMETHEUS_IMAGE" "prometheus,wget" --setup prometheus_layout \
  'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  'EXPOSE 9090' 'USER 65534' 'WORKDIR /prometheus' \
  'ENTRYPOINT ["/bin/prometheus"]' \
  'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' &
prometheus_build=$!

build "$ALERTMANAGER_IMAGE" "prometheus-alertmanager,wget" --setup alertmanager_layout \
  'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  'EXPOSE 9093' 'USER 65534' 'WORKDIR /alertmanager' \
  'ENTRYPOINT ["/bin/alertmanager"]' \
  'CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]' &
alertmanager_build=$!

failed=0
wait "$prometheus_build" || failed=1
wait "$alertmanager_build" || failed=1
[ "$failed" = 0 ] || { echo "error: an offline monitoring image failed to build (see above)" >&2; exit 1; }
