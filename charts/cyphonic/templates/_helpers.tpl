{{/* Names, labels, images and the environment shared by the templates. */}}

{{- define "cyphonic.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name prefix; component names are appended, so keep room for them. */}}
{{- define "cyphonic.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cyphonic.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cyphonic.labels" -}}
helm.sh/chart: {{ include "cyphonic.chart" . }}
app.kubernetes.io/name: {{ include "cyphonic.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cyphonic
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "as"). */}}
{{- define "cyphonic.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cyphonic.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cyphonic.componentLabels" -}}
{{ include "cyphonic.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image of a component: (dict "root" $ "repository" "cyphonic-as"). */}}
{{- define "cyphonic.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- if .root.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) .repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "cyphonic.pkiPrefix" -}}
{{- default (printf "%s-pki" (include "cyphonic.fullname" .)) .Values.pki.secretPrefix -}}
{{- end -}}

{{- define "cyphonic.adminTokenSecret" -}}
{{- default (printf "%s-admin-token" (include "cyphonic.fullname" .)) .Values.adminToken.existingSecret -}}
{{- end -}}

{{/* The AS admin REST API inside the cluster (the TRS's CRL, the NMS console's revoke). */}}
{{- define "cyphonic.asUrl" -}}
{{- printf "http://%s-as:%v" (include "cyphonic.fullname" .) .Values.as.http.port -}}
{{- end -}}

{{/*
A TRS replica's admin REST API, by its StatefulSet pod's DNS name under the headless
Service; {replica} (the ordinal) is filled in by the NMS for each replica in its directory.
*/}}
{{- define "cyphonic.trsAdminUrlTemplate" -}}
{{- $fullname := include "cyphonic.fullname" . -}}
{{- printf "http://%s-trs-{replica}.%s-trs-headless.%s.svc:%v" $fullname $fullname .Release.Namespace .Values.trs.http.port -}}
{{- end -}}

{{- define "cyphonic.relayTokenSecret" -}}
{{- default (printf "%s-relay-token" (include "cyphonic.fullname" .)) .Values.relayToken.existingSecret -}}
{{- end -}}

{{- define "cyphonic.sessionTicketSecret" -}}
{{- default (printf "%s-session-tickets" (include "cyphonic.fullname" .)) .Values.sessionTickets.existingSecret -}}
{{- end -}}

{{- define "cyphonic.postgresSecret" -}}
{{- if .Values.postgresql.enabled -}}
{{- default (printf "%s-postgresql" (include "cyphonic.fullname" .)) .Values.postgresql.existingSecret -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "cyphonic.redisSecret" -}}
{{- if .Values.redis.enabled -}}
{{- default (printf "%s-redis" (include "cyphonic.fullname" .)) .Values.redis.existingSecret -}}
{{- else -}}
{{- .Values.externalRedis.existingSecret -}}
{{- end -}}
{{- end -}}

{{/*
A random secret kept across upgrades: the live Secret's value when `lookup` finds it, else a
new one. Offline rendering (helm template, lint) sees no cluster and gets a fresh value.
(dict "root" $ "name" "<secret name>" "key" "<data key>" "length" 40)
*/}}
{{- define "cyphonic.keptRandom" -}}
{{- $live := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key -}}
{{- else -}}
{{- randAlphaNum (int .length) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* A host for a URL: IPv6 literals in brackets. */}}
{{- define "cyphonic.urlHost" -}}
{{- if contains ":" . -}}[{{ . }}]{{- else -}}{{ . }}{{- end -}}
{{- end -}}

{{/*
Database environment, secrets only through secretKeyRef. The password is never spliced into
the URL by the kubelet ($(VAR) expansion does not percent-encode `@ / : %`): the services
read CYPHONIC_DATABASE_PASSWORD and put it into the URL encoded.
*/}}
{{- define "cyphonic.databaseEnv" -}}
{{- $fullname := include "cyphonic.fullname" . -}}
{{- if .Values.postgresql.enabled }}
- name: CYPHONIC_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cyphonic.postgresSecret" . }}
      key: password
- name: CYPHONIC_DATABASE_URL
  value: {{ printf "postgresql+asyncpg://%s@%s-postgresql:5432/%s" .Values.postgresql.username $fullname .Values.postgresql.database | quote }}
{{- else if .Values.externalDatabase.urlKey }}
- name: CYPHONIC_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalDatabase.existingSecret }}
      key: {{ .Values.externalDatabase.urlKey }}
{{- else }}
- name: CYPHONIC_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalDatabase.existingSecret }}
      key: {{ .Values.externalDatabase.passwordKey }}
- name: CYPHONIC_DATABASE_URL
  value: {{ printf "postgresql+asyncpg://%s@%s:%d/%s" .Values.externalDatabase.username (include "cyphonic.urlHost" .Values.externalDatabase.host) (int .Values.externalDatabase.port) .Values.externalDatabase.database | quote }}
{{- end }}
{{- end -}}

{{/* Redis environment (the password read apart and encoded by the services, as above). */}}
{{- define "cyphonic.redisEnv" -}}
{{- $fullname := include "cyphonic.fullname" . -}}
{{- $scheme := ternary "rediss" "redis" .Values.externalRedis.tls -}}
{{- $url := printf "%s://%s:%d/%d" $scheme (include "cyphonic.urlHost" .Values.externalRedis.host) (int .Values.externalRedis.port) (int (default 0 .Values.externalRedis.database)) -}}
{{- if .Values.redis.enabled }}
- name: CYPHONIC_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cyphonic.redisSecret" . }}
      key: password
- name: CYPHONIC_REDIS_URL
  value: {{ printf "redis://%s-redis:6379/0" $fullname | quote }}
{{- else if .Values.externalRedis.urlKey }}
- name: CYPHONIC_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.urlKey }}
{{- else if .Values.externalRedis.existingSecret }}
- name: CYPHONIC_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.passwordKey }}
- name: CYPHONIC_REDIS_URL
  value: {{ $url | quote }}
{{- else }}
- name: CYPHONIC_REDIS_URL
  value: {{ $url | quote }}
{{- end }}
{{- end -}}

