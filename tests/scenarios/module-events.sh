#!/bin/sh
# Reload virtio_net: the agent sees unload-begin, free, unload-end and load, in order, with the task.
# kernels: trixie
# kernels-extra: bullseye bookworm sid
# arches: amd64 arm64
. /opt/hotplug/scenarios/_lib.sh

EVENTS=/tmp/events.jsonl
start_events "$EVENTS"
mode=$(json_str "$(head -n 1 "$EVENTS")" mode)
[ "$mode" = full ] || { head -n 1 "$EVENTS"; fail "the agent runs in mode '$mode', not full"; }

# busybox modprobe -r exits 1 after unloading virtio_net (it also tries the busy `virtio`).
modprobe -r virtio_net &
unload_pid=$!
wait "$unload_pid"
[ -e /sys/module/virtio_net ] && fail "virtio_net is still loaded after modprobe -r"
modprobe virtio_net &
load_pid=$!
wait "$load_pid" || fail "modprobe virtio_net failed"
wait_for_line "$EVENTS" '"kind":"load","module":"virtio_net"' 10 || { cat "$EVENTS"; fail "no load event"; }
stop_agent

echo "--- events seen for virtio_net:"
grep '"module":"virtio_net"' "$EVENTS"

line_of() { grep -n "\"kind\":\"$1\",\"module\":\"virtio_net\"" "$EVENTS" | head -n 1; }
begin=$(line_of unload-begin)
free=$(line_of free)
end=$(line_of unload-end)
load=$(line_of load)
nr() { echo "${1%%:*}"; }

echo "--- expected against seen:"
check_header
check "unload-begin seen" yes "$([ -n "$begin" ] && echo yes || echo no)"
check "free seen" yes "$([ -n "$free" ] && echo yes || echo no)"
check "unload-end seen" yes "$([ -n "$end" ] && echo yes || echo no)"
check "load seen" yes "$([ -n "$load" ] && echo yes || echo no)"
[ -n "$begin" ] && [ -n "$free" ] && [ -n "$end" ] && [ -n "$load" ] || { finish; exit 1; }
check "order: unload-begin before free" yes "$([ "$(nr "$begin")" -lt "$(nr "$free")" ] && echo yes || echo no)"
check "order: free before unload-end" yes "$([ "$(nr "$free")" -lt "$(nr "$end")" ] && echo yes || echo no)"
check "order: unload-end before load" yes "$([ "$(nr "$end")" -lt "$(nr "$load")" ] && echo yes || echo no)"
check "unload-begin pid" "$unload_pid" "$(json_num "$begin" pid)"
check "unload-begin comm" modprobe "$(json_str "$begin" comm)"
check "unload-end pid" "$unload_pid" "$(json_num "$end" pid)"
check "unload-end ret" 0 "$(json_num "$end" ret)"
check "free pid (runs in the unloading task)" "$unload_pid" "$(json_num "$free" pid)"
check "load pid" "$load_pid" "$(json_num "$load" pid)"
check "load comm" modprobe "$(json_str "$load" comm)"

t_begin=$(json_num "$begin" timestamp_ns)
t_free=$(json_num "$free" timestamp_ns)
t_load=$(json_num "$load" timestamp_ns)
vmctl report unload_begin_to_free_us $(((t_free - t_begin) / 1000))
vmctl report free_to_load_us $(((t_load - t_free) / 1000))
vmctl report events_total "$(($(wc -l <"$EVENTS") - 1))"
finish
