"""Reading commands and words off the tree-sitter-bash syntax tree.

A word is split into literal text and expansions with quotes and escapes resolved, so a
caller can tell ``"/$DIR"`` (may become ``/``) from ``"${DIR:?}"`` (cannot be empty). A
``command`` node is resolved to the command that really runs, looking through wrappers
such as ``sudo``, ``env``, ``command``, ``nohup`` or ``timeout``; an interpreter's
arguments say where it reads its program from (``-c`` text, stdin or a file).
"""

from __future__ import annotations

import functools
import posixpath
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import tree_sitter
import tree_sitter_bash

_MAX_WORD_DEPTH = 40  # deeper word nesting is treated as an opaque expansion


def word_set(text: str) -> frozenset[str]:
    """The whitespace-separated words of ``text``, for writing tables of names tersely."""
    return frozenset(text.split())


_SHELLS = word_set("sh bash zsh dash ksh mksh ash")
#: Node types that run a command of their own inside a word.
SUBSTITUTIONS = word_set("command_substitution process_substitution")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_DQ_ESCAPABLE = '$`"\\\n'  # what a backslash escapes inside double quotes


@dataclass(frozen=True)
class _Wrapper:
    """How to skip a wrapper's own options to reach the command it runs."""

    arg_chars: str = ""  # short options that take a value
    arg_longs: frozenset[str] = frozenset()
    positional: int = 0  # operands before the command (timeout DURATION, chroot DIR)
    assignments: bool = False  # accepts NAME=value words (env, sudo)
    execs: bool = True  # starts the command as a new process (not `command`/`builtin`)


_WRAPPERS: dict[str, _Wrapper] = {
    "sudo": _Wrapper("ugpCDhrtUTR", word_set("--user --group --chdir"), 0, True),
    "doas": _Wrapper("uC"),
    "env": _Wrapper("uCS", word_set("--unset --chdir --split-string"), 0, True),
    "command": _Wrapper(execs=False),
    "builtin": _Wrapper(execs=False),
    "time": _Wrapper("fo", word_set("--format --output"), execs=False),
    "exec": _Wrapper("a"),
    "nohup": _Wrapper(),
    "setsid": _Wrapper(),
    "busybox": _Wrapper(),
    "nice": _Wrapper("n", word_set("--adjustment")),
    "ionice": _Wrapper("cnpPu"),
    "timeout": _Wrapper("sk", word_set("--signal --kill-after"), 1),
    "stdbuf": _Wrapper("ioe", word_set("--input --output --error")),
    "chroot": _Wrapper("", word_set("--userspec --groups"), 1),
    "runuser": _Wrapper("ugGl", word_set("--user --group")),
    "xargs": _Wrapper("adEILnPs", word_set("--delimiter --max-args --max-procs")),
}

# Interpreter kind -> (short flags whose value is the program text, short flags meaning "read
# the program from stdin", short flags taking a separate value, long flags giving the program).
_INTERPRETERS: dict[str, tuple[str, str, str, frozenset[str]]] = {
    "shell": ("c", "s", "oO", frozenset()),
    "python": ("cm", "", "WX", frozenset()),
    "perl": ("eE", "", "", frozenset()),
    "ruby": ("e", "", "", frozenset()),
    "node": ("ep", "", "r", word_set("--eval --print")),
}


@functools.cache
def _language() -> tree_sitter.Language:
    return tree_sitter.Language(tree_sitter_bash.language())


_local = threading.local()


def _parser() -> tree_sitter.Parser:
    """This thread's bash parser: a Parser must not be shared between threads, and
    validation runs in worker threads."""
    found: tree_sitter.Parser | None = getattr(_local, "parser", None)
    if found is None:
        found = _local.parser = tree_sitter.Parser(_language())
    return found


#: Characters outside Unicode's basic plane (4 bytes in UTF-8) and surrogates: on some
#: of them tree-sitter-bash's scanner (0.23.3 to 0.25.1) reads memory it must not and
#: crashes the process (found by the policy's hypothesis test: about one run in two of
#: 3,000 random texts; none in 18,000 with them replaced).
_SCANNER_CRASHERS = re.compile(rb"[\xf0-\xf4][\x80-\xbf]{3}|\xed[\xa0-\xbf][\x80-\xbf]")


