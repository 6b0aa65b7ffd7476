"""asyncio streams on libduplex: a drop-in for asyncio's stream functions.

    reader, writer = await duplex.aio.open_connection("127.0.0.1", 7000)
    writer.write(b"ping\\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()

The reader and writer are asyncio's own ``asyncio.StreamReader`` and
``asyncio.StreamWriter``; what is new is the transport under them
(:class:`Transport`, an ``asyncio.Transport`` over a libduplex Conn), so
reading, limits, EOF and errors behave exactly as with
``asyncio.open_connection()``. The same goes for servers
(:func:`start_server` returns a :class:`Server` like ``asyncio.Server``)
and for protocols (:func:`create_connection`, :func:`create_server`).

How it works: the conn's callbacks run on the libduplex loop thread and
only hand each event to the asyncio loop (``call_soon_threadsafe``), so
the transport's state and the protocol live on the asyncio thread. Writes
call the conn directly (it is thread-safe). A write the conn refuses (past
its hard limit) is kept, in order, and retried on the conn's on_writable;
meanwhile, and while the conn is past its high watermark, the protocol is
paused (``drain()`` waits). Reading follows the protocol's
pause_reading()/resume_reading() (StreamReader pauses past twice its
limit).

By default conns live on one process-wide libduplex loop
(:func:`default_loop`); pass ``duplex_loop=`` to use your own.

TLS: ``ssl=`` takes a :class:`duplex.TLSConfig` (libduplex speaks TLS
itself, so an ``ssl.SSLContext`` cannot be used), ``ssl=True`` a default
client configuration (the system's CAs); :func:`start_tls` upgrades an
open stream.
"""
import asyncio
import collections
import errno
import logging
import os
import socket
import threading

from . import _core, _ffi, _tls
from .errors import CODES, DuplexError, WouldBlock, error

__all__ = ["open_connection", "open_unix_connection", "start_server",
           "start_unix_server", "create_connection",
           "create_unix_connection", "create_server", "create_unix_server",
           "start_tls", "Server", "Transport", "SocketInfo", "default_loop"]

_ECLOSED = CODES["ECLOSED"]
_EWOULDBLOCK = CODES["EWOULDBLOCK"]
_conn_write = _ffi.conn_write
_NO_CB = _core._NO_WRITE_CB
_DEFAULT_LIMIT = 2 ** 16  # asyncio's default StreamReader limit
_log = logging.getLogger(__name__)

_default = None
_default_lock = threading.Lock()


def default_loop():
    """The process-wide libduplex Loop the bridge uses by default (started
    on first use, closed at interpreter exit)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = _core.Loop()
        return _default


# ---- asyncio's keyword arguments ---------------------------------------------

# Accepted with these values (what asyncio does by default); anything else
# asks for something a libduplex conn does not do. (``ssl`` and
# ``server_hostname`` are taken apart first: see _tls_options.)
_CONNECT_DEFAULTS = {
    "family": 0, "proto": 0, "flags": 0, "local_addr": None,
    "ssl_handshake_timeout": None,
    "ssl_shutdown_timeout": None, "happy_eyeballs_delay": None,
    "interleave": None, "all_errors": False,
}
_SERVE_DEFAULTS = {
    "flags": socket.AI_PASSIVE, "reuse_address": None,
    "reuse_port": None, "ssl_handshake_timeout": None,
    "ssl_shutdown_timeout": None,
}


def _asyncio_options(kw, defaults):
    for name, default in defaults.items():
        if name in kw:
            value = kw.pop(name)
            if value != default and not (name == "reuse_address" and value):
                if name == "ssl_handshake_timeout":
                    raise NotImplementedError(
                        "duplex.aio: the handshake timeout belongs to the "
                        "TLS configuration: duplex.TLSConfig("
                        "handshake_timeout=...)")
                raise NotImplementedError(
                    f"duplex.aio does not support {name}={value!r}")
    if "start_paused" in kw:
        raise TypeError("start_paused: call transport.pause_reading() in "
                        "connection_made() instead")


_default_client_tls = None


def _tls_config(value, server):
    """asyncio's ``ssl=`` argument as a duplex.TLSConfig (None: plain)."""
    global _default_client_tls
    if value is None or value is False:
        return None
    if value is True:
        if server:
            raise ValueError("duplex.aio: a server needs ssl=duplex."
                             "TLSConfig('server', cert_file=..., "
                             "key_file=...)")
        with _default_lock:
            if _default_client_tls is None:
                _default_client_tls = _tls.TLSConfig("client")
            return _default_client_tls
    if not isinstance(value, _tls.TLSConfig):
        raise TypeError(
            "duplex.aio: ssl= takes a duplex.TLSConfig (or True for a "
            f"default client), not {type(value).__name__}: libduplex "
            "speaks TLS itself and cannot use an ssl.SSLContext")
    return value


