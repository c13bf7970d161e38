{{/*
Refuses values that kiln would reject at start (the pod would crash-loop instead). Messages
start with kiln's own (`kiln check-config` prints the same path and text) and name the value to
change. Types, enums, quantities and durations are values.schema.json's job; this checks what
needs several values at once or kiln's wording. Included by configmap.yaml.
*/}}
{{- define "kiln.validate" -}}
{{- $v := .Values }}
{{- $runners := (include "kiln.gitlabRunners" . | fromYaml).runners }}
{{- if and (not $runners) (not $v.jenkins.enabled) (not $v.github.enabled) }}
{{- fail "no CI server configured: set gitlab.url and gitlab.runnerToken, list gitlab.runners, or enable jenkins or github" }}
{{- end }}
{{- $duration := include "kiln.seconds" ($v.kubernetes.lease_duration | default "15s") | float64 }}
{{- $renew := include "kiln.seconds" ($v.kubernetes.lease_renew | default "5s") | float64 }}
{{- if lt $duration 1.0 }}
{{- fail (printf "kubernetes.lease_duration: must be at least 1s (kubernetes.lease_duration is %s)" $v.kubernetes.lease_duration) }}
{{- end }}
{{- if or (le $renew 0.0) (ge $renew $duration) }}
{{- fail (printf "kubernetes.lease_renew: must be above 0 and below kubernetes.lease_duration (kubernetes.lease_renew is %s, kubernetes.lease_duration %s)" ($v.kubernetes.lease_renew | default "5s") ($v.kubernetes.lease_duration | default "15s")) }}
{{- end }}

{{- with $v.kubernetes.pending_timeout }}
{{- if lt (include "kiln.seconds" . | float64) 10.0 }}
{{- fail (printf "kubernetes.pending_timeout: must be at least 10s (pods need time to be scheduled and pull images) (kubernetes.pending_timeout is %s)" .) }}
{{- end }}
{{- end }}
{{- with $v.agent.trace_interval }}
{{- if le (include "kiln.seconds" . | float64) 0.0 }}
{{- fail "agent.trace_interval: must be longer than 0s" }}
{{- end }}
{{- end }}

{{- $names := dict }}
{{- range $r := $runners }}
{{- $i := int $r.index }}
{{- $value := ternary "gitlab" (printf "gitlab.runners[%d]" $i) (empty $v.gitlab.runners) }}
{{- if not (regexMatch "^https?://[^/?#[:space:]]+" $r.url) }}
{{- $own := and $v.gitlab.runners (index $v.gitlab.runners $i).url }}
{{- fail (printf "sources.gitlab[%d].url: `%s` is not an http or https URL (%s)" $i $r.url (ternary (printf "%s.url" $value) "gitlab.url" (not (empty $own)))) }}
{{- end }}
{{- include "kiln.checkClass" (dict "root" $ "name" $r.resourceClass "at" (printf "sources.gitlab[%d].resource_class" $i) "value" (printf "%s.resourceClass" $value)) }}
{{- with $r.pollTimeout }}
{{- if lt (include "kiln.seconds" . | float64) 5.0 }}
{{- fail (printf "sources.gitlab[%d].poll_timeout: must be at least 5s (GitLab holds long polls for up to 50s) (%s.pollTimeout is %s)" $i $value .) }}
{{- end }}
{{- end }}
{{- with $r.name }}
{{- if hasKey $names . }}
{{- fail (printf "sources.gitlab[%d].name: same name as sources.gitlab[%d]; names must be unique (%s.name)" $i (int (get $names .)) $value) }}
{{- end }}
{{- $_ := set $names . $i }}
{{- end }}
{{- end }}

{{- include "kiln.checkClass" (dict "root" $ "name" $v.kubernetes.default_resource_class "at" "kubernetes.default_resource_class" "value" "kubernetes.default_resource_class") }}

{{- with $v.github }}
{{- if .enabled }}
{{- if and .org (or .owner .repo) }}
{{- fail "sources.github[0].org: set either `owner` and `repo` (repository runners) or `org` (organization runners) (github.org, github.owner, github.repo)" }}
{{- end }}
{{- if and .apiUrl (not (regexMatch "^https?://[^/?#[:space:]]+" .apiUrl)) }}
{{- fail (printf "sources.github[0].api_url: `%s` is not an http or https URL (github.apiUrl)" .apiUrl) }}
{{- end }}
{{- if not .labels }}
{{- fail "sources.github[0].labels: list at least one label (jobs choose runners with `runs-on: [self-hosted, <label>]`) (github.labels)" }}
{{- end }}
{{- if and .appId .token }}
{{- fail "sources.github[0].token: set a token or a GitHub App (app_id, private_key_file), not both (github.token, github.appId)" }}
{{- end }}
{{- if and .webhookSecret (lt (len .webhookSecret) 16) }}
{{- fail (printf "sources.github[0].webhook_secret: must be at least 16 characters (github.webhookSecret has %d)" (len .webhookSecret)) }}
{{- end }}
{{- if and .reconcileInterval (lt (include "kiln.seconds" .reconcileInterval | float64) 5.0) }}
{{- fail (printf "sources.github[0].reconcile_interval: must be at least 5s (github.reconcileInterval is %s)" .reconcileInterval) }}
{{- end }}
{{- if and .maxRunners (gt (int .minIdle) (int .maxRunners)) }}
{{- fail (printf "sources.github[0].min_idle: is more than max_runners (%d) (github.minIdle)" (int .maxRunners)) }}
{{- end }}
{{- if and .enterprise (or .org .owner .repo) }}
{{- fail "sources.github[0].org: set either `owner` and `repo` (repository runners), `org` (organization runners) or `enterprise` (enterprise runners) (github.enterprise, github.org, github.owner, github.repo)" }}
{{- end }}
{{- if and .enterprise .appId }}
{{- fail "sources.github[0].app_id: enterprise runners need a personal access token (classic) with the manage_runners:enterprise scope in `token`: GitHub Apps cannot register enterprise runners (github.appId)" }}
{{- end }}
{{- if and (eq (toString .containerMode) "dind") (not $v.kubernetes.privileged) }}
{{- fail "sources.github[0].container_mode: `dind` runs a privileged docker:dind sidecar (root on the node): set `[kubernetes] privileged = true` to allow it, or leave container_mode unset (github.containerMode, kubernetes.privileged)" }}
{{- end }}
{{- range $label, $class := .labelClasses }}
{{- include "kiln.checkClass" (dict "root" $ "name" $class "at" (printf "sources.github[0].label_classes.%s" $label) "value" (printf "github.labelClasses.%s" $label)) }}
{{- end }}
{{- end }}
{{- end }}