def parse(source: bytes) -> tree_sitter.Tree:
    """The syntax tree of ``source`` (UTF-8). Each character the scanner cannot be
    trusted with (see ``_SCANNER_CRASHERS``) is parsed as that many ``x`` bytes:
    offsets, lines and columns stay those of ``source``, and such a character (an
    emoji, say) shows as ``xxxx`` in node text; no command, path or variable name the
    policy looks at is made of them."""
    safe = _SCANNER_CRASHERS.sub(lambda match: b"x" * len(match[0]), source)
    return _parser().parse(safe)


#: A node of the syntax tree ``parse()`` produces.
Node = tree_sitter.Node


def node_text(node: Node) -> str:
    """The node's source text, exactly as written (quotes and escapes included)."""
    return (node.text or b"").decode("utf-8", "replace")


@dataclass(frozen=True)
class Expansion:
    """An expansion inside a word; ``subst`` is a non-empty stand-in if it cannot be empty."""

    var: str | None  # None for command substitution and the like
    subst: str | None


#: A piece of a word: literal text, or an expansion whose value is not known statically.
Part = str | Expansion


def _unescape(text: str, escapable: str | None) -> str:
    """Drop backslash escapes: any character unquoted, only ``escapable`` in double quotes."""
    return re.sub(r"\\(.)", lambda m: m.group(1) if escapable is None or m.group(1) in
                  escapable else m.group(0), text, flags=re.DOTALL)


def word_parts(node: Node, depth: int = 0) -> list[Part]:
    """Split a word into literal text and expansions, resolving quotes and escapes."""
    kind = node.type
    if depth > _MAX_WORD_DEPTH:
        return [Expansion(None, None)]
    if kind in ("word", "number"):
        return [_unescape(node_text(node), None)]
    if kind == "raw_string":
        return [node_text(node)[1:-1]]
    if kind == "ansi_c_string":
        return [node_text(node)[2:-1]]
    if kind in ("string", "concatenation"):
        parts: list[Part] = []
        for child in node.children:
            if child.type == "string_content":
                parts.append(_unescape(node_text(child), _DQ_ESCAPABLE))
            elif child.is_named:
                parts.extend(word_parts(child, depth + 1))
            elif kind == "concatenation":
                parts.append(node_text(child))
        return parts
    if kind == "simple_expansion":
        return [Expansion(node_text(node)[1:], None)]
    if kind == "expansion":
        return [_expansion(node)]
    return [Expansion(None, None)]


def _expansion(node: Node) -> Expansion:
    """``${…}``: only ``${V:?}`` and ``${V:-literal}`` are known never to be empty."""
    names = [c for c in node.named_children if c.type in ("variable_name", "subscript")]
    var = node_text(names[0]).split("[")[0] if names else None
    op_node = node.child_by_field_name("operator")
    op = node_text(op_node) if op_node is not None else ""
    if op == ":?":
        return Expansion(var, var or "?")
    if op in (":-", ":=") and op_node is not None:
        default = [static_value(c) for c in node.named_children if c.start_byte >= op_node.end_byte]
        if default and None not in default and "".join(map(str, default)):
            return Expansion(var, "".join(map(str, default)))
    return Expansion(var, None)


def static_value(node: Node) -> str | None:
    """The word's value if it contains no expansion, else ``None``."""
    parts = word_parts(node)
    return None if any(isinstance(p, Expansion) for p in parts) else "".join(map(str, parts))


def render_parts(parts: list[Part], unknown: str) -> str:
    """The word as text, each expansion replaced by its stand-in, else by ``unknown``."""
    return "".join(p if isinstance(p, str) else (p.subst or unknown) for p in parts)


def shell_text(node: Node) -> str:
    """What an inner ``sh -c`` receives; expansions stay as source and are re-parsed there."""
    if node.type == "raw_string":
        return node_text(node)[1:-1]
    if node.type == "string":
        return _unescape(node_text(node)[1:-1], _DQ_ESCAPABLE)
    if node.type == "concatenation":
        return "".join(shell_text(c) for c in node.named_children)
    return _unescape(node_text(node), None) if node.type == "word" else node_text(node)


