"""libduplex for Python: duplex connections owned by an event loop, written
from any thread. Pure ctypes over libduplex.so.0: an installed one (in
/usr/local or /usr, or found through LD_LIBRARY_PATH), or the one
DUPLEX_LIBRARY names. The distribution is called libduplex.

    import duplex
    with duplex.Loop() as loop:                      # the loop's own thread
        conn = duplex.connect_tcp(loop, "localhost", 7000,
                                  on_read=lambda c, data: print(data))
        conn.write(b"hello\\n")                       # from any thread
        conn.shutdown()
        conn.wait_closed()

duplex.LoopGroup(n) runs n loops on n threads: one listener for all of
them, pick() for outgoing conns. duplex.TLSConfig makes TLS configurations
for connect_*/listen_* (tls=) and Conn.start_tls(). Callbacks run on the
loop thread and take the GIL: keep them short. See docs/python.md for the whole story, and
duplex.aio for asyncio streams.
"""
from . import _ffi
from ._core import (Channel, Conn, Listener, Loop, LoopGroup, LoopStats,
                    Timer, adopt, adopt_pair, connect_tcp, connect_unix,
                    listen_tcp, listen_unix)
from ._tls import TLSConfig, TLSInfo, tls_backend
from .errors import (DuplexError, TLSConfigError, TLSError,
                     TLSTruncatedError, TLSVerifyError, WouldBlock,
                     WouldDeadlock, err_name, strerror)

__all__ = ["Loop", "LoopGroup", "LoopStats", "Conn", "Listener", "Timer",
           "Channel", "connect_tcp", "connect_unix", "adopt", "adopt_pair",
           "listen_tcp", "listen_unix", "DuplexError", "WouldBlock", "WouldDeadlock",
           "TLSConfig", "TLSInfo", "tls_backend", "TLSError",
           "TLSVerifyError", "TLSTruncatedError", "TLSConfigError",
           "strerror", "err_name", "version", "version_string", "errors",
           "aio", "WRITE_OVERHEAD"]


WRITE_OVERHEAD = _ffi.WRITE_OVERHEAD
"""What each queued write costs beyond its payload against the watermarks
and the hard limit (DUPLEX_WRITE_OVERHEAD); Conn.queued counts it too."""


def version():
    """The loaded library's version as a (major, minor, patch) tuple."""
    v = _ffi.version()
    return (v >> 16, (v >> 8) & 0xFF, v & 0xFF)


def version_string():
    return _ffi.version_string().decode()


def __getattr__(name):
    if name == "aio":  # imported lazily: asyncio is not needed otherwise
        from . import aio
        return aio
    raise AttributeError(f"module 'duplex' has no attribute {name!r}")
