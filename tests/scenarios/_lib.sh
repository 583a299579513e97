# Shared helpers for guest scenarios (sourced, not run). Scenarios run as root in the guest with
# the project's binaries and vmctl on PATH.
set -u

CHECKS_FAILED=0
CHECKS_RUN=0

fail() {
	echo "FAIL: $*" >&2
	exit 1
}

# Every wait below counts seconds by the clock (/proc/uptime), not polls: under load a poll takes
# far longer than its sleep.

# wait_for_line FILE PATTERN SECONDS: until FILE has a line matching the fixed string PATTERN.
wait_for_line() {
	_wfl_end=$(($(uptime_ms) + $3 * 1000))
	until grep -qF -- "$2" "$1" 2>/dev/null; do
		[ "$(uptime_ms)" -ge "$_wfl_end" ] && return 1
		sleep 0.05
	done
}

# within SECONDS COMMAND [ARG...]: until COMMAND (a function too: it runs in this shell) succeeds;
# 1 if it never does.
within() {
	_within_end=$(($(uptime_ms) + $1 * 1000))
	shift
	until "$@"; do
		[ "$(uptime_ms)" -ge "$_within_end" ] && return 1
		sleep 0.1
	done
}

# json_str LINE KEY / json_num LINE KEY: the first value of KEY in a one-line JSON object.
json_str() { printf '%s\n' "$1" | sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p"; }
json_num() { printf '%s\n' "$1" | sed -n "s/.*\"$2\":\(-\{0,1\}[0-9][0-9]*\).*/\1/p"; }

# check WHAT EXPECTED SEEN: one row of the expected-against-seen table.
check() {
	CHECKS_RUN=$((CHECKS_RUN + 1))
	if [ "$2" = "$3" ]; then
		printf '  %-46s %-20s %-20s ok\n' "$1" "$2" "$3"
	else
		printf '  %-46s %-20s %-20s MISMATCH\n' "$1" "$2" "$3"
		CHECKS_FAILED=$((CHECKS_FAILED + 1))
	fi
}

check_header() { printf '  %-46s %-20s %-20s\n' "check" "expected" "seen"; }

# finish: report the tally to the harness and exit non-zero if any check failed.
finish() {
	vmctl report checks_run "$CHECKS_RUN" 2>/dev/null
	vmctl report checks_failed "$CHECKS_FAILED" 2>/dev/null
	echo "$CHECKS_RUN checks, $CHECKS_FAILED failed"
	[ "$CHECKS_FAILED" -eq 0 ]
}

# start_events FILE: starts `hotplug-agent events --json` writing to FILE and waits until it runs.
start_events() {
	hotplug-agent events --json >"$1" 2>"$1.log" &
	AGENT_PID=$!
	wait_for_line "$1" '"type":"agent"' 30 || { cat "$1.log" >&2; fail "the agent did not start"; }
}

stop_agent() {
	kill "$AGENT_PID" 2>/dev/null
	wait "$AGENT_PID" 2>/dev/null
}

# iface_of MAC: the interface that has MAC now (empty if none).
iface_of() {
	for d in /sys/class/net/*; do
		[ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && { basename "$d"; return 0; }
	done
	return 1
}

# uptime_ms: milliseconds since boot (/proc/uptime).
uptime_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# nic_config MAC...: what was configured on these NICs and the rules, one sorted line each, by MAC
# rather than name or ifindex (both change across a reload): name, MTU, admin state, altnames,
# addresses, routes of every table through the NIC, every ip rule. Left out because the kernel,
# the wire or router advertisements make them by themselves: carrier and operational state,
# IPv6 link-local and SLAAC addresses, kernel and RA routes, multicast/local/broadcast routes,
# lifetimes, linkdown flags. Needs jq (distro guests).
nic_config() {
	for mac in "$@"; do
		dev=$(iface_of "$mac") || { echo "$mac absent"; continue; }
		ip -j -d link show dev "$dev" | jq -r --arg m "$mac" '.[] |
			"\($m) link \(.ifname) mtu \(.mtu) \(if (.flags | index("UP")) then "up" else "down" end) altnames \((.altnames // []) | sort | join(","))"'
		ip -j addr show dev "$dev" | jq -r --arg m "$mac" '.[].addr_info[] |
			select(.family == "inet" or (.scope != "link" and (.dynamic | not))) |
			"\($m) addr \(.local)/\(.prefixlen)\(if .secondary then " secondary" else "" end)\(if .dynamic then " dynamic" else "" end)"'
		for family in -4 -6; do
			ip $family -j route show table all dev "$dev" | jq -r --arg m "$mac" '.[] |
				select((.protocol // "") != "kernel" and (.protocol // "") != "ra" and (.type // "unicast") == "unicast" and (.table // "main") != "local") |
				"\($m) route table \(.table // "main") \(.dst) via \(.gateway // "-") metric \(.metric // 0) proto \(.protocol // "boot") src \(.prefsrc // "-")"'
		done
	done
	for family in -4 -6; do
		ip $family -j rule show | jq -r '.[] | "rule \(.priority) from \(.src // "all")\(if .srclen then "/\(.srclen)" else "" end) lookup \(.table)"'
	done
}

# wait_config EXPECTED_FILE SECONDS MAC...: until nic_config of MACs equals the file; 1 if not.
wait_config() {
	_wc_want=$1
	_wc_end=$(($(uptime_ms) + $2 * 1000))
	shift 2
	while :; do
		nic_config "$@" | sort >/tmp/wait_config.now
		cmp -s "$_wc_want" /tmp/wait_config.now && return 0
		[ "$(uptime_ms)" -ge "$_wc_end" ] && break
		sleep 0.1
	done
	diff "$_wc_want" /tmp/wait_config.now >&2
	return 1
}

# watch_start FILE: records every address, route and rule notification from now on (ip monitor,
# with time stamps) until watch_stop.
watch_start() {
	ip -ts monitor address route rule >"$1" 2>/dev/null &
	WATCH_PID=$!
	sleep 0.3
}
watch_stop() { kill "$WATCH_PID" 2>/dev/null; wait "$WATCH_PID" 2>/dev/null; }

# now_stamp: the time as `ip -ts monitor` stamps its lines (they compare as strings).
now_stamp() { date +%Y-%m-%dT%H:%M:%S.%6N; }

# flaps FILE SINCE: how many objects notified in FILE after SINCE (a now_stamp) were deleted after
# they had been added: a configuration that did not reach its final state once. The NIC's own
# removal comes before SINCE. What the kernel and router advertisements make by themselves
# (prefix, local, broadcast and multicast routes, link-local and SLAAC addresses, RA routes) is
# not configuration, as in nic_config.
flaps() {
	awk -v since="$2" '
	/^\[/ {
		t = substr($0, 2, 26)
		line = substr($0, index($0, "]") + 2)
		deleted = sub(/^Deleted /, "", line)
		sub(/^[0-9]+: /, "", line)        # the ifindex of address lines
		gsub(/ +/, " ", line)
		if (line ~ /proto (kernel|ra)( |$)/ || line ~ /^(local|broadcast|multicast|anycast) / || line ~ /^ff00::/) next
		if (line ~ / inet6 / && (line ~ /scope link/ || line ~ / dynamic/)) next
		gsub(/ (linkdown|dead)/, "", line)
		if (t < since) next
		if (deleted && (line in added)) { flapped++; print "  flap: " line > "/dev/stderr" }
		if (!deleted) added[line] = 1
	}
	END { print flapped + 0 }' "$1"
}

# duplicates MAC...: configuration objects of these NICs that are there twice (the same
# destination in the same table through the same NIC, the same rule), once each.
duplicates() {
	{
		for mac in "$@"; do
			dev=$(iface_of "$mac") || continue
			for family in -4 -6; do
				ip $family -j route show table all dev "$dev" | jq -r --arg m "$mac" '.[] |
					select((.type // "unicast") == "unicast" and (.table // "main") != "local") | "\($m) \(.table // "main") \(.dst)"'
			done
		done
		for family in -4 -6; do
			ip $family -j rule show | jq -r --arg f "$family" '.[] | "rule\($f) \(.priority) \(.src // "all") \(.table)"'
		done
	} | sort | uniq -d | tee /dev/stderr | wc -l
}

# wait_until SECONDS COMMAND: until COMMAND (a shell command line) succeeds; 1 if it never does.
wait_until() {
	_wu_end=$(($(uptime_ms) + $1 * 1000))
	until sh -c "$2" >/dev/null 2>&1; do
		[ "$(uptime_ms)" -ge "$_wu_end" ] && return 1
		sleep 0.1
	done
}

# The installed service's mode (its STATUS=, "full mode ..." or "degraded ..."), as `systemctl
# status` shows it: a service that runs degraded where it could run full is a failure.
service_mode() { systemctl show -p StatusText --value hotplug-agent.service | cut -d' ' -f1; }

# cloud_init_hotplug_for_emulated_nics: on EC2, cloud-init's udev rule passes only ENA, ixgbevf
# and Xen vif NICs to its hotplug hook; the harness's NICs are virtio_net, e1000e and e1000, so
# they are added to the rule. Everything behind the rule stays as cloud-init installed it.
cloud_init_hotplug_for_emulated_nics() {
	rule=/etc/udev/rules.d/90-cloud-init-hook-hotplug.rules
	[ -f $rule ] || return 1
	sed -i 's/"vif|ena|ixgbevf"/"vif|ena|ixgbevf|virtio_net|e1000e|e1000"/' $rule
	udevadm control --reload
}

# The mock IMDS on the guest's loopback, on a privileged port (the agent refuses others unless
# told). mock GET|POST PATH [JSON]: a control or metadata request.
MOCK=127.0.0.1:80
mock() {
	if [ $# -ge 3 ]; then wget -q -O - --header 'Content-Type: application/json' --post-data "$3" "http://$MOCK$2"; else wget -q -O - "http://$MOCK$2"; fi
}
# start_mock [ARGS...]: mock-imds on $MOCK (and whatever else ARGS say), once it listens.
start_mock() {
	mock-imds --listen $MOCK "$@" >/tmp/mock.log 2>&1 &
	MOCK_PID=$!
	wait_for_line /tmp/mock.log "listening on" 10 || { cat /tmp/mock.log; fail "mock-imds did not start"; }
}
# mock_config [ATTACH_DEADLINE_SECONDS]: /tmp/hotplug.toml for an agent that asks the mock, with
# the shipped per-request timeout (2 s): under emulation (arm64 guests above all) the agent's
# start-up keeps both vCPUs busy, and its start-up pass asks IMDS once.
mock_config() {
	cat >/tmp/hotplug.toml <<TOML
state_dir = "/tmp/hotplug-state"
socket = "/run/hotplug/agent.sock"
[imds]
endpoint = "http://$MOCK"
request_timeout_ms = 2000
attach_deadline_seconds = ${1:-60}
TOML
}
imds_requests() { mock GET /_mock/stats | sed -n 's/.*"requests":\([0-9]*\).*/\1/p'; }
# status_of MAC: the agent's status block for MAC (configuration /tmp/hotplug.toml).
status_of() { hotplug-agent --config /tmp/hotplug.toml status --detail | awk -v m="$1" '$1 == m { f = 1; print; next } /^[0-9a-f][0-9a-f]:/ { f = 0 } f'; }
# wait_attach MAC STATUS SECONDS: until the agent's status shows that attach status for MAC.
wait_attach() {
	j=0
	while [ $j -lt $(($3 * 10)) ]; do
		status_of "$1" | grep -q "attach: $2" && return 0
		sleep 0.1
		j=$((j + 1))
	done
	status_of "$1"
	return 1
}

# one_nic_configured: eth0 (MAC) up with 10.0.0.5/24 and a route to 192.168.50.0/24, no router
# advertisements, and /tmp/hotplug.toml for an agent without IMDS; restored says whether eth0
# has both back (after a reload).
one_nic_configured() {
	sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
	MAC=52:54:00:12:34:10
	ip link set "$(iface_of $MAC)" up
	ip addr add 10.0.0.5/24 dev "$(iface_of $MAC)"
	ip route add 192.168.50.0/24 via 10.0.0.254 dev "$(iface_of $MAC)"
	printf 'state_dir = "/tmp/hotplug-state"\nsocket = "/run/hotplug/agent.sock"\n[imds]\nenabled = false\n' >/tmp/hotplug.toml
}
restored() { i=$(iface_of $MAC) && ip addr show dev "$i" | grep -q 10.0.0.5/24 && ip route show dev "$i" | grep -q 192.168.50.0; }