def descendants(node: Node, *, substitutions: bool = True) -> Iterator[Node]:
    """Pre-order walk without recursion, so deeply nested input cannot overflow the stack."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if substitutions or current.type not in SUBSTITUTIONS:
            stack.extend(reversed(current.children))


@dataclass
class Command:
    """A simple command with wrappers (sudo, env, …) looked through."""

    node: Node
    words: list[Node]  # argv as written, command name first
    start: int  # index in ``words`` of the command that really runs
    name: str | None  # its basename; None when the name is not literal
    wrapped: bool  # a wrapper execs it, so it is a new process even if a builtin

    @property
    def args(self) -> list[Node]:
        """The arguments of the command that really runs."""
        return self.words[self.start + 1 :]


def _skip_options(words: list[Node], j: int, spec: _Wrapper) -> int:
    while j < len(words):
        head = word_parts(words[j])[:1]
        if spec.assignments and head and isinstance(head[0], str) and _ASSIGNMENT.match(head[0]):
            j += 1  # NAME=value, where value may be an expansion
            continue
        if (s := static_value(words[j])) is None:
            break
        if s == "--":
            return j + 1
        if s.startswith("--") and "=" not in s:
            j += 2 if s in spec.arg_longs else 1
        elif s.startswith("-") and len(s) > 1:
            # In a cluster like -Eu the value of -u is the next word only if u comes last.
            cut = next((k for k, ch in enumerate(s[1:], 1) if ch in spec.arg_chars), None)
            j += 2 if cut == len(s) - 1 else 1
        else:
            break
    return j


def resolve_command(node: Node) -> Command | None:
    """Resolve a ``command`` node; ``None`` when nothing runs (``command -v``, ``sudo -v``)."""
    name_node = node.child_by_field_name("name")
    if name_node is None:
        return None
    if name_node.type == "command_name" and name_node.named_child_count:
        name_node = name_node.named_children[0]  # the word inside
    words = [name_node, *node.children_by_field_name("argument")]
    start, wrapped = 0, False
    for _ in range(8):  # longer wrapper chains are not realistic
        literal = static_value(words[start])
        name = posixpath.basename(literal) if literal is not None else None
        spec = _WRAPPERS.get(name or "")
        if spec is None:
            return Command(node, words, start, name, wrapped)
        if name == "command" and any(static_value(w) in ("-v", "-V") for w in words[start + 1 :]):
            return None
        nxt = _skip_options(words, start + 1, spec) + spec.positional
        if nxt >= len(words):
            return None if start == 0 and spec.execs else Command(node, words, start, name, wrapped)
        start, wrapped = nxt, wrapped or spec.execs
    return Command(node, words, start, None, wrapped)


def interpreter_kind(name: str | None) -> str | None:
    """``shell``, ``python``, ``perl``, ``ruby`` or ``node`` for an interpreter, else ``None``."""
    if name in _SHELLS:
        return "shell"
    if name is not None and re.fullmatch(r"(python|pypy)[0-9.]*", name):
        return "python"
    return {"perl": "perl", "ruby": "ruby", "node": "node", "nodejs": "node"}.get(name or "")


def program_source(kind: str, args: list[Node]) -> tuple[str, int]:
    """Where an interpreter reads its program: ("stdin"|"string"|"file", index into args)."""
    string_flags, stdin_flags, arg_flags, long_string = _INTERPRETERS[kind]
    from_stdin, i = False, 0
    while i < len(args):
        s = static_value(args[i])
        if s == "--":
            i += 1
            break
        if s is None or len(s) < 2 or not s.startswith(("-", "+")):
            break
        if s in long_string:
            return "string", i + 1
        if not s.startswith("--"):
            if any(ch in string_flags for ch in s[1:]):  # python -m names a module, not code
                return ("file" if kind == "python" and "m" in s else "string"), i + 1
            from_stdin = from_stdin or any(ch in stdin_flags for ch in s[1:])
            i += 1 if s[-1] in arg_flags else 0
        elif s in ("--rcfile", "--init-file"):
            i += 1
        i += 1
    if from_stdin or i >= len(args) or static_value(args[i]) == "-":
        return "stdin", i
    return "file", i


def stdin_redirects(node: Node) -> list[Node]:
    """Input redirects (``<``, ``<<<``) of a command, including its redirected statement's."""
    redirects = node.children_by_field_name("redirect")
    parent = node.parent
    if parent is not None and parent.type == "redirected_statement":
        body = parent.child_by_field_name("body")
        if body is not None and body.id == node.id:
            redirects = redirects + parent.children_by_field_name("redirect")
    return [r for r in redirects if r.type == "herestring_redirect" or (
        r.type == "file_redirect" and any(c.type == "<" for c in r.children))]
