"""pyinfra deploy doing workflow-agent's install of prometheus-node-exporter.

Run: pyinfra @local bench/baselines/node_exporter_deploy.py -y
"""

from io import StringIO

from pyinfra.operations import apt, files, server

PORT = 9100
DEFAULTS = (
    "# Managed by workflow-agent: the next install rewrites this file.\n"
    f'ARGS="--web.listen-address=0.0.0.0:{PORT}"\n'
)
INIT = "/etc/init.d/prometheus-node-exporter"
METRICS_CHECK = (
    "metrics() { exec 3<>/dev/tcp/127.0.0.1/" + str(PORT) + " || return 1; "
    "printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; "
    "grep -q '^node_cpu_seconds_total' <&3; }; "
    "for _ in $(seq 200); do if (metrics) 2>/dev/null; then exit 0; fi; sleep 0.1; done; exit 1"
)

apt.packages(
    name="prometheus-node-exporter installed",
    packages=["prometheus-node-exporter"],
    no_recommends=True,
)
defaults = files.put(
    name="defaults file",
    src=StringIO(DEFAULTS),
    dest="/etc/default/prometheus-node-exporter",
    mode="644",
)
server.shell(
    name="daemon running",
    commands=[
        "install -d -o prometheus -g prometheus /run/prometheus /var/log/prometheus",
        f"{INIT} status >/dev/null 2>&1 || {INIT} start",
    ],
)
server.shell(
    name="restart after a defaults change",
    commands=[f"{INIT} restart"],
    _if=defaults.did_change,
)
server.shell(name="metrics served", commands=[METRICS_CHECK], _shell_executable="bash")
