#!/bin/sh
# An unprivileged user deletes 20 veth links at once, again and again, in a user and network namespace of its own (one kernel batch each, more than the probe walks): no lost events counted, no re-read of the host's NICs, and a reload still restored.
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

one_nic_configured
printf 'state_dir = "/tmp/hotplug-state"\nsocket = "/run/hotplug/agent.sock"\nmetrics_listen = "127.0.0.1:9464"\n[imds]\nenabled = false\n' >/tmp/hotplug.toml
metric() { wget -q -O - http://127.0.0.1:9464/metrics | awk -v k="$1" '$1 == k { v = $2 } END { print v + 0 }'; }
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
check_header
check "full mode" 1 "$(metric 'hotplug_mode{mode="full"}')"
resyncs=$(metric hotplug_resyncs_total)
lost=$(metric hotplug_lost_records_total)
flood --links-only --batch 10 --seconds 8 >/tmp/flood.json 2>/tmp/flood.log || { cat /tmp/flood.log; fail "the flood failed"; }
echo "  flood: $(cat /tmp/flood.json)"
check "the flood deleted links in batches" yes "$([ "$(json_num "$(cat /tmp/flood.json)" link_changes)" -ge 80 ] && echo yes || echo no)"
check "re-reads of the host's NICs" "$resyncs" "$(metric hotplug_resyncs_total)"
check "lost records" "$lost" "$(metric hotplug_lost_records_total)"
modprobe -r virtio_net
modprobe virtio_net
j=0
while ! restored && [ $j -lt 150 ]; do sleep 0.1; j=$((j + 1)); done
check "a reload after the flood restored" yes "$(restored && echo yes || echo no)"
stop_agent
finish
