#!/bin/sh
# The .deb on a systemd Debian: install (READY=1), reload restored, bad config refused, upgrade keeps state and edits, watchdog, remove and reinstall, purge.
# guest: trixie
# guests-extra: sid
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

UNIT=hotplug-agent.service
CONF=/etc/hotplug/hotplug.toml
NIC0=52:54:00:12:34:10 # virtio_net
NIC1=52:54:00:12:34:11 # e1000e
NICS="$NIC0 $NIC1 52:54:00:12:34:12"
prop() { systemctl show -p "$1" --value "$UNIT"; }
journal_since() { journalctl -u "$UNIT" --no-pager -o cat --since "@$1" 2>/dev/null; }

# An instance as an operator finds it: NICs configured (no router advertisements: their
# addresses come and go on their own), then the package installed.
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
n=0
for mac in $NICS; do
	dev=$(iface_of "$mac")
	sysctl -qw "net.ipv6.conf.$dev.accept_ra=0"
	ip link set "$dev" mtu $((1400 + n * 100)) up
	ip addr add "10.0.$n.5/24" dev "$dev"
	ip addr add "10.0.$n.6/24" dev "$dev"
	ip -6 addr add "fd00:$n::5/64" dev "$dev" nodad
	ip route add "192.168.5$n.0/24" via "10.0.$n.1" dev "$dev"
	n=$((n + 1))
done
dev1=$(iface_of $NIC1)
ip route add default via 10.0.1.1 dev "$dev1" table 10001
ip rule add from 10.0.1.5 lookup 10001 pref 10001
nic_config $NICS | sort >/tmp/before

# Paths named like the package, before it comes (cloud-init has its own "hotplug" files).
hotplug_paths() {
	find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /opt/hotplug \) -prune -o -path '*hotplug*' -print 2>/dev/null
	find /run \( -path /run/hotplug-journal.txt \) -prune -o -path '*hotplug*' -print 2>/dev/null
}
hotplug_paths | sort -u >/tmp/paths.before

check_header
echo "--- install"
dpkg -i /opt/hotplug/pkg/hotplug-agent_*.deb >/tmp/dpkg-install.log 2>&1
check "dpkg -i" 0 "$?"
check "service state after install" active "$(systemctl is-active $UNIT)"
check "service enabled" enabled "$(systemctl is-enabled $UNIT)"
status=$(prop StatusText)
echo "  STATUS=$status"
check "STATUS= names the mode" "full mode" "$(echo "$status" | cut -c1-9)"
start_us=$(prop ExecMainStartTimestampMonotonic)
ready_us=$(prop ActiveEnterTimestampMonotonic)
vmctl report ready_ms "$(((ready_us - start_us) / 1000))"
check "hotplug-agent status answers" 3 "$(hotplug-agent status --json | jq length)"
pid=$(prop MainPID)
vmctl report rss_kb "$(awk '/^VmRSS/ { print $2 }' /proc/$pid/status)"
exposure=$(systemd-analyze security --no-pager $UNIT | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
# The same agent without the unit's sandbox and capability bounding, for comparison.
printf '[Service]\nType=notify\nExecStart=/usr/sbin/hotplug-agent --config %s run\n' "$CONF" >/run/systemd/system/hotplug-plain.service
systemctl daemon-reload
plain=$(systemd-analyze security --no-pager hotplug-plain.service | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
echo "  exposure: $exposure with the unit's sandbox, $plain without"
vmctl report exposure "$exposure"
vmctl report exposure_unsandboxed "$plain"
check "exposure below 3 (systemd-analyze: OK)" yes "$(awk -v e="$exposure" 'BEGIN { print (e < 3.0) ? "yes" : "no" }')"
check "no IMDS request at start (every NIC configured)" 0 "$(curl -s http://169.254.169.254/_mock/stats | jq .requests)"

echo "--- capabilities: each one of the unit's set is needed (transient runs without it)"
caps=$(prop CapabilityBoundingSet)
echo "  bounding set: $caps"
features_with() {
	systemd-run --quiet --wait --pipe --collect -p "CapabilityBoundingSet=$1" \
		/usr/sbin/hotplug-agent --log-format json features --json 2>/dev/null | jq -rs 'map(select(.type == "agent")) | .[0].mode // "error"'
}
check "features with the unit's set" full "$(features_with "$caps")"
for cap in $caps; do
	rest=$(echo "$caps" | tr ' ' '\n' | grep -vx "$cap" | tr '\n' ' ')
	case $cap in
	cap_net_admin)
		# Loading and attaching do not need it; restoring does.
		got=$(systemd-run --quiet --wait --pipe --collect -p "CapabilityBoundingSet=$rest" \
			/usr/sbin/ip link set dev "$dev1" mtu 1401 2>&1 | grep -c "Operation not permitted")
		check "without cap_net_admin: netlink changes refused" 1 "$got"
		;;
	*) check "features without $cap" degraded "$(features_with "$rest")" ;;
	esac
