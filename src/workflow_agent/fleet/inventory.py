"""Ansible-compatible inventories: YAML and INI files, ``group_vars/``, ``host_vars/``,
and ``--limit`` host patterns, resolved the way ``ansible-inventory`` resolves them.

What is read:

* INI: hosts before any section are ``ungrouped``; ``[g]`` lists hosts (one per line,
  ``name[:port] k=v ...``, values read as Python literals like Ansible does, else text);
  ``[g:vars]`` holds ``k=v`` lines; ``[g:children]`` names groups, possibly defined
  further down. ``#`` and ``;`` start comments.
* YAML: top-level keys are groups; a group has ``hosts`` (name -> vars), ``vars`` and
  ``children`` (name -> group). The same group may appear in several places.
* Host names may hold ranges: ``web[01:10].example.com`` (zero-padded, same width),
  ``db-[a:c]``, with an optional step ``[1:9:2]``.
* ``group_vars/NAME`` and ``host_vars/NAME`` next to the inventory file: a YAML or JSON
  file (``NAME``, ``NAME.yml``, ``NAME.yaml``, ``NAME.json``) or a directory of them,
  read in name order.

YAML may carry Ansible's tags: ``!unsafe`` text is text; a ``!vault`` value (Ansible
Vault) is kept encrypted, as ``Vaulted``: workflow-agent does not decrypt it, and a
connection variable it needs (``ansible_host``, ``ansible_user``, ...) refuses one.

Every host is in ``all``; a host in no other group is in ``ungrouped``. A host's
variables merge, later winning (key by key, no deep merge): inventory vars of ``all``,
then of its other groups by depth (parents before children), ``ansible_group_priority``
and name; then ``group_vars/all``, then ``group_vars/`` of the other groups in the same
order; then its own inventory vars, then ``host_vars/``.
"""

from __future__ import annotations

import ast
import fnmatch
import ipaddress
import json
import os
import re
import shlex
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workflow_agent.errors import InvalidInputError

_VARS_EXTENSIONS = ("", ".yml", ".yaml", ".json")
_SECTION = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?$")
_GROUP_NAME = re.compile(r"^([^:\]\s]+)\s*(?:[#;].*)?$")
#: Splits ``a:b:&c:!d`` on colons that are not inside a ``[...]`` range or subscript.
_PATTERN_TERMS = re.compile(r"(?:[^\s:\[\]]|\[[^\]]*\])+")


class InventoryError(InvalidInputError):
    """An inventory file cannot be read: names the file and, where known, the line."""

    def __init__(self, path: Path | str, problem: str, *, line: int | None = None) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(
            f"{where}: {problem}",
            hint="Inventories use Ansible's YAML or INI format: "
            "https://docs.ansible.com/ansible/latest/inventory_guide/intro_inventory.html",
        )
        self.path = str(path)
        self.line = line


@dataclass
class Group:
    """One inventory group: its own variables, hosts named directly, child groups."""

    name: str
    vars: dict[str, Any] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)


class Vaulted:
    """A value Ansible Vault encrypted (a ``!vault`` YAML tag): opaque, never decrypted."""

    __slots__ = ("ciphertext",)

    def __init__(self, ciphertext: str) -> None:
        self.ciphertext = ciphertext

    def __repr__(self) -> str:
        return "Vaulted(...)"


#: Ansible's names for the sudo password (``ansible_become_method: sudo``).
BECOME_PASSWORD_VARS = ("ansible_become_password", "ansible_become_pass", "ansible_sudo_pass")


