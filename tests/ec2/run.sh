#!/bin/sh
# hotplug's checks on a real instance: the guest scenarios' checks that need no harness, on this
# host's own NICs of one driver (ena by default): a plain driver reload restored with no IMDS
# request, its events' causes, its audit entries, then a guided reload through the agent.
#
#   sudo systemd-run --wait --pipe --unit hotplug-ec2-check tests/ec2/run.sh [DRIVER]
#
# Run it so that it survives the NICs' brief absence (systemd-run as above, tmux, or the serial
# console): an SSH session over the reloaded NIC stalls for a second or two. Needs root, the
# hotplug-agent package installed and running, iproute2, kmod and jq. Prints the table of checks
# and one line `RESULT {...}` with the figures the guest scenarios report; exit status 1 if a
# check failed. docs/ec2.md says more.
set -u
DRIVER=${1:-ena}
HERE=$(cd "$(dirname "$0")" && pwd)
# The scenarios' vmctl reports figures to the harness; here they make up the RESULT line.
FIGURES=""
vmctl() {
	[ "$1" = report ] && FIGURES="$FIGURES\"$2\":$3,"
	return 0
}
. "$HERE/../scenarios/_lib.sh"
CONFIG=${HOTPLUG_CONFIG:-/etc/hotplug/hotplug.toml}
agent() { hotplug-agent --config "$CONFIG" "$@"; }

[ "$(id -u)" = 0 ] || fail "run as root"
for tool in hotplug-agent ip jq modprobe; do
	command -v $tool >/dev/null || fail "needs $tool"
done
agent status >/dev/null || fail "no running agent answers (systemctl status hotplug-agent)"
MACS=""
for d in /sys/class/net/*; do
	module=$(basename "$(readlink -f "$d/device/driver/module" 2>/dev/null)" 2>/dev/null)
	[ "$module" = "$DRIVER" ] && MACS="$MACS $(cat "$d/address")"
done
[ -n "$MACS" ] || fail "no NIC here uses $DRIVER"
echo "hotplug on $(uname -r), driver $DRIVER, NICs:$MACS"
# The agent's own IMDS requests, when its metrics are served on a loopback address.
listen=$(sed -n 's/^[[:space:]]*metrics_listen[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$CONFIG" 2>/dev/null | grep -v '^unix:')
agent_imds() {
	[ -n "$listen" ] || return 0
	command -v curl >/dev/null || { echo "  (no curl: the agent's metrics cannot be read)" >&2; return 0; }
	curl -sf "http://$listen/metrics" >/tmp/hotplug-ec2.metrics 2>/dev/null || return 0
	grep -q '^hotplug_mode' /tmp/hotplug-ec2.metrics || return 0 # not the agent's answer
	awk '/^hotplug_imds_requests_total/ { s += $2 } END { print s + 0 }' /tmp/hotplug-ec2.metrics
}

check_header
check "agent mode" full "$(agent features --json | jq -r .mode)"
nic_config $MACS | sort >/tmp/hotplug-ec2.before
agent events --json >/tmp/hotplug-ec2.events 2>/dev/null &
EVENTS=$!
wait_for_line /tmp/hotplug-ec2.events '"type":"agent"' 30 || fail "hotplug-agent events did not start"
imds_before=$(agent_imds)
since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
sleep 1

# 1. A driver reload as an operator types it.
started=$(uptime_ms)
modprobe -r "$DRIVER" && modprobe "$DRIVER"
if wait_config /tmp/hotplug-ec2.before 60 $MACS; then back_ms=$(($(uptime_ms) - started)); else back_ms=null; fi
check "modprobe -r/modprobe: configuration back" yes "$([ "$back_ms" != null ] && echo yes || echo no)"
vmctl report reload_ms "$back_ms"
sleep 1
kill "$EVENTS" 2>/dev/null
wait "$EVENTS" 2>/dev/null
for mac in $MACS; do
	line() { grep '"type":"nic"' /tmp/hotplug-ec2.events | grep "\"action\":\"$1\"" | grep "\"mac\":\"$mac\"" | tail -n 1; }
	check "$mac removal: cause" driver-unload/kernel "$(json_str "$(line removal)" cause)/$(json_str "$(line removal)" source)"
	check "$mac registration: cause" driver-load/kernel "$(json_str "$(line registration)" cause)/$(json_str "$(line registration)" source)"
	latency=$(agent status --json | jq --arg m "$mac" '.[] | select(.mac == $m) | .last_restore.latency_us')
	echo "  $mac: restore latency ${latency:-?} us (registration to the last netlink acknowledgement)"
	vmctl report "restore_latency_us_$(echo "$mac" | tr -d :)" "${latency:-null}"
	check "$mac audit: removal by modprobe, uid 0" 1 "$(agent history --json --since "$since" |
		jq -r --arg m "$mac" 'select(.kind == "nic" and .action == "removal" and .mac == $m and .task.comm == "modprobe" and .task.uid == 0) | .mac' | wc -l)"
done
imds_after=$(agent_imds)
if [ -n "$imds_before" ]; then
	check "IMDS requests by the agent for the reload" 0 "$((imds_after - imds_before))"
	vmctl report reload_imds_requests "$((imds_after - imds_before))"
else
	echo "  IMDS requests by the agent: not counted (set metrics_listen = \"127.0.0.1:9464\" in $CONFIG, systemctl restart hotplug-agent)"
fi

# 2. The same reload, guided by the agent.
agent reload "$DRIVER" --json >/tmp/hotplug-ec2.reload
status=$(jq -r .status /tmp/hotplug-ec2.reload)
if [ "$status" = refused ]; then
	echo "SKIPPED guided reload: $(jq -r '.errors[0]' /tmp/hotplug-ec2.reload)"
	vmctl report guided_reload '"refused"'
else
	check "guided reload" ok "$status"
	check "guided reload: configuration equal" yes "$(wait_config /tmp/hotplug-ec2.before 10 $MACS && echo yes || echo no)"
	jq -r '.nics[] | "  \(.name) (\(.mac)): down \(.down_ms) ms, restore \(.restore_ms) ms, read-back \(.read_back), \(.reachability | join(", "))"' /tmp/hotplug-ec2.reload
	vmctl report guided_reload "\"$status\""
	vmctl report guided_reload_total_ms "$(jq .total_ms /tmp/hotplug-ec2.reload)"
fi
echo "RESULT {\"driver\":\"$DRIVER\",\"kernel\":\"$(uname -r)\",${FIGURES%,}}"
finish
