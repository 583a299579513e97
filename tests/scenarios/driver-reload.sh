#!/bin/sh
# Driver reloads restore each NIC's configuration at once; also across an agent SIGKILL and 60 reloads.
# kernels: bullseye trixie
# kernels-extra: bookworm sid
# arches: amd64 arm64
. /opt/hotplug/scenarios/_lib.sh

cat >/tmp/hotplug.toml <<'TOML'
state_dir = "/tmp/hotplug-state"
socket = "/run/hotplug/agent.sock"
return_timeout_seconds = 120
metrics_listen = "127.0.0.1:9464"
TOML
# metric NAME{LABELS}: its value in a scrape of the agent's endpoint (0 when absent).
metric() { wget -q -O - http://127.0.0.1:9464/metrics | awk -v k="$1" '$1 == k { v = $2 } END { print v + 0 }'; }
# metric_sum NAME: the sum of NAME's samples, whatever their labels.
metric_sum() { wget -q -O - http://127.0.0.1:9464/metrics | awk -v k="$1" 'index($1, k "{") == 1 || $1 == k { s += $2 } END { print s + 0 }'; }

# QEMU's user-mode network sends IPv6 router advertisements; their routes and SLAAC addresses come
# and go on their own clock. This scenario is about configuration an operator made: turn RA off.
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
for d in /proc/sys/net/ipv6/conf/eth*; do echo 0 >"$d/accept_ra"; done

MACS="52:54:00:12:34:10 52:54:00:12:34:11 52:54:00:12:34:12"

n=0
for mac in $MACS; do
	i=$(iface_of "$mac")
	ip link set "$i" mtu $((1400 + n * 100)) up
	ip addr add 10.0.$n.5/24 dev "$i"
	ip addr add 10.0.$n.6/24 dev "$i"
	ip -6 addr add fd00:$n::5/64 dev "$i" nodad
	ip route add default via 10.0.$n.1 dev "$i" metric $((100 + n))
	ip route add 192.168.5$n.0/24 via 10.0.$n.254 dev "$i"
	n=$((n + 1))
done
eth1=$(iface_of 52:54:00:12:34:11)
ip route add default via 10.0.1.1 dev "$eth1" table 10001
ip rule add from 10.0.1.5 lookup 10001 pref 10001
ip rule add from 10.0.1.6 lookup 10001 pref 10002
ip link property add dev "$eth1" altname eni-test-1

# The whole network configuration without ifindexes, once every NIC has carrier.
config() {
	for cm in $MACS; do
		j=0
		while [ "$(cat "/sys/class/net/$(iface_of "$cm")/carrier" 2>/dev/null)" != 1 ] && [ $j -lt 100 ]; do
			sleep 0.1
			j=$((j + 1))
		done
	done
	{
		# Link: name, admin flags, MTU (carrier and operational state are the wire's, not config).
		ip -o link show | sed 's/^[0-9]*: //; s/NO-CARRIER,//; s/,LOWER_UP//; s/ state [A-Z]*//; s/ qlen.*//; s/link\/ether.*//'
		ip -o addr show | sed 's/^[0-9]*: //; s/ tentative//; s/valid_lft.*//'
		ip route show table all | grep -v '^local \|^broadcast \|^multicast \|table local'
		ip -6 route show table all | grep -v '^local \|^multicast \|table local\|^anycast'
		ip rule show
		ip -d link show | grep altname
	} | sort
}

start_agent() {
	hotplug-agent --config /tmp/hotplug.toml run 2>>/tmp/agent.log &
	AGENT_PID=$!
	wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
}

# wait_restored MAC COUNT: until the agent reports at least COUNT restores... via the address.
wait_back() {
	j=0
	while [ $j -lt 200 ]; do
		i=$(iface_of "$1")
		[ -n "$i" ] && ip addr show dev "$i" | grep -q "10.0.$2.6/24" && ip route show dev "$i" | grep -q "192.168.5$2.0" && return 0
		sleep 0.05
		j=$((j + 1))
	done
	return 1
}

# A stand-in for IMDS on the guest's loopback that counts connections: a driver reload must not
# make the agent ask the metadata service anything.
ip addr add 169.254.169.254/32 dev lo
printf '#!/bin/sh\necho connection >>/tmp/imds.count\n' >/tmp/imds-count
chmod +x /tmp/imds-count
nc -ll -p 80 -e /tmp/imds-count &
IMDS_LOOP=$!
sleep 0.2
echo probe | nc -w 1 169.254.169.254 80 >/dev/null 2>&1
sleep 0.2
imds_count() { wc -l </tmp/imds.count 2>/dev/null || echo 0; }
check_header
check "the IMDS stand-in counts connections (self-test)" 1 "$(imds_count)"

before=$(config)
echo "$before" >/tmp/before.txt
start_agent

REMOVALS='hotplug_nic_events_total{action="removal",cause="driver-unload",source="kernel"}'
REGISTRATIONS='hotplug_nic_events_total{action="registration",cause="driver-load",source="kernel"}'
RESTORES='hotplug_restores_total{outcome="ok",reason="driver-reload"}'
LATENCIES=hotplug_restore_latency_seconds_count
removals=$(metric "$REMOVALS") registrations=$(metric "$REGISTRATIONS")
restores=$(metric "$RESTORES") latencies=$(metric "$LATENCIES")
check "metrics: mode full" 1 "$(metric 'hotplug_mode{mode="full"}')"
check "metrics: NICs present" 3 "$(metric 'hotplug_nics{state="present"}')"
n=0
for mac in $MACS; do
	i=$(iface_of "$mac")
	module=$(basename "$(readlink -f "/sys/class/net/$i/device/driver/module")")
	modprobe -r "$module"
	modprobe "$module"
	wait_back "$mac" "$n" || echo "NIC $mac not restored within 10 s"
	config >/tmp/after.txt
	diff /tmp/before.txt /tmp/after.txt >/tmp/diff.txt
	check "$module reload: config diff lines" 0 "$(wc -l </tmp/diff.txt)"
	[ -s /tmp/diff.txt ] && cat /tmp/diff.txt
	status=$(hotplug-agent --config /tmp/hotplug.toml status --detail)
	latency=$(printf '%s\n' "$status" |
		awk -v m="$mac" '$1 == m { f = 1; next } /^[0-9a-f][0-9a-f]:/ { f = 0 } f && /last restore:/ { print $3 }')
	vmctl report "restore_latency_us_$module" "${latency:-null}"
	echo "  $module: restore latency ${latency:-?} us"
	# Where the time went: the phases up to the last acknowledgement (all but the read-back) add up to the latency (the
	# sum is at most 2 ms more: each phase's end is read just after its last acknowledgement; 20 us
	# less for rounding), and the link phase, which holds the driver's open, is not empty. Both
	# from the same status.
	phases=$(printf '%s\n' "$status" |
		awk -v m="$mac" '$1 == m { f = 1; next } /^[0-9a-f][0-9a-f]:/ { f = 0 } f && /phases:/ { sub(/^ *phases: /, ""); print }')
	echo "  $module: phases: ${phases:-none}"
	vmctl report "restore_phases_$module" "\"${phases:-none}\""
	check "$module reload: restore phases add up to the latency" yes "$(echo "$phases" | awk -v l="${latency:-0}" -F', ' '
		NF >= 8 { for (i = 1; i <= NF; i++) { split($i, w, " "); if (w[1] != "read-back") sum += w[2]; if (w[1] == "link") link = w[2] }
			d = sum - l; print (d >= -20 && d <= 2000 && link > 0) ? "yes" : "no: sum " sum " us, link " link " us"; next }
		{ print "none" }')"
	n=$((n + 1))
done

# Three reloads: each counter moved by exactly three.
check "metrics: driver-unload removals, +3" $((removals + 3)) "$(metric "$REMOVALS")"
check "metrics: driver-load registrations, +3" $((registrations + 3)) "$(metric "$REGISTRATIONS")"
check "metrics: restores ok, +3" $((restores + 3)) "$(metric "$RESTORES")"
check "metrics: restore latencies observed, +3" $((latencies + 3)) "$(metric "$LATENCIES")"
check "metrics: no IMDS request" 0 "$(metric_sum hotplug_imds_requests_total)"
check "metrics: no lost record" 0 "$(metric hotplug_lost_records_total)"

# SIGKILL while the driver is away, restart, then bring the driver back.
modprobe -r e1000e
sleep 0.5
kill -9 "$AGENT_PID"
wait "$AGENT_PID" 2>/dev/null
start_agent
modprobe e1000e
wait_back 52:54:00:12:34:11 1 || echo "e1000e NIC not restored after the agent restart"
config >/tmp/after.txt
diff /tmp/before.txt /tmp/after.txt >/tmp/diff.txt
check "restored across an agent SIGKILL: diff lines" 0 "$(wc -l </tmp/diff.txt)"
[ -s /tmp/diff.txt ] && cat /tmp/diff.txt

# Sixty reloads back to back: configuration still equal, memory flat. glibc's heap grows in
# steps for a while after start-up (seen: +5 MiB once, somewhere in the first 30 reloads, then
# flat for 80; +1.8 MiB once in reloads 21-40 on 5.10), so a leak is anonymous memory that grows
# in both the second and the third twenty.
rss() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$AGENT_PID/status"; }
# anon: the agent's anonymous memory (heap, stacks), what a leak grows; the rest of RSS is the
# binary's pages, which the kernel pages in as code first runs.
anon() { sed -n 's/^RssAnon:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$AGENT_PID/status"; }
reload_virtio() {
	modprobe -r virtio_net
	modprobe virtio_net
	wait_back 52:54:00:12:34:10 0 || echo "reload: not restored in time"
}
reload_twenty() {
	k=0
	while [ $k -lt 20 ]; do reload_virtio; k=$((k + 1)); done
}
rss_start=$(rss)
reload_twenty
rss_20=$(rss)
anon_20=$(anon)
reload_twenty
rss_40=$(rss)
anon_40=$(anon)
# A third twenty: a leak grows in every twenty, a one-time step (an allocator's pool, a thread's
# first stack pages, whose moment varies under emulation: seen once in reloads 21-40 on 5.10) in one.
reload_twenty
rss_60=$(rss)
anon_60=$(anon)
# Only figures of a live agent count: a dead one reads as empty.
kill -0 "$AGENT_PID" 2>/dev/null || fail "the agent died during the reloads"
case "$anon_20$anon_40$anon_60" in *[!0-9]* | '') fail "no RssAnon for the agent: '$anon_20' '$anon_40' '$anon_60'" ;; esac
grew_21_40=$((anon_40 - anon_20))
grew_41_60=$((anon_60 - anon_40))
least=$grew_21_40
[ $grew_41_60 -lt $least ] && least=$grew_41_60
config >/tmp/after.txt
diff /tmp/before.txt /tmp/after.txt >/tmp/diff.txt
check "60 reloads: diff lines" 0 "$(wc -l </tmp/diff.txt)"
check "reloads 21-40 or 41-60: anonymous memory growth under 1 MiB" yes "$([ $least -lt 1024 ] && echo yes || echo "no: $anon_20 -> $anon_40 -> $anon_60 kB")"
vmctl report agent_rss_kib_start "$rss_start"
vmctl report agent_rss_kib_after_20_reloads "$rss_20"
vmctl report agent_rss_kib_after_40_reloads "$rss_40"
vmctl report agent_rss_kib_after_60_reloads "$rss_60"
echo "  agent RSS: $rss_start kB at start, $rss_20 kB after 20 reloads, $rss_40 kB after 40, $rss_60 kB after 60 (anonymous: $anon_20, $anon_40, $anon_60 kB)"
check "connections from the agent to IMDS" 0 "$(($(imds_count) - 1))"
vmctl report imds_connections "$(($(imds_count) - 1))"
kill "$IMDS_LOOP" 2>/dev/null
grep -E "WARN|ERROR" /tmp/agent.log | grep -v "DEGRADED\|degraded" | head -20
stop_agent
finish
