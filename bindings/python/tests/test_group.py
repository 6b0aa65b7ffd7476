"""Loop groups: duplex.LoopGroup over duplex_group_* (duplex.h, "Loop
groups"). N loops on N library threads; a group listener spreads accepted
conns over them, pick() places outgoing ones; the group frees its loops,
whose Loop objects never free them themselves."""
import collections
import os
import socket
import sys
import tempfile
import threading
import time
import unittest

import duplex
from duplex import _ffi, errors

from helpers import GUARD, echo_listener, handle_count, recv_all, wait


def echo(conn):
    conn.on_read = lambda c, data: c.write(data)
    conn.on_eof = lambda c: c.shutdown()


class Accepted:
    """on_accept for a group listener: makes the conn an echo, and records
    its loop and whether on_accept ran on that loop's thread."""

    def __init__(self, expect):
        self.lock = threading.Lock()
        self.conns = []
        self.on_own_thread = []
        self.expect = expect
        self.all_in = threading.Event()

    def __call__(self, conn):
        echo(conn)
        with self.lock:
            self.conns.append(conn)
            self.on_own_thread.append(conn.loop.on_thread())
            if len(self.conns) == self.expect:
                self.all_in.set()

    def per_loop(self, group):
        with self.lock:
            count = collections.Counter(group.loops.index(c.loop)
                                        for c in self.conns)
        return [count[i] for i in range(len(group.loops))]


def eventually(pred, what):
    """Poll pred() until true (figures settle once on_close returned,
    just after the Python callback ran)."""
    deadline = time.monotonic() + GUARD
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"hang guard: {what}")
        time.sleep(0.001)


def echo_clients(test, connect, n):
    """n plain-socket clients, all connected before any sends."""
    socks = [connect() for _ in range(n)]
    for s in socks:
        s.settimeout(GUARD)
    return socks


def check_echoes(test, socks):
    """Each client sends its own payload, half-closes and must read it
    back whole, up to the EOF."""
    for i, s in enumerate(socks):
        payload = b"client %d " % i + b"x" * (i * 997)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        test.assertEqual(recv_all(s), payload)
        s.close()


