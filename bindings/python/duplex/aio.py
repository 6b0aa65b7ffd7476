"""asyncio bridge: await reads and send writes on a libduplex Conn.

    stream = await duplex.aio.open_connection("127.0.0.1", 7000)
    stream.write(b"ping\\n")       # straight into the conn (thread-safe)
    await stream.drain()          # backpressure
    line = await stream.readline()
    stream.close()
    await stream.wait_closed()

How it works: the conn's callbacks run on the libduplex loop thread and
only hand events to the asyncio loop with ``call_soon_threadsafe``; all
Stream state lives on the asyncio thread. Writes call ``Conn.write``
directly (no hop). A write the conn refuses (past its hard limit) is kept,
in order, and retried when the conn drains (its on_writable, or a flush
marker); ``drain()`` waits for that and for the conn's high watermark. Reading pauses the conn when more than
``limit`` bytes are buffered unread and resumes it as they are consumed.

Use a Stream from one asyncio loop (its methods are not thread-safe, like
asyncio's own streams). By default conns live on one process-wide
libduplex loop (:func:`default_loop`); pass ``loop=`` to use your own.
"""
import asyncio
import collections
import threading

from . import _core
from .errors import CODES, DuplexError, WouldBlock, error

_ECLOSED = CODES["ECLOSED"]

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


