"""hast.conf(5): parse, validate and render the configuration file (reference/hast.md §1).

`parse` is pure: text in, frozen dataclasses or ConfigError out; no files, sockets or clocks. Only
`local_node_names` (asks the host who it is) and `load` (reads the file), at the bottom, look out.

Contract: a file FreeBSD hastd accepts means the same here, except that
- our statements `attach`, `devdir` and `hook_timeout` are keywords, so a FreeBSD file that names
  a resource or node after one of them is rejected;
- hastd's lexer silently drops characters it does not know (flex echoes them to stdout); we drop
  only ';' and '\\r' and report any other, since hast.conf has no quoting and a stray quote or '='
  is a mistake;
- addresses are checked when the file is read (hastd finds bad ones when it first uses them), in
  `on` blocks for other nodes too, since both nodes share the file;
- resource and provider names may not contain '/' or be '.' or '..': they become file names;
- the control socket path must be absolute: the daemon does not keep its start directory.
Errors name the offending token and carry its line (1-based; hastd counts from 0).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from hastpy import constants as const
from hastpy.errors import ConfigError

FREEBSD_KEYWORDS = (
    "control", "pidfile", "listen", "replication", "checksum", "compression", "timeout", "exec",
    "metaflush", "resource", "name", "local", "remote", "source", "on", "off",
    "fullsync", "memsync", "async", "none", "crc32", "sha256", "hole", "lzf",
)  # fmt: skip
HASTPY_KEYWORDS = ("attach", "devdir", "hook_timeout")
KEYWORDS = frozenset(FREEBSD_KEYWORDS + HASTPY_KEYWORDS)

# Longest token quoted in full in a message; a longer one is cut so the message stays one line.
MESSAGE_TOKEN_CHARS = 60


@dataclass(frozen=True)
class Resource:
    """One resource as this node sees it, every option resolved (on block > resource > global)."""

    name: str
    provname: str  # provider name, /dev/hast/<provname>; defaults to the resource name
    local: str  # path of the local provider
    remote: str  # TCP address of the peer, or const.REMOTE_NONE
    source: str | None  # TCP address to bind() before connecting, if any
    replication: str  # one of const.REPLICATION_MODES
    checksum: str  # one of const.CHECKSUM_ALGORITHMS
    compression: str  # one of const.COMPRESSION_ALGORITHMS
    timeout: int  # seconds, > 0
    exec: str | None  # hook program, if any
    metaflush: bool
    attach: str  # hastpy: one of const.ATTACH_MODES
    devdir: str  # hastpy: absolute directory for the provider's device link
    hook_timeout: int  # hastpy: seconds, > 0
    line: int = field(default=0, compare=False)  # where the resource starts; for messages only


@dataclass(frozen=True)
class Config:
    """The file as seen by the node called `node_names`: only that node's `on` blocks apply."""

    path: str
    node_names: tuple[str, ...]  # the names `on` blocks were matched against, preferred first
    control: str  # control socket address as written; see parse_control_address()
    pidfile: str
    listen: tuple[str, ...]  # never empty: defaults fill an empty list
    resources: tuple[Resource, ...]  # in file order; names unique

    @property
    def node(self) -> str:
        return self.node_names[0] if self.node_names else ""

    def resource(self, name: str) -> Resource | None:
        return next((res for res in self.resources if res.name == name), None)


def _q(text: str) -> str:
    """Quote a token for a message, cut to MESSAGE_TOKEN_CHARS."""
    if len(text) > MESSAGE_TOKEN_CHARS:
        text = text[:MESSAGE_TOKEN_CHARS] + "..."
    return f"'{text}'"


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# --- addresses -----------------------------------------------------------------------------------

_TCP_SCHEMES = (
    ("tcp4://", socket.AF_INET),
    ("tcp6://", socket.AF_INET6),
    ("tcp://", socket.AF_UNSPEC),
)
_UDS_SCHEMES = ("uds://", "unix://")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


def _bad_address(addr: str, why: str) -> ConfigError:
    return ConfigError(f"invalid address {_q(addr)}: {why}")


