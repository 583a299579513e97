#!/bin/sh
# Degraded mode takes uevents from the kernel only: a process's forged `remove@/module/e1000e` just before a real unbind neither makes the unbind a driver unload nor goes uncounted.
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

E=52:54:00:12:34:11 # e1000e
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
dev=$(iface_of $E)
ip link set "$dev" up
ip addr add 10.0.1.5/24 dev "$dev"
ip route add 192.168.51.0/24 via 10.0.1.254 dev "$dev"
bdf=$(basename "$(readlink -f "/sys/class/net/$dev/device")")
cat >/tmp/hotplug.toml <<'TOML'
state_dir = "/tmp/hotplug-state"
socket = "/run/hotplug/agent.sock"
metrics_listen = "127.0.0.1:9464"
[imds]
enabled = false
TOML
metric() { wget -q -O - http://127.0.0.1:9464/metrics | awk -v k="$1" '$1 == k { v = $2 } END { print v + 0 }'; }
IGNORED='hotplug_ignored_uevents_total{reason="not-from-kernel"}'

check_header
# Degraded on purpose (as partial-probes does): NIC causes come from the heuristics, which read
# uevents.
hotplug-agent --config /tmp/hotplug.toml --disable-probe delete_module_enter,delete_module_exit run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
check "metrics: degraded mode" 1 "$(metric 'hotplug_mode{mode="degraded"}')"
sleep 1 # the snapshot settles

# The forgery, then the real unbind within the heuristics' window.
forge uevent remove /module/e1000e SUBSYSTEM=module >/tmp/forge.json || fail "forge could not send: $(cat /tmp/forge.json)"
echo "  forged: $(cat /tmp/forge.json)"
echo "$bdf" >/sys/bus/pci/drivers/e1000e/unbind
sleep 1
echo "$bdf" >/sys/bus/pci/drivers/e1000e/bind
back() { i=$(iface_of $E) && ip addr show dev "$i" | grep -q 10.0.1.5/24 && ip route show dev "$i" | grep -q 192.168.51.0; }
j=0
while ! back && [ $j -lt 300 ]; do sleep 0.1; j=$((j + 1)); done
check "the NIC's address and route back after the rebind" yes "$(back && echo yes || echo no)"
removal=$(hotplug-agent --config /tmp/hotplug.toml history --json 2>/dev/null | grep '"action":"removal"' | grep "\"mac\":\"$E\"" | tail -n 1)
echo "  removal: $removal"
check "the removal's cause (heuristic)" driver-unbind/heuristic "$(json_str "$removal" cause)/$(json_str "$removal" source)"
check "forged uevents counted" 1 "$(metric "$IGNORED")"
stop_agent
finish
