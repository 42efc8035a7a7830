#!/usr/bin/env bash
# k3s, single node, without Traefik (the demo needs no ingress). kube-proxy stays in its
# default mode; cluster services are 10.43.0.0/16, pods 10.42.0.0/16.
set -euo pipefail

K3S_VERSION="${K3S_VERSION:-v1.31.4+k3s1}"

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q curl ca-certificates nftables netcat-openbsd jq

if ! command -v k3s >/dev/null; then
  curl -sfL https://get.k3s.io \
    | INSTALL_K3S_VERSION="$K3S_VERSION" \
      INSTALL_K3S_EXEC="--disable traefik --write-kubeconfig-mode 0644" sh -
fi

export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
echo "export KUBECONFIG=$KUBECONFIG" > /etc/profile.d/kubeconfig.sh

for _ in $(seq 1 60); do
  kubectl get nodes 2>/dev/null | grep -q ' Ready ' && break
  sleep 5
done
kubectl wait --for=condition=Ready node --all --timeout=300s
kubectl -n kube-system rollout status deployment/coredns --timeout=300s
