#!/bin/sh
# ifupdown brings the e1000e up on hotplug (`allow-hotplug`, ifup@): three reloads 5 s apart each give back the stanza's and the operator's configuration, ifupdown's late ifdown never shrinks what the agent keeps.
# guest: trixie
# guests-extra: sid
# preinstall: hotplug-agent
# imds: no-nics
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

N1=52:54:00:12:34:11 # e1000e, 10.0.1.0/24
dev=$(iface_of $N1)

# Debian's hotplug style: the stanza, its own route in an `up` command; ifup brings it up.
cat >>/etc/network/interfaces <<EOF
allow-hotplug $dev
iface $dev inet static
	address 10.0.1.50/24
	up ip route add 192.168.81.0/24 via 10.0.1.1 dev $dev
EOF
# As udev does for an allow-hotplug NIC at boot: through ifup@ (a plain `ifup` leaves the unit
# inactive, so the first removal runs no ifdown and ifupdown still counts the NIC up when it
# returns: its ifup@ then does nothing).
systemctl start "ifup@$dev.service" || fail "ifup@$dev failed"
# (The unit is Type=simple: started is not done. Its last step is the stanza's up command.)
wait_until 30 "ip route show 192.168.81.0/24 dev $dev | grep -q ." || fail "ifup@$dev did not configure $dev"
# The operator's extras, which the stanza does not make: an address, a route, a table and rule.
ip addr add 10.0.1.51/24 dev "$dev" || fail "adding the operator's address"
ip route add 192.168.82.0/24 via 10.0.1.1 dev "$dev" || fail "adding the operator's route"
ip route add default via 10.0.1.1 dev "$dev" table 181 || fail "adding the operator's table"
ip rule add from 10.0.1.51 lookup 181 pref 181 || fail "adding the operator's rule"
check_header
check "the service runs in full mode" full "$(service_mode)"
wait_until 10 "hotplug-agent status --json | jq -e --arg m $N1 '.[] | select(.mac == \$m and .manager == \"ifupdown\")' >/dev/null"
check "agent sees ifupdown on the NIC" ifupdown \
	"$(hotplug-agent status --json | jq -r --arg m $N1 '.[] | select(.mac == $m) | .manager')"
nic_config $N1 | sort >/tmp/before
cat /tmp/before

for round in 1 2 3; do
	modprobe -r e1000e
	modprobe e1000e
	check "reload $round: the configuration back" yes "$(wait_config /tmp/before 60 $N1 && echo yes || echo no)"
	sleep 5
	check "reload $round: still all there 5 s later" yes "$(nic_config $N1 | sort | cmp -s /tmp/before - && echo yes || echo no)"
	check "reload $round: ifup@$dev ran and succeeded" active "$(systemctl is-active "ifup@$dev.service")"
done
check "duplicates" 0 "$(duplicates $N1)"
hotplug-agent status --json | jq -c -M --arg m $N1 '.[] | select(.mac == $m) | {mac, manager, last_restore}'
journalctl -u "ifup@$dev.service" --no-pager -o cat | tail -6
finish
