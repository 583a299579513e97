#!/bin/sh
# Lost kernel events are never silent: a stalled agent with a tiny ring reports the loss and resyncs.
# kernels: bookworm
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
finish
