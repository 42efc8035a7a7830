#!/usr/bin/env bash
# The three-service demo (meshed) and an unmeshed client pod.
set -euo pipefail

export KUBECONFIG=/etc/rancher/k3s/k3s.yaml

kubectl apply -f /etp/vagrant/demo/namespace.yaml
kubectl apply -f /etp/vagrant/demo/database.yaml \
  -f /etp/vagrant/demo/backend.yaml \
  -f /etp/vagrant/demo/frontend.yaml \
  -f /etp/vagrant/demo/client.yaml
for d in database backend frontend; do
  kubectl -n demo rollout status "deployment/$d" --timeout=600s
done
kubectl -n outside wait --for=condition=Ready pod/client --timeout=300s
linkerd check --proxy -n demo
