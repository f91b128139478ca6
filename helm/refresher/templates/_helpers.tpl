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

{{/*
The `job` label of the daemon's scrape targets: set by the ServiceMonitor/PodMonitor,
selected on by RefresherDown.
*/}}
{{- define "refresher.scrapeJob" -}}
{{- .Values.scrapeJob | default (include "refresher.fullname" .) -}}
{{- end }}

{{/*
files/alerts.yaml (or files/grafana-alerts.yaml) with RefresherDown's selector
up{job="refresher"} naming this release's scrape job. Argument: (list $ "files/...").
*/}}
{{- define "refresher.alertsFile" -}}
{{- $root := index . 0 }}
{{- $path := index . 1 }}
{{- $raw := $root.Files.Get $path }}
{{- if not $raw }}
{{- fail (printf "%s is missing from the chart" $path) }}
{{- end }}
{{- $selector := "up{job=\"refresher\"}" }}
{{- if not (contains $selector $raw) }}
{{- fail (printf "%s has no RefresherDown selector %s to point at the scrape job" $path $selector) }}
{{- end }}
{{- replace $selector (printf "up{job=%q}" (include "refresher.scrapeJob" $root)) $raw }}
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
{{- if or $le.enabled (and (eq .Values.mode "standalone") (gt (int .Values.replicaCount) 1)) -}}
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
Secret names that kind=kubernetes sinks, bundle and template sinks kept in a Secret
(`secret:` instead of `path:`) and oauth2 state_secrets write, as JSON
{"<namespace>": ["name", ...]}. Without a namespace they write into the pod's (= the
release) namespace. Several jobs may share one Secret (each applies only its own key):
names are de-duplicated.
*/}}
{{- define "refresher.sinkSecrets" -}}
{{- $byNs := dict -}}
{{- $cfg := .Values.config | default dict -}}
{{- range $i, $job := ($cfg.jobs | default list) -}}
{{- /* An oauth2 state_secret (rotated refresh tokens) is written like a sink's Secret. */ -}}
{{- $state := ($job.provider | default dict).state_secret -}}
{{- if and $state (not $state.kubeconfig) -}}
{{- $ns := $state.namespace | default $.Release.Namespace -}}
{{- $existing := get $byNs $ns | default list -}}
{{- $_ := set $byNs $ns (append $existing $state.name | uniq | sortAlpha) -}}
{{- end -}}
{{- range $j, $sink := ($job.sinks | default list) -}}
{{- if and (include "refresher.writesSecret" $sink) (not $sink.kubeconfig) -}}
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
Does this sink write a Secret: kind kubernetes, or a bundle/template with `secret:`?
*/}}
{{- define "refresher.writesSecret" -}}
{{- $kind := toString .kind -}}
{{- if or (eq $kind "kubernetes") (and (has $kind (list "bundle" "template")) .secret) -}}true{{- end -}}
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

{{/*
Projected ServiceAccount tokens (serviceAccountTokens): the volumes, their mounts under
/var/run/secrets/tokens/<name>/, and the check that every such path the config names
is one of them. Called with (dict "root" $ "prefix" "<volume name prefix>").
*/}}
{{- define "refresher.serviceAccountTokens.dir" -}}/var/run/secrets/tokens{{- end }}

{{- define "refresher.serviceAccountTokenVolumes" -}}
{{- $prefix := .prefix -}}
{{- range .root.Values.serviceAccountTokens }}
- name: {{ $prefix }}sa-token-{{ .name }}
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ .audience | quote }}
          expirationSeconds: {{ int (.expirationSeconds | default 3600) }}
{{- end }}
{{- end }}

