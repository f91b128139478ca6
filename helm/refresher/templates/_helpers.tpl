{{/*
Names
*/}}
{{- define "refresher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, at most 63 characters (DNS label). A release name that
already contains the chart name is used as is.
*/}}
{{- define "refresher.fullname" -}}
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

{{- define "refresher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "refresher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "refresher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "refresher.labels" -}}
helm.sh/chart: {{ include "refresher.chart" . }}
{{ include "refresher.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: refresher
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "refresher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "refresher.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "refresher.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{- define "refresher.configMapName" -}}
{{- include "refresher.fullname" . }}
{{- end }}

{{/*
Provider credentials: an existing Secret, or <fullname>-credentials generated from
.Values.credentials.files. Empty when there are no credentials to mount.
*/}}
{{- define "refresher.credentialsSecretName" -}}
{{- if .Values.credentials.existingSecret -}}
{{- .Values.credentials.existingSecret -}}
{{- else if .Values.credentials.files -}}
{{- printf "%s-credentials" (include "refresher.fullname" .) -}}
{{- end -}}
{{- end }}

{{/*
Listen address of the daemon (config.server.listen), its port and whether the host is
loopback.
*/}}
{{- define "refresher.listen" -}}
{{- $server := .Values.config.server | default dict -}}
{{- $server.listen | default "0.0.0.0:9464" -}}
{{- end }}

{{- define "refresher.port" -}}
{{- $listen := include "refresher.listen" . -}}
{{- $port := regexFind "[0-9]+$" $listen -}}
{{- if not $port -}}
{{- fail (printf "config.server.listen %q must end with :<port>" $listen) -}}
{{- end -}}
{{- $port -}}
{{- end }}

{{- define "refresher.listenIsLoopback" -}}
{{- $listen := include "refresher.listen" . -}}
{{- $host := regexReplaceAll ":[0-9]+$" $listen "" | trimPrefix "[" | trimSuffix "]" -}}
{{- if or (eq $host "localhost") (eq $host "::1") (hasPrefix "127." $host) -}}
true
{{- end -}}
{{- end }}

{{/*
The admin bearer token protecting POST /v1/tokens/{job}/refresh. Mounted whenever
adminToken.enabled; a non-loopback listener without any admin token file is refused
here, because the daemon would refuse to start.
*/}}
{{- define "refresher.adminToken.enabled" -}}
{{- $server := .Values.config.server | default dict -}}
{{- if .Values.adminToken.enabled -}}
true
{{- else if and (not (include "refresher.listenIsLoopback" .)) (not $server.admin_token_file) -}}
{{- fail "adminToken.enabled=false with a non-loopback config.server.listen: set config.server.admin_token_file (and mount it with extraVolumes), or enable adminToken" -}}
{{- end -}}
{{- end }}

{{- define "refresher.adminToken.secretName" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "refresher.fullname" .)) -}}
{{- end }}

{{- define "refresher.adminToken.dir" -}}/etc/refresher/admin{{- end }}
{{- define "refresher.credentials.dir" -}}/etc/refresher/credentials{{- end }}

{{/*
Leader election: on when more than one replica runs (standalone mode), or when the
config asks for it explicitly.
*/}}
{{- define "refresher.leaderElection.enabled" -}}
{{- $le := .Values.config.leader_election | default dict -}}
{{- if or $le.enabled (and (eq .Values.mode "standalone") (gt (int .Values.replicas) 1)) -}}
true
{{- end -}}
{{- end }}

{{- define "refresher.leaseName" -}}
{{- $le := .Values.config.leader_election | default dict -}}
{{- $le.lease_name | default (include "refresher.fullname" .) -}}
{{- end }}

{{- define "refresher.leaseNamespace" -}}
{{- $le := .Values.config.leader_election | default dict -}}
{{- $le.namespace | default .Release.Namespace -}}
{{- end }}

{{/*
Secret names that kind=kubernetes sinks write, as JSON {"<namespace>": ["name", ...]}.
A sink without a namespace writes into the pod's (= the release) namespace. Several
jobs may share one Secret (each applies only its own key): names are de-duplicated.
*/}}
{{- define "refresher.sinkSecrets" -}}
{{- $byNs := dict -}}
{{- $cfg := .Values.config | default dict -}}
{{- range $i, $job := ($cfg.jobs | default list) -}}
{{- range $j, $sink := ($job.sinks | default list) -}}
{{- if and (eq (toString $sink.kind) "kubernetes") (not $sink.kubeconfig) -}}
{{- if not $sink.secret -}}
{{- fail (printf "config.jobs[%d].sinks[%d]: a kubernetes sink needs 'secret'" $i $j) -}}
{{- end -}}
{{- $ns := $sink.namespace | default $.Release.Namespace -}}
{{- $existing := get $byNs $ns | default list -}}
{{- $_ := set $byNs $ns (append $existing $sink.secret | uniq | sortAlpha) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $byNs | toJson -}}
{{- end }}

{{/*
Does the pod talk to the Kubernetes API at all (sinks or Lease)? Decides the default
for automountServiceAccountToken.
*/}}
{{- define "refresher.needsKubeApi" -}}
{{- if or (include "refresher.leaderElection.enabled" .) (ne (include "refresher.sinkSecrets" .) "{}") -}}
true
{{- end -}}
{{- end }}

{{- define "refresher.automountToken" -}}
{{- if kindIs "bool" .Values.serviceAccount.automountToken -}}
{{- .Values.serviceAccount.automountToken -}}
{{- else -}}
{{- include "refresher.needsKubeApi" . | eq "true" -}}
{{- end -}}
{{- end }}

{{/*
The daemon configuration: .Values.config plus what the chart owns (listen default, admin
token path, leader election). Rendered as YAML into the ConfigMap.
*/}}
{{- define "refresher.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $server := $cfg.server | default dict -}}
{{- $_ := set $server "listen" (include "refresher.listen" .) -}}
{{- if include "refresher.adminToken.enabled" . -}}
{{- $_ := set $server "admin_token_file" (printf "%s/%s" (include "refresher.adminToken.dir" .) .Values.adminToken.key) -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- /* leader_election is written only when on, so a single replica's config carries no
       Kubernetes-specific section at all. */ -}}
{{- if include "refresher.leaderElection.enabled" . -}}
{{- $le := $cfg.leader_election | default dict -}}
{{- $_ := set $le "enabled" true -}}
{{- $_ := set $le "lease_name" (include "refresher.leaseName" .) -}}
{{- $_ := set $le "namespace" (include "refresher.leaseNamespace" .) -}}
{{- $_ := set $cfg "leader_election" $le -}}
{{- else -}}
{{- $_ := unset $cfg "leader_election" -}}
{{- end -}}
{{- if not $cfg.jobs -}}
{{- $_ := set $cfg "jobs" list -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end }}

{{/*
Every /etc/refresher/credentials/<key> path the config refers to must be mounted: a
credentials Secret must be configured, and a generated one must hold <key>.
*/}}
{{- define "refresher.checkCredentials" -}}
{{- $dir := printf "%s/" (include "refresher.credentials.dir" .) -}}
{{- $refs := regexFindAll (printf "%s[^\"\\\\]+" (regexQuoteMeta $dir)) (toJson (.Values.config | default dict)) -1 | uniq -}}
{{- if and $refs (not (include "refresher.credentialsSecretName" .)) -}}
{{- fail (printf "config refers to %s but no credentials are mounted: set credentials.existingSecret or credentials.files" (join ", " $refs)) -}}
{{- end -}}
{{- if and .Values.credentials.files (not .Values.credentials.existingSecret) -}}
{{- range $refs -}}
{{- $key := trimPrefix $dir . -}}
{{- if not (hasKey $.Values.credentials.files $key) -}}
{{- fail (printf "config refers to %s but credentials.files has no key %q" . $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}
