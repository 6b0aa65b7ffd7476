import errno
import os
import socket
import threading
import unittest

import duplex
from duplex import errors

from helpers import GUARD, handle_count, socketpair, wait


class ErrorObjectTest(unittest.TestCase):
    def test_error_carries_code_name_and_message(self):
        e = errors.error(errors.ECLOSED, "write")
        self.assertIsInstance(e, duplex.DuplexError)
        self.assertIsInstance(e, OSError)
        self.assertEqual(e.code, errors.ECLOSED)
        self.assertEqual(e.name, "DUPLEX_ECLOSED")
        self.assertEqual(e.strerror, duplex.strerror(errors.ECLOSED))
        self.assertIsNone(e.errno)  # a library code, not an errno
        self.assertIn("write", str(e))
        self.assertIn("DUPLEX_ECLOSED", str(e))

    def test_system_codes_map_to_builtin_exceptions(self):
        e = errors.error(errors.ECONNREFUSED)
        self.assertIsInstance(e, ConnectionRefusedError)
        self.assertEqual(e.errno, -errors.ECONNREFUSED)
        wb = errors.error(errors.EWOULDBLOCK)
        self.assertIsInstance(wb, duplex.WouldBlock)
        self.assertIsInstance(wb, BlockingIOError)
        self.assertEqual(errors.EAGAIN, errors.EWOULDBLOCK)
        self.assertIsInstance(errors.error(errors.ETIMEDOUT), TimeoutError)

    def test_edeadlk_is_the_system_code_and_a_runtime_error(self):
        # DUPLEX_EDEADLK is -EDEADLK like the other errno-named codes (it
        # was the library code -30004); compare with names, not numbers.
        if os.name == "posix":
            self.assertEqual(errors.EDEADLK, -errno.EDEADLK)
        self.assertEqual(duplex.err_name(errors.EDEADLK), "DUPLEX_EDEADLK")
        self.assertEqual(duplex.err_name(-30004), "DUPLEX_UNKNOWN")
        self.assertNotIn(-30004, errors.CODES.values())
        e = errors.error(errors.EDEADLK, "Loop.join")
        self.assertIsInstance(e, duplex.WouldDeadlock)
        self.assertIsInstance(e, duplex.DuplexError)
        self.assertIsInstance(e, RuntimeError)
        self.assertEqual(e.code, errors.EDEADLK)
        if os.name == "posix":
            self.assertEqual(e.errno, errno.EDEADLK)

    def test_every_code_has_a_distinct_name_and_string(self):
        self.assertGreater(len(errors.CODES), 30)
        self.assertEqual(len(set(errors.CODES.values())), len(errors.CODES))
        for name, code in errors.CODES.items():
            self.assertEqual(duplex.err_name(code), "DUPLEX_" + name)
            self.assertNotEqual(duplex.strerror(code), "unknown error")
        self.assertEqual(duplex.err_name(-999999), "DUPLEX_UNKNOWN")
        self.assertEqual(duplex.err_name(0), "DUPLEX_OK")


class ConnectErrorTest(unittest.TestCase):
    def setUp(self):
        self.loop = duplex.Loop()
        self.handles = handle_count()

    def tearDown(self):
        self.loop.close()

    def test_refused_connection_closes_with_econnrefused(self):
        # A bound socket that does not listen refuses connections.
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        events = []
        closed = threading.Event()

        def on_close(conn, err):
            events.append(("close", err))
            closed.set()
        conn = duplex.connect_tcp(self.loop, "127.0.0.1", port,
                                  on_open=lambda c: events.append("open"),
                                  on_close=on_close)
        err = conn.wait_closed(GUARD)
        s.close()
        self.assertIsInstance(err, ConnectionRefusedError)
        self.assertEqual(err.code, errors.ECONNREFUSED)
        self.assertEqual(err.name, "DUPLEX_ECONNREFUSED")
        wait(closed)
        self.assertEqual(len(events), 1)  # on_close once, on_open never
        self.assertEqual(events[0][1].code, errors.ECONNREFUSED)
        self.assertTrue(conn.closed)
        with self.assertRaises(duplex.DuplexError) as cm:
            conn.write(b"late")
        self.assertEqual(cm.exception.code, errors.ECLOSED)
        self.assertEqual(handle_count(), self.handles)

    def test_unresolvable_host_reports_a_resolver_error(self):
        conn = duplex.connect_tcp(self.loop, "no-such-host.invalid", 80)
        err = conn.wait_closed(GUARD)
        self.assertIsInstance(err, duplex.DuplexError)
        self.assertTrue(err.name.startswith("DUPLEX_EAI_"), err.name)
        # A resolver error is a socket.gaierror, with getaddrinfo()'s code
        # as errno (socket.EAI_NONAME, ...), as Python's own resolver raises.
        self.assertIsInstance(err, socket.gaierror)
        if err.code != errors.EAI_OTHER:
            self.assertIn(err.errno, {getattr(socket, n) for n in (
                "EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA",
                "EAI_FAMILY") if hasattr(socket, n)})

    def test_bad_arguments_raise_einval_and_leak_nothing(self):
        cases = [
            lambda: duplex.connect_tcp(self.loop, "127.0.0.1", 0),
            lambda: duplex.connect_tcp(self.loop, "127.0.0.1", 70000),
            lambda: duplex.connect_tcp(self.loop, "", 80),
            lambda: duplex.connect_tcp(self.loop, "a\0b", 80),
            lambda: duplex.connect_tcp(self.loop, "127.0.0.1", 80,
                                       high_watermark=100, low_watermark=100),
            lambda: duplex.listen_tcp(self.loop, "not-an-address", 0),
            lambda: duplex.Loop(read_buffer_size=1 << 30),
            lambda: duplex.Channel(self.loop, None),
        ]
        for make in cases:
            with self.assertRaises(duplex.DuplexError) as cm:
                make()
            self.assertEqual(cm.exception.code, errors.EINVAL)
            self.assertEqual(cm.exception.name, "DUPLEX_EINVAL")
        with self.assertRaises(duplex.DuplexError) as cm:
            duplex.adopt(self.loop, -1)
        self.assertEqual(cm.exception.code, errors.EBADF)
        with self.assertRaises(TypeError):
            duplex.connect_tcp(self.loop, "127.0.0.1", 80, no_such_option=1)
        with self.assertRaises(TypeError):
            duplex.Conn()
        self.assertEqual(handle_count(), self.handles)

    def test_failed_adopt_leaves_the_socket_with_the_caller(self):
        a, b = socketpair()
        with self.assertRaises(duplex.DuplexError):
            duplex.adopt(self.loop, a, hard_limit=1, high_watermark=2)
        self.assertNotEqual(a.fileno(), -1)  # still ours, still open
        a.sendall(b"x")
        self.assertEqual(b.recv(1), b"x")
        a.close()
        b.close()


