#!/bin/sh
# cloud-init's hotplug socket under a burst: 8 virtio NICs configured by cloud-init, virtio_net reloaded three times in a row: every NIC restored, the socket (its trigger limit lifted by the package) still listening, a NIC attached afterwards configured by cloud-init; with a trigger limit scaled to the emulator's speed, the same reloads fail the socket, and the agent then configures an attach itself.
# guest: trixie
# preinstall: hotplug-agent
# managers: cloud-init
# nics: virtio virtio virtio virtio virtio virtio virtio virtio
# kernels: trixie
# bench: yes
. /opt/hotplug/scenarios/_lib.sh

NICS=""
i=0
while [ $i -lt 8 ]; do
	NICS="$NICS $(printf '52:54:00:12:34:%02x' $((0x10 + i)))"
	i=$((i + 1))
done
NEW=52:54:00:12:34:31
NEW2=52:54:00:12:34:32
imds() { curl -s http://169.254.169.254/_mock/stats | jq -r "$1"; }

timeout 300 cloud-init status --wait >/dev/null
check_header
cloud_init_hotplug_for_emulated_nics || fail "cloud-init's hotplug hook is not installed"
check "the service runs in full mode" full "$(service_mode)"
check "the socket's trigger limit lifted" 0 "$(systemctl show -p TriggerLimitIntervalUSec --value cloud-init-hotplugd.socket)"
for mac in $NICS; do
	wait_until 120 "ip -4 addr show dev $(iface_of $mac) | grep -q inet" || fail "cloud-init did not configure $mac"
done
nic_config $NICS | sort >/tmp/before
since_journal=$(date +%s)
for round in 1 2 3; do
	modprobe -r virtio_net
	modprobe virtio_net
	udevadm settle --timeout=60
done
check "8 NICs restored after three reloads" yes "$(wait_config /tmp/before 120 $NICS && echo yes || echo no)"
sleep 2
check "cloud-init's hotplug socket still listening" active "$(systemctl is-active cloud-init-hotplugd.socket)"
journalctl -u cloud-init-hotplugd.service --since "@$since_journal" --no-pager -o short-unix >/tmp/hotplugd.txt
echo "  gate: $(grep -c 'cloud-init not run for' /tmp/hotplugd.txt) uevents skipped, $(grep -c 'passing to cloud-init' /tmp/hotplugd.txt) passed on"
# The most activations of the socket within 2 s (each gated uevent is one). Under emulation each
# run of the gate takes a few hundred ms, so this stays below systemd's limit of 20; a host's
# CPU runs it in milliseconds, and the same burst passes 20 (hence the drop-in, and part 3).
burst=$(grep 'args=' /tmp/hotplugd.txt | awk '{ t[NR] = $1 } END { m = 0; j = 1; for (i = 1; i <= NR; i++) { while (t[i] - t[j] > 2) j++; if (i - j + 1 > m) m = i - j + 1 } print m }')
echo "  the most activations within 2 s: $burst"
vmctl report activations_in_2s "$burst"
check "cloud-init's hook run for none of the reloads' uevents" 0 "$(grep -c 'passing to cloud-init' /tmp/hotplugd.txt)"

echo "--- a real attach after the burst: cloud-init configures it"
curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null
curl -s -d "{\"nic\":{\"mac\":\"$NEW\",\"device_number\":13,\"local_ipv4s\":[\"10.0.8.5\"],\"subnet_ipv4_cidr_block\":\"10.0.8.0/24\"},\"lag_ms\":2000}" \
	http://169.254.169.254/_mock/attach >/dev/null
vmctl attach virtio $NEW
new=$(iface_of $NEW)
check "the attached NIC configured by cloud-init" yes "$(wait_until 240 "ip -4 addr show dev $new | grep -q 10.0.8.5" && echo yes || echo no)"
check "the agent left it to cloud-init" left-to-cloud-init \
	"$(hotplug-agent status --json | jq -r --arg m $NEW '.[] | select(.mac == $m) | .attach.status')"

echo "--- a trigger limit scaled to the emulator (2 in 2 s): reloads fail the socket"
mkdir -p /run/systemd/system/cloud-init-hotplugd.socket.d
printf '[Socket]\nTriggerLimitIntervalSec=2s\nTriggerLimitBurst=2\n' >/run/systemd/system/cloud-init-hotplugd.socket.d/zz-scaled.conf
systemctl daemon-reload
systemctl restart cloud-init-hotplugd.socket
for round in 1 2 3; do
	modprobe -r virtio_net
	modprobe virtio_net
	udevadm settle --timeout=60
done
check "8 NICs restored" yes "$(wait_config /tmp/before 120 $NICS && echo yes || echo no)"
check "the socket failed on its trigger limit" trigger-limit-hit \
	"$(wait_until 30 '[ "$(systemctl show -p Result --value cloud-init-hotplugd.socket)" = trigger-limit-hit ]' && echo trigger-limit-hit || systemctl show -p Result --value cloud-init-hotplugd.socket)"
curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null
vmctl unplug "$new"
curl -s -d "{\"nic\":{\"mac\":\"$NEW2\",\"device_number\":14,\"local_ipv4s\":[\"10.0.8.6\"],\"subnet_ipv4_cidr_block\":\"10.0.8.0/24\"},\"lag_ms\":2000}" \
	http://169.254.169.254/_mock/attach >/dev/null
vmctl plug "$new" --mac $NEW2
check "attached with the socket failed: configured by the agent" configured \
	"$(wait_until 60 "hotplug-agent status --json | jq -e --arg m $NEW2 '.[] | select(.mac == \$m) | .attach.status == \"configured\"'" && echo configured ||
		hotplug-agent status --json | jq -r --arg m $NEW2 '.[] | select(.mac == $m) | .attach.status')"
rm -f /run/systemd/system/cloud-init-hotplugd.socket.d/zz-scaled.conf
finish
