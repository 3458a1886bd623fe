{{/* Chart name, overridable. */}}
{{- define "dbgov.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "dbgov.fullname" -}}
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

{{- define "dbgov.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dbgov.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels for objects that belong to the release but not to the operator (CRDs). */}}
{{- define "dbgov.baseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "dbgov.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dbgov
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dbgov.labels" -}}
{{ include "dbgov.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "dbgov.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dbgov.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository[:tag|@digest] with the tag defaulting to the chart's appVersion. */}}
{{- define "dbgov.image" -}}
{{- $img := index . 0 }}{{- $chart := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{- define "dbgov.webhookServiceName" -}}
{{- printf "%s-webhook" (include "dbgov.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dbgov.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "dbgov.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* kopf peering name: operator.peering when it is a string ("" runs standalone), else (null,
the default) named after the release. */}}
{{- define "dbgov.peering" -}}
{{- if kindIs "string" .Values.operator.peering }}
{{- .Values.operator.peering }}
{{- else }}
{{- include "dbgov.fullname" . }}
{{- end }}
{{- end }}
