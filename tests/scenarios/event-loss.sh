#!/bin/sh
# Lost kernel events are never silent: a stalled reader reports the loss and resyncs; the agent restores.
# kernels: bookworm
# kernels-extra: bullseye
. /opt/hotplug/scenarios/_lib.sh

EVENTS=/tmp/events.jsonl
hotplug-agent --ring-bytes 4096 events --json >"$EVENTS" 2>"$EVENTS.log" &
AGENT_PID=$!
wait_for_line "$EVENTS" '"type":"agent"' 30 || { cat "$EVENTS.log"; fail "the agent did not start"; }

# Stop the reader, overflow its 4 KiB ring (13 NIC records) with 40 registrations, let it go.
kill -STOP "$AGENT_PID"
i=0
while [ $i -lt 20 ]; do ip link add lo$i type veth peer name lp$i; i=$((i + 1)); done
kill -CONT "$AGENT_PID"
wait_for_line "$EVENTS" '"type":"resync"' 20 || { cat "$EVENTS.log"; fail "no resync after the overflow"; }
stop_agent

seen=$(grep -c '"type":"nic"' "$EVENTS")
lost=$(grep '"type":"lost"' "$EVENTS" | sed -n 's/.*"events":\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
resync=$(grep '"type":"resync"' "$EVENTS" | head -n 1)
echo "--- $seen NIC events delivered, $lost reported lost"
check_header
check "loss reported" yes "$([ "$lost" -gt 0 ] && echo yes || echo no)"
check "delivered + lost = 40 registrations" 40 "$((seen + lost))"
check "resync lists the last link created" yes "$(echo "$resync" | grep -q '"name":"lp19"' && echo yes || echo no)"
check "resync lists the first link created" yes "$(echo "$resync" | grep -q '"name":"lo0"' && echo yes || echo no)"
vmctl report delivered "$seen"
vmctl report lost "$lost"
# The agent proper, stalled while a driver reload's registration is lost in the overflow: after
# the loss it resynchronises and still restores the NIC.
for l in $(ip -o link show | sed -n 's/^[0-9]*: \(lo[0-9]*\)@.*/\1/p'); do ip link del "$l"; done
printf 'state_dir = "/tmp/hotplug-state"\nsocket = "/run/hotplug/agent.sock"\n[imds]\nenabled = false\n' >/tmp/hotplug.toml
ip link set eth0 up
ip addr add 10.0.9.5/24 dev eth0
hotplug-agent --config /tmp/hotplug.toml --ring-bytes 4096 run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
sleep 0.5
kill -STOP "$AGENT_PID"
modprobe -r virtio_net
i=0
while [ $i -lt 20 ]; do ip link add lq$i type veth peer name lr$i; i=$((i + 1)); done
modprobe virtio_net
kill -CONT "$AGENT_PID"
j=0
while ! ip addr show dev eth0 2>/dev/null | grep -q 10.0.9.5 && [ $j -lt 100 ]; do sleep 0.1; j=$((j + 1)); done
check "lost registration: restored after the resync" yes "$(ip addr show dev eth0 | grep -q 10.0.9.5 && echo yes || echo no)"
check "the agent saw the loss" yes "$(grep -q 'kernel events lost' /tmp/agent.log && echo yes || echo no)"
grep -E "registration lost|restored" /tmp/agent.log | tail -2
stop_agent
finish
