#!/bin/sh
# hotplug-agent reload: e1000e with a new InterruptThrottleRate while another NIC keeps its gateway; a value the module refuses rolls back; the client killed mid-reload.
# kernels: sid
# kernels-extra: bookworm trixie bullseye
. /opt/hotplug/scenarios/_lib.sh

cat >/tmp/hotplug.toml <<'TOML'
state_dir = "/tmp/hotplug-state"
socket = "/run/hotplug/agent.sock"
return_timeout_seconds = 120
TOML
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
for d in /proc/sys/net/ipv6/conf/eth*; do echo 0 >"$d/accept_ra"; done

V=52:54:00:12:34:10 # virtio_net: the NIC that keeps working
E=52:54:00:12:34:11 # e1000e: the one reloaded
# Each NIC is on a QEMU user network of its own (NIC i: 10.0.i.0/24), whose host 10.0.i.1
# answers ARP.
v=$(iface_of $V)
e=$(iface_of $E)
ip link set "$v" up
ip link set "$e" up mtu 1400
ip addr add 10.0.0.5/24 dev "$v"
ip addr add 10.0.1.5/24 dev "$e"
ip route add default via 10.0.1.1 dev "$e" metric 100
ip route add 192.168.60.0/24 via 10.0.1.1 dev "$e"
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }

# The reloaded NIC's configuration on one line, without ifindexes, carrier, or what the kernel
# makes by itself (its IPv6 link-local address, in DAD or not; routes of its addresses).
config_of() {
	i=$(iface_of "$1")
	[ -n "$i" ] || { echo "no NIC $1"; return; }
	{
		ip -o link show dev "$i" | sed 's/^[0-9]*: //; s/NO-CARRIER,//; s/,LOWER_UP//; s/ state [A-Z]*//; s/ qlen.*//; s/link\/ether.*//'
		ip -o addr show dev "$i" | grep -v 'inet6 fe80::' | sed 's/^[0-9]*: //; s/ tentative//; s/valid_lft.*//'
		ip route show dev "$i" | grep -v 'proto kernel' | sed 's/ linkdown//'
	} | tr -s ' \n' ' ;'
}
before=$(config_of $E)
itr() { dmesg | grep -c "Interrupt Throttling Rate (ints/sec) set to $1"; }
# While reloads go on, the other NIC's gateway keeps answering (an ARP request every 0.2 s).
arping_loop() {
	: >/tmp/arping.ok; : >/tmp/arping.lost
	while [ ! -e /tmp/arping.stop ]; do
		if arping -q -c 1 -w 1 -I "$v" 10.0.0.1; then echo >>/tmp/arping.ok; else echo >>/tmp/arping.lost; fi
		sleep 0.2
	done
}
arping_loop &
ARPING=$!
check_header

hotplug-agent --config /tmp/hotplug.toml reload e1000e --param InterruptThrottleRate=4000 --dry-run >/tmp/plan.txt
cat /tmp/plan.txt
check "dry run: the plan names the NIC and its gateway" 1 "$(grep -c "NIC $e ($E): restored from its snapshot, then gateway 10.0.1.1" /tmp/plan.txt)"
check "dry run: the plan's commands" 2 "$(grep -c 'would run: modprobe -r e1000e\|would run: modprobe e1000e InterruptThrottleRate=4000' /tmp/plan.txt)"
check "dry run: nothing reloaded" 0 "$(itr 4000)"
hotplug-agent --config /tmp/hotplug.toml reload 'e1000e;reboot' >/tmp/bad.txt 2>&1
check "a name that is not a module: refused, exit 1" "1 1" "$? $(grep -c 'refused' /tmp/bad.txt)"
hotplug-agent --config /tmp/hotplug.toml reload virtio_pci >/tmp/bad.txt 2>&1
check "a module that drives no NIC: refused" 1 "$(grep -c 'error: no NIC uses virtio_pci' /tmp/bad.txt)"
# e1000's NIC moved into a container's namespace: a reload would destroy it and bring it back
# unconfigured here; refused, naming its PCI device.
x=$(iface_of 52:54:00:12:34:12)
bdf=$(basename "$(readlink -f "/sys/class/net/$x/device")")
ip netns add ctr
ip link set "$x" netns ctr
hotplug-agent --config /tmp/hotplug.toml reload e1000 --dry-run --json >/tmp/moved.json 2>&1
check "a NIC of the driver in another namespace: refused" refused "$(json_str "$(cat /tmp/moved.json)" status)"
check "the refusal names its device" 1 "$(grep -c "$bdf bound to e1000 has its network interface in another network namespace" /tmp/moved.json)"
ip -n ctr link set "$x" netns 1
ip netns del ctr

