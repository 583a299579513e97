#!/bin/sh
# The packaged service SIGKILLed while its guided reload's `modprobe -r` is still running (a slow unload: a modprobe.d remove command that sleeps first): the next agent waits for that command, loads the driver again and restores its NIC.
# guest: trixie
# preinstall: hotplug-agent
# imds: no-nics
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

UNIT=hotplug-agent.service
E=52:54:00:12:34:11 # e1000e
MARKER=/var/lib/hotplug/reload-in-progress
MODPROBE_UNIT=hotplug-modprobe-e1000e.service
prop() { systemctl show -p "$1" --value "$UNIT"; }

sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
dev=$(iface_of $E)
sysctl -qw "net.ipv6.conf.$dev.accept_ra=0"
ip link set "$dev" up
ip addr add 10.0.1.5/24 dev "$dev"
ip route add 192.168.51.0/24 via 10.0.1.254 dev "$dev"
nic_config $E | sort >/tmp/before
sleep 1 # the agent's snapshot settles

# A slow driver removal: the module stays live for 6 s after `modprobe -r` starts, then goes.
echo 'remove e1000e /bin/sh -c "sleep 6; /sbin/modprobe -r --ignore-remove e1000e"' >/etc/modprobe.d/slow-e1000e.conf

check_header
check "service active" active "$(systemctl is-active $UNIT)"
pid=$(prop MainPID)
hotplug-agent --config /etc/hotplug/hotplug.toml reload e1000e --json >/tmp/reload.json 2>/tmp/reload.err &
CLIENT=$!
check "the reload's modprobe runs in its named unit" yes \
	"$(wait_until 20 "systemctl is-active --quiet $MODPROBE_UNIT" && echo yes || echo no)"
kill -9 "$pid"
echo "  agent $pid SIGKILLed; e1000e $(cat /sys/module/e1000e/initstate 2>/dev/null || echo unloaded), marker: $(cat $MARKER 2>/dev/null || echo none)"
check "at the kill: e1000e still live" live "$(cat /sys/module/e1000e/initstate 2>/dev/null || echo unloaded)"
check "at the kill: the marker names the running unit" "$MODPROBE_UNIT" "$(jq -r '.running.unit // "none"' $MARKER 2>/dev/null || echo none)"
wait "$CLIENT" 2>/dev/null
check "restarted by systemd" yes "$(wait_until 30 "[ \"\$(prop MainPID)\" != $pid ] && [ \"\$(prop MainPID)\" != 0 ]" && echo yes || echo no)"
check "the unload ran to its end" yes "$(wait_until 30 "! systemctl is-active --quiet $MODPROBE_UNIT" && echo yes || echo no)"
check "e1000e loaded again and the marker gone" yes \
	"$(wait_until 60 "[ \"\$(cat /sys/module/e1000e/initstate 2>/dev/null)\" = live ] && [ ! -e $MARKER ]" && echo yes || echo no)"
check "the NIC's configuration back" yes "$(wait_config /tmp/before 30 $E && echo yes || echo no)"
hotplug-agent --config /etc/hotplug/hotplug.toml history --json >/tmp/history.jsonl 2>/dev/null
entry=$(grep '"action":"interrupted"' /tmp/history.jsonl | grep '"module":"e1000e"' | tail -n 1)
echo "  audit: $(printf '%s' "$entry" | jq -r '.decision + " -> " + (.outcome // "?")' 2>/dev/null)"
check "audit: the interrupted reload finished" finished "$(printf '%s' "$entry" | jq -r '.outcome // "none"' 2>/dev/null | cut -d: -f1)"
rm -f /etc/modprobe.d/slow-e1000e.conf
journalctl -u $UNIT -p warning --no-pager -o cat | grep -i "interrupted" | head -5 | sed 's/^/  log: /'
finish
