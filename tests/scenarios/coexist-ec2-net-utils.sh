#!/bin/sh
# amazon-ec2-net-utils (on networkd) configures the ENIs: reloads bring its tables and rules back through its own units, hotplug adds only the operator's extras, nothing flaps.
# guest: trixie
# guests-extra: sid
# preinstall: hotplug-agent
# managers: ec2-net-utils
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

N0=52:54:00:12:34:10 # virtio_net, device-number 0 (the primary ENI)
N1=52:54:00:12:34:11 # e1000e, device-number 1
imds() { curl -s http://169.254.169.254/_mock/stats | jq -r "$1"; }

# policy_routes_done MAC: ec2-net-utils has set the NIC up (its unit ran, networkd configured it).
policy_routes_done() {
	dev=$(iface_of "$1") || return 1
	[ "$(systemctl is-active "policy-routes@$dev.service")" = active ] &&
		[ -f "/run/systemd/network/70-$dev.network" ] &&
		networkctl list --no-legend "$dev" | grep -q configured
}
# ...and networkd applied what it wrote: the secondary ENI's rule (networkctl reload is async).
wait_policy_routes() {
	# Bounded by the clock, not by a count of polls (each can take a while: udevadm settle).
	_wp_end=$(($(uptime_ms) + 150000))
	while [ "$(uptime_ms)" -lt "$_wp_end" ]; do
		policy_routes_done $N0 && policy_routes_done $N1 && ip rule show | grep -q "from 10.0.1.5 lookup 10001" &&
			udevadm settle --timeout=10 && return 0
		sleep 0.1
	done
	systemctl --no-pager status "policy-routes@*" | tail -20
	return 1
}
wait_policy_routes || fail "amazon-ec2-net-utils did not set the NICs up at boot"
dev1=$(iface_of $N1)
# What it made for the secondary ENI: table 10001, a rule from its address.
check_header
check "the service runs in full mode" full "$(service_mode)"
check "ec2-net-utils' rule for the secondary ENI" 1 "$(ip rule show | grep -c 'from 10.0.1.5 lookup 10001')"
check "no rule for the primary ENI" 0 "$(ip rule show | grep -c 'lookup 10000')"
# The operator's extras, which ec2-net-utils does not own.
ip route add 192.168.51.0/24 via 10.0.1.1 dev "$dev1"
ip rule add from 10.0.1.5 to 172.16.0.0/12 lookup main pref 500
sleep 1
nic_config $N0 $N1 | sort >/tmp/before
cat /tmp/before
check "agent sees ec2-net-utils on both NICs" "ec2-net-utils ec2-net-utils" \
	"$(hotplug-agent status --json | jq -r --arg a $N0 --arg b $N1 '[.[] | select(.mac == $a or .mac == $b) | .manager] | join(" ")')"
curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null

watch_start /tmp/monitor
since=$(now_stamp)
started=$(uptime_ms)
for module in virtio_net e1000e; do
	modprobe -r $module
	modprobe $module
done
check "both reloads: the configuration back" yes "$(wait_config /tmp/before 120 $N0 $N1 && echo yes || echo no)"
vmctl report reloads_to_equal_ms "$(($(uptime_ms) - started))"
check "ec2-net-utils' units ran again" yes "$(wait_policy_routes && echo yes || echo no)"
sleep 30
watch_stop
check "flaps in the 30 s after the reloads" 0 "$(flaps /tmp/monitor "$since")"
check "duplicates" 0 "$(duplicates $N0 $N1)"
check "equal after 30 s" yes "$(nic_config $N0 $N1 | sort | cmp -s /tmp/before - && echo yes || echo no)"
check "IMDS requests by hotplug-agent" 0 "$(imds '.by_client["hotplug-agent"] // 0')"
check "IMDS requests by cloud-init" 0 "$(imds '.by_client["cloud-init"] // 0')"
# ec2-net-utils asks IMDS from its own units on every add, as it does without hotplug.
echo "  IMDS requests by amazon-ec2-net-utils (curl): $(imds '.by_client.curl // 0')"
vmctl report imds_requests_ec2_net_utils "$(imds '.by_client.curl // 0')"
vmctl report imds_requests_hotplug_agent "$(imds '.by_client["hotplug-agent"] // 0')"
for mac in $N0 $N1; do
	hotplug-agent status --json | jq -c -M --arg m $mac '.[] | select(.mac == $m) | {mac, manager, last_restore}'
done
finish
