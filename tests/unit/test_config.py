"""hast.conf parser: FreeBSD grammar and inheritance, our extensions, exact error lines, round trip.

Line numbers in error tests count from 1 at the first line of the dedented text.
"""

import re
import os
import socket
import string
from pathlib import Path
from textwrap import dedent

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hastpy import config as cfg
from hastpy import constants as const
from hastpy.config import (
    KEYWORDS,
    Config,
    Resource,
    load,
    local_node_names,
    parse,
    parse_control_address,
    parse_tcp_address,
    render,
)
from hastpy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MACHINE_ID = "3d1219c7c4c5404aaa1f6d2a48adfda4"
NODE_NAMES = ("hasta.example.com", "hasta", MACHINE_ID)

# Handbook, "Highly Available Storage (HAST)": one file, copied to both nodes.
HANDBOOK = """\
resource test {
	on hasta {
		local /dev/ad6
		remote 172.16.0.2
	}
	on hastb {
		local /dev/ad6
		remote 172.16.0.1
	}
}
"""

# One resource with an `on hasta` block, for wrapping statements under test.
MINIMAL = "resource r {\n\ton hasta {\n\t\tlocal /dev/sdb\n\t\tremote 10.0.0.2\n\t}\n}\n"


def conf(text, names=("hasta",)):
    return parse(dedent(text), "hast.conf", names)


def only(text, names=("hasta",)):
    (res,) = conf(text, names).resources
    return res


def fails(text, names=("hasta",)):
    with pytest.raises(ConfigError) as info:
        conf(text, names)
    err = info.value
    assert err.path == "hast.conf"
    assert str(err).startswith(f"hast.conf:{err.line}: ")
    return err


# --- accepted files ------------------------------------------------------------------------------


def test_handbook_file_on_both_nodes():
    a = conf(HANDBOOK, ("hasta",))
    b = conf(HANDBOOK, ("hastb",))
    assert a.resources == (
        Resource(
            name="test",
            provname="test",
            local="/dev/ad6",
            remote="172.16.0.2",
            source=None,
            replication="memsync",
            checksum="none",
            compression="hole",
            timeout=20,
            exec=None,
            metaflush=True,
            attach="auto",
            devdir="/dev/hast",
            hook_timeout=60,
        ),
    )
    assert a.resources[0].line == 1
    assert b.resources[0].remote == "172.16.0.1"
    assert a.control == const.DEFAULT_CONTROL == "uds:///var/run/hastctl"
    assert a.pidfile == const.DEFAULT_PIDFILE == "/var/run/hastd.pid"
    assert a.listen == const.DEFAULT_LISTEN == ("tcp4://0.0.0.0:8457", "tcp6://[::]:8457")
    assert a.node == "hasta" and a.node_names == ("hasta",)
    assert a.resource("test") is a.resources[0]
    assert a.resource("nope") is None


def test_handbook_style_global_options():
    c = conf(
        """\
        # global options
        control /var/run/hastctl.sock
        pidfile /var/run/hast.pid
        replication async
        checksum sha256
        compression lzf
        timeout 5
        exec /usr/local/sbin/hast.sh
        metaflush off
        listen 0.0.0.0
        """
        + HANDBOOK
    )
    (res,) = c.resources
    assert (c.control, c.pidfile, c.listen) == ("/var/run/hastctl.sock", "/var/run/hast.pid", ("0.0.0.0",))
    assert (res.replication, res.checksum, res.compression) == ("async", "sha256", "lzf")
    assert (res.timeout, res.exec, res.metaflush) == (5, "/usr/local/sbin/hast.sh", False)


def test_empty_file_and_comments_only():
    for text in ("", "\n\n", "# nothing\n  # at all", "\t \n"):
        c = parse(text, "x", ("hasta",))
        assert c.resources == () and c.listen == const.DEFAULT_LISTEN


def test_no_node_names_is_fine_without_resources():
    c = parse("timeout 3\n", "x", ())
    assert c.node == "" and c.resources == ()


def test_comments_everywhere():
    res = only(
        """\
        #top
        resource r { # after a brace
        	on hasta {# no blank before it
        		local /dev/sdb# glued to a word
        		remote 10.0.0.2 # { braces } in comments are ignored
        	}
        }#end"""
    )
    assert (res.local, res.remote) == ("/dev/sdb", "10.0.0.2")


def test_layout_free_semicolons_and_crlf():
    one_line = "resource r { on hasta { local /dev/ad6; remote 172.16.0.2 } }"
    assert only(one_line).local == "/dev/ad6"
    assert only(MINIMAL.replace("\n", "\r\n")).remote == "10.0.0.2"
    assert only("resource\nr\n{\non\nhasta\n{\nlocal\n/x\nremote\nnone\n}\n}").local == "/x"


