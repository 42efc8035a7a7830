#!/usr/bin/env bash
# Data-path benchmark: client -- router -- server in throwaway network namespaces, the same
# kernel path for every interceptor, side by side in one run:
#   routing         no interception: the router only forwards (the limit on this machine)
#   etp             `etp run`, route action `direct`, `[limits] relay = "adaptive"` (the default:
#                   buffered copy, splice(2) once a direction moves bulk data)
#   etp-2t          the same with `[limits] worker_threads = 2` (the default here is 1: half the CPUs)
#   etp-splice      the same with `relay = "splice"` (splice from the first byte)
#   etp-copy        the same with `relay = "copy"` (always the buffered copy)
#   etp-nolimits    `etp` without the per-source limits (all three keys 0): beside `etp`, the
#                   cost of the kernel's per-source meters. The `etp` rows keep the default
#                   per-source flow counts and a per-source rate of 100,000/s, on but above what
#                   one client reaches here, so that they measure the cost of the rules, not
#                   the refusals (the default 2,000/s would refuse most of the `close` phase,
#                   whose one client opens thousands of connections a second)
#   etp-nolimits-ct `etp-nolimits` with connection tracking on in the router namespace (a one-rule
#                   table of the script's own, `ct state invalid counter`), as on any Kubernetes
#                   node (kube-proxy, the CNI): the limits' `ct count` and `ct status` turn
#                   conntrack on for the namespace, `etp-nolimits` runs without it, so `etp` /
#                   `etp-nolimits-ct` is the limits' own cost on a node that tracks connections
#   haproxy         HAProxy, `bind ... transparent`, `server orig 0.0.0.0` (= original destination)
#   haproxy-splice  the same with `option splice-auto`
#   nginx           nginx stream, `proxy_pass $server_addr:$server_port`, on a transparent listener
#   etp-linkerd     etp with action `linkerd`: hand-off through the Linkerd stand-in (extra row;
#                   `[linkerd] handoff = "relay"`: etp's relay, then the stand-in)
#   etp-kernel      the same with `[linkerd] handoff = "kernel"`: etp's ruleset DNATs the client's
#                   connection to the stand-in at the hand-off address (etp not in the path)
#   kernel-nat      the reference for etp-kernel: a hand-written `dnat to 169.254.15.1:4140` in
#                   nat prerouting to the same stand-in on a hand-off interface, no etp at all
#                   (what an operator could write instead); measured: the stand-in
#   etp-l2p         etp-linkerd with a real linkerd2-proxy in place of the stand-in (only with
#                   BENCH_LINKERD2_PROXY; etp and the proxy are measured together)
#   etp-l2p-kernel  etp-kernel with the real proxy (measured: etp and the proxy)
#   l2p-nat         kernel-nat with the real proxy: no etp (measured: the proxy)
#
# The peers get the very ruleset etp installs (`etp render` loaded with nft -f, plus the same
# `ip rule fwmark` / `ip route local` pair), so only the user-space program differs between rows.
# nginx has no `transparent` listen parameter: its listener would not get IP_TRANSPARENT and the
# tproxy rule would not match it (the connection is then routed past nginx). So the script hands
# nginx an already-bound IP_TRANSPARENT listening socket through nginx's own socket inheritance
# (the NGINX environment variable of its binary upgrade); nginx itself is stock.
#
# Per row and round: iperf3 1 stream and 4 streams; wrk against nginx in the server namespace
# with keep-alive (requests/s, p50, p99) and without (`Connection: close`: connections/s); DNS
# requests/s with dnsperf against dnsmasq (UDP, only where the interceptor relays UDP); the
# interceptor's CPU seconds per phase (utime+stime from /proc/PID/stat, all its processes); its
# RSS idle, and with 1,000 idle connections open through it (VmRSS), and its peak (VmHWM).
#
# Usage: scripts/bench-datapath.sh [path/to/etp]   (root; IPv4; traffic only inside the namespaces)
# Env: BENCH_SECS (per run, default 5), BENCH_ROUNDS (default 3), BENCH_ROWS (default: all rows
# above), BENCH_TSV (copy of the raw results), BENCH_CONNS (idle connections, default 1000),
# BENCH_PHASES (default "tcp1 tcp4 ka close sys udp idle": a subset for quicker experiments),
# BENCH_LINKERD2_PROXY and BENCH_LINKERD_CONTROL (a linkerd2-proxy binary and the fake control
# plane from integration/linkerd-control: adds the rows etp-l2p and l2p-nat).
set -euo pipefail
ETP=$(realpath "${1:-target/release/etp}")
EX="$(dirname "$ETP")/examples"
SECS=${BENCH_SECS:-5}
L2P=${BENCH_LINKERD2_PROXY:-}
L2PC=${BENCH_LINKERD_CONTROL:-}
L2P_ROWS=""
if [ -n "$L2P" ]; then
  if [ ! -x "$L2P" ] || [ ! -x "$L2PC" ]; then
    echo "bench: BENCH_LINKERD2_PROXY and BENCH_LINKERD_CONTROL must be executables"; exit 2
  fi
  L2P_ROWS=" etp-l2p etp-l2p-kernel l2p-nat"
