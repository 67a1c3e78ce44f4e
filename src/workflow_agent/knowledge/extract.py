"""Structured knowledge from a page's blocks: commands, config files, ports, services...

``parse.py`` turns HTML, Markdown, plain text and man pages into the same flat list of
``Block`` (headings, text, list items, code); everything here works on that list, so the
rules exist once whatever the format. They are heuristics: each looks for the way
documentation usually says a thing (``systemctl restart NAME``, ``listens on port 9100``,
``# /etc/foo.conf`` atop a config snippet) and errs towards leaving things out.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

BlockKind = Literal["heading", "text", "item", "code"]
Purpose = Literal["install", "verify", "other"]


@dataclass(frozen=True, slots=True)
class Block:
    """One piece of a page in reading order; the parsers' common output."""

    kind: BlockKind
    text: str
    #: Heading level (1 = title) for headings.
    level: int = 0
    #: The code block's language as the page declares it ("" when it does not).
    language: str = ""
    #: Label of the tab (e.g. an OS) the block sits in on the page, if any.
    tab: str = ""


@dataclass(frozen=True)
class Passage:
    """A few paragraphs (or a code block) under one section: what search returns."""

    section: str
    text: str


@dataclass(frozen=True)
class Command:
    """A command from a code block, its prompt removed and its printed output apart."""

    language: str
    command: str
    output: str = ""
    section: str = ""
    #: The tab (usually an OS) the page shows it under.
    platform: str = ""
    purpose: Purpose = "other"


@dataclass(frozen=True)
class ConfigFile:
    """A configuration file the page names, with the keys its snippets set."""

    #: "" when a snippet's file is not named anywhere near it.
    path: str
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class DocumentKnowledge:
    """Everything parsed out of one documentation page."""

    title: str
    passages: tuple[Passage, ...] = ()
    commands: tuple[Command, ...] = ()
    config_files: tuple[ConfigFile, ...] = ()
    ports: tuple[int, ...] = ()
    services: tuple[str, ...] = ()
    platforms: tuple[str, ...] = ()
    prerequisites: tuple[str, ...] = ()
    verification: tuple[str, ...] = ()
    sections: tuple[str, ...] = field(default=())

    def commands_by_language(self) -> dict[str, list[Command]]:
        """Commands grouped by their (normalised) language, in page order."""
        groups: dict[str, list[Command]] = {}
        for command in self.commands:
            groups.setdefault(command.language, []).append(command)
        return groups

    @property
    def install_commands(self) -> list[Command]:
        """The commands that install or set up the software."""
        return [c for c in self.commands if c.purpose == "install"]

    def facts_dict(self) -> dict[str, Any]:
        """The structured facts (everything but the passages), JSON-ready."""
        data = asdict(self)
        del data["passages"]
        return data

    @classmethod
    def from_facts(cls, data: dict[str, Any],
                   passages: Iterable[Passage] = ()) -> DocumentKnowledge:
        """Rebuild from ``facts_dict()`` output (and the stored passages)."""
        return cls(
            title=data["title"],
            passages=tuple(passages),
            commands=tuple(Command(**c) for c in data.get("commands", [])),
            config_files=tuple(ConfigFile(c["path"], tuple(c["keys"]))
                               for c in data.get("config_files", [])),
            ports=tuple(data.get("ports", [])),
            services=tuple(data.get("services", [])),
            platforms=tuple(data.get("platforms", [])),
            prerequisites=tuple(data.get("prerequisites", [])),
            verification=tuple(data.get("verification", [])),
            sections=tuple(data.get("sections", [])),
        )


# -- languages and commands ----------------------------------------------------------------

_SHELL_LANGUAGES = {"bash", "sh", "shell", "zsh", "ksh", "fish", "console", "shell-session",
                    "sh-session", "shellsession", "terminal", "shell-script", "sudo"}
