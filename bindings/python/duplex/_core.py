"""The Pythonic layer over duplex._ffi: Loop, LoopGroup, Conn, Listener,
Timer, Channel.

How C reaches Python (see docs/abi.md and docs/python.md):

- Every C callback goes through one of the module-level trampolines below.
  They are created once and referenced from this module for its whole
  life, so the C function pointers never dangle.
- The `user` pointer given to C is never a Python object address: it is an
  integer key into `_handles`, a table that holds a strong reference to the
  Python object (conn, channel, timer, pending write, channel message,
  posted function) for exactly as long as C may still hand the key back.
  Each key is removed by the callback the header promises to run exactly
  once (on_close, write done, release, post), so nothing leaks and nothing
  is used after it is gone.
- A trampoline never lets an exception escape into C: an exception from a
  user callback is stored on its Loop, which stops (run mode) or wakes its
  waiters (started mode), and is re-raised by Loop.run(), Loop.join(),
  Conn.wait_closed(), Channel.wait_closed() and Loop.close().
"""
import atexit
import collections
import ctypes
import math
import signal
import sys
import threading
import time
import traceback
from ctypes import byref, c_size_t, c_uint, c_uint16, c_void_p

from . import _ffi, _tls
from .errors import CODES, DuplexError, WouldBlock, error, check

_ECLOSED = CODES["ECLOSED"]
_EINVAL = CODES["EINVAL"]
_EDEADLK = CODES["EDEADLK"]
_ETIMEDOUT = CODES["ETIMEDOUT"]
_EWOULDBLOCK = CODES["EWOULDBLOCK"]
_ENOBUFS = CODES["ENOBUFS"]
_ENOTSUP = CODES["ENOTSUP"]
_EBUSY = CODES["EBUSY"]


# ---- the handle table ---------------------------------------------------------

