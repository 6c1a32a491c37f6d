"""hastpy: FreeBSD HAST (hastd, hastctl, hast.conf) for Linux, in Python."""

__version__ = "0.1.0"
