#!/usr/bin/env bash
# Hand-written equivalent of workflow-agent's install of prometheus-node-exporter on a
# Debian host without systemd (compare `workflow-agent plan prometheus-node-exporter
# --target local`): install the package if missing, write the defaults file if it
# changed, start the daemon through its init script if needed, then check the metrics.
set -euo pipefail
PACKAGE=prometheus-node-exporter
DEFAULTS=/etc/default/prometheus-node-exporter
HOST=127.0.0.1
PORT=9100

if ! dpkg-query -W -f '${Status}' "$PACKAGE" 2>/dev/null | grep -q 'install ok installed'; then
  apt-get install -y -qq --no-install-recommends "$PACKAGE"
fi

wanted="# Managed by workflow-agent: the next install rewrites this file.
ARGS=\"--web.listen-address=0.0.0.0:$PORT\""
changed=0
if [ "$(cat "$DEFAULTS" 2>/dev/null)" != "$wanted" ]; then
  printf '%s\n' "$wanted" > "$DEFAULTS.new"
  mv "$DEFAULTS.new" "$DEFAULTS"
  changed=1
fi

# Without systemd nothing creates these, and the init script fails without them.
install -d -o prometheus -g prometheus /run/prometheus /var/log/prometheus
if [ "$changed" = 1 ] || ! /etc/init.d/"$PACKAGE" status >/dev/null 2>&1; then
  /etc/init.d/"$PACKAGE" restart
fi

# Metrics check without curl: HTTP/1.0 over bash's /dev/tcp, retried every 0.1 s for 20 s.
metrics() {
  exec 3<>"/dev/tcp/$HOST/$PORT" || return 1
  printf 'GET /metrics HTTP/1.0\r\nHost: %s:%s\r\n\r\n' "$HOST" "$PORT" >&3
  grep -q '^node_cpu_seconds_total' <&3
}
for _ in $(seq 200); do
  if (metrics) 2>/dev/null; then
    exit 0
  fi
  sleep 0.1
done
echo "no node_cpu_seconds_total at http://$HOST:$PORT/metrics" >&2
exit 1