def _strip_prefix(addr: str, prefix: str) -> str | None:
    """`addr` without `prefix`, compared case-insensitively as hastd's strncasecmp(); else None."""
    return addr[len(prefix) :] if addr[: len(prefix)].lower() == prefix else None


def parse_tcp_address(
    addr: str, default_port: int = const.DEFAULT_PORT
) -> tuple[socket.AddressFamily, str, int]:
    """Split `[tcp://|tcp4://|tcp6://]host[:port]` into (family hint, host, port), as hastd does.

    The family is AF_INET or AF_INET6 for tcp4:// and tcp6://, else AF_UNSPEC (getaddrinfo
    decides). An IPv6 literal with a port must be bracketed, `[::1]:8457`; unbracketed, every colon
    belongs to the address. Host names are not resolved. Raises ConfigError without file or line.
    """
    if _nbytes(addr) > const.MAX_ADDR_LEN:
        raise _bad_address(addr, f"longer than {const.MAX_ADDR_LEN} bytes")
    family, rest = _split_tcp_scheme(addr)
    host, port_text, must_be_ipv6 = _split_port(addr, rest)
    port = default_port if port_text is None else _parse_port(addr, port_text)
    _check_host(addr, host, family, must_be_ipv6)
    return family, host, port


def _split_tcp_scheme(addr: str) -> tuple[socket.AddressFamily, str]:
    for prefix, family in _TCP_SCHEMES:
        rest = _strip_prefix(addr, prefix)
        if rest is not None:
            return family, rest
    if "://" in addr:
        scheme = addr.split("://", 1)[0] + "://"
        raise _bad_address(addr, f"{_q(scheme)} is not tcp://, tcp4:// or tcp6://")
    return socket.AF_UNSPEC, addr


def _split_port(addr: str, rest: str) -> tuple[str, str | None, bool]:
    """Return (host, port text or None, whether the host must be an IPv6 literal)."""
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise _bad_address(addr, "'[' without a matching ']'")
        host, tail = rest[1:close], rest[close + 1 :]
        if not tail:
            return host, None, True
        if not tail.startswith(":"):
            raise _bad_address(addr, f"unexpected {_q(tail)} after ']' (expected ':port')")
        return host, tail[1:], True
    if rest.count(":") > 1:
        return rest, None, True
    host, colon, port_text = rest.partition(":")
    return host, (port_text if colon else None), False


def _parse_port(addr: str, text: str) -> int:
    # Length first: int() of a huge digit string is slow and, past 4300 digits, a ValueError.
    short = len(text.lstrip("0")) <= len(str(const.MAX_PORT))
    if not (text.isascii() and text.isdigit() and short and 1 <= int(text) <= const.MAX_PORT):
        why = f"port must be a number from 1 to {const.MAX_PORT}, not {_q(text)}"
        raise _bad_address(addr, why)
    return int(text)


def _check_host(addr: str, host: str, family: int, must_be_ipv6: bool) -> None:
    if not host:
        raise _bad_address(addr, "no host")
    if _nbytes(host) > const.MAX_HOST_LEN:
        raise _bad_address(addr, f"the host is longer than {const.MAX_HOST_LEN} bytes")
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        version = None
    if must_be_ipv6 and version != 6:
        why = "is not an IPv6 address (an IPv6 address with a port needs [brackets])"
        raise _bad_address(addr, f"{_q(host)} {why}")
    if version is None and not _HOSTNAME.fullmatch(host):
        raise _bad_address(addr, f"{_q(host)} is neither a host name nor an IP address")
    wanted = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(family)
    if version is not None and wanted is not None and version != wanted:
        why = f"is an IPv{version} address, but the scheme asks for IPv{wanted}"
        raise _bad_address(addr, f"{_q(host)} {why}")