@dataclass(frozen=True)
class Host:
    """One inventory host with its merged variables and every group it belongs to."""

    name: str
    vars: Mapping[str, Any] = field(repr=False)  # may hold passwords
    groups: tuple[str, ...]

    def plain(self, key: str, default: Any = None) -> Any:
        """The variable ``key`` (``default`` when unset); ``InvalidInputError`` when
        Ansible Vault encrypted it: a variable workflow-agent needs must be readable."""
        value = self.vars.get(key, default)
        if isinstance(value, Vaulted):
            raise InvalidInputError(
                f"inventory host {self.name!r}: {key} is encrypted with Ansible Vault, "
                "which workflow-agent does not decrypt",
                hint=f"Give {key} in plain text in the inventory, group_vars or host_vars "
                "(it is no secret).")
        return value

    def _connection(self, name: str) -> Any:
        """``ansible_ssh_NAME`` (the older name, which Ansible's ssh connection still
        prefers when both are set), else ``ansible_NAME``."""
        return self.plain(f"ansible_ssh_{name}") or self.plain(f"ansible_{name}")

    @property
    def address(self) -> str:
        """Where to connect: ``ansible_host``, else the inventory name."""
        return str(self._connection("host") or self.name)

    @property
    def port(self) -> int:
        """``ansible_port``, else 22."""
        return int(self._connection("port") or 22)

    @property
    def user(self) -> str | None:
        """``ansible_user`` (None: the SSH target's default)."""
        user = self._connection("user")
        return str(user) if user else None

    @property
    def become_password(self) -> str | Vaulted | None:
        """The sudo password the inventory gives (``ansible_become_password`` or its
        older names), if any: text, or ``Vaulted`` when Ansible Vault encrypted it."""
        for key in BECOME_PASSWORD_VARS:
            value = self.vars.get(key)
            if isinstance(value, Vaulted):
                return value
            if value not in (None, ""):
                return str(value)
        return None

    @property
    def target(self) -> str:
        """The ``ssh://user@host:port`` target spec (``ssh://host:port`` with no user)."""
        host = self.address
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass  # a name, not an address
        user = f"{self.user}@" if self.user else ""
        return f"ssh://{user}{host}:{self.port}"

    @property
    def become(self) -> bool:
        """``ansible_become``: run with privilege escalation (sudo)."""
        return _truthy(self.plain("ansible_become", False))

    @property
    def become_user(self) -> str:
        """``ansible_become_user`` (root by default)."""
        return str(self.plain("ansible_become_user") or "root")

    @property
    def private_key_file(self) -> Path | None:
        """``ansible_ssh_private_key_file`` (or ``ansible_private_key_file``), if set."""
        key = self.plain("ansible_ssh_private_key_file") or self.plain(
            "ansible_private_key_file"
        )
        return Path(str(key)).expanduser() if key else None

    @property
    def jump_host(self) -> str | None:
        """The jump host of ``ansible_ssh_common_args`` / ``ansible_ssh_extra_args``, if
        any: a ProxyJump (``-J host``, ``-o ProxyJump=host``), or a ProxyCommand that is
        ssh to a bastion passing the connection on (``ssh -W %h:%p bastion``, ``ssh
        bastion nc %h %p``). Any other ProxyCommand is refused (``InvalidInputError``):
        connecting straight to the host is not what the inventory says."""
        for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
            words = shlex.split(str(self.plain(key) or ""))
            for index, word in enumerate(words):
                if word == "-J" and index + 1 < len(words):
                    return words[index + 1]
                option = word.removeprefix("-o") if word.startswith("-o") else word
                if word == "-o" and index + 1 < len(words):
                    option = words[index + 1]
                match = _SSH_OPTION.fullmatch(option)
                if match is None:
                    continue
                name, value = match.group(1).lower(), match.group(2).strip()
                if name == "proxyjump":
                    return value
                if name == "proxycommand" and value.lower() != "none":
                    return self._bastion(key, value)
        return None

    def _bastion(self, key: str, command: str) -> str:
        """The host a ProxyCommand reaches the target through (see ``jump_host``)."""
        words = shlex.split(command)
        user = port = destination = None
        passes_on = False
        if words and Path(words[0]).name == "ssh":
            rest = iter(words[1:])
            for word in rest:
                if len(word) == 2 and word[0] == "-" and word[1] in _SSH_ARGUMENTS:
                    argument = next(rest, "")
                    if word == "-W":
                        passes_on = passes_on or argument == "%h:%p"
                    elif word == "-p":
                        port = argument
                    elif word == "-l":
                        user = argument
                elif word.startswith("-"):
                    continue  # a flag (-q, -A, ...), or an option joined to its argument
                elif destination is None:
                    destination = word
                else:  # the command run on the bastion: a netcat to the target
                    remote = [word, *rest]
                    passes_on = passes_on or (Path(word).name in ("nc", "ncat", "netcat")
                                              and remote[1:3] == ["%h", "%p"])
                    break
        if not passes_on or destination is None:
            raise InvalidInputError(
                f"inventory host {self.name!r}: {key} has a ProxyCommand ({command}), "
                "which workflow-agent cannot follow",
                hint="Reach the host through a ProxyJump (-J bastion, or "
                "-o ProxyJump=bastion), or directly.")
        if user and "@" not in destination:
            destination = f"{user}@{destination}"
        return f"{destination}:{port}" if port else destination