fi
ROWS=${BENCH_ROWS:-routing etp etp-nolimits etp-nolimits-ct etp-2t etp-splice etp-copy haproxy haproxy-splice nginx etp-linkerd etp-kernel kernel-nat$L2P_ROWS}
CONNS=${BENCH_CONNS:-1000}
ROUNDS=${BENCH_ROUNDS:-3}
PHASES=" ${BENCH_PHASES:-tcp1 tcp4 ka close sys udp idle} "
phase() { [[ $PHASES == *" $1 "* ]]; }
[ "$(id -u)" = 0 ] || { echo "bench: run as root (network namespaces)"; exit 2; }
[ -x "$ETP" ] || { echo "bench: $ETP not built (make build)"; exit 2; }
for b in iperf3 wrk dnsperf dnsmasq haproxy nginx nft python3 setpriv strace; do
  command -v "$b" >/dev/null || { echo "bench: $b missing (make deps installs BENCH_PACKAGES)"; exit 2; }
done
NGX_STREAM=/usr/lib/nginx/modules/ngx_stream_module.so
[ -f "$NGX_STREAM" ] || { echo "bench: $NGX_STREAM missing (libnginx-mod-stream)"; exit 2; }

P="etpb$$"
C="$P-c" R="$P-r" S="$P-s"
WORK=$(mktemp -d /tmp/etp-bench.XXXXXX)
chmod 755 "$WORK"
RES="$WORK/results.tsv"
SVC=10.96.0.10
cleanup() {
  set +e
  for ns in "$C" "$R" "$S"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
  done
  sleep 0.5
  for ns in "$C" "$R" "$S"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  [ -n "${BENCH_TSV:-}" ] && [ -f "$RES" ] && cp "$RES" "$BENCH_TSV"
  [ -n "${BENCH_KEEP:-}" ] && echo "bench: kept $WORK" >&2 || rm -rf "$WORK"
}
# A TERM or INT trap that returns would let the script run on without its namespaces: exit,
# and let the EXIT trap clean up once.
trap cleanup EXIT
trap 'exit 130' INT TERM
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
# waits (bounded) until `cmd...` succeeds; $1 = tenths of a second
waitfor() { local n=$1; shift; for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
ulimit -n "$(ulimit -Hn)"  # 20000 here: enough for 2x CONNS sockets in every process

# ---- topology -------------------------------------------------------------------------------
log "topology: $C (10.10.1.2) -- $R (10.10.1.1 | 10.10.2.1) -- $S (10.10.2.2, service $SVC)"
for ns in "$C" "$R" "$S"; do ip netns add "$ns"; nsx "$ns" ip link set lo up; done
ip -n "$C" link add eth0 type veth peer name c0 netns "$R"
ip -n "$R" link add s0 type veth peer name eth0 netns "$S"
nsx "$C" ip addr add 10.10.1.2/24 dev eth0
nsx "$R" ip addr add 10.10.1.1/24 dev c0
nsx "$R" ip addr add 10.10.2.1/24 dev s0
nsx "$S" ip addr add 10.10.2.2/24 dev eth0
nsx "$S" ip addr add "$SVC/32" dev lo
for l in "$C:eth0" "$R:c0" "$R:s0" "$S:eth0"; do nsx "${l%%:*}" ip link set "${l#*:}" up; done
nsx "$C" ip route add default via 10.10.1.1
nsx "$S" ip route add default via 10.10.2.1
nsx "$R" ip route add 10.96.0.0/12 via 10.10.2.2
nsx "$R" sysctl -qw net.ipv4.ip_forward=1
# Many short connections: wide port ranges and TIME-WAIT reuse on every side.
for ns in "$C" "$R" "$S"; do
  nsx "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
done

# ---- servers --------------------------------------------------------------------------------
log "servers in $S: iperf3 :5201, nginx HTTP :8080, dnsmasq :53 (all on $SVC)"
mkdir -p "$WORK/srv"
cat >"$WORK/srv/nginx.conf" <<EOF
daemon off; master_process on; worker_processes 1; worker_rlimit_nofile 16000;
pid $WORK/srv/nginx.pid; error_log $WORK/srv/error.log warn;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 120s; client_header_timeout 120s;
  server { listen $SVC:8080 backlog=4096; location / { return 200 "hello from the benchmark server\n"; } }
}
EOF
nsx "$S" iperf3 -s -B "$SVC" -p 5201 >"$WORK/srv/iperf3.log" 2>&1 &
nsx "$S" nginx -c "$WORK/srv/nginx.conf" -e "$WORK/srv/error.log" >"$WORK/srv/nginx.out" 2>&1 &
nsx "$S" dnsmasq --no-daemon --conf-file=/dev/null --no-resolv --no-hosts --pid-file --user=root \
  --bind-interfaces --listen-address="$SVC" --address=/bench.test/10.1.2.3 --cache-size=1000 \
  --dns-forward-max=1000 >"$WORK/srv/dnsmasq.log" 2>&1 &
