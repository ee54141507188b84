# One image for every stage of the pipeline, the server and the MLflow tracking server.
#
#   scripts/build_wheelhouse.sh && docker build -t mlops-shared-volume:dev .
#
# Installs from ./wheelhouse (built on the host), so the build needs no network.
# BASE_IMAGE defaults to the official slim Python image; where no registry can be
# reached, scripts/build_offline_images.sh builds a stand-in from Debian packages
# (--build-arg BASE_IMAGE=mlops-offline/python:3.11-bookworm).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS deps
# Dependencies first: this layer changes only when pyproject.toml or constraints.txt does.
COPY wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse \
      -c /wheelhouse/constraints.txt -r /wheelhouse/requirements.txt \
 && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="mlops-shared-volume" \
      org.opencontainers.image.description="DVC, Feast, MLflow and a served model on one shared volume"
ARG UID=10001
# A non-root user owns /shared (granian, PID 1, handles SIGTERM and reaps its workers),
# so a fresh named volume (or PVC with fsGroup) mounted there is writable.
RUN groupadd --gid "${UID}" app \
 && useradd --uid "${UID}" --gid "${UID}" --home-dir /tmp --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /shared /app && chown "${UID}:${UID}" /shared
COPY --from=deps /opt/venv /opt/venv
# Secrets arrive as files (compose secrets, Kubernetes Secret volumes), but MLflow reads its
# password, the auth app's admin password and its CSRF key only from the environment, and
# its S3 artifact store (the lakehouse's tracking server) reads AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY only from there too. The entrypoint sets NAME from NAME_FILE for
# those five (the docker-library `file_env` habit) and execs the command, so nothing secret
# is in argv, in the image or on the volume.
# The auth app's configuration holds no secret: its user store sits beside the tracking store.
# hadolint ignore=SC2016
RUN printf '%s\n' '#!/bin/sh' 'set -eu' \
      'for name in MLFLOW_TRACKING_PASSWORD MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY \' \
      '    AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do' \
      '  file=$(printenv "${name}_FILE" || true)' \
      '  if [ -n "$file" ] && [ -z "$(printenv "$name" || true)" ]; then' \
      '    value=$(cat "$file") || { echo "cannot read ${name}_FILE ($file): mount the secret there" >&2; exit 78; }' \
      '    export "$name=$value"' \
      '  fi' \
      'done' \
      'exec "$@"' > /usr/local/bin/mlops-entrypoint \
 && chmod 0755 /usr/local/bin/mlops-entrypoint \
 && mkdir -p /etc/mlflow \
 && printf '%s\n' '[mlflow]' 'default_permission = READ' \
      'database_uri = sqlite:////shared/mlflow/server/auth.db' \
      'authorization_function = mlflow.server.auth:authenticate_request_basic_auth' \
      > /etc/mlflow/basic_auth.ini
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    DVC_NO_ANALYTICS=1 \
    DVC_SITE_CACHE_DIR=/tmp/dvc \
    FEAST_USAGE=False \
    MLOPS_SHARED_DIR=/shared \
    MLOPS_HOST=0.0.0.0 \
    MLOPS_PORT=8000 \
    MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini
# The code last: a change here rebuilds only this layer.
COPY pipeline/ /app/pipeline/
WORKDIR /app
USER ${UID}:${UID}
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/mlops-entrypoint"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["python", "-m", "pipeline", "serve"]
