#!/bin/sh
# Context probes that fail to attach (made to, with --disable-probe): the agent says it is degraded and why, classifies NIC changes by its heuristics, and still restores a driver reload.
# kernels: trixie
# kernels-extra: bookworm sid bullseye
. /opt/hotplug/scenarios/_lib.sh

one_nic_configured

check_header
check "an unknown program name is refused" 2 "$(hotplug-agent --disable-probe no_such_probe features >/dev/null 2>&1; echo $?)"
hotplug-agent --config /tmp/hotplug.toml --disable-probe delete_module_enter,delete_module_exit run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
check "degraded mode announced" yes "$(grep -q 'mode: DEGRADED' /tmp/agent.log && echo yes || echo no)"
# One reason for the one cause, naming both programs it kept out.
check "the reason names the probes" yes "$(grep -qF 'degraded because: 2 probes not attached: disabled (--disable-probe): delete_module_enter, delete_module_exit' /tmp/agent.log && echo yes || echo no)"
check "heuristic classification in use" yes "$(grep -q 'NIC hooks not attached' /tmp/agent.log && echo yes || echo no)"
modprobe -r virtio_net
sleep 1
modprobe virtio_net
j=0
while ! restored && [ $j -lt 150 ]; do sleep 0.1; j=$((j + 1)); done
check "reload restored in degraded mode" yes "$(restored && echo yes || echo no)"
check "the removal was classified by the heuristics" yes "$(grep -q 'removal.*source=\"heuristic\"\|source=heuristic' /tmp/agent.log && echo yes || echo no)"
grep -E "cause|restored" /tmp/agent.log | sed 's/^/  log: /' | tail -n 4
stop_agent
finish
