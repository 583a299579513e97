#!/bin/sh
# The side-by-side benchmark's guest half (cargo xtask bench cloud-init runs it twice: without and
# with hotplug-agent installed): cloud-init configured the NICs at boot; each virtio_net reload is
# timed until the NIC's configuration equals the one before (or 120 s pass: "never"), with the
# IMDS requests it cost until cloud-init's hotplug hook is done; then a NIC really attached.
. /opt/hotplug/scenarios/_lib.sh

RELOADS=${BENCH_RELOADS:-3}
N0=52:54:00:12:34:10
NEW=52:54:00:12:34:21
imds() { curl -s http://169.254.169.254/_mock/stats | jq -r "$1"; }
# hook_idle SECONDS: until cloud-init's hotplug service has nothing left to do (inactive, or
# failed: cloud-init's remove handler exits 1 on a reload), twice 2 s apart.
hook_idle() {
	i=0
	while [ $i -lt $(($1 * 2)) ]; do
		case "$(systemctl is-active cloud-init-hotplugd.service)" in
		active | activating | deactivating | reloading) ;;
		*)
			sleep 2
			case "$(systemctl is-active cloud-init-hotplugd.service)" in
			active | activating | deactivating | reloading) ;;
			*) return 0 ;;
			esac
			;;
		esac
		sleep 0.5
		i=$((i + 1))
	done
	return 1
}

timeout 300 cloud-init status --wait >/dev/null
cloud_init_hotplug_for_emulated_nics || fail "cloud-init's hotplug hook is not installed"
wait_until 60 "ip -4 addr show dev $(iface_of $N0) | grep -q inet" || fail "cloud-init did not configure $N0"
hotplug=no
systemctl is-active -q hotplug-agent.service && hotplug=yes
vmctl report hotplug "\"$hotplug\""
vmctl report cloud_init_version "\"$(cloud-init --version 2>&1 | awk '{ print $2 }')\""
nic_config $N0 | sort >/tmp/before
k=1
while [ $k -le "$RELOADS" ]; do
	curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null
	started=$(uptime_ms)
	modprobe -r virtio_net
	modprobe virtio_net
	if wait_config /tmp/before 120 $N0 2>/dev/null; then
		took=$(($(uptime_ms) - started))
	else
		took=null
	fi
	hook_idle 240 || echo "cloud-init's hook still busy after 240 s"
	requests=$(imds .requests)
	echo "reload $k: configuration back after ${took} ms, $requests IMDS requests"
	vmctl report "reload_${k}_ms" "$took"
	vmctl report "reload_${k}_imds_requests" "$requests"
	# The next reload starts from the configuration it had before, whoever put it back.
	if [ "$took" = null ]; then
		ifdown --force "$(iface_of $N0)" >/dev/null 2>&1
		ifup "$(iface_of $N0)" >/dev/null 2>&1
		wait_config /tmp/before 60 $N0 2>/dev/null
	fi
	k=$((k + 1))
done

curl -s -X POST http://169.254.169.254/_mock/reset >/dev/null
curl -s -d "{\"nic\":{\"mac\":\"$NEW\",\"device_number\":3,\"local_ipv4s\":[\"10.0.3.5\"],\"subnet_ipv4_cidr_block\":\"10.0.3.0/24\"},\"lag_ms\":2000}" \
	http://169.254.169.254/_mock/attach >/dev/null
started=$(uptime_ms)
vmctl attach e1000e $NEW
took=null
i=0
while [ $i -lt 1200 ]; do
	if dev=$(iface_of $NEW) && ip -4 addr show dev "$dev" | grep -q 10.0.3.5; then
		took=$(($(uptime_ms) - started))
		break
	fi
	sleep 0.1
	i=$((i + 1))
done
hook_idle 240 || true
echo "attach: configured after ${took} ms, $(imds .requests) IMDS requests"
vmctl report attach_ms "$took"
vmctl report attach_imds_requests "$(imds .requests)"
