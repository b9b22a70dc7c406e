{{/* Names, labels and small helpers. */}}
{{- define "clara-dicom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "clara-dicom.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "clara-dicom.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object of the release. */}}
{{- define "clara-dicom.labels" -}}
helm.sh/chart: {{ include "clara-dicom.chart" . }}
app.kubernetes.io/name: {{ include "clara-dicom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: clara-dicom
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "adapter") */}}
{{- define "clara-dicom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clara-dicom.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "clara-dicom.componentLabels" -}}
{{ include "clara-dicom.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "clara-dicom.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "clara-dicom.operator.name" -}}{{ include "clara-dicom.fullname" . }}-operator{{- end -}}
{{- define "clara-dicom.adapter.name" -}}{{ include "clara-dicom.fullname" . }}-adapter{{- end -}}
{{- define "clara-dicom.results.name" -}}{{ include "clara-dicom.fullname" . }}-results{{- end -}}

{{- define "clara-dicom.results.secretName" -}}
{{- default (printf "%s-token" (include "clara-dicom.results.name" .)) .Values.resultsService.token.existingSecret -}}
{{- end -}}

{{- define "clara-dicom.results.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "clara-dicom.results.name" .) .Release.Namespace (int .Values.resultsService.port) -}}
{{- end -}}

{{- define "clara-dicom.payloads.claimName" -}}
{{- default (printf "%s-payloads" (include "clara-dicom.fullname" .)) .Values.adapter.persistence.existingClaim -}}
{{- end -}}

{{/* adapter setting name -> environment variable, as clara_adapter.settings.env_name */}}
{{- define "clara-dicom.envName" -}}
{{- printf "CLARA_%s" (regexReplaceAll "([a-z0-9])([A-Z])" . "${1}_${2}" | upper) -}}
{{- end -}}

{{/* Pod-level and container-level security contexts. */}}
{{- define "clara-dicom.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end -}}
{{- define "clara-dicom.securityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end -}}

{{- define "clara-dicom.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Scheduling block of one component's values. */}}
{{- define "clara-dicom.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
{{ toYaml . }}
{{- end }}
{{- with .affinity }}
affinity:
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}

{{/* Replicated components (adapter, results): (dict "ctx" $ "component" "adapter" "v" $v) */}}
{{- define "clara-dicom.strategy" -}}
{{- if gt (int .v.replicas) 1 }}
# Replicas share their database: the new pod is Ready before an old one goes.
type: RollingUpdate
rollingUpdate:
  maxUnavailable: 0
  maxSurge: 1
{{- else }}
# One replica: the old pod gone before the new one starts (SQLite has one writer).
type: Recreate
{{- end }}
{{- end -}}

{{/* Pod anti-affinity by hostname, unless the values give their own affinity. */}}
{{- define "clara-dicom.antiAffinity" -}}
{{- if and (not .v.affinity) (ne .v.podAntiAffinity "none") }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "clara-dicom.selectorLabels" . | fromYaml)) }}
affinity:
  podAntiAffinity:
    {{- if eq .v.podAntiAffinity "required" }}
    requiredDuringSchedulingIgnoredDuringExecution:
      - {{- toYaml $term | nindent 8 }}
    {{- else }}
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          {{- toYaml $term | nindent 10 }}
    {{- end }}
{{- end }}
{{- end -}}

{{- define "clara-dicom.podDisruptionBudget" -}}
{{- if and (gt (int .v.replicas) 1) .v.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ printf "%s-%s" (include "clara-dicom.fullname" .ctx) .component }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "clara-dicom.componentLabels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .v.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "clara-dicom.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}