_SESSION_LANGUAGES = {"console", "shell-session", "sh-session", "shellsession", "terminal"}
_POWERSHELL = {"powershell", "ps1", "pwsh", "ps"}
_CMD = {"cmd", "bat", "batch", "dos"}
_CONFIG_LANGUAGES = {"ini", "conf", "cfg", "config", "toml", "yaml", "yml", "properties",
                     "apache", "apacheconf", "nginx", "json", "hcl", "xml", "systemd", "dosini",
                     "env", "dotenv", "cnf"}
#: First words that make a line a command (not prose, not output).
KNOWN_COMMANDS = frozenset(str.split("""
apt apt-get aptitude dpkg yum dnf zypper apk pacman rpm snap brew port pkg pip pip3 pipx
systemctl service journalctl invoke-rc.d update-rc.d rc-service rc-update chkconfig
curl wget sudo su docker podman kubectl helm tar unzip gunzip cp mv ln mkdir chmod chown
useradd adduser groupadd usermod cat echo printf tee sed grep ss netstat lsof ps pgrep kill
export cd ls gpg install make go git ufw firewall-cmd iptables setcap touch rm nano vi vim
editor source bash sh python python3 openssl telnet nc zabbix_get zabbix_agentd zabbix_agent2
munin-run munin-node munin-node-configure collectd collectdctl prometheus-node-exporter
node_exporter promtool prometheus visudo systemd-run crontab env test dpkg-reconfigure
sysctl modprobe mount umount ip setfacl getent id hostnamectl timedatectl
"""))
_DEFINITE_PROMPT = re.compile(
    r"^\s*(?:\([^)\s]*\)\s*)?(?:(?:\[[^\]]*@[^\]]*\]|[\w.-]+@[\w.-]+(?::\S*)?)\s?[$#%]|[$%])\s+"
    r"(?=\S)")
_ROOT_PROMPT = re.compile(r"^\s*#\s+(?=\S)")
_PS_PROMPT = re.compile(r"^\s*PS\s?[^>\n]*>\s+(?=\S)")
_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
_CONTINUES = re.compile(r"(?:\\|&&|\|\||\|)\s*$")

_VERIFY = re.compile(
    r"\b(?:curl|wget)\b.*(?:/metrics|localhost|127\.0\.0\.1|\[::1\])|"
    r"\bsystemctl\s+(?:--\S+\s+)*(?:status|is-active|is-enabled)\b|"
    r"\bservice\s+\S+\s+status\b|/etc/init\.d/\S+\s+status\b|\bjournalctl\b|"
    r"\bss\s+-\w*l|\bnetstat\s+-\w*l|\blsof\s+-i|\bzabbix_get\b|\bmunin-run\b|"
    r"\btelnet\s+\S+\s+\d+|\bnc\s+(?:-\w+\s+)*\S+\s+\d+|\bpromtool\b|\bpgrep\b")
_INSTALL = re.compile(
    r"\b(?:apt(?:-get)?|yum|dnf|zypper|brew|snap|pip3?|pipx)\s+(?:-\S+\s+)*install\b|"
    r"\bzypper\s+in\b|\bapk\s+add\b|\bpacman\s+-S|\bdpkg\s+-i\b|\brpm\s+-[iU]|"
    r"\b(?:docker|podman)\s+run\b|\bhelm\s+install\b|\btar\s+-?x|\bsystemctl\s+enable\b|"
    r"\bupdate-rc\.d\s+\S+\s+defaults\b|\buseradd\b|\badd-apt-repository\b|"
    r"\b(?:wget|curl)\b.*\.(?:tar\.gz|tgz|deb|rpm|zip)\b|/etc/apt/sources\.list|\bgpg\b.*--dearmor")
_INSTALL_SECTION = re.compile(r"install|setup|set up|getting started|quick ?start|deploy|"
                              r"build|running|usage", re.IGNORECASE)
_VERIFY_SECTION = re.compile(r"verif|check|troubleshoot|status|validat", re.IGNORECASE)


