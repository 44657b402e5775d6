"""The exceptions of the weightd package: one class per daemon error code.

Every failure the daemon or libweightd-client reports is raised as a
subclass of weightd.Error carrying .code (the number), .code_name
("NOT_FOUND") and .message (the daemon's message, or the library's own for
failures on this side, such as no daemon answering).
"""


class Error(Exception):
    """A weightd call failed."""

    code = None
    code_name = "UNKNOWN"

    def __init__(self, message, code=None, code_name=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if code_name is not None:
            self.code_name = code_name

    def __str__(self):
        return f"{self.code_name}: {self.message}"


class InvalidArgument(Error):
    code, code_name = 1, "INVALID_ARGUMENT"


class NotFound(Error):
    code, code_name = 2, "NOT_FOUND"


class PermissionDenied(Error):
    code, code_name = 3, "PERMISSION_DENIED"


class FormatError(Error):
    code, code_name = 4, "FORMAT_ERROR"


class IoError(Error):
    code, code_name = 5, "IO_ERROR"


class ResourceExhausted(Error):
    code, code_name = 6, "RESOURCE_EXHAUSTED"


class Unavailable(Error):
    code, code_name = 7, "UNAVAILABLE"


class Cancelled(Error):
    code, code_name = 8, "CANCELLED"


class Internal(Error):
    code, code_name = 9, "INTERNAL"


class Unsupported(Error):
    code, code_name = 10, "UNSUPPORTED"


class Busy(Error):
    code, code_name = 11, "BUSY"


class ProtocolError(Error):
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
