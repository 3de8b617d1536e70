{{/* Names and labels shared by every template of the chart. */}}

{{- /* At most 44 characters: names add suffixes to it ("-metrics" for a Service,
at most 63; "-nats" for a StatefulSet, whose pods' controller-revision-hash label
adds 11 more and must stay within 63). */ -}}
{{- define "relayrl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 44 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 44 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 44 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "relayrl.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* The operator's own pods and Service: apart from the chart's NATS pods. */ -}}
{{- define "relayrl.operatorSelectorLabels" -}}
{{ include "relayrl.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "relayrl.labels" -}}
{{ include "relayrl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: relayrl-fleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{- range $key, $_ := . }}
{{- if or (hasPrefix "app.kubernetes.io/" $key) (eq $key "helm.sh/chart") }}
{{- fail (printf "commonLabels.%s: expected a label the chart does not set itself (app.kubernetes.io/* and helm.sh/chart are the chart's)" $key) }}
{{- end }}
{{- if or (hasKey $.Values.monitoring.labels $key) (eq $key $.Values.monitoring.dashboardLabel) }}
{{- fail (printf "commonLabels.%s: expected a label not also set by monitoring.labels or monitoring.dashboardLabel (an object would carry it twice)" $key) }}
{{- end }}
{{- end }}
{{ toYaml . }}
{{- end }}
{{- range $key, $_ := .Values.monitoring.labels }}
{{- if or (hasPrefix "app.kubernetes.io/" $key) (eq $key "helm.sh/chart") }}
{{- fail (printf "monitoring.labels.%s: expected a label the chart does not set itself (app.kubernetes.io/* and helm.sh/chart are the chart's)" $key) }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "relayrl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "relayrl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
