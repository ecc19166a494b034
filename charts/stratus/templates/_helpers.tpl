{{/* Names, labels and images shared by every template. */}}

{{- define "stratus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The object name prefix: the release name, plus the chart name when the release name lacks it. */}}
{{- define "stratus.fullname" -}}
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

{{- define "stratus.operatorName" -}}
{{- printf "%s-operator" (include "stratus.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stratus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stratus.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades, so never the version. */}}
{{- define "stratus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stratus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object; kustomize's deploy/ carries the same minus the Helm-only ones. */}}
{{- define "stratus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "stratus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: stratus
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* repository:tag, repository:tag@digest, or repository@digest when the tag is only "@sha256:..." */}}
{{- define "stratus.image" -}}
{{- $tag := default .appVersion .tag }}
{{- if hasPrefix "@" $tag }}
{{- printf "%s%s" .repository $tag }}
{{- else }}
{{- printf "%s:%s" .repository $tag }}
{{- end }}
{{- end }}

{{- define "stratus.operatorImage" -}}
{{- include "stratus.image" (merge (dict "appVersion" .Chart.AppVersion) .Values.images.operator) }}
{{- end }}

{{- define "stratus.workersImage" -}}
{{- include "stratus.image" (merge (dict "appVersion" .Chart.AppVersion) .Values.images.workers) }}
{{- end }}

{{/* A tier's server image: [root, {repository, tag}]; empty repository: "" (the operator uses the workers image). */}}
{{- define "stratus.tierImage" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- if $image.repository }}
{{- include "stratus.image" (merge (dict "appVersion" $root.Chart.AppVersion) $image) }}
{{- end }}
{{- end }}

{{/* Namespaces that get the model-server NetworkPolicy. */}}
{{- define "stratus.networkPolicyNamespaces" -}}
{{- $ns := .Values.networkPolicy.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $ns) }}
{{- end }}

{{/* Pod selectors for the labels the planner's pods carry (stratus_operator.render); see networkpolicy.yaml. */}}
{{- define "stratus.serverSelector" -}}
matchLabels:
  app.kubernetes.io/managed-by: stratus-operator
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values: [cloud-server, edge-server]
{{- end }}

{{- define "stratus.routerSelector" -}}
matchLabels:
  app.kubernetes.io/managed-by: stratus-operator
  app.kubernetes.io/component: router
{{- end }}

{{/*
"true" when watchNamespaces names namespaces exactly, as stratus_operator.config.named_namespaces_only decides
(a test holds the two equal): the operator then turns kopf's discovery off and the chart grants nothing
only discovery needs. Empty (the whole cluster) and patterns give "".
*/}}
{{- define "stratus.namedNamespacesOnly" -}}
{{- $named := gt (len .Values.watchNamespaces) 0 }}
{{- $chars := splitList "" (include "stratus.namespacePatternChars" .) }}
{{- range $ns := .Values.watchNamespaces }}
{{- range $c := $chars }}
{{- if contains $c $ns }}{{ $named = false }}{{ end }}
{{- end }}
{{- end }}
{{- if $named }}true{{ end }}
{{- end }}
