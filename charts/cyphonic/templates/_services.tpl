{{/*
The two Services of a component: node-facing QUIC (UDP, and TCP for the TCP 443 transport)
and the admin REST (TCP).
(dict "root" $ "component" "nms" "svc" .Values.nms)
*/}}
{{- define "cyphonic.services" -}}
{{- $fullname := include "cyphonic.fullname" .root -}}
{{- $q := .svc.service -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}-{{ .component }}-quic
  labels:
    {{- include "cyphonic.componentLabels" . | nindent 4 }}
  {{- with $q.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $q.type }}
  {{- if and (ne $q.type "ClusterIP") $q.externalTrafficPolicy }}
  externalTrafficPolicy: {{ $q.externalTrafficPolicy }}
  {{- end }}
  {{- if and (eq $q.type "LoadBalancer") $q.loadBalancerIP }}
  loadBalancerIP: {{ $q.loadBalancerIP }}
  {{- end }}
  selector:
    {{- include "cyphonic.selectorLabels" . | nindent 4 }}
  ports:
    - name: quic
      protocol: UDP
      port: {{ $q.port }}
      targetPort: quic
      {{- if and (ne $q.type "ClusterIP") $q.nodePort }}
      nodePort: {{ $q.nodePort }}
      {{- end }}
    {{- if $q.tcp }}
    # QUIC over TLS on TCP, for nodes whose UDP is blocked (docs/tcp-transport.md).
    - name: quic-tcp
      protocol: TCP
      port: {{ $q.port }}
      targetPort: quic-tcp
      {{- if and (ne $q.type "ClusterIP") $q.tcpNodePort }}
      nodePort: {{ $q.tcpNodePort }}
      {{- end }}
    {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}-{{ .component }}
  labels:
    {{- include "cyphonic.componentLabels" . | nindent 4 }}
spec:
  type: {{ .svc.http.type }}
  selector:
    {{- include "cyphonic.selectorLabels" . | nindent 4 }}
  ports:
    - name: http
      protocol: TCP
      port: {{ .svc.http.port }}
      targetPort: http
{{- end -}}
