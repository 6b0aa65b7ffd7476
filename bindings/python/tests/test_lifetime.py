"""Timers and listeners are references (duplex.h, "Ownership"): the binding
drops the one it was handed exactly once, after its last call through it,
closing first; a close after the loop was freed is a no-op, and the Python
objects may outlive their loop. The C calls are logged per pointer, so the
tests see every call made through a reference, and that none follows its
unref."""
import gc
import threading
import unittest

import duplex
from duplex import _ffi, errors

from helpers import GUARD, wait

_LOGGED = ("timer_start", "timer_stop", "timer_close", "timer_unref",
           "listener_get_port", "listener_get_address", "listener_close",
           "listener_unref")


class CallLog:
    """Wraps the _ffi functions named in _LOGGED (the binding looks them up
    at call time, and _Ref takes its unref function when the object is
    made): records (name, pointer, result) for each call."""

    def __init__(self, test):
        self.calls = []
        self._lock = threading.Lock()
        for name in _LOGGED:
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

    def clear(self):
        """Forget what was logged (freed memory is reused: the next object
        may well have the same address)."""
        with self._lock:
            self.calls.clear()

    def on(self, p):
        """[(name, result)] of the calls made through pointer p."""
        with self._lock:
            return [(n, rc) for n, q, rc in self.calls if q == p]


def pointer(obj):
    return obj._ref._p