def parse_control_address(addr: str) -> str:
    """Return the socket path of a control address: `uds:///path`, `unix:///path` or `/path`."""
    rests = (_strip_prefix(addr, prefix) for prefix in _UDS_SCHEMES)
    path = next((rest for rest in rests if rest is not None), None)
    if path is None:
        if not addr.startswith("/") or "://" in addr:
            raise _bad_address(addr, "expected uds:///path, unix:///path or /path")
        path = addr
    if not path.startswith("/") or "\0" in path:
        raise _bad_address(addr, "the control socket path must be absolute")
    if _nbytes(path) > const.MAX_UDS_PATH_LEN:
        raise _bad_address(addr, f"a unix socket path is limited to {const.MAX_UDS_PATH_LEN} bytes")
    return path


# --- lexer ---------------------------------------------------------------------------------------


class _Token(NamedTuple):
    kind: str  # "keyword", "num", "str", "{", "}" or "eof"
    text: str
    line: int


# Blanks, ';', '\r' and '#' comments are skipped (see the module docstring).
_LEXEME = re.compile(
    r"(?P<skip>[ \t\r;]+|\#[^\n]*)|(?P<newline>\n)|(?P<word>[A-Za-z0-9._/:\[\]-]+)|(?P<brace>[{}])"
)


def _tokenize(text: str, path: str) -> list[_Token]:
    """Split text into tokens, ending with one "eof" token on the last line."""
    tokens: list[_Token] = []
    line, pos = 1, 0
    while pos < len(text):
        match = _LEXEME.match(text, pos)
        if match is None:
            why = "hast.conf has no quoting; a word holds only letters, digits and . - _ / : [ ]"
            raise ConfigError(f"unexpected character {text[pos]!r}: {why}", path, line)
        lexeme, kind = match.group(), match.lastgroup
        if kind == "newline":
            line += 1
        elif kind == "word":
            tokens.append(_Token(_classify(lexeme), lexeme, line))
        elif kind == "brace":
            tokens.append(_Token(lexeme, lexeme, line))
        pos = match.end()
    last_line = line - 1 if text.endswith("\n") else line
    tokens.append(_Token("eof", "end of file", last_line))
    return tokens


def _classify(word: str) -> str:
    """Keyword, else NUM if all digits, else STR: what flex's longest match gives for a word
    (`10.0.0.1` and `control2` are STR)."""
    if word in KEYWORDS:
        return "keyword"
    return "num" if word.isdigit() else "str"  # the word is ASCII, so isdigit() means [0-9]


# --- parser --------------------------------------------------------------------------------------

_GLOBAL, _GLOBAL_ON, _RESOURCE, _RESOURCE_ON = "global", "global on", "resource", "resource on"

# The statements each depth accepts: hast.md §1's table, plus our attach, devdir, hook_timeout.
_ALLOWED = {
    _GLOBAL: ("control", "pidfile", "listen", "replication", "checksum", "compression", "timeout",
              "exec", "metaflush", "hook_timeout", "on", "resource"),
    _GLOBAL_ON: ("control", "pidfile", "listen"),
    _RESOURCE: ("name", "local", "replication", "checksum", "compression", "timeout", "exec",
                "metaflush", "attach", "devdir", "hook_timeout", "on"),
    _RESOURCE_ON: ("name", "local", "remote", "source", "metaflush", "attach", "devdir"),
}  # fmt: skip
_ON_DEPTH = {_GLOBAL: _GLOBAL_ON, _RESOURCE: _RESOURCE_ON}
_PLACE = {
    _GLOBAL: "at the top level",
    _GLOBAL_ON: "in a top-level 'on' block",
    _RESOURCE: "in a resource block",
    _RESOURCE_ON: "in a resource's 'on' block",
}
_STATEMENTS = frozenset(word for words in _ALLOWED.values() for word in words)

# A machine-id (32 hex digits) may also be written as a UUID; either compares case-insensitively,
# as hastd compares kern.hostuuid.
_HOST_ID = re.compile(r"[0-9a-f]{32}|[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}", re.IGNORECASE)


def _is_same_node(written: str, mine: str) -> bool:
    if written == mine:
        return True
    if not (_HOST_ID.fullmatch(written) and _HOST_ID.fullmatch(mine)):
        return False
    return written.replace("-", "").lower() == mine.replace("-", "").lower()