class Stream:
    """A libduplex Conn seen from asyncio. Create it with
    :func:`open_connection`, :func:`open_unix_connection` or :func:`adopt`.
    """

    def __init__(self, aloop, limit):
        self._aloop = aloop
        self._limit = limit
        self.conn = None
        self._buf = bytearray()
        self._eof = False
        self._closed = False
        self._error = None       # the conn's close error
        self._paused = False
        self._reader = None      # future a read waits on
        self._pending = collections.deque()  # refused writes, in order
        self._marker = False     # a flush marker is outstanding
        self._backpressured = False
        self._drainers = []
        self._after_pending = None  # "shutdown" / "close" once flushed
        self._opened = aloop.create_future()
        self._closed_fut = aloop.create_future()

    # -- libduplex loop thread: hand each event to asyncio --
    def _hop(self, fn, *args):
        try:
            self._aloop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the asyncio loop is closed: nobody is listening

    def _callbacks(self):
        return dict(
            on_open=lambda c: self._hop(self._on_open),
            on_read=lambda c, data: self._hop(self._on_data, data),
            on_eof=lambda c: self._hop(self._on_eof),
            on_backpressure=lambda c, q: self._hop(self._on_bp, True),
            on_writable=lambda c: self._hop(self._on_bp, False),
            on_close=lambda c, err: self._hop(self._on_close, err))

    # -- asyncio thread --
    def _wake_reader(self):
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _wake_drainers(self):
        for f in self._drainers:
            if not f.done():
                f.set_result(None)
        self._drainers.clear()

    def _on_open(self):
        if not self._opened.done():
            self._opened.set_result(None)

    def _on_data(self, data):
        self._buf += data
        if len(self._buf) > self._limit and not self._paused:
            self._paused = True
            self._try(self.conn.pause)
        self._wake_reader()

    def _on_eof(self):
        self._eof = True
        self._wake_reader()

    def _on_bp(self, on):
        self._backpressured = on
        if not on:
            self._flush_pending()

    def _on_close(self, err):
        self._closed = True
        self._error = err
        if not self._opened.done():
            self._opened.set_exception(err or error(_ECLOSED, "connect"))
        self._pending.clear()
        self._wake_reader()
        self._wake_drainers()
        if not self._closed_fut.done():
            self._closed_fut.set_result(err)

    def _try(self, fn, *args):
        try:
            fn(*args)
        except DuplexError:
            pass  # closed meanwhile: on_close reports it

    def _flush_pending(self):
        self._marker = False
        while self._pending:
            try:
                self.conn.write(self._pending[0])
            except WouldBlock:
                self._arm_marker()
                return
            except DuplexError:
                self._pending.clear()  # closed: on_close reports why
                break
            self._pending.popleft()
        if self._after_pending is not None:
            what, self._after_pending = self._after_pending, None
            self._try(self.conn.shutdown if what == "shutdown"
                      else self.conn.close)
        self._wake_drainers()

    def _arm_marker(self):
        # A zero-length write completes once everything queued before it
        # is written: then there is room again, whatever the watermarks.
        # It costs WRITE_OVERHEAD like any write, so at the hard limit it
        # is refused too; that refusal, like the write's, marks the conn
        # congested, and on_writable (_on_bp) retries at the low watermark.
        if not self._marker:
            self._marker = True
            try:
                self.conn.write(b"", lambda err: self._hop(
                    self._flush_pending))
            except WouldBlock:
                self._marker = False  # on_writable will come
            except DuplexError:
                self._marker = False  # closed: on_close reports why

    # -- reading --
    async def _wait_data(self):
        self._reader = self._aloop.create_future()
        try:
            await self._reader
        finally:
            self._reader = None

    def _take(self, n):
        if n < 0 or n >= len(self._buf):
            data = bytes(self._buf)
            self._buf.clear()
        else:
            data = bytes(self._buf[:n])
            del self._buf[:n]
        if self._paused and len(self._buf) <= self._limit // 2:
            self._paused = False
            self._try(self.conn.resume)
        return data

    def _at_end(self):
        if self._error is not None and not self._eof:
            raise self._error
        return b""

    async def read(self, n=-1):
        """The next bytes that arrived (at most ``n``; all buffered if
        n < 0), waiting for at least one. b"" at EOF or after a clean close;
        raises the DuplexError that closed the conn otherwise."""
        while not self._buf and not (self._eof or self._closed):
            await self._wait_data()
        if not self._buf:
            return self._at_end()
        return self._take(n)

    async def readline(self):
        """Up to and including b"\\n"; the rest (maybe b"") at EOF."""
        while b"\n" not in self._buf and not (self._eof or self._closed):
            await self._wait_data()
        i = self._buf.find(b"\n")
        if i < 0 and not self._buf:
            return self._at_end()
        return self._take(i + 1 if i >= 0 else -1)

    async def readexactly(self, n):
        """Exactly ``n`` bytes, or asyncio.IncompleteReadError at EOF."""
        while len(self._buf) < n and not (self._eof or self._closed):
            await self._wait_data()
        if len(self._buf) < n:
            partial = self._take(-1)
            if self._error is not None and not self._eof:
                raise self._error
            raise asyncio.IncompleteReadError(partial, n)
        return self._take(n)

    def __aiter__(self):
        return self

    async def __anext__(self):
        data = await self.read()
        if not data:
            raise StopAsyncIteration
        return data

    # -- writing --
    def write(self, data):
        """Queue ``data`` (any bytes-like object) on the conn. Never blocks:
        bytes the conn refuses while past its hard limit are kept here, in
        order, until it drains; call ``await drain()`` to let them go.
        Raises DuplexError (ECLOSED, ESHUTDOWN) when writing is over."""
        if self._closed:
            raise error(_ECLOSED, "write")
        if self._pending:
            self._pending.append(bytes(data))
            return
        try:
            self.conn.write(data)
        except WouldBlock:
            self._pending.append(bytes(data))
            self._arm_marker()

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    async def drain(self):
        """Wait until every write was accepted by the conn and the conn is
        below its high watermark. Raises the close error if it closed."""
        while self._pending or self._backpressured:
            if self._closed:
                break
            f = self._aloop.create_future()
            self._drainers.append(f)
            await f
        if self._closed and self._error is not None:
            raise self._error

    def write_eof(self):
        """Half-close once everything written so far is flushed."""
        if self._pending:
            self._after_pending = "shutdown"
        else:
            self._try(self.conn.shutdown)

    def close(self):
        """Close gracefully once everything written so far is flushed."""
        if self._pending:
            self._after_pending = "close"
        else:
            self.conn.close()

    def abort(self):
        """Close now; pending writes are dropped."""
        self._pending.clear()
        self.conn.close(abort=True)

    def is_closing(self):
        return self._closed or self._after_pending == "close"

    async def wait_closed(self):
        """Wait for the conn's on_close; return its error (None if clean)."""
        return await self._closed_fut

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()
        await self.wait_closed()
        return False


async def _open(make, loop, limit):
    s = Stream(asyncio.get_running_loop(), limit)
    s.conn = make(loop or default_loop(), s._callbacks())
    await s._opened
    return s


async def open_connection(host, port, *, loop=None, limit=1 << 20, **kw):
    """Connect over TCP; return an open Stream. Raises the DuplexError of a
    failed connect (e.g. ConnectionRefusedError). ``loop`` is the libduplex
    Loop to use (default: default_loop()); other keyword arguments as
    duplex.connect_tcp() (limits, timeouts)."""
    return await _open(lambda dl, cbs: _core.connect_tcp(
        dl, host, port, **cbs, **kw), loop, limit)


async def open_unix_connection(path, *, loop=None, limit=1 << 20, **kw):
    """Connect to a UNIX-domain socket; as open_connection()."""
    return await _open(lambda dl, cbs: _core.connect_unix(
        dl, path, **cbs, **kw), loop, limit)


async def adopt(sock, *, loop=None, limit=1 << 20, **kw):
    """Adopt a connected socket (or fd) as a Stream; as duplex.adopt()."""
    return await _open(lambda dl, cbs: _core.adopt(dl, sock, **cbs, **kw),
                       loop, limit)
