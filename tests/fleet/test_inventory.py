"""Inventory parsing and host patterns, checked against Ansible itself: every inventory
here is also read by ``ansible-inventory --list`` and every pattern by
``ansible --list-hosts``, and the answers must agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from workflow_agent.config import WorkflowConfiguration
from workflow_agent.errors import InvalidInputError
from workflow_agent.fleet.inventory import (
    Host,
    Inventory,
    InventoryError,
    Vaulted,
    load_inventory,
)
from workflow_agent.fleet.plan import FleetTargets

BIN = Path(sys.executable).parent

INI = """\
# hosts before any section are ungrouped
jump.example.com ansible_user=ops
bastion ansible_host=192.0.2.1

[web]
web[01:03].example.com http_port=8080 enabled=True weight=1.5
web-extra ansible_host=10.0.0.9 ansible_port=2201 # a comment

[db]
db-[a:c] ansible_user=postgres
db-a:2222 role=primary
db-z:2200 role=spare opts="{'a': 1}"

[prod:children]
web
db
edge   # defined further down

[edge]
edge1 ansible_ssh_common_args='-o ProxyJump=ops@jump.example.com'
edge[1:9:4]

[prod:vars]
env=prod
http_port=80
replicas=[1, 2]
flag=FALSE
none=None

[web:vars]
http_port=8081

[canary:children]
edge

[canary]
web02.example.com

[all:vars]
ansible_user=deploy
ntp="pool.ntp.org"
"""

YAML = """\
all:
  vars:
    ansible_user: deploy
    ntp: pool.ntp.org
  hosts:
    jump.example.com:
      ansible_user: ops
  children:
    prod:
      vars: {env: prod, http_port: 80, tags: [a, b]}
      children:
        web:
          vars: {http_port: 8081}
          hosts:
            web[01:03].example.com: {http_port: 8080}
            web-extra: {ansible_host: 10.0.0.9, ansible_port: 2201}
        db:
          hosts:
            db-[a:c]:
              ansible_user: postgres
            db-z:2200:
              role: spare
        edge:
          hosts:
            edge1: {ansible_ssh_common_args: -J ops@jump.example.com}
            edge[1:9:4]:
    canary:
      hosts:
        web02.example.com:
        web-extra: {canary: true}
      children:
        edge:
    east:
      vars: {ansible_group_priority: 10, zone: east}
      hosts:
        web01.example.com:
    west:
      vars: {zone: west}
      hosts:
        web01.example.com:
"""

PATTERNS = [
    "all", "*", "web", "prod", "db:edge", "db,edge", "prod:&canary", "prod:!db",
    "web*", "~web0[12]", "web0?.example.com", "prod:!web02.example.com:&web",
    "db-a", "ungrouped", "canary", "edge:&canary", "~db-(a|b)", "prod:!~web.*",
]


def ansible(tool: str, *args: str, cwd: Path) -> str:
    """Run an Ansible tool from the test venv; its standard output."""
    exe = BIN / tool
    if not exe.exists():
        found = shutil.which(tool)
        assert found, f"{tool} is missing: pip install -e '.[test]' installs ansible-core"
        exe = Path(found)
    env = {**os.environ, "ANSIBLE_HOME": str(cwd / ".ansible"), "ANSIBLE_LOCAL_TEMP": str(cwd),
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False", "ANSIBLE_NOCOLOR": "1"}
    done = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ansible_list(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ansible("ansible-inventory", "-i", str(path), "--list",
                                              cwd=path.parent))
    return data


def ansible_hosts(path: Path, pattern: str) -> list[str]:
    out = ansible("ansible", "-i", str(path), pattern, "--list-hosts", cwd=path.parent)
    # "  hosts (N):" then one indented host per line
    return [line.strip() for line in out.splitlines()[1:] if line.strip()]


def write_vars(base: Path) -> None:
    """group_vars and host_vars beside the inventory: files, a directory, JSON."""
    (base / "group_vars" / "db").mkdir(parents=True)
    (base / "group_vars" / "db" / "main.yml").write_text("tier: data\nhttp_port: 5432\n")
    (base / "group_vars" / "db" / "zz-more.yaml").write_text("more: 1\ntier: data2\n")
    (base / "group_vars" / "all.yml").write_text("region: eu\nenv: from-all-file\nntp: x\n")
    (base / "group_vars" / "web.json").write_text('{"env": "from-web-file"}')
    (base / "group_vars" / "prod").write_text("prod_file: yes\n")  # no extension
    (base / "host_vars").mkdir()
    (base / "host_vars" / "web02.example.com.yml").write_text("special: true\nenv: host\n")
    (base / "host_vars" / "db-b.yml").write_text("ansible_port: 2299\n")


def compare_with_ansible(path: Path) -> Inventory:
    ours = load_inventory(path)
    theirs = ansible_list(path)
    assert ours.hosts.keys() == theirs["_meta"]["hostvars"].keys()
    for name, host in ours.hosts.items():
        assert dict(host.vars) == theirs["_meta"]["hostvars"][name], name
    groups = {name for name in theirs if name != "_meta"}
    ours_groups = {name for name in ours.groups if ours.group_hosts(name) or name == "all"}
    assert ours_groups == groups
    for name in groups:
        # The hosts Ansible lists under a group directly (none under all), and children.
        if name != "all":
            assert ours.groups[name].hosts == theirs[name].get("hosts", []), name
        children = {c for c in ours.groups[name].children if c in groups}
        assert children == set(theirs[name].get("children", [])), name
    return ours


@pytest.fixture(params=["ini", "yaml"])
def inventory_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / ("hosts.ini" if request.param == "ini" else "hosts.yml")
    path.write_text(INI if request.param == "ini" else YAML)
    write_vars(tmp_path)
    return path


def test_hosts_groups_and_merged_vars_match_ansible(inventory_file: Path) -> None:
    inventory = compare_with_ansible(inventory_file)
    # Spot checks of what the comparison covers, so a shared misreading shows too.
    web02 = inventory.hosts["web02.example.com"]
    assert web02.vars["special"] is True and web02.vars["env"] == "host"
    assert web02.vars["http_port"] == 8080  # host var beats every group
    assert inventory.hosts["db-a"].vars["http_port"] == 5432  # group_vars/db beats prod
    assert inventory.hosts["db-b"].port == 2299  # host_vars beat inventory


def test_an_inventory_directory_is_read_as_ansible_reads_it(tmp_path: Path) -> None:
    directory = tmp_path / "production"
    (directory / "sub").mkdir(parents=True)
    (directory / "10-web").write_text(INI)  # every file, in name order, merged
    (directory / "20-extra.yml").write_text(
        "extra:\n  hosts:\n    x1:\n      ansible_host: 10.9.9.9\n  vars:\n    tier: x\n")
    (directory / "sub" / "cache").write_text("[cache]\nc1 ansible_port=2201\n")
    (directory / "README.md").write_text("# not an inventory\n[nope]\n")
    (directory / "hosts.bak").write_text("[old]\nold1\n")
    (directory / ".hidden").write_text("[hidden]\nh1\n")
    write_vars(directory)
    inventory = compare_with_ansible(directory)
    assert {"x1", "c1", "web02.example.com"} <= inventory.hosts.keys()
    assert "old1" not in inventory.hosts and "h1" not in inventory.hosts
    assert inventory.hosts["web02.example.com"].vars["special"] is True  # its host_vars

    # What `ansible-inventory --list --yaml` writes is an inventory this reads the same.
    exported = tmp_path / "exported.yml"
    exported.write_text(ansible("ansible-inventory", "-i", str(directory), "--list", "--yaml",
                                cwd=tmp_path))
    assert {n: dict(h.vars) for n, h in load_inventory(exported).hosts.items()} == {
        n: dict(h.vars) for n, h in inventory.hosts.items()}


def test_an_inventory_script_is_refused_with_the_way_to_export_it(tmp_path: Path) -> None:
    directory = tmp_path / "inventory"
    directory.mkdir()
    (directory / "hosts").write_text("[web]\nw1\n")
    script = directory / "ec2.py"
    script.write_text("#!/usr/bin/env python3\nprint('{}')\n")
    script.chmod(0o755)
    with pytest.raises(InvalidInputError, match="an inventory script") as caught:
        load_inventory(directory)
    assert f"ansible-inventory -i {script} --list --yaml" in (caught.value.hint or "")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InventoryError, match="holds no inventory file"):
        load_inventory(tmp_path / "empty")


def test_ini_values_are_typed_like_ansible(tmp_path: Path) -> None:
    path = tmp_path / "hosts"  # no extension: recognised as INI by its content
    path.write_text(INI)
    inventory = compare_with_ansible(path)
    web01 = inventory.hosts["web01.example.com"].vars
    assert web01["enabled"] is True and web01["weight"] == 1.5
    assert web01["replicas"] == [1, 2] and web01["flag"] == "FALSE" and web01["none"] is None
    assert inventory.hosts["db-z"].vars["opts"] == {"a": 1}


def test_ports_and_ranges_as_ansible(tmp_path: Path) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text(INI)
    inventory = compare_with_ansible(path)
    assert inventory.group_hosts("edge") == ["edge1", "edge5", "edge9"]
    # A port after the name counts only where the host first appears (Ansible does so).
    assert "ansible_port" not in inventory.hosts["db-a"].vars
    assert inventory.hosts["db-z"].port == 2200


@pytest.mark.parametrize("pattern", PATTERNS)
def test_limit_patterns_match_ansible(inventory_file: Path, pattern: str) -> None:
    ours = [host.name for host in load_inventory(inventory_file).select(pattern)]
    theirs = ansible_hosts(inventory_file, pattern)
    assert sorted(ours) == sorted(theirs)
    if pattern not in ("all", "*"):
        # The same order too (rollout batches follow it). Not for all: below the first
        # level Ansible walks the group tree in set order, which varies run to run.
        assert ours == theirs
    assert ours, "every pattern here selects something"


def test_group_priority_and_depth_order_the_merge(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    path.write_text(YAML)
    inventory = compare_with_ansible(path)
    # east and west are siblings at one depth: the higher priority wins, not the name.
    assert inventory.hosts["web01.example.com"].vars["zone"] == "east"


def test_targets_and_connection_variables(tmp_path: Path) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text(INI + "\n[v6]\nv6host ansible_host=2001:db8::5 ansible_become=yes "
                    "ansible_become_user=admin ansible_ssh_private_key_file=~/.ssh/fleet\n")
    hosts = load_inventory(path).hosts
    assert hosts["web-extra"].target == "ssh://deploy@10.0.0.9:2201"
    assert hosts["jump.example.com"].target == "ssh://ops@jump.example.com:22"
    assert hosts["db-z"].target == "ssh://deploy@db-z:2200"
    assert hosts["db-b"].target == "ssh://postgres@db-b:22"
    assert hosts["edge1"].jump_host == "ops@jump.example.com"
    assert hosts["web01.example.com"].jump_host is None
    v6 = hosts["v6host"]
    assert v6.target == "ssh://deploy@[2001:db8::5]:22"
    assert v6.become and v6.become_user == "admin"
    assert v6.private_key_file == Path.home() / ".ssh" / "fleet"
    assert not hosts["web01.example.com"].become


def test_the_older_ssh_connection_variables_are_read_as_ansible_reads_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text("old ansible_ssh_host=10.0.0.7 ansible_ssh_port=2222 ansible_ssh_user=ops\n"
                    "both ansible_ssh_host=10.0.0.8 ansible_host=10.0.0.9 ansible_user=a\n")
    hosts = load_inventory(path).hosts
    assert hosts["old"].target == "ssh://ops@10.0.0.7:2222"
    assert hosts["both"].target == "ssh://a@10.0.0.8:22"  # the ssh plugin's precedence



@pytest.mark.parametrize(("args", "jump"), [
    ('-o ProxyCommand="ssh -W %h:%p -q ops@bastion"', "ops@bastion"),
    ("-o 'ProxyCommand=ssh -p 2222 -l ops bastion -W %h:%p'", "ops@bastion:2222"),
    ('-o ProxyCommand="ssh bastion nc %h %p"', "bastion"),
    ('-o "ProxyCommand ssh -W %h:%p -i ~/.ssh/b -o BatchMode=yes jump"', "jump"),
    ("-o ProxyCommand=none", None),
    ("-J ops@b2 -o ServerAliveInterval=5", "ops@b2"),
])
def test_a_proxycommand_through_a_bastion_is_a_jump_host(args: str, jump: str | None
                                                          ) -> None:
    assert Host("h", {"ansible_ssh_common_args": args}, ()).jump_host == jump


@pytest.mark.parametrize("command", ["aws ssm start-session --target %h", "ssh bastion",
                                     "corkscrew proxy 8080 %h %p"])
def test_a_proxycommand_it_cannot_follow_is_refused(tmp_path: Path, command: str) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text(f"h1 ansible_ssh_common_args='-o ProxyCommand=\"{command}\"'\n")
    hosts = load_inventory(path).select("all")
    with pytest.raises(InvalidInputError, match=r"has a ProxyCommand .* cannot follow"):
        FleetTargets(WorkflowConfiguration(data_dir=tmp_path / "d"), hosts)


VAULT = ("!vault |\n          $ANSIBLE_VAULT;1.1;AES256\n"
         "          62313365396662343061393464336163383764373764613633653634306231386433\n")


def test_ansible_vault_and_unsafe_values_load(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    path.write_text("web:\n  hosts:\n    w1:\n      ansible_host: 10.0.0.1\n"
                    f"      ansible_become_password: {VAULT}"
                    "      banner: !unsafe '{{ lookup(\"pipe\", \"id\") }}'\n")
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "web.yml").write_text(f"db_password: {VAULT}"
                                                     "ansible_user: deploy\n")
    host = load_inventory(path).hosts["w1"]
    assert host.target == "ssh://deploy@10.0.0.1:22"
    assert isinstance(host.become_password, Vaulted)
    assert isinstance(host.vars["db_password"], Vaulted)
    assert host.vars["banner"] == '{{ lookup("pipe", "id") }}'  # text, never evaluated
    assert "AES256" not in repr(host)  # the variables (passwords too) are not in its repr
    (tmp_path / "group_vars" / "web.yml").write_text(f"ansible_port: {VAULT}")
    with pytest.raises(InvalidInputError, match="ansible_port is encrypted with Ansible Vault"):
        _ = load_inventory(path).hosts["w1"].target


# -- bad input --------------------------------------------------------------------------


def test_unknown_pattern_lists_the_known_groups(inventory_file: Path) -> None:
    inventory = load_inventory(inventory_file)
    with pytest.raises(InvalidInputError, match="'nosuch' matches no group or host") as caught:
        inventory.select("web:nosuch")
    assert caught.value.hint is not None
    assert "Known groups: " in caught.value.hint and "web" in caught.value.hint
    assert "prod" in caught.value.hint
    with pytest.raises(InvalidInputError, match="not a valid regular expression"):
        inventory.select("~web(")


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("[web]\nweb1\nweb2 port\n", 3, "expected key=value"),
    ("[web]\nweb1\n[web:oops]\n", 3, "unknown type 'oops'"),
    ("[web]\nweb1\n[ web ]\n", 3, "invalid section"),
    ("[web]\nweb1 x='unclosed\n", 2, "quotation"),
    ("[web]\nweb[1:a]\n", 2, "neither numeric nor letters"),
    ("[web]\nweb[01:3]\n", 2, "equal width"),
    ("[all:children]\nweb\n[x:vars]\na=1\n", 2, "names group 'web', which is never defined"),
    ("[web]\nw1\n[x:vars]\na=1\n", 3, "[x:vars] is for group 'x'"),
    ("[web]\nw1:\n", 2, "ends in ':'"),
])
def test_malformed_ini_names_file_and_line(tmp_path: Path, text: str, line: int,
                                           problem: str) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text(text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    assert caught.value.message.startswith(f"{path}:{line}: ")
    assert problem in caught.value.message
    assert caught.value.line == line and caught.value.path == str(path)


@pytest.mark.parametrize(("text", "problem"), [
    ("- just\n- a list\n", "must be a mapping of group names"),
    ("plugin: aws_ec2\nregions: [x]\n", "inventory plugin configuration"),
    ("all:\n  hosts: [a, b]\n", "hosts of group 'all' must be a mapping"),
    ("all:\n  children:\n    web:\n      hosts:\n        web1: 3\n", "must be a mapping"),
    ("web:\n  members: {a: null}\n", "only hosts, vars and children"),
    ("all:\n  hosts:\n    a: {x: [1\n", "not valid YAML"),
    ("all:\n  children:\n    a:\n      children:\n        all:\n", "cycle"),
])
def test_yaml_that_is_not_an_inventory_is_refused(tmp_path: Path, text: str,
                                                  problem: str) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text(text)
    with pytest.raises(InventoryError, match=r"inventory\.yml") as caught:
        load_inventory(path)
    assert problem in caught.value.message


def test_missing_file_and_bad_vars_file(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read the inventory"):
        load_inventory(tmp_path / "nope.ini")
    path = tmp_path / "hosts.ini"
    path.write_text("[web]\nw1\n")
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "web.yml").write_text("a: [1\n")
    with pytest.raises(InventoryError, match=r"group_vars/web\.yml:2: not valid YAML"):
        load_inventory(path)
    (tmp_path / "group_vars" / "web.yml").write_text("- a list\n")
    with pytest.raises(InventoryError, match="must hold a mapping"):
        load_inventory(path)
