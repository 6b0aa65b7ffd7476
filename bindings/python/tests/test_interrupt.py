"""Ctrl-C: SIGINT must interrupt the calls that block in C on the main
thread. Each test runs a child Python blocked in one call, sends it SIGINT
and expects KeyboardInterrupt out of that call (the child reports it and
exits 3). Without the fix the child would block for ever: the hang guard
fails the test, no duration is asserted."""
import os
import signal
import subprocess
import sys
import time
import unittest

from helpers import GUARD

PRELUDE = r"""
import signal, socket, sys, threading, time
import duplex
# What an interactive program has (a test runner may ignore SIGINT).
signal.signal(signal.SIGINT, signal.default_int_handler)

def full_conn(loop):
    # The peer never reads: writes pile up to the hard limit.
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    conn = duplex.adopt(loop, a, high_watermark=32 << 10,
                        hard_limit=64 << 10)
    chunk = b"x" * (16 << 10)
    try:
        while True:
            conn.write(chunk)
    except duplex.WouldBlock:
        pass
    return conn, b, chunk

def blocked_in(call, loop):
    print("ready", flush=True)
    try:
        call()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        after()
        loop.close()
        sys.exit(3)
    print("returned", flush=True)
    sys.exit(1)

def after():
    pass
"""

CASES = {
    "sendall": """
loop = duplex.Loop()
conn, peer, chunk = full_conn(loop)
blocked_in(lambda: conn.sendall(chunk), loop)
""",
    "wait_writable": """
loop = duplex.Loop()
conn, peer, chunk = full_conn(loop)
blocked_in(conn.wait_writable, loop)
""",
    "wait_room": """
loop = duplex.Loop()
conn, peer, chunk = full_conn(loop)
blocked_in(lambda: conn.wait_room(len(chunk)), loop)
""",
    "channel_send": """
loop = duplex.Loop(start=False)   # never runs: nothing is delivered
chan = duplex.Channel(loop, on_message=print, capacity=1)
chan.send(1)
blocked_in(lambda: chan.send(2), loop)
""",
    "join": """
loop = duplex.Loop()
blocked_in(loop.join, loop)
""",
    "run": """
loop = duplex.Loop(start=False)
server = duplex.listen_tcp(loop, "127.0.0.1", 0)
blocked_in(loop.run, loop)
""",
    # A timer firing every millisecond: the signal is mostly seen on the
    # way into a callback, where it must not be lost.
    "run_busy": """
loop = duplex.Loop(start=False)
ticks = []
timer = duplex.Timer(loop, lambda: ticks.append(1))
timer.start(0.001, 0.001)

def after():
    # The handler is back, and the loop runs again as usual: no stop
    # request was left behind by the interrupt.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stopper = duplex.Timer(loop, loop.stop)
    stopper.start(0.05)
    n = len(ticks)
    loop.run()
    assert len(ticks) > n, (len(ticks), n)
    print("ran again", flush=True)

blocked_in(loop.run, loop)
""",
}


class InterruptTest(unittest.TestCase):
    def interrupt(self, case):
        env = dict(os.environ)
        proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + CASES[case]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            self.assertEqual(proc.stdout.readline(), b"ready\n")
            time.sleep(0.3)  # into the blocking call
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=GUARD)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.fail(f"{case}: SIGINT did not interrupt it (hang guard); "
                      f"stderr: {err.decode()}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.assertEqual((proc.returncode, out.split(b"\n")[0]),
                         (3, b"interrupted"), err.decode())
        self.assertNotIn(b"Exception ignored", err)
        return out

    def test_sendall(self):
        self.interrupt("sendall")

    def test_wait_writable(self):
        self.interrupt("wait_writable")

    def test_wait_room(self):
        self.interrupt("wait_room")

    def test_channel_send_on_a_full_channel(self):
        self.interrupt("channel_send")

    def test_join(self):
        self.interrupt("join")

    def test_run(self):
        self.interrupt("run")

    def test_run_with_busy_callbacks_then_run_again(self):
        out = self.interrupt("run_busy")
        self.assertIn(b"ran again", out)


if __name__ == "__main__":
    unittest.main()
