"""Generic netlink messages for the nbd driver: exact bytes out, tolerant-but-safe parsing in.

Expected bytes are written out by hand from include/uapi/linux/{netlink,genetlink,nbd-netlink}.h:
nlmsghdr (len u32, type u16, flags u16, seq u32, port u32), genlmsghdr (cmd u8, version u8,
reserved u16), nlattr (len u16, type u16, payload padded to 4). Netlink is host-endian; these
literals are little-endian, the byte order of every machine we run on.
"""

import errno
import os
import socket
import sys

import pytest

from hastpy.attach import netlink as nl

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="literals are little-endian")


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# --- attributes -------------------------------------------------------------------------------


def test_align():
    assert [nl.align(n) for n in (0, 1, 2, 3, 4, 5, 8, 9)] == [0, 4, 4, 4, 4, 8, 8, 12]


def test_integer_attributes():
    assert nl.attr_u8(1, 0xFF) == h("0500 0100 ff000000")
    assert nl.attr_u16(1, 0x1A) == h("0600 0100 1a00 0000")
    assert nl.attr_u32(1, 5) == h("0800 0100 05000000")
    assert nl.attr_u64(2, 0x40000000) == h("0c00 0200 00000040 00000000")


def test_string_attribute_is_nul_terminated_and_padded():
    # "ab\0" is 3 bytes: nla_len 7 (unpadded), one byte of padding.
    assert nl.attr_str(2, "ab") == h("0700 0200 616200 00")
    assert nl.attr_str(2, "nbd") == h("0800 0200 6e626400")


def test_nested_attribute_sets_nla_f_nested():
    inner = nl.attr_u32(nl.NBD_SOCK_FD, 5)
    item = nl.attr_nested(nl.NBD_SOCK_ITEM, [inner])
    assert item == h("0c00 0180 0800 0100 05000000")
    outer = nl.attr_nested(nl.NBD_ATTR_SOCKETS, [item])
    assert outer == h("1000 0780 0c00 0180 0800 0100 05000000")


def test_attribute_too_long():
    with pytest.raises(ValueError):
        nl.attr(1, bytes(0xFFFF))


# --- requests ---------------------------------------------------------------------------------


def test_get_family_request():
    assert nl.get_family_request("nbd", seq=1) == h(
        "1c000000 1000 0500 01000000 00000000"  # len 28, GENL_ID_CTRL, REQUEST|ACK, seq 1, port 0
        "03 02 0000"  # CTRL_CMD_GETFAMILY, version 2
        "0800 0200 6e626400"  # CTRL_ATTR_FAMILY_NAME "nbd\0"
    )


CONNECT_ATTRS = (
    "0c00 0200 00000040 00000000"  # NBD_ATTR_SIZE_BYTES 1 GiB
    "0c00 0300 00020000 00000000"  # NBD_ATTR_BLOCK_SIZE_BYTES 512
    "0c00 0400 00000000 00000000"  # NBD_ATTR_TIMEOUT 0
    "0c00 0500 6d000000 00000000"  # NBD_ATTR_SERVER_FLAGS HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES
    "1000 0780 0c00 0180 0800 0100 05000000"  # NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD 5 } }
    "0c00 0800 1e000000 00000000"  # NBD_ATTR_DEAD_CONN_TIMEOUT 30
)


def test_nbd_connect_request():
    msg = nl.nbd_connect_request(
        0x1A, 7, size=1 << 30, block_size=512, server_flags=0x6D, timeout=0, dead_conn_timeout=30, sockets=[5]
    )
    assert msg == h("60000000 1a00 0500 07000000 00000000" "01 01 0000" + CONNECT_ATTRS)
    assert len(msg) == 0x60  # 16 header + 4 genl + 4 * 12 + 16 sockets + 12


def test_nbd_connect_request_with_index_and_backend():
    msg = nl.nbd_connect_request(
        0x1A,
        7,
        size=1 << 30,
        block_size=512,
        server_flags=0x6D,
        timeout=0,
        dead_conn_timeout=30,
        sockets=[5],
        index=3,
        client_flags=0,
        backend_id="h:x",
    )
    assert msg == h(
        "7c000000 1a00 0500 07000000 00000000 01 01 0000"
        "0800 0100 03000000"  # NBD_ATTR_INDEX 3 (first, as in the enum)
        "0c00 0200 00000040 00000000"
        "0c00 0300 00020000 00000000"
        "0c00 0400 00000000 00000000"
        "0c00 0500 6d000000 00000000"
        "0c00 0600 00000000 00000000"  # NBD_ATTR_CLIENT_FLAGS 0
        "1000 0780 0c00 0180 0800 0100 05000000"
        "0c00 0800 1e000000 00000000"
        "0800 0a00 683a7800"  # NBD_ATTR_BACKEND_IDENTIFIER "h:x\0"
    )


