#!/usr/bin/env bash
# End-to-end check: a raw TCP connection (nc, no HTTP client) from the unmeshed client pod to
# the frontend's ClusterIP is intercepted by etp on the node and handed to the node's Linkerd
# proxy. Evidence, each compared before and after:
#   - etp's nftables counter on the services route,
#   - etp's flow counter for route "services" (etp_flows_total, admin 127.0.0.1:15002),
#   - etp's log line for the flow,
#   - the node proxy's outbound TCP metrics naming the frontend service (admin :4191),
# and the HTTP answer that went frontend -> backend -> database.
set -euo pipefail

export KUBECONFIG=/etc/rancher/k3s/k3s.yaml

fail() { echo "e2e-check: FAIL: $*" >&2; exit 1; }

frontend_ip="$(kubectl -n demo get service frontend -o jsonpath='{.spec.clusterIP}')"
[ -n "$frontend_ip" ] || fail "frontend has no ClusterIP"
echo "e2e-check: frontend ClusterIP $frontend_ip"

etp_flows() {
  curl -sf http://127.0.0.1:15002/metrics \
    | awk '/^etp_flows_total\{.*route="services"/ { n += $NF } END { print n + 0 }'
}
nft_packets() {
  nft list chain inet etp prerouting \
    | awk '/etp route services/ { for (i = 1; i < NF; i++) if ($i == "packets") n += $(i + 1) }
           END { print n + 0 }'
}
proxy_frontend_lines() {
  curl -sf http://127.0.0.1:4191/metrics \
    | grep -E 'direction="outbound"|^outbound_' | grep -c 'frontend' || true
}

flows_before="$(etp_flows)"
packets_before="$(nft_packets)"
since="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# A hand-written HTTP request over nc: the bytes are opaque to the client, not to Linkerd.
answer="$(kubectl -n outside exec client -- sh -c \
  "printf 'GET / HTTP/1.0\r\nHost: frontend\r\n\r\n' | nc -w 10 $frontend_ip 80")"
echo "$answer" | head -n 20
echo "$answer" | grep -q '^HTTP/1.[01] 200' || fail "frontend did not answer 200"
echo "$answer" | grep -q 'database is MySQL' || fail "answer did not come through backend and database"

flows_after="$(etp_flows)"
packets_after="$(nft_packets)"
[ "$flows_after" -gt "$flows_before" ] \
  || fail "etp_flows_total{route=\"services\"} did not move ($flows_before -> $flows_after)"
[ "$packets_after" -gt "$packets_before" ] \
  || fail "nftables counter of the services route did not move ($packets_before -> $packets_after)"

pod="$(kubectl -n etp-system get pods -l app.kubernetes.io/name=etp \
  --field-selector "spec.nodeName=$(hostname)" -o jsonpath='{.items[0].metadata.name}')"
kubectl -n etp-system logs "$pod" -c etp --since-time="$since" | grep -F "$frontend_ip" \
  || fail "etp's log has no line naming $frontend_ip"

[ "$(proxy_frontend_lines)" -gt 0 ] \
  || fail "the node's Linkerd proxy shows no outbound traffic to frontend"
curl -sf http://127.0.0.1:4191/metrics | grep -E 'direction="outbound"|^outbound_' \
  | grep frontend | head -n 5

echo "e2e-check: PASS: etp intercepted the connection to $frontend_ip:80 and Linkerd carried it"