def test_words_that_contain_keywords_or_digits_are_strings():
    res = only("resource control2 { on hasta { local /dev/on; remote 10.0.0.2:8457 } name 1a }")
    assert (res.name, res.provname, res.local) == ("control2", "1a", "/dev/on")


@pytest.mark.parametrize(
    "option, value, parsed",
    [
        ("replication", "fullsync", "fullsync"),
        ("checksum", "crc32", "crc32"),
        ("compression", "none", "none"),
        ("timeout", "7", 7),
        ("exec", "/bin/hook", "/bin/hook"),
        ("hook_timeout", "9", 9),
        ("metaflush", "off", False),
    ],
)
def test_resource_options_fall_back_to_global_then_default(option, value, parsed):
    attr = option
    default = getattr(only(MINIMAL), attr)
    assert default != parsed
    # Global, wherever it is in the file.
    assert getattr(only(f"{option} {value}\n{MINIMAL}"), attr) == parsed
    assert getattr(only(f"{MINIMAL}{option} {value}\n"), attr) == parsed
    # Resource level beats global.
    at_resource = MINIMAL.replace("resource r {", f"resource r {{\n{option} {value}")
    assert getattr(only(at_resource), attr) == parsed
    # A later statement in the same block overrides an earlier one.
    twice = MINIMAL.replace("resource r {", f"resource r {{\n{option} {value}\n{option} {value}")
    assert getattr(only(twice), attr) == parsed


def test_resource_level_beats_global_for_each_option():
    res = only(
        "replication fullsync\nchecksum crc32\ncompression lzf\ntimeout 3\nexec /g\nhook_timeout 4\n"
        "metaflush off\n"
        + MINIMAL.replace(
            "resource r {",
            "resource r {\nreplication async\nchecksum sha256\ncompression none\ntimeout 30\n"
            "exec /r\nhook_timeout 40\nmetaflush on\n",
        )
    )
    assert (res.replication, res.checksum, res.compression, res.timeout) == ("async", "sha256", "none", 30)
    assert (res.exec, res.hook_timeout, res.metaflush) == ("/r", 40, True)


@pytest.mark.parametrize(
    "option, resource_value, node_value, default",
    [
        ("name", "prov1", "prov2", "r"),
        ("local", "/dev/sdc", "/dev/sdd", None),
        ("metaflush", "off", "on", True),
        ("attach", "fuse", "kernel", "auto"),
        ("devdir", "/run/hast1", "/run/hast2", "/dev/hast"),
    ],
)
def test_on_block_overrides_resource_level(option, resource_value, node_value, default):
    attr = "provname" if option == "name" else option

    def value_of(resource_stmt, mine_stmt, other_stmt):
        local = "" if option == "local" else "local /dev/sdb"
        text = f"""\
            resource r {{
            	{resource_stmt}
            	on hastb {{
            		{other_stmt}
            		remote 10.0.0.1
            	}}
            	on hasta {{
            		{mine_stmt}
            		remote 10.0.0.2
            		{local}
            	}}
            }}
            """
        return getattr(only(text), attr)

    typed = {"on": True, "off": False}
    want_resource = typed.get(resource_value, resource_value)
    want_node = typed.get(node_value, node_value)
    if default is not None:
        assert value_of("", "", "") == default
    assert value_of(f"{option} {resource_value}", "", f"{option} {node_value}") == want_resource
    assert value_of(f"{option} {resource_value}", f"{option} {node_value}", "") == want_node
    assert value_of("", f"{option} {node_value}", f"{option} {resource_value}") == want_node


def test_on_block_override_is_order_independent():
    res = only(
        "resource r { on hasta { remote none; local /a; metaflush off } local /b; metaflush on }"
    )
    assert (res.local, res.metaflush) == ("/a", False)


def test_global_metaflush_reaches_on_block_chain():
    assert only("metaflush off\n" + MINIMAL).metaflush is False


def test_listen_repeats_and_on_block_appends_in_file_order():
    c = conf(
        """\
        listen 10.0.0.1
        on hasta { listen 10.0.0.2:1 }
        listen tcp6://[fe80::1]:2
        on hastb { listen 10.9.9.9 }
        on hasta { listen tcp://host.example:3 }
        """
    )
    assert c.listen == ("10.0.0.1", "10.0.0.2:1", "tcp6://[fe80::1]:2", "tcp://host.example:3")
    only_on_block = conf("on hasta { listen 10.0.0.2 }")
    assert only_on_block.listen == ("10.0.0.2",)
    other_node_only = conf("on hastb { listen 10.0.0.2 }")
    assert other_node_only.listen == const.DEFAULT_LISTEN


