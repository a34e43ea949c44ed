{{/* Names, labels and the few derived values every template shares. */}}

{{- define "abc-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "abc-gateway.fullname" -}}
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

{{- define "abc-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "abc-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "abc-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "abc-gateway.labels" -}}
helm.sh/chart: {{ include "abc-gateway.chart" . }}
{{ include "abc-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "abc-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "abc-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding ABC_ADMIN_TOKEN, ABC_SIGNING_KEY and friends. */}}
{{- define "abc-gateway.secretName" -}}
{{- if .Values.secret.create }}
{{- include "abc-gateway.fullname" . }}
{{- else }}
{{- required "secret.existingSecret is required when secret.create is false" .Values.secret.existingSecret }}
{{- end }}
{{- end }}

{{- define "abc-gateway.redisName" -}}
{{- printf "%s-redis" (include "abc-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* True (non-empty) when the bundled Redis is what the gateway talks to. */}}
{{- define "abc-gateway.bundledRedis" -}}
{{- if and .Values.redis.enabled (not .Values.redis.url) (not .Values.redis.urlFromSecret.name) }}true{{- end }}
{{- end }}

{{/* The ABC_REDIS_URL env entry; the gateway refuses to start without one in a container. */}}
{{- define "abc-gateway.redisUrlEnv" -}}
- name: ABC_REDIS_URL
{{- if .Values.redis.urlFromSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.urlFromSecret.name }}
      key: {{ .Values.redis.urlFromSecret.key }}
{{- else if .Values.redis.url }}
  value: {{ .Values.redis.url | quote }}
{{- else if .Values.redis.enabled }}
  value: {{ printf "redis://%s:6379/0" (include "abc-gateway.redisName" .) | quote }}
{{- else }}
{{- fail "set redis.url, redis.urlFromSecret.name or redis.enabled=true: the gateway needs a Redis" }}
{{- end }}
{{- if .Values.redis.cluster }}
{{- if include "abc-gateway.bundledRedis" . }}
{{- fail "redis.cluster needs an external Redis Cluster (redis.url or redis.urlFromSecret): the bundled Redis is one node" }}
{{- end }}
- name: ABC_REDIS_CLUSTER
  value: "1"
{{- end }}
{{- end }}

{{/* The bundled Redis gets its own name label so the gateway's selectors never match it. */}}
{{- define "abc-gateway.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-redis" (include "abc-gateway.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "abc-gateway.redisLabels" -}}
helm.sh/chart: {{ include "abc-gateway.chart" . }}
{{ include "abc-gateway.redisSelectorLabels" . }}
app.kubernetes.io/component: redis
app.kubernetes.io/part-of: {{ include "abc-gateway.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