#: ``Key=Value`` or ``Key Value``, as ssh's ``-o`` takes them.
_SSH_OPTION = re.compile(r"\s*([A-Za-z]+)\s*(?:=|\s)\s*(.*)", re.DOTALL)
#: ssh's options that take an argument (of which ``_bastion`` reads -W, -p and -l).
_SSH_ARGUMENTS = "BbcDEeFIiJLlmOopQRSWw"


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("yes", "y", "true", "t", "1", "on")
    return bool(value)


class Inventory:
    """Groups and hosts of one inventory file; ``select`` resolves host patterns."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.groups: dict[str, Group] = {"all": Group("all"), "ungrouped": Group("ungrouped")}
        #: Each host's own variables, in the order hosts first appear.
        self.host_vars: dict[str, dict[str, Any]] = {}
        self._resolved: dict[str, Host] = {}

    # -- building --------------------------------------------------------------------

    def add_group(self, name: str) -> Group:
        """The group ``name``, created if new."""
        if name not in self.groups:
            self.groups[name] = Group(name)
        return self.groups[name]

    def add_host(self, name: str, group: str, variables: Mapping[str, Any],
                 port: int | None = None) -> None:
        """Put host ``name`` in ``group`` and lay ``variables`` over its own. As in
        Ansible, a ``name:port`` port counts only where the host first appears."""
        if name not in self.host_vars:
            self.host_vars[name] = {} if port is None else {"ansible_port": port}
        self.host_vars[name].update(variables)
        members = self.add_group(group).hosts
        if name not in members:
            members.append(name)

    def add_child(self, parent: str, child: str) -> None:
        """Make group ``child`` a child of ``parent``; refuses a cycle."""
        if parent == child or parent in self._descendants(child):
            raise ValueError(f"adding group {child!r} to {parent!r} would make a cycle")
        group, sub = self.add_group(parent), self.add_group(child)
        if child not in group.children:
            group.children.append(child)
            sub.parents.append(parent)

    def _descendants(self, name: str) -> set[str]:
        found: set[str] = set()
        todo = list(self.groups[name].children) if name in self.groups else []
        while todo:
            child = todo.pop()
            if child not in found:
                found.add(child)
                todo.extend(self.groups[child].children)
        return found

    def _reconcile(self, group_vars: Mapping[str, dict[str, Any]],
                   host_files: Mapping[str, dict[str, Any]]) -> None:
        """Link top-level groups under ``all``, fill ``ungrouped``, merge every host."""
        for name, group in self.groups.items():
            if name != "all" and not group.parents:
                self.add_child("all", name)
        in_a_group = {h for n, g in self.groups.items() if n not in ("all", "ungrouped")
                      for h in g.hosts}
        ungrouped = self.groups["ungrouped"]
        ungrouped.hosts = [h for h in self.host_vars if h not in in_a_group]
        depth = self._depths()
        for name, own in self.host_vars.items():
            groups = self._ancestors(name)
            ordered = sorted(
                (g for g in groups if g != "all"),
                key=lambda g: (depth[g], _priority(self.groups[g].vars), g),
            )
            merged: dict[str, Any] = _without_priority(self.groups["all"].vars)
            for parent in ordered:
                merged.update(_without_priority(self.groups[parent].vars))
            merged.update(group_vars.get("all", {}))
            for parent in ordered:
                merged.update(group_vars.get(parent, {}))
            merged.update(own)
            merged.update(host_files.get(name, {}))
            self._resolved[name] = Host(name, merged, ("all", *ordered))

    def _depths(self) -> dict[str, int]:
        depth = {"all": 0}
        todo = ["all"]
        while todo:  # longest path from all: a child sits below its deepest parent
            name = todo.pop()
            for child in self.groups[name].children:
                if depth.get(child, -1) < depth[name] + 1:
                    depth[child] = depth[name] + 1
                    todo.append(child)
        return depth

    def _ancestors(self, host: str) -> set[str]:
        found = {name for name, group in self.groups.items() if host in group.hosts}
        todo = list(found)
        while todo:
            for parent in self.groups[todo.pop()].parents:
                if parent not in found:
                    found.add(parent)
                    todo.append(parent)
        return found | {"all"}

    # -- reading -----------------------------------------------------------------------

    @property
    def hosts(self) -> dict[str, Host]:
        """Every host, merged, in the order they first appear in the inventory."""
        return dict(self._resolved)

    def group_hosts(self, name: str) -> list[str]:
        """Hosts of group ``name`` and of all its descendants, in Ansible's order: the
        group's own, then its children's level by level, each host once."""
        order, frontier = [name], [name]
        while frontier:
            level = [c for g in frontier for c in self.groups[g].children]
            frontier = []
            for child in level:
                if child not in order:
                    order.append(child)
                    frontier.append(child)
        result: dict[str, None] = {}
        for group in order:
            result.update(dict.fromkeys(self.groups[group].hosts))
        return list(result)

    def select(self, pattern: str = "all") -> list[Host]:
        """Hosts matching an Ansible host pattern, in inventory order of their terms.

        Terms are separated by ``,`` or ``:``; ``&term`` intersects, ``!term`` excludes
        (applied after all unions, as Ansible does). A term is ``all`` or ``*``, a group
        or host name, a glob (``web*``) or a regular expression (``~web\\d+``). A term
        that matches nothing is an ``InvalidInputError`` naming the known groups.
        """
        terms = split_pattern(pattern)
        if not terms:
            raise InvalidInputError("the host pattern is empty", hint=self._known())
        ordered = ([t for t in terms if t[0] not in "&!"] or ["all"]) + \
            [t for t in terms if t[0] == "&"] + [t for t in terms if t[0] == "!"]
        names: list[str] = []
        for term in ordered:
            body = term[1:] if term[0] in "&!" else term
            matched = self._match(body)
            if not matched:
                raise InvalidInputError(
                    f"host pattern {body!r} matches no group or host in {self.source}",
                    hint=self._known(),
                )
            if term[0] == "!":
                names = [n for n in names if n not in set(matched)]
            elif term[0] == "&":
                names = [n for n in names if n in set(matched)]
            else:
                names.extend(n for n in matched if n not in set(names))
        return [self._resolved[name] for name in names]

    def _match(self, term: str) -> list[str]:
        if term in self._resolved:
            return [term]
        if term.startswith("~"):
            try:
                regex = re.compile(term[1:])
            except re.error as exc:
                raise InvalidInputError(f"host pattern {term!r} is not a valid regular "
                                        f"expression: {exc}") from exc
        else:
            regex = re.compile(fnmatch.translate(term))
        result: list[str] = []
        groups = [name for name in self.groups if regex.match(name)]
        for group in groups:
            result.extend(h for h in self.group_hosts(group) if h not in result)
        # As Ansible: host names are tried when no group matched, or for a regex or glob.
        if not groups or term.startswith("~") or any(c in term for c in ".?*["):
            result.extend(h for h in self._resolved if regex.match(h) and h not in result)
        return result

    def _known(self) -> str:
        groups = [g for g in self.groups if g not in ("all", "ungrouped") or
                  self.group_hosts(g)]
        return ("Known groups: " + ", ".join(groups) + ". Patterns: all, GROUP, HOST, "
                "web*, ~regex, a:b (union), a:&b (intersection), a:!b (exclusion).")


def _without_priority(variables: Mapping[str, Any]) -> dict[str, Any]:
    # Ansible keeps a group's priority on the group, not among its variables.
    return {k: v for k, v in variables.items() if k != "ansible_group_priority"}


def _priority(variables: Mapping[str, Any]) -> int:
    try:
        return int(variables.get("ansible_group_priority", 1))
    except (TypeError, ValueError):
        return 1


def split_pattern(pattern: str) -> list[str]:
    """The terms of a host pattern, as Ansible splits them (``,`` first, else ``:``)."""
    pattern = pattern.strip()
    if "," in pattern:
        terms = pattern.split(",")
    else:
        try:
            ipaddress.IPv6Address(pattern)
            terms = [pattern]  # an IPv6 address is one term, colons and all
        except ValueError:
            terms = _PATTERN_TERMS.findall(pattern)
    return [term.strip() for term in terms if term.strip()]


def expand_hosts(pattern: str) -> list[str]:
    """``web[01:03]`` -> web01, web02, web03; ``db-[a:c]``; ``[1:9:2]`` steps; nested."""
    if "[" not in pattern:
        return [pattern]
    head, _, rest = pattern.partition("[")
    body, closed, tail = rest.partition("]")
    if not closed:
        raise ValueError(f"unclosed range in {pattern!r}")
    bounds = body.split(":")
    if len(bounds) not in (2, 3):
        raise ValueError(f"host range must be begin:end or begin:end:step, not [{body}]")
    begin, end = bounds[0] or "0", bounds[1]
    step = int(bounds[2]) if len(bounds) == 3 and bounds[2] else 1
    if not end:
        raise ValueError(f"host range [{body}] has no end")
    width = len(begin) if begin[0] == "0" and len(begin) > 1 else 0
    if width and len(end) != width:
        raise ValueError(f"host range [{body}] must have begin and end of equal width")
    items: list[str]
    if begin in string.ascii_letters and end in string.ascii_letters and not width:
        first, last = string.ascii_letters.index(begin), string.ascii_letters.index(end)
        if first > last:
            raise ValueError(f"host range [{body}] must have begin <= end")
        items = list(string.ascii_letters[first:last + 1:step])
    else:
        try:
            numbers = range(int(begin), int(end) + 1, step)
        except ValueError as exc:
            raise ValueError(f"host range [{body}] is neither numeric nor letters") from exc
        items = [str(n).zfill(width) for n in numbers]
    return [name for item in items for name in expand_hosts(f"{head}{item}{tail}")]


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:2222`` -> (host, 2222); colons inside ranges or IPv6 addresses are kept."""
    outside = re.sub(r"\[[^\]]*\]", lambda m: "x" * len(m.group()), entry)
    if outside.count(":") == 1:
        name, _, port = entry.rpartition(":")
        if port.isdigit() and name:
            return name, int(port)
        if not port:
            raise ValueError(f"host {entry!r} ends in ':' (reserved for a port)")
    return entry, None