def test_global_on_block_overrides_control_and_pidfile_wherever_it_is():
    text = """\
        on hasta {
        	control unix:///run/a.sock
        	pidfile /run/a.pid
        }
        on hastb { control /run/b.sock; pidfile /run/b.pid }
        control /run/global.sock
        pidfile /run/global.pid
        """
    a = conf(text, ("hasta",))
    assert (a.control, a.pidfile) == ("unix:///run/a.sock", "/run/a.pid")
    c = conf(text, ("hastc",))
    assert (c.control, c.pidfile) == ("/run/global.sock", "/run/global.pid")


def test_remote_none_and_source():
    res = only("resource r { on hasta { local /x; remote none; source 10.0.0.1 } }")
    assert (res.remote, res.source) == (const.REMOTE_NONE, "10.0.0.1")
    other = only("resource r { on hasta { local /x; remote none } on hastb { source 10.0.0.9 } }")
    assert other.source is None


def test_node_selection_by_each_name():
    text = dedent(HANDBOOK).replace("on hasta", "on {a}").replace("on hastb", "on {b}")
    for written in ("hasta.example.com", "hasta", MACHINE_ID, MACHINE_ID.upper()):
        c = parse(text.replace("{a}", written).replace("{b}", "hastb"), "f", NODE_NAMES)
        assert c.resources[0].remote == "172.16.0.2", written
    dashed = f"{MACHINE_ID[:8]}-{MACHINE_ID[8:12]}-{MACHINE_ID[12:16]}-{MACHINE_ID[16:20]}-{MACHINE_ID[20:]}"
    c = parse(text.replace("{a}", dashed.upper()).replace("{b}", "hastb"), "f", NODE_NAMES)
    assert c.resources[0].remote == "172.16.0.2"


def test_hostnames_compare_exactly_as_in_hastd():
    with pytest.raises(ConfigError, match="No resource test configuration"):
        parse(HANDBOOK.replace("hasta", "HASTA"), "f", ("hasta",))
    with pytest.raises(ConfigError):  # a short name only matches the part before the first '.'
        parse(HANDBOOK.replace("hasta", "hasta.example"), "f", NODE_NAMES)


def test_node_override_is_a_one_name_tuple():
    assert conf(HANDBOOK, ("hastb",)).resources[0].remote == "172.16.0.1"


def test_other_nodes_blocks_are_parsed_but_ignored():
    res = only(
        """\
        resource r {
        	on hastb { local /b; remote 10.0.0.1; source 10.0.0.2; name bb; metaflush off }
        	on hasta { local /a; remote 10.0.0.2 }
        	on hastc { attach none; devdir /c }
        }
        """
    )
    assert (res.local, res.provname, res.metaflush, res.source, res.attach) == ("/a", "r", True, None, "auto")


def test_several_on_blocks_for_this_node_merge():
    res = only("resource r { on hasta { local /a; remote none } on hasta { remote 10.0.0.5 } }")
    assert (res.local, res.remote) == ("/a", "10.0.0.5")


def test_hastpy_extensions():
    res = only(
        """\
        hook_timeout 120
        resource r {
        	attach fuse
        	devdir /run/lab/a/hast
        	on hasta { local /x; remote none; attach none }
        }
        """
    )
    assert (res.attach, res.devdir, res.hook_timeout) == ("none", "/run/lab/a/hast", 120)
    for mode in const.ATTACH_MODES:
        assert only(f"resource r {{ attach {mode}; on hasta {{ local /x; remote none }} }}").attach == mode


def test_several_resources_keep_file_order():
    text = HANDBOOK + HANDBOOK.replace("test", "second") + HANDBOOK.replace("test", "third")
    assert [r.name for r in conf(text).resources] == ["test", "second", "third"]


def test_limits_are_inclusive():
    name = "r" * const.MAX_NAME_LEN
    path = "/" + "p" * (const.MAX_PATH_LEN - 1)
    res = only(f"resource {name} {{ on hasta {{ local {path}; remote none }} }}")
    assert (len(res.name), len(res.local)) == (const.MAX_NAME_LEN, const.MAX_PATH_LEN)


# --- rejected files: exact line and the offending token ------------------------------------------


def test_unclosed_brace():
    err = fails(
        """\
        resource r {
        	on hasta {
        		local /x
        		remote none
        	}
        """
    )
    assert err.line == 5
    assert "missing '}' at end of file (block opened at line 1)" in err.reason
    assert fails("on hasta {\n\n").line == 2
    assert "opened at line 1" in fails("on hasta {").reason


def test_extra_closing_brace():
    err = fails("timeout 5\n}\nresource r {}\n")
    assert err.line == 2 and "unexpected '}'" in err.reason
    err = fails(MINIMAL + "\n}\n")
    assert err.line == 8


