"""Proving that an integration works, and that uninstalling it leaves nothing behind.

``checks``      small typed checks (package installed, process running, port listening,
                HTTP endpoint, Prometheus metrics, file contents) and ``run_checks``, which
                retries each until it passes or a deadline: daemons take a moment to start.
``exposition``  a parser for the Prometheus text exposition format.
``http``        HTTP GET from the target itself over bash ``/dev/tcp``.
``snapshot``    a snapshot of files, packages, users and groups on a target, and the diff
                of two snapshots: the uninstall proof.

Everything is learned by running bash on the target through ``Target.run`` (bash, /proc,
``/dev/tcp`` and coreutils only) and parsed in Python, so it works the same on every
target kind.
"""