class ClosedStateTest(unittest.TestCase):
    def test_writes_after_shutdown_and_close(self):
        a, b = socketpair()
        with duplex.Loop() as loop:
            conn = duplex.adopt(loop, a)
            conn.write(b"one")
            conn.shutdown()
            for call in (lambda: conn.write(b"two"), conn.shutdown):
                with self.assertRaises(duplex.DuplexError) as cm:
                    call()
                self.assertEqual(cm.exception.code, errors.ESHUTDOWN)
            conn.close()
            conn.close()  # idempotent
            with self.assertRaises(duplex.DuplexError) as cm:
                conn.write(b"three")
            self.assertEqual(cm.exception.code, errors.ECLOSED)
            self.assertIsNone(conn.wait_closed(GUARD))
        self.assertEqual(b.recv(16), b"one")
        b.close()

    def test_objects_after_the_loop_is_freed(self):
        a, b = socketpair()
        loop = duplex.Loop()
        conn = duplex.adopt(loop, a)
        listener = duplex.listen_tcp(loop, "127.0.0.1", 0)
        timer = duplex.Timer(loop, lambda: None)
        chan = duplex.Channel(loop, lambda obj: None)
        loop.close()
        loop.close()  # idempotent
        self.assertTrue(loop.closed)
        self.assertEqual(conn.close_error.code, errors.ECANCELED)
        self.assertEqual(chan.wait_closed(0).code, errors.ECANCELED)
        for call in (lambda: conn.write(b"x"), conn.pause,
                     lambda: chan.send(1), lambda: loop.post(print),
                     lambda: listener.port, lambda: timer.start(1),
                     lambda: duplex.connect_tcp(loop, "127.0.0.1", 1),
                     lambda: duplex.Timer(loop, print)):
            with self.assertRaises(duplex.DuplexError) as cm:
                call()
            self.assertEqual(cm.exception.code, errors.ECLOSED)
        self.assertEqual(conn.queued, 0)
        listener.close()  # harmless
        timer.close()
        b.close()

    def test_waiting_on_the_loop_thread_is_refused(self):
        a, b = socketpair()
        got = []
        done = threading.Event()

        def probe():
            for call in (lambda: conn.wait_writable(0), loop.close,
                         loop.join, conn.wait_closed):
                try:
                    call()
                    got.append(None)
                except duplex.DuplexError as e:
                    got.append(e.code)
            done.set()
        with duplex.Loop() as loop:
            conn = duplex.adopt(loop, a)
            loop.post(probe)
            wait(done)
        self.assertEqual(got, [errors.EDEADLK] * 4)
        b.close()

    def test_waiting_calls_on_the_loop_thread_raise_would_deadlock(self):
        got = []
        done = threading.Event()

        def probe():
            try:
                loop.join(0)
            except RuntimeError as e:  # WouldDeadlock is a RuntimeError
                got.append(e)
            done.set()
        with duplex.Loop() as loop:
            loop.post(probe)
            wait(done)
        self.assertEqual(len(got), 1)
        self.assertIsInstance(got[0], duplex.WouldDeadlock)
        self.assertEqual(got[0].name, "DUPLEX_EDEADLK")


if __name__ == "__main__":
    unittest.main()
