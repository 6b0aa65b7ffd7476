"""Shared test helpers. Timeouts here are hang guards, never assertions
about speed: every wait is for an event that must happen."""
import faulthandler
import socket
import sys
import threading

import duplex
from duplex import _core

GUARD = 30  # seconds; only a test that is broken ever waits this long

# The whole run's hang guard, for the waits that have none of their own
# (thread joins, awaits): past it, print every thread's stack (so the
# output says what hung) and exit 1, before meson's 300 s timeout would
# kill the run without a word. The suite normally takes seconds. Every test
# module imports this one, so it is armed once per run.
SUITE_GUARD = 240
faulthandler.dump_traceback_later(SUITE_GUARD, exit=True, file=sys.stderr)


def handle_count():
    return len(_core._handles)


def wait(event, what="event"):
    if not event.wait(GUARD):
        raise AssertionError(f"hang guard: {what} never happened")


def socketpair(bufsize=None):
    a, b = socket.socketpair()
    if bufsize:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    return a, b


def recv_all(sock):
    """Read a plain socket until EOF."""
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class Reader(threading.Thread):
    """A plain-socket peer that reads until EOF on its own thread."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.data = None

    def run(self):
        self.data = recv_all(self.sock)

    def result(self):
        self.join(GUARD)
        if self.is_alive():
            raise AssertionError("hang guard: peer never saw EOF")
        return self.data


def echo_listener(loop, **kw):
    """A duplex TCP listener on 127.0.0.1 that echoes and half-closes back
    at EOF."""
    def accept(conn):
        conn.on_read = lambda c, data: c.write(data)
        conn.on_eof = lambda c: c.shutdown()
    return duplex.listen_tcp(loop, "127.0.0.1", 0, on_accept=accept, **kw)