listening() { [ "$(nsx "$1" ss -H "$2" "sport = :$3" | wc -l)" -ge 1 ]; }
waitfor 100 listening "$S" -ltn 5201 || { echo "bench: iperf3 did not start"; exit 1; }
waitfor 100 listening "$S" -ltn 8080 || { cat "$WORK/srv/error.log"; echo "bench: nginx did not start"; exit 1; }
waitfor 100 listening "$S" -lun 53 || { echo "bench: dnsmasq did not start"; exit 1; }
printf 'bench.test A\n' >"$WORK/queries"

# ---- interceptors ---------------------------------------------------------------------------
etp_cfg() { # $1 = tcp action, $2 = relay mode, $3 = worker threads (0 = etp's default), $4 = per-source rate (0 = off)
  cat <<EOF
[listener]
port = 15001
ipv6 = false
local = false
[admin]
address = "127.0.0.1:15002"
[daemon]
pid_file = "$WORK/etp.pid"
drain_seconds = 1
[limits]
max_tcp_flows = 20000
relay = "${2:-adaptive}"
worker_threads = ${3:-0}
new_flows_per_source_per_second = ${4:-100000}
[bypass]
destinations = []
ports = []
[[route]]
name = "bench-tcp"
protocols = ["tcp"]
destinations = ["$SVC/32"]
ports = ["1-65535"]
action = "$1"
[[route]]
name = "bench-udp"
protocols = ["udp"]
destinations = ["$SVC/32"]
ports = ["1-65535"]
action = "direct"
EOF
}
etp_cfg direct >"$WORK/etp-direct.toml"
etp_cfg direct splice >"$WORK/etp-splice.toml"
etp_cfg direct copy >"$WORK/etp-copy.toml"
etp_cfg linkerd >"$WORK/etp-linkerd.toml"
etp_cfg direct adaptive 2 >"$WORK/etp-2t.toml"
etp_cfg direct adaptive 0 0 | sed 's/^new_flows_per_source_per_second = 0$/&\nmax_tcp_flows_per_source = 0\nmax_udp_flows_per_source = 0/' \
  >"$WORK/etp-nolimits.toml"
HANDOFF=169.254.15.1
{ etp_cfg linkerd; printf '[linkerd]\nhandoff = "kernel"\nhandoff_address = ["%s"]\n' "$HANDOFF"; } \
  >"$WORK/etp-kernel.toml"
# kernel-nat: what etp-kernel's ruleset does for this route, written by hand.
cat >"$WORK/kernel-nat.nft" <<EOF
table ip bench_nat {
  chain pre {
    type nat hook prerouting priority -110; policy accept;
    ip daddr $SVC tcp dport 1-65535 dnat to $HANDOFF:4140
  }
}
EOF
handoff_by_hand() { # kernel-nat's hand-off interface (dummy, or ifb without dummy, as etp does)
  nsx "$R" ip link add bench-ho type dummy 2>/dev/null || nsx "$R" ip link add bench-ho type ifb
  nsx "$R" ip link set bench-ho up
  nsx "$R" ip addr add "$HANDOFF/32" dev bench-ho
  nsx "$R" nft -f "$WORK/kernel-nat.nft"
}
standin() { # the Linkerd stand-in as the proxy's uid, listening on the hand-off address too
  ip netns exec "$R" setpriv --reuid=2102 --regid=2102 --clear-groups "$EX/linkerd-standin" --log /dev/null \
    --listen "$HANDOFF" >"$WORK/standin.log" 2>&1 &
  waitfor 100 listening "$R" -ltn 4140 || { echo "bench: stand-in did not start"; return 1; }
}

