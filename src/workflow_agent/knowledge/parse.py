"""Parse documentation (HTML, Markdown, plain text, man pages) into structured knowledge.

Each format has a reader that turns the page into ``Block`` s in reading order
(headings, text, list items, code with its language and the tab it sits in);
``extract.extract`` then finds the facts the same way for every format.

- HTML: the standard library's ``html.parser`` (tolerant of broken markup, no
  dependency). Site chrome is dropped: ``nav``/``header``/``footer``/``aside``, ARIA
  navigation roles, classes such as ``sidebar`` or ``breadcrumb``, scripts, forms,
  in-page tables of contents; with a ``main``/``article`` only that is kept. Tab panels
  (ARIA ``tabpanel``, Bootstrap ``tab-pane``, MkDocs ``tabbed-block``) carry their label.
- Markdown: markdown-it-py (CommonMark, plus tables), already installed with rich. MkDocs
  ``=== "Debian"`` tabs and MDX ``<TabItem label="Debian">`` are understood.
- Plain text: README-style underlined headings, man pages as ``man`` prints them
  (overstrike, hyphenation and page headers removed; unindented capitals are headings),
  prompts and ``key=value`` paragraphs as code; roff source (``.TH``/``.SH``) too.
"""

from __future__ import annotations

import re
from collections import Counter
from html.parser import HTMLParser
from typing import TYPE_CHECKING

from workflow_agent.knowledge.extract import (
    KNOWN_COMMANDS,
    Block,
    BlockKind,
    DocumentKnowledge,
    extract,
    looks_like_code_line,
)
from workflow_agent.knowledge.fetch import HTML, MARKDOWN, Document

if TYPE_CHECKING:
    from markdown_it.token import Token


def parse(document: Document) -> DocumentKnowledge:
    """The structured knowledge of a fetched or read page."""
    return parse_text(document.text, document.content_type, document.source)


def parse_text(text: str, content_type: str, source: str = "") -> DocumentKnowledge:
    """Parse ``text`` as ``content_type`` (``text/html``, ``text/markdown``, else plain)."""
    if content_type == HTML:
        blocks, title = html_blocks(text)
    elif content_type == MARKDOWN:
        blocks, title = markdown_blocks(text), ""
    else:
        blocks, title = text_blocks(text)
    # A man page's NAME line says more than its upper-case name; an <h1> more than a
    # <title> with the site's name in it.
    h1 = next((b.text for b in blocks if b.kind == "heading" and b.level == 1), "")
    if content_type == HTML:
        title = h1 or title
    title = _man_title(blocks) or title or h1
    return extract(blocks, title or source.rstrip("/").rpartition("/")[2])


def _man_title(blocks: list[Block]) -> str:
    for at, block in enumerate(blocks[:4]):
        if block.kind == "heading" and block.text == "NAME" and at + 1 < len(blocks) and \
                blocks[at + 1].kind == "text":
            return blocks[at + 1].text
    return ""


# -- HTML ---------------------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr", "param"}
_SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "form", "button", "select",
              "iframe", "object", "canvas", "nav", "aside", "footer", "head", "dialog", "math"}
_SKIP_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "menu",
               "menubar", "dialog", "alert"}
_CHROME = re.compile(r"^(?:nav|navbar|navigation|menu|sidebar|side-?nav|breadcrumbs?|"
                     r"site-(?:header|footer|nav)|footer|cookies?|cookie-.*|consent|toc|"
                     r"table-of-contents|skip-?link|skip-to-content|pagination|share|social|"
                     r"ads?|advert\w*|edit-?page|headerlink|visually-hidden|sr-only)$")
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "li", "dt", "dd", "ul", "ol", "dl",
               "table", "tr", "blockquote", "figure", "figcaption", "details", "summary",
               "h1", "h2", "h3", "h4", "h5", "h6", "pre", "header", "body", "center"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_PANEL_CLASSES = {"tab-pane", "tabpanel", "tab-panel", "tabbed-block", "tabs-panel",
                  "tabitem", "tab-item"}
_LANG_CLASS = re.compile(r"(?:^|\s)(?:language|lang|highlight(?:-source)?)-([\w+#-]+)")
_LABEL_ATTRS = ("data-os", "data-platform", "data-tab", "data-label", "data-title", "data-value",
                "aria-label", "title")