def _tls_options(kw, server):
    """Turn asyncio's ``ssl=`` and ``server_hostname=`` in ``kw`` into the
    conn options ``tls=`` and ``server_hostname=``."""
    tls = _tls_config(kw.pop("ssl", None), server)
    if server:
        if tls is not None:
            kw["tls"] = tls
        return
    hostname = kw.pop("server_hostname", None)
    if tls is None:
        if hostname is not None:
            raise ValueError("server_hostname is only meaningful with ssl")
        return
    kw["tls"] = tls
    if hostname is not None:
        kw["server_hostname"] = hostname


# ---- addresses -----------------------------------------------------------------

def _sockaddr(text, unix):
    """libduplex's address text as Python's socket module gives it:
    ("1.2.3.4", 80), ("::1", 80, 0, 0), a path ("" if unnamed)."""
    if text is None or unix:
        return text
    if text.startswith("["):
        host, _, port = text[1:].rpartition("]:")
        scope = 0
        if "%" in host:
            name = host.partition("%")[2]
            try:
                scope = int(name) if name.isdigit() \
                    else socket.if_nametoindex(name)
            except OSError:
                pass
        return (host, int(port), 0, scope)
    host, _, port = text.rpartition(":")
    return (host, int(port))


def _family(addr, unix):
    if unix:
        return socket.AF_UNIX
    return socket.AF_INET6 if addr and len(addr) == 4 else socket.AF_INET


class SocketInfo:
    """What ``get_extra_info("socket")`` and ``Server.sockets`` give: the
    socket's ``family``, ``type``, ``proto`` and its addresses
    (``getsockname()``, ``getpeername()``), as a socket would. The
    descriptor itself belongs to the libduplex loop, so there is no
    fileno(), setsockopt() or I/O here."""

    __slots__ = ("family", "type", "proto", "_sockname", "_peername")

    def __init__(self, family, sockname, peername=None):
        self.family = family
        self.type = socket.SOCK_STREAM
        self.proto = 0 if family == socket.AF_UNIX else socket.IPPROTO_TCP
        self._sockname = sockname
        self._peername = peername

    def getsockname(self):
        return self._sockname

    def getpeername(self):
        if self._peername is None:
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        return self._peername

    def __repr__(self):
        peer = "" if self._peername is None else f", raddr={self._peername!r}"
        return (f"<duplex.aio.SocketInfo family={self.family!r}, "
                f"laddr={self._sockname!r}{peer}>")


# ---- the transport ---------------------------------------------------------------

