{{- define "voxscale.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "voxscale.labels" -}}
app.kubernetes.io/name: voxscale-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "voxscale.serviceAccountName" -}}
{{- default (include "voxscale.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The operator's permissions: exactly the verbs it uses, nothing more. */}}
{{- define "voxscale.watchRules" -}}
# Watch TTSDeployments; kopf keeps its bookkeeping in their annotations (patch).
- apiGroups: ["voxscale.io"]
  resources: ["ttsdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["voxscale.io"]
  resources: ["ttsdeployments/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion, which needs this where the
# OwnerReferencesPermissionEnforcement admission plugin is on.
- apiGroups: ["voxscale.io"]
  resources: ["ttsdeployments/finalizers"]
  verbs: ["update"]
# Children, by server-side apply; replicas through the scale subresource.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["patch"]
# Attached StatefulSets (spec.targetRef): read, and only their replica count written. Another kind
# with a scale subresource needs get on it and get/patch on its /scale, granted by you.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get"]
- apiGroups: ["apps"]
  resources: ["statefulsets/scale"]
  verbs: ["get", "patch"]
# (list, watch: the round reads its children from watches; one deleted by hand is re-applied at the
# next round)
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The inference pods' NetworkPolicy (spec.networkPolicy.enabled); removed when turned off.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The image pre-pull DaemonSet <name>-prepull (spec.prePull.enabled); removed when turned off.
- apiGroups: ["apps"]
  resources: ["daemonsets"]
  verbs: ["get", "list", "create", "patch", "delete"]
# Another autoscaler on our Deployment (an HPA, or KEDA's, which is one) is detected, not fought.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch"]
# Pod start times (creation to Ready): the forecast floor looks ahead by their P90. Patch: the
# pod-deletion-cost annotation, so a scale-down removes idle pods before busy ones.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "patch"]
# Decisions and errors as Events.
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Optional Prometheus credentials (spec.scaling.prometheus.auth).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end -}}