def normalise_language(language: str, code: str) -> str:
    """``shell``, ``powershell``, ``cmd``, a config language, or ``text`` (e.g. output)."""
    lang = language.lower().strip().removeprefix("language-").removeprefix("lang-")
    if lang in _SHELL_LANGUAGES:
        return "shell"
    if lang in _POWERSHELL:
        return "powershell"
    if lang in _CMD:
        return "cmd"
    if lang in _CONFIG_LANGUAGES:
        return {"yml": "yaml", "dosini": "ini", "apacheconf": "apache"}.get(lang, lang)
    if lang and lang not in ("text", "txt", "plain", "plaintext", "none", "output", "log"):
        return lang  # a programming language: kept as the page named it
    lines = [line for line in code.splitlines() if line.strip()]
    if any(_DEFINITE_PROMPT.match(line) or _root_command(line) for line in lines):
        return "shell"
    first = next((line for line in lines if not line.lstrip().startswith("#")), "")
    if first and _is_command(first):
        return "shell"
    if lines and sum(_looks_like_setting(line) for line in lines) * 2 >= len(lines):
        return "conf"
    return "text"


def _first_word(line: str) -> str:
    words = line.split()
    while words and (words[0] in ("sudo", "time", "nohup") or "=" in words[0]):
        words = words[1:]  # `sudo apt-get`, `FOO=1 cmd`: the command is the next word
    return words[0] if words else ""


def _is_command(line: str) -> bool:
    word = _first_word(line)
    return word in KNOWN_COMMANDS or word.startswith(("./", "/usr/", "/etc/init.d/", "/opt/",
                                                      "/bin/", "/sbin/"))


def _root_command(line: str) -> str | None:
    """``# apt-get install x`` is a root prompt; ``# Install the package`` a comment."""
    found = _ROOT_PROMPT.match(line)
    if found is None:
        return None
    rest = line[found.end():]
    return rest if _is_command(rest) else None


def split_commands(code: str, language: str, declared: str = "") -> list[tuple[str, str]]:
    """(command, printed output) pairs from a shell code block.

    With prompts (``$ ``, ``user@host:~$ ``, ``# `` before a known command, ``PS C:\\>``)
    the prompted lines are commands and the lines after them their output. Without
    prompts the block is a script: every line but comments is a command.
    """
    lines = code.strip("\n").splitlines()
    session = declared.lower() in _SESSION_LANGUAGES
    marks: list[str | None] = []
    for line in lines:
        found = _DEFINITE_PROMPT.match(line) or (
            _PS_PROMPT.match(line) if language == "powershell" else None)
        marks.append(line[found.end():] if found else _root_command(line))
    definite = any(_DEFINITE_PROMPT.match(line) for line in lines)
    prompted = [m for m in marks if m is not None]
    if not (definite or session) and prompted:
        # Only `# cmd` lines: prompts if what follows them reads as output, not commands.
        others = [ln for ln, m in zip(lines, marks, strict=True) if m is None and ln.strip()
                  and not ln.lstrip().startswith("#")]
        if any(_is_command(line) for line in others):
            prompted = []
    if not (definite or prompted):
        return [(c, "") for c in _script_commands(lines)]
    pairs: list[tuple[str, list[str]]] = []
    heredoc: str | None = None
    for line, mark in zip(lines, marks, strict=True):
        if pairs and (heredoc or _CONTINUES.search(pairs[-1][0])):
            command, output = pairs[-1]
            if not output:  # still inside the command: continuation or here-document
                pairs[-1] = (command + "\n" + line, output)
                heredoc = None if heredoc and line.strip() == heredoc else heredoc
                continue
        if mark is not None:
            pairs.append((mark.rstrip(), []))
            found = _HEREDOC.search(mark)
            heredoc = found.group(1) if found else None
        elif pairs:
            pairs[-1][1].append(line)
    return [(c, "\n".join(o).strip("\n")) for c, o in pairs if c]


