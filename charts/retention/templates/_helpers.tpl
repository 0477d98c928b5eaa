{{/* Names, labels and the merged settings of a service. */}}

{{- define "retention.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<service> */}}
{{- define "retention.name" -}}
{{- printf "%s-%s" (include "retention.fullname" .root) .service | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "retention.labels" -}}
app.kubernetes.io/name: {{ .service }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/part-of: retention
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* Every pod of a service: its server pods and its migration Job's. */}}
{{- define "retention.servicePods" -}}
app.kubernetes.io/name: {{ .service }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* The server pods of a service (Service, PDB, spread): never the migration Job's. */}}
{{- define "retention.selector" -}}
{{ include "retention.servicePods" . }}
app.kubernetes.io/component: server
{{- end -}}

{{/* The settings of a service: `defaults` deep-merged under its own block. */}}
{{- define "retention.settings" -}}
{{- $own := deepCopy (index .root.Values.services .service) -}}
{{- $defaults := deepCopy .root.Values.defaults -}}
{{- toYaml (mergeOverwrite $defaults $own) -}}
{{- end -}}

{{- define "retention.image" -}}
{{- $img := .root.Values.image -}}
{{- $tag := default .root.Chart.AppVersion $img.tag -}}
{{- if $img.registry -}}
{{- printf "%s/%s-%s:%s" $img.registry $img.repository .service $tag -}}
{{- else -}}
{{- printf "%s-%s:%s" $img.repository .service $tag -}}
{{- end -}}
{{- end -}}

{{- define "retention.secretName" -}}
{{- printf "%s-secrets" (include "retention.fullname" .) -}}
{{- end -}}

{{/* The URL of another service's gRPC port inside the cluster. */}}
{{- define "retention.url" -}}
{{- $svc := index .root.Values.services .to -}}
{{- printf "http://%s:%v" (include "retention.name" (dict "root" .root "service" .to)) $svc.port -}}
{{- end -}}

{{/* Environment shared by the server and the migration Job. */}}
{{- define "retention.commonEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.postgresql.existingSecret | default (include "retention.secretName" .root) }}
      key: {{ .root.Values.postgresql.existingSecretKey }}
- name: DATABASE_SCHEMA
  value: {{ .service | quote }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.redis.existingSecret | default (include "retention.secretName" .root) }}
      key: {{ .root.Values.redis.existingSecretKey }}
{{- $streams := .root.Values.redis.streams | default dict }}
{{- if or $streams.url $streams.existingSecret }}
- name: REDIS_STREAMS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $streams.existingSecret | default (include "retention.secretName" .root) }}
      key: {{ $streams.existingSecretKey | default "redis-streams-url" }}
{{- end }}
- name: JWT_SECRET_FILE
  value: /var/run/secrets/crm/jwt/{{ .root.Values.jwt.existingSecretKey }}
- name: JWT_ISSUER
  value: {{ .root.Values.jwt.issuer | quote }}
- name: JWT_AUDIENCE
  value: {{ .root.Values.jwt.audience | quote }}
- name: LOG_FORMAT
  value: {{ .root.Values.telemetry.logFormat | quote }}
- name: RUST_LOG
  value: {{ .root.Values.telemetry.rustLog | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "crm-%s" .service | quote }}
{{- $endpoint := .root.Values.telemetry.otlpEndpoint -}}
{{- if and (not $endpoint) .root.Values.otelCollector.enabled -}}
{{- $endpoint = printf "http://%s-otel-collector:4317" (include "retention.fullname" .root) -}}
{{- end }}
{{- if $endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $endpoint | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .root.Values.telemetry.samplerRatio | quote }}
{{- end }}
{{- end -}}

{{- define "retention.jwtVolume" -}}
- name: jwt
  secret:
    secretName: {{ .Values.jwt.existingSecret | default (include "retention.secretName" .) }}
    items:
      - key: {{ .Values.jwt.existingSecretKey }}
        path: {{ .Values.jwt.existingSecretKey }}
{{- end -}}