def _host_entry(entry: object) -> tuple[list[str], int | None]:
    if not isinstance(entry, str):
        raise ValueError(f"host name {entry!r} must be a string (quote numbers)")
    name, port = _split_port(entry.strip())
    return expand_hosts(name), port


def _ini_value(text: str) -> Any:
    """A value as Ansible reads INI values: a Python literal when it is one, else text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return text
    if value is ... or isinstance(value, complex | bytes):
        return text
    if isinstance(value, tuple | set):
        return list(value)
    return value


# -- INI ---------------------------------------------------------------------------------


def _parse_ini(inventory: Inventory, path: Path, text: str) -> None:
    group, state = "ungrouped", "hosts"
    pending: dict[str, tuple[int, str, list[str]]] = {}  # name -> (line, state, parents)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        try:
            section = _SECTION.match(line)
            if section:
                group, kind = section.group(1), section.group(2) or "hosts"
                if kind not in ("hosts", "children", "vars"):
                    raise ValueError(f"section [{group}:{kind}] has an unknown type {kind!r}")
                if group not in inventory.groups and kind == "vars" and group not in pending:
                    pending[group] = (number, "vars", [])
                inventory.add_group(group)
                if group in pending and kind != "vars":
                    _, was, parents = pending.pop(group)
                    for parent in parents if was == "children" else []:
                        inventory.add_child(parent, group)
                state = kind
            elif line.startswith("["):
                raise ValueError(f"invalid section {line!r} (no spaces are allowed in it)")
            elif state == "hosts":
                tokens = shlex.split(line, comments=True)
                names, port = _host_entry(tokens[0])
                variables: dict[str, Any] = {}
                for token in tokens[1:]:
                    key, sep, value = token.partition("=")
                    if not sep:
                        raise ValueError(f"expected key=value after the host, got {token!r}")
                    variables[key] = _ini_value(value)
                for name in names:
                    inventory.add_host(name, group, variables, port)
            elif state == "vars":
                key, sep, value = line.partition("=")
                if not sep:
                    raise ValueError(f"expected key=value, got {line!r}")
                inventory.groups[group].vars[key.strip()] = _ini_value(value.strip())
            else:
                child = _GROUP_NAME.match(line)
                if not child:
                    raise ValueError(f"expected a group name, got {line!r}")
                name = child.group(1)
                if name in inventory.groups and name not in pending:
                    inventory.add_child(group, name)
                else:
                    pending.setdefault(name, (number, "children", []))[2].append(group)
        except ValueError as exc:
            raise InventoryError(path, str(exc), line=number) from None
    for name, (number, kind, parents) in pending.items():
        problem = (f"section [{name}:vars] is for group {name!r}, which is never defined"
                   if kind == "vars" else
                   f"section [{parents[-1]}:children] names group {name!r}, "
                   "which is never defined")
        raise InventoryError(path, problem, line=number)


# -- YAML --------------------------------------------------------------------------------


def _parse_yaml(inventory: Inventory, path: Path, data: object) -> None:
    if not isinstance(data, dict) or not data:
        raise InventoryError(path, "a YAML inventory must be a mapping of group names")
    if "plugin" in data:
        raise InventoryError(path, "this is an inventory plugin configuration, not an "
                                   "inventory (plugins are not supported)")
    for name, body in data.items():
        _yaml_group(inventory, path, str(name), body)


def _yaml_group(inventory: Inventory, path: Path, name: str, body: object) -> None:
    if body is not None and not isinstance(body, dict):
        raise InventoryError(path, f"group {name!r} must be a mapping (hosts, vars, "
                                   f"children), not {type(body).__name__}")
    group = inventory.add_group(name)
    for key, value in (body or {}).items():
        if key not in ("hosts", "vars", "children"):
            raise InventoryError(path, f"group {name!r} has {key!r}: only hosts, vars and "
                                       "children are allowed")
        if isinstance(value, str):
            value = {value: None}
        if value is not None and not isinstance(value, dict):
            raise InventoryError(path, f"{key} of group {name!r} must be a mapping, "
                                       f"not {type(value).__name__}")
        for item, sub in (value or {}).items():
            try:
                if key == "vars":
                    group.vars[str(item)] = sub
                elif key == "children":
                    _yaml_group(inventory, path, str(item), sub)
                    inventory.add_child(name, str(item))
                else:
                    if sub is not None and not isinstance(sub, dict):
                        raise ValueError(f"variables of host {item!r} must be a mapping")
                    names, port = _host_entry(item)
                    for host in names:
                        inventory.add_host(host, name, dict(sub or {}), port)
            except ValueError as exc:
                raise InventoryError(path, f"group {name!r}: {exc}") from None


# -- group_vars / host_vars --------------------------------------------------------------


def _vars_files(folder: Path, name: str) -> list[Path]:
    found: list[Path] = []
    for extension in _VARS_EXTENSIONS:
        candidate = folder / f"{name}{extension}"
        if candidate.is_dir():
            found.extend(sorted(
                p for p in candidate.rglob("*")
                if p.is_file() and p.suffix in _VARS_EXTENSIONS[1:]
                and not any(part.startswith(".") for part in p.relative_to(candidate).parts)
            ))
        elif candidate.is_file():
            found.append(candidate)
    return found


def _load_vars(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return loaded
    for name in names:
        merged: dict[str, Any] = {}
        for file in _vars_files(folder, name):
            data = _read_yaml(file)
            if data is None:
                continue
            if not isinstance(data, dict):
                raise InventoryError(file, "a variables file must hold a mapping")
            merged.update(data)
        if merged:
            loaded[name] = merged
    return loaded


class _AnsibleLoader(yaml.SafeLoader):
    """Safe YAML with Ansible's own tags: ``!unsafe`` (text as it stands) and ``!vault``
    (an encrypted value, kept as ``Vaulted``)."""


_AnsibleLoader.add_constructor(
    "!unsafe", lambda loader, node: loader.construct_scalar(node))  # type: ignore[arg-type]
_AnsibleLoader.add_constructor(
    "!vault", lambda loader, node: Vaulted(loader.construct_scalar(node)))  # type: ignore[arg-type]


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_AnsibleLoader)  # a SafeLoader: builds no objects


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(path, f"cannot read it: {exc.strerror}") from exc
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return _load_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(exc, "lineno", None)
        raise InventoryError(path, f"not valid YAML: {exc}", line=line) from exc


def load_inventory(path: Path | str) -> Inventory:
    """Read the inventory at ``path``: a file (YAML by extension or content, else INI)
    with the ``group_vars/`` and ``host_vars/`` beside it, or a directory of them as
    Ansible reads one (every file in it and its subdirectories, in name order, but for
    hidden files, ``group_vars``, ``host_vars`` and ``INVENTORY_IGNORE_EXTS``), with the
    ``group_vars/`` and ``host_vars/`` in it.

    Raises ``InventoryError`` (an ``InvalidInputError``) naming the file and line.
    """
    source = Path(path)
    inventory = Inventory(source)
    if source.is_dir():
        files = _inventory_files(source)
        if not files:
            raise InventoryError(source, "the directory holds no inventory file")
        base = source
    else:
        files, base = [source], source.parent
    for file in files:
        _parse_file(inventory, file)
    group_vars = _load_vars(base / "group_vars", list(inventory.groups))
    host_files = _load_vars(base / "host_vars", list(inventory.host_vars))
    try:
        inventory._reconcile(group_vars, host_files)
    except ValueError as exc:
        raise InventoryError(source, str(exc)) from None
    return inventory


#: What Ansible skips in an inventory directory: hidden files, the variable folders, and
#: its default ``INVENTORY_IGNORE_EXTS``.
_IGNORED_IN_DIRECTORY = re.compile(
    r"^\.|^host_vars$|^group_vars$|^vars_plugins$|"
    r"(\.pyc|\.pyo|\.swp|\.bak|~|\.rpm|\.md|\.txt|\.rst|\.orig|\.cfg|\.retry)$")


def _inventory_files(directory: Path) -> list[Path]:
    """The inventory files of ``directory``, as Ansible walks it."""
    files: list[Path] = []
    for name in sorted(os.listdir(directory)):
        if _IGNORED_IN_DIRECTORY.search(name):
            continue
        path = directory / name
        files.extend(_inventory_files(path) if path.is_dir() else [path])
    return files


def _parse_file(inventory: Inventory, source: Path) -> None:
    """Add the groups and hosts of one inventory file to ``inventory``."""
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(source, f"cannot read the inventory: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise InventoryError(source, "not a text file (not UTF-8)") from None
    if text.startswith("#!") and os.access(source, os.X_OK):
        raise InvalidInputError(
            f"{source}: an inventory script, which workflow-agent does not run",
            hint=f"Write what it finds to a file, and use that: ansible-inventory -i "
            f"{shlex.quote(str(source))} --list --yaml > hosts.yml")
    if _looks_like_yaml(source, text):
        try:
            data = _load_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise InventoryError(source, f"not valid YAML: {exc}",
                                 line=mark.line + 1 if mark is not None else None) from exc
        _parse_yaml(inventory, source, data)
    else:
        _parse_ini(inventory, source, text)


def _looks_like_yaml(path: Path, text: str) -> bool:
    if path.suffix in (".yml", ".yaml", ".json"):
        return True
    if path.suffix in (".ini", ".cfg"):
        return False
    # No telling extension (e.g. "hosts"): YAML starts with "---" or "name:".
    first = next((ln.strip() for ln in text.splitlines()
                  if ln.strip() and not ln.lstrip().startswith("#")), "")
    return first == "---" or first.startswith("{") or bool(re.match(r"^[^\s=\[]+:\s*$", first))