def test_nbd_connect_request_several_sockets():
    msg = nl.nbd_connect_request(
        0x1A, 1, size=4096, block_size=4096, server_flags=1, timeout=0, dead_conn_timeout=0, sockets=[5, 6]
    )
    sockets = h("1c00 0780 0c00 0180 0800 0100 05000000 0c00 0180 0800 0100 06000000")
    assert sockets in msg
    with pytest.raises(ValueError):
        nl.nbd_connect_request(1, 1, size=1, block_size=512, server_flags=0, timeout=0, dead_conn_timeout=0, sockets=[])


def test_nbd_disconnect_request():
    assert nl.nbd_disconnect_request(0x1A, 9, 3) == h(
        "1c000000 1a00 0500 09000000 00000000 02 01 0000 0800 0100 03000000"
    )


# --- replies ----------------------------------------------------------------------------------

NEWFAMILY = h(
    "24000000 1000 0000 01000000 d2040000"  # len 36, GENL_ID_CTRL, seq 1, port 1234
    "01 02 0000"  # CTRL_CMD_NEWFAMILY
    "0800 0200 6e626400"  # CTRL_ATTR_FAMILY_NAME "nbd"
    "0600 0100 1a00 0000"  # CTRL_ATTR_FAMILY_ID 0x1a (u16, padded)
)
ACK_1 = h("24000000 0200 0001 01000000 d2040000 00000000" "1c000000 1000 0500 01000000 00000000")
CONNECT_REPLY = h("1c000000 1a00 0000 07000000 00000000 01 01 0000 0800 0100 02000000")
ACK_7 = h("24000000 0200 0001 07000000 00000000 00000000" "60000000 1a00 0500 07000000 00000000")


def test_parse_messages_splits_a_datagram():
    msgs = nl.parse_messages(NEWFAMILY + ACK_1)
    assert [(m.type, m.flags, m.seq, m.port) for m in msgs] == [(0x10, 0, 1, 1234), (2, 0x100, 1, 1234)]
    assert msgs[0].payload == NEWFAMILY[16:]


def test_family_id_and_ack():
    replies, finished = nl.collect_replies(nl.parse_messages(NEWFAMILY + ACK_1), seq=1)
    assert finished and len(replies) == 1
    assert nl.family_id(replies) == 0x1A
    reply = nl.parse_genl(replies[0])
    assert reply.cmd == nl.CTRL_CMD_NEWFAMILY
    assert nl.string(reply.attrs[nl.CTRL_ATTR_FAMILY_NAME]) == "nbd"


def test_reply_and_ack_may_arrive_in_separate_datagrams():
    replies, finished = nl.collect_replies(nl.parse_messages(CONNECT_REPLY), seq=7)
    assert not finished
    more, finished = nl.collect_replies(nl.parse_messages(ACK_7), seq=7)
    assert finished and more == []
    assert nl.connect_index(replies, 0x1A) == 2


def test_other_sequence_numbers_and_noops_are_ignored():
    noop = nl.message(nl.NLMSG_NOOP, 0, 7, b"")
    replies, finished = nl.collect_replies(nl.parse_messages(NEWFAMILY + noop + CONNECT_REPLY), seq=7)
    assert [m.type for m in replies] == [0x1A] and not finished


def test_done_finishes():
    done = nl.message(nl.NLMSG_DONE, nl.NLM_F_MULTI, 4, bytes(4))
    assert nl.collect_replies(nl.parse_messages(done), seq=4) == ([], True)


def test_error_with_extended_ack_capped():
    # ENOENT, capped copy of our header, then NLMSGERR_ATTR_MSG "no".
    data = h("2c000000 0200 0003 01000000 00000000 feffffff" "1c000000 1000 0500 01000000 00000000" "0700 0100 6e6f00 00")
    err = nl.parse_error(nl.parse_messages(data)[0])
    assert err == nl.ErrorReply(errno.ENOENT, "no")
    with pytest.raises(nl.NetlinkError) as info:
        nl.collect_replies(nl.parse_messages(data), seq=1, what="looking up")
    assert info.value.errno == errno.ENOENT and info.value.reason == "no"
    assert "looking up failed" in str(info.value) and info.value.exit_code == os.EX_OSERR


