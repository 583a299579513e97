#!/bin/sh
# Amazon Linux 2023's ENI layout on a two-card instance: five ENIs (secondary IPv4s, IPv6, IPv4 and IPv6 prefixes) attached in random order, two detached, the rest equal to what amazon-ec2-net-utils makes (fixtures/ec2-layout.expected), and again after a driver reload.
# kernels: bookworm
# kernels-extra: bullseye
# nics: virtio e1000e virtio virtio e1000e virtio virtio virtio
. /opt/hotplug/scenarios/_lib.sh

FIXTURE=/opt/hotplug/scenarios/fixtures/ec2-layout.expected
# eni MAC CARD DEVICE SUBNET [IPV4S] [IPV6S] [IPV4-PREFIXES] [IPV6-PREFIXES]: the mock's NIC JSON.
eni() {
	list() { [ -n "$1" ] && echo "$1" | awk -v RS=' ' 'NF { printf "%s\"%s\"", (n++ ? "," : ""), $1 }'; }
	v6=""
	[ -n "${6:-}" ] && v6=",\"ipv6s\":[$(list "$6")],\"subnet_ipv6_cidr_blocks\":[\"2001:db8:1:${4#*.}::/64\"]"
	[ -n "${8:-}" ] && v6="$v6,\"ipv6_prefixes\":[$(list "$8")]"
	p4=""
	[ -n "${7:-}" ] && p4=",\"ipv4_prefixes\":[$(list "$7")]"
	echo "{\"mac\":\"$1\",\"network_card\":$2,\"device_number\":$3,\"interface_id\":\"eni-0a0000000000000a$(echo "$1" | cut -c17)\",\"local_ipv4s\":[$(list "$5")],\"subnet_ipv4_cidr_block\":\"10.${4%%.*}.${4#*.}.0/24\"$v6$p4}"
}
E0=52:54:00:12:34:10
E1=52:54:00:12:34:11
E2=52:54:00:12:34:12
E3=52:54:00:12:34:13
E4=52:54:00:12:34:14
json_of() {
	case $1 in
	$E0) eni $E0 0 0 0.0 "10.0.0.5" ;;
	$E1) eni $E1 0 1 1.1 "10.1.1.5 10.1.1.6" "2001:db8:1:1::5" "10.1.1.32/28" "2001:db8:1:1:5::/80" ;;
	$E2) eni $E2 0 2 1.2 "10.1.2.5" ;;
	$E3) eni $E3 1 0 1.3 "10.1.3.5" "2001:db8:1:3::5" ;;
	$E4) eni $E4 1 1 1.4 "10.1.4.5 10.1.4.7" "" "10.1.4.16/28" ;;
	esac
}

# layout MAC...: the objects on these NICs, as the fixture writes them (one line each, sorted).
layout() {
	for mac in "$@"; do
		dev=$(iface_of "$mac") || { echo "$mac absent"; continue; }
		ip -o addr show dev "$dev" scope global | awk -v m="$mac" '!/dynamic/ {
			a = $4; if ($3 == "inet6") sub(/\/.*/, "", a); print m " addr " a }'
		ip -d link show dev "$dev" | awk -v m="$mac" '$1 == "altname" { print m " altname " $2 }'
		for family in -4 -6; do
			ip $family route show table all dev "$dev" | grep -v -E ' proto (kernel|ra) |^(local|broadcast|multicast|anycast|unreachable) ' |
				awk -v m="$mac" '{
					table = "main"; via = ""; metric = ""; scope = ""
					for (i = 2; i <= NF; i++) {
						if ($i == "table") table = $(i + 1)
						if ($i == "via") via = " via " $(i + 1)
						if ($i == "metric") metric = " metric " $(i + 1)
						if ($i == "scope") scope = " scope " $(i + 1)
					}
					print m " route " table " " $1 via scope metric }'
		done
	done
	for family in -4 -6; do
		ip $family rule show | awk '{ for (i = 1; i < NF; i++) if ($i == "lookup") t = $(i + 1) }
			t ~ /^1[0-9][0-9][0-9][0-9]$/ { p = $1; sub(":", "", p); print "rule " p " from " $3 " lookup " t }'
	done
}
# router MAC: the IPv6 router the ENI's NIC knows (the kernel's RA route, else a neighbour
# flagged router), remembered: after a reload the NIC has to learn it again, its table does not.
router() {
	[ -s "/tmp/router.$1" ] && { cat "/tmp/router.$1"; return; }
	dev=$(iface_of "$1") || return
	r=$(ip -6 route show default dev "$dev" proto ra | awk '{ print $3; exit }')
	[ -n "$r" ] || r=$(ip -6 neigh show dev "$dev" | awk '/ router/ { print $1; exit }')
	[ -n "$r" ] && echo "$r" | tee "/tmp/router.$1"
}
# expected MAC...: the fixture's lines for these ENIs, each one's router filled in.
expected() {
	for mac in "$@"; do
		r=$(router "$mac")
		grep "^$mac " "$FIXTURE" | sed "s/ROUTER/${r:-ROUTER}/"
	done | sed 's/^[^ ]* rule /rule /'
}
# compare WHAT MAC...: layout against the fixture (for up to 30 s), a diff printed if they differ.
compare() {
	what=$1
	shift
	expected "$@" | sort >/tmp/want
	until_ms=$(($(uptime_ms) + 30000))
	while :; do
		layout "$@" | sort >/tmp/have
		cmp -s /tmp/want /tmp/have && break
		[ "$(uptime_ms)" -lt $until_ms ] || break
		sleep 1
	done
	if ! cmp -s /tmp/want /tmp/have; then
		echo "--- $what: fixture (<) vs the guest (>)"
		diff /tmp/want /tmp/have
	fi
	check "$what: equal to ec2-net-utils'" yes "$(cmp -s /tmp/want /tmp/have && echo yes || echo no)"
}

