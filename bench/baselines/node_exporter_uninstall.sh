#!/usr/bin/env bash
# Hand-written equivalent of workflow-agent's uninstall of prometheus-node-exporter:
# stop the daemon, purge the package, remove its user, group and directories.
set -euo pipefail
PACKAGE=prometheus-node-exporter

if [ -x /etc/init.d/"$PACKAGE" ]; then
  install -d /run/prometheus  # the init script looks for its pid file there
  /etc/init.d/"$PACKAGE" stop || true
fi
if dpkg-query -W -f '${Status}' "$PACKAGE" 2>/dev/null | grep -q 'ok installed'; then
  apt-get purge -y -qq "$PACKAGE"
fi
if getent passwd prometheus >/dev/null; then
  userdel prometheus
fi
if getent group prometheus >/dev/null; then
  groupdel prometheus
fi
rm -rf -- /var/lib/prometheus /var/log/prometheus /run/prometheus