# 1. A reload with a new parameter.
hotplug-agent --config /tmp/hotplug.toml reload e1000e --param InterruptThrottleRate=4000 >/tmp/r1.txt
rc=$?
cat /tmp/r1.txt
check "reload ITR=4000: exit status" 0 "$rc"
check "reload ITR=4000: status ok" 1 "$(grep -c '^reload e1000e InterruptThrottleRate=4000: ok$' /tmp/r1.txt)"
check "reload ITR=4000: the parameter is in effect" 1 "$(itr 4000)"
check "reload ITR=4000: NIC read back ok, gateway reachable" 1 "$(grep "NIC $e ($E)" /tmp/r1.txt | grep -c 'read-back ok, gateway: 10.0.1.1 reachable')"
check "reload ITR=4000: report has down and restore times" 1 "$(grep "NIC $e ($E)" /tmp/r1.txt | grep -c 'down [0-9]* ms, restore [0-9]* ms')"
check "reload ITR=4000: configuration equal" "$before" "$(config_of $E)"
check "status --detail keeps the report" 1 "$(status_of $E | grep -c 'last reload: down [0-9]* ms, restore [0-9]* ms, read-back ok, gateway: 10.0.1.1 reachable')"

# 2. A value the module refuses: e1000e does not load, the agent loads it as configured.
hotplug-agent --config /tmp/hotplug.toml reload e1000e --param InterruptThrottleRate=fast --json >/tmp/r2.json
rc=$?
cat /tmp/r2.json; echo
check "refused parameter: exit status" 1 "$rc"
check "refused parameter: rolled back" rolled-back "$(json_str "$(cat /tmp/r2.json)" status)"
check "refused parameter: the rollback load ran" 1 "$(grep -o 'rollback: modprobe e1000e (its configured parameters): ok' /tmp/r2.json | wc -l)"
check "refused parameter: NIC back and equal" "$before" "$(config_of $E)"
check "refused parameter: NIC read back ok" 1 "$(grep -o '"read_back":"ok"' /tmp/r2.json | wc -l)"

# 3. The client killed mid-reload: the agent carries on.
hotplug-agent --config /tmp/hotplug.toml reload e1000e --param InterruptThrottleRate=3000 >/dev/null 2>&1 &
CLIENT=$!
# Killed once the agent has begun (its log says so), before the reload can have ended.
wait_for_line /tmp/agent.log "guided reload: modprobe -r e1000e, then modprobe e1000e InterruptThrottleRate=3000" 10
kill -9 $CLIENT
wait $CLIENT 2>/dev/null
check "client killed: the reload finished within 30 s" yes \
	"$(wait_until 30 '[ "$(hotplug-agent --config /tmp/hotplug.toml history | grep -c "reload ok module e1000e")" -ge 2 ]' && echo yes || echo no)"
check "client killed: the reload finished (ITR=3000 in effect)" 1 "$(itr 3000)"
check "client killed: configuration equal" "$before" "$(config_of $E)"

# 4. An agent stopped between the unload and the load (its marker left behind): the next one
# loads the module again and restores the NIC.
kill "$AGENT_PID" 2>/dev/null
wait "$AGENT_PID" 2>/dev/null
modprobe -r e1000e
echo e1000e >/tmp/hotplug-state/reload-in-progress
hotplug-agent --config /tmp/hotplug.toml run 2>>/tmp/agent.log &
AGENT_PID=$!
check "interrupted reload: the next agent loads the module again" yes \
	"$(wait_until 30 '[ -e /sys/module/e1000e/initstate ] && [ ! -e /tmp/hotplug-state/reload-in-progress ]' && echo yes || echo no)"
j=0
while [ $j -lt 300 ] && [ "$(config_of $E)" != "$before" ]; do
	sleep 0.1
	j=$((j + 1))
done
check "interrupted reload: NIC restored equal" "$before" "$(config_of $E)"
check "interrupted reload: in the audit trail" 1 "$(hotplug-agent --config /tmp/hotplug.toml history | grep -c 'reload interrupted module e1000e')"

touch /tmp/arping.stop
wait $ARPING 2>/dev/null
ok=$(wc -l </tmp/arping.ok) lost=$(wc -l </tmp/arping.lost)
echo "  the other NIC's gateway: $ok ARP answers, $lost without answer"
check "the other NIC's gateway answered throughout" 0 "$lost"
check "the other NIC's gateway was asked" yes "$([ "$ok" -gt 5 ] && echo yes || echo no)"
check "audit trail: two reloads ok, one rolled back" "2 1" \
	"$(hotplug-agent --config /tmp/hotplug.toml history | grep -c 'reload ok module e1000e') $(hotplug-agent --config /tmp/hotplug.toml history | grep -c 'reload rolled-back module e1000e')"
vmctl report guided_reload_total_ms "$(sed -n 's/.*total \([0-9]*\) ms.*/\1/p' /tmp/r1.txt)"
kill "$AGENT_PID" 2>/dev/null
wait "$AGENT_PID" 2>/dev/null
finish
