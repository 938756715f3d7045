{{/* The one image of every PodPulse container. */}}
{{- define "podpulse.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{/* Labels on every object of the release (the kustomize base adds part-of alone). */}}
{{- define "podpulse.labels" -}}
app.kubernetes.io/part-of: podpulse
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* A hardened container's securityContext (restricted pod security; the root is read-only). */}}
{{- define "podpulse.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end }}

{{/* A pod's securityContext: user "ray" of the image, RuntimeDefault seccomp. */}}
{{- define "podpulse.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
fsGroup: 100  # group users: mounted Secrets (mode 0440) are readable
seccompProfile: {type: RuntimeDefault}
{{- end }}