def _script_commands(lines: Sequence[str]) -> list[str]:
    commands: list[str] = []
    current: list[str] = []
    heredoc: str | None = None
    for line in lines:
        if heredoc is not None:
            current.append(line)
            if line.strip() == heredoc:
                heredoc = None
                commands.append("\n".join(current).strip())
                current = []
            continue
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current.append(line)
        found = _HEREDOC.search(line)
        if found:
            heredoc = found.group(1)
            continue
        if not _CONTINUES.search(line):
            commands.append("\n".join(current).strip())
            current = []
    if current:
        commands.append("\n".join(current).strip())
    return [c for c in commands if c]


def _purpose(command: str, section: str) -> Purpose:
    if _VERIFY.search(command) or _VERIFY_SECTION.search(section.rpartition(" > ")[2]):
        return "verify"
    if _INSTALL.search(command) or _INSTALL_SECTION.search(section):
        return "install"
    return "other"


# -- config files ----------------------------------------------------------------------------

_CONFIG_SUFFIXES = (".conf", ".cfg", ".ini", ".yml", ".yaml", ".toml", ".json", ".cnf",
                    ".properties", ".env", ".service", ".list", ".sources")
_PATH = re.compile(r"(?<![\w/.~$-])(/(?:etc|usr/local/etc|opt|var/lib|lib/systemd|usr/lib/systemd)"
                   r"/[\w.@+-]+(?:/[\w.@+-]+)*)")
_NOT_CONFIG = re.compile(r"^/etc/(?:init\.d|os-release|passwd|group|shadow|hosts|hostname)\b")
_WRITES = re.compile(r"(?:>>?|\btee\s+(?:-a\s+)?|\b(?:nano|vi|vim|editor|sudoedit)\s+)\s*['\"]?"
                     r"(/[\w./@+-]+)")
_SETTING = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(?:=|:(?:\s|$))")
_SPACED = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s+[^\s=:]")
_SPACED_SETTING = re.compile(r"^[a-z_][\w.]*\s+[^\s-]")  # munin-node.conf: "port 4949"
_SECTION_TAG = re.compile(r"^\s*<([A-Za-z]\w*)(?:\s+([^>]*))?>\s*$")


def is_config_path(path: str) -> bool:
    """Whether an absolute path names a configuration file (not a directory or binary)."""
    if _NOT_CONFIG.match(path) or path.endswith("/") or "*" in path:
        return False
    parent, _, name = path.rpartition("/")
    return name.endswith(_CONFIG_SUFFIXES) or (
        parent in ("/etc/default", "/etc/sysconfig") and "." not in name)


def config_paths(text: str) -> list[str]:
    """Configuration file paths named in ``text``, in order, once each."""
    return list(dict.fromkeys(p.rstrip(".") for p in _PATH.findall(text)
                              if is_config_path(p.rstrip("."))))


def _looks_like_setting(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith(("#", ";", "//")) and (
        _SETTING.match(stripped) is not None or _SECTION_TAG.match(stripped) is not None
        or (_SPACED_SETTING.match(stripped) is not None and not _is_command(stripped)))


_CODE_LINE = re.compile(
    r"[A-Za-z_][\w.-]*\s*=.*"  # Key=value
    r"|</?[A-Za-z]\w*(?:\s[^>]*)?>"  # <Plugin cpu>, </Plugin>
    r"|[a-z_][\w.]*\s+[^\s.,;]\S*(?<![.,;:])"  # port 4949 (two words, no sentence)
    r"|[A-Z][a-z]+[A-Z]\w*(?:\s+\S+)*"  # LoadPlugin cpu, ReportByCpu true (CamelCase keys)
    r"|/[\w./*@+-]+")  # a path on its own


def looks_like_code_line(line: str) -> bool:
    """Whether a line of an unmarked paragraph reads as a command, a setting or a path."""
    stripped = line.strip()
    return bool(_DEFINITE_PROMPT.match(stripped) or _root_command(stripped)
                or _is_command(stripped) or _CODE_LINE.fullmatch(stripped))


def config_keys(code: str, language: str) -> list[str]:
    """The keys a config snippet sets, in order (``[section]`` / ``<Tag arg>`` included)."""
    if language == "json":
        try:
            data = json.loads(code)
        except ValueError:
            data = None
        if isinstance(data, dict):
            return [str(k) for k in data]
    keys: list[str] = []
    for line in code.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";", "//", "</", "-")):
            continue
        tag = _SECTION_TAG.match(stripped)
        if stripped.startswith("[") and stripped.endswith("]"):
            keys.append(stripped)
        elif tag:
            keys.append(f"<{tag.group(1)} {tag.group(2) or ''}>".replace(" >", ">"))
        elif (found := _SETTING.match(line)) or (
                language not in ("yaml", "ini", "toml", "properties", "env")
                and (found := _SPACED.match(line))):
            keys.append(found.group(1))
    return list(dict.fromkeys(keys))