@dataclass
class _Block:
    """Statements of one block, and those of the `on` blocks inside it that name this node."""

    settings: dict[str, object] = field(default_factory=dict)
    mine: dict[str, object] = field(default_factory=dict)
    had_mine: bool = False


def _pick(key: str, scopes: tuple[dict[str, object], ...], default: object) -> object:
    """The value from the first scope that sets `key`: hast.conf's inheritance."""
    return next((scope[key] for scope in scopes if key in scope), default)


class _Parser:
    """Recursive descent over the token list; one instance parses one text."""

    def __init__(self, text: str, path: str, node_names: tuple[str, ...]):
        self.path = path
        self.node_names = node_names
        self.tokens = _tokenize(text, path)
        self.pos = 0
        self.first_line: dict[str, int] = {}  # resource name -> line, to report duplicates
        self.drafts: list[tuple[_Token, str, _Block]] = []  # (keyword, name, block)

    def error(self, message: str, line: int) -> ConfigError:
        return ConfigError(message, self.path, line)

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def next(self) -> _Token:
        token = self.tokens[self.pos]
        if token.kind != "eof":  # eof repeats, so lookahead never runs off the end
            self.pos += 1
        return token

    def parse(self) -> Config:
        top = self.block(_GLOBAL, None)
        # A global value applies wherever in the file it is, so resources resolve only now.
        resources = tuple(self.resolve(*draft, top.settings) for draft in self.drafts)
        scopes = (top.mine, top.settings)
        return Config(
            path=self.path,
            node_names=self.node_names,
            control=_pick("control", scopes, const.DEFAULT_CONTROL),
            pidfile=_pick("pidfile", scopes, const.DEFAULT_PIDFILE),
            listen=tuple(top.settings.get("listen", ())) or const.DEFAULT_LISTEN,
            resources=resources,
        )

    def block(self, depth: str, opened: _Token | None) -> _Block:
        """Parse statements up to the '}' matching `opened`, or to end of file at the top."""
        block = _Block()
        while True:
            token = self.next()
            if token.kind == "eof" and opened is not None:
                why = f"missing '}}' at end of file (block opened at line {opened.line})"
                raise self.error(why, token.line)
            if token.kind == "}" and opened is None:
                raise self.error("unexpected '}': there is no open block to close", token.line)
            if token.kind in ("eof", "}"):
                return block
            self.statement(token, depth, block)

    def statement(self, token: _Token, depth: str, block: _Block) -> None:
        if token.kind != "keyword" or token.text not in _ALLOWED[depth]:
            raise self.unexpected(token, depth)
        if token.text == "on":
            self.on_block(token, depth, block)
        elif token.text == "resource":
            self.resource(token)
        elif token.text == "listen":  # repeatable: all are kept, in file order
            block.settings.setdefault("listen", []).append(self.value(token))
        else:  # a repeated statement overrides the earlier one, as in hastd
            block.settings[token.text] = self.value(token)

    def unexpected(self, token: _Token, depth: str) -> ConfigError:
        expected = f"expected a statement ({', '.join(_ALLOWED[depth])})"
        if token.kind == "keyword" and token.text in _STATEMENTS:
            places = " or ".join(_PLACE[d] for d in _ALLOWED if token.text in _ALLOWED[d])
            message = f"{_q(token.text)} is not allowed {_PLACE[depth]}, only {places}; {expected}"
        elif token.kind == "str":
            message = f"unknown keyword {_q(token.text)}: {expected}"
        else:
            message = f"unexpected {_q(token.text)}: {expected}"
        return self.error(message, token.line)

    def on_block(self, keyword: _Token, depth: str, parent: _Block) -> None:
        """Parse `on <node> {...}`; merge it into `parent` only if it names this node."""
        name = self.name(keyword, "node name")
        child = self.block(_ON_DEPTH[depth], self.open_brace(name))
        if not any(_is_same_node(name.text, mine) for mine in self.node_names):
            return
        parent.had_mine = True
        for key, value in child.settings.items():
            if key == "listen":  # hastd appends this node's addresses to the global list
                parent.settings.setdefault("listen", []).extend(value)
            else:
                parent.mine[key] = value

    def resource(self, keyword: _Token) -> None:
        name = self.name(keyword, "resource name")
        self.check_file_name(name, "resource name")
        if name.text in self.first_line:
            first = self.first_line[name.text]
            why = f"duplicate resource {_q(name.text)} (first defined at line {first})"
            raise self.error(why, name.line)
        self.first_line[name.text] = keyword.line
        block = self.block(_RESOURCE, self.open_brace(name))
        self.check_resource(keyword, name.text, block)
        self.drafts.append((keyword, name.text, block))

    def check_resource(self, keyword: _Token, name: str, block: _Block) -> None:
        """hastd's checks at a resource's closing '}', reported at the resource's first line."""
        if not block.had_mine:
            names = ", ".join(self.node_names) or "none"
            why = f"No resource {name} configuration for this node"
            why += f" (acceptable node names: {names})."
            raise self.error(why, keyword.line)
        if "local" not in block.mine and "local" not in block.settings:
            why = f"resource {_q(name)} has no 'local' (the path of its local provider)"
            raise self.error(why, keyword.line)
        if "remote" not in block.mine:
            why = f"resource {_q(name)} has no 'remote' in its 'on' block for this node"
            raise self.error(why, keyword.line)

    def resolve(self, keyword: _Token, name: str, block: _Block, glob: dict) -> Resource:
        node, res = block.mine, block.settings
        return Resource(
            name=name,
            provname=_pick("name", (node, res), name),
            local=_pick("local", (node, res), None),
            remote=node["remote"],
            source=node.get("source"),
            replication=_pick("replication", (res, glob), const.DEFAULT_REPLICATION),
            checksum=_pick("checksum", (res, glob), const.DEFAULT_CHECKSUM),
            compression=_pick("compression", (res, glob), const.DEFAULT_COMPRESSION),
            timeout=_pick("timeout", (res, glob), const.DEFAULT_TIMEOUT),
            exec=_pick("exec", (res, glob), None),
            metaflush=_pick("metaflush", (node, res, glob), const.DEFAULT_METAFLUSH),
            attach=_pick("attach", (node, res), const.DEFAULT_ATTACH),
            devdir=_pick("devdir", (node, res), const.DEFAULT_DEVDIR),
            hook_timeout=_pick("hook_timeout", (res, glob), const.DEFAULT_HOOK_TIMEOUT),
            line=keyword.line,
        )

    # --- operands --------------------------------------------------------------------------------

    def operand(self, keyword: _Token, what: str) -> _Token:
        token = self.next()
        if token.kind in ("{", "}", "eof"):
            raise self.error(f"missing {what} after {_q(keyword.text)}", keyword.line)
        return token

    def open_brace(self, after: _Token) -> _Token:
        token = self.next()
        if token.kind != "{":
            why = f"expected '{{' after {_q(after.text)}, not {_q(token.text)}"
            raise self.error(why, token.line)
        return token

    def name(self, keyword: _Token, what: str) -> _Token:
        token = self.operand(keyword, f"a {what}")
        if token.kind == "num":
            why = f"invalid {what} {_q(token.text)}: a name cannot be all digits"
            raise self.error(why, token.line)
        if token.kind == "keyword":
            raise self.error(f"invalid {what} {_q(token.text)}: it is a keyword", token.line)
        self.check_length(token, what, const.MAX_NAME_LEN)
        return token

    def check_file_name(self, token: _Token, what: str) -> None:
        if "/" in token.text or token.text in (".", ".."):
            why = "it becomes a file name, so it cannot contain '/' or be '.' or '..'"
            raise self.error(f"invalid {what} {_q(token.text)}: {why}", token.line)

    def check_length(self, token: _Token, what: str, limit: int) -> None:
        if _nbytes(token.text) > limit:
            raise self.error(f"{what} {_q(token.text)} is longer than {limit} bytes", token.line)

    def word(self, keyword: _Token, what: str, limit: int) -> _Token:
        """A STR operand: hast.conf cannot spell a value that is all digits or a keyword."""
        token = self.operand(keyword, what)
        if token.kind in ("num", "keyword"):
            kind = "number" if token.kind == "num" else "keyword"
            why = f"{_q(keyword.text)} needs {what}, not the {kind} {_q(token.text)}"
            raise self.error(why, token.line)
        self.check_length(token, f"{keyword.text} argument", limit)
        return token

    def checked(self, keyword: _Token, token: _Token, check: Callable[[str], object]) -> str:
        """token.text, after `check` (which raises ConfigError) accepts it."""
        try:
            check(token.text)
        except ConfigError as err:
            raise self.error(f"{keyword.text}: {err.reason}", token.line) from None
        return token.text

    def choice(self, keyword: _Token, choices: tuple[str, ...]) -> str:
        listed = ", ".join(choices)
        token = self.operand(keyword, f"a value ({listed})")
        if token.text not in choices:
            why = f"{keyword.text} must be one of {listed}, not {_q(token.text)}"
            raise self.error(why, token.line)
        return token.text

    def seconds(self, keyword: _Token) -> int:
        token = self.operand(keyword, "a number of seconds")
        if token.kind != "num":
            raise self.error(f"{keyword.text} must be a whole number of seconds, not {_q(token.text)}", token.line)
        # Length first: int() of a huge digit string is slow and, past 4300 digits, a ValueError.
        too_long = len(token.text.lstrip("0")) > len(str(const.MAX_TIMEOUT))
        if too_long or int(token.text) > const.MAX_TIMEOUT:
            limit = f"at most {const.MAX_TIMEOUT} seconds"
            why = f"{keyword.text} must be {limit}, not {_q(token.text)}"
            raise self.error(why, token.line)
        if int(token.text) == 0:
            why = f"{keyword.text} must be greater than 0, not {_q(token.text)}"
            raise self.error(why, token.line)
        return int(token.text)

    def path(self, keyword: _Token) -> str:
        return self.word(keyword, "a path", const.MAX_PATH_LEN).text

    def value(self, keyword: _Token) -> object:
        """Read and check the operand of any statement but `on` and `resource`."""
        return _OPERANDS[keyword.text](self, keyword)


