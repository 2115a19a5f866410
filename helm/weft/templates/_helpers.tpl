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

{{/* etcd client URLs for TransferGroups: the in-chart etcd's client Service, named the way
cluster DNS names it (the operator resolves such names through the API where there is no
cluster DNS), or the external endpoints. */}}
{{- define "weft.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $scheme := ternary "https" "http" (ne .Values.etcd.tls.existingSecret "") -}}
{{- list (printf "%s://%s-etcd.%s.svc:%d" $scheme (include "weft.fullname" .) .Release.Namespace (int .Values.etcd.clientPort)) | toJson -}}
{{- else -}}
{{- .Values.etcd.external.endpoints | toJson -}}
{{- end -}}
{{- end -}}

{{- define "weft.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