# The kernel side for the peers: exactly what etp installs for the same config.
install_ruleset() {
  "$ETP" render -c "$WORK/etp-direct.toml" | nsx "$R" nft -f -
  nsx "$R" ip -4 rule add priority 30100 fwmark 0x1000/0x3000 lookup 15001
  nsx "$R" ip -4 route add local 0.0.0.0/0 dev lo scope host table 15001
}
remove_ruleset() {
  nsx "$R" nft delete table inet etp 2>/dev/null || true
  nsx "$R" ip -4 rule del priority 30100 2>/dev/null || true
  nsx "$R" ip -4 route flush table 15001 2>/dev/null || true
}

cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 7000  # with splice-auto HAProxy also reserves maxconn/4 pipes: fds stay under 20000
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
listen tproxy
  bind 0.0.0.0:15001 transparent
  # 0.0.0.0 with no port: the address and port the client connected to (the original destination)
  server orig 0.0.0.0
EOF
sed 's/^listen tproxy$/listen tproxy\n  option splice-auto/' "$WORK/haproxy.cfg" >"$WORK/haproxy-splice.cfg"

cat >"$WORK/nginx-r.conf" <<EOF
load_module $NGX_STREAM;
daemon off; master_process on; worker_processes 2; worker_rlimit_nofile 16000;
pid $WORK/nginx-r.pid; error_log $WORK/nginx-r.err warn;
events { worker_connections 8192; }
stream {
  server {
    # The inherited socket (IP_TRANSPARENT, see transparent-listen.py) is this listen address.
    listen 0.0.0.0:15001 backlog=4096;
    proxy_connect_timeout 5s; proxy_timeout 120s;
    # Under TPROXY the accepted socket's local address is the original destination.
    proxy_pass \$server_addr:\$server_port;
  }
}
EOF
cat >"$WORK/transparent-listen.py" <<'EOF'
# Binds an IP_TRANSPARENT TCP listener on 0.0.0.0:PORT and execs the command with the listener
# passed the way nginx passes its sockets across a binary upgrade (NGINX="fd;").
import os, socket, sys
IP_TRANSPARENT = 19
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
os.set_inheritable(s.fileno(), True)
os.environ["NGINX"] = "%d;" % s.fileno()
os.execvp(sys.argv[2], sys.argv[2:])
EOF

# A real linkerd2-proxy in $R as uid 2102, with the fake control plane on 127.0.0.1:8090 (the
# same settings as integration/common/linkerd_proxy.rs); $1 = its outbound listen addresses.
# Sets L2PID; waits (bounded) for its /ready.
start_l2p() {
  local d="$WORK/l2p" name=linkerd-node-proxy.etp-system.serviceaccount.identity.linkerd.cluster.local
  rm -rf "$d"; mkdir -p "$d"; chmod 755 "$d"
  ip netns exec "$R" "$L2PC" --dir "$d" --name "$name" --listen 127.0.0.1:8090 --log "$d/control.log" \
    >"$d/control.err" 2>&1 &
  waitfor 100 test -e "$d/ready" || { cat "$d/control.err"; echo "bench: control plane did not start"; return 1; }
  ip netns exec "$R" env LINKERD2_PROXY_LOG=warn \
    LINKERD2_PROXY_DESTINATION_SVC_ADDR=127.0.0.1:8090 LINKERD2_PROXY_POLICY_SVC_ADDR=127.0.0.1:8090 \
    LINKERD2_PROXY_POLICY_WORKLOAD='{"ns":"etp-system","pod":"etp"}' \
    LINKERD2_PROXY_IDENTITY_SVC_ADDR=127.0.0.1:8090 LINKERD2_PROXY_IDENTITY_DIR="$d/id" \
    LINKERD2_PROXY_IDENTITY_TOKEN_FILE="$d/token" LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS="$(cat "$d/ca.pem")" \
    LINKERD2_PROXY_IDENTITY_LOCAL_NAME="$name" LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS="$1" \
    LINKERD2_PROXY_INBOUND_LISTEN_ADDR=127.0.0.1:4143 LINKERD2_PROXY_CONTROL_LISTEN_ADDR=127.0.0.1:4190 \
    LINKERD2_PROXY_ADMIN_LISTEN_ADDR=127.0.0.1:4191 LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT=1s \
    setpriv --reuid=2102 --regid=2102 --clear-groups "$L2P" >"$d/proxy.log" 2>&1 &
  L2PID=$!
  waitfor 600 nsx "$R" curl -sf --max-time 1 http://127.0.0.1:4191/ready \
    || { tail -20 "$d/proxy.log"; echo "bench: linkerd2-proxy not ready"; return 1; }
}

