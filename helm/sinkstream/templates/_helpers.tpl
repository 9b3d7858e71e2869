{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "sinkstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sinkstream.fullname" -}}
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

{{- define "sinkstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sinkstream.labels" -}}
helm.sh/chart: {{ include "sinkstream.chart" . }}
{{ include "sinkstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sinkstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sinkstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "sinkstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sinkstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sinkstream.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Worker settings as environment variables: config.<section>.<field> becomes
SINKSTREAM_<SECTION>__<FIELD>. null fields are left out so the worker's default applies;
a {secretKeyRef: {name, key}} value reads an existing Secret.
*/}}
{{- define "sinkstream.configEnv" -}}
{{- range $section, $fields := .Values.config }}
{{- range $field, $value := $fields }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ printf "SINKSTREAM_%s__%s" (upper $section) (upper $field) }}
{{- if and (kindIs "map" $value) (hasKey $value "secretKeyRef") }}
  valueFrom:
    secretKeyRef:
      name: {{ $value.secretKeyRef.name | quote }}
      key: {{ $value.secretKeyRef.key | quote }}
{{- else if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
  {{- /* YAML numbers arrive as float64, and toString writes 3600000 as 3.6e+06. */}}
  value: {{ int64 $value | toString | quote }}
{{- else }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Kafka settings only, for the topics Job. */}}
{{- define "sinkstream.kafkaEnv" -}}
{{- $only := dict "Values" (dict "config" (dict "kafka" .Values.config.kafka)) }}
{{- include "sinkstream.configEnv" $only }}
{{- end }}

{{/* terminationGracePeriodSeconds: the worker's shutdown grace plus a margin. */}}
{{- define "sinkstream.terminationGrace" -}}
{{- $grace := .Values.config.stage.shutdown_grace_s | default 30 }}
{{- add (ceil (float64 $grace) | int) .Values.terminationGraceMarginSeconds }}
{{- end }}

{{- define "sinkstream.metricsPort" -}}
{{- .Values.config.metrics.port | default 9400 | int }}
{{- end }}
