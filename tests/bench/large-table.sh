#!/bin/sh
# The large routing table case (issue: performance at scale), natively on this machine: the agent
# in a private network namespace manages one veth NIC (on a kernel with kprobes its eBPF programs
# are loaded into the host's kernel as usual; this machine's has none: degraded mode); 200,000
# blackhole routes are added to `main` with `ip -batch` (none on the NIC), then the NIC's address
# changes ten times, then 1,000 route changes a second go on for ten seconds in another table
# (none on the NIC either). Prints the agent's start-to-ready time, and its CPU time and RSS at
# each step, as `FIGURE name value`.
#
# Usage (as root, inside `unshare --net`): large-table.sh AGENT [ROUTES]
# `cargo xtask bench large-table` runs it.
set -eu
AGENT=$1
ROUTES=${2:-200000}
DIR=$(mktemp -d /tmp/hotplug-large-table.XXXXXX)
PID=
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DIR"' EXIT

ip link set lo up
ip link add hp0 address 02:00:00:00:7a:01 type veth peer name hp1
ip link set hp1 up
ip link set hp0 up
ip addr add 10.77.0.5/24 dev hp0
ip route add 10.78.0.0/16 via 10.77.0.1 dev hp0

cat >"$DIR/hotplug.toml" <<TOML
state_dir = "$DIR/state"
socket = "$DIR/agent.sock"
[imds]
enabled = false
TOML
"$AGENT" --config "$DIR/hotplug.toml" run 2>"$DIR/agent.log" &
PID=$!
i=0
until grep -q "agent ready" "$DIR/agent.log"; do
	i=$((i + 1))
	[ $i -gt 100 ] && { cat "$DIR/agent.log" >&2; echo "the agent did not start" >&2; exit 1; }
	sleep 0.1
done

# CPU time of the agent in ms (utime + stime, clock ticks), RSS in KiB.
TICK=$(getconf CLK_TCK)
cpu_ms() { awk -v t="$TICK" '{ print int(($14 + $15) * 1000 / t) }' "/proc/$PID/stat"; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$PID/status"; }
figure() { echo "FIGURE $1 $2"; }
now_ms() { awk '{ print int($1 * 1000) }' /proc/uptime; }

ready=$(sed -n 's/.*agent ready.* ready_ms=\([0-9.]*\).*/\1/p' "$DIR/agent.log" | head -n 1)
[ -n "$ready" ] && figure ready_ms "$ready"
sleep 1
figure idle_rss_kib "$(rss_kib)"
cpu0=$(cpu_ms)

# 200,000 blackhole routes in main, none through hp0.
awk -v n="$ROUTES" 'BEGIN { for (i = 0; i < n; i++) printf "route add blackhole 10.%d.%d.%d/32\n", 100 + int(i / 65536), int(i / 256) % 256, i % 256 }' >"$DIR/routes"
t0=$(now_ms)
ip -batch "$DIR/routes"
t1=$(now_ms)
figure ip_batch_ms $((t1 - t0))
sleep 3
cpu1=$(cpu_ms)
figure routes_added_agent_cpu_ms $((cpu1 - cpu0))
figure routes_added_rss_kib "$(rss_kib)"
figure overruns "$(grep -c 'buffer overrun' "$DIR/agent.log" || true)"

# Ten address changes on the managed NIC, each re-read by the agent.
for i in 1 2 3 4 5; do
	ip addr add "10.77.0.$((10 + i))/24" dev hp0
	sleep 0.3
	ip addr del "10.77.0.$((10 + i))/24" dev hp0
	sleep 0.3
done
sleep 1
cpu2=$(cpu_ms)
figure ten_address_changes_agent_cpu_ms $((cpu2 - cpu1))
figure final_rss_kib "$(rss_kib)"

# 1,000 route changes a second for ten seconds in table 100 (added, then deleted: 500 of each per
# second), through no managed NIC: the agent's CPU share and RSS while they go on.
for k in $(seq 0 499); do echo "route add blackhole 10.250.$((k / 250)).$((k % 250))/32 table 100"; done >"$DIR/churn-add"
sed 's/^route add/route del/' "$DIR/churn-add" >"$DIR/churn-del"
churn_cpu0=$(cpu_ms)
churn_t0=$(now_ms)
i=0
while [ $i -lt 10 ]; do
	start=$(now_ms)
	ip -batch "$DIR/churn-add"
	ip -batch "$DIR/churn-del"
	left=$((1000 - ($(now_ms) - start)))
	[ $left -gt 0 ] && sleep "$(awk -v l="$left" 'BEGIN { printf "%.3f", l / 1000 }')"
	i=$((i + 1))
done
churn_ms=$(($(now_ms) - churn_t0))
churn_cpu=$(($(cpu_ms) - churn_cpu0))
figure churn_changes_per_second $((10000 * 1000 / churn_ms))
figure churn_agent_cpu_percent "$(awk -v c="$churn_cpu" -v t="$churn_ms" 'BEGIN { printf "%.2f", 100 * c / t }')"
figure churn_rss_kib "$(rss_kib)"
kill -0 "$PID" || { cat "$DIR/agent.log" >&2; echo "the agent died" >&2; exit 1; }