_SPACES = re.compile(r"\s+")


class _HtmlReader(HTMLParser):
    """Collects blocks from HTML; see the module docstring for what is dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[Block, bool]] = []  # (block, inside main/article)
        self.title = ""
        # Open elements: (tag, skipped, main, tab label, tab label capture)
        self._stack: list[tuple[str, bool, bool, str, bool]] = []
        self._skip = 0
        self._main = 0
        self._text: list[str] = []
        self._anchor_text = 0  # chars of the current block inside in-page links (#...)
        self._in_anchor = 0
        self._kind: BlockKind = "text"
        self._level = 0
        self._pre: list[str] | None = None
        self._pre_language = ""
        self._tab = ""
        self._labels: dict[str, str] = {}  # element id -> tab label text
        self._pending: list[str] = []  # tab labels not yet matched to a panel
        self._capture: list[str] | None = None
        self._capture_id = ""
        self._in_title = False
        self._classes: list[list[str]] = []  # class lists of the open elements

    # The stack entry of the innermost element with a tab label, for nesting.
    def _current_tab(self) -> str:
        return next((tab for *_, tab, _ in reversed(self._stack) if tab), "")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "title" and not self.title:
            self._in_title = True
        if tag in _VOID:
            if tag == "br":
                self._add("\n")
            return
        classes = a.get("class", "").split()
        role = a.get("role", "")
        in_main = tag in ("main", "article") or role == "main"
        skip = tag in _SKIP_TAGS or role in _SKIP_ROLES or any(
            _CHROME.match(c) for c in (*classes, a.get("id", "")))
        if tag == "header" and not self._main:
            skip = True  # a site header; a header inside an article holds its title
        capture = not self._skip and (role == "tab" or (tag == "label" and "for" in a and any(
            "tab" in c for c in self._open_classes())))
        if capture:
            self._capture, self._capture_id = [], a.get("id", "") or a.get("for", "")
        tab = ""
        if role == "tabpanel" or _PANEL_CLASSES.intersection(c.lower() for c in classes):
            tab = self._panel_label(a)
        if tag in _BLOCK_TAGS or tag in ("td", "th"):
            self._flush()
        self._stack.append((tag, skip, in_main, tab, capture))
        self._skip += skip
        self._main += in_main
        self._tab = self._current_tab()
        self._classes.append(classes)
        if tag in _HEADINGS:
            self._kind, self._level = "heading", _HEADINGS[tag]
        elif tag in ("li", "dt"):
            self._kind = "item"
        elif tag == "pre":
            self._pre = []
            self._pre_language = self._language(a.get("class", ""))
        elif tag == "code" and self._pre is not None and not self._pre_language:
            self._pre_language = self._language(a.get("class", ""))
        elif tag in ("td", "th") and self._text:
            self._text.append(" | ")
        elif tag == "a" and a.get("href", "").startswith("#"):
            self._in_anchor += 1

    def _open_classes(self) -> list[str]:
        return [c for classes in self._classes for c in classes]

    def _language(self, classes: str) -> str:
        found = _LANG_CLASS.search(classes)
        if found:
            return found.group(1)
        # Sphinx wraps <pre> in <div class="highlight-bash">: look at open ancestors.
        for cls in reversed(self._open_classes()):
            if (inner := _LANG_CLASS.search(cls)) is not None:
                return inner.group(1)
        return ""

    def _panel_label(self, a: dict[str, str]) -> str:
        for name in _LABEL_ATTRS:
            if a.get(name):
                return a[name]
        labelled = a.get("aria-labelledby", "") or a.get("id", "")
        if labelled in self._labels:
            label = self._labels[labelled]
            if label in self._pending:
                self._pending.remove(label)
            return label
        return self._pending.pop(0) if self._pending else ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if not any(entry[0] == tag for entry in self._stack):
            return  # a stray end tag: browsers ignore it too
        while self._stack:
            open_tag, skipped, in_main, _, capture = self._stack.pop()
            self._classes.pop()
            self._close(open_tag, capture)
            self._skip -= skipped
            self._main -= in_main
            if open_tag == tag:
                break
        self._tab = self._current_tab()

    def _close(self, tag: str, capture: bool) -> None:
        if capture and self._capture is not None:
            label = _SPACES.sub(" ", "".join(self._capture)).strip()
            if label:
                self._pending.append(label)
                if self._capture_id:
                    self._labels[self._capture_id] = label
            self._capture = None
        if tag == "pre" and self._pre is not None:
            code = "".join(self._pre).strip("\n")
            if code.strip() and not self._skip:
                self.blocks.append((Block("code", code, language=self._pre_language,
                                          tab=self._tab), self._main > 0))
            self._pre = None
            self._pre_language = ""
        elif tag == "a" and self._in_anchor:
            self._in_anchor -= 1
        elif tag in _BLOCK_TAGS or tag in ("td", "th"):
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
            return
        if self._capture is not None:
            self._capture.append(data)
            return
        if self._skip:
            return
        if self._pre is not None:
            self._pre.append(data)
            return
        self._add(data)

    def _add(self, data: str) -> None:
        if self._pre is not None:
            self._pre.append(data)
            return
        self._text.append(data)
        if self._in_anchor:
            self._anchor_text += len(data.strip())

    def _flush(self) -> None:
        raw = "".join(self._text)
        lines = [" ".join(line.split()) for line in raw.split("\n") if line.strip()]
        if len(lines) > 1 and not self._skip and all(looks_like_code_line(ln) for ln in lines):
            # groff -Thtml renders man pages' examples as <p> with <br>, not <pre>.
            self.blocks.append((Block("code", "\n".join(lines), tab=self._tab), self._main > 0))
            self._text, self._anchor_text, self._kind, self._level = [], 0, "text", 0
            return
        text = _SPACES.sub(" ", raw).strip()
        only_anchors = self._anchor_text >= len(text.replace(" ", "").replace("|", "")) > 0
        if text and not self._skip and not only_anchors and text.strip("| "):
            kind: BlockKind = self._kind
            self.blocks.append((Block(kind, text, level=self._level if kind == "heading" else 0,
                                      tab=self._tab), self._main > 0))
        self._text = []
        self._anchor_text = 0
        self._kind, self._level = "text", 0


def html_blocks(html: str) -> tuple[list[Block], str]:
    """Blocks of an HTML page without its navigation and chrome, and its ``<title>``."""
    reader = _HtmlReader()
    reader.feed(html)
    reader.close()
    reader._flush()
    in_main = [block for block, main in reader.blocks if main]
    blocks = in_main or [block for block, _ in reader.blocks]
    return blocks, _SPACES.sub(" ", reader.title).strip()


# -- Markdown -------------------------------------------------------------------------------

_MKDOCS_TAB = re.compile(r'^(\s*)===[+!]?\s+"([^"]+)"\s*$')
_TAB_MARK = re.compile(r"<!-- tab: (.+?) -->|<!-- endtab -->|<TabItem\b([^>]*)>|</TabItem>|"
                       r"</Tabs>")
_TAB_ATTR = re.compile(r"""\b(label|value)\s*=\s*["{]([^"}]+)["}]""")