# -- ports, services, platforms ---------------------------------------------------------------

_PORT_PATTERNS = (
    re.compile(r"\bports?\s*(?:number\s*)?(?:[:=]\s*|\s+)['\"]?(\d{2,5})\b", re.IGNORECASE),
    re.compile(r"port\w*['\"]?\s*[=:]\s*['\"]?(\d{2,5})\b", re.IGNORECASE),  # ListenPort=10050
)
#: ``host:port``: the colon is found first (fast), then what stands before it is checked.
_COLON_PORT = re.compile(r":(\d{2,5})(?=[/\s'\")\],]|$)", re.MULTILINE)
_BEFORE_PORT = re.compile(r"(?:^|[\s='\"(])$|(?://[\w.-]+|\blocalhost|\b\d{1,3}(?:\.\d{1,3}){3}|"
                          r"\[[0-9a-fA-F:]+\]|\b[a-z][\w-]*\.[\w.-]*[a-z])$")
_SERVICE_PATTERNS = (
    re.compile(r"\bsystemctl\s+(?:--\S+\s+)*(?:start|stop|restart|reload|enable|disable|status|"
               r"is-active|is-enabled|try-restart|reload-or-restart|edit|cat)\s+"
               r"(?:--\S+\s+)*([\w@.:-]+)"),
    re.compile(r"\bservice\s+([\w@.-]+)\s+(?:start|stop|restart|reload|status|force-reload)\b"),
    re.compile(r"/etc/init\.d/([\w@.-]+)"),
    re.compile(r"\b(?:invoke-rc\.d|update-rc\.d|rc-service|chkconfig|journalctl\s+(?:-\w+\s+)*-u)"
               r"\s+([\w@.-]+)"),
    re.compile(r"\brc-update\s+add\s+([\w@.-]+)"),
)
#: ``NAME.service``: the suffix is found first (fast), then the name before it.
_UNIT_SUFFIX = re.compile(r"\.service\b")
_UNIT_NAME = re.compile(r"(?:^|[^\w/.-])([a-zA-Z][\w@-]*(?:\.[\w@-]+)*)$")
_NOT_SERVICES = {"daemon-reload", "the", "a", "your", "this", "service", "name", "example",
                 "foo", "bar", "list-units", "list-unit-files"}
PLATFORMS: tuple[tuple[str, str], ...] = (
    ("Debian", r"debian"), ("Ubuntu", r"ubuntu"), ("RHEL", r"rhel|red ?hat"),
    ("CentOS", r"centos"), ("Rocky Linux", r"rocky ?linux"), ("AlmaLinux", r"alma ?linux"),
    ("Fedora", r"fedora"), ("Amazon Linux", r"amazon ?linux"), ("SUSE", r"(?:open)?suse|sles"),
    ("Alpine", r"alpine"), ("Arch Linux", r"arch ?linux"), ("FreeBSD", r"freebsd"),
    ("OpenBSD", r"openbsd"), ("NetBSD", r"netbsd"), ("DragonFly BSD", r"dragonfly"),
    ("macOS", r"mac ?os(?: ?x)?|darwin|os x"), ("Solaris", r"solaris|illumos"),
    ("Windows", r"windows"), ("AIX", r"aix"), ("Linux", r"linux"),
)
_PLATFORMS = tuple((name, re.compile(rf"\b(?:{pattern})\b", re.IGNORECASE))
                   for name, pattern in PLATFORMS)
