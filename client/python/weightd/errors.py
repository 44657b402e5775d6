"""The exceptions of the weightd package: one class per daemon error code.

Every failure the daemon or libweightd-client reports is raised as a
subclass of weightd.Error carrying .code (the number), .code_name
("NOT_FOUND") and .message (the daemon's message, or the library's own for
failures on this side, such as no daemon answering).

Each class is also the builtin exception Python code already catches for
the same failure, so code written for files and for safetensors handles
weightd's errors unchanged:

    InvalidArgument     ValueError
    NotFound            FileNotFoundError (errno ENOENT)
    PermissionDenied    PermissionError (errno EACCES)
    FormatError         ValueError
    IoError             OSError (errno EIO)
    ResourceExhausted   RuntimeError
    Unavailable         ConnectionError (no daemon answers on the socket)
    Cancelled           RuntimeError
    Internal            RuntimeError
    Unsupported         RuntimeError
    Busy                RuntimeError
    ProtocolError       RuntimeError

The OSError ones carry .errno and .strerror (the message); .filename is
None (the message names the file).  weightd.safe_open() raises some of
them as safetensors.SafetensorError too: see safetensors_compat.
"""
import errno


class Error(Exception):
    """A weightd call failed."""

    code = None
    code_name = "UNKNOWN"
    _os_errno = None  # .errno of the classes that are OSErrors

    def __init__(self, message, code=None, code_name=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if code_name is not None:
            self.code_name = code_name
        if isinstance(self, OSError):
            self.errno = self._os_errno
            self.strerror = message

    def __str__(self):
        return f"{self.code_name}: {self.message}"


class InvalidArgument(Error, ValueError):
    code, code_name = 1, "INVALID_ARGUMENT"


class NotFound(Error, FileNotFoundError):
    code, code_name = 2, "NOT_FOUND"
    _os_errno = errno.ENOENT


class PermissionDenied(Error, PermissionError):
    code, code_name = 3, "PERMISSION_DENIED"
    _os_errno = errno.EACCES


class FormatError(Error, ValueError):
    code, code_name = 4, "FORMAT_ERROR"


class IoError(Error, OSError):
    code, code_name = 5, "IO_ERROR"
    _os_errno = errno.EIO


class ResourceExhausted(Error, RuntimeError):
    code, code_name = 6, "RESOURCE_EXHAUSTED"


class Unavailable(Error, ConnectionError):
    code, code_name = 7, "UNAVAILABLE"


class Cancelled(Error, RuntimeError):
    code, code_name = 8, "CANCELLED"


class Internal(Error, RuntimeError):
    code, code_name = 9, "INTERNAL"


class Unsupported(Error, RuntimeError):
    code, code_name = 10, "UNSUPPORTED"


class Busy(Error, RuntimeError):
    code, code_name = 11, "BUSY"


class ProtocolError(Error, RuntimeError):
    code, code_name = 12, "PROTOCOL_ERROR"


BY_CODE = {c.code: c for c in (InvalidArgument, NotFound, PermissionDenied, FormatError, IoError,
                               ResourceExhausted, Unavailable, Cancelled, Internal, Unsupported, Busy,
                               ProtocolError)}


def from_code(code, code_name, message):
    """The exception for a code; a code this package does not know (from a
    newer daemon) is a plain Error that keeps the number and the name."""
    cls = BY_CODE.get(code)
    if cls is None:
        return Error(message, code, code_name)
    return cls(message)
