{{/*
The operator's RBAC rules: stratus_operator.rbac.REQUIRED_RULES, in its order and shape
(tests/unit/deploy/test_deploy_rbac.py fails when they drift). Namespaced resources go into a
Role per watched namespace in namespaced mode; cluster-scoped ones (nodes for placement,
namespaces for kopf) always need a ClusterRole.
*/}}
{{- define "stratus.namespacedRules" -}}
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [create, delete, get, list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, get, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [stratus.dev]
  resources: [llmdeployments]
  verbs: [get, list, patch, watch]
- apiGroups: [stratus.dev]
  resources: [llmdeployments/finalizers]
  verbs: [update]
- apiGroups: [stratus.dev]
  resources: [llmdeployments/status]
  verbs: [get, patch]
{{- end }}

{{- define "stratus.clusterRules" -}}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
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