class Transport(asyncio.Transport):
    """An ``asyncio.Transport`` over a libduplex Conn.

    Made by :func:`create_connection` and the other functions here, never
    directly. Everything asyncio's socket transports offer is here except
    ``set_write_buffer_limits()``: the conn's watermarks are fixed when it
    is made (``high_watermark=``, ``low_watermark=``, ``hard_limit=``
    keyword arguments). ``get_extra_info()`` knows "peername",
    "sockname", "socket" (a :class:`SocketInfo`) and "duplex_conn" (the
    :class:`duplex.Conn`); over TLS also "duplex_tls_info" (a
    :class:`duplex.TLSInfo`), "duplex_tls_config" (the
    :class:`duplex.TLSConfig`) and "cipher" (``(name, version, None)``);
    "sslcontext" and "ssl_object" are None, as StreamReader takes a
    transport with an SSL context for one that cannot half-close. Differences from a socket
    transport: once the
    peer's EOF came and write_eof() was flushed the conn closes by itself
    (connection_lost(None)); after abort() writes are refused at once."""

    def __init__(self, aloop, protocol=None, *, unix=False, server=None,
                 watermarks=(0, 0), tls=None):
        super().__init__()
        self._tls = tls
        self._aloop = aloop
        self._call = aloop.call_soon_threadsafe
        self._protocol = protocol
        self._unix = unix
        self._server = server
        high = watermarks[0] or (1 << 20)
        self._limits = (watermarks[1] or high // 4, high)
        self._conn = None
        self._waiter = None      # create_connection's future
        self._made = False       # connection_made() was called
        self._lost = False       # the conn closed
        self._closing = False    # close() or abort() was called, or lost
        self._aborted = False
        self._fatal_exc = None   # for connection_lost() after _fatal()
        self._eof_sent = False
        self._reading = True     # as the protocol wants it
        self._pending = collections.deque()  # refused writes, in order
        self._pending_size = 0
        self._congested = False  # past the conn's high watermark
        self._paused = False     # the protocol was told to pause writing
        self._after_flush = None  # "eof" / "close" once pending is written
        self._dropped = 0        # writes after close, dropped
        self._orphaned = False

    # -- libduplex loop thread: hand each event to the asyncio loop --

    def _callbacks(self):
        return dict(on_open=self._lt_open, on_read=self._lt_read,
                    on_eof=self._lt_eof, on_backpressure=self._lt_full,
                    on_writable=self._lt_writable, on_close=self._lt_close,
                    start_paused=True)

    def _hop(self, conn, fn, *args):
        try:
            self._call(fn, *args)
        except RuntimeError:
            self._orphan(conn)

    def _orphan(self, conn):
        # The asyncio loop is closed: nobody will ever read this conn.
        if not self._orphaned:
            self._orphaned = True
            conn.close(abort=True)

    def _lt_open(self, conn):
        # On the loop thread the names come at once (no round trip).
        names = []
        for get in (lambda: conn.peer, lambda: conn.local):
            try:
                names.append(get())
            except DuplexError:
                names.append(None)
        self._hop(conn, self._opened, conn, *names)

    def _set_tls_extra(self, info, config):
        if info is None:
            return
        # Not "sslcontext": asyncio's StreamReaderProtocol takes a
        # transport that has one for an SSL one that cannot half-close,
        # and closes at the peer's EOF. A TLS conn half-closes.
        self._extra.update(duplex_tls_info=info, duplex_tls_config=config,
                           cipher=(info.cipher, info.version, None),
                           compression=None)

    def _lt_read(self, conn, data):
        try:
            self._call(self._data, data)
        except RuntimeError:
            self._orphan(conn)

    def _lt_eof(self, conn):
        self._hop(conn, self._eof)

    def _lt_full(self, conn, queued):
        self._hop(conn, self._set_congested, True)

    def _lt_writable(self, conn):
        self._hop(conn, self._set_congested, False)

    def _lt_close(self, conn, err):
        self._hop(conn, self._closed, err)

    # -- asyncio thread: events --

    def _opened(self, conn, peer, local):
        self._conn = conn
        peername = _sockaddr(peer, self._unix)
        sockname = _sockaddr(local, self._unix)
        family = _family(peername or sockname, self._unix)
        self._extra.update(peername=peername, sockname=sockname,
                           socket=SocketInfo(family, sockname, peername),
                           duplex_conn=conn)
        self._set_tls_extra(conn._tls_info, self._tls)
        if self._closing:
            return
        if self._server is not None:
            self._server._attach(self)
        else:
            self._start()

    def _start(self, factory=None):
        """Call connection_made(), then start reading (the conn was made
        paused, so no byte arrives before)."""
        waiter = self._waiter
        if waiter is not None and waiter.done():  # cancelled meanwhile
            self.abort()
            return
        try:
            if factory is not None:
                self._protocol = factory()
            self._made = True
            self._protocol.connection_made(self)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc, "protocol.connection_made() failed")
            if waiter is not None:
                waiter.set_exception(exc)
            return
        if waiter is not None:
            waiter.set_result(None)
        if self._reading and not self._closing:
            self._try(self._conn.resume)

    def _data(self, data):
        # No data after close(), as with asyncio's transports. (None comes
        # before connection_made(): conns are made paused.)
        if self._closing or not self._made:
            return
        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc, "Fatal error: protocol.data_received() call "
                             "failed.")

    def _eof(self):
        if self._closing or not self._made:
            return
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc, "Fatal error: protocol.eof_received() call "
                             "failed.")
            return
        if not keep_open:
            self.close()

    def _set_congested(self, on):
        self._congested = on
        if not on:
            self._flush()
        self._update_pause()

    def _closed(self, err):
        if self._lost:
            return
        self._lost = self._closing = True
        self._pending.clear()
        self._pending_size = 0
        self._after_flush = None
        if self._server is not None:
            self._server._detach(self)
        if not self._made:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(err if err is not None
                                     else error(_ECLOSED, "connect"))
            return
        # Our own abort() is a normal end for asyncio: connection_lost(None).
        exc = self._fatal_exc or (None if self._aborted else err)
        try:
            self._protocol.connection_lost(exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:
            self._aloop.call_exception_handler({
                "message": "protocol.connection_lost() failed",
                "exception": e, "transport": self,
                "protocol": self._protocol})

    def _fatal(self, exc, message):
        self._aloop.call_exception_handler({
            "message": message, "exception": exc, "transport": self,
            "protocol": self._protocol})
        if self._fatal_exc is None:
            self._fatal_exc = exc
        self.abort()

    def _try(self, fn, *args):
        try:
            fn(*args)
        except DuplexError:
            pass  # the conn closed meanwhile: connection_lost() says why

    # -- writing --

    def write(self, data):
        # The common case first: bytes, straight to the conn.
        if type(data) is bytes and data and not (
                self._pending or self._closing or self._eof_sent):
            rc = _conn_write(self._conn._p, data, len(data), _NO_CB, None)
            if rc == _EWOULDBLOCK:
                self._keep(data)
                self._update_pause()
            # else written, or the conn closed meanwhile (connection_lost
            # will say why)
            return
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("data argument must be a bytes-like object, "
                            f"not {type(data).__name__!r}")
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return
        if self._closing:
            # As asyncio's transports do once the connection is lost.
            self._dropped += 1
            if self._dropped == 5:
                _log.warning("duplex.aio: writes to a closed transport "
                             "are dropped")
            return
        if self._pending:
            self._keep(data)
            return
        try:
            self._conn.write(data)
        except WouldBlock:
            self._keep(data)
            self._update_pause()
        except DuplexError:
            pass  # closed meanwhile: connection_lost() says why

    def writelines(self, list_of_data):
        self.write(b"".join(list_of_data))

    def _keep(self, data):
        data = bytes(data)
        self._pending.append(data)
        self._pending_size += len(data)

    def _flush(self):
        """Hand the kept writes to the conn, in order, while it takes
        them; then the shutdown or close that waited for them.

        Called on on_writable. A refused write marks the conn congested,
        and the core then always calls on_writable once the queue is back
        at the low watermark (again after each completion while a write
        that big still does not fit), so every retry follows progress and
        nothing spins or hangs. No zero-length "flush marker" is queued:
        it would cost WRITE_OVERHEAD and be refused at the limit too.
        (duplex_conn_wait_room() blocks a thread, so it is for sendall(),
        not for an event loop.)"""
        while self._pending:
            data = self._pending[0]
            try:
                self._conn.write(data)
            except WouldBlock:
                return
            except DuplexError:
                self._pending.clear()
                self._pending_size = 0
                break
            self._pending.popleft()
            self._pending_size -= len(data)
        what, self._after_flush = self._after_flush, None
        if what == "eof":
            self._try(self._conn.shutdown)
        elif what == "close":
            self._try(self._conn.close)

    def _update_pause(self):
        paused = bool(self._pending) or self._congested
        if paused == self._paused or not self._made or self._lost:
            return
        self._paused = paused
        try:
            if paused:
                self._protocol.pause_writing()
            else:
                self._protocol.resume_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._aloop.call_exception_handler({
                "message": "protocol.pause_writing() failed" if paused
                else "protocol.resume_writing() failed",
                "exception": exc, "transport": self,
                "protocol": self._protocol})

    def can_write_eof(self):
        return True

    def write_eof(self):
        if self._closing or self._eof_sent:
            return
        self._eof_sent = True
        if self._pending:
            self._after_flush = "eof"
        else:
            self._try(self._conn.shutdown)

    def get_write_buffer_size(self):
        """Bytes kept here (refused by the conn) plus what the conn has
        queued, as it counts it (duplex.WRITE_OVERHEAD per write)."""
        queued = 0
        if not self._lost and self._conn is not None:
            try:
                queued = self._conn.queued
            except DuplexError:
                pass
        return self._pending_size + queued

    def get_write_buffer_limits(self):
        """(low, high): the conn's watermarks."""
        return self._limits

    def set_write_buffer_limits(self, high=None, low=None):
        raise NotImplementedError(
            "duplex.aio: a conn's watermarks are fixed when it is made; "
            "pass high_watermark= and low_watermark=")

    # -- closing --

    def is_closing(self):
        return self._closing

    def close(self):
        """Close once everything written was flushed; then
        connection_lost(None). No data is delivered after this."""
        if self._closing:
            return
        self._closing = True
        if self._conn is None:
            return
        self._try(self._conn.pause)
        if self._pending:
            self._after_flush = "close"
        else:
            self._try(self._conn.close)

    def abort(self):
        """Close at once: kept and queued writes are dropped, a TCP peer
        sees a reset; then connection_lost(None)."""
        if self._lost or self._aborted:
            return
        self._closing = self._aborted = True
        self._pending.clear()
        self._pending_size = 0
        self._after_flush = None
        if self._conn is not None:
            self._conn.close(abort=True)

    # -- reading --

    def is_reading(self):
        return self._reading and not self._closing

    def pause_reading(self):
        if self._closing or not self._reading:
            return
        self._reading = False
        if self._made:
            self._try(self._conn.pause)

    def resume_reading(self):
        if self._closing or self._reading:
            return
        self._reading = True
        if self._made:
            self._try(self._conn.resume)

    # -- the rest of the interface --

    def set_protocol(self, protocol):
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol

    def __repr__(self):
        state = ("closed" if self._lost else "closing" if self._closing
                 else "open")
        peer = self._extra.get("peername")
        return f"<duplex.aio.Transport {state} peer={peer!r}>"

    # -- connecting --

    async def _connect(self, make):
        self._waiter = self._aloop.create_future()
        conn = make(self._callbacks())
        self._conn = conn
        try:
            await self._waiter
        except BaseException:  # refused, or cancelled while connecting
            if not self._lost:
                self.abort()
            raise


def _watermarks(kw):
    return kw.get("high_watermark", 0), kw.get("low_watermark", 0)


async def create_connection(protocol_factory, host=None, port=None, *,
                            sock=None, duplex_loop=None, **kw):
    """Connect over TCP (or adopt ``sock``, a connected socket) and make
    ``protocol_factory()``'s protocol on it, as
    ``loop.create_connection()``; returns ``(transport, protocol)``.
    Resolver failures raise ``socket.gaierror``, connect failures the
    usual OSError subclasses (all also :class:`duplex.DuplexError`).
    ``duplex_loop``: the libduplex Loop (default: :func:`default_loop`).
    Other keyword arguments are conn options (``high_watermark``,
    ``low_watermark``, ``hard_limit``, ``nagle``, ``keepalive``, the
    timeouts; see duplex.connect_tcp()); asyncio's own (``family``,
    ``local_addr``, ...) only at their defaults.

    ``ssl``: a client-role :class:`duplex.TLSConfig` (or True: a default
    one trusting the system's CAs) to speak TLS; the connection is made
    once the handshake is done. ``server_hostname``: the name sent as SNI
    and checked (default ``host``; needed with ``sock=``). A certificate
    that does not verify raises :class:`duplex.TLSVerifyError` (an
    ``ssl.SSLCertVerificationError``), another TLS failure
    :class:`duplex.TLSError` (an ``ssl.SSLError``)."""
    _tls_options(kw, server=False)
    _asyncio_options(kw, _CONNECT_DEFAULTS)
    dloop = duplex_loop or default_loop()
    if sock is not None:
        if host is not None or port is not None:
            raise ValueError("host/port and sock can not be specified at "
                             "the same time")
        unix = sock.family == socket.AF_UNIX

        def make(cbs):
            return _core.adopt(dloop, sock, **cbs, **kw)
    else:
        if host is None or port is None:
            raise ValueError("host and port was not specified and no sock "
                             "specified")
        unix = False

        def make(cbs):
            return _core.connect_tcp(dloop, host, port, **cbs, **kw)
    return await _make_connection(protocol_factory, make, unix, kw)


async def create_unix_connection(protocol_factory, path=None, *, sock=None,
                                 duplex_loop=None, **kw):
    """As :func:`create_connection`, to a UNIX-domain socket ``path``
    (with ``ssl``, ``server_hostname`` is needed unless the configuration
    does not verify)."""
    _tls_options(kw, server=False)
    _asyncio_options(kw, _CONNECT_DEFAULTS)
    dloop = duplex_loop or default_loop()
    if sock is not None:
        if path is not None:
            raise ValueError("path and sock can not be specified at the "
                             "same time")
        return await create_connection(protocol_factory, sock=sock,
                                       duplex_loop=dloop, **kw)
    if path is None:
        raise ValueError("no path and sock were specified")
    path = os.fspath(path)
    return await _make_connection(
        protocol_factory,
        lambda cbs: _core.connect_unix(dloop, path, **cbs, **kw), True, kw)


async def _make_connection(protocol_factory, make, unix, kw):
    aloop = asyncio.get_running_loop()
    protocol = protocol_factory()
    transport = Transport(aloop, protocol, unix=unix,
                          watermarks=_watermarks(kw), tls=kw.get("tls"))
    await transport._connect(make)
    return transport, protocol


async def open_connection(host=None, port=None, *, limit=_DEFAULT_LIMIT,
                          **kw):
    """Connect over TCP; returns ``(reader, writer)``: asyncio's own
    StreamReader and StreamWriter, as ``asyncio.open_connection()``.
    ``limit`` is the reader's buffer limit (asyncio's default, 64 KiB);
    other keyword arguments as :func:`create_connection` (``sock=`` to
    adopt a connected socket, ``duplex_loop=``, conn options)."""
    aloop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=aloop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=aloop)
    transport, _ = await create_connection(lambda: protocol, host, port,
                                           **kw)
    writer = asyncio.StreamWriter(transport, protocol, reader, aloop)
    return reader, writer


