"""The docs/design.md scenario end to end: producer threads -> Channel ->
socket, and whatever the socket receives is collected (here) or printed
(the example)."""
import os
import subprocess
import sys
import threading
import unittest

import duplex

from helpers import GUARD, echo_listener

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples",
                       "scenario.py")


def check_lines(test, text, producers, per):
    lines = text.splitlines()
    test.assertEqual(len(lines), producers * per)
    seen = [0] * producers
    for line in lines:
        p, i = line.removeprefix("producer ").split(": message ")
        p, i = int(p), int(i)
        test.assertEqual(i, seen[p])  # per-producer order, nothing split
        seen[p] += 1
    test.assertEqual(seen, [per] * producers)


class ScenarioTest(unittest.TestCase):
    def test_channel_to_socket_without_locks(self):
        producers, per = 4, 500
        received = []  # appended on the loop thread only
        with duplex.Loop() as loop:
            server = echo_listener(loop)
            sock = duplex.connect_tcp(
                loop, "127.0.0.1", server.port,
                on_read=lambda c, data: received.append(data))
            chan = duplex.Channel(loop, on_message=sock.write, capacity=16,
                                  on_close=lambda err: sock.shutdown())

            def producer(n):
                for i in range(per):
                    chan.send(f"producer {n}: message {i}\n".encode())

            threads = [threading.Thread(target=producer, args=(n,))
                       for n in range(producers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            chan.close()
            self.assertIsNone(sock.wait_closed(GUARD))
        check_lines(self, b"".join(received).decode(), producers, per)

    def test_the_example_prints_every_message(self):
        out = subprocess.run([sys.executable, EXAMPLE], capture_output=True,
                             text=True, timeout=GUARD, check=True).stdout
        check_lines(self, out, 4, 5)


if __name__ == "__main__":
    unittest.main()
