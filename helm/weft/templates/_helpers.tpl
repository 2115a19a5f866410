{{/* The release's full name, cut to what object names allow. */}}
{{- define "weft.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "weft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "weft.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "weft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "weft.operatorSelector" -}}
app.kubernetes.io/name: {{ include "weft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "weft.etcdSelector" -}}
app.kubernetes.io/name: {{ include "weft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: etcd
{{- end -}}

{{- define "weft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "weft.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "weft.joinTokenSecret" -}}
{{- default (printf "%s-join-token" (include "weft.fullname" .)) .Values.joinToken.existingSecret -}}
{{- end -}}

{{/* "true" when etcd's client port speaks TLS: the in-chart etcd unless etcd.tls.enabled is
false (or with a Secret of the user's), an external etcd when the user names a client Secret. */}}
{{- define "weft.etcdTLS" -}}
{{- if .Values.etcd.tls.existingSecret -}}
true
{{- else if and .Values.etcd.enabled .Values.etcd.tls.enabled -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when the chart makes the certificates (in-chart etcd, TLS, no Secret of the user's). */}}
{{- define "weft.etcdCertsGenerated" -}}
{{- if and .Values.etcd.enabled .Values.etcd.tls.enabled (not .Values.etcd.tls.existingSecret) -}}
true
{{- end -}}
{{- end -}}

{{/* The Secret etcd members serve with (ca.crt, tls.crt, tls.key). */}}
{{- define "weft.etcdServerSecret" -}}
{{- default (printf "%s-etcd-server" (include "weft.fullname" .)) .Values.etcd.tls.existingSecret -}}
{{- end -}}

{{/* The Secret TransferGroups name in spec.etcd.tlsSecretRef (ca.crt, tls.crt, tls.key), or
"" without TLS. */}}
{{- define "weft.etcdClientSecret" -}}
{{- if .Values.etcd.tls.existingSecret -}}
{{- .Values.etcd.tls.existingSecret -}}
{{- else if include "weft.etcdCertsGenerated" . -}}
{{- printf "%s-etcd-client" (include "weft.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* etcd client URLs for TransferGroups: the in-chart etcd's client Service, named the way
cluster DNS names it (the operator resolves such names through the API where there is no
cluster DNS, for http URLs), or its fixed cluster IP when etcd.clusterIP is set (the
certificate names that IP), or the external endpoints. */}}
{{- define "weft.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $scheme := ternary "https" "http" (eq (include "weft.etcdTLS" .) "true") -}}
{{- $host := printf "%s-etcd.%s.svc" (include "weft.fullname" .) .Release.Namespace -}}
{{- if .Values.etcd.clusterIP }}{{ $host = .Values.etcd.clusterIP }}{{ end -}}
{{- list (printf "%s://%s:%d" $scheme $host (int .Values.etcd.clientPort)) | toJson -}}
{{- else -}}
{{- .Values.etcd.external.endpoints | toJson -}}
{{- end -}}
{{- end -}}

{{/* The pods of every TransferGroup (the operator's labels, weft.operator.children.labels). */}}
{{- define "weft.groupPodSelector" -}}
matchLabels:
  app.kubernetes.io/name: weft-agent
  app.kubernetes.io/managed-by: weft-operator
matchExpressions:
  - {key: weft.dev/group, operator: Exists}
{{- end -}}

{{- define "weft.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
