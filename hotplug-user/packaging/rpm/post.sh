# hotplug-agent %post ($1: 1 on install, 2 or more on upgrade): enable and start on install; on
# upgrade the new agent is started by %postun of the old package (try-restart), state kept.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -eq 1 ]; then
		systemctl enable --now hotplug-agent.service >/dev/null 2>&1 || :
	fi
elif [ "$1" -eq 1 ]; then
	systemctl enable hotplug-agent.service >/dev/null 2>&1 || :
fi