#: Substrings one of which every match of the platform contains (lower case).
_KEYWORDS = {name: tuple(re.sub(r"\(\?:open\)\?| \?.*|\(.*", "", alt)
                         for alt in pattern.split("|")) for name, pattern in PLATFORMS}
_PREREQ_SECTION = re.compile(r"prereq|requirement|dependenc|before you (?:begin|start)|"
                             r"you(?:'ll| will)? need", re.IGNORECASE)
_PREREQ_LABEL = re.compile(r"^(?:prerequisites?|requirements?|dependencies|you(?:'ll| will)? "
                           r"need)\s*:?\s*$", re.IGNORECASE)
_PREREQ_SENTENCE = re.compile(r"\b(?:requires?|must be installed|needs to be installed|"
                              r"you (?:will )?need|depends on)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
_VERIFY_TEXT = re.compile(r"\b(?:curl|wget)\s+(?:-\S+\s+)*https?://\S+|"
                          r"\bsystemctl\s+(?:status|is-active)\s+[\w@.-]+|"
                          r"https?://[\w.\[\]:-]+:\d+/metrics\b")


def ports(text: str) -> tuple[int, ...]:
    """Port numbers ``text`` names, the most mentioned first."""
    found: list[tuple[int, int]] = [
        (int(m.group(1)), m.start()) for pattern in _PORT_PATTERNS for m in pattern.finditer(text)]
    found += [(int(m.group(1)), m.start()) for m in _COLON_PORT.finditer(text)
              if _BEFORE_PORT.search(text, max(0, m.start() - 60), m.start())]
    counts = Counter(port for port, _ in found if 1 <= port <= 65535)
    first: dict[int, int] = {}
    for port, at in sorted(found, key=lambda f: f[1]):
        first.setdefault(port, at)
    return tuple(sorted(counts, key=lambda p: (-counts[p], first[p])))


def services(text: str) -> tuple[str, ...]:
    """Service (unit / init script) names ``text`` starts, checks or names."""
    names = [(m.group(1), m.start()) for pattern in _SERVICE_PATTERNS
             for m in pattern.finditer(text)]
    for suffix in _UNIT_SUFFIX.finditer(text):
        unit = _UNIT_NAME.search(text, max(0, suffix.start() - 80), suffix.start())
        if unit is not None:
            names.append((unit.group(1), unit.start(1)))
    found: dict[str, int] = {}
    for raw, at in sorted(names, key=lambda n: n[1]):
        name = raw.removesuffix(".service").rstrip(".:")
        if name and name.lower() not in _NOT_SERVICES and not name.startswith("-"):
            found.setdefault(name, at)
    return tuple(found)


def platforms(text: str, tabs: Iterable[str]) -> tuple[str, ...]:
    """Operating systems named: those the page has tabs for first, then by mentions."""
    tabbed = dict.fromkeys(name for label in tabs for name, pattern in _PLATFORMS
                           if pattern.search(label))
    lower = text.lower()
    # A substring test first: most platforms are absent, and `in` is much faster than re.
    counts = Counter({name: len(pattern.findall(lower)) for name, pattern in _PLATFORMS
                      if any(k in lower for k in _KEYWORDS[name])})
    return (*tabbed, *(name for name, n in counts.most_common() if n and name not in tabbed))


# -- the whole page --------------------------------------------------------------------------

#: Passages are cut at block boundaries once they pass this many characters.
PASSAGE_CHARS = 900


def extract(blocks: Sequence[Block], title: str = "") -> DocumentKnowledge:
    """The structured knowledge of a page from its blocks (in reading order).

    ``title`` is the page's title as its parser found it; without one, the first heading.
    """
    title = title or next((b.text for b in blocks if b.kind == "heading"), "")
    # A page about one config file ("munin-node.conf - ..."): its unnamed snippets are it.
    own_file = next((w.strip("(),:") for w in title.split()
                     if w.strip("(),:").endswith(_CONFIG_SUFFIXES)), "")
    stack: list[tuple[int, str]] = []
    section = ""
    sections: dict[str, None] = {}
    passages: list[Passage] = []
    chunk: list[str] = []
    commands: list[Command] = []
    configs: dict[str, list[str]] = {}
    prerequisites: dict[str, None] = {}
    verification: dict[str, None] = {}
    prose: list[str] = []
    last_path = ""
    prereq_list = False

    def flush() -> None:
        if chunk:
            passages.append(Passage(section, "\n".join(chunk)))
            chunk.clear()

    for block in blocks:
        if block.kind == "heading":
            flush()
            heading = block.text.lower()
            if block.level == 1 and not stack and not sections and (
                    heading == title.lower() or title.lower().startswith(heading + " ")):
                continue  # the page's own title, not a section
            while stack and stack[-1][0] >= block.level:
                stack.pop()
            stack.append((block.level, block.text))
            section = " > ".join(t for _, t in stack)
            sections[section] = None
            last_path, prereq_list = "", False
            continue
        label = f"{block.tab}: " if block.tab else ""
        if sum(len(c) for c in chunk) > PASSAGE_CHARS:
            flush()
        chunk.append(label + block.text)
        if block.kind != "code":
            prose.append(block.text)
            paths = config_paths(block.text)
            last_path = paths[-1] if paths else last_path
            for path in paths:
                configs.setdefault(path, [])
            in_prereq = _PREREQ_SECTION.search(section.rpartition(" > ")[2]) is not None
            if block.kind == "item" and (prereq_list or in_prereq):
                prerequisites[block.text[:240]] = None
            elif block.kind == "text":
                prereq_list = _PREREQ_LABEL.match(block.text) is not None
                for sentence in _SENTENCE.split(block.text):
                    if (in_prereq or _PREREQ_SENTENCE.search(sentence)) and " | " not in sentence:
                        prerequisites[sentence.strip()[:240]] = None
            for hint in _VERIFY_TEXT.finditer(block.text):
                verification[hint.group(0).rstrip(".,;:)`'\"")] = None
            continue
        prereq_list = False
        language = normalise_language(block.language, block.text)
        if language in ("shell", "powershell", "cmd"):
            for command, output in split_commands(block.text, language, block.language):
                purpose = _purpose(command, section)
                commands.append(Command(language, command, output, section, block.tab, purpose))
                if purpose == "verify":
                    verification[command] = None
                written = _WRITES.findall(command)
                body = command.partition("\n")[2]
                for path in (p for p in written if is_config_path(p)):
                    keys = config_keys(body, "conf") if _HEREDOC.search(command) else []
                    configs.setdefault(path, []).extend(keys)
                    last_path = path
        elif language in _CONFIG_LANGUAGES or language == "conf":
            head = "\n".join(block.text.splitlines()[:2])
            named = config_paths(head)
            path = named[0] if named else last_path or own_file
            configs.setdefault(path, []).extend(config_keys(block.text, language))
    flush()
    everything = "\n".join(b.text for b in blocks if b.kind != "heading")
    return DocumentKnowledge(
        title=title,
        passages=tuple(passages),
        commands=tuple(commands),
        config_files=tuple(ConfigFile(p, tuple(dict.fromkeys(k))) for p, k in configs.items()
                           if p or k),
        ports=ports(everything),
        services=services(everything),
        platforms=platforms("\n".join(prose), (b.tab for b in blocks if b.tab)),
        prerequisites=tuple(p for p in prerequisites if p),
        verification=tuple(verification),
        sections=tuple(sections),
    )
