"""Security policy for generated bash scripts, checked on the tree-sitter-bash syntax tree.

The rules and their codes are listed in :data:`RULES`. Commands are found wherever they nest
(if/for/while/case, functions, subshells, pipelines, substitutions, heredoc redirects), and
wrappers such as ``sudo``, ``env``, ``command``, ``nohup`` or ``timeout`` are looked through
to the command that really runs. A literal ``sh -c '…'`` program is checked as a script too.
Reading commands and words off the tree is :mod:`~workflow_agent.scripting.shellwords`' job.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from workflow_agent.scripting.shellwords import (
    SUBSTITUTIONS,
    Command,
    Expansion,
    Node,
    descendants,
    interpreter_kind,
    node_text,
    parse,
    program_source,
    render_parts,
    resolve_command,
    shell_text,
    static_value,
    stdin_redirects,
    word_parts,
    word_set,
)
from workflow_agent.scripting.validate import Finding, Severity

__all__ = ["RULES", "check_policy"]

_SAFE_DOWNLOAD = "download to a file, verify its checksum or signature, then run the file"

#: Every policy rule: code -> (severity, message template). Each message says what is wrong
#: and what to do instead; ``{…}`` fields are filled in from the offending command.
RULES: dict[str, tuple[Severity, str]] = {
    "policy.curl-pipe-shell": ("error", "downloaded content is executed as code without any "
                               f"integrity check; {_SAFE_DOWNLOAD}."),
    "policy.rm-root": ("error", "`rm -r {path}` can delete the root file system, a home "
                       "directory or a system directory; remove only the integration's own "
                       "paths (e.g. /opt/<integration>)."),
    "policy.rm-unguarded-var": ("error", "`rm -r {path}` starts with ${var}, which may be empty "
                                "or unset and turn the path into `/` or the working directory; "
                                "write `${{{var}:?}}` so the script stops instead."),
    "policy.chmod-777": ("error", "`{cmd}` with mode {mode} lets every user modify and execute "
                         "the file; use the narrowest mode that works (0755 for programs, 0644 "
                         "or 0640 for configuration)."),
    "policy.chmod-world-writable": ("warning", "`{cmd}` with mode {mode} makes the file writable "
                                    "by every user; give write access to the owner (or a "
                                    "dedicated group) only."),
    "policy.firewall-disable": ("error", "the script turns the host firewall off or flushes its "
                                "rules; open only the port the integration needs instead "
                                "(`firewall-cmd --add-port=…`, `ufw allow …`)."),
    "policy.selinux-disable": ("error", "the script disables SELinux or makes it permissive; "
                               "keep it enforcing and add the policy module or file contexts "
                               "the integration needs (semanage, restorecon)."),
    "policy.sudoers-write": ("error", "the script writes sudo rules (/etc/sudoers or "
                             "/etc/sudoers.d); integrations must not grant privileges: manage "
                             "sudo rules in configuration management, checked by visudo -c."),
    "policy.eval-dynamic": ("error", "`eval` runs expanded variable or command output as code; "
                            "call the command directly with quoted arguments, or build the "
                            "argument list in an array."),
    "policy.eval-literal": ("warning", "`eval` of literal text is unnecessary and hides the "
                            "command from review; write the command directly."),
    "policy.secret-in-argv": ("error", "secret ${var} is expanded into the arguments of `{cmd}`, "
                              "which every user can read via /proc and ps; pass it through the "
                              "environment, stdin or a mode-0600 file instead."),
    "policy.parse-incomplete": ("warning", "tree-sitter could not parse the script here, so "
                                "policy checks may have missed commands in this region; fix "
                                "the syntax so every rule can be applied."),
}

_MAX_NESTED_SCRIPT_DEPTH = 3  # sh -c 'sh -c "…"' nesting still looked into

_DOWNLOADERS = word_set("curl wget fetch aria2c")
_BUILTINS = word_set(
    "echo printf test [ [[ export local declare read cd set unset : true false return exit "
    "typeset readonly shift source . alias unalias let getopts trap wait umask type hash "
    "pushd popd dirs shopt mapfile readarray kill break continue builtin command eval "
    "ulimit times caller enable help history jobs fg bg disown suspend logout pwd"
)
_FIREWALL_UNITS = word_set("firewalld ufw nftables iptables ip6tables netfilter-persistent")
_FIREWALL_VERBS = word_set("stop disable mask kill")
_IPTABLES = word_set("iptables ip6tables iptables-legacy iptables-nft")
_SYSTEM_DIRS = word_set(
    "bin boot dev etc home lib lib32 lib64 opt proc root run sbin srv sys usr var")
_READ_ONLY = word_set("grep egrep fgrep rg test [ awk")  # may mention SELINUX=disabled harmlessly
_WRITE_REDIRECTS = word_set("> >> >| &> &>> <> >&")
_DYNAMIC = SUBSTITUTIONS | word_set("simple_expansion expansion arithmetic_expansion")
_SELINUX_OFF = re.compile(r"SELINUX\s*=\s*['\"]?(disabled|permissive)", re.IGNORECASE)


@dataclass
class _Checker:
    """One pass over one parsed script, collecting findings."""

    source: bytes
    secrets: frozenset[str]
    depth: int
    findings: list[Finding] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)
    resolved: dict[int, Command | None] = field(default_factory=dict)
    lines: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lines = self.source.split(b"\n")

    def add(self, node: Node, code: str, **fields: str) -> None:
        row, col = node.start_point
        line = self.lines[row] if row < len(self.lines) else b""
        column = len(line[:col].decode("utf-8", "replace")) + 1  # tree-sitter counts bytes
        severity, template = RULES[code]
        self.findings.append(Finding(layer="policy", severity=severity, line=row + 1,
                                     column=column, code=code, message=template.format(**fields)))

    def cmd(self, node: Node) -> Command | None:
        if node.id not in self.resolved:
            self.resolved[node.id] = resolve_command(node)
        return self.resolved[node.id]

    def commands(self, node: Node, *, substitutions: bool = True) -> Iterator[Command]:
        for n in descendants(node, substitutions=substitutions):
            if n.type == "command" and (c := self.cmd(n)) is not None:
                yield c

    def downloads(self, node: Node) -> bool:
        return any(c.name in _DOWNLOADERS for c in self.commands(node))

    def run(self, root: Node) -> list[Finding]:
        self.functions = {node_text(name) for n in descendants(root) if n.type ==
                          "function_definition" and (name := n.child_by_field_name("name"))}
        incomplete = False
        for node in descendants(root):
            if (node.type == "ERROR" or node.is_missing) and not incomplete:
                incomplete = True  # one warning says it; more would be noise
                self.add(node, "policy.parse-incomplete")
            elif node.type == "command" and (cmd := self.cmd(node)) is not None:
                self.check_command(cmd)
            elif node.type == "pipeline":
                self.check_pipeline(node)
            elif node.type == "file_redirect":
                self.check_redirect(node)
            elif node.type == "heredoc_body" and _SELINUX_OFF.search(node_text(node)):
                self.add(node, "policy.selinux-disable")
        return self.findings

    def check_command(self, cmd: Command) -> None:
        statics = [static_value(a) for a in cmd.args]
        if cmd.name == "rm":
            self.check_rm(cmd, statics)
        elif cmd.name in ("chmod", "mkdir", "install"):
            self.check_mode(cmd, statics)
        elif cmd.name == "eval":
            self.check_eval(cmd)
        self.check_protection(cmd, [s for s in statics if s is not None])
        self.check_sudoers_command(cmd, statics)
        self.check_secrets(cmd)
        self.check_interpreter(cmd)  # last: a nested `sh -c` program skips findings made here

    def check_interpreter(self, cmd: Command) -> None:
        """``bash <(curl …)``, ``sh -c "$(curl …)"``, ``bash < <(curl …)``, ``. <(curl …)``."""
        if cmd.name in (".", "source") and cmd.args and self.downloads(cmd.args[0]):
            self.add(cmd.node, "policy.curl-pipe-shell")
        kind = interpreter_kind(cmd.name)
        if kind is None:
            return
        where, idx = program_source(kind, cmd.args)
        program = cmd.args[idx] if idx < len(cmd.args) else None
        if where == "stdin":
            if any(self.downloads(r) for r in stdin_redirects(cmd.node)):
                self.add(cmd.node, "policy.curl-pipe-shell")
        elif program is not None and self.downloads(program):
            self.add(program, "policy.curl-pipe-shell")
        elif where == "string" and kind == "shell" and program is not None:
            self.check_nested(program)

    def check_nested(self, program: Node) -> None:
        """Check a ``sh -c`` program as a script of its own, mapped to our line numbers."""
        if self.depth >= _MAX_NESTED_SCRIPT_DEPTH:
            return
        seen = {(f.code, f.line) for f in self.findings}
        for f in _check(shell_text(program), self.secrets, self.depth + 1):
            line = program.start_point[0] + f.line
            if (f.code, line) not in seen and f.code != "policy.parse-incomplete":
                message = f"in a `sh -c` program: {f.message}"
                update = {"line": line, "column": None, "message": message}
                self.findings.append(f.model_copy(update=update))

    def check_pipeline(self, node: Node) -> None:
        """A later stage is an interpreter reading its program from an earlier download."""
        stages = [c for c in node.named_children if c.type != "comment"]
        # `cat <<EOF | bash` nests the pipeline inside the heredoc redirect; its first stage
        # is the body of the enclosing redirected statement.
        parent = node.parent
        if parent is not None and parent.type == "heredoc_redirect" and parent.parent:
            stages = [c for c in [parent.parent.child_by_field_name("body")] if c] + stages
        for i in range(1, len(stages)):
            if not any(self.downloads(s) for s in stages[:i]):
                continue
            for cmd in self.commands(stages[i], substitutions=False):
                kind = interpreter_kind(cmd.name)
                if kind is not None and program_source(kind, cmd.args)[0] == "stdin":
                    self.add(cmd.node, "policy.curl-pipe-shell")

    def check_rm(self, cmd: Command, statics: list[str | None]) -> None:
        options: list[str] = []
        operands: list[Node] = []
        for node, s in zip(cmd.args, statics, strict=True):
            if "--" not in options and s is not None and s.startswith("-") and len(s) > 1:
                options.append(s)
            else:
                operands.append(node)
        short = "".join(o for o in options if not o.startswith("--"))
        if "--recursive" not in options and not set(short) & {"r", "R"}:
            return
        if "--no-preserve-root" in options:
            self.add(cmd.node, "policy.rm-root", path="--no-preserve-root")
        for operand in operands:
            parts = word_parts(operand)
            first = parts[0] if parts else ""
            if isinstance(first, Expansion) and first.var is not None and first.subst is None:
                self.add(operand, "policy.rm-unguarded-var", path=node_text(operand), var=first.var)
            elif _is_root_like(render_parts(parts, "")):  # e.g. /$SUB or $(dirname x)/* when empty
                self.add(operand, "policy.rm-root", path=node_text(operand))

    def check_mode(self, cmd: Command, statics: list[str | None]) -> None:
        if cmd.name == "chmod":  # the first operand is the mode
            modes = [next((s for s in statics if s is None or not s.startswith("-")), None)]
        else:  # mkdir -m MODE, install -m MODE
            modes = [statics[i + 1] for i, s in enumerate(statics[:-1]) if s == "-m"]
            modes += [s.split("=", 1)[1] for s in statics if s and s.startswith("--mode=")]
        for mode in modes:
            if mode is not None and (code := _mode_rule(mode)) is not None:
                self.add(cmd.node, code, cmd=cmd.name or "", mode=mode)

    def check_eval(self, cmd: Command) -> None:
        if any(self.downloads(a) for a in cmd.args):
            self.add(cmd.node, "policy.curl-pipe-shell")
        dynamic = any(n.type in _DYNAMIC for a in cmd.args for n in descendants(a))
        self.add(cmd.node, "policy.eval-dynamic" if dynamic else "policy.eval-literal")

    def check_protection(self, cmd: Command, args: list[str]) -> None:
        """Firewall or SELinux switched off."""
        name = cmd.name
        units = bool({a.removesuffix(".service") for a in args} & _FIREWALL_UNITS)
        if ((name == "ufw" and "disable" in args)
                or (name == "systemctl" and units and bool(_FIREWALL_VERBS & set(args)))
                or (name == "service" and units and "stop" in args)
                or (name == "chkconfig" and units and "off" in args)
                or (name in _IPTABLES and ("-F" in args or "--flush" in args))
                or (name == "nft" and "flush" in args and "ruleset" in args)):
            self.add(cmd.node, "policy.firewall-disable")
        if (name == "setenforce" and args[:1] in (["0"], ["permissive"], ["Permissive"])) or (
                name not in _READ_ONLY
                and any(_SELINUX_OFF.search(node_text(a)) for a in cmd.args)):
            self.add(cmd.node, "policy.selinux-disable")

    def check_sudoers_command(self, cmd: Command, statics: list[str | None]) -> None:
        """tee / cp / mv / install / ln / rsync / dd / sed -i writing a sudoers file."""
        pairs = list(zip(cmd.args, statics, strict=True))
        positional = [a for a, s in pairs if s is None or not s.startswith("-")]
        targets: list[Node] = []
        if cmd.name == "tee":
            targets = positional
        elif cmd.name in ("cp", "mv", "install", "ln", "rsync") and positional:
            targets = positional[-1:] + [pairs[i + 1][0] for i, (_, s) in
                                         enumerate(pairs[:-1]) if s == "-t"]
        elif cmd.name == "dd":
            targets = [a for a, s in pairs if s is not None and s.startswith("of=")]
        elif cmd.name in ("sed", "perl") and any(_in_place(s) for s in statics):
            targets = positional
        for target in targets:
            if _is_sudoers(render_parts(word_parts(target), "X").removeprefix("of=")):
                self.add(target, "policy.sudoers-write")

    def check_redirect(self, node: Node) -> None:
        ops = [c.type for c in node.children if not c.is_named]
        target = node.child_by_field_name("destination")
        if target is not None and ops and ops[0] in _WRITE_REDIRECTS and _is_sudoers(
                render_parts(word_parts(target), "X")):
            self.add(target, "policy.sudoers-write")

    def check_secrets(self, cmd: Command) -> None:
        """A secret expanded into the argv of a new process (builtins and functions are fine)."""
        if not self.secrets or (
                not cmd.wrapped and (cmd.name in _BUILTINS or cmd.name in self.functions)):
            return
        shown = cmd.name or node_text(cmd.words[cmd.start])
        for word in cmd.words:
            # Substitutions run commands of their own, which are checked on their own.
            used = {node_text(n) for n in descendants(word, substitutions=False)
                    if n.type == "variable_name"} & self.secrets
            if used:
                self.add(word, "policy.secret-in-argv", var=min(used), cmd=shown)


def _in_place(option: str | None) -> bool:
    """``sed -i`` / ``-i.bak`` / ``-ri`` / ``--in-place`` (and ``perl -pi``)."""
    if option is None or not option.startswith("-"):
        return False
    return option.startswith("--in-place") or (not option.startswith("--") and "i" in option)


def _is_root_like(path: str) -> bool:
    """``/``, ``/*``, ``~``, ``~/*`` or a top-level system directory (``/usr``, ``/etc/*``)."""
    path = path.strip()
    if path.startswith("~"):
        return path[1:].strip("/") in ("", "*", ".", ".*")
    if not path.startswith("/"):
        return False
    parts = [p for p in posixpath.normpath(path).split("/") if p]
    if not parts or parts == ["*"]:
        return True
    return parts[0] in _SYSTEM_DIRS and (len(parts) == 1 or parts[1:] in (["*"], [".*"]))


def _is_sudoers(path: str) -> bool:
    path = posixpath.normpath(path) if path else path
    return path == "/etc/sudoers" or path.startswith("/etc/sudoers.d")


def _mode_rule(mode: str) -> str | None:
    """The rule a file mode breaks: rwx for everyone, world-writable, or none."""
    if re.fullmatch(r"[0-7]{1,4}", mode):
        digits = mode.zfill(4)
        # 1777 (sticky, like /tmp) stops users deleting each other's files: only a warning.
        if digits[1:] == "777" and not int(digits[0]) & 1:
            return "policy.chmod-777"
        return "policy.chmod-world-writable" if int(digits[3]) & 2 else None
    rule = None
    for clause in mode.split(","):
        m = re.fullmatch(r"([ugoa]*)((?:[-+=][rwxXst]*)+)", clause)
        who = set(m.group(1)) if m else set()
        for op, perms in re.findall(r"([-+=])([rwxXst]*)", m.group(2)) if m else []:
            if op == "-" or "w" not in perms:
                continue
            if ("a" in who or who >= {"u", "g", "o"}) and {"r", "x"} <= set(perms):
                return "policy.chmod-777"
            if who & {"a", "o"}:
                rule = "policy.chmod-world-writable"
    return rule


def _check(script: str, secrets: frozenset[str], depth: int) -> list[Finding]:
    # surrogatepass: any str must encode; tree-sitter copes with the resulting odd bytes.
    source = script.encode("utf-8", "surrogatepass")
    return _Checker(source, secrets, depth).run(parse(source).root_node)


def check_policy(script: str, *, secret_env: Collection[str]) -> list[Finding]:
    """Check ``script`` against the security policy (see :data:`RULES`).

    ``secret_env`` names environment variables holding secrets: expanding one into an
    external command's arguments is reported. Never raises on malformed input; what
    tree-sitter cannot parse yields a ``policy.parse-incomplete`` warning. Findings are
    sorted by line and column.
    """
    findings = _check(script, frozenset(secret_env), 0)
    return sorted(findings, key=lambda f: (f.line, f.column or 0, f.code))
