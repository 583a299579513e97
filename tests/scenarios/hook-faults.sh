#!/bin/sh
# A hook that hangs holds up nothing: another NIC's reload is restored, status answers, SIGTERM stops the agent, the hook's process group dies; hook timeouts kill the group; hooks get a clean environment.
# kernels: bookworm
# kernels-extra: bullseye
. /opt/hotplug/scenarios/_lib.sh

sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
V=52:54:00:12:34:10
E=52:54:00:12:34:11
ip link set "$(iface_of $V)" up
ip addr add 10.0.0.5/24 dev "$(iface_of $V)"

# The hook: records its environment and its group, starts a child, and waits for ever.
cat >/tmp/hook <<'HOOK'
#!/bin/sh
env | sort >/tmp/hook.env.$HOTPLUG_PHASE
echo $$ >>/tmp/hook.pids
sleep 100000 &
echo $! >>/tmp/hook.pids
wait
HOOK
chmod +x /tmp/hook
config() { # config HOOK_TIMEOUT
	cat >/tmp/hotplug.toml <<TOML
state_dir = "/tmp/hotplug-state"
socket = "/run/hotplug/agent.sock"
hook_timeout_seconds = $1
[imds]
enabled = false
[interfaces."$E"]
policy = "command"
command = ["/tmp/hook"]
TOML
}
start_agent() {
	: >/tmp/agent.log
	HOTPLUG_TEST_SECRET=do-not-pass hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
	AGENT_PID=$!
	wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
}
alive() { n=0; for p in $(cat /tmp/hook.pids 2>/dev/null); do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo $n; }
restored() { ip addr show dev "$(iface_of $V)" 2>/dev/null | grep -q 10.0.0.5/24; }

check_header
config 600
start_agent
modprobe -r e1000e
wait_until 10 "[ -s /tmp/hook.pids ] && [ \$(wc -l </tmp/hook.pids) -ge 2 ]" || echo "the hook did not start"
check "hook running (itself and its child)" 2 "$(alive)"

# Another NIC's reload while the hook hangs.
modprobe -r virtio_net
modprobe virtio_net
j=0
while ! restored && [ $j -lt 100 ]; do sleep 0.1; j=$((j + 1)); done
check "virtio NIC restored while the hook hangs" yes "$(restored && echo yes || echo no)"

t0=$(uptime_ms)
hotplug-agent --config /tmp/hotplug.toml status --detail >/tmp/status.txt 2>&1
status_ms=$(($(uptime_ms) - t0))
check "status answers within 1 s" yes "$([ $status_ms -lt 1000 ] && grep -q "$V" /tmp/status.txt && echo yes || echo no)"
vmctl report status_ms_while_hook_hangs $status_ms

# The hook's environment: PATH and HOTPLUG_* only.
others=$(grep -v '^PATH=\|^HOTPLUG_\|^PWD=\|^SHLVL=\|^_=' /tmp/hook.env.driver-gone)
[ -n "$others" ] && echo "  unexpected in the hook's environment: $others"
check "hook environment: nothing inherited" "" "$others"
check "hook environment: HOTPLUG_CAUSE" HOTPLUG_CAUSE=driver-unload "$(grep '^HOTPLUG_CAUSE=' /tmp/hook.env.driver-gone)"

t0=$(uptime_ms)
kill -TERM "$AGENT_PID"
wait "$AGENT_PID"
stop_ms=$(($(uptime_ms) - t0))
check "SIGTERM: agent gone within 5 s" yes "$([ $stop_ms -lt 5000 ] && echo yes || echo no)"
sleep 0.2
check "SIGTERM: hook and its child killed" 0 "$(alive)"
vmctl report stop_ms_with_hung_hook $stop_ms

# A hook past hook_timeout_seconds: it and its group are killed, the failure logged.
: >/tmp/hook.pids
config 2
start_agent
modprobe e1000e
wait_until 10 "[ -s /tmp/hook.pids ] && [ \$(wc -l </tmp/hook.pids) -ge 2 ]" || echo "the hook did not start"
wait_until 10 "grep -q 'killed after 2 s' /tmp/agent.log" || echo "no timeout logged"
check "hook timeout logged" yes "$(grep -q 'policy command failed.*killed after 2 s' /tmp/agent.log && echo yes || echo no)"
sleep 0.2
check "timed-out hook and its child killed" 0 "$(alive)"
check "agent still running" yes "$(kill -0 "$AGENT_PID" 2>/dev/null && echo yes || echo no)"
stop_agent
finish
