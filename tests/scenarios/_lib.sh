# Shared helpers for guest scenarios (sourced, not run). Scenarios run as root in the guest with
# the project's binaries and vmctl on PATH.
set -u

CHECKS_FAILED=0
CHECKS_RUN=0

fail() {
	echo "FAIL: $*" >&2
	exit 1
}

# wait_for_line FILE PATTERN SECONDS: until FILE has a line matching the fixed string PATTERN.
wait_for_line() {
	i=0
	while [ $i -lt $(($3 * 20)) ]; do
		grep -qF -- "$2" "$1" 2>/dev/null && return 0
		sleep 0.05
		i=$((i + 1))
	done
	return 1
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
