#!/usr/bin/env bash
# Build the etp image from /etp/Dockerfile, hand it to k3s' containerd, and deploy etp and
# the node's Linkerd proxy from deploy/kubernetes with the k3s config of vagrant/demo.
set -euo pipefail

export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
export DEBIAN_FRONTEND=noninteractive
IMAGE=etp:0.1.0

if ! command -v docker >/dev/null; then
  apt-get install -y -q docker.io
fi
docker build -t "$IMAGE" /etp
docker save "$IMAGE" | k3s ctr images import -

kubectl apply -f /etp/deploy/kubernetes/namespace.yaml
kubectl apply -f /etp/deploy/kubernetes/serviceaccount.yaml
kubectl apply -f /etp/vagrant/demo/etp-config.yaml

# The node proxy: trust roots copied from the control plane, and the same proxy image as the
# control plane's own (injected) proxies.
kubectl -n linkerd get configmap linkerd-identity-trust-roots -o json \
  | jq '{apiVersion, kind, data, metadata: {name: .metadata.name, namespace: "etp-system"}}' \
  | kubectl apply -f -
proxy_image="$(kubectl -n linkerd get deployment linkerd-destination \
  -o jsonpath='{.spec.template.spec.containers[?(@.name=="linkerd-proxy")].image}')"
[ -n "$proxy_image" ] || { echo "deploy-etp: no linkerd-proxy image in linkerd-destination" >&2; exit 1; }
sed "s#cr.l5d.io/linkerd/proxy:LINKERD_VERSION#${proxy_image}#" \
  /etp/deploy/kubernetes/linkerd-node-proxy.yaml | kubectl apply -f -
kubectl apply -f /etp/deploy/kubernetes/daemonset.yaml

kubectl -n etp-system rollout status daemonset/linkerd-node-proxy --timeout=300s
kubectl -n etp-system rollout status daemonset/etp --timeout=300s
nft list table inet etp