# No router advertisements: QEMU's user network answers router solicitations irregularly. The
# ENIs' router is EC2's, fe80::1, as a neighbour flagged router on each (what the agent reads when
# the kernel has no RA route).
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
mock_config
start_mock --instance "{}" --nic "$(json_of $E0)"
# Unplugged by MAC (the kernel names NICs in probe order, not slot order), each plugged back later
# under the name it had, which is how the harness knows its slot.
for i in 1 2 3 4; do
	name=$(iface_of 52:54:00:12:34:1$i) || fail "no NIC with MAC 52:54:00:12:34:1$i"
	eval "slot_$i=$name"
	vmctl unplug "$name"
done
hotplug-agent --config /tmp/hotplug.toml run 2>/tmp/agent.log &
AGENT_PID=$!
wait_for_line /tmp/agent.log "agent ready" 60 || { cat /tmp/agent.log; fail "the agent did not start"; }
check_header
wait_attach $E0 configured 15 || echo "start-up pass did not configure the primary ENI"
# The primary's default route, as DHCP gives it on Amazon Linux (metric 512): a secondary ENI's
# default in main goes only behind such a one.
ip route add default via 10.0.0.1 dev "$(iface_of $E0)" metric 512 onlink

# Attach ENIs 1-4 in a random order (printed: a failing order can be replayed).
seed=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
order=$(printf '1\n2\n3\n4\n' | awk -v s="$seed" 'BEGIN { srand(s) } { print rand() " " $1 }' | sort -n | awk '{ printf "%s ", $2 }')
echo "  attach order (seed $seed): $order"
vmctl report attach_order "\"$order\""
mock POST /_mock/reset '{}' >/dev/null
started=$(uptime_ms)
for n in $order; do
	mac=52:54:00:12:34:1$n
	mock POST /_mock/attach "{\"nic\":$(json_of $mac),\"lag_ms\":300}" >/dev/null
	vmctl plug "$(eval echo "\$slot_$n")"
	dev=$(iface_of "$mac") || fail "ENI $n ($mac) did not register after its hot-plug"
	ip link set "$dev" up
	ip -6 neigh replace fe80::1 lladdr 02:00:00:00:ec:02 dev "$dev" router nud permanent
	wait_attach "$mac" configured 30 || echo "ENI $n ($mac) was not configured"
done
vmctl report attach_four_ms "$(($(uptime_ms) - started))"
vmctl report attach_four_imds_requests "$(imds_requests)"
check "four ENIs attached: configured" 4 "$(for n in 1 2 3 4; do status_of 52:54:00:12:34:1$n | grep -c 'attach: configured'; done | awk '{ s += $1 } END { print s }')"
compare "after the attaches" $E0 $E1 $E2 $E3 $E4

# Detach two of them (random too); nothing of theirs may stay (amazon-ec2-net-utils #166).
gone=$(echo "$order" | awk '{ print $1 " " $3 }')
echo "  detaching ENIs $gone"
keep="$E0"
for n in 1 2 3 4; do
	case " $gone " in *" $n "*) ;; *) keep="$keep 52:54:00:12:34:1$n" ;; esac
done
for n in $gone; do
	mock POST /_mock/detach "{\"mac\":\"52:54:00:12:34:1$n\"}" >/dev/null
	vmctl unplug "$(iface_of 52:54:00:12:34:1$n)"
done
sleep 1
echo "--- after the detaches:"
ip -br link
ip rule show
ip route show table all | grep -E 'table 10[0-9]{3}'
table_of() { case $1 in 1) echo 10001 ;; 2) echo 10002 ;; 3) echo 10100 ;; 4) echo 10101 ;; esac; }
left=0
for n in $gone; do
	t=$(table_of "$n")
	left=$((left + $(ip rule show | grep -c "lookup $t\b") + $(ip -6 rule show | grep -c "lookup $t\b") + $(ip route show table "$t" 2>/dev/null | wc -l) + $(ip -6 route show table "$t" 2>/dev/null | wc -l)))
done
check "detached ENIs: rules and routes left" 0 "$left"
# shellcheck disable=SC2086
compare "after two detaches" $keep

# A reload of both drivers: every ENI's objects back as they were.
for module in virtio_net e1000e; do
	echo "  reloading $module"
	modprobe -r $module
	modprobe $module
done
# shellcheck disable=SC2086
compare "after a driver reload" $keep
echo "--- the agent on IPv6 routers, altnames, detaches:"
grep -i -E 'router|altname|detach|error|warn' /tmp/agent.log | tail -30
echo "--- rules and ENI tables:"
ip rule show
ip -6 rule show
ip route show table all | grep -E 'table 10[0-9]{3}|^default'
ip -6 route show table all | grep -E 'table 10[0-9]{3}'

kill "$AGENT_PID" 2>/dev/null
wait "$AGENT_PID" 2>/dev/null
kill "$MOCK_PID" 2>/dev/null
finish
