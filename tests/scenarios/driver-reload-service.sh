#!/bin/sh
# driver-reload's checks with the agent as the installed, sandboxed service: each driver reloaded, SIGKILL while away, no IMDS.
# guest: trixie
# guests-extra: sid
# preinstall: hotplug-agent
# imds: no-nics
# kernels: trixie
# kernels-extra: bookworm sid
. /opt/hotplug/scenarios/_lib.sh

UNIT=hotplug-agent.service
NICS="52:54:00:12:34:10 52:54:00:12:34:11 52:54:00:12:34:12"
prop() { systemctl show -p "$1" --value "$UNIT"; }
imds_requests() { curl -s http://169.254.169.254/_mock/stats | jq .requests; }

# The package was installed in the image (the service started at boot, before the network);
# IMDS lists no NIC, so the agent's start-up pass (NICs without an address are looked up once)
# leaves them all to this script.

# Configured after the agent started, as at boot: each change reaches its snapshot live.
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
n=0
for mac in $NICS; do
	dev=$(iface_of "$mac")
	sysctl -qw "net.ipv6.conf.$dev.accept_ra=0"
	ip link set "$dev" mtu $((1400 + n * 100)) up
	ip addr add "10.0.$n.5/24" dev "$dev"
	ip addr add "10.0.$n.6/24" dev "$dev"
	ip -6 addr add "fd00:$n::5/64" dev "$dev" nodad
	ip route add default via "10.0.$n.1" dev "$dev" metric $((100 + n))
	ip route add "192.168.5$n.0/24" via "10.0.$n.254" dev "$dev"
	n=$((n + 1))
done
dev1=$(iface_of 52:54:00:12:34:11)
ip route add default via 10.0.1.1 dev "$dev1" table 10001
ip rule add from 10.0.1.5 lookup 10001 pref 10001
ip rule add from 10.0.1.6 lookup 10001 pref 10002
ip link property add dev "$dev1" altname eni-test-1
nic_config $NICS | sort >/tmp/before
sleep 1 # the agent's snapshots settle (50 ms debounce)

check_header
check "service active (READY=1)" active "$(systemctl is-active $UNIT)"
check "full mode" "full mode" "$(prop StatusText | cut -c1-9)"
ready_us=$(prop ActiveEnterTimestampMonotonic)
start_us=$(prop ExecMainStartTimestampMonotonic)
pre_us=$(systemctl show -p ActiveEnterTimestampMonotonic --value network-pre.target)
echo "  ready $((ready_us / 1000)) ms after the kernel started ($(((ready_us - start_us) / 1000)) ms after its own start); network-pre.target at $((pre_us / 1000)) ms"
vmctl report boot_to_ready_ms "$((ready_us / 1000))"
vmctl report start_to_ready_ms "$(((ready_us - start_us) / 1000))"
check "ready before network-pre.target" yes "$([ "$ready_us" -gt 0 ] && [ "$ready_us" -le "$pre_us" ] && echo yes || echo no)"
curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null
for mac in $NICS; do
	dev=$(iface_of "$mac")
	module=$(basename "$(readlink -f "/sys/class/net/$dev/device/driver/module")")
	modprobe -r "$module"
	modprobe "$module"
	check "$module reload restored" yes "$(wait_config /tmp/before 20 $NICS && echo yes || echo no)"
	latency=$(hotplug-agent status --json | jq --arg m "$mac" '.[] | select(.mac == $m) | .last_restore.latency_us')
	echo "  $module: restore latency ${latency:-?} us"
	vmctl report "restore_latency_us_$module" "${latency:-null}"
done

# Kernel context in the service's audit trail: each removal a driver unload by modprobe, each
# unload a module event naming it (a degraded service would say driver-unbind and name no tool).
hotplug-agent --config /etc/hotplug/hotplug.toml history --json >/tmp/history.jsonl 2>/dev/null
for mac in $NICS; do
	check "audit $mac: removal a driver-unload by modprobe" yes "$(grep "\"mac\":\"$mac\"" /tmp/history.jsonl |
		grep '"action":"removal"' | grep '"cause":"driver-unload"' | grep -q '"comm":"modprobe"' && echo yes || echo no)"
done
unloaded=$(grep '"kind":"module"' /tmp/history.jsonl | grep '"action":"unload"' | grep '"comm":"modprobe"' |
	grep -o '"module":"[^"]*"' | cut -d'"' -f4 | sort -u | tr '\n' ' ')
missing=""
for m in virtio_net e1000e e1000; do
	echo " $unloaded" | grep -q " $m " || missing="$missing $m"
done
check "audit: drivers with no unload by modprobe" none "${missing:-none}"

pid=$(prop MainPID)
[ "$pid" -gt 0 ] || fail "the service has no main process"
modprobe -r e1000e
sleep 0.5
kill -9 "$pid"
i=0
while [ $i -lt 300 ] && { [ "$(prop MainPID)" = "$pid" ] || [ "$(systemctl is-active $UNIT)" != active ]; }; do
	sleep 0.1
	i=$((i + 1))
done
check "SIGKILLed agent restarted by systemd" yes "$([ "$(prop MainPID)" != "$pid" ] && echo yes || echo no)"
modprobe e1000e
check "restored across the SIGKILL" yes "$(wait_config /tmp/before 20 $NICS && echo yes || echo no)"
check "IMDS requests during the reloads" 0 "$(imds_requests)"
vmctl report imds_requests "$(imds_requests)"
pid=$(prop MainPID)
vmctl report agent_rss_kib "$(awk '/^VmRSS/ { print $2 }' /proc/$pid/status)"
journalctl -u $UNIT -p warning --no-pager -o cat | grep -v "Watchdog\|SIGKILL\|signal=KILL" | head -20
finish
