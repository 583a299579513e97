#!/bin/sh
# A driver reload gives back what an operator tuned: per-interface sysctls (set before the link comes up), txqueuelen, alias, group, GSO limit, an operator's MAC, RPS; a change made after the agent started is seen by its tuning poll.
# kernels: trixie
# kernels-extra: bookworm sid bullseye
# arches: amd64 arm64
. /opt/hotplug/scenarios/_lib.sh

cat >/tmp/hotplug.toml <<'TOML'
state_dir = "/tmp/hotplug-state"
socket = "/run/hotplug/agent.sock"
return_timeout_seconds = 120
[imds]
enabled = false
TOML
# QEMU's user network sends router advertisements: off, so that no address comes and goes by itself.
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
for d in /proc/sys/net/ipv6/conf/eth*; do echo 0 >"$d/accept_ra"; done

V=$(iface_of 52:54:00:12:34:10) # virtio_net
E=$(iface_of 52:54:00:12:34:11) # e1000e
G=$(iface_of 52:54:00:12:34:12) # e1000
[ -n "$V" ] && [ -n "$E" ] && [ -n "$G" ] || fail "the guest's three NICs are not all there"

n=0
for i in $V $E $G; do
	# Down first: what the kernel makes at link-up (the link-local address) follows the settings.
	ip link set "$i" down
	sysctl -qw "net.ipv4.conf.$i.rp_filter=2" "net.ipv4.conf.$i.arp_ignore=1" \
		"net.ipv4.neigh.$i.retrans_time_ms=500" "net.ipv6.conf.$i.hop_limit=3$n" \
		"net.ipv6.conf.$i.dad_transmits=0" || fail "sysctl -w on $i"
	ip link set "$i" txqueuelen $((5000 + n)) alias "uplink-$n" || fail "ip link set $i txqueuelen/alias"
	echo 1 >"/sys/class/net/$i/queues/rx-0/rps_cpus" || fail "rps_cpus on $i"
	echo 256 >"/sys/class/net/$i/queues/rx-0/rps_flow_cnt" || fail "rps_flow_cnt on $i"
	n=$((n + 1))
done
ip link set "$V" group 7 gso_max_size 32768 || fail "ip link set $V group/gso_max_size"
ip link set "$E" address 02:00:00:00:11:11 || fail "ip link set $E address"
# No IPv6 link-local address on e1000: right only if the restore sets addr_gen_mode before the link
# comes up (the kernel makes the address at link-up).
sysctl -qw "net.ipv6.conf.$G.addr_gen_mode=1" || fail "addr_gen_mode on $G"
n=0
for i in $V $E $G; do
	ip link set "$i" up
	ip addr add "10.0.$n.5/24" dev "$i"
	ip route add "192.168.5$n.0/24" via "10.0.$n.254" dev "$i"
	n=$((n + 1))
done

# tuning IF: everything this scenario tunes on IF (and what the kernel makes of it: the link-local
# count), one line each, without the interface's name.
tuning() {
	for k in ipv4/conf/X/rp_filter ipv4/conf/X/arp_ignore ipv4/neigh/X/retrans_time_ms \
		ipv6/conf/X/hop_limit ipv6/conf/X/dad_transmits ipv6/conf/X/addr_gen_mode; do
		echo "$k $(cat "/proc/sys/net/$(echo "$k" | sed "s#/X/#/$1/#")" 2>/dev/null || echo absent)"
	done
	ip -o -d link show dev "$1" 2>/dev/null | awk '{ for (i = 1; i < NF; i++)
		if ($i == "qlen" || $i == "group" || $i == "alias" || $i == "link/ether" || $i == "gso_max_size") { v = $(i + 1); sub(/\\$/, "", v); print $i, v } }'
	echo "state $(ip -o link show dev "$1" 2>/dev/null | grep -o '<[^>]*>' | tr -d '<>' | tr ',' '\n' | grep -cx UP)"
	echo "rps_cpus $(cat "/sys/class/net/$1/queues/rx-0/rps_cpus" 2>/dev/null)"
	echo "rps_flow_cnt $(cat "/sys/class/net/$1/queues/rx-0/rps_flow_cnt" 2>/dev/null)"
	echo "link-local $(ip -6 -o addr show dev "$1" scope link 2>/dev/null | wc -l)"
	ip -o addr show dev "$1" 2>/dev/null | awk '$3 == "inet" { print "addr", $4 }'
	ip route show dev "$1" 2>/dev/null | awk '$2 == "via" { print "route", $1, $3 }'
}

