#!/bin/sh
# Every NIC removal and registration carries its true cause: reloads, rebinds, hot-plug, links, netns.
# kernels: bullseye trixie
# kernels-extra: bookworm sid
# arches: amd64 arm64
. /opt/hotplug/scenarios/_lib.sh

EVENTS=/tmp/events.jsonl
start_events "$EVENTS"
mode=$(json_str "$(head -n 1 "$EVENTS")" mode)
[ "$mode" = full ] || { head -n 1 "$EVENTS"; fail "the agent runs in mode '$mode', not full"; }

# The agent proper beside the event stream: its audit trail must name each event's task.
cat >/tmp/hotplug.toml <<'TOML'
state_dir = "/tmp/hotplug-state"
socket = "/run/hotplug/agent.sock"
TOML
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
RUN_PID=$!
wait_for_line /tmp/agent.log 'agent ready' 30 || { cat /tmp/agent.log; fail "the agent did not start"; }


# expect OP MAC ACTION CAUSE [FROM_LINE]: the first ACTION event for MAC after FROM_LINE has CAUSE.
expect() {
	op=$1 mac=$2 action=$3 cause=$4 from=$5
	line=$(tail -n +"$((from + 1))" "$EVENTS" | grep "\"type\":\"nic\",\"action\":\"$action\"" | grep "\"mac\":\"$mac\"" | head -n 1)
	seen=$(json_str "$line" cause)
	source=$(json_str "$line" source)
	check "$op: $action" "$cause/kernel" "${seen:-none}/${source:-none}"
}

# wait_registration MAC FROM_LINE: until a registration of MAC shows up after FROM_LINE.
wait_registration() {
	i=0
	while [ $i -lt 200 ]; do
		tail -n +"$(($2 + 1))" "$EVENTS" | grep "\"action\":\"registration\"" | grep -q "\"mac\":\"$1\"" && return 0
		sleep 0.05
		i=$((i + 1))
	done
	return 1
}

mark() { wc -l <"$EVENTS"; }

echo "--- expected against seen:"
check_header
for mac in 52:54:00:12:34:10 52:54:00:12:34:11 52:54:00:12:34:12; do
	iface=$(iface_of "$mac")
	[ -n "$iface" ] || fail "no NIC with MAC $mac"
	module=$(basename "$(readlink -f "/sys/class/net/$iface/device/driver/module")")
	ko=$(find /lib/modules/"$(uname -r)" -name "$module.ko" | head -n 1)

	from=$(mark)
	modprobe -r "$module"; modprobe "$module"
	wait_registration "$mac" "$from"
	expect "$module modprobe -r/modprobe" "$mac" removal driver-unload "$from"
	expect "$module modprobe -r/modprobe" "$mac" registration driver-load "$from"

	from=$(mark)
	rmmod "$module"; insmod "$ko"
	wait_registration "$mac" "$from"
	expect "$module rmmod/insmod" "$mac" removal driver-unload "$from"
	expect "$module rmmod/insmod" "$mac" registration driver-load "$from"

	iface=$(iface_of "$mac")
	dev=$(readlink -f "/sys/class/net/$iface/device")
	drv=$(readlink -f "$dev/driver")
	from=$(mark)
	basename "$dev" >"$drv/unbind"; basename "$dev" >"$drv/bind"
	wait_registration "$mac" "$from"
	expect "$module sysfs unbind/bind" "$mac" removal driver-unbind "$from"
	expect "$module sysfs unbind/bind" "$mac" registration driver-bind "$from"

	iface=$(iface_of "$mac")
	from=$(mark)
	vmctl unplug "$iface" && vmctl plug "$iface"
	wait_registration "$mac" "$from"
	expect "$module PCI hot-unplug/plug" "$mac" removal device-removed "$from"
	expect "$module PCI hot-unplug/plug" "$mac" registration device-added "$from"
done

from=$(mark)
ip link add va type veth peer name vb
ip link set va address 02:00:00:00:0a:01
ip link set vb address 02:00:00:00:0a:02
ip link del va
sleep 0.5
line=$(tail -n +"$((from + 1))" "$EVENTS" | grep '"action":"registration"' | grep '"name":"va"' | head -n 1)
check "veth ip link add: registration" link-created/kernel "$(json_str "$line" cause)/$(json_str "$line" source)"
expect "veth ip link del" 02:00:00:00:0a:01 removal link-deleted "$from"
expect "veth ip link del (peer)" 02:00:00:00:0a:02 removal link-deleted "$from"

