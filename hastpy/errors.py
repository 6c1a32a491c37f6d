"""The hastpy exception tree and the one map from exception to sysexits(3) exit code.

Every error a user can cause derives from HastError and carries the exit code the command line
returns for it; anything else escaping to the CLI is a bug.
"""

import os


class HastError(Exception):
    """Base of all errors hastpy reports to a user."""

    exit_code = os.EX_SOFTWARE


class UsageError(HastError):
    """A command was called with arguments that cannot work."""

    exit_code = os.EX_USAGE


class ConfigError(HastError):
    """hast.conf is unreadable or invalid. The message names file:line where there is one."""

    exit_code = os.EX_CONFIG

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        self.reason = message
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


class NvError(HastError, ValueError):
    """Bytes that are not a valid HAST name/value list, or a field of the wrong type."""

    exit_code = os.EX_DATAERR


class MetadataError(HastError):
    """A provider's metadata is absent, damaged, or belongs to another resource."""

    exit_code = os.EX_DATAERR


class ProviderError(HastError):
    """The local provider cannot be opened, sized, locked, read or written."""

    exit_code = os.EX_NOINPUT


class ProtocolError(HastError):
    """A violation of the replication or control protocol."""

    exit_code = os.EX_PROTOCOL


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow (a bug or bad argument)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class HostError(HastError):
    """The system refused what hastd needs: an address to listen on, its control socket."""

    exit_code = os.EX_OSERR


class AlreadyRunning(HastError):
    """Another hastd holds the pid file or serves the control socket (hastd: EX_TEMPFAIL)."""

    exit_code = os.EX_TEMPFAIL


class ControlError(HastError):
    """hastctl could not talk to hastd, or hastd refused the request."""

    exit_code = os.EX_UNAVAILABLE
