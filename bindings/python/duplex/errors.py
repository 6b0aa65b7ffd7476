"""Errors: DuplexError and the library's codes.

Every libduplex function returns 0 or a negative code. The binding turns a
negative code into a DuplexError (an OSError) carrying:

- ``code``     the library's negative code, e.g. -111 (compare with
               ``duplex.errors.ECONNREFUSED``);
- ``name``     ``duplex_err_name(code)``, e.g. ``"DUPLEX_ECONNREFUSED"``;
- ``strerror`` ``duplex_strerror(code)``, e.g. ``"connection refused"``;
- ``errno``    the positive errno for system codes; for name-resolution
               codes the socket module's ``EAI_*`` value (as
               ``socket.gaierror`` has it; None for ``EAI_OTHER``); None
               for the library's own codes.

Codes with an obvious built-in counterpart also derive from it, so
``except ConnectionRefusedError`` and ``except BlockingIOError`` work, and
the name-resolution codes (``DUPLEX_EAI_*``) derive from
``socket.gaierror``, as asyncio's and the socket module's resolver errors
are.
``DUPLEX_EWOULDBLOCK`` raises :class:`WouldBlock` (a BlockingIOError): the
write was refused whole and the caller keeps its bytes. ``DUPLEX_EDEADLK``
(a waiting call made on the loop thread, which it would wait for) raises
:class:`WouldDeadlock`, also a RuntimeError like Python's own "cannot join
current thread".

TLS failures carry the TLS library's own words in ``detail`` (from
``duplex_conn_get_tls_error`` or ``duplex_tls_new``'s message) and derive
from the ``ssl`` module's exceptions, so code written for ``ssl`` catches
them:

- ``DUPLEX_ETLSVERIFY``: :class:`TLSVerifyError`, an
  ``ssl.SSLCertVerificationError`` (so also ``ssl.SSLError`` and
  ``ValueError``); ``verify_message`` is the detail;
- ``DUPLEX_ETLSTRUNC``: :class:`TLSTruncatedError`, an ``ssl.SSLEOFError``
  (the transport closed without close_notify: never a clean EOF);
- ``DUPLEX_ETLS``: :class:`TLSError`, an ``ssl.SSLError``;
- ``DUPLEX_ETLSCONFIG``: :class:`TLSConfigError`, an ``ssl.SSLError``.

The code constants (``EINVAL``, ``ECLOSED``, ...) are read from the loaded
library at import, so they are the library's own values on every platform.
"""
import os
import socket

try:
    import ssl as _ssl
except ImportError:  # a Python built without OpenSSL
    _ssl = None

from . import _ffi


def strerror(code):
    """duplex_strerror(): a description for every int."""
    return _ffi.strerror(code).decode()


def err_name(code):
    """duplex_err_name(): e.g. "DUPLEX_ECLOSED" (DUPLEX_UNKNOWN if none)."""
    return _ffi.err_name(code).decode()


def _scan():
    # Every code lies in the system range (-errno on Unix, libuv's values
    # down to -4200 on Windows), libuv's EAI range (-3000s) or the library's
    # own range (-30000 and below); ask the library for names.
    found = {}
    for rng in (range(-1, -4300, -1), range(-30001, -30100, -1)):
        for code in rng:
            name = err_name(code)
            if name != "DUPLEX_UNKNOWN":
                found[name[len("DUPLEX_"):]] = code
    return found


CODES = _scan()
"""Short name ("ECLOSED") -> code, for every code the library knows."""
globals().update(CODES)
EAGAIN = CODES["EWOULDBLOCK"]


class DuplexError(OSError):
    """A libduplex error code as an exception (see the module docstring)."""

    detail = None
    """The TLS library's words for a TLS failure (None otherwise)."""

    def __init__(self, code, what=None, detail=None):
        self.code = code
        self.name = err_name(code)
        self.what = what
        self.detail = detail or None
        # On POSIX a system code is -errno (EDEADLK included); EAI codes
        # (-3000s) get the socket module's EAI value, and library codes
        # (-30000 and below) have no errno.
        if os.name == "posix" and -3000 < code < 0:
            sys_errno = -code
        else:
            sys_errno = _EAI_ERRNO.get(code)
        super().__init__(sys_errno, strerror(code))

    def __str__(self):
        where = f"{self.what}: " if self.what else ""
        why = f": {self.detail}" if self.detail else ""
        return f"{where}{self.strerror}{why} ({self.name})"

    def __reduce__(self):
        return (error, (self.code, self.what, self.detail))


