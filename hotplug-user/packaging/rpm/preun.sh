# hotplug-agent %preun ($1: 0 on erase, 1 or more on upgrade): stop and disable on erase only.
if [ "$1" -eq 0 ]; then
	systemctl disable --now hotplug-agent.service >/dev/null 2>&1 || :
fi
