#!/usr/bin/env bash
# etp demo: client -- node (etp + a Linkerd stand-in) -- server, in throwaway network namespaces.
# Runs etp on its embedded default config, sends real TCP and UDP traffic through it, shows the
# flows, etp's log and `nft list ruleset`, then tears everything down (also on failure).
# Usage: scripts/demo.sh [path/to/etp]   (run as root)
set -euo pipefail
ETP=$(realpath "${1:-target/release/etp}")
STANDIN=$(realpath "$(dirname "$ETP")/examples/linkerd-standin")
[ -x "$ETP" ] || { echo "demo: $ETP not built (make build)"; exit 2; }
[ -x "$STANDIN" ] || { echo "demo: $STANDIN not built (cargo build --release --examples)"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "demo: run as root (network namespaces)"; exit 2; }

P="etpdemo$$"
C="$P-client" N="$P-node" S="$P-server"
WORK=$(mktemp -d /tmp/etp-demo.XXXXXX)
cleanup() {
  set +e
  for ns in "$C" "$N" "$S"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
  done
  sleep 0.3
  for ns in "$C" "$N" "$S"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$WORK"
}
# A TERM or INT trap that returns would let the script run on without its namespaces: exit,
# and let the EXIT trap clean up once.
trap cleanup EXIT
trap 'exit 130' INT TERM
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "topology: $C (10.10.1.2) -- $N (etp) -- $S (services 10.96.0.1, 10.96.0.10, fd00:10:96::1, ::a)"
for ns in "$C" "$N" "$S"; do ip netns add "$ns"; nsx "$ns" ip link set lo up; done
ip -n "$C" link add eth0 type veth peer name c0 netns "$N"
ip -n "$N" link add s0 type veth peer name eth0 netns "$S"
nsx "$C" ip addr add 10.10.1.2/24 dev eth0; nsx "$C" ip addr add fd10:1::2/64 dev eth0 nodad
nsx "$N" ip addr add 10.10.1.1/24 dev c0;   nsx "$N" ip addr add fd10:1::1/64 dev c0 nodad
nsx "$N" ip addr add 10.10.2.1/24 dev s0;   nsx "$N" ip addr add fd10:2::1/64 dev s0 nodad
nsx "$S" ip addr add 10.10.2.2/24 dev eth0; nsx "$S" ip addr add fd10:2::2/64 dev eth0 nodad
for a in 10.96.0.1/32 10.96.0.10/32; do nsx "$S" ip addr add "$a" dev lo; done
for a in fd00:10:96::1/128 fd00:10:96::a/128; do nsx "$S" ip addr add "$a" dev lo; done
for pair in "$C eth0" "$N c0" "$N s0" "$S eth0"; do set -- $pair; nsx "$1" ip link set "$2" up; done
nsx "$C" ip route add default via 10.10.1.1; nsx "$C" ip -6 route add default via fd10:1::1
nsx "$S" ip route add default via 10.10.2.1; nsx "$S" ip -6 route add default via fd10:2::1
nsx "$N" ip route add 10.96.0.0/12 via 10.10.2.2; nsx "$N" ip -6 route add fd00:10:96::/112 via fd10:2::2
nsx "$N" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1

step "servers in $S: HTTP on :80 (python3 http.server), DNS on :53 (dnsmasq)"
echo "hello from the frontend service" > "$WORK/index.html"
(cd "$WORK" && nsx "$S" python3 -m http.server --bind :: 80 >"$WORK/http.log" 2>&1 &)
nsx "$S" dnsmasq --no-daemon --no-resolv --no-hosts --bind-interfaces --listen-address=10.96.0.10 \
  --listen-address=fd00:10:96::a --address=/frontend.demo/10.96.0.1 --log-queries \
  --pid-file="$WORK/dnsmasq.pid" >"$WORK/dns.log" 2>&1 &

step "node $N: the Linkerd stand-in on 127.0.0.1:4140 and [::1]:4140 (uid 2102, reads SO_ORIGINAL_DST)"
nsx "$N" setpriv --reuid=2102 --regid=2102 --clear-groups "$STANDIN" >"$WORK/standin.log" 2>&1 &

step "node $N: etp run (embedded default config) -port=15001 --logtostderr -v=2"
nsx "$N" env ETP_DEMO=1 "$ETP" -port=15001 --logtostderr -v=2 >"$WORK/etp.log" 2>&1 &
for _ in $(seq 1 100); do
  grep -q "etp started" "$WORK/etp.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "etp started" "$WORK/etp.log" || { cat "$WORK/etp.log"; echo "demo: etp did not start"; exit 1; }
for _ in $(seq 1 50); do nsx "$S" curl -s -o /dev/null --max-time 1 http://10.96.0.1/ && break; sleep 0.1; done

step "traffic from $C"
echo "\$ curl http://10.96.0.1/            (TCP, IPv4, route 'services' -> linkerd)"
nsx "$C" curl -sS --max-time 5 http://10.96.0.1/
echo "\$ curl 'http://[fd00:10:96::1]/'   (TCP, IPv6)"
nsx "$C" curl -sS --max-time 5 'http://[fd00:10:96::1]/'
echo "\$ dig @10.96.0.10 frontend.demo     (UDP, route 'dns' -> direct)"
nsx "$C" dig +short +time=2 +tries=2 @10.96.0.10 frontend.demo A
echo "\$ dig @fd00:10:96::a frontend.demo  (UDP, IPv6)"
nsx "$C" dig +short +time=2 +tries=2 @fd00:10:96::a frontend.demo A
sleep 0.3

step "what the Linkerd stand-in saw (SO_ORIGINAL_DST of each hand-off)"
cat "$WORK/standin.log"

step "etp's log"
cat "$WORK/etp.log"

step "etp status (from the admin endpoint; /metrics has the same counters in Prometheus format)"
nsx "$N" "$ETP" status || true

step "nft list ruleset (in $N)"
nsx "$N" nft list ruleset

step "ip rule / ip route show table 15001 (in $N)"
nsx "$N" ip rule; nsx "$N" ip route show table 15001; nsx "$N" ip -6 route show table 15001

step "etp audit"
nsx "$N" "$ETP" audit

step "stopping etp (SIGTERM): the table, rules and routes go away"
pid=$(nsx "$N" cat /run/etp/etp.pid 2>/dev/null || true)
[ -n "$pid" ] && kill -TERM "$pid"
for _ in $(seq 1 100); do grep -q "etp stopped" "$WORK/etp.log" && break; sleep 0.1; done
left=$(nsx "$N" nft list ruleset | wc -l)
echo "ruleset lines left in $N: $left; ip rules for table 15001: $(nsx "$N" ip rule | grep -c 'lookup 15001' || true)"
echo "demo done; tearing down"
