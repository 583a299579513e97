#!/bin/sh
# Amazon Linux 2023's numbering and IMDS quirks: a secondary ENI that IMDS first lists with
# device-number 0 (not propagated yet) is asked again, not configured as the primary; an ENI on
# the second network card gets its own table; the primary ENI gets no policy routing; `refresh`
# picks up a secondary address assigned (and one unassigned) while attached, and changes nothing
# when IMDS answers 500.
# kernels: bookworm
# kernels-extra: bullseye
. /opt/hotplug/scenarios/_lib.sh

PRIMARY=52:54:00:12:34:10
NEW1=02:00:00:00:0f:01
NEW2=02:00:00:00:0f:02
nic_json() { # MAC CARD DEVICE SUBNET
	echo "{\"mac\":\"$1\",\"network_card\":$2,\"device_number\":$3,\"local_ipv4s\":[\"10.2.$4.5\",\"10.2.$4.6\"],\"subnet_ipv4_cidr_block\":\"10.2.$4.0/24\"}"
}
mock_config

# IMDS knows the instance (meta-data/mac: its primary ENI, eth0) from the start: the start-up
# pass configures the primary ENI's address only.
start_mock --instance "{}" --nic "$(nic_json $PRIMARY 0 0 0)"
vmctl unplug eth1
vmctl unplug eth2
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
check_header
wait_attach $PRIMARY configured 15 || echo "start-up pass did not configure the primary ENI"
check "primary ENI: its address" yes "$(ip -4 addr show dev "$(iface_of $PRIMARY)" | grep -q 10.2.0.5 && echo yes || echo no)"
check "primary ENI: no policy rules" 0 "$(ip rule show | grep -c 'lookup 100[0-9][0-9]')"

# 1. device-number 0 for the first 3 s after IMDS lists the MAC, then 2.
mock POST /_mock/reset '{}' >/dev/null
mock POST /_mock/attach "{\"nic\":$(nic_json $NEW1 0 2 2),\"lag_ms\":500,\"device_number_lag_ms\":3000}" >/dev/null
started=$(uptime_ms)
vmctl plug eth1 --mac $NEW1
wait_attach $NEW1 configured 30 || echo "the premature device-number 0 was never resolved"
took=$(($(uptime_ms) - started))
requests=$(imds_requests)
echo "  premature device-number 0: configured after $took ms, $requests IMDS requests"
check "device-number 0 at first: rule of table 10002" yes "$(ip rule show | grep -q 'from 10.2.2.5 lookup 10002' && echo yes || echo no)"
check "device-number 0 at first: priority 10002" yes "$(ip rule show | grep -q '^10002:.*from 10.2.2.6 lookup 10002' && echo yes || echo no)"
check "device-number 0 at first: default route, metric 514" yes "$(ip route show table 10002 | grep -q 'default via 10.2.2.1 .*metric 514' && echo yes || echo no)"
check "device-number 0 at first: waited for propagation" yes "$([ "$took" -ge 3000 ] && echo yes || echo no)"
vmctl report premature_device_number_ms "$took"
vmctl report premature_device_number_imds_requests "$requests"

# 2. The first ENI of network card 1: table and priority 10100, metric 612.
mock POST /_mock/reset '{}' >/dev/null
mock POST /_mock/attach "{\"nic\":$(nic_json $NEW2 1 0 3),\"lag_ms\":500}" >/dev/null
vmctl plug eth2 --mac $NEW2
wait_attach $NEW2 configured 30 || true
check "card 1, device 0: rule of table 10100" yes "$(ip rule show | grep -q '^10100:.*from 10.2.3.5 lookup 10100' && echo yes || echo no)"
check "card 1, device 0: default route, metric 612" yes "$(ip route show table 10100 | grep -q 'default via 10.2.3.1 .*metric 612' && echo yes || echo no)"
# 3. Refresh: IMDS failing (a 500) changes nothing; then a secondary address assigned (10.2.2.7)
# and one unassigned (10.2.2.6) while attached are added and removed, rules with them.
dev1=$(iface_of $NEW1)
objects() { ip -4 addr show dev "$dev1" | grep -o 'inet [0-9./]*'; ip rule show | grep 'lookup 10002'; }
objects >/tmp/objects.before
mock POST /_mock/fault '{"kind":"500","count":1}' >/dev/null
hotplug-agent --config /tmp/hotplug.toml refresh "$dev1" >/tmp/refresh.out 2>&1
check "refresh while IMDS answers 500: exit status" 1 "$?"
cat /tmp/refresh.out
check "refresh while IMDS answers 500: says so" yes "$(grep -q '500' /tmp/refresh.out && echo yes || echo no)"
check "refresh while IMDS answers 500: nothing removed" yes "$(objects | cmp -s /tmp/objects.before - && echo yes || echo no)"
mock POST /_mock/attach "{\"nic\":{\"mac\":\"$NEW1\",\"network_card\":0,\"device_number\":2,\"local_ipv4s\":[\"10.2.2.5\",\"10.2.2.7\"],\"subnet_ipv4_cidr_block\":\"10.2.2.0/24\"}}" >/dev/null
mock POST /_mock/reset '{}' >/dev/null
hotplug-agent --config /tmp/hotplug.toml refresh "$dev1" --json >/tmp/refresh.json
check "refresh: exit status" 0 "$?"
cat /tmp/refresh.json
echo
requests=$(imds_requests)
echo "  refresh: $requests IMDS requests"
vmctl report refresh_imds_requests "$requests"
check "refresh: the new secondary address" yes "$(ip -4 addr show dev "$dev1" | grep -q 'inet 10.2.2.7/24' && echo yes || echo no)"
check "refresh: its rule" yes "$(ip rule show | grep -q '^10002:.*from 10.2.2.7 lookup 10002' && echo yes || echo no)"
check "refresh: the unassigned address gone" no "$(ip -4 addr show dev "$dev1" | grep -q 'inet 10.2.2.6/' && echo yes || echo no)"
check "refresh: its rule gone" 0 "$(ip rule show | grep -c 'from 10.2.2.6 lookup')"
check "refresh: the primary address kept" yes "$(ip -4 addr show dev "$dev1" | grep -q 'inet 10.2.2.5/24' && echo yes || echo no)"

# `status` for people: a table, a row per NIC.
hotplug-agent --config /tmp/hotplug.toml status | tee /tmp/status.table
check "status table: header" yes "$(head -1 /tmp/status.table | grep -q '^NIC  *MAC  *STATE  *LAST EVENT  *LAST RESTORE  *ATTACH$' && echo yes || echo no)"
check "status table: the refreshed ENI's row" yes "$(grep -q "^$dev1  *$NEW1  *present  .*configured, table 10002\$" /tmp/status.table && echo yes || echo no)"

echo "--- rules and tables:"
ip rule show
ip route show table all | grep -E 'table 10[0-9]{3}'

kill "$AGENT_PID" 2>/dev/null
wait "$AGENT_PID" 2>/dev/null
kill "$MOCK_PID" 2>/dev/null
finish