async def open_unix_connection(path=None, *, limit=_DEFAULT_LIMIT, **kw):
    """As :func:`open_connection`, to a UNIX-domain socket ``path``."""
    aloop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=aloop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=aloop)
    transport, _ = await create_unix_connection(lambda: protocol, path, **kw)
    writer = asyncio.StreamWriter(transport, protocol, reader, aloop)
    return reader, writer


# ---- servers ---------------------------------------------------------------------

class Server:
    """Listening sockets on a libduplex loop, as ``asyncio.Server``: made
    by :func:`start_server` and the other server functions here.

    ``sockets`` are :class:`SocketInfo` objects (``getsockname()``
    gives the bound address, e.g. the port picked for port 0); empty once
    closed. ``wait_closed()`` waits, as in Python 3.12 and later, until
    close() was called and every connection the server made has closed."""

    def __init__(self, aloop, factory):
        self._aloop = aloop
        self._factory = factory
        self._listeners = []
        self._sockets = ()
        self._serving = False
        self._held = []          # accepted before start_serving()
        self._clients = set()    # transports not closed yet
        self._waiters = []       # wait_closed(); None once all is closed
        self._forever = None     # serve_forever()'s future

    # loop thread, for each accepted conn (made paused)
    def _on_accept(self, conn, unix, watermarks, tls=None):
        transport = Transport(self._aloop, unix=unix, server=self,
                              watermarks=watermarks, tls=tls)
        for name, fn in transport._callbacks().items():
            if name.startswith("on_"):
                setattr(conn, name, fn)
        transport._lt_open(conn)

    def _attach(self, transport):
        if self._listeners is None:  # accepted while closing
            transport.abort()
            return
        self._clients.add(transport)
        if self._serving:
            transport._start(self._factory)
        else:
            self._held.append(transport)

    def _detach(self, transport):
        self._clients.discard(transport)
        if transport in self._held:
            self._held.remove(transport)
        self._wakeup()

    def _wakeup(self):
        if self._listeners is None and not self._clients and \
                self._waiters is not None:
            waiters, self._waiters = self._waiters, None
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    @property
    def sockets(self):
        return self._sockets

    def get_loop(self):
        return self._aloop

    def is_serving(self):
        return self._serving

    async def start_serving(self):
        """Start handing accepted connections to protocols (if
        ``start_serving=False`` was given; else they are already)."""
        self._start_serving()
        await asyncio.sleep(0)

    def _start_serving(self):
        if self._serving or self._listeners is None:
            return
        self._serving = True
        held, self._held = self._held, []
        for transport in held:
            transport._start(self._factory)

    async def serve_forever(self):
        """Serve until cancelled; then close the server and wait for it."""
        if self._forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited "
                               "on serve_forever()")
        if self._listeners is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_serving()
        self._forever = self._aloop.create_future()
        try:
            await self._forever
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._forever = None

    def close(self):
        """Stop listening; connections already made stay open."""
        listeners, self._listeners = self._listeners, None
        if listeners is None:
            return
        self._sockets = ()
        self._serving = False
        for listener in listeners:
            listener.close()
        held, self._held = self._held, []
        for transport in held:
            transport.abort()
        if self._forever is not None and not self._forever.done():
            self._forever.cancel()
        self._wakeup()

    def close_clients(self):
        """close() every connection the server made."""
        for transport in list(self._clients):
            transport.close()

    def abort_clients(self):
        """abort() every connection the server made."""
        for transport in list(self._clients):
            transport.abort()

    async def wait_closed(self):
        if self._waiters is None:
            return
        f = self._aloop.create_future()
        self._waiters.append(f)
        await f

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()
        await self.wait_closed()

    def __repr__(self):
        return f"<duplex.aio.Server sockets={self._sockets!r}>"