def _tcp(parser: _Parser, keyword: _Token, default_port: int = const.DEFAULT_PORT) -> str:
    token = parser.word(keyword, "an address", const.MAX_ADDR_LEN)
    return parser.checked(keyword, token, lambda addr: parse_tcp_address(addr, default_port))


def _remote(parser: _Parser, keyword: _Token) -> str:
    token = parser.peek()
    if token.kind == "keyword" and token.text == const.REMOTE_NONE:
        parser.next()
        return const.REMOTE_NONE
    return _tcp(parser, keyword)


def _control(parser: _Parser, keyword: _Token) -> str:
    token = parser.word(keyword, "an address", const.MAX_ADDR_LEN)
    return parser.checked(keyword, token, parse_control_address)


def _devdir(parser: _Parser, keyword: _Token) -> str:
    token = parser.word(keyword, "a directory", const.MAX_PATH_LEN)
    if not token.text.startswith("/"):
        raise parser.error(f"devdir must be an absolute path, not {_q(token.text)}", token.line)
    return token.text


def _provname(parser: _Parser, keyword: _Token) -> str:
    token = parser.word(keyword, "a provider name", const.MAX_NAME_LEN)
    parser.check_file_name(token, "provider name")
    return token.text


_OPERANDS: dict[str, Callable[[_Parser, _Token], object]] = {
    "control": _control,
    "pidfile": _Parser.path,
    "listen": _tcp,
    "replication": lambda p, kw: p.choice(kw, const.REPLICATION_MODES),
    "checksum": lambda p, kw: p.choice(kw, const.CHECKSUM_ALGORITHMS),
    "compression": lambda p, kw: p.choice(kw, const.COMPRESSION_ALGORITHMS),
    "timeout": _Parser.seconds,
    "hook_timeout": _Parser.seconds,
    "exec": _Parser.path,
    "metaflush": lambda p, kw: p.choice(kw, ("on", "off")) == "on",
    "name": _provname,
    "local": _Parser.path,
    "remote": _remote,
    "source": lambda p, kw: _tcp(p, kw, default_port=0),  # hastd binds the source to any port
    "attach": lambda p, kw: p.choice(kw, const.ATTACH_MODES),
    "devdir": _devdir,
}