IPID="" PIDS="" L2PID=""
# Interceptors start with `ip netns exec` itself in the background (not the nsx function), so that
# $! is the interceptor's own pid: ip, env, setpriv and the Python helper all exec.
start_row() { # $1 = row; sets IPID (main pid) and PIDS (all processes measured)
  IPID=""
  case $1 in
    routing) return 0 ;;
    etp|etp-splice|etp-copy|etp-2t|etp-nolimits|etp-nolimits-ct)
      local cfg="$WORK/etp-direct.toml"
      [ "$1" = etp-nolimits ] && cfg="$WORK/etp-nolimits.toml"
      if [ "$1" = etp-nolimits-ct ]; then
        cfg="$WORK/etp-nolimits.toml"
        nsx "$R" nft -f - <<<'table inet bench_ct { chain pre { type filter hook prerouting priority 0; policy accept; ct state invalid counter; }; }'
      fi
      [ "$1" = etp-splice ] && cfg="$WORK/etp-splice.toml"
      [ "$1" = etp-copy ] && cfg="$WORK/etp-copy.toml"
      [ "$1" = etp-2t ] && cfg="$WORK/etp-2t.toml"
      ip netns exec "$R" env RUST_LOG=etp=info "$ETP" run -c "$cfg" >"$WORK/$1.log" 2>&1 &
      IPID=$! ;;
    etp-linkerd|etp-kernel)
      standin || return 1
      ip netns exec "$R" env RUST_LOG=etp=info "$ETP" run -c "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
      IPID=$! ;;
    kernel-nat)
      handoff_by_hand
      standin || return 1
      for pid in $(ip netns pids "$R"); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = linkerd-standin ] && IPID=$pid
      done
      PIDS="$IPID"
      sleep 1
      log "$1: measuring pids $PIDS ($(cat /proc/$IPID/comm))"
      return 0 ;;
    etp-l2p)
      start_l2p "127.0.0.1:4140" || return 1
      ip netns exec "$R" env RUST_LOG=etp=info "$ETP" run -c "$WORK/etp-linkerd.toml" >"$WORK/$1.log" 2>&1 &
      IPID=$! ;;
    etp-l2p-kernel)
      # etp first: it creates the hand-off address that the proxy's outbound listener binds
      # (the proxy exits when the address does not exist yet).
      ip netns exec "$R" env RUST_LOG=etp=info "$ETP" run -c "$WORK/etp-kernel.toml" >"$WORK/$1.log" 2>&1 &
      IPID=$!
      waitfor 100 nsx "$R" ip -4 addr show to "$HANDOFF/32" dev etp-handoff up \
        || { cat "$WORK/$1.log"; echo "bench: no hand-off address"; return 1; }
      start_l2p "$HANDOFF:4140" || return 1 ;;
    l2p-nat)
      handoff_by_hand
      start_l2p "$HANDOFF:4140" || return 1
      IPID=$L2PID
      sleep 1
      PIDS=$IPID
      log "$1: measuring pid $PIDS ($(cat /proc/$IPID/comm))"
      return 0 ;;
    haproxy|haproxy-splice)
      install_ruleset
      ip netns exec "$R" haproxy -db -f "$WORK/$1.cfg" >"$WORK/$1.log" 2>&1 &
      IPID=$! ;;
    nginx)
      install_ruleset
      ip netns exec "$R" python3 "$WORK/transparent-listen.py" 15001 nginx -c "$WORK/nginx-r.conf" \
        -e "$WORK/nginx-r.err" >"$WORK/$1.log" 2>&1 &
      IPID=$! ;;
    *) echo "bench: unknown row $1"; return 1 ;;
  esac
  waitfor 100 listening "$R" -ltn 15001 || { cat "$WORK/$1.log"; echo "bench: $1 did not listen"; return 1; }
  waitfor 100 nsx "$R" nft list table inet etp || { echo "bench: no ruleset for $1"; return 1; }
  sleep 1
  PIDS="$IPID $(pgrep -P "$IPID" | tr '\n' ' ')${L2PID:+ $L2PID}"
  log "$1: measuring pids $PIDS ($(cat /proc/$IPID/comm))"
}
stop_row() {
  [ -n "$IPID" ] || return 0
  L2PID=""
  kill -TERM "$IPID" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$IPID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$IPID" 2>/dev/null || true
  for pid in $(ip netns pids "$R"); do kill "$pid" 2>/dev/null || true; done  # the stand-in
  nsx "$R" nft delete table ip bench_nat 2>/dev/null || true
  nsx "$R" nft delete table inet bench_ct 2>/dev/null || true
  nsx "$R" ip link del bench-ho 2>/dev/null || true
  sleep 0.3
  remove_ruleset
  # The interceptor closed its client legs first, so their TIME-WAIT remnants stay in the router
  # for 60 s. Early demux attaches such a remnant to a new forwarded SYN with the same 4-tuple and
  # ip_forward drops it: a routing row after an intercepting row would lose every connection whose
  # client port is reused. Destroy them (SOCK_DESTROY) so every row starts clean.
  nsx "$R" ss -K state time-wait >/dev/null 2>&1 || true
}

