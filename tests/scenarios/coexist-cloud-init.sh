#!/bin/sh
# cloud-init (Ec2 datasource, its hotplug hook on) configured the NICs at boot: reloads restored by hotplug with 0 IMDS requests in all, the gate passes a real attach to cloud-init.
# guest: trixie
# guests-extra: sid
# preinstall: hotplug-agent
# managers: cloud-init
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

N0=52:54:00:12:34:10 # virtio_net
N1=52:54:00:12:34:11 # e1000e
NEW=52:54:00:12:34:21 # attached into the spare slot
imds() { curl -s http://169.254.169.254/_mock/stats | jq -r "$1"; }

timeout 300 cloud-init status --wait >/dev/null
check_header
check "cloud-init's datasource" ec2 "$(cloud-init query platform 2>/dev/null)"
check "cloud-init finished without errors" done "$(cloud-init status | sed -n 's/^status: //p')"
cloud_init_hotplug_for_emulated_nics || fail "cloud-init's hotplug hook is not installed"
check "the service runs in full mode" full "$(service_mode)"
check "the gate stands in front of cloud-init's hook" yes \
	"$(systemctl cat cloud-init-hotplugd.service | grep -q 'hotplug-agent.*cloud-init-gate' && echo yes || echo no)"
for mac in $N0 $N1; do
	wait_until 60 "ip -4 addr show dev $(iface_of $mac) | grep -q inet" || fail "cloud-init did not configure $mac"
done
nic_config $N0 $N1 | sort >/tmp/before
cat /tmp/before
curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null
since_journal=$(date +%s)

# Three reloads in a row first: six quick starts of cloud-init-hotplugd.service, more than
# systemd's default start limit (5 in 10 s) allows; the package's drop-in lifts it, else the
# socket fails and cloud-init never hears of a real attach.
for module in virtio_net e1000e virtio_net; do
	modprobe -r $module
	modprobe $module
done
check "three quick reloads restored" yes "$(wait_config /tmp/before 60 $N0 $N1 && echo yes || echo no)"
check "cloud-init's hotplug socket still listening" active "$(systemctl is-active cloud-init-hotplugd.socket)"
check "its trigger limit lifted (the package's drop-in)" 0 "$(systemctl show -p TriggerLimitIntervalUSec --value cloud-init-hotplugd.socket)"

# Then one reload of each, watched for 30 s.
watch_start /tmp/monitor
since=$(now_stamp)
for module in virtio_net e1000e; do
	modprobe -r $module
	modprobe $module
done
check "both reloads restored" yes "$(wait_config /tmp/before 60 $N0 $N1 && echo yes || echo no)"
sleep 30
watch_stop
check "flaps in the 30 s after the reloads" 0 "$(flaps /tmp/monitor "$since")"
check "duplicates" 0 "$(duplicates $N0 $N1)"
check "equal after 30 s" yes "$(nic_config $N0 $N1 | sort | cmp -s /tmp/before - && echo yes || echo no)"
check "IMDS requests during the reloads, all clients" 0 "$(imds .requests)"
vmctl report imds_requests_during_reloads "$(imds .requests)"
# Every uevent of the reloads that reached cloud-init's hook was kept from it by the gate; none ran
# it. (udev's rule passes a uevent on only once udev has the device's properties: a reload quicker
# than udev's handling of the previous add, as the three quick ones can be under emulation, sends
# its remove to nobody, which is as good.)
# cloud-init 25.2 and later hand the hook no `remove` (five uevents for the five reloads), older
# ones both halves (ten).
ci_version=$(cloud-init --version 2>&1 | grep -o '[0-9][0-9]*\.[0-9][0-9]*' | head -1)
if [ "$(echo "$ci_version" | awk -F. '{ print ($1 * 100 + $2 >= 2502) }')" = 1 ]; then halves=5; else halves=10; fi
echo "  cloud-init $ci_version: $halves reload uevents for its hook"
journalctl -u cloud-init-hotplugd.service --since "@$since_journal" --no-pager -o cat >/tmp/hotplugd.txt
gated=$(grep -c "cloud-init not run for" /tmp/hotplugd.txt)
check "cloud-init's hook run for none of the reloads' uevents" 0 "$(grep -c "passing to cloud-init" /tmp/hotplugd.txt)"
check "the gate kept the hook from the reloads' uevents (of $halves)" yes \
	"$([ "$gated" -ge $((halves * 4 / 5)) ] && echo yes || echo "no: $gated")"
vmctl report uevents_gated "$gated"
check "cloud-init still healthy" done "$(cloud-init status | sed -n 's/^status: //p')"

echo "--- a real attach: the gate passes it to cloud-init"
curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null
# IMDS publishes the new ENI 2 s after the attach, as EC2 lags.
curl -s -d "{\"nic\":{\"mac\":\"$NEW\",\"device_number\":3,\"local_ipv4s\":[\"10.0.3.5\"],\"subnet_ipv4_cidr_block\":\"10.0.3.0/24\"},\"lag_ms\":2000}" \
	http://169.254.169.254/_mock/attach >/dev/null
started=$(uptime_ms)
vmctl attach e1000e $NEW
new=$(iface_of $NEW)
configured=no
if wait_until 240 "ip -4 addr show dev $new | grep -q 10.0.3.5"; then configured=yes; fi
check "the attached NIC configured by cloud-init" yes "$configured"
vmctl report attach_configured_ms "$(($(uptime_ms) - started))"
vmctl report attach_imds_requests "$(imds .requests)"
check "the attach asked IMDS through cloud-init only" 0 "$(imds '.by_client["hotplug-agent"] // 0')"
check "the agent left the attach to cloud-init" left-to-cloud-init \
	"$(hotplug-agent status --json | jq -r --arg m $NEW '.[] | select(.mac == $m) | .attach.status')"
journalctl -u cloud-init-hotplugd.service --no-pager -o cat | grep "hotplug-agent:" | tail -8

echo "--- cloud-init's hotplug socket not listening: the agent configures an attach itself"
NEW2=52:54:00:12:34:22
systemctl stop cloud-init-hotplugd.socket
vmctl unplug "$new"
curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null
curl -s -d "{\"nic\":{\"mac\":\"$NEW2\",\"device_number\":4,\"local_ipv4s\":[\"10.0.3.6\"],\"subnet_ipv4_cidr_block\":\"10.0.3.0/24\"},\"lag_ms\":2000}" \
	http://169.254.169.254/_mock/attach >/dev/null
vmctl plug "$new" --mac $NEW2
new2=$(iface_of $NEW2)
check "attached with the socket stopped: configured by the agent" configured \
	"$(wait_until 60 "hotplug-agent status --json | jq -e --arg m $NEW2 '.[] | select(.mac == \$m) | .attach.status == \"configured\"'" && echo configured ||
		hotplug-agent status --json | jq -r --arg m $NEW2 '.[] | select(.mac == $m) | .attach.status')"
check "its address from IMDS" yes "$(ip -4 addr show dev "$new2" | grep -q 10.0.3.6 && echo yes || echo no)"
check "IMDS asked by the agent" yes "$([ "$(imds '.by_client["hotplug-agent"] // 0')" -gt 0 ] && echo yes || echo no)"
systemctl start cloud-init-hotplugd.socket
finish