def test_unknown_keyword():
    err = fails("# comment\nreplication async\nbogus 5\n")
    assert err.line == 3
    assert err.reason.startswith("unknown keyword 'bogus': expected a statement (control, pidfile")
    err = fails("resource r {\n\tlocal /x\n\tremotee 10.0.0.1\n}")
    assert err.line == 3 and "'remotee'" in err.reason and "expected a statement (name, local" in err.reason


@pytest.mark.parametrize("token", ["memsync", "none", "12", "{", "off"])
def test_non_statement_token_where_a_statement_belongs(token):
    err = fails(f"timeout 1\n{token}\n")
    assert err.line == 2 and err.reason.startswith(f"unexpected '{token}': expected a statement")


def test_resource_without_local():
    err = fails("timeout 1\n\nresource r {\n\ton hasta {\n\t\tremote none\n\t}\n}\n")
    assert err.line == 3 and "resource 'r' has no 'local'" in err.reason
    # The other node's local does not count.
    err = fails("resource r {\n\ton hastb { local /x }\n\ton hasta { remote none }\n}\n")
    assert err.line == 1 and "'local'" in err.reason


def test_resource_without_remote():
    err = fails("\nresource r {\n\tlocal /x\n\ton hasta {\n\t}\n\ton hastb { remote 1.2.3.4 }\n}\n")
    assert err.line == 2 and "resource 'r' has no 'remote'" in err.reason


def test_resource_without_on_block_for_this_node():
    err = fails("timeout 3\n" + HANDBOOK, ("hastc.example.com", "hastc", MACHINE_ID))
    assert err.line == 2
    assert err.reason == (
        "No resource test configuration for this node "
        f"(acceptable node names: hastc.example.com, hastc, {MACHINE_ID})."
    )
    assert "acceptable node names: none" in fails("resource r { local /x }", ()).reason


def test_duplicate_resource():
    err = fails(HANDBOOK + "\n\nresource\ntest {\n}\n")
    assert err.line == 14
    assert err.reason == "duplicate resource 'test' (first defined at line 1)"


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("timeout abc", 1, "timeout must be a whole number of seconds, not 'abc'"),
        ("\ntimeout\n\n/x", 4, "timeout must be a whole number of seconds, not '/x'"),
        ("timeout 0", 1, "timeout must be greater than 0, not '0'"),
        ("timeout 000", 1, "greater than 0, not '000'"),
        ("hook_timeout 0", 1, "hook_timeout must be greater than 0"),
        ("timeout 2147483648", 1, "at most 2147483647 seconds"),
        ("timeout " + "9" * 5000, 1, "at most 2147483647 seconds, not '99999"),
        ("timeout none", 1, "timeout must be a whole number of seconds, not 'none'"),
    ],
)
def test_bad_numbers(text, line, fragment):
    err = fails(text)
    assert err.line == line and fragment in err.reason


