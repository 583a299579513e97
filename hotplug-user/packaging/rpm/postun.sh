# hotplug-agent %postun ($1: 0 on erase, 1 or more on upgrade): restart the agent that runs on
# upgrade (its state in /var/lib/hotplug is kept); on erase, rpm has no purge: the state directory
# stays until removed by hand (rm -rf /var/lib/hotplug).
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -ge 1 ]; then
		systemctl try-restart hotplug-agent.service >/dev/null 2>&1 || :
	fi
fi