{{- define "refresher.serviceAccountTokenMounts" -}}
{{- $prefix := .prefix -}}
{{- $dir := include "refresher.serviceAccountTokens.dir" .root -}}
{{- range .root.Values.serviceAccountTokens }}
- name: {{ $prefix }}sa-token-{{ .name }}
  mountPath: {{ $dir }}/{{ .name }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "refresher.checkServiceAccountTokens" -}}
{{- $dir := printf "%s/" (include "refresher.serviceAccountTokens.dir" .) -}}
{{- $names := list -}}
{{- range .Values.serviceAccountTokens -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- $refs := regexFindAll (printf "%s[^\"\\\\]+" (regexQuoteMeta $dir)) (toJson (.Values.config | default dict)) -1 | uniq -}}
{{- range $refs -}}
{{- $name := index (splitList "/" (trimPrefix $dir .)) 0 -}}
{{- if not (has $name $names) -}}
{{- fail (printf "config refers to %s but serviceAccountTokens has no entry named %q" . $name) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
sha256 of config.yaml exactly as mounted (`sha256sum` of the file agrees): the
pod-template annotation checksum/config (standalone) and checksum/refresher-config
(sidecar consumers) roll pods on a change.
*/}}
{{- define "refresher.configChecksum" -}}
{{- printf "%s\n" (include "refresher.config" .) | sha256sum -}}
{{- end }}

{{/*
Refusals that no single template owns: renamed values, and file sinks nobody can read.
*/}}
{{- define "refresher.validate" -}}
{{- if hasKey .Values "replicas" -}}
{{- fail "values: `replicas` was renamed to `replicaCount` in chart 0.2.0 (see CHANGELOG.md)" -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled .Values.podMonitor.enabled (eq .Values.mode "standalone") -}}
{{- fail "serviceMonitor.enabled and podMonitor.enabled would scrape every pod twice: enable one" -}}
{{- end -}}
{{- include "refresher.checkFileSinks" . -}}
{{- end }}