def test_long_digit_strings_with_leading_zeros_are_fine():
    assert only("timeout 00000000000000000000000042\n" + MINIMAL).timeout == 42


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("resource listen {", 1, "invalid resource name 'listen': it is a keyword"),
        ("resource\n\nnone {", 3, "'none': it is a keyword"),
        ("resource 123 {", 1, "invalid resource name '123': a name cannot be all digits"),
        ("resource r {\n on 42 {", 2, "invalid node name '42': a name cannot be all digits"),
        ("on hook_timeout { }", 1, "invalid node name 'hook_timeout': it is a keyword"),
        ("resource attach { }", 1, "'attach': it is a keyword"),
        ("resource r {\n name on\n}", 2, "'name' needs a provider name, not the keyword 'on'"),
        ("resource r {\n local 123\n}", 2, "'local' needs a path, not the number '123'"),
        ("exec off", 1, "'exec' needs a path, not the keyword 'off'"),
        ("resource r {\n on hasta { remote 8457 } }", 2, "not the number '8457'"),
    ],
)
def test_keywords_and_numbers_are_not_names(text, line, fragment):
    err = fails(text)
    assert err.line == line and fragment in err.reason


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        (
            "resource r {\n\tremote 10.0.0.1\n}",
            2,
            "'remote' is not allowed in a resource block, only in a resource's 'on' block",
        ),
        ("resource r {\n\tsource 10.0.0.1\n}", 2, "'source' is not allowed in a resource block"),
        (
            "resource r {\n\tcontrol /x\n}",
            2,
            "'control' is not allowed in a resource block, only at the top level or in a top-level 'on' block",
        ),
        ("resource r {\n\tpidfile /x\n}", 2, "'pidfile' is not allowed in a resource block"),
        ("resource r {\n\tlisten 1.2.3.4\n}", 2, "'listen' is not allowed in a resource block"),
        ("resource r {\n\tresource s {\n}}", 2, "'resource' is not allowed in a resource block"),
        ("remote 10.0.0.1", 1, "'remote' is not allowed at the top level"),
        (
            "local /x",
            1,
            "'local' is not allowed at the top level, only in a resource block or in a resource's 'on' block",
        ),
        ("name x", 1, "'name' is not allowed at the top level"),
        ("attach fuse", 1, "'attach' is not allowed at the top level"),
        ("devdir /d", 1, "'devdir' is not allowed at the top level"),
        ("on hasta {\n\ttimeout 5\n}", 2, "'timeout' is not allowed in a top-level 'on' block"),
        ("on hasta {\n\tmetaflush on\n}", 2, "'metaflush' is not allowed in a top-level 'on' block"),
        ("on hasta {\n\ton hastb {}\n}", 2, "'on' is not allowed in a top-level 'on' block"),
        ("resource r {\n on hasta {\n  timeout 5 } }", 3, "'timeout' is not allowed in a resource's"),
        ("resource r {\n on hasta {\n  hook_timeout 5 } }", 3, "'hook_timeout' is not allowed in a"),
        ("resource r {\n on hasta {\n  on hastb { } } }", 3, "'on' is not allowed in a resource's"),
    ],
)
def test_statement_at_wrong_depth(text, line, fragment):
    err = fails(text)
    assert err.line == line and fragment in err.reason


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("replication sync", 1, "replication must be one of fullsync, memsync, async, not 'sync'"),
        ("checksum md5", 1, "checksum must be one of none, crc32, sha256, not 'md5'"),
        ("compression gzip", 1, "compression must be one of none, hole, lzf, not 'gzip'"),
        ("metaflush yes", 1, "metaflush must be one of on, off, not 'yes'"),
        ("metaflush 1", 1, "not '1'"),
        ("resource r {\n attach loop }", 2, "attach must be one of auto, kernel, fuse, none, not 'loop'"),
        ("resource r {\n devdir dev/hast }", 2, "devdir must be an absolute path, not 'dev/hast'"),
        ("resource r {\n name a/b }", 2, "invalid provider name 'a/b'"),
        ("resource r {\n name .. }", 2, "invalid provider name '..'"),
        ("resource a/b {", 1, "invalid resource name 'a/b'"),
        ("resource . {", 1, "invalid resource name '.'"),
    ],
)
def test_bad_values(text, line, fragment):
    err = fails(text)
    assert err.line == line and fragment in err.reason


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("timeout", 1, "missing a number of seconds after 'timeout'"),
        ("replication\n}", 1, "missing a value (fullsync, memsync, async) after 'replication'"),
        ("resource r {\n local\n}", 2, "missing a path after 'local'"),
        ("resource r {\n on hasta {\n remote }}", 3, "missing an address after 'remote'"),
        ("resource", 1, "missing a resource name after 'resource'"),
        ("resource {", 1, "missing a resource name after 'resource'"),
        ("on\n{", 1, "missing a node name after 'on'"),
        ("resource r\n\nlocal /x", 3, "expected '{' after 'r', not 'local'"),
        ("on hasta", 1, "expected '{' after 'hasta', not 'end of file'"),
    ],
)
def test_missing_operands(text, line, fragment):
    err = fails(text)
    assert err.line == line and fragment in err.reason


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        (
            "listen 10.0.0.1:99999",
            1,
            "listen: invalid address '10.0.0.1:99999': port must be a number from 1 to 65535, not '99999'",
        ),
        ("listen 10.0.0.1:0", 1, "not '0'"),
        ("listen fe80::1:8457:", 1, "is not an IPv6 address"),
        ("listen tcp6://10.0.0.1", 1, "'10.0.0.1' is an IPv4 address, but the scheme asks for IPv6"),
        ("listen uds:///x", 1, "listen: invalid address 'uds:///x': 'uds://' is not tcp://"),
        ("\n\ncontrol tcp://10.0.0.1", 3, "control: invalid address 'tcp://10.0.0.1'"),
        ("control uds://relative", 1, "must be absolute"),
        ("control /" + "s" * 107, 1, "limited to 107 bytes"),
        ("resource r {\n on hasta {\n  local /x\n  remote tcp4://[::1]:80 } }", 4, "remote: invalid address"),
        ("resource r {\n on hastb {\n  source [::1 } }", 3, "source: invalid address '[::1'"),
        ("listen " + "a" * (const.MAX_ADDR_LEN + 1), 1, f"longer than {const.MAX_ADDR_LEN} bytes"),
        ("resource " + "r" * 256 + " {", 1, "resource name 'rrrrr"),
        ("pidfile /" + "p" * const.MAX_PATH_LEN, 1, f"is longer than {const.MAX_PATH_LEN} bytes"),
    ],
)
def test_bad_addresses_and_lengths(text, line, fragment):
    err = fails(text)
    assert err.line == line and fragment in err.reason


