#!/bin/sh
# cloud-init's gate (`hotplug-agent cloud-init-gate`, fed cloud-init's FIFO line on fd 3) answers each uevent for what it was: an old detach's remove queued behind a reload is cloud-init's, the reload's is skipped; a VLAN child's add is cloud-init's though its parent has an add to skip; a NIC held for its driver but re-attached with the same MAC is an attach, not a return.
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

V=52:54:00:12:34:10 # virtio_net
E=52:54:00:12:34:11 # e1000e
X=52:54:00:12:34:12 # e1000
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
n=0
for mac in $V $E $X; do
	dev=$(iface_of "$mac")
	ip link set "$dev" up
	ip addr add "10.0.$n.5/24" dev "$dev"
	n=$((n + 1))
done
cat >/tmp/hotplug.toml <<'TOML'
state_dir = "/tmp/hotplug-state"
socket = "/run/hotplug/agent.sock"
[imds]
enabled = false
TOML
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
sleep 1

# gate ACTION DEVPATH: what the gate does with cloud-init's line for this uevent: skip (it exits
# 0 without running cloud-init) or handle (it runs cloud-init's hook, which this guest does not
# have: it exits non-zero).
gate() {
	printf -- '--subsystem=net handle --devpath=%s --udevaction=%s\n' "$2" "$1" >/tmp/gate.line
	if hotplug-agent --config /tmp/hotplug.toml cloud-init-gate 3</tmp/gate.line >>/tmp/gate.out 2>&1; then
		echo skip
	else
		echo handle
	fi
}
devpath_of() { readlink -f "/sys/class/net/$1" | sed 's|^/sys||'; }
# events MAC: how many removals and registrations of MAC the audit trail holds.
events() { hotplug-agent --config /tmp/hotplug.toml history --json 2>/dev/null | grep "\"mac\":\"$1\"" | grep -c '"action":"re\(moval\|gistration\)"'; }
wait_events() { wait_until 20 "[ \$(hotplug-agent --config /tmp/hotplug.toml history --json 2>/dev/null | grep '\"mac\":\"$1\"' | grep -c '\"action\":\"re\\(moval\\|gistration\\)\"') -ge $2 ]"; }

check_header
# 1. e1000's NIC detached for real (a PCI hot-unplug) and attached again, then its driver
# reloaded; cloud-init's queue still holds the detach's remove, ahead of the reload's.
x=$(iface_of $X)
old=$(devpath_of "$x")
base=$(events $X)
vmctl unplug "$x" && vmctl plug "$x"
wait_events $X $((base + 2)) || fail "the agent did not see the detach and attach"
modprobe -r e1000 && modprobe e1000
wait_events $X $((base + 4)) || fail "the agent did not see the reload"
sleep 0.5
x=$(iface_of $X)
echo "  detach's DEVPATH $old, now $(devpath_of "$x")"
check "the detach's remove (asked first)" handle "$(gate remove "$old")"
check "the reload's remove" skip "$(gate remove "$(devpath_of "$x")")"
check "the first add (the device as it is now)" skip "$(gate add "$(devpath_of "$x")")"
check "the second add" handle "$(gate add "$(devpath_of "$x")")"

# 2. virtio's NIC reloaded (its add not asked yet), then a VLAN child with its MAC.
v=$(iface_of $V)
base=$(events $V)
modprobe -r virtio_net && modprobe virtio_net
wait_events $V $((base + 2)) || fail "the agent did not see virtio_net's reload"
v=$(iface_of $V)
modprobe 8021q || fail "no 8021q module"
ip link add link "$v" name vlan100 type vlan id 100
check "a VLAN child's add" handle "$(gate add "$(devpath_of vlan100)")"
check "its parent's add" skip "$(gate add "$(devpath_of "$v")")"
check "its parent's remove" skip "$(gate remove "$(devpath_of "$v")")"
ip link del vlan100

# 3. e1000e's NIC unbound from its driver (held for its return), then its PCI function removed
# and found again (the same MAC attached anew): an attach, not a return.
e=$(iface_of $E)
dev=$(readlink -f "/sys/class/net/$e/device")
bdf=$(basename "$dev")
old=$(devpath_of "$e")
restores_before=$(hotplug-agent --config /tmp/hotplug.toml history --json 2>/dev/null | grep "\"mac\":\"$E\"" | grep -c '"kind":"restore"')
base=$(events $E)
echo "$bdf" >/sys/bus/pci/drivers/e1000e/unbind
wait_events $E $((base + 1)) || fail "the agent did not see the unbind"
echo 1 >"/sys/bus/pci/devices/$bdf/remove"
echo 1 >/sys/bus/pci/rescan
wait_events $E $((base + 2)) || fail "the agent did not see the NIC come back"
sleep 0.5
reg=$(hotplug-agent --config /tmp/hotplug.toml history --json 2>/dev/null | grep "\"mac\":\"$E\"" | grep '"action":"registration"' | tail -n 1)
echo "  registration: $reg"
check "its registration's cause" device-added "$(json_str "$reg" cause)"
check "the unbind's remove" skip "$(gate remove "$old")"
check "the re-attach's add" handle "$(gate add "$(devpath_of "$(iface_of $E)")")"
check "no restore of the held snapshot" "$restores_before" \
	"$(hotplug-agent --config /tmp/hotplug.toml history --json 2>/dev/null | grep "\"mac\":\"$E\"" | grep -c '"kind":"restore"')"
grep "cloud-init not run\|passing to cloud-init" /tmp/gate.out | sed 's/^/  gate: /'
stop_agent
finish
