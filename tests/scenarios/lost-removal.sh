#!/bin/sh
# Only a driver reload's removal is lost (a tiny ring, the reader stopped): the agent notices the loss, holds the NIC's configuration, and restores it when the NIC registers again.
# kernels: bookworm
# kernels-extra: bullseye
. /opt/hotplug/scenarios/_lib.sh

one_nic_configured

# A 4 KiB ring holds about twelve NIC records.
hotplug-agent --config /tmp/hotplug.toml --ring-bytes 4096 run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
sleep 0.5
check_header
kill -STOP "$AGENT_PID"
i=0
while [ $i -lt 12 ]; do ip link add lm$i type veth peer name ln$i; i=$((i + 1)); done
modprobe -r virtio_net
kill -CONT "$AGENT_PID"
wait_until 10 "grep -q 'removal lost' /tmp/agent.log" || echo "the agent did not notice the lost removal"
check "the loss reported" yes "$(grep -q 'kernel events lost' /tmp/agent.log && echo yes || echo no)"
check "the lost removal recovered at the resync" yes "$(grep -q 'removal lost with the kernel events' /tmp/agent.log && echo yes || echo no)"
state=$(hotplug-agent --config /tmp/hotplug.toml status --detail | awk -v m="$MAC" '$1 == m { print $2 }')
check "the NIC is held for its return" driver-gone "$state"
modprobe virtio_net
j=0
while ! restored && [ $j -lt 100 ]; do sleep 0.1; j=$((j + 1)); done
check "restored when it registered again" yes "$(restored && echo yes || echo no)"
grep -E "lost|restored" /tmp/agent.log | sed 's/^/  log: /' | tail -n 5
stop_agent
finish
