#!/bin/sh
# Real attach and detach against a mock IMDS: lag, faults, IMDS down; detach cleans up without IMDS.
# kernels: trixie
# kernels-extra: bookworm sid bullseye
. /opt/hotplug/scenarios/_lib.sh

mock_config
NEW1=02:00:00:00:0e:01
NEW2=02:00:00:00:0e:02
NEW3=02:00:00:00:0e:03
nic_json() { echo "{\"mac\":\"$1\",\"device_number\":$2,\"local_ipv4s\":[\"10.1.$2.5\",\"10.1.$2.6\"],\"subnet_ipv4_cidr_block\":\"10.1.$2.0/24\"}"; }

# IMDS knows eth2 (device 5) from the start; the agent learns it in its start-up pass.
ETH2=52:54:00:12:34:12
start_mock --nic "$(nic_json $ETH2 5)"
# eth1 leaves before the agent starts, so that it can come back as a brand-new NIC.
vmctl unplug eth1
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
check_header
wait_attach $ETH2 configured 15 || { echo "start-up pass did not configure eth2; the agent log:"; cat /tmp/agent.log; }
check "start-up pass: eth2 learned from IMDS" yes "$(ip rule show | grep -q 'lookup 10005' && ip addr show dev "$(iface_of $ETH2)" | grep -q 10.1.5.5 && echo yes || echo no)"
check "start-up pass: eth0 (not in IMDS) left alone" 0 "$(ip -4 addr show dev "$(iface_of 52:54:00:12:34:10)" | grep -c inet)"

# 1. Attach of a new MAC that IMDS publishes 2 s after the hot-plug.
mock POST /_mock/reset '{}' >/dev/null
mock POST /_mock/attach "{\"nic\":$(nic_json $NEW1 1),\"lag_ms\":2000}" >/dev/null
vmctl plug eth1 --mac $NEW1
wait_attach $NEW1 configured 30 || echo "attach 1 did not complete"
i=$(iface_of $NEW1)
check "attach (2 s lag): addresses" yes "$(ip addr show dev "$i" | grep -q '10.1.1.6/24' && echo yes || echo no)"
check "attach: table 10001 default route" yes "$(ip route show table 10001 | grep -q 'default via 10.1.1.1' && echo yes || echo no)"
check "attach: rules" 2 "$(ip rule show | grep -c 'lookup 10001')"
check "attach: main default route untouched" 0 "$(ip route show | grep -c '^default')"
# A lookup only (nothing is sent): traffic from the ENI's address goes by its table, and main
# has no prefix route of its subnet.
check "attach: from its address by its table" "dev $i table 10001" \
	"$(ip -4 route get 192.0.2.1 from 10.1.1.6 2>&1 | grep -o "dev $i table 10001" || ip -4 route get 192.0.2.1 from 10.1.1.6 2>&1 | head -n 1)"
check "attach: no prefix route in main" 0 "$(ip -4 route show table main dev "$i" | grep -c '^10\.1\.1\.0/24')"
status_of $NEW1
requests=$(status_of $NEW1 | sed -n 's/.*attach: configured, \([0-9]*\) IMDS requests, \([0-9]*\) ms.*/\1/p')
latency=$(status_of $NEW1 | sed -n 's/.*attach: configured, \([0-9]*\) IMDS requests, \([0-9]*\) ms.*/\2/p')
vmctl report attach_lag2s_imds_requests "${requests:-null}"
vmctl report attach_lag2s_ms "${latency:-null}"

# 2. Detach: QMP hot-unplug; the rules go at once and IMDS is not asked.
before=$(imds_requests)
vmctl unplug "$i"
sleep 1
check "detach: rules removed" 0 "$(ip rule show | grep -c 'lookup 10001')"
check "detach: table 10001 empty" 0 "$(ip route show table 10001 | wc -l)"
check "detach: IMDS requests" 0 "$(($(imds_requests) - before))"
check "detach: state file removed" no "$(ls /tmp/hotplug-state | grep -q 0e_3a01 && echo yes || echo no)"

# 3. Attach with faults while IMDS answers: three 503s and expired tokens.
mock POST /_mock/attach "{\"nic\":$(nic_json $NEW2 2),\"lag_ms\":0}" >/dev/null
mock POST /_mock/fault '{"kind":"503","count":3}' >/dev/null
mock POST /_mock/fault '{"kind":"expire-tokens","count":1}' >/dev/null
vmctl plug "$i" --mac $NEW2
wait_attach $NEW2 configured 30 || echo "attach 2 did not complete"
i=$(iface_of $NEW2)
check "attach with faults: addresses" yes "$(ip addr show dev "$i" | grep -q '10.1.2.5/24' && echo yes || echo no)"
check "attach with faults: rules" 2 "$(ip rule show | grep -c 'lookup 10002')"
vmctl report attach_faults_imds_requests "$(status_of $NEW2 | sed -n 's/.*attach: configured, \([0-9]*\) IMDS requests.*/\1/p')"

# 4. IMDS down: a driver reload is still restored; an attach waits, then completes when IMDS returns.
kill "$MOCK_PID"; wait "$MOCK_PID" 2>/dev/null
ip addr add 10.7.0.5/24 dev eth0
sleep 0.3
modprobe -r virtio_net; modprobe virtio_net
j=0; while ! ip addr show dev eth0 2>/dev/null | grep -q 10.7.0.5 && [ $j -lt 100 ]; do sleep 0.1; j=$((j + 1)); done
check "IMDS down: driver reload restored" yes "$(ip addr show dev eth0 | grep -q 10.7.0.5 && echo yes || echo no)"
vmctl unplug "$i"
vmctl plug "$i" --mac $NEW3
sleep 3
check "IMDS down: attach waits" yes "$(status_of $NEW3 | grep -q 'attach: waiting-for-imds' && echo yes || echo no)"
start_mock
mock POST /_mock/attach "{\"nic\":$(nic_json $NEW3 3),\"lag_ms\":0}" >/dev/null
wait_attach $NEW3 configured 30 || echo "attach 3 did not complete"
check "IMDS back: attach configured" yes "$(ip rule show | grep -q 'lookup 10003' && echo yes || echo no)"
grep -E "WARN|ERROR" /tmp/agent.log | grep -v "DEGRADED\|degraded" | tail -5
stop_agent
kill "$MOCK_PID" 2>/dev/null
finish
