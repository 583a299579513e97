#!/bin/sh
# Benchmark (figures only): restore latency for 1/10/100 addresses+routes vs the netlink floor; agent idle cost.
# kernels: bookworm
# kernels-extra: bullseye
# arches: amd64 arm64
# bench: yes
. /opt/hotplug/scenarios/_lib.sh

hotplug-bench restore 20 >/tmp/bench.txt || { cat /tmp/bench.txt; fail "hotplug-bench failed"; }
cat /tmp/bench.txt
for n in 1 10 100; do
	line=$(grep "^BENCH restore n=$n " /tmp/bench.txt)
	for key in p50_us p99_us floor_p50_us floor_p99_us; do
		vmctl report "restore_n${n}_$key" "$(echo "$line" | sed -n "s/.* $key=\([0-9]*\).*/\1/p")"
	done
done

# Idle cost of the running agent: resident memory and wake-ups per second over 10 s.
printf 'state_dir = "/tmp/hotplug-state"\nsocket = "/run/hotplug/agent.sock"\n' >/tmp/hotplug.toml
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
# Start to ready in full mode: kernel features, BTF, the eBPF object loaded (the verifier runs
# emulated here) and attached (probes_ms); every NIC read (nics_ms).
for part in probes_ms nics_ms ready_ms; do
	value=$(sed -n "s/.*agent ready.* $part=\([0-9.]*\).*/\1/p" /tmp/agent.log | head -n 1)
	vmctl report "agent_$part" "${value:-null}"
done
sleep 2
switches() { awk '/ctxt_switches/ { s += $2 } END { print s }' /proc/$AGENT_PID/task/*/status; }
s0=$(switches)
sleep 10
s1=$(switches)
rss=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' /proc/$AGENT_PID/status)
# Of which: the heap and stacks; the binary's, the libraries' and the BPF maps' pages (a ring
# buffer's are mapped pages of the kernel's, counted as file pages); shared memory.
for part in RssAnon RssFile RssShmem; do
	vmctl report "agent_idle_$(echo "$part" | tr 'A-Z' 'a-z')_kib" "$(sed -n "s/^$part:[[:space:]]*\([0-9]*\).*/\1/p" /proc/$AGENT_PID/status)"
done
stop_agent
wakeups=$(awk -v a="$s0" -v b="$s1" 'BEGIN { printf "%.1f", (b - a) / 10 }')
echo "agent idle: RSS $rss kB, $wakeups wake-ups/s"
vmctl report agent_idle_rss_kib "$rss"
vmctl report agent_idle_wakeups_per_second "$wakeups"
check_header
check "restore benchmark produced figures for n=100" yes "$(grep -q '^BENCH restore n=100 ' /tmp/bench.txt && echo yes || echo no)"
finish
