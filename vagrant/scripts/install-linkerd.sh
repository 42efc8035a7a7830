#!/usr/bin/env bash
# The Linkerd CLI, the Gateway API CRDs Linkerd's install expects, then the control plane.
set -euo pipefail

GATEWAY_API_VERSION="${GATEWAY_API_VERSION:-v1.2.1}"
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
export PATH="$HOME/.linkerd2/bin:$PATH"

if ! command -v linkerd >/dev/null; then
  curl --proto '=https' --tlsv1.2 -sSfL https://run.linkerd.io/install-edge | sh
fi
install -m 0755 "$HOME/.linkerd2/bin/linkerd" /usr/local/bin/linkerd
linkerd version --client

if ! kubectl get crd httproutes.gateway.networking.k8s.io >/dev/null 2>&1; then
  kubectl apply -f "https://github.com/kubernetes-sigs/gateway-api/releases/download/${GATEWAY_API_VERSION}/standard-install.yaml"
fi

linkerd check --pre
linkerd install --crds | kubectl apply -f -
linkerd install | kubectl apply -f -
linkerd check