TCK=$(getconf CLK_TCK)
cpu() { # CPU seconds (user+system) of $PIDS so far
  [ -n "$IPID" ] || { echo 0; return; }
  local t=0 p
  for p in $PIDS; do
    [ -r "/proc/$p/stat" ] && t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  awk -v t="$t" -v k="$TCK" 'BEGIN { printf "%.2f", t / k }'
}
mem() { # $1 = VmRSS or VmHWM: MB summed over $PIDS
  [ -n "$IPID" ] || { echo "-"; return; }
  local kb=0 p
  for p in $PIDS; do
    [ -r "/proc/$p/status" ] && kb=$((kb + $(awk -v k="$1:" '$1 == k {print $2}' "/proc/$p/status")))
  done
  awk -v kb="$kb" 'BEGIN { printf "%.1f", kb / 1024 }'
}
put() { printf '%s\t%s\t%s\n' "$ROW" "$1" "$2" >>"$RES"; }
phase_cpu() { # $1 = phase name; CPU seconds since $c0
  local now; now=$(cpu); put "cpu_$1" "$(awk -v a="$c0" -v b="$now" 'BEGIN { printf "%.2f", b - a }')"
}

# ---- measurements ---------------------------------------------------------------------------
iperf() { # $1 = streams -> Gb/s received
  nsx "$C" timeout $((SECS + 15)) iperf3 -c "$SVC" -p 5201 -t "$SECS" -O 1 -P "$1" -J >"$WORK/iperf.json" \
    || { echo "bench: iperf3 failed" >&2; echo 0; return; }
  python3 -c 'import json,sys; print("%.2f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 1e9))' "$WORK/iperf.json"
}
wrk_run() { # $1 = name; extra wrk args follow -> puts rps, p50, p99 (ms), errors
  local name=$1; shift
  nsx "$C" timeout $((SECS + 20)) wrk -t1 -c32 -d"${SECS}s" --timeout 5s --latency "$@" "http://$SVC:8080/" \
    >"$WORK/wrk.txt" 2>&1 || true
  python3 - "$WORK/wrk.txt" "$name" >>"$RES" <<'EOF'
import re, sys
import os
t = open(sys.argv[1]).read(); name = sys.argv[2]
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v); x = float(m.group(1))
    return x / 1000 if m.group(2) == "us" else x * 1000 if m.group(2) == "s" else x