def _serve_options(kw):
    _tls_options(kw, server=True)
    _asyncio_options(kw, _SERVE_DEFAULTS)
    if "keep_alive" in kw:  # asyncio 3.13's name
        kw["keepalive"] = bool(kw.pop("keep_alive"))
    backlog = kw.pop("backlog", 100)
    start = kw.pop("start_serving", True)
    return backlog, start


async def create_server(protocol_factory, host=None, port=None, *,
                        family=socket.AF_UNSPEC, sock=None, duplex_loop=None,
                        **kw):
    """Listen on TCP and make ``protocol_factory()``'s protocol for every
    connection, as ``loop.create_server()``; returns a :class:`Server`.
    ``host``: a name, an address, a sequence of them, or None for every
    interface; each address it resolves to gets a listening socket (IPv6
    ones IPv6-only), as with asyncio. ``port`` None or 0 picks a free
    port (see ``Server.sockets``). ``backlog``, ``start_serving``,
    ``duplex_loop`` and conn options (as :func:`create_connection`) are
    also taken. ``ssl``: a server-role :class:`duplex.TLSConfig`; each
    connection is made once its handshake is done (one that fails is
    closed and never seen). ``sock=`` (a listening socket to adopt) is
    not supported."""
    backlog, start = _serve_options(kw)
    if sock is not None:
        raise NotImplementedError("duplex.aio cannot adopt a listening "
                                  "socket (sock=)")
    aloop = asyncio.get_running_loop()
    dloop = duplex_loop or default_loop()
    hosts = [host] if host is None or isinstance(host, str) else list(host)
    addrs = []
    for h in hosts:
        infos = await aloop.getaddrinfo(h or None, port or 0, family=family,
                                        type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)
        for fam, _, _, _, sa in infos:
            if (fam, sa[0]) not in addrs:
                addrs.append((fam, sa[0]))
    server = Server(aloop, protocol_factory)
    watermarks = _watermarks(kw)
    try:
        for fam, addr in addrs:
            try:
                listener = _core.listen_tcp(
                    dloop, addr, port or 0, backlog=backlog,
                    ipv6only=fam == socket.AF_INET6, start_paused=True,
                    on_accept=lambda conn: server._on_accept(
                        conn, False, watermarks, kw.get("tls")), **kw)
            except DuplexError as e:
                # No IPv6 here: asyncio skips such addresses too.
                if host is None and fam == socket.AF_INET6 and \
                        e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    continue
                raise
            server._listeners.append(listener)
            server._sockets += (SocketInfo(fam, _sockaddr(listener.address,
                                                          False)),)
    except BaseException:
        server.close()
        raise
    if start:
        server._start_serving()
    return server