def test_long_tokens_are_cut_in_messages():
    err = fails("bogus" + "x" * 5000)
    assert len(str(err)) < 400 and "'bogusxxx" in err.reason and "...'" in err.reason


@pytest.mark.parametrize("char", ['"', "'", "=", "\\", "\x00", "é", "\u0663", "\f", "*", "(", ","])
def test_unknown_characters(char):
    err = fails(f"timeout 1\n\nlocal{char}x\n")
    assert err.line == 3 and f"unexpected character {char!r}" in err.reason


def test_quoted_value_is_rejected_with_a_reason():
    err = fails('resource r {\n\ton hasta {\n\t\tlocal "/dev/ad6"\n')
    assert err.line == 3 and "no quoting" in err.reason


# --- address helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr, default, expected",
    [
        ("10.0.0.1", 8457, (socket.AF_UNSPEC, "10.0.0.1", 8457)),
        ("10.0.0.1:7000", 8457, (socket.AF_UNSPEC, "10.0.0.1", 7000)),
        ("tcp://host.example:1", 8457, (socket.AF_UNSPEC, "host.example", 1)),
        ("TCP4://0.0.0.0:8457", 8457, (socket.AF_INET, "0.0.0.0", 8457)),
        ("tcp4://node-b", 8457, (socket.AF_INET, "node-b", 8457)),
        ("tcp6://[::]:8457", 8457, (socket.AF_INET6, "::", 8457)),
        ("tcp6://[::1]", 8457, (socket.AF_INET6, "::1", 8457)),
        ("tcp6://fe80::1", 8457, (socket.AF_INET6, "fe80::1", 8457)),
        ("::1:8457", 8457, (socket.AF_UNSPEC, "::1:8457", 8457)),  # no brackets: all address
        ("[2001:db8::7]:65535", 8457, (socket.AF_UNSPEC, "2001:db8::7", 65535)),
        ("10.0.0.1", 0, (socket.AF_UNSPEC, "10.0.0.1", 0)),  # `source` without a port
        ("h_1.example.", 8457, (socket.AF_UNSPEC, "h_1.example.", 8457)),
        ("10.0.0.1:08457", 8457, (socket.AF_UNSPEC, "10.0.0.1", 8457)),
    ],
)
def test_parse_tcp_address(addr, default, expected):
    assert parse_tcp_address(addr, default) == expected


@pytest.mark.parametrize(
    "addr, fragment",
    [
        ("", "no host"),
        ("tcp://", "no host"),
        (":8457", "no host"),
        ("[]:1", "no host"),
        ("[10.0.0.1]:1", "'10.0.0.1' is not an IPv6 address"),
        ("[::1]x", "unexpected 'x' after ']'"),
        ("[::1", "'[' without a matching ']'"),
        ("host:", "port must be a number from 1 to 65535, not ''"),
        ("host:http", "not 'http'"),
        ("host:65536", "not '65536'"),
        ("host:-1", "not '-1'"),
        ("host:" + "0" * 900 + "1" * 90, "port must be a number"),
        ("host:\u0661", "port must be a number"),
        ("a:b:c", "'a:b:c' is not an IPv6 address"),
        ("/dev/x", "neither a host name nor an IP address"),
        ("-host", "neither a host name nor an IP address"),
        ("host-", "neither a host name nor an IP address"),
        ("tcp4://[::1]", "'::1' is an IPv6 address, but the scheme asks for IPv4"),
        ("tcp6://127.0.0.1:1", "is an IPv4 address, but the scheme asks for IPv6"),
        ("udp://10.0.0.1", "'udp://' is not tcp://, tcp4:// or tcp6://"),
        ("h" * 256, f"the host is longer than {const.MAX_HOST_LEN} bytes"),
        ("h" * 2000, f"longer than {const.MAX_ADDR_LEN} bytes"),
    ],
)
def test_parse_tcp_address_rejects(addr, fragment):
    with pytest.raises(ConfigError) as info:
        parse_tcp_address(addr)
    assert fragment in info.value.reason
    assert info.value.path is None and info.value.line is None


@pytest.mark.parametrize(
    "addr, path",
    [
        ("uds:///var/run/hastctl", "/var/run/hastctl"),
        ("UNIX:///run/x", "/run/x"),
        ("unix:///run/x", "/run/x"),
        ("/run/hastctl", "/run/hastctl"),
        ("/" + "s" * 106, "/" + "s" * 106),
    ],
)
def test_parse_control_address(addr, path):
    assert parse_control_address(addr) == path


