#!/bin/sh
# Benchmark (figures only): each driver's reload restore against its floor: the agent's replay (pre-read to last acknowledgement) beside `ip -batch` of the same objects, on the same NIC after the same reload with the agent stopped.
# kernels: bookworm
# kernels-extra: bullseye
# bench: yes
. /opt/hotplug/scenarios/_lib.sh

ROUNDS=${HOTPLUG_BENCH_ROUNDS:-5}
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
for d in /proc/sys/net/ipv6/conf/eth*; do echo 0 >"$d/accept_ra"; done
MACS="52:54:00:12:34:10 52:54:00:12:34:11 52:54:00:12:34:12"
cat >/tmp/hotplug.toml <<'TOML'
state_dir = "/tmp/hotplug-state"
socket = "/run/hotplug/agent.sock"
return_timeout_seconds = 120
[imds]
enabled = false
TOML

# The objects of NIC number N on interface IF, as `ip -batch` lines: what the agent restores.
objects() {
	echo "link set dev $2 mtu $((1400 + $1 * 100))"
	echo "address add 10.0.$1.5/24 dev $2"
	echo "address add 10.0.$1.6/24 dev $2"
	echo "address add fd00:$1::5/64 dev $2 nodad"
	echo "link set dev $2 up"
	echo "route add default via 10.0.$1.1 dev $2 metric $((100 + $1))"
	echo "route add 192.168.5$1.0/24 via 10.0.$1.254 dev $2"
}
n=0
for mac in $MACS; do
	objects $n "$(iface_of "$mac")" >/tmp/objects.batch
	ip -batch /tmp/objects.batch || fail "configuring $mac failed"
	n=$((n + 1))
done
module_of() { basename "$(readlink -f "/sys/class/net/$(iface_of "$1")/device/driver/module")"; }
# reregister MAC: the driver's reload, until the NIC is back (named).
reregister() {
	module=$(module_of "$1")
	# (busybox's modprobe -r can fail on a dependency still in use after the driver went)
	modprobe -r "$module"
	[ -z "$(iface_of "$1")" ] || fail "$module: the NIC did not go"
	modprobe "$module"
	j=0
	while [ -z "$(iface_of "$1")" ] && [ $j -lt 200 ]; do sleep 0.02; j=$((j + 1)); done
	[ -n "$(iface_of "$1")" ] || fail "$module: the NIC did not come back"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "null") }'; }
# phase NAME PHASES: the microseconds of one phase in a `status --detail` phases line.
phase() { echo "$2" | tr ',' '\n' | awk -v p="$1" '$1 == p { print $2 }'; }

hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
check_header
n=0
for mac in $MACS; do
	module=$(module_of "$mac")
	: >/tmp/latency.txt
	: >/tmp/replay.txt
	: >/tmp/link.txt
	r=0
	while [ $r -lt "$ROUNDS" ]; do
		before=$(grep -c "restored" /tmp/agent.log)
		reregister "$mac"
		j=0
		while [ "$(grep -c "restored" /tmp/agent.log)" -le "$before" ] && [ $j -lt 200 ]; do sleep 0.05; j=$((j + 1)); done
		[ "$(grep -c "restored" /tmp/agent.log)" -gt "$before" ] || { tail -20 /tmp/agent.log; fail "$module: no restore logged within 10 s"; }
		status=$(hotplug-agent --config /tmp/hotplug.toml status --detail)
		nic() { printf '%s\n' "$status" | awk -v m="$mac" -v k="$1" '$1 == m { f = 1; next } /^[0-9a-f][0-9a-f]:/ { f = 0 } f && index($0, k) { sub(/^ *[a-z ]*: /, ""); print; exit }'; }
		latency=$(nic "last restore:" | awk '{ print $1 }')
		phases=$(nic "phases:")
		replay=0
		for p in pre-read link tuning addresses routes rules; do replay=$((replay + $(phase $p "$phases"))); done
		echo "$latency" >>/tmp/latency.txt
		echo "$replay" >>/tmp/replay.txt
		phase link "$phases" >>/tmp/link.txt
		r=$((r + 1))
	done
	vmctl report "reload_${module}_latency_p50_us" "$(median </tmp/latency.txt)"
	vmctl report "reload_${module}_replay_p50_us" "$(median </tmp/replay.txt)"
	vmctl report "reload_${module}_link_p50_us" "$(median </tmp/link.txt)"
	echo "  $module: registration to last ack $(median </tmp/latency.txt) us, replay $(median </tmp/replay.txt) us (link $(median </tmp/link.txt) us)" | tee -a /tmp/figures.txt
	n=$((n + 1))
done
stop_agent

# The floor: the same reload without the agent, then the same objects with one `ip -batch`. Its
# figure is net of starting `ip` (an empty batch, timed the same way: tens of ms under emulation),
# which the agent, already running, does not pay; the raw figure is reported too.
: >/tmp/empty.batch
: >/tmp/start.txt
r=0
while [ $r -lt "$ROUNDS" ]; do
	hotplug-bench time ip -batch /tmp/empty.batch >>/tmp/start.txt || fail "ip -batch of nothing failed"
	r=$((r + 1))
done
ip_start=$(median </tmp/start.txt)
vmctl report ip_batch_start_p50_us "$ip_start"
echo "  starting ip -batch: $ip_start us"
n=0
for mac in $MACS; do
	module=$(module_of "$mac")
	: >/tmp/floor.txt
	r=0
	while [ $r -lt "$ROUNDS" ]; do
		reregister "$mac"
		objects $n "$(iface_of "$mac")" >/tmp/objects.batch
		hotplug-bench time ip -batch /tmp/objects.batch >>/tmp/floor.txt || fail "ip -batch failed on $mac"
		r=$((r + 1))
	done
	raw=$(median </tmp/floor.txt)
	vmctl report "reload_${module}_floor_raw_p50_us" "$raw"
	vmctl report "reload_${module}_floor_p50_us" $((raw - ip_start))
	echo "  $module: ip -batch floor $((raw - ip_start)) us ($raw us with starting ip)" | tee -a /tmp/figures.txt
	n=$((n + 1))
done
check "a replay and a floor measured for each driver" 6 "$(grep -cE '^  [a-z0-9_]+: (registration to last ack [0-9]+ us, replay [0-9]+ us|ip -batch floor [0-9]+ us)' /tmp/figures.txt)"
finish
