#!/bin/sh
# tests/ec2/run.sh, the checks users run on a real instance, run unchanged on this guest with virtio_net in ena's place, the package's service running.
# guest: trixie
# preinstall: hotplug-agent
# imds: no-nics
# kernels: trixie
. /opt/hotplug/scenarios/_lib.sh

# Metrics on, as docs/ec2.md suggests, so that the script counts the agent's IMDS requests (and
# the endpoint is proven under the service's sandbox).
echo 'metrics_listen = "127.0.0.1:9464"' >>/etc/hotplug/hotplug.toml
systemctl restart hotplug-agent.service

# What an instance's primary NIC has: an address, a default route, one route more.
sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
dev=$(iface_of 52:54:00:12:34:10)
ip link set "$dev" up
ip addr add 10.0.0.5/24 dev "$dev"
ip route add default via 10.0.0.1 dev "$dev" metric 100
ip route add 192.168.70.0/24 via 10.0.0.1 dev "$dev"
sleep 1 # the agent's snapshot settles (50 ms debounce)

since=$(date '+%Y-%m-%d %H:%M:%S')
/opt/hotplug/ec2/run.sh virtio_net >/tmp/ec2.out 2>&1
rc=$?
cat /tmp/ec2.out
result=$(sed -n 's/^RESULT //p' /tmp/ec2.out)
check_header
check "tests/ec2/run.sh exit status" 0 "$rc"
check "its checks all ran and passed" yes "$(grep -q '^[0-9]* checks, 0 failed$' /tmp/ec2.out && echo yes || echo no)"
check "RESULT line is JSON with the reload's figures" virtio_net "$(echo "$result" | jq -r .driver)"
check "RESULT: IMDS requests by the agent for the reload" 0 "$(echo "$result" | jq .reload_imds_requests)"
check "RESULT: configuration back (ms)" yes "$(echo "$result" | jq -e '.reload_ms > 0' >/dev/null && echo yes || echo no)"
# Under the packaged service the agent cannot load modules: systemd runs modprobe for it in a
# transient unit.
check "guided reload under the service: ok" ok "$(echo "$result" | jq -r .guided_reload)"
check "its modprobe ran in a transient unit" yes \
	"$(journalctl --no-pager -o cat -t systemd --since "$since" | grep -q 'hotplug-agent reload: modprobe' && echo yes || echo no)"
vmctl report ec2_script_reload_ms "$(echo "$result" | jq .reload_ms)"
finish