{{/* Database and Redis environment of a service. */}}
{{- define "cyphonic.storageEnv" -}}
{{ include "cyphonic.databaseEnv" . }}
{{ include "cyphonic.redisEnv" . }}
{{- end -}}

{{/*
The init container of the AS and NMS pods that brings the schema to head before the service
starts (it waits for a database started with the release, the in-chart PostgreSQL; several
replicas migrating at once take turns on a PostgreSQL advisory lock). No pod of a service
that needs the schema starts without it, so readiness and `helm install --wait` need no hook.
(dict "root" $ "command" "cyphonic-as" "repository" .Values.as.repository)
*/}}
{{- define "cyphonic.migrateInitContainer" -}}
{{- if .root.Values.migrations.enabled }}
initContainers:
  - name: migrate
    image: {{ include "cyphonic.image" (dict "root" .root "repository" .repository) }}
    imagePullPolicy: {{ .root.Values.image.pullPolicy }}
    command: [{{ .command }}]
    args: [migrate, --wait, {{ .root.Values.migrations.activeDeadlineSeconds | quote }}]
    env:
      - name: CYPHONIC_LOG_FORMAT
        value: json
      {{- include "cyphonic.databaseEnv" .root | nindent 6 }}
    resources:
      {{- toYaml .root.Values.migrations.resources | nindent 6 }}
    securityContext:
      {{- toYaml .root.Values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end -}}

{{/* Environment every service has: (dict "root" $ "svc" .Values.as "pki" "as"). */}}
{{- define "cyphonic.commonEnv" -}}
- name: CYPHONIC_ENVIRONMENT
  value: production
