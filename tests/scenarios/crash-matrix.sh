#!/bin/sh
# SIGKILL at each stage (snapshot saved, removal held, registration unread, attach waiting for IMDS, detach) leaves nothing wrong after a restart; a second agent is refused; a full state disk is an error that corrupts nothing.
# kernels: bookworm
# kernels-extra: bullseye
. /opt/hotplug/scenarios/_lib.sh

sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
for d in /proc/sys/net/ipv6/conf/eth*; do echo 0 >"$d/accept_ra"; done
V=52:54:00:12:34:10
E=52:54:00:12:34:11
start_mock
write_config() { # write_config STATE_DIR
	cat >/tmp/hotplug.toml <<TOML
state_dir = "$1"
socket = "/run/hotplug/agent.sock"
return_timeout_seconds = 3
[imds]
endpoint = "http://$MOCK"
request_timeout_ms = 1000
attach_deadline_seconds = 60
TOML
}
write_config /tmp/hotplug-state
start_agent() { # a fresh log for each agent: what is checked after is this one's
	[ -f /tmp/agent.log ] && cat /tmp/agent.log >>/tmp/agents.log
	hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
	AGENT_PID=$!
	wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
}
crash() { kill -9 "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null; }
ok_v() { i=$(iface_of $V) && ip addr show dev "$i" | grep -q 10.0.0.5/24 && ip route show dev "$i" | grep -q 192.168.50.0; }
ok_e() { i=$(iface_of $E) && ip addr show dev "$i" | grep -q 10.0.1.5/24; }
wait_for() { j=0; while ! "$1" && [ $j -lt 100 ]; do sleep 0.1; j=$((j + 1)); done; "$1"; }
yn() { "$@" && echo yes || echo no; }

ip link set "$(iface_of $V)" up
ip addr add 10.0.0.5/24 dev "$(iface_of $V)"
ip route add 192.168.50.0/24 via 10.0.0.254 dev "$(iface_of $V)"
ip link set "$(iface_of $E)" up
ip addr add 10.0.1.5/24 dev "$(iface_of $E)"
check_header

# 1. Killed right after its snapshot was saved; the reload happens after the restart.
start_agent
wait_until 10 "ls /tmp/hotplug-state | grep -q 34_3a10"
crash
start_agent
modprobe -r virtio_net; modprobe virtio_net
check "killed after the snapshot: reload restored" yes "$(yn wait_for ok_v)"

# 2. Killed while the driver is away (the removal held); the driver returns after the restart.
modprobe -r e1000e
sleep 0.5
crash
start_agent
modprobe e1000e
check "killed with the removal held: restored" yes "$(yn wait_for ok_e)"

# 3. Stopped before it read the reload, then killed: the NIC is back under a new ifindex by the
#    time the agent restarts.
sleep 0.5
kill -STOP "$AGENT_PID"
modprobe -r virtio_net; modprobe virtio_net
sleep 0.5
kill -9 "$AGENT_PID"; kill -CONT "$AGENT_PID" 2>/dev/null; wait "$AGENT_PID" 2>/dev/null
start_agent
check "killed before reading the reload: restored at start" yes "$(yn wait_for ok_v)"
check "  ... and it says why" yes "$(yn grep -q 'came back while the agent was not running' /tmp/agent.log)"

# 4. Killed while an attach waits for IMDS (the NIC is published 8 s after the hot-plug).
NEW=02:00:00:00:0c:01
vmctl unplug eth2
mock POST /_mock/attach "{\"nic\":{\"mac\":\"$NEW\",\"device_number\":1,\"local_ipv4s\":[\"10.1.1.5\"],\"subnet_ipv4_cidr_block\":\"10.1.1.0/24\"},\"lag_ms\":8000}" >/dev/null
vmctl plug eth2 --mac $NEW
wait_until 10 "hotplug-agent --config /tmp/hotplug.toml status --detail | grep -q 'attach: waiting-for-imds'" || echo "the attach did not start"
crash
start_agent
wait_until 30 "ip rule show | grep -q 'lookup 10001'" || status_of $NEW
check "killed mid-attach: resumed and configured" yes "$(ip rule show | grep -q 'lookup 10001' && echo yes || echo no)"
check "  ... addresses" yes "$(ip addr show dev "$(iface_of $NEW)" | grep -q 10.1.1.5/24 && echo yes || echo no)"

# 5. Killed as the NIC is detached: after the restart the return timeout (3 s) passes and the
#    rules the agent added go.
n=$(iface_of $NEW)
vmctl unplug "$n" &
UNPLUG=$!
sleep 0.3
crash
wait $UNPLUG
start_agent
wait_until 15 "! ip rule show | grep -q 'lookup 10001'"
check "killed mid-detach: rules removed after the restart" 0 "$(ip rule show | grep -c 'lookup 10001')"

# 6. A second agent on the same state directory.
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/second.log
second=$?
check "a second agent exits non-zero" yes "$([ $second -ne 0 ] && echo yes || echo no)"
check "  ... saying who holds the state" yes "$(yn grep -q "$AGENT_PID" /tmp/second.log)"
sed 's/^/  second: /' /tmp/second.log | tail -n 2
check "the first agent runs on" yes "$(yn kill -0 "$AGENT_PID")"
stop_agent

# 7. The state directory on a full disk.
mkdir -p /tmp/small
mount -t tmpfs -o size=128k tmpfs /tmp/small
write_config /tmp/small/state
start_agent
wait_until 10 "ls /tmp/small/state | grep -q 34_3a10"
dd if=/dev/zero of=/tmp/small/fill bs=4k 2>/dev/null
ip addr add 10.0.0.9/24 dev "$(iface_of $V)"
wait_until 10 "grep -q 'cannot persist' /tmp/agent.log"
check "full disk: the error is logged" yes "$(yn grep -q 'cannot persist NIC state.*No space left' /tmp/agent.log)"
grep 'cannot persist' /tmp/agent.log | head -n 1 | sed 's/^/  log: /'
check "full disk: no partial file left" 0 "$(ls /tmp/small/state | grep -c -v '\.json$\|^lock$')"
corrupt=0
for f in /tmp/small/state/*.json; do
	[ "$(head -c 1 "$f")" = "{" ] && [ "$(tail -c 1 "$f")" = "}" ] || corrupt=$((corrupt + 1))
done
check "full disk: state files intact" 0 "$corrupt"
rm /tmp/small/fill
modprobe -r virtio_net; modprobe virtio_net
check "space back: a reload is restored" yes "$(yn wait_for ok_v)"
wait_until 10 "grep -q 10.0.0.9 /tmp/small/state/*34_3a10*.json"
check "space back: the state is saved again" yes "$(yn grep -q 10.0.0.9 /tmp/small/state/*34_3a10*.json)"
stop_agent
kill "$MOCK_PID" 2>/dev/null
finish