def _mkdocs_tabs(text: str) -> str:
    """Turn MkDocs ``=== "Label"`` tabs (indented content) into marked, dedented text."""
    if "===" not in text:
        return text
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        found = _MKDOCS_TAB.match(lines[i])
        if found is None:
            out.append(lines[i])
            i += 1
            continue
        indent = len(found.group(1)) + 4
        out += ["", f"<!-- tab: {found.group(2)} -->", ""]
        i += 1
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) >= indent):
            out.append(lines[i][indent:])
            i += 1
        out += ["", "<!-- endtab -->", ""]
    return "\n".join(out)


def markdown_blocks(text: str) -> list[Block]:
    """Blocks of a Markdown page (CommonMark with tables, raw HTML read as HTML)."""
    from markdown_it import MarkdownIt  # imported on use: start-up time matters

    tokens = MarkdownIt("commonmark", {"html": True}).enable("table").parse(_mkdocs_tabs(text))
    blocks: list[Block] = []
    tab = ""
    in_list = 0
    row: list[str] = []
    pending: tuple[BlockKind, int] | None = None
    for token in tokens:
        kind = token.type
        if kind in ("bullet_list_open", "ordered_list_open"):
            in_list += 1
        elif kind in ("bullet_list_close", "ordered_list_close"):
            in_list -= 1
        elif kind == "heading_open":
            pending, tab = ("heading", int(token.tag[1:])), ""
        elif kind == "paragraph_open":
            pending = ("item" if in_list else "text", 0)
        elif kind == "inline" and token.children is not None:
            content = _inline_text(token.children)
            if pending is None:  # a table cell
                row.append(content)
            elif content and pending is not None:
                blocks.append(Block(pending[0], content, level=pending[1], tab=tab))
            pending = None
        elif kind == "tr_open":
            row = []
        elif kind == "tr_close":
            line = " | ".join(cell for cell in row)
            if line.strip("| "):
                blocks.append(Block("text", line, tab=tab))
        elif kind in ("fence", "code_block") and token.content.strip():
            language = token.info.split()[0] if token.info.strip() else ""
            blocks.append(Block("code", token.content.rstrip("\n"), language=language, tab=tab))
        elif kind in ("html_block", "html_inline"):
            marks = list(_TAB_MARK.finditer(token.content))
            for mark in marks:
                if mark.group(1):
                    tab = mark.group(1)
                elif mark.group(2) is not None:
                    attrs = dict(_TAB_ATTR.findall(mark.group(2)))
                    tab = attrs.get("label") or attrs.get("value", "")
                else:
                    tab = ""
            if not marks and kind == "html_block":
                html, _ = html_blocks(token.content)
                blocks.extend(Block(b.kind, b.text, b.level, b.language, b.tab or tab)
                              for b in html)
    return blocks