- name: CYPHONIC_LOG_FORMAT
  value: json
- name: CYPHONIC_LOG_LEVEL
  value: {{ .root.Values.logLevel | quote }}
- name: CYPHONIC_DOMAIN
  value: {{ .root.Values.domain | quote }}
- name: CYPHONIC_QUIC_HOST
  value: "::"
- name: CYPHONIC_QUIC_PORT
  value: {{ .root.Values.quicContainerPort | quote }}
# Dual-stack (IPv4 and IPv6) admin socket: probes work on IPv4-only, IPv6-only and
# dual-stack clusters alike.
- name: CYPHONIC_HTTP_HOST
  value: "::"
- name: CYPHONIC_HTTP_PORT
  value: {{ .svc.http.port | quote }}
- name: CYPHONIC_PKI_DIR
  value: /etc/cyphonic/pki
- name: CYPHONIC_ADMIN_TOKEN_FILE
  value: /etc/cyphonic/admin/admin-token
{{- end -}}

{{/*
The lowest port a service pod binds: its QUIC port or its admin port.
(dict "root" $ "svc" .Values.as)
*/}}
{{- define "cyphonic.lowestPort" -}}
{{- min (int .root.Values.quicContainerPort) (int .svc.http.port) -}}
{{- end -}}

{{/*
Pod-level security context of a service, with net.ipv4.ip_unprivileged_port_start lowered to
the lowest port the pod binds (QUIC or admin), and left alone when every port is >= 1024.
(dict "root" $ "svc" .Values.as)
*/}}
{{- define "cyphonic.podSecurityContext" -}}
{{- $ctx := deepCopy .root.Values.podSecurityContext -}}
{{- $lowest := int (include "cyphonic.lowestPort" .) -}}
{{- if and .root.Values.unprivilegedPortSysctl (lt $lowest 1024) -}}
{{- $_ := set $ctx "sysctls" (list (dict "name" "net.ipv4.ip_unprivileged_port_start" "value" (toString $lowest))) -}}
{{- end -}}
{{- toYaml $ctx -}}
{{- end -}}

{{/* Probes on the admin port: liveness /healthz, readiness /readyz. */}}
{{- define "cyphonic.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}

{{/* Volumes of a service pod: its PKI Secret, the admin token, a writable /tmp. */}}
{{- define "cyphonic.volumes" -}}
- name: pki
  secret:
    secretName: {{ include "cyphonic.pkiPrefix" .root }}-{{ .pki }}
    defaultMode: 0440
- name: admin-token
  secret:
    secretName: {{ include "cyphonic.adminTokenSecret" .root }}
    defaultMode: 0440
    items:
      - key: admin-token
        path: admin-token
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{- define "cyphonic.volumeMounts" -}}
- name: pki
  mountPath: /etc/cyphonic/pki
  readOnly: true
- name: admin-token
  mountPath: /etc/cyphonic/admin
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Soft spread of a component over nodes and zones. */}}
{{- define "cyphonic.topologySpread" -}}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "cyphonic.selectorLabels" . | nindent 6 }}
- maxSkew: 1
  topologyKey: topology.kubernetes.io/zone
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "cyphonic.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* The QUIC endpoint list as the services read it: a JSON list. */}}
{{- define "cyphonic.jsonList" -}}
{{- toJson (default (list) .) -}}
{{- end -}}

{{/* The AS QUIC endpoints told to nodes: as.publicEndpoints, else the in-cluster QUIC Service. */}}
{{- define "cyphonic.asEndpoints" -}}
{{- if .Values.as.publicEndpoints -}}
{{- toJson .Values.as.publicEndpoints -}}
{{- else -}}
{{- toJson (list (printf "%s-as-quic.%s.svc:%d" (include "cyphonic.fullname" .) .Release.Namespace (int .Values.as.service.port))) -}}
{{- end -}}
{{- end -}}