{{/*
Standalone mode: a job whose only sinks are files must write them to a volume someone
else can read. /tokens is an emptyDir private to the refresher pod unless tokens.volume
replaces it; extraVolumeMounts (e.g. a ReadWriteMany claim) count as shared too.
*/}}
{{- define "refresher.checkFileSinks" -}}
{{- if eq .Values.mode "standalone" -}}
{{- $shared := list -}}
{{- if .Values.tokens.volume -}}
{{- $shared = append $shared "/tokens" -}}
{{- end -}}
{{- range .Values.extraVolumeMounts -}}
{{- $shared = append $shared (trimSuffix "/" (toString .mountPath)) -}}
{{- end -}}
{{- $cfg := .Values.config | default dict -}}
{{- range $i, $job := ($cfg.jobs | default list) -}}
{{- $kube := false -}}
{{- range ($job.sinks | default list) -}}
{{- if include "refresher.writesSecret" . -}}{{- $kube = true -}}{{- end -}}
{{- end -}}
{{- if not $kube -}}
{{- range $j, $sink := ($job.sinks | default list) -}}
{{- $readable := false -}}
{{- range $shared -}}
{{- if hasPrefix (printf "%s/" .) (toString $sink.path) -}}{{- $readable = true -}}{{- end -}}
{{- end -}}
{{- if not $readable -}}
{{- fail (printf "config.jobs[%d] (%s) writes only file sinks, and sinks[%d].path %q is not on a shared volume: in standalone mode /tokens is an emptyDir private to the refresher pod, so no consumer can read it. Add a kind: kubernetes sink, set tokens.volume to a shared volume (e.g. {persistentVolumeClaim: {claimName: tokens}} on ReadWriteMany storage), mount one with extraVolumes/extraVolumeMounts, or use mode: sidecar" $i (toString $job.name) $j (toString $sink.path)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
A probe: httpGet on `path` and the named port, plus the values minus `enabled`.
Call with (dict "probe" .Values.livenessProbe "path" "/healthz" "port" "metrics").
*/}}
{{- define "refresher.probe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
{{- with omit .probe "enabled" }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Sidecar mode: the refresher container for *your* Pod (a native sidecar: an
initContainer with restartPolicy Always, Kubernetes >= 1.29), the volumes it needs, and
the pod-template metadata. Rendered into ConfigMap <fullname>-sidecar; see NOTES.txt.
The port is named "refresher", not "metrics": port names must be unique in a Pod.
*/}}
{{- define "refresher.sidecar.portName" -}}refresher{{- end }}
{{- define "refresher.sidecar.label" -}}refresher-sidecar{{- end }}

{{- define "refresher.sidecar.container" -}}
{{- $port := include "refresher.sidecar.portName" . -}}
name: refresher
image: {{ include "refresher.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
# Native sidecar: starts before the app containers, runs beside them, stops after them.
restartPolicy: Always
args: ["run", "--config", "/etc/refresher/config.yaml"]
env:
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: {{ $port }}
    containerPort: {{ include "refresher.port" . }}
    protocol: TCP
{{- if .Values.startupProbe.enabled }}
# The app containers start only once this succeeds: /readyz means every job holds a
# valid token, so the app never starts without one.
startupProbe:
  {{- include "refresher.probe" (dict "probe" .Values.startupProbe "path" "/readyz" "port" $port) | nindent 2 }}
{{- end }}
{{- if .Values.livenessProbe.enabled }}
livenessProbe:
  {{- include "refresher.probe" (dict "probe" .Values.livenessProbe "path" "/healthz" "port" $port) | nindent 2 }}
{{- end }}
{{- if .Values.readinessProbe.enabled }}
readinessProbe:
  {{- include "refresher.probe" (dict "probe" .Values.readinessProbe "path" "/readyz" "port" $port) | nindent 2 }}
{{- end }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  # The config is static per rollout (checksum/refresher-config rolls the Pod); subPath
  # is acceptable for it, never for tokens.
  - name: refresher-config
    mountPath: /etc/refresher/config.yaml
    subPath: config.yaml
    readOnly: true
  {{- if include "refresher.credentialsSecretName" . }}
  - name: refresher-credentials
    mountPath: {{ include "refresher.credentials.dir" . }}
    readOnly: true
  {{- end }}
  {{- if include "refresher.adminToken.enabled" . }}
  - name: refresher-admin
    mountPath: {{ include "refresher.adminToken.dir" . }}
    readOnly: true
  {{- end }}
  - name: tokens
    mountPath: /tokens
  - name: refresher-tmp
    mountPath: /tmp
  {{- include "refresher.serviceAccountTokenMounts" (dict "root" . "prefix" "refresher-") | nindent 2 }}
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{- define "refresher.sidecar.volumes" -}}
- name: refresher-config
  configMap:
    name: {{ include "refresher.configMapName" . }}
{{- with include "refresher.credentialsSecretName" . }}
- name: refresher-credentials
  secret:
    secretName: {{ . }}
    defaultMode: 288 # 0440
{{- end }}
{{- if include "refresher.adminToken.enabled" . }}
- name: refresher-admin
  secret:
    secretName: {{ include "refresher.adminToken.secretName" . }}
    defaultMode: 288 # 0440
    items:
      - key: {{ .Values.adminToken.key }}
        path: {{ .Values.adminToken.key }}
{{- end }}
# Shared with the app: it mounts this directory read-only (never with subPath).
{{- include "refresher.tokensVolume" . }}
- name: refresher-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- include "refresher.serviceAccountTokenVolumes" (dict "root" . "prefix" "refresher-") }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The /tokens volume: tokens.volume if set (a shared volume), else an emptyDir.
*/}}
{{- define "refresher.tokensVolume" -}}
{{- if .Values.tokens.volume }}
- name: tokens
  {{- toYaml .Values.tokens.volume | nindent 2 }}
{{- else }}
- name: tokens
  emptyDir:
    {{- with .Values.tokens.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .Values.tokens.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- end }}

{{- define "refresher.sidecar.podMetadata" -}}
labels:
  # Selected by the chart's PodMonitor (podMonitor.enabled).
  {{ include "refresher.sidecar.label" . }}: {{ include "refresher.fullname" . }}
annotations:
  # Changes with the config: `helm upgrade` with a new config rolls your Pods.
  checksum/refresher-config: {{ include "refresher.configChecksum" . }}
{{- end }}

{{- define "refresher.testLabels" -}}
helm.sh/chart: {{ include "refresher.chart" . }}
app.kubernetes.io/name: {{ include "refresher.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: helm-test
{{- end }}
