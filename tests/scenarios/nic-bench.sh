#!/bin/sh
# Benchmark (figures, not a timed test): event delivery latency, a veth storm, eBPF cost per event.
# kernels: bookworm
# kernels-extra: bullseye
# bench: yes
. /opt/hotplug/scenarios/_lib.sh

PAIRS=${HOTPLUG_BENCH_PAIRS:-250}
EVENTS=/tmp/events.jsonl
echo 1 >/proc/sys/kernel/bpf_stats_enabled || fail "cannot enable BPF run-time statistics"

start=$(cut -d' ' -f1 /proc/uptime)
start_events "$EVENTS"
ready=$(cut -d' ' -f1 /proc/uptime)
vmctl report agent_start_seconds "$(awk -v a="$start" -v b="$ready" 'BEGIN { printf "%.2f", b - a }')"

i=0
: >/tmp/add.batch
: >/tmp/del.batch
while [ $i -lt "$PAIRS" ]; do
	echo "link add st$i type veth peer name su$i" >>/tmp/add.batch
	echo "link del st$i" >>/tmp/del.batch
	i=$((i + 1))
done
ip -batch /tmp/add.batch || fail "creating $PAIRS veth pairs failed"
ip -batch /tmp/del.batch || fail "deleting them failed"
expected=$((PAIRS * 4))
i=0
while [ "$(grep -c '"type":"nic"' "$EVENTS")" -lt "$expected" ] && [ $i -lt 1200 ]; do
	grep -q '"type":"resync"' "$EVENTS" && break
	sleep 0.05
	i=$((i + 1))
done
hotplug-agent bpf-stats >/tmp/bpf-stats.txt
stop_agent

grep '"type":"nic"' "$EVENTS" | grep -E '"name":"s[tu][0-9]+"' >/tmp/storm.jsonl
seen=$(wc -l </tmp/storm.jsonl)
lost=$(grep '"type":"lost"' "$EVENTS" | sed -n 's/.*"events":\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
resyncs=$(grep -c '"type":"resync"' "$EVENTS")

# Delivery latency: received_ns - timestamp_ns (both CLOCK_MONOTONIC).
sed -n 's/.*"timestamp_ns":\([0-9]*\).*"received_ns":\([0-9]*\).*/\1 \2/p' /tmp/storm.jsonl >/tmp/ts.txt
awk '{ print ($2 - $1) / 1000 }' /tmp/ts.txt | sort -n >/tmp/lat.txt
n=$(wc -l </tmp/lat.txt)
pct() { sed -n "$(((n * $1 + 99) / 100))p" /tmp/lat.txt; }
p50=$(pct 50)
p99=$(pct 99)
span=$(awk 'NR == 1 { lo = $1; hi = $1 } { if ($1 < lo) lo = $1; if ($1 > hi) hi = $1 } END { printf "%.3f", (hi - lo) / 1e9 }' /tmp/ts.txt)
rate=$(awk -v n="$seen" -v s="$span" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print 0 }')

echo "--- bpf run-time statistics:"
cat /tmp/bpf-stats.txt
per_event=$(awk -v n="$seen" '{ for (i = 1; i <= NF; i++) if ($i == "total") t += $(i + 1) } END { if (n > 0) printf "%.0f", t / n; else print 0 }' /tmp/bpf-stats.txt)
unreg_avg=$(awk '$2 == "netdev_unregist" { for (i = 1; i <= NF; i++) if ($i == "avg") print $(i + 1) }' /tmp/bpf-stats.txt)
reg_avg=$(awk '$2 == "netdev_register" { for (i = 1; i <= NF; i++) if ($i == "avg") print $(i + 1) }' /tmp/bpf-stats.txt | sort -n | tail -n 1)

echo "--- figures:"
echo "  storm: $PAIRS veth pairs, $expected NIC events expected, $seen seen, $lost lost, $resyncs resyncs"
echo "  kernel span ${span} s, ${rate} events/s; delivery latency p50 ${p50} us, p99 ${p99} us"
echo "  eBPF time per NIC event (all programs): ${per_event} ns"
vmctl report storm_pairs "$PAIRS"
vmctl report storm_events_expected "$expected"
vmctl report storm_events_seen "$seen"
vmctl report storm_events_lost "$lost"
vmctl report storm_resyncs "$resyncs"
vmctl report storm_events_per_second "$rate"
vmctl report latency_p50_us "${p50:-null}"
vmctl report latency_p99_us "${p99:-null}"
vmctl report ebpf_ns_per_nic_event "$per_event"
vmctl report ebpf_unregister_avg_ns "${unreg_avg:-null}"
vmctl report ebpf_register_avg_ns "${reg_avg:-null}"

check_header
# Zero unexplained loss: every event arrived, or every loss was reported and followed by a resync.
check "storm events all seen or loss explained" yes "$([ "$seen" -eq "$expected" ] || { [ "$lost" -gt 0 ] && [ "$resyncs" -gt 0 ]; } && echo yes || echo no)"
check "seen + lost covers expected" yes "$([ $((seen + lost)) -ge "$expected" ] && echo yes || echo no)"
finish
