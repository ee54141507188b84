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

{{/* The ConfigMap's data: the MLOPS_* settings every pod reads (the same names as compose.yaml). */}}
{{- define "shared-volume.configData" -}}
MLOPS_SHARED_DIR: /shared
MLOPS_REDIS_URL: {{ printf "redis://%s-redis:6379/0" (include "shared-volume.fullname" .) | quote }}
MLOPS_REDIS_PASSWORD_FILE: /run/secrets/redis/redis-password
MLFLOW_TRACKING_URI: {{ printf "http://%s-mlflow:%d" (include "shared-volume.fullname" .) (int .Values.mlflow.port) | quote }}
MLFLOW_HTTP_REQUEST_MAX_RETRIES: "3"
MLFLOW_HTTP_REQUEST_TIMEOUT: "60"
MLOPS_ROWS: {{ .Values.pipeline.rows | quote }}
MLOPS_SEED: {{ .Values.pipeline.seed | quote }}
MLOPS_MODEL_NAME: {{ .Values.pipeline.modelName | quote }}
MLOPS_MODEL_ALIAS: {{ .Values.pipeline.modelAlias | quote }}
MLOPS_PROMOTE_TOLERANCE: {{ .Values.pipeline.promoteTolerance | quote }}
MLOPS_WAIT_SECONDS: {{ .Values.pipeline.waitSeconds | quote }}
MLOPS_MODEL_POLL_SECONDS: {{ .Values.pipeline.modelPollSeconds | quote }}
MLOPS_GIT_COMMIT: {{ .Values.pipeline.gitCommit | quote }}
{{- end }}

{{/* The rollout id: changes when the settings or the image change, never at random.
     Jobs are named after it, so an upgrade creates new Jobs instead of patching immutable
     ones (helm#7725), and stages wait only for upstream records of the same rollout. */}}
{{- define "shared-volume.runId" -}}
{{- printf "%s|%s" (include "shared-volume.configData" .) (include "shared-volume.image" .) | sha256sum | trunc 10 }}
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

{{/* Volumes of a pipeline pod: the shared volume, a writable /tmp, the Redis password. */}}
{{- define "shared-volume.volumes" -}}
- name: shared
{{- if .Values.sharedVolume.useHostPath }}
  hostPath:
    path: {{ .Values.sharedVolume.hostPath }}
    type: DirectoryOrCreate
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "shared-volume.fullname" . }}-shared
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
- name: redis-password
  secret:
    secretName: {{ include "shared-volume.redisSecret" . }}
    defaultMode: 0440
{{- end }}

{{- define "shared-volume.volumeMounts" -}}
- name: shared
  mountPath: /shared
- name: tmp
  mountPath: /tmp
- name: redis-password
  mountPath: /run/secrets/redis
  readOnly: true
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
  spec:
    restartPolicy: Never
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
        command: ["python", "-m", "pipeline", {{ .stage | quote }}]
        {{- include "shared-volume.pipelineEnv" $ | nindent 8 }}
        securityContext:
          {{- include "shared-volume.containerSecurityContext" $ | nindent 10 }}
        resources:
          {{- toYaml (index $.Values.jobs .stage).resources | nindent 10 }}
        volumeMounts:
          {{- include "shared-volume.volumeMounts" $ | nindent 10 }}
    volumes:
      {{- include "shared-volume.volumes" $ | nindent 6 }}
{{- end }}

{{- define "shared-volume.job" -}}
{{- $ := .ctx -}}
{{- $spec := include "shared-volume.jobSpec" . -}}
apiVersion: batch/v1
kind: Job
metadata:
  # Named after the stage and a hash of its own spec: stable across syncs, new when the
  # spec changes, so `helm upgrade` never patches an immutable Job template (helm#7725).
  name: {{ printf "%s-%s-%s" (include "shared-volume.fullname" $ | trunc 40 | trimSuffix "-") .stage ($spec | sha256sum | trunc 8) }}
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
