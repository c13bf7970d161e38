{{/* Names, labels and the pieces several templates share. */}}

{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.fullname" -}}
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

{{- define "kiln.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kiln.labels" -}}
helm.sh/chart: {{ include "kiln.chart" . }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespace of the build pods: buildNamespace.name, else `<release namespace>-builds`. */}}
{{- define "kiln.buildNamespace" -}}
{{- default (printf "%s-builds" .Release.Namespace | trunc 63 | trimSuffix "-") .Values.buildNamespace.name }}
{{- end }}

{{/*
"true" when the chart creates the build namespace: never the release namespace; otherwise as
buildNamespace.create says, and when that is unset (null) only for the default name.
*/}}
{{- define "kiln.createBuildNamespace" -}}
{{- $create := .Values.buildNamespace.create }}
{{- if ne (include "kiln.buildNamespace" .) .Release.Namespace }}
{{- if kindIs "invalid" $create }}
{{- if not .Values.buildNamespace.name }}true{{ end }}
{{- else if $create }}true
{{- end }}
{{- end }}
{{- end }}

{{- define "kiln.secretName" -}}
{{- default (include "kiln.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "kiln.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The GitLab runners as one list (YAML, read back with fromYaml): the gitlab.url runner, or the
gitlab.runners entries with gitlab.url as their default URL. `index` is N of
KILN_SOURCES__GITLAB__N__TOKEN and of the Secret key gitlab-token-N.
*/}}
{{- define "kiln.gitlabRunners" -}}
{{- $g := .Values.gitlab }}
{{- $runners := list }}
{{- if $g.runners }}
{{- if $g.runnerToken }}
{{- fail "gitlab.runnerToken belongs to the single runner of gitlab.url; with gitlab.runners give each entry its own token" }}
{{- end }}
{{- $runners = $g.runners }}
{{- else if $g.url }}
{{- $runners = list (dict "name" $g.name "url" $g.url "token" $g.runnerToken "resourceClass" $g.resourceClass "limit" $g.limit) }}
{{- end }}
runners:
{{- range $i, $r := $runners }}
  - index: {{ $i }}
    url: {{ required (printf "gitlab.runners[%d].url is required (or set gitlab.url)" $i) (default $g.url $r.url) | toJson }}
    name: {{ default "" $r.name | toJson }}
    token: {{ default "" $r.token | toJson }}
    systemId: {{ default "" $r.systemId | toJson }}
    limit: {{ default 0 $r.limit }}
    requestConcurrency: {{ default 0 $r.requestConcurrency }}
    pollTimeout: {{ default "" $r.pollTimeout | toJson }}
    resourceClass: {{ default "" $r.resourceClass | toJson }}
{{- end }}
{{- end }}

{{/* "true" when a value should be written to kiln.toml: not null, not "", not an empty map or list. */}}
{{- define "kiln.isSet" -}}
{{- if kindIs "invalid" . }}
{{- else if or (kindIs "string" .) (kindIs "map" .) (kindIs "slice" .) }}
{{- if . }}true{{ end }}
{{- else }}true
{{- end }}
{{- end }}

{{/* A TOML key: bare when it may be, quoted otherwise (annotation keys have dots and slashes). */}}
{{- define "kiln.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
A value as a TOML literal: maps become inline tables, lists arrays, scalars their JSON form
(JSON strings, numbers and booleans are valid TOML). Unset entries of maps are left out.
*/}}
{{- define "kiln.tomlValue" -}}
{{- if kindIs "map" . }}
{{- $first := true }}{ {{- range $k, $v := . }}{{ if include "kiln.isSet" $v }}{{ if not $first }},{{ end }}{{ $first = false }} {{ include "kiln.tomlKey" $k }} = {{ include "kiln.tomlValue" $v }}{{ end }}{{ end }} }
{{- else if kindIs "slice" . }}
{{- "[" }}{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "kiln.tomlValue" $v }}{{ end }}{{ "]" }}
{{- else }}
{{- toJson . }}
{{- end }}
{{- end }}

{{/* `key = value` lines for every set entry of a map of kiln fields, except the keys in .skip. */}}
{{- define "kiln.tomlFields" -}}
{{- $skip := .skip }}
{{- range $k, $v := .fields }}
{{- if and (include "kiln.isSet" $v) (not (has $k $skip)) }}
{{ include "kiln.tomlKey" $k }} = {{ include "kiln.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
