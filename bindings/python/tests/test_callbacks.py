import gc
import threading
import unittest

import duplex

from helpers import GUARD, echo_listener, handle_count, socketpair, wait


class Boom(Exception):
    pass


def boom(*args):
    raise Boom("from a callback")


class CallbackExceptionTest(unittest.TestCase):
    def test_run_mode_stops_and_reraises_from_run(self):
        a, b = socketpair()
        loop = duplex.Loop(start=False)
        conn = duplex.adopt(loop, a, on_read=boom)
        b.sendall(b"x")
        with self.assertRaises(Boom):
            loop.run()  # returns: the exception stopped the loop
        self.assertIsInstance(loop.failure, Boom)
        self.assertFalse(conn.closed)
        loop.close()  # already reported by run(): not raised again
        self.assertTrue(conn.closed)
        b.close()

    def test_started_mode_wakes_join_and_reraises(self):
        with duplex.Loop() as loop:
            timer = duplex.Timer(loop, boom)
            timer.start(0)
            with self.assertRaises(Boom):
                loop.join(GUARD)
            with self.assertRaises(Boom):  # sticky while the loop lives
                loop.join(GUARD)

    def test_close_reraises_an_unreported_exception(self):
        done = threading.Event()
        loop = duplex.Loop()
        loop.post(boom)
        loop.post(done.set)  # the loop goes on after a failed callback
        wait(done)
        with self.assertRaises(Boom):
            loop.close()
        self.assertTrue(loop.closed)

    def test_with_block_reraises_on_exit(self):
        done = threading.Event()
        with self.assertRaises(Boom):
            with duplex.Loop() as loop:
                chan = duplex.Channel(loop, on_message=boom)
                chan.send("x")
                loop.post(done.set)
                wait(done)

    def test_wait_closed_reports_a_failure_instead_of_hanging(self):
        a, b = socketpair()
        with self.assertRaises(Boom):
            with duplex.Loop() as loop:
                conn = duplex.adopt(loop, a, on_open=boom)
                conn.wait_closed(GUARD)  # never closes by itself
        b.close()

    def test_callbacks_outlive_garbage_collection(self):
        # Many short-lived conns with lambda callbacks and nothing kept by
        # the test: the binding must keep what C may still call.
        baseline = handle_count()
        total = []
        with duplex.Loop() as loop:
            server = echo_listener(loop)
            conns = []
            for i in range(20):
                conn = duplex.connect_tcp(
                    loop, "127.0.0.1", server.port,
                    on_read=lambda c, d, i=i: total.append((i, d)))
                conn.write(b"%d" % i)
                conn.shutdown()
                conns.append(conn)
                del conn
                gc.collect()
            for conn in conns:
                self.assertIsNone(conn.wait_closed(GUARD))
            del conns
            gc.collect()
        self.assertEqual(sorted(b"".join(d for j, d in total if j == i)
                                for i in range(20)),
                         sorted(b"%d" % i for i in range(20)))
        self.assertEqual(handle_count(), baseline)


if __name__ == "__main__":
    unittest.main()
