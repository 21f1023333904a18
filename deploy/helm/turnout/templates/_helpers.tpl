{{/*
Names. Truncated to 40 characters: a GPU pod's DNS label is <fullname>-<pool>-<i>, and a
StatefulSet's name must leave room for its pods' controller-revision-hash label (63).
*/}}
{{- define "turnout.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "turnout.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "turnout.labels" -}}
{{ include "turnout.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The GPU pool's StatefulSet and headless Service name; called with (list $ $pool). */}}
{{- define "turnout.poolName" -}}
{{- printf "%s-%s" (include "turnout.fullname" (index . 0)) (index . 1).name -}}
{{- end -}}

{{/* The model id a GPU pool's nodes serve (turnout's rule: served_name, else the model, a .gguf path's stem). */}}
{{- define "turnout.poolModelId" -}}
{{- $backend := .backend | default dict -}}
{{- $model := required (printf "gpuNodes.pools[%s].backend.model is required" .name) $backend.model -}}
{{- if $backend.served_name -}}
{{- $backend.served_name -}}
{{- else if hasSuffix ".gguf" $model -}}
{{- base $model | trimSuffix ".gguf" -}}
{{- else -}}
{{- $model -}}
{{- end -}}
{{- end -}}

{{/* Secret names: the operator's own Secret when named, else the one this chart makes. */}}
{{- define "turnout.gatewayKeysSecret" -}}
{{- .Values.gateway.auth.existingSecret | default (printf "%s-gateway-keys" (include "turnout.fullname" .)) -}}
{{- end -}}

{{- define "turnout.adminKeySecret" -}}
{{- if .Values.gateway.adminKey.existingSecret -}}
{{- .Values.gateway.adminKey.existingSecret -}}
{{- else if .Values.gateway.adminKey.value -}}
{{- printf "%s-admin" (include "turnout.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "turnout.nodeKeysSecret" -}}
{{- if not (or .Values.nodeKeys.existingSecret .Values.nodeKeys.apiKey) -}}
{{- fail "nodeKeys: set nodeKeys.existingSecret (a Secret with api-key and keys.json) or nodeKeys.apiKey: the GPU nodes bind their pod address, which turnout allows only with API keys" -}}
{{- end -}}
{{- .Values.nodeKeys.existingSecret | default (printf "%s-node-keys" (include "turnout.fullname" .)) -}}
{{- end -}}

{{/* The Redis the gateways share: the chart's, an external URL, or none (empty). */}}
{{- define "turnout.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "turnout.fullname" .) -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/*
The gateway's policy file: gateway.policy, plus what only the chart knows (its port, where
the keys are, the Redis URL, one remote backend per GPU node). Rendered once here so the
ConfigMap and its checksum annotation cannot disagree.
*/}}
{{- define "turnout.gatewayPolicy" -}}
{{- $policy := deepCopy (.Values.gateway.policy | default dict) -}}
{{- $server := deepCopy ($policy.server | default dict) -}}
{{- $_ := set $server "host" "0.0.0.0" -}}
{{- $_ := set $server "port" (int .Values.gateway.port) -}}
{{- if include "turnout.adminKeySecret" . -}}
{{- $_ := set $server "admin_key_env" "TURNOUT_ADMIN_KEY" -}}
{{- end -}}
{{- $_ := set $policy "server" $server -}}
{{- if eq .Values.gateway.auth.store "file" -}}
{{- if not (or .Values.gateway.auth.existingSecret .Values.gateway.auth.keysJson) -}}
{{- fail "gateway.auth: with store: file, set gateway.auth.existingSecret (a Secret with keys.json) or gateway.auth.keysJson (--set-file gateway.auth.keysJson=keys.json)" -}}
{{- end -}}
{{- $_ := set $policy "auth" (dict "store" "file" "path" "/etc/turnout-keys/keys.json") -}}
{{- else if eq .Values.gateway.auth.store "redis" -}}
{{- $_ := set $policy "auth" (dict "store" "redis") -}}
{{- else -}}
{{- fail (printf "gateway.auth.store must be file or redis, not %q" .Values.gateway.auth.store) -}}
{{- end -}}
{{- $redisUrl := include "turnout.redisUrl" . -}}
{{- if $redisUrl -}}
{{- $redis := deepCopy ($policy.redis | default dict) -}}
{{- $_ := set $redis "url" $redisUrl -}}
{{- $_ := set $policy "redis" $redis -}}
{{- end -}}
{{- $nodes := list -}}
{{- $routes := list -}}
{{- range $pool := .Values.gpuNodes.pools -}}
{{- $poolName := include "turnout.poolName" (list $ $pool) -}}
{{- $names := list -}}
{{- range $i := until (int $pool.replicas) -}}
{{- $name := printf "%s-%d" $pool.name $i -}}
{{- $url := printf "http://%s-%d.%s.%s.svc:%d/v1" $poolName $i $poolName $.Release.Namespace (int $.Values.gpuNodes.port) -}}
{{- $nodes = append $nodes (dict "name" $name "kind" "remote" "model" (include "turnout.poolModelId" $pool) "url" $url "api_key_env" "NODE_API_KEY") -}}
{{- $names = append $names $name -}}
{{- end -}}
{{- if and $names $pool.alias -}}
{{- $routes = append $routes (dict "model" $pool.alias "backends" $names "strategy" ($pool.strategy | default "cache_aware")) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $policy "backends" (concat $nodes ($policy.backends | default list)) -}}
{{- if not $policy.routes -}}
{{- $_ := set $policy "routes" $routes -}}
{{- end -}}
# Made by the turnout Helm chart from gateway.policy in its values: change those, not this.
{{ include "turnout.orderedYaml" $policy | trim }}
{{- end -}}

{{/* A GPU node's policy: one paged backend, API keys from the node-keys Secret. */}}
{{- define "turnout.nodePolicy" -}}
{{- $ := index . 0 -}}
{{- $pool := index . 1 -}}
{{- $backend := deepCopy ($pool.backend | default dict) -}}
{{- $_ := set $backend "name" "paged" -}}
{{- $_ := set $backend "kind" "paged" -}}
{{- $server := dict "host" "0.0.0.0" "port" (int $.Values.gpuNodes.port) -}}
{{- $auth := dict "store" "file" "path" "/etc/turnout-keys/keys.json" -}}
{{- $policy := dict "server" $server "auth" $auth "backends" (list $backend) -}}
# Made by the turnout Helm chart from gpuNodes.pools[{{ $pool.name }}] in its values.
{{ include "turnout.orderedYaml" $policy | trim }}
{{- end -}}

{{/* A policy as YAML, its sections in docs/configuration.md's order (toYaml alone sorts them). */}}
{{- define "turnout.orderedYaml" -}}
{{- $order := list "server" "auth" "redis" "limits" "backends" "routes" -}}
{{- range $section := $order -}}
{{- if hasKey $ $section }}
{{ dict $section (index $ $section) | toYaml }}
{{- end -}}
{{- end -}}
{{- with omit $ "server" "auth" "redis" "limits" "backends" "routes" }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/*
The nodes' keys.json for nodeKeys.apiKey, in turnout's key-file form (gateway/keys.py): the
key's SHA-256 and a hint, never the key itself. tests/unit/test_helm_chart.py reads it back
with turnout's own FileKeyStore.
*/}}
{{- define "turnout.nodeKeysJson" -}}
{{- $key := .Values.nodeKeys.apiKey -}}
{{- $record := dict "id" "key_gateways" "name" "gateways" "hash" (sha256sum $key) "hint" (printf "%s...%s" (trunc 11 $key) (trunc -4 $key)) "created" 0 -}}
{{- dict "keys" (list $record) | toJson -}}
{{- end -}}