done
# Kernels without Debian's perf_event_paranoid=3 patch behave as paranoid 2: there the narrower
# CAP_BPF CAP_PERFMON replace CAP_SYS_ADMIN.
old_paranoid=$(sysctl -n kernel.perf_event_paranoid)
sysctl -qw kernel.perf_event_paranoid=2
check "paranoid 2: cap_bpf cap_perfmon suffice" full "$(features_with "cap_bpf cap_perfmon")"
sysctl -qw kernel.perf_event_paranoid="$old_paranoid"

echo "--- driver reload under the service"
since=$(date +%s)
modprobe -r virtio_net
modprobe virtio_net
check "virtio_net reload restored" yes "$(wait_config /tmp/before 20 $NICS && echo yes || echo no)"
check "restore logged with HOTPLUG_MAC and HOTPLUG_ACTION" 1 \
	"$(journalctl -u $UNIT --since "@$since" HOTPLUG_MAC=$NIC0 HOTPLUG_ACTION=restore -o cat --no-pager | grep -c '^restored')"
check "no IMDS request during the reload" 0 "$(curl -s http://169.254.169.254/_mock/stats | jq .requests)"

echo "--- systemctl reload"
cp "$CONF" /tmp/conf.orig
printf 'return_timeout_seconds = 0\n' >>"$CONF"
since=$(date +%s)
systemctl reload $UNIT
check "reload of a broken file: still active" active "$(systemctl is-active $UNIT)"
check "reload of a broken file: same process" "$pid" "$(prop MainPID)"
check "the refusal names the key and value" 1 "$(journal_since "$since" | grep -c 'reload refused.*return_timeout_seconds` = 0')"
cp /tmp/conf.orig "$CONF"
printf '\n# the operator'"'"'s edit\nreturn_timeout_seconds = 300\n' >>"$CONF"
since=$(date +%s)
systemctl reload $UNIT
check "reload of a good file" 1 "$(journal_since "$since" | grep -c '^configuration reloaded')"

echo "--- upgrade while a driver is away"
modprobe -r e1000e
gone=$(hotplug-agent status --json | jq -r --arg m $NIC1 '.[] | select(.mac == $m) | .state')
check "e1000e NIC held while away" driver-gone "$gone"
dpkg -i /opt/hotplug/pkg/upgrade/hotplug-agent_*.deb >/tmp/dpkg-upgrade.log 2>&1
check "dpkg -i (upgrade)" 0 "$?"
check "upgraded version" 0.1.0-2 "$(dpkg-query -W -f '${Version}' hotplug-agent)"
check "service active after upgrade" active "$(systemctl is-active $UNIT)"
check "restarted by the upgrade" yes "$([ "$(prop MainPID)" != "$pid" ] && echo yes || echo no)"
check "operator's edit kept" 1 "$(grep -c '^return_timeout_seconds = 300$' $CONF)"
modprobe e1000e
check "NIC away during the upgrade restored by the new agent" yes "$(wait_config /tmp/before 20 $NICS && echo yes || echo no)"

echo "--- watchdog"
pid=$(prop MainPID)
restarts=$(prop NRestarts)
[ "$pid" -gt 0 ] || fail "the service has no main process"
kill -STOP "$pid"
stopped=$(uptime_ms)
while [ $(($(uptime_ms) - stopped)) -lt 90000 ] && { [ "$(prop MainPID)" = "$pid" ] || [ "$(systemctl is-active $UNIT)" != active ]; }; do
	sleep 0.2
done
check "stopped agent replaced (watchdog)" yes "$([ "$(prop MainPID)" != "$pid" ] && [ "$(systemctl is-active $UNIT)" = active ] && echo yes || echo no)"
check "restart counted" $((restarts + 1)) "$(prop NRestarts)"
vmctl report watchdog_restart_ms "$(($(uptime_ms) - stopped))"
check "the journal says watchdog" yes "$(journalctl -u $UNIT --no-pager | grep -q 'Watchdog timeout' && echo yes || echo no)"

echo "--- remove, then install again"
apt-get remove -y -q hotplug-agent >/tmp/remove.log 2>&1
check "apt-get remove" 0 "$?"
check "service gone after remove" inactive "$(systemctl is-active $UNIT)"
check "state kept after remove" yes "$([ -d /var/lib/hotplug ] && echo yes || echo no)"
dpkg -i /opt/hotplug/pkg/upgrade/hotplug-agent_*.deb >/tmp/dpkg-reinstall.log 2>&1
check "dpkg -i after remove" 0 "$?"
check "enabled again after reinstall" enabled "$(systemctl is-enabled $UNIT)"
check "active again after reinstall" active "$(systemctl is-active $UNIT)"

echo "--- purge"
apt-get purge -y -q hotplug-agent >/tmp/purge.log 2>&1
check "apt-get purge" 0 "$?"
rm -f /run/systemd/system/hotplug-plain.service
systemctl daemon-reload
# Every path with "hotplug" in its name that was not there before the package came.
hotplug_paths | sort -u >/tmp/paths.after
comm -13 /tmp/paths.before /tmp/paths.after >/tmp/left
sed 's/^/  left behind: /' /tmp/left
check "nothing left behind after purge" 0 "$(wc -l </tmp/left)"
check "unit gone" 0 "$(systemctl list-unit-files 'hotplug-agent*' --no-legend | wc -l)"

finish
