import os
import tempfile
import threading
import unittest

import duplex
from duplex import errors

from helpers import (GUARD, Reader, echo_listener, handle_count, socketpair,
                     wait)


class ConcurrentWriteTest(unittest.TestCase):
    def test_writes_from_many_threads_keep_order_and_are_never_split(self):
        threads_n, per_thread = 6, 1500
        a, b = socketpair()
        peer = Reader(b)  # a plain blocking socket checks what arrives
        peer.start()
        start = threading.Barrier(threads_n)
        kinds = (bytes, bytearray, memoryview)

        def producer(conn, t):
            start.wait()
            for i in range(per_thread):
                body = b"%d:%d:" % (t, i) + b"x" * ((i * 7 + t) % 300)
                line = kinds[i % 3](bytes(body) + b"\n")
                conn.sendall(line)  # waits if past the hard limit

        with duplex.Loop() as loop:
            # Small limits so that backpressure really happens.
            conn = duplex.adopt(loop, a, high_watermark=16 << 10,
                                hard_limit=64 << 10)
            threads = [threading.Thread(target=producer, args=(conn, t))
                       for t in range(threads_n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            conn.shutdown()  # after every write above is flushed
            data = peer.result()
            conn.close()
            self.assertIsNone(conn.wait_closed(GUARD))
        b.close()

        lines = data.split(b"\n")
        self.assertEqual(lines.pop(), b"")  # ends with a whole line
        self.assertEqual(len(lines), threads_n * per_thread)
        next_seq = [0] * threads_n
        for line in lines:
            t, i, pad = line.split(b":")  # a split write would break this
            t, i = int(t), int(i)
            self.assertEqual(i, next_seq[t])  # per-thread call order
            self.assertEqual(pad, b"x" * ((i * 7 + t) % 300))
            next_seq[t] += 1
        self.assertEqual(next_seq, [per_thread] * threads_n)


class HalfCloseTest(unittest.TestCase):
    def test_shutdown_then_peer_sees_eof_while_we_still_read(self):
        a, b = socketpair()
        got, events = [], []
        shut = threading.Event()
        with duplex.Loop() as loop:
            conn = duplex.adopt(
                loop, a, on_read=lambda c, d: got.append(d),
                on_eof=lambda c: events.append("eof"),
                on_close=lambda c, e: events.append(("close", e)))
            conn.write(b"request")
            conn.shutdown(done=lambda err: (events.append(("shut", err)),
                                            shut.set()))
            # The peer reads our request up to EOF, then still answers.
            self.assertEqual(Reader(b).run() or None, None)
            wait(shut, "shutdown done")
            b.sendall(b"reply after your EOF")
            b.close()
            self.assertIsNone(conn.wait_closed(GUARD))  # both ways done
        self.assertEqual(b"".join(got), b"reply after your EOF")
        self.assertEqual(events, [("shut", None), "eof", ("close", None)])
        self.assertTrue(conn.eof)

    def test_peer_request_response_ending(self):
        with duplex.Loop() as loop:
            server = echo_listener(loop)
            got = []
            conn = duplex.connect_tcp(loop, "localhost", server.port,
                                      on_read=lambda c, d: got.append(d))
            conn.write(b"ping")  # queued before the conn opens
            conn.shutdown()
            self.assertIsNone(conn.wait_closed(GUARD))
            self.assertEqual(b"".join(got), b"ping")
            self.assertEqual(conn.peer, f"127.0.0.1:{server.port}")


class ConnFeatureTest(unittest.TestCase):
    def setUp(self):
        self.loop = duplex.Loop()
        self.handles = handle_count()

    def tearDown(self):
        self.loop.close()
        self.assertEqual(handle_count(), self.handles)

    def test_start_paused_and_resume(self):
        a, b = socketpair()
        got = []
        conn = duplex.adopt(self.loop, a, start_paused=True,
                            on_read=lambda c, d: got.append(d))
        b.sendall(b"held until resume")
        b.shutdown(1)
        conn.resume()
        conn.shutdown()
        self.assertIsNone(conn.wait_closed(GUARD))
        self.assertEqual(b"".join(got), b"held until resume")
        b.close()

    def test_pause_on_the_loop_thread_stops_reads_until_resume(self):
        a, b = socketpair()
        got = []
        paused_at = []

        def on_read(c, data):
            got.append(data)
            if len(got) == 1:
                c.pause()  # on the loop thread: no read callback after it
                paused_at.append(len(got))
                self.loop.post(lambda: (paused_at.append(len(got)),
                                        c.resume()))
        conn = duplex.adopt(self.loop, a, on_read=on_read)
        b.sendall(b"first")
        b.sendall(b"second")
        b.shutdown(1)
        conn.shutdown()
        self.assertIsNone(conn.wait_closed(GUARD))
        self.assertEqual(b"".join(got), b"firstsecond")
        self.assertEqual(paused_at[0], paused_at[1])
        b.close()

    def test_write_zc_and_writev_complete_exactly_once(self):
        a, b = socketpair()
        peer = Reader(b)
        peer.start()
        done = []
        conn = duplex.adopt(self.loop, a)
        conn.write_zc(b"zero-copy|", done=lambda e: done.append(("zc", e)))
        conn.writev([b"head|", bytearray(b"body|"), memoryview(b"tail")],
                    done=lambda e: done.append(("v", e)))
        conn.write(b"", done=lambda e: done.append(("flush", e)))
        with self.assertRaises(TypeError):
            conn.write_zc(bytearray(b"mutable"))
        conn.shutdown()
        self.assertEqual(peer.result(), b"zero-copy|head|body|tail")
        conn.close()
        conn.wait_closed(GUARD)
        self.assertEqual(done, [("zc", None), ("v", None), ("flush", None)])
        b.close()

    def test_backpressure_would_block_and_wait_writable(self):
        a, b = socketpair(bufsize=16 << 10)
        events = []
        conn = duplex.adopt(self.loop, a, high_watermark=64 << 10,
                            hard_limit=128 << 10,
                            on_backpressure=lambda c, q: events.append("bp"),
                            on_writable=lambda c: events.append("writable"))
        self.assertTrue(conn.wait_writable(0))
        chunk = b"y" * (16 << 10)
        sent = 0
        with self.assertRaises(duplex.WouldBlock) as cm:
            while sent < (64 << 20):  # bounded: the peer never reads
                conn.write(chunk)
                sent += len(chunk)
        self.assertIsInstance(cm.exception, BlockingIOError)
        self.assertEqual(cm.exception.code, errors.EWOULDBLOCK)
        self.assertLess(sent, 64 << 20)
        self.assertGreater(conn.queued, 64 << 10)
        # 0 does not wait (the library's EWOULDBLOCK), a positive timeout
        # that expires is its ETIMEDOUT: both are False here.
        self.assertFalse(conn.wait_writable(0))
        self.assertFalse(conn.wait_writable(0.02))
        peer = Reader(b)
        peer.start()  # now the peer drains everything
        self.assertTrue(conn.wait_writable(GUARD))
        conn.sendall(chunk)  # the refused write, retried
        sent += len(chunk)
        conn.shutdown()
        self.assertEqual(len(peer.result()), sent)
        b.close()  # our read side sees EOF: both directions are done
        self.assertIsNone(conn.wait_closed(GUARD))
        self.assertEqual(events[:2], ["bp", "writable"])

    def test_queued_counts_each_write_with_its_overhead(self):
        # An idle loop writes nothing: the queue is exactly what was taken.
        a, b = socketpair()
        loop = duplex.Loop(start=False)
        ov = duplex.WRITE_OVERHEAD
        self.assertEqual(ov, 64)
        done = []
        try:
            conn = duplex.adopt(loop, a, high_watermark=200,
                                low_watermark=10, hard_limit=300)
            self.assertEqual(conn.queued, 0)
            conn.write(b"x" * 100)
            self.assertEqual(conn.queued, 100 + ov)
            conn.write(b"")  # no bytes, nobody to tell: costs nothing
            self.assertEqual(conn.queued, 100 + ov)
            conn.write(b"", done=done.append)  # a flush marker costs
            conn.writev([b"ab", b"cd"])  # one write, one overhead
            self.assertEqual(conn.queued, 104 + 3 * ov)  # 296 of 300
            # At the hard limit a zero-length write with a callback is
            # refused like any other, and nothing was queued.
            with self.assertRaises(duplex.WouldBlock):
                conn.write(b"", done=done.append)
            self.assertEqual(conn.queued, 104 + 3 * ov)
            self.assertFalse(conn.wait_writable(0))  # congested, no wait
        finally:
            loop.close()
        self.assertEqual([e.code for e in done], [errors.ECANCELED])
        self.assertEqual(conn.queued, 0)  # closed
        b.close()

    def test_abort_reports_econnaborted_and_queued_drops_to_zero(self):
        a, b = socketpair(bufsize=16 << 10)
        done = []
        conn = duplex.adopt(self.loop, a)
        chunk = b"q" * (64 << 10)
        for _ in range(4):  # the peer never reads: some of this stays
            conn.write(chunk, done=done.append)
        self.assertGreater(conn.queued, 0)
        conn.close(abort=True)
        self.assertEqual(conn.queued, 0)  # 0 once the abort returned
        err = conn.wait_closed(GUARD)
        self.assertIsInstance(err, ConnectionAbortedError)
        self.assertEqual(err.code, errors.ECONNABORTED)
        self.assertEqual(conn.close_error.code, errors.ECONNABORTED)
        self.assertIn(errors.ECANCELED, [e and e.code for e in done])
        b.close()

    def test_sendall_of_writes_that_never_fit_at_the_low_watermark(self):
        # Each write is bigger than hard limit - low watermark: refused
        # until the queue is empty. sendall waits (no flush marker, which
        # could be refused too), never spins, and loses nothing.
        a, b = socketpair(bufsize=16 << 10)
        peer = Reader(b)
        peer.start()
        conn = duplex.adopt(self.loop, a, high_watermark=32 << 10,
                            low_watermark=8 << 10, hard_limit=64 << 10)
        chunk = bytes(range(256)) * 240  # 60 KiB
        for _ in range(40):
            conn.sendall(chunk, timeout=GUARD)
        conn.shutdown()
        self.assertEqual(peer.result(), chunk * 40)
        b.close()
        self.assertIsNone(conn.wait_closed(GUARD))

    def test_wait_room_waits_for_the_room_a_write_needs(self):
        # An idle loop writes nothing, so the queue holds still.
        a, b = socketpair()
        loop = duplex.Loop(start=False)
        ov = duplex.WRITE_OVERHEAD
        try:
            conn = duplex.adopt(loop, a, high_watermark=200,
                                low_watermark=10, hard_limit=300)
            self.assertTrue(conn.wait_room(10 ** 6, 0))  # empty: any size
            conn.write(b"x" * 100)
            self.assertTrue(conn.wait_room(300 - 100 - 2 * ov, 0))
            self.assertFalse(conn.wait_room(300 - 100 - 2 * ov + 1, 0))
            self.assertFalse(conn.wait_room(300 - 100 - 2 * ov + 1, 0.02))
            with self.assertRaises(ValueError):
                conn.wait_room(-1)
        finally:
            loop.close()
        with self.assertRaises(duplex.DuplexError) as cm:
            conn.wait_room(1)
        self.assertEqual(cm.exception.code, errors.ECLOSED)
        b.close()

    def test_wait_room_on_the_loop_thread_would_deadlock(self):
        a, b = socketpair()
        got = []

        def on_open(c):
            try:
                c.wait_room(1)
            except duplex.WouldDeadlock as e:
                got.append(e.code)
            c.close()

        conn = duplex.adopt(self.loop, a, on_open=on_open)
        conn.wait_closed(GUARD)
        self.assertEqual(got, [errors.EDEADLK])
        b.close()

    def test_unix_socket_listener(self):
        d = tempfile.mkdtemp()
        path = os.path.join(d, "sock")
        got = []
        server = duplex.listen_unix(self.loop, path, on_read=lambda c, d:
                                    (c.write(d.upper())),
                                    on_eof=lambda c: c.shutdown())
        self.assertIsNone(server.port)
        self.assertEqual(server.address, path)
        conn = duplex.connect_unix(self.loop, path,
                                   on_read=lambda c, d: got.append(d))
        conn.write(b"over unix")
        conn.shutdown()
        self.assertIsNone(conn.wait_closed(GUARD))
        self.assertEqual(b"".join(got), b"OVER UNIX")
        self.assertEqual(conn.peer, path)
        server.close()
        server.close()
        # The close completes on the loop; freeing the loop completes it
        # for sure (the header gives no completion callback).
        self.loop.close()
        self.assertFalse(os.path.exists(path))
        os.rmdir(d)

    def test_local_and_peer_addresses(self):
        # TCP: each end's local address is the other end's peer address.
        accepted = []
        seen = threading.Event()

        def on_accept(c):  # loop thread: the names come at once
            accepted.append((c.local, c.peer))
            seen.set()

        server = duplex.listen_tcp(self.loop, "127.0.0.1", 0,
                                   on_accept=on_accept)
        opened = threading.Event()
        conn = duplex.connect_tcp(self.loop, "127.0.0.1", server.port,
                                  on_open=lambda c: opened.set())
        wait(opened, "on_open")
        wait(seen, "accept")
        local, peer = conn.local, conn.peer  # off the loop thread: waits
        self.assertEqual(peer, server.address)
        self.assertEqual(accepted, [(server.address, local)])
        self.assertTrue(local.startswith("127.0.0.1:"), local)
        conn.close()
        conn.wait_closed(GUARD)
        with self.assertRaises(duplex.DuplexError) as cm:
            conn.local  # read on demand: gone once closed
        self.assertEqual(cm.exception.code, errors.ECLOSED)
        server.close()

    def test_local_address_of_unnamed_and_unix_ends(self):
        a, b = socketpair()
        pair = duplex.adopt(self.loop, a)
        self.assertEqual((pair.local, pair.peer), ("", ""))
        pair.close()
        b.close()
        d = tempfile.mkdtemp()
        path = os.path.join(d, "sock")
        names = []
        seen = threading.Event()
        server = duplex.listen_unix(
            self.loop, path,
            on_accept=lambda c: (names.append((c.local, c.peer)),
                                 seen.set()))
        opened = threading.Event()
        conn = duplex.connect_unix(self.loop, path,
                                   on_open=lambda c: opened.set())
        wait(opened, "on_open")
        wait(seen, "accept")
        self.assertEqual((conn.local, conn.peer), ("", path))
        self.assertEqual(names, [(path, "")])
        conn.close()
        conn.wait_closed(GUARD)
        server.close()
        self.loop.close()
        os.rmdir(d)

    def test_timer_and_post_run_on_the_loop_thread(self):
        fired = []
        done = threading.Event()

        def tick():
            fired.append(self.loop.on_thread())
            if len(fired) == 3:
                timer.close()  # from its own callback
                done.set()
        timer = duplex.Timer(self.loop, tick)
        timer.start(0.001, repeat=0.001)
        wait(done, "three timer ticks")
        self.assertEqual(fired, [True, True, True])
        timer.close()
        order = []
        posted = threading.Event()
        for i in range(100):
            self.loop.post(order.append, i)
        self.loop.post(posted.set)
        wait(posted)
        self.assertEqual(order, list(range(100)))
        self.assertFalse(self.loop.on_thread())

    def test_context_managers_close(self):
        a, b = socketpair()
        with duplex.adopt(self.loop, a) as conn:
            conn.write(b"bye")
        self.assertIsNone(conn.wait_closed(GUARD))
        self.assertEqual(b.recv(16), b"bye")
        b.close()


if __name__ == "__main__":
    unittest.main()
