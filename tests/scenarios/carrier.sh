#!/bin/sh
# A NIC configured while it has no carrier (its routes marked linkdown by the kernel) is reloaded: every route comes back, and stays right when the carrier returns.
# kernels: bookworm
# kernels-extra: bullseye
. /opt/hotplug/scenarios/_lib.sh

sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
MAC=52:54:00:12:34:11
ETH=$(iface_of $MAC)
vmctl carrier "$ETH" off
ip link set "$ETH" up
ip addr add 10.0.1.5/24 dev "$ETH"
ip route add default via 10.0.1.1 dev "$ETH" metric 300
ip route add 192.168.51.0/24 via 10.0.1.254 dev "$ETH"
ip route add default via 10.0.1.1 dev "$ETH" table 10001
ip rule add from 10.0.1.5 lookup 10001 pref 10001
printf 'state_dir = "/tmp/hotplug-state"\nsocket = "/run/hotplug/agent.sock"\n[imds]\nenabled = false\n' >/tmp/hotplug.toml

# The configuration, whatever the carrier: the kernel's linkdown marks and its own routes left out.
config() {
	i=$(iface_of $MAC) || { echo absent; return; }
	ip -o addr show dev "$i" | awk '$3 == "inet" { print "addr", $4 }'
	ip route show table all dev "$i" | grep -v '^local \|^broadcast \|^multicast \|table local\|proto kernel\|^fe80\|^ff00' | sed 's/ linkdown//; s/ dead//'
	ip rule show | grep 10001
}

check_header
check "no carrier" 0 "$(cat /sys/class/net/"$ETH"/carrier 2>/dev/null || echo 0)"
check "the kernel marks its routes linkdown" yes "$(ip route show dev "$ETH" | grep -q linkdown && echo yes || echo no)"
config | sort >/tmp/before
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
sleep 0.5
modprobe -r e1000e
modprobe e1000e
wait_until 15 "grep -q 'restored\|restore incomplete' /tmp/agent.log"
sleep 0.3
config | sort >/tmp/after
diff /tmp/before /tmp/after
check "restored without carrier: config diff lines" 0 "$(diff /tmp/before /tmp/after | grep -c '^[<>]')"
check "no restore error" 0 "$(grep -c 'restore incomplete' /tmp/agent.log)"
vmctl carrier "$(iface_of $MAC)" on
wait_until 10 "[ \"\$(cat /sys/class/net/$(iface_of $MAC)/carrier)\" = 1 ]" || echo "no carrier after set_link on"
sleep 0.5
config | sort >/tmp/carrier
check "carrier back: config diff lines" 0 "$(diff /tmp/before /tmp/carrier | grep -c '^[<>]')"
check "carrier back: routes not linkdown" no "$(ip route show dev "$(iface_of $MAC)" | grep -q linkdown && echo yes || echo no)"
stop_agent
finish