@pytest.mark.parametrize(
    "addr, fragment",
    [
        ("tcp://1.2.3.4", "expected uds:///path, unix:///path or /path"),
        ("/x://y", "expected uds:///path"),
        ("run/x", "expected uds:///path"),
        ("uds://", "must be absolute"),
        ("uds://run/x", "must be absolute"),
        ("/a\0b", "must be absolute"),
        ("/" + "s" * 107, "limited to 107 bytes"),
        ("/" + "\u00e9" * 60, "limited to 107 bytes"),  # bytes, not characters
    ],
)
def test_parse_control_address_rejects(addr, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_control_address(addr)


# --- the sample, load() and local_node_names() --------------------------------------------------


def test_sample_is_valid_on_both_nodes_and_shows_every_statement():
    path = REPO / "hast.conf.sample"
    a = load(str(path), ("hasta",))
    b = load(str(path), ("hastb",))
    assert [r.name for r in a.resources] == [r.name for r in b.resources] == ["shared", "alone"]
    assert a.resources[0].remote != b.resources[0].remote
    assert a.listen != b.listen
    words = set()
    for line in path.read_text().splitlines():
        words.update(line.split("#", 1)[0].split())
    statements = {w for depth in cfg._ALLOWED.values() for w in depth}
    assert statements <= words
    assert set(const.ATTACH_MODES) & words and "none" in words


def test_load_defaults_to_local_node_names(tmp_path, monkeypatch):
    path = tmp_path / "hast.conf"
    path.write_text(HANDBOOK.replace("hasta", "thisnode"))
    monkeypatch.setattr(cfg, "local_node_names", lambda: ("thisnode",))
    c = load(str(path))
    assert c.path == str(path) and c.resources[0].remote == "172.16.0.2"


def test_load_reports_unreadable_file(tmp_path):
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        load(missing, ("hasta",))
    assert info.value.path == missing and info.value.line is None
    assert "cannot read" in str(info.value) and str(info.value).startswith(missing + ": ")


@pytest.mark.parametrize("what", ["directory", "device"])
def test_load_refuses_what_is_not_a_file(tmp_path, what):
    path = str(tmp_path) if what == "directory" else "/dev/zero"  # /dev/zero: endless, never read
    with pytest.raises(ConfigError) as info:
        load(path, ("hasta",))
    assert info.value.path == path and info.value.line is None
    assert ("Is a directory" if what == "directory" else "not a regular file") in info.value.reason


def test_load_refuses_a_file_over_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(cfg, "MAX_CONFIG_SIZE", 1024)
    path = tmp_path / "hast.conf"
    path.write_text(HANDBOOK + "#" * 1024)
    with pytest.raises(ConfigError) as info:
        load(str(path), ("hasta",))
    assert "not a configuration file" in info.value.reason
    exact = HANDBOOK + "#" * (1024 - len(HANDBOOK.encode()))  # at the limit: accepted
    path.write_text(exact)
    assert load(str(path), ("hasta",)).resources[0].remote == "172.16.0.2"


@pytest.mark.parametrize("kind", ["fifo", "pipe"])
def test_load_refuses_a_pipe_without_waiting_for_it(tmp_path, kind):
    """A FIFO with no writer would block hastd's loop (SIGHUP) forever, and read as a file of no
    resources once a writer came and went."""
    if kind == "fifo":
        path = str(tmp_path / "hast.conf")
        os.mkfifo(path)
        fds = ()
    else:
        fds = os.pipe()
        path = f"/proc/self/fd/{fds[0]}"
    try:
        with pytest.raises(ConfigError, match="not a regular file"):
            load(path, ("hasta",))
    finally:
        for fd in fds:
            os.close(fd)


def test_load_reports_undecodable_bytes_as_a_character_error(tmp_path):
    path = tmp_path / "hast.conf"
    path.write_bytes(b"timeout 1\nlocal \xff\n")
    with pytest.raises(ConfigError) as info:
        load(str(path), ("hasta",))
    assert info.value.line == 2 and "unexpected character" in info.value.reason


def test_local_node_names(tmp_path, monkeypatch):
    machine_id = tmp_path / "machine-id"
    machine_id.write_text(MACHINE_ID + "\n")
    monkeypatch.setattr(const, "MACHINE_ID_PATH", str(machine_id))
    monkeypatch.setattr(socket, "gethostname", lambda: "hasta.example.com")
    assert local_node_names() == ("hasta.example.com", "hasta", MACHINE_ID)
    monkeypatch.setattr(socket, "gethostname", lambda: "hasta")
    assert local_node_names() == ("hasta", MACHINE_ID)
    machine_id.unlink()
    assert local_node_names() == ("hasta",)
    machine_id.write_text("")
    assert local_node_names() == ("hasta",)


# --- properties ----------------------------------------------------------------------------------

_WORD_TAIL = string.ascii_letters + string.digits + "._:-[]"


def _is_name(text):
    return text not in KEYWORDS


names = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(string.ascii_letters + "_"),
    st.text(_WORD_TAIL, max_size=20),
).filter(_is_name)
path_parts = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12)
paths = st.lists(path_parts, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
ports = st.integers(1, const.MAX_PORT)
hostnames = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z][a-z0-9]{0,8}){0,2}", fullmatch=True)
tcp_addresses = st.one_of(
    st.builds(lambda ip: str(ip), st.ip_addresses(v=4)),
    st.builds(lambda ip, port: f"{ip}:{port}", st.ip_addresses(v=4), ports),
    st.builds(lambda ip, port: f"tcp4://{ip}:{port}", st.ip_addresses(v=4), ports),
    st.builds(lambda ip, port: f"tcp6://[{ip}]:{port}", st.ip_addresses(v=6), ports),
    st.builds(lambda ip, port: f"[{ip}]:{port}", st.ip_addresses(v=6), ports),
    st.builds(lambda ip: f"tcp://{ip}", st.ip_addresses(v=6)),
    st.builds(lambda host, port: f"tcp://{host}:{port}", hostnames, ports),
    hostnames,
)
control_addresses = st.builds(
    lambda scheme, path: scheme + path, st.sampled_from(["", "uds://", "unix://", "UDS://"]), paths
)
resources = st.builds(
    Resource,
    name=names,
    provname=names,
    local=paths,
    remote=st.one_of(st.just(const.REMOTE_NONE), tcp_addresses),
    source=st.none() | tcp_addresses,
    replication=st.sampled_from(const.REPLICATION_MODES),
    checksum=st.sampled_from(const.CHECKSUM_ALGORITHMS),
    compression=st.sampled_from(const.COMPRESSION_ALGORITHMS),
    timeout=st.integers(1, const.MAX_TIMEOUT),
    exec=st.none() | paths,
    metaflush=st.booleans(),
    attach=st.sampled_from(const.ATTACH_MODES),
    devdir=paths,
    hook_timeout=st.integers(1, const.MAX_TIMEOUT),
)
configs = st.builds(
    Config,
    path=st.just("gen.conf"),
    node_names=st.lists(names, min_size=1, max_size=3).map(tuple),
    control=control_addresses,
    pidfile=paths,
    listen=st.lists(tcp_addresses, min_size=1, max_size=4).map(tuple),
    resources=st.lists(resources, max_size=4, unique_by=lambda r: r.name).map(tuple),
)