class CallLog:
    """Wraps _ffi functions (looked up at call time): records (name,
    pointer, result) per call."""

    def __init__(self, test, names):
        self.calls = []
        self._lock = threading.Lock()
        for name in names:
            orig = getattr(_ffi, name)
            test.addCleanup(setattr, _ffi, name, orig)
            setattr(_ffi, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        def call(p, *args):
            rc = orig(p, *args)
            with self._lock:
                self.calls.append((name, p, rc))
            return rc
        return call

    def on(self, p):
        with self._lock:
            return [(n, rc) for n, q, rc in self.calls if q == p]


class GroupTest(unittest.TestCase):
    def setUp(self):
        self.handles = handle_count()

    def tearDown(self):
        self.assertEqual(handle_count(), self.handles)  # nothing leaked

    def test_loops_are_loop_objects_the_group_runs(self):
        with duplex.LoopGroup(3) as group:
            self.assertEqual(len(group), 3)
            self.assertEqual(len(group.loops), 3)
            self.assertFalse(group.closed)
            ran = []
            done = threading.Event()

            def where(i):
                ran.append((i, [lp.on_thread() for lp in group.loops]))
                if len(ran) == 3:
                    done.set()
            for i, loop in enumerate(group.loops):
                self.assertIsInstance(loop, duplex.Loop)
                self.assertIs(loop.group, group)
                self.assertFalse(loop.closed)
                loop.post(where, i)
            wait(done, "posts on every loop")
            for i, flags in ran:  # each post ran on its own loop's thread
                self.assertEqual(flags, [j == i for j in range(3)])
            # Timers and channels work on a group's loop unchanged.
            fired, got = threading.Event(), []
            with duplex.Timer(group.loops[1], fired.set) as timer:
                timer.start(0.001)
                wait(fired, "timer")
            chan = duplex.Channel(group.loops[2], on_message=got.append)
            chan.send("hello")
            chan.close()
            self.assertIsNone(chan.wait_closed(GUARD))
            self.assertEqual(got, ["hello"])
        with duplex.Loop(start=False) as plain:
            self.assertIsNone(plain.group)

    def test_a_group_loop_is_not_started_run_or_freed_by_itself(self):
        with duplex.LoopGroup(2) as group:
            loop = group.loops[0]
            for call in (loop.start, loop.run, loop.run_once, loop.close):
                with self.assertRaises(duplex.DuplexError) as cm:
                    call()
                self.assertEqual(cm.exception.code, errors.EBUSY, call)
            with self.assertRaises(duplex.DuplexError) as cm:
                with loop:
                    pass
            self.assertEqual(cm.exception.code, errors.EBUSY)
            self.assertFalse(loop.closed)  # still running: posts work
            ran = threading.Event()
            loop.post(ran.set)
            wait(ran, "post after the refused close")
        loop.close()  # the group freed it: a no-op now
        self.assertTrue(loop.closed)

    def test_balanced_listener_spreads_30_clients_evenly_and_echoes(self):
        with duplex.LoopGroup(3) as group:
            accepted = Accepted(30)
            with group.listen_tcp("127.0.0.1", 0,
                                  on_accept=accepted) as listener:
                port = listener.port
                self.assertEqual(listener.address, f"127.0.0.1:{port}")
                socks = echo_clients(
                    self, lambda: socket.create_connection(
                        ("127.0.0.1", port), timeout=GUARD), 30)
                wait(accepted.all_in, "30 accepts")
                shares = [st.accepted for st in group.stats()]
                self.assertEqual(sum(shares), 30)
                self.assertLessEqual(max(shares) - min(shares), 1, shares)
                # The Python side agrees: each conn's loop, and on_accept
                # ran on that loop's thread.
                self.assertEqual(accepted.per_loop(group), shares)
                self.assertTrue(all(accepted.on_own_thread))
                self.assertEqual([st.conns for st in group.stats()], shares)
                for i, loop in enumerate(group.loops):
                    self.assertEqual(loop.stats(), group.stats()[i])
                check_echoes(self, socks)
                for conn in accepted.conns:
                    self.assertIsNone(conn.wait_closed(GUARD))
                eventually(lambda: [(st.conns, st.queued)
                                    for st in group.stats()] == [(0, 0)] * 3,
                           "no live conn, nothing queued")
                self.assertEqual([st.accepted for st in group.stats()],
                                 shares)

    @unittest.skipUnless(sys.platform.startswith("linux"),
                         "SO_REUSEPORT group listeners are Linux only")
    def test_reuseport_listener_accepts_on_every_loop_it_hashes_to(self):
        with duplex.LoopGroup(3) as group:
            accepted = Accepted(12)
            listener = group.listen_tcp("127.0.0.1", 0, reuseport=True,
                                        on_accept=accepted)
            socks = echo_clients(
                self, lambda: socket.create_connection(
                    ("127.0.0.1", listener.port), timeout=GUARD), 12)
            wait(accepted.all_in, "12 accepts")
            shares = [st.accepted for st in group.stats()]
            self.assertEqual(sum(shares), 12)  # uneven is allowed here
            self.assertEqual(accepted.per_loop(group), shares)
            self.assertTrue(all(accepted.on_own_thread))
            check_echoes(self, socks)
            listener.close()
            self.assertTrue(listener.closed)

    def test_unix_listener_spreads_and_echoes(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "group.sock")
            with duplex.LoopGroup(3) as group:
                accepted = Accepted(9)
                listener = group.listen_unix(path, on_accept=accepted)
                self.assertIsNone(listener.port)
                self.assertEqual(listener.address, path)

                def connect():
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(path)
                    return s
                socks = echo_clients(self, connect, 9)
                wait(accepted.all_in, "9 accepts")
                shares = accepted.per_loop(group)
                self.assertLessEqual(max(shares) - min(shares), 1, shares)
                self.assertEqual([st.accepted for st in group.stats()],
                                 shares)
                check_echoes(self, socks)
                listener.close()
            self.assertFalse(os.path.exists(path))

    def test_pick_spreads_9_outgoing_conns_3_3_3(self):
        with duplex.Loop() as server_loop, duplex.LoopGroup(3) as group:
            server = echo_listener(server_loop)
            conns, got = [], collections.defaultdict(list)
            for i in range(9):
                loop = group.pick()
                self.assertIs(loop.group, group)
                conn = duplex.connect_tcp(
                    loop, "127.0.0.1", server.port,
                    on_read=lambda c, d: got[id(c)].append(d))
                conns.append(conn)
            count = collections.Counter(group.loops.index(c.loop)
                                        for c in conns)
            self.assertEqual(sorted(count.values()), [3, 3, 3])
            self.assertEqual([st.conns for st in group.stats()], [3, 3, 3])
            for i, conn in enumerate(conns):
                conn.write(b"conn %d" % i)
                conn.shutdown()
            for i, conn in enumerate(conns):
                self.assertIsNone(conn.wait_closed(GUARD))
                self.assertEqual(b"".join(got[id(conn)]), b"conn %d" % i)
            self.assertEqual([st.accepted for st in group.stats()],
                             [0, 0, 0])  # outgoing conns are not accepts

    def test_close_with_live_conns_and_pending_writes(self):
        # Peers that never read: accepted conns (group listener) and
        # outgoing ones (pick) with writes stuck in their queues, and a
        # thread blocked in sendall() at a hard limit. Closing the group
        # must end each exactly once and not hang.
        lock = threading.Lock()
        closes = collections.Counter()   # id(conn) -> on_close calls
        reasons = {}
        dones = collections.Counter()    # write number -> done calls
        statuses = {}
        issued = [0]
        chunk = b"z" * (256 << 10)

        def on_close(conn, err):
            with lock:
                closes[id(conn)] += 1
                reasons[id(conn)] = err

        def write_done(n):
            def done(err):
                with lock:
                    dones[n] += 1
                    statuses[n] = err
            return done

        def fill(conn, count):
            for _ in range(count):
                with lock:
                    n = issued[0]
                    issued[0] += 1
                conn.write(chunk, done=write_done(n))

        server_conns = []
        opened = threading.Event()

        def on_accept(conn):
            conn.on_close = on_close
            with lock:
                server_conns.append(conn)
                if len(server_conns) == 3:
                    opened.set()
            fill(conn, 32)  # 8 MiB: far more than the socket buffers take

        def small_rcvbuf(sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            return sock

        # A plain listener that never accepts: the kernel completes the
        # connections, nobody reads.
        sink = small_rcvbuf(socket.socket())
        sink.bind(("127.0.0.1", 0))
        sink.listen(16)
        peers = []
        group = duplex.LoopGroup(3)
        listener = group.listen_tcp("127.0.0.1", 0, on_accept=on_accept)
        for _ in range(3):
            s = small_rcvbuf(socket.socket())
            s.connect(("127.0.0.1", listener.port))
            peers.append(s)
        wait(opened, "3 accepts")
        outgoing = [duplex.connect_tcp(group.pick(), "127.0.0.1",
                                       sink.getsockname()[1],
                                       on_close=on_close)
                    for _ in range(3)]
        for conn in outgoing:
            fill(conn, 32)
        blocked = duplex.connect_tcp(group.pick(), "127.0.0.1",
                                     sink.getsockname()[1],
                                     on_close=on_close, hard_limit=1 << 20)
        writer_result = []

        def writer():
            try:
                while True:
                    with lock:
                        n = issued[0]
                        issued[0] += 1
                    try:
                        blocked.sendall(chunk, done=write_done(n))
                    except BaseException:
                        with lock:
                            issued[0] -= 1  # refused: never queued
                        raise
            except duplex.DuplexError as e:
                writer_result.append(e)

        writer_thread = threading.Thread(target=writer, daemon=True)
        writer_thread.start()
        for conn in server_conns + outgoing:
            self.assertGreater(conn.queued, 0)  # pending, nobody reads

        closer = threading.Thread(target=group.close, daemon=True)
        closer.start()
        closer.join(GUARD)
        self.assertFalse(closer.is_alive(), "hang guard: group close")
        writer_thread.join(GUARD)
        self.assertFalse(writer_thread.is_alive(), "hang guard: sendall")
        self.assertTrue(group.closed)

        self.assertEqual(writer_result[0].code, errors.ECLOSED)
        every = server_conns + outgoing + [blocked]
        self.assertEqual(len(closes), 7)
        self.assertEqual(set(closes.values()), {1})  # exactly once each
        for conn in every:
            self.assertTrue(conn.closed)
            self.assertEqual(reasons[id(conn)].code, errors.ECANCELED)
            self.assertEqual(conn.close_error.code, errors.ECANCELED)
        self.assertEqual(len(dones), issued[0])  # every write's done ran
        self.assertEqual(set(dones.values()), {1})  # exactly once
        canceled = [n for n, err in statuses.items() if err is not None]
        self.assertTrue(canceled)  # the close really found writes pending
        for n in canceled:
            self.assertEqual(statuses[n].code, errors.ECANCELED)
        for s in peers:
            s.close()
        sink.close()

    def test_use_after_close_raises_eclosed(self):
        with tempfile.TemporaryDirectory() as tmp:
            group = duplex.LoopGroup(2)
            listener = group.listen_tcp("127.0.0.1", 0)
            loop = group.loops[1]
            conn = duplex.connect_tcp(loop, "127.0.0.1", listener.port)
            timer = duplex.Timer(loop, lambda: None)
            group.close()
            self.assertTrue(group.closed)
            self.assertTrue(listener.closed)
            self.assertTrue(all(lp.closed for lp in group.loops))
            calls = {
                "pick": group.pick,
                "stats": group.stats,
                "listen_tcp": lambda: group.listen_tcp("127.0.0.1", 0),
                "listen_unix": lambda: group.listen_unix(
                    os.path.join(tmp, "s")),
                "Loop.stats": loop.stats,
                "Loop.post": lambda: loop.post(print),
                "connect_tcp": lambda: duplex.connect_tcp(
                    loop, "127.0.0.1", 1),
                "Timer": lambda: duplex.Timer(loop, print),
                "Channel": lambda: duplex.Channel(loop, print),
                "Listener.port": lambda: listener.port,
                "Conn.write": lambda: conn.write(b"x"),
                "Timer.start": lambda: timer.start(1),
            }
            for name, call in calls.items():
                with self.assertRaises(duplex.DuplexError, msg=name) as cm:
                    call()
                self.assertEqual(cm.exception.code, errors.ECLOSED, name)
            # Closing again, in any way, does nothing.
            group.close()
            with group:
                pass
            loop.close()
            listener.close()
            timer.close()
            conn.close()
            self.assertEqual(len(group.loops), 2)

    def test_every_reference_is_dropped_exactly_once(self):
        log = CallLog(self, ("group_free", "loop_ref", "loop_unref",
                             "listener_close", "listener_unref"))
        group = duplex.LoopGroup(3)
        gp = group._p
        loops = [lp._raw for lp in group.loops]
        listener = group.listen_tcp("127.0.0.1", 0)
        lp_ptr = listener._ref._p
        group.stats()
        group.pick().on_thread()
        # Concurrent closes: the group is freed once.
        threads = [threading.Thread(target=group.close) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(GUARD)
        group.close()
        self.assertEqual(log.on(gp), [("group_free", 0)])
        for p in loops:
            calls = [n for n, _ in log.on(p)]
            # The Loop object's own reference plus the short borrows:
            # as many unrefs as refs, none failing, nothing after the last.
            self.assertEqual(calls.count("loop_ref"),
                             calls.count("loop_unref"), calls)
            self.assertTrue(all(rc == 0 for _, rc in log.on(p)), calls)
            self.assertEqual(calls[-1], "loop_unref")
        # The group's free closed the listener; our reference is dropped
        # by close() (a no-op close) exactly once.
        listener.close()
        listener.close()
        self.assertEqual([n for n, _ in log.on(lp_ptr)],
                         ["listener_close", "listener_unref"])

    def test_close_on_a_loop_thread_would_deadlock(self):
        with duplex.LoopGroup(2) as group:
            result = []
            done = threading.Event()

            def inside():
                try:
                    group.close()
                except BaseException as e:  # noqa: B036
                    result.append(e)
                done.set()
            group.loops[1].post(inside)
            wait(done, "close from the loop thread")
            self.assertIsInstance(result[0], duplex.WouldDeadlock)
            self.assertFalse(group.closed)
            group.stats()  # still usable
        self.assertTrue(group.closed)

    def test_close_on_another_loops_thread_is_refused_and_undone(self):
        other = duplex.Loop()
        with duplex.LoopGroup(2) as group:
            result = []
            done = threading.Event()

            def inside():
                try:
                    group.close()
                except BaseException as e:  # noqa: B036
                    result.append(e)
                done.set()
            other.post(inside)
            wait(done, "close from another loop's thread")
            self.assertIsInstance(result[0], duplex.WouldDeadlock)
            self.assertFalse(group.closed)
            with duplex.Loop() as server_loop:  # the group still serves
                server = echo_listener(server_loop)
                got = []
                conn = duplex.connect_tcp(
                    group.pick(), "127.0.0.1", server.port,
                    on_read=lambda c, d: got.append(d))
                conn.write(b"still here")
                conn.shutdown()
                self.assertIsNone(conn.wait_closed(GUARD))
                self.assertEqual(b"".join(got), b"still here")
        other.close()

    def test_a_callback_exception_is_raised_by_close(self):
        boom = ValueError("boom in on_accept")
        raised = threading.Event()

        def on_accept(conn):
            raised.set()
            raise boom

        group = duplex.LoopGroup(2)
        listener = group.listen_tcp("127.0.0.1", 0, on_accept=on_accept)
        with socket.create_connection(("127.0.0.1", listener.port)):
            wait(raised, "on_accept")
            eventually(lambda: any(lp.failure is boom for lp in group.loops),
                       "the failure recorded")
        with self.assertRaises(ValueError) as cm:
            group.close()
        self.assertIs(cm.exception, boom)
        group.close()  # reported once

    def test_loop_count_and_options(self):
        for bad in (-1, _ffi.GROUP_MAX_LOOPS + 1, "3", 2.0, True):
            with self.assertRaises(duplex.DuplexError, msg=repr(bad)) as cm:
                duplex.LoopGroup(bad)
            self.assertEqual(cm.exception.code, errors.EINVAL)
        with duplex.LoopGroup() as group:  # one loop per usable CPU
            if hasattr(os, "sched_getaffinity"):
                self.assertEqual(len(group.loops),
                                 len(os.sched_getaffinity(0)))
            self.assertGreaterEqual(len(group.loops), 1)
        if sys.platform.startswith("linux"):
            with duplex.LoopGroup(2, pin=True, read_buffer_size=4096) as g:
                self.assertEqual(len(g.loops), 2)
                self.assertEqual(repr(g),
                                 "<duplex.LoopGroup of 2 loops, started>")
            self.assertEqual(repr(g), "<duplex.LoopGroup of 2 loops, closed>")

    def test_asyncio_streams_on_a_group_loop(self):
        # duplex.aio takes any Loop, a group's too (conns on that one loop;
        # see docs/python.md for why there is no start_server(loops=N)).
        import asyncio
        import duplex.aio

        async def main(group):
            async def handle(reader, writer):
                writer.write(await reader.read())
                writer.write_eof()
                await writer.drain()
                writer.close()
            server = await duplex.aio.start_server(
                handle, "127.0.0.1", 0, duplex_loop=group.loops[1])
            port = server.sockets[0].getsockname()[1]
            reader, writer = await duplex.aio.open_connection(
                "127.0.0.1", port, duplex_loop=group.pick())
            writer.write(b"over the group")
            writer.write_eof()
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()
            return data

        with duplex.LoopGroup(2) as group:
            data = asyncio.run(asyncio.wait_for(main(group), GUARD))
            self.assertEqual(data, b"over the group")
            self.assertEqual([st.accepted for st in group.stats()], [0, 1])

    def test_plain_loop_stats(self):
        with duplex.Loop() as loop:
            self.assertEqual(loop.stats(), duplex.LoopStats(0, 0, 0))
            server = echo_listener(loop)
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(b"ping")
                self.assertEqual(s.recv(4), b"ping")
                st = loop.stats()
                self.assertEqual((st.conns, st.accepted), (1, 1))
        with self.assertRaises(duplex.DuplexError) as cm:
            loop.stats()
        self.assertEqual(cm.exception.code, errors.ECLOSED)


if __name__ == "__main__":
    unittest.main()
