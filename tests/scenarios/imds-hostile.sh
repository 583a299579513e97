#!/bin/sh
# Hostile IMDS answers for an attached NIC (addresses outside the subnet, /1 and ::/0 blocks, another NIC's device-number or address, 2,000 addresses, a 302 redirect): each refused with a clear error, every routing table and rule unchanged.
# kernels: bookworm
# kernels-extra: bullseye
. /opt/hotplug/scenarios/_lib.sh

sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
for d in /proc/sys/net/ipv6/conf/eth*; do echo 0 >"$d/accept_ra"; done
ETH2=52:54:00:12:34:12
start_mock --listen 127.0.0.1:8169 --nic "{\"mac\":\"$ETH2\",\"device_number\":5,\"local_ipv4s\":[\"10.1.5.5\"],\"subnet_ipv4_cidr_block\":\"10.1.5.0/24\"}"
mock_config 4
ip link set eth0 up
ip addr add 10.0.0.5/24 dev eth0
name=eth1
vmctl unplug $name
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
wait_until 15 "ip rule show | grep -q 'lookup 10005'" || echo "the start-up pass did not configure eth2"
tables() {
	ip -4 route show table all | grep -v 'table local'
	ip -6 route show table all | grep -v 'table local'
	ip -4 rule show
	ip -6 rule show
}
tables | sort >/tmp/tables.before

check_header
check "eth2 configured from IMDS first (table 10005)" yes "$(ip route show table 10005 | grep -q default && echo yes || echo no)"
n=0
hostile() { # hostile WHAT NIC_JSON_TAIL EXPECTED_ERROR [FAULT_JSON]
	n=$((n + 1))
	mac=02:00:00:00:0f:0$n
	mock POST /_mock/attach "{\"nic\":{\"mac\":\"$mac\",$2},\"lag_ms\":0}" >/dev/null || echo "mock refused case $n"
	[ $# -ge 4 ] && mock POST /_mock/fault "$4" >/dev/null
	vmctl plug $name --mac $mac
	j=0
	while ! status_of $mac | grep -q 'attach: failed\|attach: configured' && [ $j -lt 150 ]; do sleep 0.1; j=$((j + 1)); done
	status_of $mac | grep 'attach:\|error:' | sed 's/^/  /'
	check "$1: refused" yes "$(status_of $mac | grep -q 'attach: failed' && echo yes || echo no)"
	check "$1: the error says why" yes "$(status_of $mac | grep 'error:' | grep -q "$3" && echo yes || echo no)"
	name=$(iface_of $mac)
	vmctl unplug "$name"
	sleep 0.3
}
hostile "address outside its subnet" '"device_number":1,"local_ipv4s":["192.168.77.5"],"subnet_ipv4_cidr_block":"10.1.1.0/24"' "outside its subnet"
hostile "a /1 subnet" '"device_number":2,"local_ipv4s":["128.0.0.5"],"subnet_ipv4_cidr_block":"128.0.0.0/1"' "no subnet EC2 hands out"
hostile "a ::/0 block" '"device_number":3,"local_ipv4s":["10.1.3.5"],"subnet_ipv4_cidr_block":"10.1.3.0/24","ipv6s":["2001:db8::5"],"subnet_ipv6_cidr_blocks":["::/0"]' "no subnet EC2 hands out"
hostile "eth2's device-number" '"device_number":5,"local_ipv4s":["10.1.6.5"],"subnet_ipv4_cidr_block":"10.1.6.0/24"' "another NIC's already"
many=$(awk 'BEGIN { for (i = 0; i < 2000; i++) printf "%s\"10.2.%d.%d\"", (i ? "," : ""), int(i / 250), i % 250 + 2 }')
hostile "2,000 addresses" "\"device_number\":6,\"local_ipv4s\":[$many],\"subnet_ipv4_cidr_block\":\"10.2.0.0/16\"" "more than"
hostile "eth0's own address" '"device_number":7,"local_ipv4s":["10.0.0.5"],"subnet_ipv4_cidr_block":"10.0.0.0/24"' "another NIC's address"
# Last: the redirect fault stays (busybox wget cannot send the DELETE that clears it).
hostile "a 302 redirect" '"device_number":8,"local_ipv4s":["10.1.8.5"],"subnet_ipv4_cidr_block":"10.1.8.0/24"' "302" \
	'{"kind":"redirect","count":0,"location":"http://127.0.0.1:8169/_mock/followed"}'
check "the redirect was not followed" 0 "$(json_num "$(mock GET /_mock/stats)" followed_redirects)"

tables | sort >/tmp/tables.after
diff /tmp/tables.before /tmp/tables.after
check "routes and rules of every table unchanged" 0 "$(diff /tmp/tables.before /tmp/tables.after | grep -c '^[<>]')"
check "eth0 keeps its address" yes "$(ip addr show dev eth0 | grep -q 10.0.0.5/24 && echo yes || echo no)"
stop_agent
kill "$MOCK_PID" 2>/dev/null
finish