@given(configs)
def test_render_parses_back_to_an_equal_config(config):
    assert parse(render(config), config.path, config.node_names) == config


@given(configs)
def test_render_of_parsed_is_stable(config):
    text = render(config)
    assert render(parse(text, config.path, config.node_names)) == text


def _parse_or_config_error(text, names=("hasta",)):
    try:
        result = parse(text, "fuzz.conf", names)
    except ConfigError as err:
        assert err.path == "fuzz.conf"
        assert 1 <= err.line <= max(1, text.count("\n") + 1)
        return err
    assert isinstance(result, Config)
    return result


@given(st.text())
def test_random_text_gives_config_or_config_error(text):
    _parse_or_config_error(text)


soup = st.lists(
    st.sampled_from(
        sorted(KEYWORDS)
        + ["{", "}", "\n", "#c\n", ";", '"', "hasta", "hastb", "r", "123", "0", "/dev/x", "10.0.0.1"]
        + ["[::1]:80", "x:y", "uds:///s", "tcp6://[::]", "::1:1", "\r\n", "\t"]
    ),
    max_size=60,
).map(" ".join)


@given(soup)
@settings(max_examples=300)
def test_token_soup_gives_config_or_config_error(text):
    _parse_or_config_error(text)


@given(configs, st.data())
def test_damaged_valid_files_give_config_or_config_error(config, data):
    lines = render(config).splitlines(keepends=True)
    index = data.draw(st.integers(0, len(lines) - 1))
    action = data.draw(st.sampled_from(["drop", "repeat", "swap"]))
    if action == "drop":
        del lines[index]
    elif action == "repeat":
        lines.insert(index, lines[index])
    else:
        other = data.draw(st.integers(0, len(lines) - 1))
        lines[index], lines[other] = lines[other], lines[index]
    _parse_or_config_error("".join(lines), config.node_names)


@given(st.text(max_size=80), st.integers(0, const.MAX_PORT))
def test_address_helpers_raise_only_config_error(text, port):
    for call in (lambda: parse_tcp_address(text, port), lambda: parse_control_address(text)):
        try:
            call()
        except ConfigError:
            pass