def parse(text: str, path: str, node_names: tuple[str, ...]) -> Config:
    """Parse hast.conf text as the node known by `node_names` (see local_node_names()).

    An `on <node>` block applies if <node> equals one of `node_names` (a machine-id compares
    case-insensitively, with or without UUID dashes); a `-n/--node` override is `(name,)`.
    Raises ConfigError carrying `path` and the line of the problem, and nothing else.
    """
    return _Parser(text, path, tuple(node_names)).parse()


# --- rendering -----------------------------------------------------------------------------------


def render(config: Config) -> str:
    """Return hast.conf text that parses, with config.node_names, to a Config equal to `config`.

    Everything is explicit: each resource's options at resource level and the node-specific ones
    in an `on <config.node>` block, so nothing depends on defaults or inheritance. Holds for any
    Config parse() can return; an empty `listen` renders as nothing, which reads back as defaults.
    """
    lines = ["# hast.conf written by hastpy", f"control {config.control}"]
    lines += [f"pidfile {config.pidfile}"] + [f"listen {addr}" for addr in config.listen]
    for res in config.resources:
        lines += _render_resource(res, config.node)
    return "\n".join(lines) + "\n"


def _render_resource(res: Resource, node: str) -> list[str]:
    lines = [
        "",
        f"resource {res.name} {{",
        f"\treplication {res.replication}",
        f"\tchecksum {res.checksum}",
        f"\tcompression {res.compression}",
        f"\ttimeout {res.timeout}",
        f"\thook_timeout {res.hook_timeout}",
    ]
    if res.exec is not None:
        lines.append(f"\texec {res.exec}")
    lines += [
        f"\ton {node} {{",
        f"\t\tname {res.provname}",
        f"\t\tlocal {res.local}",
        f"\t\tremote {res.remote}",
        f"\t\tmetaflush {'on' if res.metaflush else 'off'}",
        f"\t\tattach {res.attach}",
        f"\t\tdevdir {res.devdir}",
    ]
    if res.source is not None:
        lines.append(f"\t\tsource {res.source}")
    return lines + ["\t}", "}"]