def test_error_with_extended_ack_uncapped_skips_the_whole_request_copy():
    request = nl.nbd_disconnect_request(0x1A, 9, 3)  # 28 bytes, echoed whole
    tlv = nl.attr_str(nl.NLMSGERR_ATTR_MSG, "bad index")
    data = nl.message(nl.NLMSG_ERROR, nl.NLM_F_ACK_TLVS, 9, h("eaffffff") + request + tlv)
    assert nl.parse_error(nl.parse_messages(data)[0]) == nl.ErrorReply(errno.EINVAL, "bad index")


def test_error_without_tlvs():
    data = nl.message(nl.NLMSG_ERROR, 0, 3, h("f0ffffff") + bytes(16))
    assert nl.parse_error(nl.parse_messages(data)[0]) == nl.ErrorReply(errno.EBUSY, None)
    with pytest.raises(ValueError):
        nl.parse_error(nl.parse_messages(NEWFAMILY)[0])


def test_nested_attributes_parse_with_flag_bits_masked():
    outer = nl.attr_nested(nl.NBD_ATTR_SOCKETS, [nl.attr_nested(nl.NBD_SOCK_ITEM, [nl.attr_u32(1, 5)])])
    [(kind, payload)] = nl.parse_attrs(outer)
    assert kind == nl.NBD_ATTR_SOCKETS
    [(item_kind, item)] = nl.parse_attrs(payload)
    assert item_kind == nl.NBD_SOCK_ITEM
    assert nl.u32(nl.attrs_dict(item)[nl.NBD_SOCK_FD]) == 5


@pytest.mark.parametrize(
    "data",
    [
        h("1000 0000"),  # shorter than a header
        h("ff000000 1000 0000 01000000 00000000"),  # length past the end
        h("08000000 1000 0000 01000000 00000000"),  # length shorter than the header
        NEWFAMILY + h("0102"),  # stray bytes after the last message
    ],
)
def test_malformed_messages_raise(data):
    with pytest.raises(nl.NetlinkDecodeError):
        nl.parse_messages(data)


def test_malformed_attributes_raise():
    with pytest.raises(nl.NetlinkDecodeError):
        nl.parse_attrs(h("ff00 0100 00000000"))
    with pytest.raises(nl.NetlinkDecodeError):
        nl.parse_attrs(h("0200 0100"))
    with pytest.raises(nl.NetlinkDecodeError):
        nl.parse_attrs(h("0800 0100 00000000 0102"))
    assert nl.parse_attrs(h("0800 0100 00000000 0000")) == [(1, bytes(4))]  # zero tail: padding
    with pytest.raises(nl.NetlinkDecodeError):
        nl.u32(b"\x01\x02")


def test_missing_answers_raise():
    with pytest.raises(nl.NetlinkDecodeError):
        nl.family_id(nl.parse_messages(CONNECT_REPLY))
    with pytest.raises(nl.NetlinkDecodeError):
        nl.connect_index(nl.parse_messages(NEWFAMILY), 0x1A)
    with pytest.raises(nl.NetlinkDecodeError):
        nl.parse_genl(nl.Message(0x1A, 0, 1, 0, b"\x01"))


# --- against the running kernel (generic netlink exists everywhere; the nbd family may not) ---


def _netlink_available() -> bool:
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_GENERIC).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _netlink_available(), reason="no AF_NETLINK generic sockets")
def test_resolve_family_against_the_kernel():
    from hastpy.attach.kernel import resolve_family

    assert resolve_family("nlctrl") == nl.GENL_ID_CTRL
    with pytest.raises(nl.NetlinkError) as info:
        resolve_family("nohastpyfam")  # GENL_NAMSIZ is 16: longer names fail validation
    assert info.value.errno == errno.ENOENT
    with pytest.raises(nl.NetlinkError) as info:
        resolve_family("x" * 40)  # refused by the controller's policy, with an extended ack
    assert info.value.errno == errno.EINVAL


@pytest.mark.skipif(os.path.exists("/dev/nbd0") or os.path.isdir("/sys/module/nbd"), reason="nbd driver present")
def test_kernel_not_usable_without_the_driver():
    from hastpy.attach import choose_method, kernel_usable

    assert kernel_usable() is False
    assert choose_method("auto") == "fuse"
