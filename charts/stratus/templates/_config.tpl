{{/*
The operator's STRATUS_* environment: one variable per field of stratus_operator.config.Config
(tests/unit/deploy/test_chart_operator_config.py checks the names against Config).
*/}}
{{- define "stratus.operatorEnv" -}}
- name: STRATUS_NAMESPACES
  value: {{ join "," .Values.watchNamespaces | quote }}
- name: STRATUS_IMAGE
  value: {{ include "stratus.workersImage" . | quote }}
- name: STRATUS_CLOUD_IMAGE
  value: {{ include "stratus.tierImage" (list . .Values.images.cloud) | quote }}
- name: STRATUS_EDGE_IMAGE
  value: {{ include "stratus.tierImage" (list . .Values.images.edge) | quote }}
- name: STRATUS_IMAGE_PULL_POLICY
  value: {{ .Values.images.workers.pullPolicy | quote }}
- name: STRATUS_IMAGE_PULL_SECRETS
  value: {{ join "," .Values.workloads.imagePullSecrets | quote }}
- name: STRATUS_SERVICE_ACCOUNT
  value: {{ .Values.workloads.serviceAccountName | quote }}
- name: STRATUS_S3_IMAGE
  value: {{ printf "%s:%s" .Values.images.s3.repository .Values.images.s3.tag | quote }}
- name: STRATUS_CACHE_HOST_PATH
  value: {{ .Values.modelCache.hostPath | quote }}
- name: STRATUS_JOB_DEADLINE_SECONDS
  value: {{ .Values.compression.jobDeadlineSeconds | quote }}
- name: STRATUS_RESYNC_SECONDS
  value: {{ .Values.resyncSeconds | quote }}
- name: STRATUS_WORKER_LIMIT
  value: {{ .Values.workerLimit | quote }}
- name: STRATUS_HEALTH_PORT
  value: {{ .Values.healthPort | quote }}
- name: STRATUS_METRICS_PORT
  value: {{ ternary .Values.metrics.port 0 .Values.metrics.enabled | quote }}
- name: STRATUS_EDGE_NODE_SELECTOR
  value: {{ toJson .Values.edge.nodeSelector | quote }}
- name: STRATUS_EDGE_TOLERATIONS
  value: {{ toJson .Values.edge.tolerations | quote }}
- name: STRATUS_CLOUD_NODE_SELECTOR
  value: {{ toJson .Values.cloud.nodeSelector | quote }}
- name: STRATUS_CLOUD_TOLERATIONS
  value: {{ toJson .Values.cloud.tolerations | quote }}
- name: STRATUS_NETWORK_POLICIES
  value: {{ .Values.networkPolicy.enabled | quote }}
- name: STRATUS_ROUTER_INGRESS_FROM
  value: {{ toJson .Values.networkPolicy.routerFrom | quote }}
- name: STRATUS_GPU_RESOURCE_NAME
  value: {{ .Values.cloud.gpuResourceName | quote }}
{{- end }}

{{/* Process-wide flags of the `stratus` command, given before the subcommand. */}}
{{- define "stratus.operatorCommand" -}}
["stratus", "--log-level", {{ .Values.logLevel | quote }}, "--log-format", {{ .Values.logFormat | quote }}, "operator"]
{{- end }}