rps = re.search(r"Requests/sec:\s+([\d.]+)", t)
p50 = re.search(r"^\s+50%\s+(\S+)", t, re.M); p99 = re.search(r"^\s+99%\s+(\S+)", t, re.M)
err = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", t))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
err += int(non2xx.group(1)) if non2xx else 0
r = os.environ["ROW"]
print(f"{r}\t{name}_rps\t{float(rps.group(1)) if rps else 0:.0f}")
print(f"{r}\t{name}_p50\t{ms(p50.group(1)) if p50 else 0:.3f}")
print(f"{r}\t{name}_p99\t{ms(p99.group(1)) if p99 else 0:.3f}")
print(f"{r}\t{name}_errors\t{err}")
EOF
}
syscalls_per() { # $1 = name; extra wrk args follow -> puts sys_$1: the interceptor's syscalls
  # per request (strace -c on all its threads while wrk runs 2 s; strace slows the run, the count
  # per request is what is compared)
  local name=$1; shift
  [ -n "$IPID" ] || return 0
  local args=() p; for p in $PIDS; do args+=(-p "$p"); done
  strace -f -c -o "$WORK/strace.txt" "${args[@]}" 2>/dev/null &
  local st=$!
  sleep 0.5
  nsx "$C" timeout 30 wrk -t1 -c32 -d2s --timeout 5s "$@" "http://$SVC:8080/" >"$WORK/wrk-sys.txt" 2>&1 || true
  kill -INT "$st" 2>/dev/null; wait "$st" 2>/dev/null || true
  local calls reqs
  calls=$(awk '$NF == "total" { print $4 }' "$WORK/strace.txt")
  reqs=$(awk '/requests in/ { print $1 }' "$WORK/wrk-sys.txt")
  put "sys_$name" "$(awk -v c="${calls:-0}" -v r="${reqs:-0}" 'BEGIN { if (r > 0) printf "%.1f", c / r; else print "n/a" }')"
}
dns_run() { # -> queries/s
  nsx "$C" timeout $((SECS + 15)) dnsperf -s "$SVC" -d "$WORK/queries" -l "$SECS" -c 4 -q 64 -t 2 \
    >"$WORK/dnsperf.txt" 2>&1 || true
  awk '/Queries per second:/ {printf "%.0f", $4}' "$WORK/dnsperf.txt"
}
cat >"$WORK/idle-conns.py" <<'EOF'
# Opens N TCP connections to ADDR:PORT and holds them idle; writes the count to READY, then
# sleeps HOLD seconds (bounded) and exits.
import socket, sys, time
addr, port, n, ready, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
socks, deadline = [], time.time() + 30
while len(socks) < n and time.time() < deadline:
    socks.append(socket.create_connection((addr, port), timeout=5))
open(ready, "w").write(str(len(socks)))
time.sleep(hold)
EOF

measure_row() { # one round of one row; $1 = 1 on the last round (adds the idle-connections test)
  start_row "$ROW" || { put error "did not start"; stop_row; return 0; }
  put load "$(cut -d' ' -f1 /proc/loadavg)"
  put rss_idle "$(mem VmRSS)"
  if phase tcp1; then c0=$(cpu); put tcp1_gbps "$(iperf 1)"; phase_cpu tcp1; fi
  if phase tcp4; then c0=$(cpu); put tcp4_gbps "$(iperf 4)"; phase_cpu tcp4; fi
  if phase ka; then c0=$(cpu); wrk_run ka; phase_cpu ka; fi
  if phase close; then c0=$(cpu); wrk_run close -H "Connection: close"; phase_cpu close; fi
  if phase sys; then syscalls_per ka; syscalls_per close -H "Connection: close"; fi
  if phase udp; then
    case $ROW in
      haproxy*) put udp_qps "n/a" ;;          # HAProxy relays no UDP
      nginx) put udp_qps "n/a" ;;             # not set up for UDP here (see BENCHMARKS.md)
      l2p-nat) put udp_qps "n/a" ;;           # Linkerd proxies no UDP
      *) c0=$(cpu); put udp_qps "$(dns_run)"; phase_cpu udp ;;
    esac
  fi
  if [ "$1" = 1 ] && phase idle; then
    rm -f "$WORK/ready"
    nsx "$C" python3 "$WORK/idle-conns.py" "$SVC" 8080 "$CONNS" "$WORK/ready" 8 &
    local hold=$!
    waitfor 300 test -s "$WORK/ready" || true
    sleep 1
    put conns_open "$(cat "$WORK/ready" 2>/dev/null || echo 0)"
    put rss_conns "$(mem VmRSS)"
    put router_estab "$(nsx "$R" ss -Htn state established | wc -l)"
    wait "$hold" 2>/dev/null || true
    put rss_peak "$(mem VmHWM)"
  fi
  if [ -n "$IPID" ] && [ "$ROW" != kernel-nat ] && [ "$ROW" != l2p-nat ]; then
    # Packets the `socket transparent 1` rule steered to accepted sockets: 0 would mean the
    # interceptor was bypassed (fail-open) and the row measured routing.
    put tproxied_pkts "$(nsx "$R" nft list chain inet etp established | awk '/socket transparent 1/ { for (i = 1; i < NF; i++) if ($i == "packets" && $(i + 1) ~ /^[0-9]+$/) { print $(i + 1); exit } }')"
  fi
  stop_row
}

