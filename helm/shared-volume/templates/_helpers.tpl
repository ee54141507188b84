{{/* Chart name, truncated to 63 characters (the DNS label limit). */}}
{{- define "shared-volume.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart, truncated to 63 characters. */}}
{{- define "shared-volume.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "shared-volume.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "shared-volume.labels" -}}
helm.sh/chart: {{ include "shared-volume.chart" . }}
{{ include "shared-volume.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mlops-shared-volume
{{- end }}

{{/* Selector labels: name and instance only. */}}
{{- define "shared-volume.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shared-volume.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The one pipeline image. */}}
{{- define "shared-volume.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) }}
{{- end }}

{{/* The name of the Secret holding the Redis password (key: redis-password). */}}
{{- define "shared-volume.redisSecret" -}}
{{- default (printf "%s-redis" (include "shared-volume.fullname" .)) .Values.redis.existingSecret }}
{{- end }}

{{/* The name of the Secret holding the MLflow password (keys: mlflow-password, flask-secret-key). */}}
{{- define "shared-volume.mlflowSecret" -}}
{{- default (printf "%s-mlflow" (include "shared-volume.fullname" .)) .Values.mlflow.auth.existingSecret }}
{{- end }}

{{/* The ConfigMap's data: the MLOPS_* settings every pod reads (the same names as compose.yaml). */}}
{{- define "shared-volume.configData" -}}
MLOPS_SHARED_DIR: /shared
{{- if .Values.redis.cluster.enabled }}
{{- /* an external Redis Cluster: one node's URL; the password stays in the Secret */}}
{{- if not (or .Values.redis.existingSecret .Values.redis.password) }}
{{- fail "redis.cluster: give the cluster's password in redis.existingSecret (key redis-password) or redis.password; a generated one would not match the cluster's" }}
{{- end }}
MLOPS_REDIS_URL: {{ required "redis.cluster.url: name one node of the Redis Cluster (redis://host:port/0)" .Values.redis.cluster.url | quote }}
MLOPS_REDIS_CLUSTER: "true"
{{- else }}
MLOPS_REDIS_URL: {{ printf "redis://%s-redis:6379/0" (include "shared-volume.fullname" .) | quote }}
{{- end }}
MLOPS_REDIS_PASSWORD_FILE: /run/secrets/redis/redis-password
MLFLOW_TRACKING_URI: {{ printf "http://%s-mlflow:%d" (include "shared-volume.fullname" .) (int .Values.mlflow.port) | quote }}
MLFLOW_TRACKING_USERNAME: {{ .Values.mlflow.auth.username | quote }}
MLFLOW_TRACKING_PASSWORD_FILE: /run/secrets/mlflow/mlflow-password
MLFLOW_HTTP_REQUEST_MAX_RETRIES: "3"
MLFLOW_HTTP_REQUEST_TIMEOUT: "60"
MLOPS_ROWS: {{ .Values.pipeline.rows | quote }}
MLOPS_SEED: {{ .Values.pipeline.seed | quote }}
MLOPS_SYNTHETIC_BATCH: {{ .Values.pipeline.syntheticBatch | quote }}
MLOPS_SYNTHETIC_DRIFT: {{ .Values.pipeline.syntheticDrift | quote }}
MLOPS_MODEL_NAME: {{ .Values.pipeline.modelName | quote }}
MLOPS_MODEL_ALIAS: {{ .Values.pipeline.modelAlias | quote }}
MLOPS_PROMOTE_TOLERANCE: {{ .Values.pipeline.promoteTolerance | quote }}
MLOPS_WAIT_SECONDS: {{ .Values.pipeline.waitSeconds | quote }}
MLOPS_MODEL_POLL_SECONDS: {{ .Values.pipeline.modelPollSeconds | quote }}
MLOPS_GIT_COMMIT: {{ .Values.pipeline.gitCommit | quote }}
{{- /* empty: the built-in customers (compose leaves it empty the same way) */}}
MLOPS_DATASET: {{ ternary "/etc/mlops/dataset/dataset.yaml" "" (ne .Values.dataset.declaration "") | quote }}
{{- if and .Values.dask.scheduler (ne .Values.sharedVolume.accessMode "ReadWriteMany") }}
{{- fail "dask.scheduler: the Dask workers write beside the stages, so the shared volume must be ReadWriteMany (sharedVolume.accessMode) and mounted at /shared in the workers" }}
{{- end }}
{{- /* empty: no Dask, each stage in its own pod (compose leaves it empty the same way) */}}
MLOPS_DASK_SCHEDULER: {{ .Values.dask.scheduler | quote }}
{{- /* always named, "false" by default (compose names it the same way); on, every pipeline pod
       gets the object store's settings here and its keys as files (shared-volume.volumeMounts) */}}
MLOPS_LAKEHOUSE: {{ ternary "true" "false" (eq (include "shared-volume.lakehouse" .) "true") | quote }}
{{- if include "shared-volume.lakehouse" . }}
{{- include "shared-volume.objectStoreSettings" . }}
{{- end }}
{{- end }}

{{/* "true" when raw data, features and MLflow's artifacts live in the object store, else "". */}}
{{- define "shared-volume.lakehouse" -}}
{{- if .Values.objectStore.lakehouse }}
{{- if not .Values.objectStore.enabled }}
{{- fail "objectStore.lakehouse needs the object store: set objectStore.enabled, objectStore.endpoint and its keys" }}
{{- end -}}
true
{{- end }}
{{- end }}

{{/* The MLOPS_S3_* settings as ConfigMap entries (the lakehouse: every pipeline pod). */}}
{{- define "shared-volume.objectStoreSettings" }}
MLOPS_S3_ENDPOINT: {{ include "shared-volume.objectStoreEndpoint" . | quote }}
MLOPS_S3_BUCKET: {{ .Values.objectStore.bucket | quote }}
MLOPS_S3_PREFIX: {{ .Values.objectStore.prefix | quote }}
MLOPS_S3_REGION: {{ .Values.objectStore.region | quote }}
MLOPS_S3_ACCESS_KEY_FILE: /run/secrets/s3/access_key
MLOPS_S3_SECRET_KEY_FILE: /run/secrets/s3/secret_key
{{- end }}

{{/* Where the MLflow server keeps artifacts with the lakehouse: s3://<bucket>/<prefix>lakehouse/mlflow
     (the settings' lakehouse_uri, pipeline/settings.py). */}}
{{- define "shared-volume.lakehouseArtifacts" -}}
{{- $parts := list .Values.objectStore.bucket }}
{{- with trimAll "/" .Values.objectStore.prefix }}{{ $parts = append $parts . }}{{ end }}
{{- printf "s3://%s/lakehouse/mlflow" (join "/" $parts) }}
{{- end }}

{{/* The rollout id: changes when the settings or the image change, never at random.
     Jobs are named after it, so an upgrade creates new Jobs instead of patching immutable
     ones (helm#7725), and stages wait only for upstream records of the same rollout. */}}
{{- define "shared-volume.runId" -}}
{{- printf "%s|%s|%s" (include "shared-volume.configData" .) (include "shared-volume.image" .) .Values.dataset.declaration | sha256sum | trunc 10 }}
{{- end }}

{{/* Container security context: the Pod Security Standards "restricted" profile. */}}
{{- define "shared-volume.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Volumes of a pipeline pod: the shared volume, a writable /tmp, the Redis and MLflow passwords, the
     data set, and the object store's keys (with the lakehouse, or "objectStore" true): the serve
     identity's (Read, List) with "identity" "serve", the identity that writes otherwise.
     Call with (dict "ctx" $ ["identity" "serve"] ["objectStore" true]). */}}
{{- define "shared-volume.volumes" -}}
{{- $identity := default "backup" .identity }}
{{- $objectStore := .objectStore }}
{{- with .ctx }}
- name: shared
{{- if .Values.sharedVolume.useHostPath }}
  hostPath:
    path: {{ .Values.sharedVolume.hostPath }}
    # Directory, not DirectoryOrCreate: a created folder is root:root 0755, which the pods
    # (uid 10001; fsGroup does not apply to hostPath) cannot write. Missing: the pod says so at once.
    type: Directory
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "shared-volume.claimName" . }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
- name: redis-password
  secret:
    secretName: {{ include "shared-volume.redisSecret" . }}
    defaultMode: 0440
- name: mlflow-password
  secret:
    secretName: {{ include "shared-volume.mlflowSecret" . }}
    defaultMode: 0440
{{- if .Values.dataset.declaration }}
- name: dataset
  configMap:
    name: {{ include "shared-volume.fullname" . }}-dataset
{{- end }}
{{- if or $objectStore (include "shared-volume.lakehouse" .) }}
- name: s3-keys
  secret:
    secretName: {{ ternary (include "shared-volume.objectStoreServeSecret" .) (include "shared-volume.objectStoreSecret" .) (eq $identity "serve") }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}

{{/* The shared volume's claim: the chart's own, or sharedVolume.existingClaim. */}}
{{- define "shared-volume.claimName" -}}
{{- default (printf "%s-shared" (include "shared-volume.fullname" .)) .Values.sharedVolume.existingClaim }}
{{- end }}

{{/* Every pod that mounts the shared volume carries this label. */}}
{{- define "shared-volume.sharesVolumeLabel" -}}
mlops/shared-volume: {{ .Release.Name | quote }}
{{- end }}

{{/* A ReadWriteOnce volume (or a node folder) is on one node: keep every pod that mounts it
     there. The first such pod matches its own term, so it may go anywhere. */}}
{{- define "shared-volume.affinity" -}}
{{- if or .Values.sharedVolume.useHostPath (ne .Values.sharedVolume.accessMode "ReadWriteMany") }}
affinity:
  podAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "shared-volume.sharesVolumeLabel" . | nindent 12 }}
{{- end }}
{{- end }}

{{- define "shared-volume.volumeMounts" -}}
- name: shared
  mountPath: /shared
- name: tmp
  mountPath: /tmp
- name: redis-password
  mountPath: /run/secrets/redis
  readOnly: true
- name: mlflow-password
  mountPath: /run/secrets/mlflow
  readOnly: true
{{- if .Values.dataset.declaration }}
- name: dataset
  mountPath: /etc/mlops/dataset
  readOnly: true
{{- end }}
{{- if include "shared-volume.lakehouse" . }}
- name: s3-keys
  mountPath: /run/secrets/s3
  readOnly: true
{{- end }}
{{- end }}

{{/* The image's entrypoint: Kubernetes' `command` replaces the image's ENTRYPOINT, so it is
     named first (it turns the *_FILE secrets into the variables MLflow reads, then execs). */}}
{{- define "shared-volume.entrypoint" -}}
/usr/local/bin/mlops-entrypoint
{{- end }}

{{/* A pipeline container's environment: the ConfigMap, plus the rollout id. */}}
{{- define "shared-volume.pipelineEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "shared-volume.fullname" . }}-config
env:
  - name: MLOPS_RUN_ID
    value: {{ include "shared-volume.runId" . | quote }}
{{- end }}

{{/* One stage Job. Call with (dict "ctx" $ "stage" "ingest" "wave" 1). */}}
{{- define "shared-volume.jobSpec" -}}
{{- $ := .ctx -}}
backoffLimit: {{ $.Values.jobs.backoffLimit }}
activeDeadlineSeconds: {{ $.Values.jobs.activeDeadlineSeconds }}
template:
  metadata:
    labels:
      {{- include "shared-volume.selectorLabels" $ | nindent 6 }}
      app.kubernetes.io/component: {{ .stage }}
      mlops/role: stage
      {{- include "shared-volume.sharesVolumeLabel" $ | nindent 6 }}
  spec:
    restartPolicy: Never
    {{- include "shared-volume.affinity" $ | nindent 4 }}
    automountServiceAccountToken: false
    {{- with $.Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- toYaml $.Values.podSecurityContext | nindent 6 }}
    containers:
      - name: {{ .stage }}
        image: {{ include "shared-volume.image" $ | quote }}
        imagePullPolicy: {{ $.Values.image.pullPolicy }}
        command: [{{ include "shared-volume.entrypoint" $ | quote }}, "python", "-m", "pipeline", {{ .stage | quote }}]
        {{- include "shared-volume.pipelineEnv" $ | nindent 8 }}
          {{- if .objectStore }}
          {{- include "shared-volume.objectStoreEnv" $ | nindent 10 }}
          {{- end }}
        securityContext:
          {{- include "shared-volume.containerSecurityContext" $ | nindent 10 }}
        resources:
          {{- toYaml (index $.Values.jobs .stage).resources | nindent 10 }}
        volumeMounts:
          {{- include "shared-volume.volumeMounts" $ | nindent 10 }}
          {{- if and .objectStore (not (include "shared-volume.lakehouse" $)) }}
          - name: s3-keys
            mountPath: /run/secrets/s3
            readOnly: true
          {{- end }}
    volumes:
      {{- include "shared-volume.volumes" (dict "ctx" $ "objectStore" .objectStore "identity" (include "shared-volume.s3Identity" .stage)) | nindent 6 }}
{{- end }}

{{/* One scheduled run of a pipeline command (monitor, retrain, backup): the stage Jobs' pod
     spec, under a CronJob that never runs two at once (the pipeline lock would serialize them
     anyway; Forbid keeps a slow run from piling up waiting pods). Call with
     (dict "ctx" $ "stage" "retrain" "schedule" "0 3 * * 0" ["objectStore" true]). */}}
{{- define "shared-volume.cronJob" -}}
{{- $ := .ctx -}}
apiVersion: batch/v1
kind: CronJob
metadata:
  name: {{ printf "%s-%s" (include "shared-volume.fullname" $ | trunc 40 | trimSuffix "-") .stage }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "shared-volume.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ .stage }}
    mlops/role: scheduled
  annotations:
    # After the stage Jobs and the server: the first scheduled run finds their records.
    argocd.argoproj.io/sync-wave: "7"
spec:
  schedule: {{ .schedule | quote }}
  concurrencyPolicy: Forbid
  startingDeadlineSeconds: 600
  successfulJobsHistoryLimit: 3
  failedJobsHistoryLimit: 3
  jobTemplate:
    metadata:
      labels:
        {{- include "shared-volume.labels" $ | nindent 8 }}
        app.kubernetes.io/component: {{ .stage }}
        mlops/role: scheduled
    spec:
      {{- include "shared-volume.jobSpec" . | nindent 6 }}
{{- end }}

{{/* The name of the Secret holding the keys of the object store's identity that writes
     (keys: access_key, secret_key). */}}
{{- define "shared-volume.objectStoreSecret" -}}
{{- default (printf "%s-objectstore" (include "shared-volume.fullname" .)) .Values.objectStore.existingSecret }}
{{- end }}

{{/* Which of the object store's identities a pod takes, by component: serve and the monitor only read
     the bucket (the monitor's MLflow run goes through the tracking server), so they take the read-only
     serve identity, as in compose.lakehouse.yaml; every other pod the identity that writes. */}}
{{- define "shared-volume.s3Identity" -}}
{{- ternary "serve" "backup" (has . (list "serve" "monitor")) }}
{{- end }}

{{/* The name of the Secret holding the read-only serve identity's keys (keys: access_key, secret_key). */}}
{{- define "shared-volume.objectStoreServeSecret" -}}
{{- default (printf "%s-objectstore-serve" (include "shared-volume.fullname" .)) .Values.objectStore.serve.existingSecret }}
{{- end }}

{{/* The object store's S3 endpoint: the bundled SeaweedFS's Service, or objectStore.endpoint. */}}
{{- define "shared-volume.objectStoreEndpoint" -}}
{{- if .Values.objectStore.bundled.enabled }}
{{- if .Values.objectStore.endpoint }}
{{- fail "objectStore.bundled.enabled and objectStore.endpoint: the bundled SeaweedFS is the endpoint; leave objectStore.endpoint empty, or turn objectStore.bundled.enabled off to use the external store" }}
{{- end }}
{{- printf "http://%s:%d" (include "shared-volume.seaweedfsName" .) (int .Values.objectStore.bundled.port) }}
{{- else }}
{{- required "objectStore.endpoint is required with objectStore.enabled: the S3 endpoint URL (https://s3.eu-west-1.amazonaws.com, http://minio:9000), or objectStore.bundled.enabled for a store in the release" .Values.objectStore.endpoint }}
{{- end }}
{{- end }}

{{/* The bundled SeaweedFS's StatefulSet and Service. */}}
{{- define "shared-volume.seaweedfsName" -}}
{{- printf "%s-seaweedfs" (include "shared-volume.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{/* The data of a Secret holding one identity's keys (access_key, secret_key): from values, or, for
     the bundled store (which knows whatever keys it is given), generated once and kept on upgrades
     (lookup; under Argo CD, which has no lookup, give an existing Secret instead). An external
     store's keys cannot be generated: the store must know them.
     Call with (dict "ctx" $ "name" SECRET "role" "backup" "keys" .Values.objectStore "path" "objectStore"
     ["why" " is required with ...: what for"]). */}}
{{- define "shared-volume.s3KeysData" -}}
{{- $ := .ctx }}
{{- $access := .keys.accessKey }}
{{- $secret := .keys.secretKey }}
{{- if and $.Values.objectStore.bundled.enabled (not $access) (not $secret) }}
{{- $existing := lookup "v1" "Secret" $.Release.Namespace .name }}
{{- if and $existing $existing.data }}
{{- $access = index $existing.data "access_key" | b64dec }}
{{- $secret = index $existing.data "secret_key" | b64dec }}
{{- else }}
{{- $access = printf "%s-%s" .role (randAlphaNum 16 | lower) }}
{{- $secret = randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- $why := default " is required with objectStore.enabled" .why }}
access_key: {{ required (printf "%s.accessKey (or %s.existingSecret)%s" .path .path $why) $access | b64enc | quote }}
secret_key: {{ required (printf "%s.secretKey (or %s.existingSecret)%s" .path .path $why) $secret | b64enc | quote }}
{{- end }}

{{/* The MLOPS_S3_* settings of a pod that talks to the object store (keys as files). */}}
{{- define "shared-volume.objectStoreEnv" -}}
- name: MLOPS_S3_ENDPOINT
  value: {{ include "shared-volume.objectStoreEndpoint" . | quote }}
- name: MLOPS_S3_BUCKET
  value: {{ .Values.objectStore.bucket | quote }}
- name: MLOPS_S3_PREFIX
  value: {{ .Values.objectStore.prefix | quote }}
- name: MLOPS_S3_REGION
  value: {{ .Values.objectStore.region | quote }}
- name: MLOPS_S3_ACCESS_KEY_FILE
  value: /run/secrets/s3/access_key
- name: MLOPS_S3_SECRET_KEY_FILE
  value: /run/secrets/s3/secret_key
- name: MLOPS_BACKUP_KEEP
  value: {{ .Values.backup.keep | quote }}
{{- end }}

{{/* A stage Job's name: the stage and a hash of its own spec. Call with (dict "ctx" $ "stage" "train"). */}}
{{- define "shared-volume.jobName" -}}
{{- $spec := include "shared-volume.jobSpec" . -}}
{{- printf "%s-%s-%s" (include "shared-volume.fullname" .ctx | trunc 40 | trimSuffix "-") .stage ($spec | sha256sum | trunc 8) }}
{{- end }}

{{- define "shared-volume.job" -}}
{{- $ := .ctx -}}
{{- $spec := include "shared-volume.jobSpec" . -}}
apiVersion: batch/v1
kind: Job
metadata:
  # Named after the stage and a hash of its own spec: stable across syncs, new when the
  # spec changes, so `helm upgrade` never patches an immutable Job template (helm#7725).
  name: {{ include "shared-volume.jobName" . }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "shared-volume.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ .stage }}
    mlops/role: stage
  annotations:
    # Argo CD runs the stages in order, each after the previous one completed.
    argocd.argoproj.io/sync-wave: {{ .wave | quote }}
spec:
  {{- $spec | nindent 2 }}
{{- end }}