class _Handles:
    """Integer keys passed to C as `void *user`, each holding one object."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items = {}
        self._next = 1  # never 0: NULL is not a valid channel message

    def add(self, obj):
        with self._lock:
            key = self._next
            self._next += 1
            self._items[key] = obj
        return key

    def get(self, key):
        return self._items.get(key)

    def pop(self, key):
        with self._lock:
            return self._items.pop(key, None)

    def __len__(self):
        return len(self._items)


_handles = _Handles()


def _err_or_none(status):
    return error(status) if status < 0 else None


def _ms(seconds, none=-1):
    """Seconds (float) -> milliseconds for C; None -> `none`."""
    if seconds is None:
        return none
    if seconds < 0:
        raise ValueError("timeout must be >= 0 or None")
    return min(int(math.ceil(seconds * 1000)), 2**31 - 1)


# ---- Ctrl-C ----------------------------------------------------------------------
# Python runs signal handlers on the main thread, between bytecodes. A main
# thread blocked inside a C call runs none, so the calls that may block
# for long wait in slices there (wait_writable, wait_room, sendall, a
# waiting Channel.send), and run() on the main thread keeps a timer that
# enters Python every _SLICE seconds. Nothing changes on other threads, which
# never see KeyboardInterrupt.

_SLICE = 0.05  # seconds


def _on_main_thread():
    return threading.current_thread() is threading.main_thread()


def _sliced(call, timeout):
    """call(ms) repeatedly for at most _SLICE each, until it returns
    something other than ETIMEDOUT or ``timeout`` seconds (None: no limit)
    passed; then ETIMEDOUT. Between slices Python runs signal handlers,
    so Ctrl-C raises KeyboardInterrupt here."""
    deadline = None if timeout is None else time.monotonic() + timeout
    slice_ms = _ms(_SLICE)
    while True:
        if deadline is None:
            ms = slice_ms
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return _ETIMEDOUT
            ms = min(slice_ms, _ms(left))
        rc = call(ms)
        if rc != _ETIMEDOUT:
            return rc


def _wait_call(call, timeout):
    """A waiting C call: call(ms) with ``timeout`` seconds (None: for
    ever), in slices on the main thread so that Ctrl-C gets through."""
    if timeout == 0 or not _on_main_thread():
        return call(_ms(timeout))
    return _sliced(call, timeout)


class _SigintGuard:
    """Keeps Ctrl-C out of callback trampolines while C runs callbacks on
    the main thread (run mode, freeing a loop).

    Entering a trampoline is where the main thread next runs bytecode, so
    that is where Python runs the pending SIGINT handler; what the handler
    raises there, before any try block, ctypes would print and drop
    ("Exception ignored on calling ctypes callback function"). So, while
    the guard is in place, the Python-level SIGINT handler is wrapped:
    what it raises (KeyboardInterrupt for the default handler) is kept in
    ``caught`` and raised by the caller once C returned. Handlers that are
    not Python callables (SIG_IGN, SIG_DFL) are left alone."""

    def __init__(self):
        self.caught = None
        self.stop = None      # set by run(): stops the loop (loop thread)
        self._prev = None
        try:
            prev = signal.getsignal(signal.SIGINT)
            if callable(prev):
                self._handler = self._on_signal
                signal.signal(signal.SIGINT, self._handler)
                self._prev = prev
        except (ValueError, OSError):  # not the main interpreter
            pass

    def _on_signal(self, signum, frame):
        try:
            self._prev(signum, frame)
        except BaseException as e:  # noqa: B036 - raised by restore()'s caller
            if self.caught is None:
                self.caught = e

    def restore(self):
        if self._prev is None:
            return
        try:
            # Unless a callback installed a handler of its own meanwhile.
            if signal.getsignal(signal.SIGINT) is self._handler:
                signal.signal(signal.SIGINT, self._prev)
        except (ValueError, OSError):
            pass
        self._prev = None


def _cstr(text, what):
    if text is None:
        return None
    b = text.encode() if isinstance(text, str) else bytes(text)
    if b"\0" in b:
        raise error(_EINVAL, what + ": NUL in string")
    return b


def _buffer(data):
    """(argument for a `const void *`, length) for any bytes-like object.
    bytes are passed as they are; writable buffers without a copy; other
    read-only buffers (e.g. a memoryview of bytes) are copied once."""
    if isinstance(data, bytes):
        return data, len(data)
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    n = mv.nbytes
    if n == 0:
        return None, 0
    if mv.readonly:
        return mv.tobytes(), n
    return (ctypes.c_char * n).from_buffer(mv), n


def _address(arg):
    if arg is None:
        return None
    if isinstance(arg, bytes):
        return ctypes.cast(ctypes.c_char_p(arg), c_void_p).value
    return ctypes.addressof(arg)


def _report_internal(exc):
    # A bug in the binding itself, outside any user callback: never let it
    # reach C; print it the way Python reports unraisable exceptions.
    try:
        sys.stderr.write("duplex: internal error in a callback trampoline:\n")
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    except BaseException:  # noqa: B036 - nothing may escape into C
        pass


def _trampoline(kind):
    """Wrap a trampoline body: nothing, ever, propagates into C."""
    def wrap(fn):
        def body(*args):
            try:
                fn(*args)
            except BaseException as e:  # noqa: B036
                _report_internal(e)
        return kind(body)
    return wrap


# ---- trampolines --------------------------------------------------------------

@_trampoline(_ffi.post_cb)
def _t_post(_loop_p, status, arg):
    item = _handles.pop(arg)
    if item is not None and status == 0:
        loop, fn, args = item
        loop._invoke(fn, *args)


def _conn_of(conn_p, user):
    obj = _handles.get(user)
    if isinstance(obj, Conn):
        if obj._p is None and not obj._dead:
            obj._p = conn_p  # callback raced the constructor's return
        return obj
    return None


@_trampoline(_ffi.open_cb)
def _t_open(conn_p, user):
    obj = _handles.get(user)
    if isinstance(obj, _AcceptSpec):
        conn = Conn._accepted(obj, conn_p, obj.loop_here())
    else:
        conn = _conn_of(conn_p, user)
        if conn is None:
            return
    conn._opened = True
    if conn._tls:
        # On the loop thread nothing waits: keep what was negotiated.
        conn._tls_info = _tls.info_of(conn_p)[1]
    if conn.on_open is not None:
        conn._loop._invoke(conn.on_open, conn)
    if isinstance(obj, _AcceptSpec) and obj.on_accept is not None:
        conn._loop._invoke(obj.on_accept, conn)


@_trampoline(_ffi.read_cb)
def _t_read(conn_p, data, length, user):
    conn = _conn_of(conn_p, user)
    if conn is not None and conn.on_read is not None:
        # The view is borrowed for this call only: copy it into bytes.
        payload = data[:length] if length else b""
        conn._loop._invoke(conn.on_read, conn, payload)


@_trampoline(_ffi.eof_cb)
def _t_eof(conn_p, user):
    conn = _conn_of(conn_p, user)
    if conn is not None:
        conn._eof = True
        if conn.on_eof is not None:
            conn._loop._invoke(conn.on_eof, conn)


@_trampoline(_ffi.backpressure_cb)
def _t_backpressure(conn_p, queued, user):
    conn = _conn_of(conn_p, user)
    if conn is not None and conn.on_backpressure is not None:
        conn._loop._invoke(conn.on_backpressure, conn, queued)


@_trampoline(_ffi.writable_cb)
def _t_writable(conn_p, user):
    conn = _conn_of(conn_p, user)
    if conn is not None and conn.on_writable is not None:
        conn._loop._invoke(conn.on_writable, conn)


@_trampoline(_ffi.close_cb)
def _t_close(conn_p, reason, user):
    conn = _conn_of(conn_p, user)
    if conn is None:
        return  # an accepted conn that closed before on_open: never seen
    _handles.pop(user)  # on_close is the last callback: drop the key
    if conn._tls and reason < 0:
        conn._tls_detail = _tls.error_text(conn_p)
    conn._set_closed(reason)
    if conn.on_close is not None:
        conn._loop._invoke(conn.on_close, conn, conn.close_error)


@_trampoline(_ffi.write_cb)
def _t_write_done(_conn_p, status, user):
    item = _handles.pop(user)
    if item is not None:
        conn, done = item
        conn._loop._invoke(done, _err_or_none(status))


@_trampoline(_ffi.write_cb)
def _t_tls_done(conn_p, status, user):
    item = _handles.pop(user)
    if item is None:
        return
    conn, done, future = item
    if status == 0:
        conn._tls_info = _tls.info_of(conn_p)[1]
        exc = None
    else:
        exc = error(status, "start_tls", _tls.error_text(conn_p))
    if done is not None:
        conn._loop._invoke(done, exc)
    if not future.done():  # set_running_or_notify_cancel() ran at start
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


@_trampoline(_ffi.release_cb)
def _t_release_zc(_data, _len, status, user):
    item = _handles.pop(user)  # drops our reference to the bytes
    if item is not None:
        conn, _data_ref, done = item
        if done is not None:
            conn._loop._invoke(done, _err_or_none(status))


@_trampoline(_ffi.listen_error_cb)
def _t_listen_error(_l, status, user):
    spec = _handles.get(user)
    if isinstance(spec, _AcceptSpec) and spec.listener is not None:
        fn = spec.listener.on_error
        if fn is not None:
            spec.loop_here()._invoke(fn, spec.listener, error(status))


@_trampoline(_ffi.channel_cb)
def _t_channel_message(_ch, data, _len, user):
    msg = _handles.pop(data)  # ownership passes to us: exactly once
    chan = _handles.get(user)
    if msg is not None and isinstance(chan, Channel):
        chan._loop._invoke(chan.on_message, msg[0])


@_trampoline(_ffi.release_cb)
def _t_channel_release(data, _len, status, user):
    msg = _handles.pop(data)  # never delivered: drop it, exactly once
    chan = _handles.get(user)
    if msg is not None and isinstance(chan, Channel):
        if chan.on_undelivered is not None:
            chan._loop._invoke(chan.on_undelivered, msg[0], error(status))


@_trampoline(_ffi.channel_close_cb)
def _t_channel_close(_ch, reason, user):
    chan = _handles.pop(user)
    if isinstance(chan, Channel):
        chan._set_closed(reason)
        if chan.on_close is not None:
            chan._loop._invoke(chan.on_close, _err_or_none(reason))


@_trampoline(_ffi.timer_cb)
def _t_timer(_t, user):
    timer = _handles.get(user)
    if isinstance(timer, Timer) and timer.callback is not None:
        timer._loop._invoke(timer.callback)


# One callback table for every conn; the `user` key selects the object.
_CBS = _ffi.conn_cbs(on_open=_t_open, on_read=_t_read, on_eof=_t_eof,
                     on_backpressure=_t_backpressure,
                     on_writable=_t_writable, on_close=_t_close)
_CBS_PTR = ctypes.pointer(_CBS)
_NO_WRITE_CB = _ffi.write_cb()  # NULL function pointer


# ---- the loop thread's Python thread state ----------------------------------------
# ctypes gives a C thread that calls into Python a thread state for that
# one call (PyGILState_Ensure ... Release): made and torn down for every
# callback, its frame stack mapped and unmapped with it. A started loop's
# thread keeps one instead, from a post right after the start until just
# before the loop is freed: one more Ensure then, and its Release at the
# end.

_gil_ensure = ctypes.pythonapi.PyGILState_Ensure
_gil_ensure.restype = ctypes.c_int
_gil_ensure.argtypes = []
_gil_release = ctypes.pythonapi.PyGILState_Release
_gil_release.restype = None
_gil_release.argtypes = [ctypes.c_int]
_pinned = {}  # loop pointer -> its thread's kept GIL state
_unpinned = {}  # loop pointer -> Event set once the state was dropped


@_trampoline(_ffi.post_cb)
def _t_pin(loop_p, status, _arg):
    if status == 0 and loop_p not in _pinned:  # 0: on the loop thread
        _pinned[loop_p] = _gil_ensure()


@_trampoline(_ffi.post_cb)
def _t_unpin(loop_p, status, _arg):
    # Only on the loop thread (status 0): released anywhere else it would
    # end the wrong thread's state.
    state = _pinned.pop(loop_p, None) if status == 0 else None
    if state is not None:
        _gil_release(state)  # the thread state goes when this call returns
    done = _unpinned.pop(loop_p, None)
    if done is not None:
        done.set()


# ---- Loop ------------------------------------------------------------------------

_live_loops = set()  # Loops and LoopGroups to close at interpreter exit

LoopStats = collections.namedtuple("LoopStats", "conns queued accepted")
LoopStats.__doc__ = """A loop's figures (duplex_loop_get_stats): ``conns``
live conns (created on the loop, on_close not yet returned), ``queued``
bytes queued for writing over them (as Conn.queued counts), ``accepted``
conns listeners accepted onto the loop in total. Each is exact at some
instant of the call; the three are not one snapshot."""


class Loop:
    """A libduplex loop.

    ``Loop()`` starts the loop on a thread the library owns
    (duplex_loop_start); that is the normal mode. ``Loop(start=False)``
    leaves it idle until you call :meth:`run` on a thread of yours.

    Use it as a context manager: leaving the block calls :meth:`close`,
    which frees the loop (closing every conn, channel, listener and timer on
    it) and re-raises an exception a callback raised, if nothing reported it
    yet. A loop still open at interpreter exit is closed by an atexit hook.

    The loops of a :class:`LoopGroup` are Loop objects too (``group.loops``),
    run and freed by their group: start(), run() and close() on one raise
    DuplexError(EBUSY) while the group is open.
    """

    _group = None  # the LoopGroup that runs and frees it, if any

    def __init__(self, *, start=True, read_buffer_size=0):
        opts = _ffi.loop_opts(read_buffer_size=read_buffer_size)
        out = c_void_p()
        check(_ffi.loop_new(byref(out), byref(opts)), "Loop")
        self._setup(out.value)
        _live_loops.add(self)
        if start:
            self.start()

    @classmethod
    def _member(cls, group, p):
        """The Loop object of a group's loop: it takes a reference of its
        own on the pointer (the group frees the loop; the reference is
        dropped once, by the group's close, after the free)."""
        self = object.__new__(cls)
        _ffi.loop_ref(p)
        self._setup(p)
        self._group = group
        self._started = True  # the group runs it on a thread of its own
        return self

    def _setup(self, p):
        self._p = p
        self._raw = p            # kept after close: compared, never used
        self._cond = threading.Condition()
        self._users = 0          # calls in flight that use the loop pointer
        self._closing = False
        self._started = False
        self._stop_requested = False
        self._failure = None     # first exception raised by a callback
        self._failure_reported = False
        self._owned = {}         # handle -> Timer/_AcceptSpec, dropped on free
        self._guard = None       # _SigintGuard of a run() on the main thread
        self._poll = None        # its Timer (see _run)

    # -- guarded access to the loop pointer (never used after free) --
    class _Use:
        __slots__ = ("loop", "what")

        def __init__(self, loop, what):
            self.loop, self.what = loop, what

        def __enter__(self):
            loop = self.loop
            with loop._cond:
                if loop._p is None or loop._closing:
                    raise error(_ECLOSED, self.what)
                loop._users += 1
                return loop._p

        def __exit__(self, *exc):
            loop = self.loop
            with loop._cond:
                loop._users -= 1
                if loop._users == 0:
                    loop._cond.notify_all()

    def _use(self, what):
        return Loop._Use(self, what)

    def _borrow(self, closing_ok=False):
        """Under _cond: the loop pointer with a reference of our own taken
        on it (drop it with _ffi.loop_unref), or None once freed (or, unless
        closing_ok, closing). For calls that must not hold up close(): if
        the loop is freed meanwhile, the reference keeps its memory, and the
        call returns DUPLEX_ECLOSED instead of touching freed memory."""
        p = self._p
        if p is None or (self._closing and not closing_ok):
            return None
        _ffi.loop_ref(p)
        return p

    # -- callbacks --
    def _invoke(self, fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: B036 - never into C
            self._fail(e)

    def _fail(self, exc):
        with self._cond:
            if self._failure is None:
                self._failure = exc
            self._stop_requested = True
            self._cond.notify_all()
            p = None if self._started else self._borrow()
        if p is not None:
            try:
                _ffi.loop_stop(p)  # run mode, on the loop thread: run() ends
            finally:
                _ffi.loop_unref(p)

    def _raise_failure(self):
        with self._cond:
            exc = self._failure
            if exc is None:
                return
            self._failure_reported = True
        raise exc

    @property
    def failure(self):
        """The first exception a callback raised, or None."""
        return self._failure

    # -- running --
    def start(self):
        """Run the loop on a thread owned by the library until close()."""
        with self._use("Loop.start") as p:
            check(_ffi.loop_start(p), "Loop.start")
            self._started = True
            _ffi.loop_post(p, _t_pin, None)  # not in the handle table

    def _unpin_thread_state(self):
        """Before the free: drop the started loop thread's kept thread
        state, on that thread (a post, waited for briefly)."""
        if not self._started:
            return
        done = threading.Event()
        with self._cond:
            p = self._borrow()
        if p is None:
            return
        try:
            _unpinned[p] = done
            if _ffi.loop_post(p, _t_unpin, None) == 0:
                done.wait(1.0)
            _unpinned.pop(p, None)
        finally:
            _ffi.loop_unref(p)

    def run(self):
        """Run the loop on this thread until stop() (or a callback raises;
        the exception is re-raised here). On the main thread Ctrl-C stops
        it too: run() raises KeyboardInterrupt (within about 50 ms; a
        callback that is running finishes first)."""
        return self._run(_ffi.RUN_DEFAULT)

    def run_once(self, wait=True):
        """One loop iteration on this thread (waiting for events if
        ``wait``). On the main thread Ctrl-C raises KeyboardInterrupt once
        the iteration is over (it does not end the wait)."""
        return self._run(_ffi.RUN_ONCE if wait else _ffi.RUN_NOWAIT)

    def _poll_tick(self):
        # Loop thread = the main thread, inside run(): entering this
        # callback ran the SIGINT handler if a signal was pending.
        guard = self._guard
        if guard is not None and guard.caught is not None and guard.stop:
            guard.stop()

    def _run(self, mode):
        self._raise_failure()
        with self._cond:
            p = self._borrow()
            if p is None:
                raise error(_ECLOSED, "Loop.run")
        # Not counted as a use: Loop.close() from another thread must be
        # able to stop a loop that runs here (duplex_loop_free does that).
        # Our reference keeps the pointer valid if it does.
        guard = poll = None
        try:
            if _on_main_thread() and not self._started:
                guard = self._guard = _SigintGuard()
                if mode == _ffi.RUN_DEFAULT and guard._prev is not None:
                    # Stopped from a callback, never from the handler: a
                    # stop made after run() returned would end the next
                    # run() early.
                    guard.stop = lambda: _ffi.loop_stop(p)
                    if self._poll is None:
                        self._poll = Timer(self, self._poll_tick)
                    poll = self._poll
                    poll.start(_SLICE, _SLICE)
            rc = _ffi.loop_run(p, mode)
        finally:
            if poll is not None:
                try:
                    poll.stop()
                except DuplexError:
                    pass  # the loop was freed meanwhile
            if guard is not None:
                self._guard = None
                guard.restore()
            _ffi.loop_unref(p)
        with self._cond:
            self._stop_requested = False
        if guard is not None and guard.caught is not None:
            raise guard.caught
        self._raise_failure()
        check(rc, "Loop.run")

    def stop(self):
        """Make run() return; in the started mode, wake join(). Any
        thread. The started loop itself keeps running until close()."""
        with self._cond:
            self._stop_requested = True
            self._cond.notify_all()
            p = self._borrow()
        if p is not None:
            try:
                _ffi.loop_stop(p)
            finally:
                _ffi.loop_unref(p)

    def join(self, timeout=None):
        """Wait (not on the loop thread) until stop() is called or a
        callback raised (then raise it). Returns False on timeout."""
        if self.on_thread():
            raise error(_EDEADLK, "Loop.join")
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._stop_requested or self._failure is not None
                or self._p is None, timeout)
        self._raise_failure()
        return done

    def post(self, fn, *args):
        """Run fn(*args) on the loop thread, in the order this thread posted.
        Any thread. If the loop is freed first, fn is dropped uncalled."""
        key = _handles.add((self, fn, args))
        try:
            with self._use("Loop.post") as p:
                rc = _ffi.loop_post(p, _t_post, key)
        except BaseException:
            _handles.pop(key)
            raise
        if rc != 0:
            _handles.pop(key)
            raise error(rc, "Loop.post")

    def on_thread(self):
        """True on the loop thread (inside a callback)."""
        with self._cond:
            p = self._borrow(closing_ok=True)
        if p is None:
            return False
        try:
            return _ffi.loop_on_thread(p) == 1
        finally:
            _ffi.loop_unref(p)

    def stats(self):
        """The loop's figures as a :class:`LoopStats` (conns, queued,
        accepted). Any thread; nothing waits for the loop. Raises ECLOSED
        once the loop was freed."""
        out = _ffi.loop_stats()
        with self._use("Loop.stats") as p:
            check(_ffi.loop_get_stats(p, byref(out)), "Loop.stats")
        return LoopStats(out.conns, out.queued, out.accepted)

    @property
    def group(self):
        """The LoopGroup this loop belongs to, or None."""
        return self._group

    @property
    def closed(self):
        return self._p is None

    def close(self):
        """Free the loop: stop it, then close everything on it; pending
        callbacks run with DUPLEX_ECANCELED on this thread before it returns
        (channel messages still queued are released exactly once). Not on
        the loop thread (DUPLEX_EDEADLK). Idempotent. Re-raises the first
        exception a callback raised, unless it was already raised by run(),
        join() or a wait_closed(). The loop's Conn, Channel, Listener and
        Timer objects stay safe to use: their calls raise ECLOSED, and
        their close() does nothing.

        A group's loop is freed by its group: close() raises EBUSY while
        the group is open, and does nothing once it was closed."""
        if self._group is not None:
            if self._p is None:
                return
            raise error(_EBUSY, "Loop.close: a LoopGroup's loop is freed "
                        "by LoopGroup.close()")
        with self._cond:
            if self._p is None or self._closing:
                return
            if _ffi.loop_on_thread(self._p) == 1:
                raise error(_EDEADLK, "Loop.close")
        self._unpin_thread_state()
        with self._cond:
            if self._p is None or self._closing:
                return  # another thread closed it meanwhile
            self._closing = True
            while self._users:
                self._cond.wait()
            p = self._p
            # Until _p is None, on_thread() may still borrow the pointer:
            # hold a reference across the free so the memory outlives it.
            _ffi.loop_ref(p)
        # Callbacks with ECANCELED run here, on this thread: keep Ctrl-C
        # out of them (see _SigintGuard) and raise it once done.
        guard = _SigintGuard() if _on_main_thread() else None
        try:
            rc = _ffi.loop_free(p)  # drops the creator's reference
        finally:
            if guard is not None:
                guard.restore()
        self._forget(p)
        _live_loops.discard(self)
        if guard is not None and guard.caught is not None:
            raise guard.caught
        check(rc, "Loop.close")
        if not self._failure_reported:
            self._raise_failure()

    def _forget(self, p):
        """After the free: mark the loop closed, drop the reference held
        across the free (the creator's went with the free) and the handle
        keys of what was on it."""
        # Its thread is gone: a state it still kept (the unpin did not run
        # in time) must not pass for that of a later loop at this address
        # (our reference keeps this one's memory until below).
        _pinned.pop(p, None)
        with self._cond:
            self._p = None
            owned, self._owned = self._owned, {}
            self._cond.notify_all()
        _ffi.loop_unref(p)
        for key in owned:  # no callback can come for these keys any more
            _handles.pop(key)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and exc is self._failure:
            self._failure_reported = True
        self.close()
        return False

    def __repr__(self):
        state = "closed" if self._p is None else (
            "started" if self._started else "idle")
        if self._group is not None:
            index = self._group._loops.index(self)
            return f"<duplex.Loop {index} of a LoopGroup, {state}>"
        return f"<duplex.Loop {state}>"


@atexit.register
def _close_live_loops():
    # A started loop's thread must not call into an interpreter that is
    # finalizing: free every loop the program left open.
    for loop in list(_live_loops):
        try:
            loop.close()
        except BaseException:  # noqa: B036 - best effort at exit
            pass


# ---- Conn ------------------------------------------------------------------------

_CONN_CALLBACKS = ("on_open", "on_read", "on_eof", "on_backpressure",
                   "on_writable", "on_close")


def _conn_opts(user, *, high_watermark=0, low_watermark=0, hard_limit=0,
               nagle=False, keepalive=False, start_paused=False,
               connect_timeout=None, idle_timeout=None, read_timeout=None,
               flush_timeout=None):
    flags = ((_ffi.CONN_NAGLE if nagle else 0)
             | (_ffi.CONN_KEEPALIVE if keepalive else 0)
             | (_ffi.CONN_START_PAUSED if start_paused else 0))
    return _ffi.conn_opts(
        cbs=_CBS_PTR, user=user, high_watermark=high_watermark,
        low_watermark=low_watermark, hard_limit=hard_limit, flags=flags,
        connect_timeout_ms=_ms(connect_timeout, 0),
        idle_timeout_ms=_ms(idle_timeout, 0),
        read_timeout_ms=_ms(read_timeout, 0),
        flush_timeout_ms=_ms(flush_timeout, 0))


def _split_callbacks(kw):
    cbs = {name: kw.pop(name) for name in _CONN_CALLBACKS if name in kw}
    return cbs, kw


class Conn:
    """One duplex byte stream owned by a loop.

    Created by connect_tcp(), connect_unix(), adopt(), adopt_pair() or a
    listener. Every method may be called from any Python thread (except the
    waiting ones, not on the loop thread). The callbacks are attributes and
    may be replaced at any time; each runs on the loop thread:

    - ``on_open(conn)``, ``on_eof(conn)``, ``on_writable(conn)``
    - ``on_read(conn, data)``: ``data`` is a bytes copy of the borrowed view
    - ``on_backpressure(conn, queued)``
    - ``on_close(conn, error)``: ``error`` is None or a DuplexError; last.

    The object holds its own reference to the C conn, so it is safe to use
    after the conn closed: calls then raise DuplexError(ECLOSED).
    """

    on_open = on_read = on_eof = on_backpressure = on_writable = None
    on_close = None

    def __init__(self):
        raise TypeError("use duplex.connect_tcp(), connect_unix(), adopt() "
                        "or a listener to get a Conn")

    @classmethod
    def _blank(cls, loop, callbacks):
        self = object.__new__(cls)
        self._loop = loop
        self._p = None
        self._dead = False
        self._opened = False
        self._eof = False
        self._closed = False
        self._close_reason = None
        self._tls = False          # TLS from the start or after start_tls
        self._tls_info = None      # kept once the handshake is done
        self._tls_detail = None    # the TLS library's words on failure
        for name, fn in callbacks.items():
            setattr(self, name, fn)
        return self

    @classmethod
    def _create(cls, loop, what, call, kw, tcp_host=None):
        callbacks, rest = _split_callbacks(dict(kw))
        tls = rest.pop("tls", None)
        hostname = rest.pop("server_hostname", None)
        if hostname is not None:
            if tls is None:
                raise ValueError(f"{what}: server_hostname is only "
                                 "meaningful with tls")
            hostname = _cstr(hostname, what)
        if tls is not None and hostname is None and tcp_host is None and \
                getattr(tls, "verify", None) == "default":
            raise error(_EINVAL, f"{what}: a verifying TLS client needs "
                        "server_hostname= (the name to check)")
        self = cls._blank(loop, callbacks)
        self._tls = tls is not None
        key = _handles.add(self)
        try:
            opts = _conn_opts(key, **rest)
            out = c_void_p()
            with _tls.use(tls, "client", what) as tp, \
                    loop._use(what) as lp:
                opts.tls = tp
                opts.tls_host = hostname
                rc = call(lp, byref(out), byref(opts))
        except BaseException:
            _handles.pop(key)
            raise
        if rc != 0:
            _handles.pop(key)
            self._dead = True
            raise error(rc, what)
        self._p = out.value
        return self

    @classmethod
    def _accepted(cls, spec, conn_p, loop):
        # Loop thread, in on_open of a conn a listener accepted: give it a
        # Python object, a reference of its own and its own user key.
        self = cls._blank(loop, spec.callbacks)
        self._tls = spec.tls
        _ffi.conn_ref(conn_p)
        self._p = conn_p
        key = _handles.add(self)
        _ffi.conn_set_user(conn_p, key)
        return self

    def _set_closed(self, reason):
        loop = self._loop
        with loop._cond:
            self._closed = True
            self._close_reason = reason
            loop._cond.notify_all()

    def _ptr(self, what):
        p = self._p
        if p is None:
            raise error(_ECLOSED, what)
        return p

    # -- writing (any thread) --
    def write(self, data, done=None):
        """Queue a copy of ``data`` (bytes, bytearray, memoryview, any
        bytes-like object). Never blocks. Writes one thread makes arrive in
        call order and are never split by another thread's write.
        ``done(error)`` (optional) runs once on the loop thread: error is
        None once the bytes went to the kernel, else a DuplexError
        (ECANCELED if the conn closed first). Raises WouldBlock when the
        write would take the queue past its hard limit (nothing was queued:
        retry after wait_writable(), or use sendall()), DuplexError ECLOSED
        / ESHUTDOWN after close / shutdown. Every queued write costs its
        length plus duplex.WRITE_OVERHEAD (64) against the limits, so an empty
        write with ``done`` (it completes once everything queued before it
        is written) can be refused too."""
        arg, n = _buffer(data)
        if done is None:
            rc = _ffi.conn_write(self._ptr("write"), arg, n, _NO_WRITE_CB,
                                 None)
        else:
            key = _handles.add((self, done))
            rc = _ffi.conn_write(self._ptr("write"), arg, n, _t_write_done,
                                 key)
            if rc != 0:
                _handles.pop(key)
        if rc != 0:
            raise error(rc, "write")

    def writev(self, buffers, done=None):
        """Write several buffers as one unsplittable write (copied)."""
        parts = [_buffer(b) for b in buffers]
        arr = (_ffi.buf * max(len(parts), 1))()
        for i, (arg, n) in enumerate(parts):
            arr[i].base = _address(arg)
            arr[i].len = n
        key = None if done is None else _handles.add((self, done))
        rc = _ffi.conn_writev(self._ptr("writev"), arr, len(parts),
                              _NO_WRITE_CB if done is None else _t_write_done,
                              key)
        if rc != 0:
            if key is not None:
                _handles.pop(key)
            raise error(rc, "writev")

    def write_zc(self, data, done=None):
        """Zero-copy write of a ``bytes`` object: the conn keeps a reference
        to it until the library releases the buffer (exactly once), then
        ``done(error)`` runs. Otherwise as write()."""
        if not isinstance(data, bytes):
            raise TypeError("write_zc needs bytes (immutable)")
        key = _handles.add((self, data, done))
        rc = _ffi.conn_write_zc(self._ptr("write_zc"), _address(data),
                                len(data), _t_release_zc, key)
        if rc != 0:
            _handles.pop(key)
            raise error(rc, "write_zc")

    def sendall(self, data, timeout=None, done=None):
        """write(), but when the conn is past its hard limit wait until it
        has room for the write (wait_room()) and retry. Not on the loop
        thread (DUPLEX_EDEADLK).
        Raises TimeoutError (a DuplexError, ETIMEDOUT) after ``timeout``
        seconds; None waits as long as it takes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        size = None
        while True:
            try:
                return self.write(data, done)
            except WouldBlock:
                if size is None:
                    size = memoryview(data).nbytes
                left = (None if deadline is None
                        else max(0.0, deadline - time.monotonic()))
                # Wait for exactly the room this write needs (an empty
                # queue takes any write), then retry: another thread may
                # have taken the room first, so the retry can be refused
                # again, but only after the queue moved.
                if not self.wait_room(size, left):
                    raise error(_ETIMEDOUT, "sendall") from None

    def shutdown(self, done=None):
        """Half-close: after every write queued before it is flushed, close
        the write side; reading goes on until the peer's EOF. Later writes
        raise ESHUTDOWN. ``done(error)`` as for write()."""
        key = None if done is None else _handles.add((self, done))
        rc = _ffi.conn_shutdown(self._ptr("shutdown"),
                                _NO_WRITE_CB if done is None
                                else _t_write_done, key)
        if rc != 0:
            if key is not None:
                _handles.pop(key)
            raise error(rc, "shutdown")

    def close(self, abort=False):
        """Close the conn: gracefully (writes queued before are flushed
        first; on_close gets None) or, with ``abort=True``, at once (pending
        writes complete with ECANCELED, a TCP peer sees a reset, and
        on_close gets ConnectionAbortedError, DUPLEX_ECONNABORTED).
        Idempotent; on_close runs once."""
        p = self._p
        if p is None:
            return
        rc = _ffi.conn_close(p, _ffi.CLOSE_ABORT if abort
                             else _ffi.CLOSE_GRACEFUL)
        if rc not in (0, _ECLOSED):
            raise error(rc, "close")

    # -- flow control --
    def pause(self):
        """Stop reading (from another thread, a read already being
        delivered may still arrive)."""
        check(_ffi.conn_pause(self._ptr("pause")), "pause")

    def resume(self):
        """Resume reading after pause() or start_paused=True."""
        check(_ffi.conn_resume(self._ptr("resume")), "resume")

    def wait_writable(self, timeout=None):
        """Block until the conn is writable (below its high watermark, or
        back at the low watermark after backpressure or a refused write).
        True when writable; False when it still is not once ``timeout``
        seconds passed (``0`` polls without waiting: the library's
        DUPLEX_EWOULDBLOCK; a positive timeout that expires: its
        DUPLEX_ETIMEDOUT). Raises ECLOSED if the conn closes, WouldDeadlock
        (EDEADLK) on the loop thread."""
        p = self._ptr("wait_writable")
        rc = _wait_call(lambda ms: _ffi.conn_wait_writable(p, ms), timeout)
        if rc in (_ETIMEDOUT, _EWOULDBLOCK):
            return False
        check(rc, "wait_writable")
        return True

    def wait_room(self, size, timeout=None):
        """Block until a write of ``size`` bytes would be taken: the queue
        is empty (an empty queue takes a write of any size) or it fits
        under the hard limit (``size`` plus duplex.WRITE_OVERHEAD). Returns
        True then, False when it still does not fit after ``timeout``
        seconds (``0`` checks without waiting). Another thread may take
        the room first: retry the write, wait again if it is refused.
        Raises ECLOSED if the conn closes, WouldDeadlock on the loop
        thread."""
        if size < 0:
            raise ValueError("size must be >= 0")
        p = self._ptr("wait_room")
        rc = _wait_call(lambda ms: _ffi.conn_wait_room(p, size, ms), timeout)
        if rc in (_ETIMEDOUT, _EWOULDBLOCK):
            return False
        check(rc, "wait_room")
        return True

    def set_timeout(self, kind, seconds):
        """Change a deadline: kind is "connect", "idle", "read" or "flush";
        seconds None or 0 turns it off."""
        if kind not in _ffi.TIMEOUT_KINDS:
            raise ValueError(f"unknown timeout kind {kind!r}")
        check(_ffi.conn_set_timeout(self._ptr("set_timeout"),
                                    _ffi.TIMEOUT_KINDS[kind],
                                    _ms(seconds, 0)), "set_timeout")

    # -- state --
    @property
    def queued(self):
        """What is queued for writing and not yet completed, as the
        watermarks and the hard limit count it: the payload bytes plus
        ``duplex.WRITE_OVERHEAD`` (64) per queued write, so a
        zero-length write with ``done`` counts too. 0 once the conn is
        closed (after an abort returned, or from on_close on)."""
        out = c_size_t()
        check(_ffi.conn_get_queued(self._ptr("queued"), byref(out)), "queued")
        return out.value

    def _name(self, fn, what):
        size = 128
        while True:
            buf = ctypes.create_string_buffer(size)
            rc = fn(self._ptr(what), buf, size)
            if rc != _ENOBUFS or size > 65536:
                check(rc, what)
                return buf.value.decode(errors="surrogateescape")
            size *= 4

    @property
    def peer(self):
        """The peer's address: "1.2.3.4:80", "[::1]:80", a socket path, or
        "" for unnamed peers (socketpairs, pipes). Raises ENOTCONN before
        the conn opened. An accepted or adopted conn reads it off the
        socket the first time (off the loop thread that waits for the
        loop) and keeps it."""
        return self._name(_ffi.conn_get_peer, "peer")

    @property
    def local(self):
        """The conn's own address, in the same forms as ``peer``:
        "127.0.0.1:40312", "[::1]:40312", the path a UNIX listener accepted
        on, or "" for unnamed ends (a UNIX client, socketpairs, pipes).
        Read off the socket on each call (off the loop thread that waits
        for the loop). Raises ENOTCONN before the conn opened, ECLOSED once
        it closed."""
        return self._name(_ffi.conn_get_local, "local")

    @property
    def loop(self):
        return self._loop

    @property
    def opened(self):
        return self._opened

    @property
    def eof(self):
        """True once the peer's EOF arrived."""
        return self._eof

    @property
    def closed(self):
        """True once on_close ran."""
        return self._closed

    @property
    def close_error(self):
        """None while open or after a clean close (graceful, or both
        directions finished), else the DuplexError: ConnectionAbortedError
        (ECONNABORTED) after close(abort=True), ECANCELED when the loop was
        freed, or the error that closed it."""
        r = self._close_reason
        return error(r, None, self._tls_detail) if r else None

    # -- TLS --
    def start_tls(self, tls, server_hostname=None, done=None):
        """Upgrade this plaintext conn to TLS (STARTTLS): once every write
        this thread queued before is flushed, the conn speaks TLS with
        ``tls`` (a :class:`duplex.TLSConfig`) in its role, beginning with
        the handshake. Writes made after this call are encrypted after the
        handshake, in order; bytes read from then on are TLS. A client
        checks ``server_hostname`` (default: the host given to
        connect_tcp(); required otherwise unless ``verify="none"``).

        Returns a ``concurrent.futures.Future``: its result is None once
        the handshake is done; if it fails, the conn closes and the
        future's exception is the error (TLSVerifyError, TLSError, ...,
        with the TLS library's reason; ECANCELED if the conn closed
        before the upgrade began). ``done(error)`` (optional) runs on the
        loop thread first. Waiting on the future inside a callback of
        the conn's loop would deadlock. Raises EBUSY if the conn is TLS
        already or an upgrade is queued, ESHUTDOWN / ECLOSED after
        shutdown / close."""
        import concurrent.futures
        host = _cstr(server_hostname, "start_tls")
        future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # it cannot be cancelled
        key = _handles.add((self, done, future))
        try:
            with _tls.use(tls, tls.role if isinstance(tls, _tls.TLSConfig)
                          else "client", "start_tls") as tp:
                rc = _ffi.conn_start_tls(self._ptr("start_tls"), tp, host,
                                         _t_tls_done, key)
        except BaseException:
            _handles.pop(key)
            raise
        if rc != 0:
            _handles.pop(key)
            raise error(rc, "start_tls")
        self._tls = True
        return future

    def tls_info(self):
        """What the TLS handshake negotiated, a :class:`duplex.TLSInfo`
        (version, cipher, ALPN protocol, SNI, peer subject, resumption),
        or None for a conn that does not speak TLS. Available from
        ``on_open`` (or the end of start_tls()) on, also after the conn
        closed; before the handshake is done it raises ENOTCONN."""
        info = self._tls_info
        if info is not None:
            return info
        rc, info = _tls.info_of(self._ptr("tls_info"))
        if rc == _ENOTSUP:
            return None
        check(rc, "tls_info")
        self._tls_info = info
        return info

    @property
    def tls_error(self):
        """Why TLS failed on this conn, in the TLS library's words (e.g.
        "certificate verify failed: unable to get local issuer
        certificate"), or None while nothing failed. The close error
        carries the same text as its ``detail``."""
        if self._tls_detail is not None:
            return self._tls_detail
        p = self._p
        return _tls.error_text(p) if p is not None else None

    def wait_closed(self, timeout=None):
        """Block (not on the loop thread) until on_close ran; return the
        close error (None for a clean close). Raises TimeoutError after
        ``timeout`` seconds, and re-raises an exception a callback of the
        loop raised meanwhile."""
        return _wait(self._loop, lambda: self._closed, timeout,
                     "Conn.wait_closed", lambda: self.close_error)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        p, self._p = getattr(self, "_p", None), None
        if p is not None:
            try:
                _ffi.conn_unref(p)
            except Exception:  # interpreter shutdown
                pass

    def __repr__(self):
        state = ("closed" if self._closed else
                 "open" if self._opened else "opening")
        return f"<duplex.Conn {state}>"


def _wait(loop, pred, timeout, what, result):
    if loop.on_thread():
        raise error(_EDEADLK, what)
    with loop._cond:
        ok = loop._cond.wait_for(
            lambda: pred() or loop._failure is not None or loop._p is None,
            timeout)
    if not pred():
        loop._raise_failure()
        if not ok:
            raise error(_ETIMEDOUT, what)
    return result()


def _port(port, what):
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise error(_EINVAL, f"{what}: port {port!r}")
    return port


def connect_tcp(loop, host, port, **kw):
    """Connect over TCP to ``host`` (a name, IPv4 or IPv6 address) and
    ``port``. Returns a Conn at once; ``on_open`` runs when connected, and
    a failure (ECONNREFUSED, EAI_NONAME, ...) arrives as ``on_close(conn,
    error)`` / ``wait_closed()``. Writes made before it opens are queued.

    Keyword arguments: the callbacks (on_open, on_read, on_eof,
    on_backpressure, on_writable, on_close), high_watermark,
    low_watermark, hard_limit (bytes), nagle, keepalive, start_paused
    (bools), connect_timeout, idle_timeout, read_timeout, flush_timeout
    (seconds), ``tls`` (a client-role duplex.TLSConfig: the conn speaks
    TLS and on_open runs once the handshake is done; a failed handshake
    closes it with TLSVerifyError / TLSError / TimeoutError) and
    ``server_hostname`` (the name sent as SNI and checked against the
    certificate; default ``host``). Bad arguments raise
    DuplexError(EINVAL)."""
    h = _cstr(host, "connect_tcp")
    _port(port, "connect_tcp")
    return Conn._create(loop, "connect_tcp",
                        lambda lp, out, o: _ffi.conn_connect_tcp(
                            out, lp, h, port, o), kw, tcp_host=h)


def connect_unix(loop, path, **kw):
    """Connect to a UNIX-domain socket; otherwise as connect_tcp() (with
    ``tls``, a verifying client needs ``server_hostname``)."""
    p = _cstr(path, "connect_unix")
    return Conn._create(loop, "connect_unix",
                        lambda lp, out, o: _ffi.conn_connect_unix(
                            out, lp, p, o), kw)


def adopt(loop, sock, **kw):
    """Adopt a connected stream: a socket object (detached from Python on
    success) or an fd (owned by the conn on success, still yours on
    failure). Keyword arguments as connect_tcp()."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    conn = Conn._create(loop, "adopt",
                        lambda lp, out, o: _ffi.conn_adopt(out, lp, fd, o),
                        kw)
    if not isinstance(sock, int):
        sock.detach()
    return conn


def adopt_pair(loop, read_fd, write_fd, **kw):
    """Adopt two one-way fds (e.g. 0 and 1) as one conn; shutdown() closes
    write_fd. Both are owned by the conn on success."""
    return Conn._create(loop, "adopt_pair",
                        lambda lp, out, o: _ffi.conn_adopt_pair(
                            out, lp, read_fd, write_fd, o), kw)


# ---- references to timers and listeners -----------------------------------------

class _Ref:
    """Our reference to a C timer or listener (duplex_timer_new and
    duplex_listener_* hand one out; the loop holds its own while the object
    is open). Calls borrow the pointer; retire() stops the lending and
    returns it for one last call (the close). The reference is dropped with
    `unref` exactly once, by whichever finishes last: the retiring call or
    a borrower still in flight. So no call uses a dropped pointer, and no
    lock is held while close waits in C (a timer's close waits for its
    running callback, which may itself borrow the pointer)."""

    __slots__ = ("_lock", "_p", "_unref", "_users", "_retired")

    def __init__(self, p, unref):
        self._lock = threading.Lock()
        self._p = p
        self._unref = unref
        self._users = 0
        self._retired = False

    @property
    def retired(self):
        return self._retired

    def borrow(self, what):
        with self._lock:
            if self._retired:
                raise error(_ECLOSED, what)
            self._users += 1
            return self._p

    def retire(self):
        """The pointer for a last call, or None if already retired. Either
        way pair it with give_back() unless it returned None."""
        with self._lock:
            if self._retired:
                return None
            self._retired = True
            self._users += 1
            return self._p

    def give_back(self):
        with self._lock:
            self._users -= 1
            p = None
            if self._retired and self._users == 0:
                p, self._p = self._p, None
        if p is not None:
            self._unref(p)

    def call(self, fn, what, *args):
        """fn(pointer, *args) on a borrowed pointer; raises for a negative
        result (ECLOSED once retired)."""
        p = self.borrow(what)
        try:
            rc = fn(p, *args)
        finally:
            self.give_back()
        return check(rc, what)

    def close(self, close_fn):
        """Close (close_fn) and drop our reference, once. Returns close_fn's
        result, or None if already retired. DUPLEX_ECLOSED from close_fn
        means the loop was freed (or closed it) first: nothing to do."""
        p = self.retire()
        if p is None:
            return None
        try:
            return close_fn(p)
        finally:
            self.give_back()


# ---- Listener --------------------------------------------------------------------

class _AcceptSpec:
    """What a listener's accepted conns start with; its key is the `user`
    of the listener's conn options, so it lives until the loop (or group)
    is freed: an accept a loop thread is delivering while another thread
    closes the listener still finds it. `owner` is the Loop, or the
    LoopGroup of a group listener, whose conns open on any of its loops."""

    def __init__(self, owner, on_accept, callbacks, tls=False):
        self.owner = owner
        self.on_accept = on_accept
        self.callbacks = callbacks
        self.tls = tls
        self.listener = None

    def loop_here(self):
        """On a loop thread (on_open, on_error): the Loop running it."""
        owner = self.owner
        return owner if isinstance(owner, Loop) else owner._loop_here()


class Listener:
    """Accepts conns on TCP or a UNIX path.

    ``on_accept(conn)`` runs on the loop thread for each accepted conn,
    which already has the callbacks given to listen_*() (set others on it
    there). ``on_error(listener, error)`` reports a failed accept. A group
    listener (LoopGroup.listen_tcp/listen_unix) is a Listener too: each
    conn is accepted onto one of the group's loops, and its on_accept and
    callbacks run on that loop's thread (``conn.loop``).

    The object holds a reference to the C listener and drops it once, in
    close() (or when collected, closing first). Freeing the loop (the
    group) closes the listener; the object then stays safe: ``port`` and
    ``address`` raise ECLOSED, close() does nothing."""

    _ref = None

    def __init__(self):
        raise TypeError("use duplex.listen_tcp(), listen_unix() or a "
                        "LoopGroup's listen_tcp() / listen_unix()")

    @classmethod
    def _create(cls, owner, what, call, on_accept, on_error, backlog, flags,
                mode, kw):
        # owner: the Loop, or the LoopGroup (same _use, _cond, _owned).
        callbacks, rest = _split_callbacks(dict(kw))
        tls = rest.pop("tls", None)
        spec = _AcceptSpec(owner, on_accept, callbacks, tls is not None)
        key = _handles.add(spec)
        self = object.__new__(cls)
        self._owner = owner
        self.on_error = on_error
        self.tls = tls
        try:
            copts = _conn_opts(key, **rest)
            lopts = _ffi.listener_opts(conn_opts=ctypes.pointer(copts),
                                       on_error=_t_listen_error, user=key,
                                       backlog=backlog, flags=flags,
                                       mode=mode)
            out = c_void_p()
            with _tls.use(tls, "server", what) as tp, owner._use(what) as lp:
                lopts.tls = tp
                rc = call(lp, byref(out), byref(lopts))
                if rc == 0:
                    # At once: accepts use only the spec, but an on_error
                    # the loop reports before this line finds no listener
                    # (and is dropped).
                    self._ref = _Ref(out.value, _ffi.listener_unref)
                    spec.listener = self
                    with owner._cond:
                        owner._owned[key] = spec
        except BaseException:
            _handles.pop(key)
            raise
        if rc != 0:
            _handles.pop(key)
            raise error(rc, what)
        return self

    def _query(self, fn, what, *args):
        # Not after the loop was freed (ECLOSED), like the other objects.
        with self._owner._use(what):
            return self._ref.call(fn, what, *args)

    @property
    def port(self):
        """The bound TCP port (None for a UNIX listener)."""
        out = c_uint16()
        try:
            self._query(_ffi.listener_get_port, "Listener.port", byref(out))
        except DuplexError as e:
            if e.code == _ENOTSUP:
                return None
            raise
        return out.value

    @property
    def address(self):
        """The bound address: "127.0.0.1:4000", "[::1]:4000" or the path."""
        buf = ctypes.create_string_buffer(1024)
        self._query(_ffi.listener_get_address, "Listener.address", buf,
                    len(buf))
        return buf.value.decode(errors="surrogateescape")

    @property
    def closed(self):
        """True after close(), or once the loop (group) was freed."""
        return self._ref.retired or self._owner.closed

    def close(self):
        """Stop accepting (conns already accepted stay open): no accept
        starts after this returns. Idempotent, and a no-op once the loop
        was freed. Drops the object's reference to the C listener."""
        rc = self._ref.close(_ffi.listener_close)
        if rc is not None and rc not in (0, _ECLOSED):
            raise error(rc, "Listener.close")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        ref = self._ref
        if ref is not None:
            try:
                ref.close(_ffi.listener_close)
            except Exception:  # interpreter shutdown
                pass

    def __repr__(self):
        return f"<duplex.Listener {'closed' if self.closed else 'open'}>"


def listen_tcp(loop, host, port=0, *, on_accept=None, on_error=None,
               backlog=0, ipv6only=False, **kw):
    """Listen on TCP. ``host``: a numeric IPv4/IPv6 address, "localhost",
    or None for every IPv4 address. Port 0 picks a free port (see
    Listener.port). Bound and listening when this returns. ``tls``: a
    server-role duplex.TLSConfig; every conn then speaks TLS, and
    on_accept runs once its handshake is done (a conn whose handshake
    fails is closed and never seen). Other keyword arguments (callbacks,
    limits) apply to every accepted conn, as for connect_tcp()."""
    h = _cstr(host, "listen_tcp")
    _port(port, "listen_tcp")
    return Listener._create(
        loop, "listen_tcp",
        lambda lp, out, o: _ffi.listener_tcp(out, lp, h, port, o),
        on_accept, on_error, backlog,
        _ffi.LISTEN_IPV6ONLY if ipv6only else 0, 0, kw)


def listen_unix(loop, path, *, on_accept=None, on_error=None, backlog=0,
                mode=0, **kw):
    """Listen on a UNIX-domain socket path (removed on close); ``mode``
    sets its permission bits. Otherwise as listen_tcp()."""
    p = _cstr(path, "listen_unix")
    return Listener._create(
        loop, "listen_unix",
        lambda lp, out, o: _ffi.listener_unix(out, lp, p, o),
        on_accept, on_error, backlog, 0, mode, kw)

# ---- LoopGroup -------------------------------------------------------------------

_here = threading.local()  # a group loop's thread: its Loop (see _loop_here)


class LoopGroup:
    """N loops, each run by a thread the library owns (duplex_group_*): a
    server that uses every core.

    ``LoopGroup(loops=0, pin=False)`` makes the loops (0: one per CPU the
    process may run on) and starts their threads; ``pin=True`` pins loop
    i's thread to the i-th CPU of the process's affinity mask (Linux only:
    elsewhere DuplexError ENOTSUP). ``read_buffer_size`` is passed to every
    loop, as for Loop().

    ``loops`` are ordinary Loop objects: conns, channels, timers and posts
    work on them unchanged, and a conn stays on its loop (every callback of
    it runs on that loop's thread). The group runs and frees them:
    start(), run() and close() on one raise EBUSY. ``pick()`` returns the
    least-loaded loop, for an outgoing conn; ``listen_tcp()`` and
    ``listen_unix()`` listen for the whole group and spread accepted conns
    over the loops; ``stats()`` reads every loop's figures.

    Use it as a context manager: leaving the block calls :meth:`close`,
    which frees every loop (as Loop.close() does) and re-raises the first
    exception a callback raised, if nothing reported it yet. A group still
    open at interpreter exit is closed by the atexit hook."""

    def __init__(self, loops=0, *, pin=False, read_buffer_size=0):
        if not isinstance(loops, int) or isinstance(loops, bool) or \
                not 0 <= loops <= _ffi.GROUP_MAX_LOOPS:
            raise error(_EINVAL, f"LoopGroup: loops {loops!r} (0 to "
                        f"{_ffi.GROUP_MAX_LOOPS})")
        lopts = _ffi.loop_opts(read_buffer_size=read_buffer_size)
        opts = _ffi.group_opts(loops=loops,
                               flags=_ffi.GROUP_PIN if pin else 0,
                               loop_opts=ctypes.pointer(lopts))
        out = c_void_p()
        check(_ffi.group_new(byref(out), byref(opts)), "LoopGroup")
        p = out.value
        self._p = p
        self._cond = threading.Condition()
        self._users = 0      # calls in flight that use the group pointer
        self._closing = False
        self._owned = {}     # handle -> _AcceptSpec of its listeners
        self._loops = ()
        try:
            count = c_uint()
            check(_ffi.group_get_count(p, byref(count)), "LoopGroup")
            members = []
            for i in range(count.value):
                lp = c_void_p()
                check(_ffi.group_get_loop(p, i, byref(lp)), "LoopGroup")
                members.append(Loop._member(self, lp.value))
                self._loops = tuple(members)
            check(_ffi.group_start(p), "LoopGroup")
        except BaseException:
            _ffi.group_free(p)  # nothing ran on the loops yet
            for loop in self._loops:
                loop._forget(loop._p)
            self._p = None
            raise
        self._by_ptr = {loop._raw: loop for loop in self._loops}
        for loop in self._loops:
            # Each thread keeps one Python thread state, as a started
            # Loop's does (not in the handle table).
            _ffi.loop_post(loop._raw, _t_pin, None)
        _live_loops.add(self)

    def _use(self, what):
        return Loop._Use(self, what)  # the same guard: _cond, _p, _users

    def _loop_here(self):
        """The Loop whose thread calls this (an accept's on_open, a
        listener's on_error); loops[0] if none (never expected)."""
        loop = getattr(_here, "loop", None)
        if loop is not None and loop._group is self and \
                _ffi.loop_on_thread(loop._raw) == 1:
            return loop
        for loop in self._loops:
            if _ffi.loop_on_thread(loop._raw) == 1:
                _here.loop = loop
                return loop
        return self._loops[0]

    @property
    def loops(self):
        """The group's loops (a tuple of Loop), in index order. The objects
        stay after close(); their calls then raise ECLOSED."""
        return self._loops

    def __len__(self):
        return len(self._loops)

    def pick(self):
        """The least-loaded loop: the one with the fewest live conns, ties
        broken round-robin; a conn counts from its creation, so a burst of
        picks spreads too. Use it for an outgoing conn:
        ``duplex.connect_tcp(group.pick(), host, port, ...)``."""
        out = c_void_p()
        with self._use("LoopGroup.pick") as p:
            check(_ffi.group_pick(p, byref(out)), "LoopGroup.pick")
        return self._by_ptr[out.value]

    def stats(self):
        """Every loop's figures, a list of LoopStats in index order."""
        with self._use("LoopGroup.stats"):
            return [loop.stats() for loop in self._loops]

    def listen_tcp(self, host, port=0, *, reuseport=False, on_accept=None,
                   on_error=None, backlog=0, ipv6only=False, **kw):
        """Listen on TCP for the whole group; returns a Listener. Arguments
        as duplex.listen_tcp(). Balanced (the default): loop 0 accepts and
        hands each conn to the loop with the fewest live conns, where it
        opens. ``reuseport=True``: one SO_REUSEPORT socket per loop, each
        accepting onto its own loop; the kernel spreads clients by a hash
        of their addresses, so shares are uneven with few clients (Linux
        only, else ENOTSUP). ``on_accept(conn)`` and the conn's callbacks
        run on the thread of the conn's loop (``conn.loop``);
        ``on_error`` on the loop whose socket failed."""
        h = _cstr(host, "LoopGroup.listen_tcp")
        _port(port, "LoopGroup.listen_tcp")
        flags = ((_ffi.LISTEN_IPV6ONLY if ipv6only else 0)
                 | (_ffi.LISTEN_REUSEPORT if reuseport else 0))
        return Listener._create(
            self, "LoopGroup.listen_tcp",
            lambda gp, out, o: _ffi.group_listen_tcp(out, gp, h, port, o),
            on_accept, on_error, backlog, flags, 0, kw)

    def listen_unix(self, path, *, on_accept=None, on_error=None, backlog=0,
                    mode=0, **kw):
        """Listen on a UNIX-domain socket for the whole group (balanced
        only); otherwise as listen_tcp() and duplex.listen_unix()."""
        p = _cstr(path, "LoopGroup.listen_unix")
        return Listener._create(
            self, "LoopGroup.listen_unix",
            lambda gp, out, o: _ffi.group_listen_unix(out, gp, p, o),
            on_accept, on_error, backlog, 0, mode, kw)

    @property
    def closed(self):
        return self._p is None

    def close(self):
        """Free the group: stop its threads, then free every loop as
        Loop.close() does (every conn closes with ECANCELED, pending writes
        complete, listeners, channels and timers close; those callbacks run
        on this thread before it returns). Not on one of the group's loop
        threads (WouldDeadlock). Idempotent. Re-raises the first exception
        a callback on any of the loops raised, unless run(), join() or a
        wait_closed() already raised it. The Loop, Conn, Listener, Channel
        and Timer objects stay safe to use: their calls raise ECLOSED."""
        with self._cond:
            if self._p is None or self._closing:
                return
        if any(loop.on_thread() for loop in self._loops):
            raise error(_EDEADLK, "LoopGroup.close")
        for loop in self._loops:
            loop._unpin_thread_state()
        with self._cond:
            if self._p is None or self._closing:
                return  # another thread closed it meanwhile
            self._closing = True
            while self._users:
                self._cond.wait()
            p = self._p
        for loop in self._loops:
            with loop._cond:
                loop._closing = True
                while loop._users:
                    loop._cond.wait()
        # Callbacks with ECANCELED run here, on this thread: keep Ctrl-C
        # out of them (see _SigintGuard) and raise it once done.
        guard = _SigintGuard() if _on_main_thread() else None
        try:
            rc = _ffi.group_free(p)  # drops the creator's reference
        finally:
            if guard is not None:
                guard.restore()
        if rc == _EDEADLK:
            # On another group's (or a Loop's) thread: nothing happened.
            for loop in self._loops:
                with loop._cond:
                    loop._closing = False
                _ffi.loop_post(loop._raw, _t_pin, None)
            with self._cond:
                self._closing = False
                self._cond.notify_all()
            raise error(rc, "LoopGroup.close")
        for loop in self._loops:
            loop._forget(loop._raw)  # drops the Loop's own reference
        with self._cond:
            self._p = None
            owned, self._owned = self._owned, {}
            self._cond.notify_all()
        for key in owned:  # no accept can come for these keys any more
            _handles.pop(key)
        _live_loops.discard(self)
        if guard is not None and guard.caught is not None:
            raise guard.caught
        check(rc, "LoopGroup.close")
        for loop in self._loops:
            if not loop._failure_reported:
                loop._raise_failure()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None:
            for loop in self._loops:
                if exc is loop._failure:
                    loop._failure_reported = True
        self.close()
        return False

    def __repr__(self):
        state = "closed" if self._p is None else "started"
        return f"<duplex.LoopGroup of {len(self._loops)} loops, {state}>"


# ---- Timer -----------------------------------------------------------------------

class Timer:
    """A one-shot or repeating ``callback()`` on the loop thread. Times are
    in seconds.

    The object holds a reference to the C timer and drops it once, in
    close() (or when collected, closing first). Freeing the loop closes
    the timer; the object then stays safe: start() and stop() raise
    ECLOSED, close() does nothing."""

    _ref = None

    def __init__(self, loop, callback):
        self._loop = loop
        self.callback = callback
        key = _handles.add(self)
        try:
            out = c_void_p()
            with loop._use("Timer") as lp:
                rc = _ffi.timer_new(byref(out), lp, _t_timer, key)
                if rc == 0:
                    self._ref = _Ref(out.value, _ffi.timer_unref)
                    self._key = key
                    with loop._cond:
                        loop._owned[key] = self
        except BaseException:
            _handles.pop(key)
            raise
        if rc != 0:
            _handles.pop(key)
            raise error(rc, "Timer")

    def start(self, timeout, repeat=0):
        """Fire after ``timeout`` seconds, then every ``repeat`` seconds
        (0: once). Restarting resets it."""
        self._ref.call(_ffi.timer_start, "Timer.start", _ms(timeout),
                       _ms(repeat))

    def stop(self):
        """Stop. From another thread an expiry being delivered may still
        run once."""
        self._ref.call(_ffi.timer_stop, "Timer.stop")

    @property
    def closed(self):
        """True after close(), or once the loop was freed."""
        return self._ref.retired or self._loop.closed

    def close(self):
        """Stop the timer for good: its callback never starts after this
        returns. Idempotent, and a no-op once the loop was freed. From
        another thread it waits for a running callback. Drops the object's
        reference to the C timer."""
        rc = self._ref.close(_ffi.timer_close)
        if rc is None:
            return
        with self._loop._cond:
            self._loop._owned.pop(self._key, None)
        _handles.pop(self._key)  # no callback starts any more
        if rc not in (0, _ECLOSED):
            raise error(rc, "Timer.close")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        # Collected: the handle table no longer holds it, so it was closed
        # or its loop was freed; drop the reference if close() did not.
        ref = self._ref
        if ref is not None:
            try:
                ref.close(_ffi.timer_close)
            except Exception:  # interpreter shutdown
                pass

    def __repr__(self):
        return f"<duplex.Timer {'closed' if self.closed else 'open'}>"


# ---- Channel ---------------------------------------------------------------------

class Channel:
    """A multi-producer queue of Python objects, delivered on the loop
    thread: ``on_message(obj)`` runs once per object, in per-thread send
    order. Any thread may send(). ``on_close(error)`` runs last: error is
    None after close() (every queued object was delivered first), or
    DuplexError(ECANCELED) when the loop was freed. Objects never delivered
    (loop freed) are dropped exactly once, after
    ``on_undelivered(obj, error)`` if given. ``capacity`` bounds the queue
    (0: unbounded)."""

    def __init__(self, loop, on_message, on_close=None, *, capacity=0,
                 on_undelivered=None):
        if on_message is None:
            raise error(_EINVAL, "Channel: on_message is required")
        self._loop = loop
        self.on_message = on_message
        self.on_close = on_close
        self.on_undelivered = on_undelivered
        self._p = None
        self._closed = False
        self._close_reason = None
        key = _handles.add(self)
        try:
            opts = _ffi.channel_opts(on_message=_t_channel_message,
                                     on_close=_t_channel_close, user=key,
                                     capacity=capacity)
            out = c_void_p()
            with loop._use("Channel") as lp:
                rc = _ffi.channel_new(byref(out), lp, byref(opts))
        except BaseException:
            _handles.pop(key)
            raise
        if rc != 0:
            _handles.pop(key)
            raise error(rc, "Channel")
        self._key = key
        self._p = out.value

    def _ptr(self, what):
        if self._p is None:
            raise error(_ECLOSED, what)
        return self._p

    def send(self, obj, timeout=None):
        """Send any Python object. When the channel is full: wait for room
        (timeout None), raise WouldBlock at once (0), or raise TimeoutError
        after ``timeout`` seconds. Waiting is refused on the loop thread
        (EDEADLK). Raises ECLOSED after close()."""
        p = self._ptr("Channel.send")
        msg = _handles.add((obj,))  # before the send: delivery may be at once
        # Ctrl-C between two slices leaves msg in the table: the last
        # slice may have taken it, and then it must still be delivered.
        rc = _wait_call(lambda ms: _ffi.channel_send_ptr(
            p, msg, 0, _t_channel_release, self._key, ms), timeout)
        if rc != 0:
            _handles.pop(msg)  # the library did not take it
            raise error(rc, "Channel.send")

    def close(self):
        """Stop accepting; what is queued is still delivered, then
        on_close(None). Idempotent."""
        rc = _ffi.channel_close(self._ptr("Channel.close"))
        if rc not in (0, _ECLOSED):
            raise error(rc, "Channel.close")

    @property
    def pending(self):
        out = c_size_t()
        check(_ffi.channel_get_pending(self._ptr("Channel.pending"),
                                       byref(out)), "Channel.pending")
        return out.value

    def _set_closed(self, reason):
        with self._loop._cond:
            self._closed = True
            self._close_reason = reason
            self._loop._cond.notify_all()

    @property
    def closed(self):
        """True once on_close ran."""
        return self._closed

    def wait_closed(self, timeout=None):
        """As Conn.wait_closed(), for the channel's on_close."""
        return _wait(self._loop, lambda: self._closed, timeout,
                     "Channel.wait_closed",
                     lambda: _err_or_none(self._close_reason or 0))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self.close()
        return False

    def __del__(self):
        p, self._p = getattr(self, "_p", None), None
        if p is not None:
            try:
                _ffi.channel_unref(p)
            except Exception:
                pass