{{- with $v.jenkins }}
{{- if .enabled }}
{{- if and .url (not (regexMatch "^https?://[^/?#[:space:]]+" .url)) }}
{{- fail (printf "sources.jenkins[0].url: `%s` is not an http or https URL (jenkins.url)" .url) }}
{{- end }}
{{- if not .labels }}
{{- fail "sources.jenkins[0].labels: list at least one label kiln serves (jenkins.labels)" }}
{{- end }}
{{- range .labels }}
{{- if not (regexMatch "^[^[:space:]]+$" .) }}
{{- fail (printf "sources.jenkins[0].labels: `%s` is not a single Jenkins label (jenkins.labels)" .) }}
{{- end }}
{{- end }}
{{- if and .pollInterval (lt (include "kiln.seconds" .pollInterval | float64) 1.0) }}
{{- fail (printf "sources.jenkins[0].poll_interval: must be at least 1s (jenkins.pollInterval is %s)" .pollInterval) }}
{{- end }}
{{- if and .webhookSecret (lt (len .webhookSecret) 16) }}
{{- fail (printf "sources.jenkins[0].webhook_secret: must be at least 16 characters (jenkins.webhookSecret has %d)" (len .webhookSecret)) }}
{{- end }}
{{- $labels := .labels }}
{{- range $label, $template := .podTemplates }}
{{- $at := printf "sources.jenkins[0].pod_templates.%s" $label }}
{{- if not (has $label $labels) }}
{{- fail (printf "%s: is not one of `labels` (jenkins.podTemplates.%s; jenkins.labels: %s)" $at $label (join ", " $labels)) }}
{{- end }}
{{- include "kiln.checkClass" (dict "root" $ "name" $template.resource_class "at" (printf "%s.resource_class" $at) "value" (printf "jenkins.podTemplates.%s.resource_class" $label)) }}
{{- range $i, $c := $template.containers }}
{{- if or (not $c.name) (eq (toString $c.name) "jnlp") }}
{{- fail (printf "%s.containers[%d].name: must be set and not `jnlp` (the agent container) (jenkins.podTemplates.%s.containers[%d].name)" $at $i $label $i) }}
{{- end }}
{{- if not $c.image }}
{{- fail (printf "%s.containers[%d].image: must be set (jenkins.podTemplates.%s.containers[%d].image)" $at $i $label $i) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A resource class named by `.at` (kiln's path) and set by `.value` (the chart's) must be an
enabled entry of resourceClasses: only those reach [kubernetes.resource_classes].
*/}}
{{- define "kiln.checkClass" -}}
{{- $name := .name }}
{{- if $name }}
{{- $classes := .root.Values.resourceClasses }}
{{- $enabled := list }}
{{- range $k, $c := $classes }}{{ if $c.enabled }}{{ $enabled = append $enabled $k }}{{ end }}{{ end }}
{{- $known := ternary (printf "enabled classes: %s" (join ", " $enabled)) "no class is enabled" (gt (len $enabled) 0) }}
{{- if not (hasKey $classes $name) }}
{{- fail (printf "%s: `%s` is not in [kubernetes.resource_classes] (%s: add resourceClasses.%s with enabled: true, a preset or sizes; %s)" .at $name .value $name $known) }}
{{- else if not (get $classes $name).enabled }}
{{- fail (printf "%s: `%s` is not in [kubernetes.resource_classes] (%s: resourceClasses.%s is not enabled, set resourceClasses.%s.enabled=true; %s)" .at $name .value $name $name $known) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Seconds of a duration as kiln reads it (humantime: `90s`, `5m`, `1h 30m`, `1.5h`); the schema
has already checked its form.
*/}}
{{- define "kiln.seconds" -}}
{{- $units := dict "ns" 1e-9 "nsec" 1e-9 "nanos" 1e-9 "us" 1e-6 "µs" 1e-6 "usec" 1e-6 "ms" 0.001 "msec" 0.001 "millis" 0.001 "s" 1 "sec" 1 "secs" 1 "second" 1 "seconds" 1 "m" 60 "min" 60 "mins" 60 "minute" 60 "minutes" 60 "h" 3600 "hr" 3600 "hrs" 3600 "hour" 3600 "hours" 3600 "d" 86400 "day" 86400 "days" 86400 "w" 604800 "wk" 604800 "wks" 604800 "week" 604800 "weeks" 604800 "M" 2630016 "month" 2630016 "months" 2630016 "y" 31557600 "yr" 31557600 "yrs" 31557600 "year" 31557600 "years" 31557600 }}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?\\s*[A-Za-zµ]+" (toString .) -1 }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" . }}
{{- $unit := regexReplaceAll "^[0-9.]+\\s*" . "" }}
{{- $total = addf $total (mulf (float64 $number) (get $units $unit | default 0 | float64)) }}
{{- end }}
{{- $total }}
{{- end }}
