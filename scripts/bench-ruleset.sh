#!/usr/bin/env bash
# Ruleset engine benchmark: apply time for 1k..300k CIDRs with etp (netlink) and with `nft -f` of
# etp's own render (the same kernel work), audit time, and etp's peak RSS during apply.
# Each measurement runs in a fresh network namespace. Writes a Markdown table to stdout and to
# target/bench-ruleset.md. Usage: scripts/bench-ruleset.sh [path/to/etp] (root)
set -euo pipefail
ETP=$(realpath "${1:-target/release/etp}")
SIZES=${SIZES:-"1000 10000 100000 300000"}
RUNS=${RUNS:-3}
WORK=$(mktemp -d /tmp/etp-bench.XXXXXX)
NS="etpbench$$"
trap 'ip netns del "$NS" 2>/dev/null; rm -rf "$WORK"' EXIT
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (apt-get install time)"; exit 2; }

gen() { # N -> config with N disjoint /32s in 10.0.0.0/8.. plus a /64 per 10 for IPv6
  python3 - "$1" <<'PY'
import sys
n = int(sys.argv[1])
v4 = ",\n".join(f'"{10 + (i >> 22)}.{(i >> 14) & 255}.{(i >> 6) & 255}.{(i & 63) * 4}/32"' for i in range(n))
print(f"""[listener]
port = 15001
[[route]]
name = "bulk"
protocols = ["tcp"]
destinations = [
{v4}
]
ports = [80, "8000-8100"]
action = "linkerd"
""")
PY
}

fresh() { ip netns del "$NS" 2>/dev/null || true; ip netns add "$NS"; ip -n "$NS" link set lo up; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

out="| CIDRs | etp apply (ms) | nft -f render (ms) | etp / nft | etp audit (ms) | etp peak RSS apply (MiB) | batch bytes |\n|---:|---:|---:|---:|---:|---:|---:|\n"
for n in $SIZES; do
  gen "$n" > "$WORK/c.toml"
  "$ETP" render -c "$WORK/c.toml" > "$WORK/r.nft"
  ea=(); na=(); au=(); rss=(); bytes=0
  for _ in $(seq 1 "$RUNS"); do
    fresh
    t0=$(ms); ip netns exec "$NS" /usr/bin/time -f '%M' -o "$WORK/rss" "$ETP" apply -c "$WORK/c.toml" > "$WORK/apply.out"; t1=$(ms)
    ea+=($((t1 - t0))); rss+=($(cat "$WORK/rss"))
    bytes=$(grep -o '[0-9]* bytes' "$WORK/apply.out" | head -1 | cut -d' ' -f1)
    t0=$(ms); ip netns exec "$NS" "$ETP" audit -c "$WORK/c.toml" > /dev/null; t1=$(ms)
    au+=($((t1 - t0)))
    fresh
    t0=$(ms); ip netns exec "$NS" nft -f "$WORK/r.nft"; t1=$(ms)
    na+=($((t1 - t0)))
  done
  e=$(printf '%s\n' "${ea[@]}" | median); f=$(printf '%s\n' "${na[@]}" | median)
  a=$(printf '%s\n' "${au[@]}" | median); r=$(printf '%s\n' "${rss[@]}" | sort -n | tail -1)
  ratio=$(python3 -c "print(f'{$e/max($f,1):.2f}')")
  out+="| $n | $e | $f | $ratio | $a | $(python3 -c "print(f'{$r/1024:.1f}')") | $bytes |\n"
done
mkdir -p target
printf "%b" "$out" | tee target/bench-ruleset.md