class LifetimeTest(unittest.TestCase):
    def setUp(self):
        self.log = CallLog(self)

    def assertDroppedOnce(self, p, kind, closes=(0,)):
        """Exactly one close (with a result in `closes`), then exactly one
        unref, and no call through p after it."""
        calls = self.log.on(p)
        names = [n for n, _ in calls]
        self.assertEqual(names.count(kind + "_unref"), 1, calls)
        self.assertEqual(names[-1], kind + "_unref", calls)
        self.assertEqual(names.count(kind + "_close"), 1, calls)
        self.assertLess(names.index(kind + "_close"),
                        names.index(kind + "_unref"))
        self.assertIn(dict(calls)[kind + "_close"], closes, calls)

    # -- timers --
    def test_timer_close_twice(self):
        with duplex.Loop() as loop:
            timer = duplex.Timer(loop, lambda: None)
            p = pointer(timer)
            timer.start(60)
            self.assertFalse(timer.closed)
            timer.close()
            self.assertTrue(timer.closed)
            self.assertIsNone(timer._ref._p)
            timer.close()  # idempotent: no second close, no second unref
            for call in (lambda: timer.start(1), timer.stop):
                with self.assertRaises(duplex.DuplexError) as cm:
                    call()
                self.assertEqual(cm.exception.code, errors.ECLOSED)
        self.assertDroppedOnce(p, "timer")

    def test_timer_close_after_the_loop_was_freed(self):
        loop = duplex.Loop()
        timer = duplex.Timer(loop, lambda: None)
        timer.start(60, repeat=60)
        p = pointer(timer)
        loop.close()
        self.assertTrue(timer.closed)
        with self.assertRaises(duplex.DuplexError) as cm:
            timer.start(1)  # through our reference: the library's ECLOSED
        self.assertEqual(cm.exception.code, errors.ECLOSED)
        self.assertIn(("timer_start", errors.ECLOSED), self.log.on(p))
        timer.close()  # a no-op that still drops the reference
        timer.close()
        self.assertDroppedOnce(p, "timer", closes=(errors.ECLOSED,))

    def test_timer_outlives_its_loop_and_is_dropped_when_collected(self):
        loop = duplex.Loop()
        timer = duplex.Timer(loop, lambda: None)
        p = pointer(timer)
        loop.close()
        del loop
        gc.collect()
        with self.assertRaises(duplex.DuplexError) as cm:
            timer.stop()
        self.assertEqual(cm.exception.code, errors.ECLOSED)
        self.assertNotIn("timer_unref", [n for n, _ in self.log.on(p)])
        del timer  # never closed by hand: collecting it closes, then drops
        gc.collect()
        self.assertDroppedOnce(p, "timer", closes=(errors.ECLOSED,))

    def test_timer_closed_in_its_own_callback_and_from_another_thread(self):
        fired = threading.Event()
        release = threading.Event()
        with duplex.Loop() as loop:
            def tick():
                fired.set()
                release.wait(GUARD)  # keep the callback running
                own.close()  # on the loop thread: at once
            own = duplex.Timer(loop, tick)
            p_own = pointer(own)
            own.start(0)
            wait(fired, "the timer's callback")
            # From this thread, while the callback runs, close waits for
            # it; the callback's own close then finds it retired.
            closer = threading.Thread(target=own.close)
            closer.start()
            release.set()
            closer.join(GUARD)
            self.assertFalse(closer.is_alive())
        self.assertDroppedOnce(p_own, "timer")

    def test_many_threads_race_close_start_and_stop(self):
        with duplex.Loop() as loop:
            for _ in range(20):
                self.log.clear()
                timer = duplex.Timer(loop, lambda: None)
                p = pointer(timer)
                go = threading.Barrier(4)

                def use():
                    go.wait(GUARD)
                    for _ in range(50):
                        try:
                            timer.start(60)
                            timer.stop()
                        except duplex.DuplexError as e:
                            self.assertEqual(e.code, errors.ECLOSED)

                def close():
                    go.wait(GUARD)
                    timer.close()
                threads = [threading.Thread(target=f)
                           for f in (use, use, close, close)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(GUARD)
                self.assertDroppedOnce(p, "timer")

    # -- listeners --
    def test_listener_close_twice(self):
        with duplex.Loop() as loop:
            server = duplex.listen_tcp(loop, "127.0.0.1", 0)
            p = pointer(server)
            self.assertGreater(server.port, 0)
            server.close()
            self.assertTrue(server.closed)
            server.close()
            with self.assertRaises(duplex.DuplexError) as cm:
                server.port
            self.assertEqual(cm.exception.code, errors.ECLOSED)
        self.assertDroppedOnce(p, "listener")

    def test_listener_close_after_the_loop_was_freed(self):
        loop = duplex.Loop()
        server = duplex.listen_tcp(loop, "127.0.0.1", 0)
        p = pointer(server)
        loop.close()
        self.assertTrue(server.closed)
        with self.assertRaises(duplex.DuplexError) as cm:
            server.address
        self.assertEqual(cm.exception.code, errors.ECLOSED)
        server.close()  # no-op: the library says ECLOSED
        server.close()
        self.assertDroppedOnce(p, "listener", closes=(errors.ECLOSED,))

    def test_listener_outlives_its_loop_and_is_dropped_when_collected(self):
        loop = duplex.Loop()
        server = duplex.listen_tcp(loop, "127.0.0.1", 0)
        p = pointer(server)
        loop.close()
        del loop
        gc.collect()
        self.assertTrue(server.closed)
        self.assertNotIn("listener_unref", [n for n, _ in self.log.on(p)])
        del server
        gc.collect()
        self.assertDroppedOnce(p, "listener", closes=(errors.ECLOSED,))

    def test_listener_closed_and_loop_freed_from_two_threads(self):
        for _ in range(20):
            self.log.clear()
            loop = duplex.Loop()
            server = duplex.listen_tcp(loop, "127.0.0.1", 0)
            p = pointer(server)
            go = threading.Barrier(2)

            def close_server():
                go.wait(GUARD)
                server.close()
            t = threading.Thread(target=close_server)
            t.start()
            go.wait(GUARD)
            loop.close()
            t.join(GUARD)
            self.assertDroppedOnce(p, "listener",
                                   closes=(0, errors.ECLOSED))

    # -- the loop --
    def test_loop_calls_racing_its_close_are_safe(self):
        # stop() and on_thread() take a loop reference of their own, so a
        # close() on another thread never frees the memory under them.
        for _ in range(20):
            loop = duplex.Loop()
            done = threading.Event()

            def spin():
                while not done.is_set():
                    loop.stop()
                    loop.on_thread()
            t = threading.Thread(target=spin)
            t.start()
            loop.close()
            done.set()
            t.join(GUARD)
            self.assertFalse(loop.on_thread())
            loop.stop()  # after close: nothing to do

    def test_run_on_a_thread_while_another_closes(self):
        for _ in range(10):
            loop = duplex.Loop(start=False)
            started = threading.Event()
            loop.post(started.set)
            t = threading.Thread(target=loop.run)
            t.start()
            wait(started, "the loop running")
            loop.close()  # stops the loop that runs on t, then frees it
            t.join(GUARD)
            self.assertFalse(t.is_alive())


if __name__ == "__main__":
    unittest.main()
