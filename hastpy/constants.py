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