async def create_unix_server(protocol_factory, path=None, *, sock=None,
                             duplex_loop=None, mode=0, **kw):
    """As :func:`create_server`, on a UNIX-domain socket ``path``
    (``mode``: its permission bits)."""
    backlog, start = _serve_options(kw)
    if sock is not None:
        raise NotImplementedError("duplex.aio cannot adopt a listening "
                                  "socket (sock=)")
    if path is None:
        raise ValueError("path was not specified, and no sock specified")
    aloop = asyncio.get_running_loop()
    dloop = duplex_loop or default_loop()
    server = Server(aloop, protocol_factory)
    watermarks = _watermarks(kw)
    listener = _core.listen_unix(
        dloop, os.fspath(path), backlog=backlog, mode=mode, start_paused=True,
        on_accept=lambda conn: server._on_accept(conn, True, watermarks,
                                                 kw.get("tls")),
        **kw)
    server._listeners.append(listener)
    server._sockets = (SocketInfo(socket.AF_UNIX, listener.address),)
    if start:
        server._start_serving()
    return server


def _stream_factory(client_connected_cb, limit):
    aloop = asyncio.get_running_loop()

    def factory():
        reader = asyncio.StreamReader(limit=limit, loop=aloop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb,
                                            loop=aloop)
    return factory


