#!/bin/sh
# A NIC registration the kernel probes do not report (dropped on purpose, as a missed kretprobe run would be): the agent finds it from rtnetlink within about a second, restores the NIC, and never hands it to the detach path.
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

one_nic_configured
printf 'state_dir = "/tmp/hotplug-state"\nsocket = "/run/hotplug/agent.sock"\nmetrics_listen = "127.0.0.1:9464"\nreturn_timeout_seconds = 15\n[imds]\nenabled = false\n' >/tmp/hotplug.toml
metric() { wget -q -O - http://127.0.0.1:9464/metrics | awk -v k="$1" '$1 == k { v = $2 } END { print v + 0 }'; }
hotplug-agent --config /tmp/hotplug.toml --drop-registrations 1 run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
check_header
check "full mode" 1 "$(metric 'hotplug_mode{mode="full"}')"
sleep 1
modprobe -r virtio_net
modprobe virtio_net
j=0
while ! restored && [ $j -lt 100 ]; do sleep 0.1; j=$((j + 1)); done
check "restored within 10 s though its registration was not reported" yes "$(restored && echo yes || echo no)"
check "missed registrations found" 1 "$(metric hotplug_missed_registrations_total)"
status=$(hotplug-agent --config /tmp/hotplug.toml status --json | tr -d ' \n')
state=$(printf '%s' "$status" | grep -o "\"mac\":\"$MAC\",\"interface\":\"[^\"]*\",\"state\":\"[a-z-]*\"" | sed 's/.*"state":"//; s/"$//')
check "its state" present "${state:-$status}"
# Past the return deadline (15 s): still present, nothing handed to the detach path.
sleep 16
check "no detach after the deadline" 0 "$(hotplug-agent --config /tmp/hotplug.toml history --json | grep -c '"kind":"detach"')"
check "still restored" yes "$(restored && echo yes || echo no)"
stop_agent
finish