class WouldBlock(DuplexError, BlockingIOError):
    """DUPLEX_EWOULDBLOCK: the queue is full and nothing was taken; the
    caller keeps its data (wait with Conn.wait_writable() and retry)."""


class WouldDeadlock(DuplexError, RuntimeError):
    """DUPLEX_EDEADLK (-EDEADLK on POSIX): a call that waits for the loop
    (Loop.close(), join(), wait_closed(), wait_writable(), a waiting
    Channel.send()) was made on the loop thread, inside a callback. Nothing
    happened; make the call from another thread."""


_BUILTIN = {
    "ECONNREFUSED": ConnectionRefusedError,
    "ECONNRESET": ConnectionResetError,
    "ECONNABORTED": ConnectionAbortedError,
    "EPIPE": BrokenPipeError,
    "ETIMEDOUT": TimeoutError,
    "ENOENT": FileNotFoundError,
    "EACCES": PermissionError,
    "EPERM": PermissionError,
    "EINTR": InterruptedError,
}
# libuv's resolver codes -> getaddrinfo()'s, as socket.gaierror carries them.
_EAI_ERRNO = {CODES[name]: getattr(socket, name) for name in (
    "EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA", "EAI_FAMILY")
    if name in CODES and hasattr(socket, name)}

for _short in ("EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA",
               "EAI_FAMILY", "EAI_OTHER"):
    if _short in CODES:
        _BUILTIN[_short] = socket.gaierror

_SSLError = _ssl.SSLError if _ssl else OSError
_SSLVerify = _ssl.SSLCertVerificationError if _ssl else OSError
_SSLEOF = _ssl.SSLEOFError if _ssl else OSError


class TLSError(DuplexError, _SSLError):
    """DUPLEX_ETLS: the TLS handshake or a record failed (a protocol error,
    an alert from the peer, no common ALPN protocol or version); ``detail``
    says which, in the TLS library's words. Also an ``ssl.SSLError``.
    The TLS failures below derive from it too."""

    library = "SSL"

    @property
    def reason(self):  # ssl.SSLError's attribute
        return self.detail


class TLSVerifyError(TLSError, _SSLVerify):
    """DUPLEX_ETLSVERIFY: the peer's certificate did not verify (unknown
    issuer, expired, wrong host name, no certificate where one is
    required). An ``ssl.SSLCertVerificationError``: ``verify_message`` is
    the reason (``detail``), ``verify_code`` is None (OpenSSL's number is
    not passed through)."""

    verify_code = None

    @property
    def verify_message(self):
        return self.detail


class TLSTruncatedError(TLSError, _SSLEOF):
    """DUPLEX_ETLSTRUNC: the transport closed without the peer's
    close_notify, so the stream may have been cut short; never a clean
    EOF. An ``ssl.SSLEOFError``, as Python's ssl reports the same."""


class TLSConfigError(TLSError):
    """DUPLEX_ETLSCONFIG: a certificate, key or CA given to TLSConfig would
    not load (``detail`` names it)."""


_CLASSES = {CODES["EWOULDBLOCK"]: WouldBlock,
            CODES["EDEADLK"]: WouldDeadlock}
for _short, _cls in (("ETLS", TLSError), ("ETLSVERIFY", TLSVerifyError),
                     ("ETLSTRUNC", TLSTruncatedError),
                     ("ETLSCONFIG", TLSConfigError)):
    if _short in CODES:
        _CLASSES[CODES[_short]] = _cls
TLS_CODES = frozenset(CODES[n] for n in ("ETLS", "ETLSVERIFY", "ETLSTRUNC",
                                         "ETLSCONFIG") if n in CODES)
for _short, _base in _BUILTIN.items():
    if _short in CODES:
        _CLASSES[CODES[_short]] = type(
            "DuplexError_" + _short, (DuplexError, _base),
            {"__module__": __name__, "__doc__": f"DUPLEX_{_short}"})


def error(code, what=None, detail=None):
    """The DuplexError (or its subclass) for a negative code."""
    return _CLASSES.get(code, DuplexError)(code, what, detail)


def check(rc, what=None):
    """Raise for a negative return code, else return it."""
    if rc < 0:
        raise error(rc, what)
    return rc