async def start_server(client_connected_cb, host=None, port=None, *,
                       limit=_DEFAULT_LIMIT, **kw):
    """Listen on TCP; ``client_connected_cb(reader, writer)`` (a function
    or a coroutine function) runs for every connection, as
    ``asyncio.start_server()``. Returns a :class:`Server`. Keyword
    arguments as :func:`create_server`."""
    return await create_server(_stream_factory(client_connected_cb, limit),
                               host, port, **kw)


async def start_unix_server(client_connected_cb, path=None, *,
                            limit=_DEFAULT_LIMIT, **kw):
    """As :func:`start_server`, on a UNIX-domain socket ``path``."""
    return await create_unix_server(
        _stream_factory(client_connected_cb, limit), path, **kw)


# ---- STARTTLS ------------------------------------------------------------------

async def start_tls(stream, tls, *, server_hostname=None):
    """Upgrade an open connection to TLS (STARTTLS) and wait for the
    handshake: ``stream`` is a StreamWriter or a :class:`Transport` made
    here, ``tls`` a :class:`duplex.TLSConfig` in the role this side plays
    (a server's accepted connection takes a server-role one). Everything
    written before is sent in plaintext first (a write the conn refused
    and still kept here raises RuntimeError: ``await writer.drain()``
    first); what is written after is encrypted. Bytes the reader already
    holds stay as they were; everything read afterwards is decrypted.
    The same reader and writer go on working. A failed handshake closes
    the connection and raises its error (:class:`duplex.TLSVerifyError`,
    :class:`duplex.TLSError`, ...). ``server_hostname``: the name a
    client checks (default: the host it connected to)."""
    transport = getattr(stream, "transport", stream)
    if not isinstance(transport, Transport):
        raise TypeError("duplex.aio.start_tls: needs a StreamWriter or "
                        "Transport of duplex.aio")
    if transport._pending:
        raise RuntimeError("duplex.aio.start_tls: writes are still kept "
                           "(await writer.drain() first)")
    if transport._closing or transport._conn is None:
        raise error(_ECLOSED, "start_tls")
    future = transport._conn.start_tls(tls, server_hostname=server_hostname)
    await asyncio.wrap_future(future)
    transport._tls = tls
    transport._set_tls_extra(transport._conn.tls_info(), tls)