# --- the two functions that look outside ---------------------------------------------------------


def local_node_names() -> tuple[str, ...]:
    """This host's names for `on` blocks, as hastd's isitme(): the full hostname, the part before
    the first '.', and the machine-id (Linux's kern.hostuuid) if it can be read."""
    full = socket.gethostname()
    short = full.split(".", 1)[0]
    names = [full] + ([short] if short and short != full else [])
    try:
        with open(const.MACHINE_ID_PATH, encoding="ascii", errors="replace") as file:
            names += file.read().split()[:1]
    except OSError:
        pass  # no machine-id: the hostnames still work
    return tuple(names)


# A hast.conf is a few KiB, and one of hundreds of resources well under 1 MiB. Reading stops past
# this, so that `-c /dev/zero` or a runaway generated file is a clear error, not all of memory
# (hastd re-reads the file on every SIGHUP).
MAX_CONFIG_SIZE = 16 * 1024 * 1024


def load(path: str = const.DEFAULT_CONFIG, node_names: tuple[str, ...] | None = None) -> Config:
    """Read and parse the file at `path`; `node_names` defaults to local_node_names(). Only a
    regular file of at most MAX_CONFIG_SIZE: a FIFO would block hastd's loop on SIGHUP (opened
    O_NONBLOCK to find out without blocking) and read as empty, i.e. no resources, once its
    writer is gone; a device never ends."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError("not a regular file", path)
            data = file.read(MAX_CONFIG_SIZE + 1)
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror or err}", path) from None
    if len(data) > MAX_CONFIG_SIZE:
        raise ConfigError(f"larger than {MAX_CONFIG_SIZE // (1024 * 1024)} MiB: not a configuration file", path)
    text = data.decode("utf-8", errors="replace")
    return parse(text, path, local_node_names() if node_names is None else node_names)