# Rounds interleave the rows, so that a burst of other load on the machine hits one round of
# every row rather than every round of one row; each number in the table is the median of the
# rounds (the idle-connections test runs in the last round only).
: >"$RES"
for round in $(seq 1 "$ROUNDS"); do
  for ROW in $ROWS; do
    export ROW
    log "round $round/$ROUNDS: $ROW"
    measure_row "$([ "$round" = "$ROUNDS" ] && echo 1 || echo 0)"
  done
done

# ---- table and goals ------------------------------------------------------------------------
python3 - "$RES" "$SECS" <<'EOF'
import sys
import statistics
vals, order = {}, []
for line in open(sys.argv[1]):
    r, k, v = line.rstrip("\n").split("\t")
    if r not in vals: vals[r] = {}; order.append(r)
    vals[r].setdefault(k, []).append(v)
def agg(vs):
    try: x = statistics.median(float(v) for v in vs)
    except ValueError: return vs[0]
    return f"{x:.3f}".rstrip("0").rstrip(".") if x < 100 else f"{x:.0f}"
rows = {r: {k: agg(v) for k, v in ks.items()} for r, ks in vals.items()}
def f(r, k):
    try: return float(rows.get(r, {}).get(k, "nan"))
    except ValueError: return float("nan")
cols = [("tcp1_gbps", "TCP 1 stream Gb/s"), ("tcp4_gbps", "TCP 4 streams Gb/s"),
        ("ka_rps", "HTTP keep-alive req/s"), ("ka_p50", "p50 ms"), ("ka_p99", "p99 ms"),
        ("close_rps", "HTTP conn/s"), ("close_p99", "conn p99 ms"), ("udp_qps", "DNS UDP q/s"),
        ("sys_ka", "syscalls/req keep-alive"), ("sys_close", "syscalls/conn"),
        ("cpu_tcp1", "CPU s (TCP 1)"), ("cpu_ka", "CPU s (keep-alive)"), ("cpu_close", "CPU s (conn/s)"),
        ("rss_idle", "RSS idle MB"), ("rss_conns", "RSS 1k conns MB"), ("rss_peak", "RSS peak MB")]
print("\n| row | " + " | ".join(c[1] for c in cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for r in order:
    print(f"| {r} | " + " | ".join(rows[r].get(c[0], "-") for c in cols) + " |")
print("\nper round (medians above):")
for r in order:
    v = vals[r]; j = lambda k: " ".join(v.get(k, ["-"]))
    print(f"- {r}: TCP 1 stream {j('tcp1_gbps')} Gb/s; keep-alive {j('ka_rps')} req/s, p99 {j('ka_p99')} ms; "
          f"conn/s {j('close_rps')}; wrk errors {j('ka_errors')} / {j('close_errors')}; load avg {j('load')}; "
          f"idle conns open {j('conns_open')}, router sockets established {j('router_estab')}; "
          f"tproxied packets {j('tproxied_pkts')}")
peers = [p for p in ("haproxy", "haproxy-splice", "nginx") if p in rows]
if "etp" in rows and peers:
    best = lambda k, hi=True: (max if hi else min)((f(p, k), p) for p in peers)
    bt, bp = best("tcp1_gbps"); bc, bcp = best("close_rps"); bl, blp = best("ka_p99", False)
    e = lambda k: f("etp", k)
    goals = [
        (f"1-stream throughput >= 1.2x best peer ({bp} {bt})", e("tcp1_gbps") / bt, 1.2, True),
        ("1-stream throughput >= 0.6x routing-only" + (f" ({f('routing','tcp1_gbps')})" if "routing" in rows else ""),
         e("tcp1_gbps") / f("routing", "tcp1_gbps"), 0.6, True),
        (f"connection rate >= 1.2x best peer ({bcp} {bc:.0f})", e("close_rps") / bc, 1.2, True),
        (f"keep-alive p99 <= best peer's ({blp} {bl} ms)", e("ka_p99") / bl, 1.0, False),
        ("RSS idle < 20 MB", e("rss_idle"), 20, False),
        (f"RSS with {rows['etp'].get('conns_open','?')} idle connections < 64 MB", e("rss_conns"), 64, False),
    ]
    print("\ngoals (etp = default adaptive relay, action direct):")
    for name, v, lim, ge in goals:
        ok = v >= lim if ge else (v <= lim if lim == 1.0 else v < lim)
        print(f"- {'MET' if ok else 'NOT MET'}: {name}: {v:.2f} {'>=' if ge else '<'} {lim}")
EOF