def _inline_text(children: list[Token]) -> str:
    parts: list[str] = []
    image = 0
    for child in children:
        if child.type == "image":
            image += 1  # badges and screenshots: their alt text is noise
        elif child.type in ("text", "code_inline") and not image:
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return _SPACES.sub(" ", "".join(parts)).strip()


# -- plain text, man pages, roff ----------------------------------------------------------

_OVERSTRIKE = re.compile(r".\x08")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_MAN_HEADER = re.compile(r"^\S.*\S\s{3,}.*\s{3,}\S+\(\d\w*\)\s*$|^\S+\(\d\w*\)\s{3,}.*\s{3,}\S.*$")
_UNDERLINE = re.compile(r"^\s*([=\-~^*#])\1{2,}\s*$")
_MAN_HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/&()'._-]{1,48}$")
_BULLET = re.compile(r"^\s*(?:[-*+•·o]|\d{1,2}[.)])\s+(?=\S)")
_PROMPTED = re.compile(r"^\s*(?:\$|%|#|[\w.-]+@[\w.-]+\S*\s?[$#])\s+\S")


def text_blocks(text: str) -> tuple[list[Block], str]:
    """Blocks of a plain-text page or man page (rendered or roff source), and its title."""
    if re.search(r"^\.(?:TH|SH)\b", text[:4000], re.MULTILINE):
        return roff_blocks(text)
    text = _ANSI.sub("", _OVERSTRIKE.sub("", text)).expandtabs(8)
    text = re.sub(r"(\w)\u2010\n\s*", r"\1", text)  # groff's hyphenation at line ends
    lines = [line.rstrip() for line in text.splitlines() if not _MAN_HEADER.match(line)]
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    paragraphs = [p for p in paragraphs if p]
    # The body's indent: the most common one over all lines (man pages indent by 7).
    indents = Counter(_indent(line) for p in paragraphs for line in p)
    base = indents.most_common(1)[0][0] if indents else 0
    blocks: list[Block] = []
    prose = base  # indent of the last prose paragraph: code is indented deeper than it
    for paragraph in paragraphs:
        new = _paragraph_blocks(paragraph, base, prose)
        if new and new[-1].kind in ("text", "item"):
            prose = _indent(paragraph[-1])  # not the first line: it may be a heading
        blocks.extend(new)
    return blocks, ""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _paragraph_blocks(lines: list[str], base: int, prose: int) -> list[Block]:
    blocks: list[Block] = []
    while len(lines) > 1 and _UNDERLINE.match(lines[1]) and not _UNDERLINE.match(lines[0]):
        level = 1 if lines[1].strip()[0] in "=#" else 2
        blocks.append(Block("heading", lines[0].strip(), level=level))
        lines = lines[2:]
    if lines and base > 0 and _indent(lines[0]) < base and (
            _MAN_HEADING.match(lines[0].strip()) and lines[0].strip().upper() == lines[0].strip()):
        level = 1 if _indent(lines[0]) == 0 else 2
        blocks.append(Block("heading", lines[0].strip(), level=level))
        lines = lines[1:]
    if not lines:
        return blocks
    rest = [line for line in lines if line.strip()]
    deeper = min(_indent(line) for line in rest) >= prose + 4
    prompted = _PROMPTED.match(rest[0]) is not None and (
        rest[0].lstrip()[0] != "#" or any(_PROMPTED.match(line) for line in rest[1:]) or
        _first_command_word(rest[0]))
    settings = all(re.match(r"^\s*[A-Za-z_][\w.]*=\S", line) for line in rest)
    if prompted or settings or (deeper and all(looks_like_code_line(line) for line in rest)):
        width = min(_indent(line) for line in rest)
        return [*blocks, Block("code", "\n".join(line[width:] for line in rest))]
    items: list[list[str]] = []
    for line in rest:
        if _BULLET.match(line):
            items.append([_BULLET.sub("", line, count=1)])
        elif items:
            items[-1].append(line)
        else:
            blocks.append(Block("text", " ".join(line.split())))
    if blocks and blocks[-1].kind == "text":
        merged = " ".join(b.text for b in blocks if b.kind == "text")
        blocks = [b for b in blocks if b.kind != "text"] + [Block("text", merged)]
    blocks.extend(Block("item", " ".join(" ".join(i).split())) for i in items)
    return blocks