# verdict MAC: `ok` when the NIC's last restore (status --json) has no error and no difference,
# else what it reported; `none` before its first restore.
verdict() {
	hotplug-agent --config /tmp/hotplug.toml status --json | awk -v m="$1" '
		/^    "mac": / { mine = index($0, "\"" m "\"") > 0 }
		mine && /^    "last_restore": \{/ { inr = 1; seen = 1; next }
		inr && /^    \}/ { inr = 0 }
		inr && /^      "(errors|differences)": \[\]/ { next }
		inr && /^      "(errors|differences)": \[$/ { list = 1; next }
		list && /^      \]/ { list = 0; next }
		list { gsub(/^ +/, ""); bad = bad $0 " " }
		END { print seen ? (bad == "" ? "ok" : bad) : "none" }'
}

# restores MAC: how many restores of MAC the audit trail (history --json) records.
restores() {
	hotplug-agent --config /tmp/hotplug.toml history --json 2>/dev/null |
		grep '"kind":"restore"' | grep -c "\"mac\":\"$1\""
}

hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
present3() { [ "$(hotplug-agent --config /tmp/hotplug.toml status --json 2>/dev/null | grep -c '"state": "present"')" = 3 ]; }
within 60 present3 || { cat /tmp/agent.log; fail "the agent did not start with the three NICs present"; }
check_header

# Made after the agent's first read, without a netlink notification: only its tuning poll (every
# 5 s) sees it; it is in the state file once the agent has read it.
sysctl -qw "net.ipv4.conf.$V.arp_ignore=2"
held_arp_ignore_2() {
	grep -A1 '"key": "ipv4/conf/arp_ignore"' /tmp/hotplug-state/nic-52_3a54_3a00_3a12_3a34_3a10.json 2>/dev/null |
		grep -q '"value": "2"'
}
check "virtio_net: a sysctl changed after start is held (tuning poll)" yes "$(within 30 held_arp_ignore_2 && echo yes || echo no)"

for pair in "virtio_net $V 52:54:00:12:34:10" "e1000e $E 52:54:00:12:34:11" "e1000 $G 52:54:00:12:34:12"; do
	set -- $pair
	module=$1 i=$2 mac=$3
	tuning "$i" >"/tmp/before.$module"
	count=$(restores "$mac")
	# busybox's modprobe -r exits 1 after unloading virtio_net where `virtio` is a module (5.10):
	# whether the driver left is what /sys/module says.
	modprobe -r "$module"
	[ -e "/sys/module/$module" ] && fail "$module is still loaded after modprobe -r"
	check "$module: removed" absent "$(ip link show dev "$i" >/dev/null 2>&1 && echo present || echo absent)"
	modprobe "$module" || fail "modprobe $module"
	more() { [ "$(restores "$mac")" -gt "$count" ]; }
	check "$module: restored (one restore more)" yes "$(within 60 more && echo yes || echo "no: $(restores "$mac") after $count")"
	check "$module: the agent's read-back" ok "$(verdict "$mac")"
	same() { tuning "$i" | cmp -s - "/tmp/before.$module"; }
	within 30 same
	tuning "$i" >"/tmp/after.$module"
	diff "/tmp/before.$module" "/tmp/after.$module" >"/tmp/diff.$module"
	check "$module: tuning as before (lines differing)" 0 "$(grep -c '^[-+][^-+]' "/tmp/diff.$module")"
	[ -s "/tmp/diff.$module" ] && sed 's/^/    /' "/tmp/diff.$module"
	echo "  $module before:"
	sed 's/^/    /' "/tmp/before.$module"
done
check "virtio_net: the change after start is kept (arp_ignore)" "ipv4/conf/X/arp_ignore 2" "$(grep arp_ignore /tmp/after.virtio_net)"
check "e1000: no link-local address (addr_gen_mode before up)" "link-local 0" "$(grep link-local /tmp/after.e1000)"
check "e1000e: the operator's MAC" "link/ether 02:00:00:00:11:11" "$(grep link/ether /tmp/after.e1000e)"
kill "$AGENT_PID" 2>/dev/null
wait "$AGENT_PID" 2>/dev/null
finish
