"""Defaults and limits shared across hastpy, each mirrored from FreeBSD's hast.h or explained.

Numbers here are part of the on-disk and wire formats or of user-visible defaults; change one only
together with the format or documentation that depends on it.
"""

# hast.conf and daemon defaults (hast.conf(5), hastd(8)).
DEFAULT_CONFIG = "/etc/hast.conf"
DEFAULT_CONTROL = "uds:///var/run/hastctl"
DEFAULT_PIDFILE = "/var/run/hastd.pid"
DEFAULT_PORT = 8457  # Makefile -DPROTO_TCP_DEFAULT_PORT in sbin/hastd
DEFAULT_LISTEN = ("tcp4://0.0.0.0:8457", "tcp6://[::]:8457")
DEFAULT_REPLICATION = "memsync"  # hastd's default since FreeBSD 9.1
DEFAULT_CHECKSUM = "none"
DEFAULT_COMPRESSION = "hole"
DEFAULT_TIMEOUT = 20  # seconds; socket send/receive timeout
DEFAULT_METAFLUSH = True

# Grammar limits (parse.y): addresses fit in 1024 bytes, names in NAME_MAX.
MAX_ADDR_LEN = 1024
MAX_NAME_LEN = 255

# On-disk layout (metadata.h, hastctl.c).
METADATA_SIZE = 4096  # the nv header occupies the first 4 KiB of every provider
DEFAULT_EXTENTSIZE = 2 * 1024 * 1024  # HAST_EXTENTSIZE: one activemap bit covers 2 MiB
DEFAULT_KEEPDIRTY = 64  # HAST_KEEPDIRTY: extents kept dirty to save bitmap rewrites
DEFAULT_SECTORSIZE = 512  # a regular file is treated as having 512-byte sectors (subr.c)

# Replication timing (hast.h).
KEEPALIVE_INTERVAL = 10  # HAST_KEEPALIVE: seconds of idle send queue before a keepalive

# Largest single I/O on the wire. FreeBSD 13+ uses MAXPHYS = 1 MiB on 64-bit; a <=12 peer accepts
# 128 KiB only, so protocol v2 peers are held to the smaller value (hast.md §11 caveat 4).
MAXPHYS_V2 = 128 * 1024
MAXPHYS = 1024 * 1024

# Roles as numbered on the wire and in the control protocol (hast.h HAST_ROLE_*).
ROLE_INIT = 1
ROLE_PRIMARY = 2
ROLE_SECONDARY = 3
ROLE_NAMES = {ROLE_INIT: "init", ROLE_PRIMARY: "primary", ROLE_SECONDARY: "secondary"}
ROLE_NUMBERS = {name: num for num, name in ROLE_NAMES.items()}

# config
# Value vocabularies of hast.conf(5); hastpy's own `attach` modes are in DESIGN.md §2.
REPLICATION_MODES = ("fullsync", "memsync", "async")
CHECKSUM_ALGORITHMS = ("none", "crc32", "sha256")
COMPRESSION_ALGORITHMS = ("none", "hole", "lzf")
ATTACH_MODES = ("auto", "kernel", "fuse", "none")
REMOTE_NONE = "none"  # `remote none`: never connect and never accept a connection
DEFAULT_ATTACH = "auto"
DEFAULT_DEVDIR = "/dev/hast"
DEFAULT_HOOK_TIMEOUT = 60  # seconds a hook may run before hastpy gives up waiting for it
MAX_PATH_LEN = 1024  # FreeBSD PATH_MAX: hastd copies paths into PATH_MAX buffers; keep files portable
MAX_HOST_LEN = 255  # MAXHOSTNAMELEN (256) less the NUL: hastd's tcp_addr() buffer for host or IP
MAX_UDS_PATH_LEN = 107  # Linux sockaddr_un.sun_path is 108 bytes including the NUL
MAX_PORT = 65535  # TCP ports are 16 bits; port 0 cannot be written, only defaulted (source)
MAX_TIMEOUT = 2**31 - 1  # hastd keeps timeouts in a C int; also far below threading.TIMEOUT_MAX
MACHINE_ID_PATH = "/etc/machine-id"  # systemd's host identity, our stand-in for kern.hostuuid

# proto
# Wire protocol versions (hast.h HAST_PROTO_VERSION; hastpy/proto/messages.py has the history).
HAST_PROTO_VERSION = 2  # the newest version FreeBSD hastd speaks
PROTO_VERSION = 4  # ours: 2 plus maxio (3) and syncdone (4); only framed to peers that negotiated it
TOKEN_SIZE = 16  # HAST_TOKEN_SIZE: random bytes tying a resource's two connections together
# Synchronization source reported by the secondary in the handshake (hast.h HAST_SYNCSRC_*).
SYNCSRC_UNDEF = 0
SYNCSRC_PRIMARY = 1
SYNCSRC_SECONDARY = 2

# Exit status of a primary worker that refuses to serve local data marked inconsistent (sysexits
# EX_NOINPUT: its input, the local copy, is unusable). The supervisor then sets role init and
# reports it; `hastctl promote` exits with it too.
STALE_DATA_EXIT = 66

# The most buffers one sendmsg takes (Linux UIO_MAXIOV); longer lists are sent in several calls.
MAX_IOV = 1024