def _first_command_word(line: str) -> bool:
    words = line.lstrip("#$% ").split()
    return bool(words) and words[0] in KNOWN_COMMANDS


_ROFF_ESCAPES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement) for pattern, replacement in (
        (r"\\f(?:\[[^\]]*\]|\(..|.)", ""), (r"\\s[+-]?\d", ""), (r"\\\*(?:\[[^\]]*\]|\(..|.)", ""),
        (r"\\\((?:em|en)", "-"), (r"\\\((?:bu|bb)", "•"), (r"\\\((?:lq|rq|dq)", '"'),
        (r"\\\((?:aq|oq|cq)", "'"), (r"\\\(..", ""), (r"\\-", "-"), (r"\\e", "\\"),
        (r"\\[&|^c%]", ""), (r"\\ ", " "), (r"\\\\", "\\"),
    ))


def _unroff(text: str) -> str:
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement.replace("\\", "\\\\"), text)  # a literal template
    return text


def _roff_args(rest: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_blocks(source: str) -> tuple[list[Block], str]:
    """Blocks of a man page's roff source (the ``man`` macros that matter for reading)."""
    blocks: list[Block] = []
    text: list[str] = []
    code: list[str] | None = None
    title = ""

    def flush() -> None:
        if text:
            joined = " ".join(" ".join(text).split())
            if joined:
                blocks.append(Block("text", joined))
            text.clear()

    started = False  # text before the first .SH is pod2man's or groff's preamble
    defining = False
    for line in source.splitlines():
        if defining:
            defining = line.strip() != ".."
            continue
        found = re.match(r"^[.'](\w+)\s*(.*)$", line)
        if found is None:
            if started and not line.startswith((".", "'", '\\"')):
                (code if code is not None else text).append(_unroff(line))
            continue
        macro, rest = found.groups()
        if macro in ("de", "de1", "am", "ig"):
            defining = True
            continue
        started = started or macro == "SH"
        args = _roff_args(_unroff(rest))
        if macro in ("SH", "SS"):
            flush()
            blocks.append(Block("heading", " ".join(args), level=1 if macro == "SH" else 2))
        elif macro == "TH":
            title = args[0] if args else ""
        elif macro in ("nf", "EX", "Vb") and code is None:
            flush()
            code = []
        elif macro in ("fi", "EE", "Ve") and code is not None:
            if any(c.strip() for c in code):
                blocks.append(Block("code", "\n".join(code).strip("\n")))
            code = None
        elif macro in ("PP", "LP", "P", "TP", "IP", "HP", "sp", "br"):
            flush()
            if macro == "IP" and args and args[0] not in ("\\(bu", "•"):
                text.append(args[0])
        elif macro in ("B", "I", "SM", "SB"):
            text.append(" ".join(args))
        elif macro in ("BR", "RB", "IR", "RI", "BI", "IB"):
            text.append("".join(args))  # alternating fonts join their words without space
    flush()
    return blocks, title
