#!/bin/sh
# systemd-networkd runs DHCP on two NICs, the operator adds extras: each reload restores them after networkd, nothing flaps, networkctl keeps them.
# guest: trixie
# guests-extra: sid
# preinstall: hotplug-agent
# managers: networkd
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

N0=52:54:00:12:34:10 # virtio_net, 10.0.0.0/24
N1=52:54:00:12:34:11 # e1000e, 10.0.1.0/24
imds() { curl -s http://169.254.169.254/_mock/stats | jq -r "$1"; }

# An operator's networkd configuration: DHCP (the user-mode network's DHCP hands out 10.0.N.5).
n=0
for mac in $N0 $N1; do
	printf '[Match]\nMACAddress=%s\n\n[Network]\nDHCP=ipv4\nIPv6AcceptRA=no\n' "$mac" >"/etc/systemd/network/10-nic$n.network"
	n=$((n + 1))
done
networkctl reload
dev0=$(iface_of $N0)
dev1=$(iface_of $N1)
for dev in $dev0 $dev1; do
	timeout 60 /usr/lib/systemd/systemd-networkd-wait-online -i "$dev" -o routable || fail "networkd did not configure $dev"
done
# Extras networkd does not own: a secondary address, a route, a policy table and its rule.
ip addr add 10.0.1.50/24 dev "$dev1"
ip route add 192.168.51.0/24 via 10.0.1.1 dev "$dev1"
ip route add default via 10.0.1.1 dev "$dev1" table 10001
ip rule add from 10.0.1.50 lookup 10001 pref 10001
ip route add 192.168.50.0/24 via 10.0.0.1 dev "$dev0"
sleep 1
nic_config $N0 $N1 | sort >/tmp/before
cat /tmp/before

check_header
check "the service runs in full mode" full "$(service_mode)"
check "networkd.conf drop-in installed" yes "$([ -f /usr/lib/systemd/networkd.conf.d/80-hotplug-agent.conf ] && echo yes || echo no)"
check "agent sees networkd on both NICs" "networkd networkd" \
	"$(hotplug-agent status --json | jq -r --arg a $N0 --arg b $N1 '[.[] | select(.mac == $a or .mac == $b) | .manager] | join(" ")')"
curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null

watch_start /tmp/monitor
since=$(now_stamp)
for module in virtio_net e1000e; do
	modprobe -r $module
	modprobe $module
done
check "both reloads restored (networkd's lease, the extras)" yes "$(wait_config /tmp/before 60 $N0 $N1 && echo yes || echo no)"
sleep 30
watch_stop
check "flaps in the 30 s after the reloads" 0 "$(flaps /tmp/monitor "$since")"
check "duplicates" 0 "$(duplicates $N0 $N1)"
check "equal after 30 s" yes "$(nic_config $N0 $N1 | sort | cmp -s /tmp/before - && echo yes || echo no)"
check "IMDS requests during the reloads" 0 "$(imds .requests)"
for mac in $N0 $N1; do
	hotplug-agent status --json | jq -c -M --arg m $mac '.[] | select(.mac == $m) | {mac, manager, last_restore}'
done
waited=$(hotplug-agent status --json | jq --arg m $N1 '.[] | select(.mac == $m) | .last_restore.waited_for_manager_ms')
vmctl report e1000e_waited_for_networkd_ms "$waited"
check "the lease was left to networkd" yes \
	"$(hotplug-agent status --json | jq -r --arg m $N1 '.[] | select(.mac == $m) | .last_restore.left_to_manager | map(test("10.0.1.5/24")) | any' | grep -q true && echo yes || echo no)"
check "networkd says configured" "configured configured" \
	"$(networkctl list --no-legend "$(iface_of $N0)" "$(iface_of $N1)" | awk '{ print $5 }' | tr '\n' ' ' | sed 's/ $//')"

echo "--- networkctl reload, renew, reconfigure"
networkctl reload
sleep 2
check "after networkctl reload" yes "$(nic_config $N0 $N1 | sort | cmp -s /tmp/before - && echo yes || echo no)"
networkctl renew "$(iface_of $N1)"
sleep 2
check "after a DHCP renewal" yes "$(nic_config $N0 $N1 | sort | cmp -s /tmp/before - && echo yes || echo no)"
networkctl reconfigure "$(iface_of $N1)"
timeout 60 /usr/lib/systemd/systemd-networkd-wait-online -i "$(iface_of $N1)" -o routable
sleep 2
# networkd removes addresses it did not make whenever it configures a link (no setting but the
# .network's KeepConfiguration= changes that): the secondary address goes, as without hotplug.
grep -v "10.0.1.50/24" /tmp/before >/tmp/before-reconfigure
nic_config $N0 $N1 | sort | grep -v "10.0.1.50/24" >/tmp/after-reconfigure
diff /tmp/before-reconfigure /tmp/after-reconfigure
check "after networkctl reconfigure: routes and rules kept" yes \
	"$(cmp -s /tmp/before-reconfigure /tmp/after-reconfigure && echo yes || echo no)"
finish
