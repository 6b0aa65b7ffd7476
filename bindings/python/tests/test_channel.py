import gc
import threading
import unittest
import weakref

import duplex
from duplex import errors

from helpers import GUARD, handle_count, wait


class Payload:
    """An object only Python can carry: it must arrive as itself."""

    def __init__(self, producer, seq):
        self.producer, self.seq = producer, seq


class ChannelTest(unittest.TestCase):
    def test_objects_from_many_threads_arrive_once_in_per_thread_order(self):
        producers, per = 5, 400
        got = []
        closed = []
        sent = {}
        with duplex.Loop() as loop:
            chan = duplex.Channel(loop, on_message=got.append,
                                  on_close=closed.append, capacity=8)

            def produce(p):
                for i in range(per):
                    obj = Payload(p, i)
                    sent[(p, i)] = obj
                    chan.send(obj)  # waits while the channel is full

            threads = [threading.Thread(target=produce, args=(p,))
                       for p in range(producers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            chan.close()
            self.assertIsNone(chan.wait_closed(GUARD))
            with self.assertRaises(duplex.DuplexError) as cm:
                chan.send("late")
            self.assertEqual(cm.exception.code, errors.ECLOSED)
        self.assertEqual(closed, [None])
        self.assertEqual(len(got), producers * per)
        seen = [0] * producers
        for obj in got:
            self.assertIs(obj, sent[(obj.producer, obj.seq)])  # itself
            self.assertEqual(obj.seq, seen[obj.producer])
            seen[obj.producer] += 1

    def test_queued_objects_are_released_exactly_once_when_the_loop_is_freed(self):
        baseline = handle_count()
        finalized = []
        undelivered = []
        closed = []
        loop = duplex.Loop(start=False)  # never runs: nothing is delivered
        chan = duplex.Channel(
            loop, on_message=lambda obj: self.fail("delivered"),
            on_close=closed.append,
            on_undelivered=lambda obj, err: undelivered.append(
                (obj.seq, err.code)))
        for i in range(100):
            obj = Payload(0, i)
            weakref.finalize(obj, finalized.append, i)
            chan.send(obj)
        del obj
        self.assertEqual(chan.pending, 100)
        self.assertEqual(handle_count(), baseline + 101)  # 100 + channel
        loop.close()
        self.assertEqual(undelivered,
                         [(i, errors.ECANCELED) for i in range(100)])
        self.assertEqual(len(closed), 1)
        self.assertEqual(closed[0].code, errors.ECANCELED)
        self.assertEqual(handle_count(), baseline)
        undelivered.clear()
        gc.collect()
        self.assertEqual(sorted(finalized), list(range(100)))  # no leak

    def test_mixed_delivery_and_release_account_for_every_object(self):
        # Some objects are delivered, the rest are still queued when the
        # loop is freed: each is seen exactly once, one way or the other.
        delivered, released = [], []
        gate = threading.Event()
        first = threading.Event()

        def on_message(n):
            delivered.append(n)
            if n == 0:
                first.set()
                gate.wait(GUARD)  # hold the loop while more queue up
        loop = duplex.Loop()
        chan = duplex.Channel(loop, on_message,
                              on_undelivered=lambda n, e: released.append(n))
        chan.send(0)
        wait(first)
        for n in range(1, 50):
            chan.send(n)
        closer = threading.Thread(target=loop.close)
        closer.start()
        gate.set()
        closer.join(GUARD)
        self.assertFalse(closer.is_alive())
        self.assertEqual(sorted(delivered + released), list(range(50)))
        self.assertEqual(set(delivered) & set(released), set())

    def test_full_channel_refuses_or_times_out(self):
        loop = duplex.Loop(start=False)
        chan = duplex.Channel(loop, lambda obj: None, capacity=2)
        chan.send("a")
        chan.send("b")
        with self.assertRaises(duplex.WouldBlock):
            chan.send("c", timeout=0)
        with self.assertRaises(TimeoutError) as cm:
            chan.send("c", timeout=0.001)
        self.assertEqual(cm.exception.code, errors.ETIMEDOUT)
        self.assertEqual(chan.pending, 2)
        loop.close()

    def test_none_and_unhashable_objects_travel(self):
        got = []
        with duplex.Loop() as loop:
            chan = duplex.Channel(loop, got.append)
            for obj in (None, [1, 2], {"k": "v"}, b"bytes"):
                chan.send(obj)
            chan.close()
            chan.wait_closed(GUARD)
        self.assertEqual(got, [None, [1, 2], {"k": "v"}, b"bytes"])


if __name__ == "__main__":
    unittest.main()