# A move out is a removal here; its registration in the other namespace is filtered in the kernel
# (NIC events of other namespaces never reach the ring). A move back in is a registration here.
ip netns add other
ip link add vc address 02:00:00:00:0c:01 type veth peer name vd address 02:00:00:00:0c:02
from=$(mark)
ip link set vd netns other
sleep 0.5
expect "netns move out" 02:00:00:00:0c:02 removal netns-move "$from"
moved=$(tail -n +"$((from + 1))" "$EVENTS" | grep '"mac":"02:00:00:00:0c:02"')
left=$(echo "$moved" | grep '"action":"removal"' | head -n 1)
here=$(stat -L -c %i /proc/self/ns/net)
check "netns move out: removal in this namespace" "$here" "$(json_num "$left" netns)"
check "netns move out: registration in the other one reported" 0 "$(echo "$moved" | grep -c '"action":"registration"')"
from=$(mark)
ip -n other link set vd netns 1
sleep 0.5
expect "netns move in" 02:00:00:00:0c:02 registration netns-move "$from"
moved=$(tail -n +"$((from + 1))" "$EVENTS" | grep '"mac":"02:00:00:00:0c:02"')
arrived=$(echo "$moved" | grep '"action":"registration"' | head -n 1)
check "netns move in: registration in this namespace" "$here" "$(json_num "$arrived" netns)"
check "netns move in: removal in the other one reported" 0 "$(echo "$moved" | grep -c '"action":"removal"')"
stop_agent

# The audit trail: every NIC event the stream saw has its entry, with the task that made it.
# Read with the agent stopped (history needs no agent): nothing is written while it reads.
sleep 0.5
kill "$RUN_PID" 2>/dev/null
wait "$RUN_PID" 2>/dev/null
hotplug-agent --config /tmp/hotplug.toml history --json >/tmp/history.jsonl 2>/tmp/history.err
# audited KIND ACTION MAC-OR-MODULE CAUSE COMM: entries with all of these, the task a child of this script, uid 0.
audited() {
	grep "\"kind\":\"$1\"" /tmp/history.jsonl | grep "\"action\":\"$2\"" | grep "\"$3\"" |
		grep "\"cause\":\"$4\"\|\"kind\":\"module\"" | grep "\"comm\":\"$5\"" |
		grep "\"uid\":0[,}]" | grep -c "\"ppid\":$$[,}]"
}
for mac in 52:54:00:12:34:10 52:54:00:12:34:11 52:54:00:12:34:12; do
	module=$(grep "\"mac\":\"$mac\"" "$EVENTS" | grep -o '"module":"[^"]*"' | head -n 1 | cut -d'"' -f4)
	check "audit $module: modprobe -r unloads, by this script, uid 0" 1 "$(audited module unload "$module" - modprobe)"
	check "audit $module: rmmod unloads, by this script, uid 0" 1 "$(audited module unload "$module" - rmmod)"
	check "audit $mac: removal by modprobe" 1 "$(audited nic removal "$mac" driver-unload modprobe)"
	check "audit $mac: removal by rmmod" 1 "$(audited nic removal "$mac" driver-unload rmmod)"
	check "audit $mac: registration by insmod" 1 "$(audited nic registration "$mac" driver-load insmod)"
	check "audit $mac: the removal held its snapshot" 2 \
		"$(grep "\"mac\":\"$mac\"" /tmp/history.jsonl | grep '"cause":"driver-unload"' | grep -c 'driver-gone: hold the last snapshot')"
	hotplugged=$(grep "\"mac\":\"$mac\"" /tmp/history.jsonl | grep '"cause":"device-removed"' | grep -c '"uid":0')
	check "audit $mac: hot-unplug entry (a kernel worker's)" 1 "$hotplugged"
done
check "audit: veth va created by ip, by this script" 1 "$(audited nic registration va link-created ip)"
stream=$(grep '"type":"nic"' "$EVENTS" | grep -v '"name":"lo"' | grep -vc '"mac":""')
trail=$(grep -Ec '"kind":"nic","action":"(removal|registration)"' /tmp/history.jsonl)
check "audit: one entry per NIC event of the stream" "$stream" "$trail"
# busybox runs its applets in a forked shell without exec: their /proc command line is the
# shell's (a real modprobe's is its own). Reported, not checked.
with_cmdline=$(grep '"comm":"modprobe"' /tmp/history.jsonl | grep -c '"cmdline":')
echo "  audit: $with_cmdline modprobe entries of $(grep -c '"comm":"modprobe"' /tmp/history.jsonl) had a readable command line"
check "history: no unreadable line" "" "$(cat /tmp/history.err)"
vmctl report audit_entries "$(wc -l </tmp/history.jsonl)"

lost=$(grep -c '"lost"' "$EVENTS")
check "events lost" 0 "$lost"
vmctl report nic_events "$(grep -c '"type":"nic"' "$EVENTS")"
finish
