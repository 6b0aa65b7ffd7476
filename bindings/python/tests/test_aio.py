import asyncio
import socket
import unittest

import duplex
import duplex.aio

from helpers import Reader, echo_listener, socketpair


class AioTest(unittest.TestCase):
    def setUp(self):
        self.loop = duplex.Loop()

    def tearDown(self):
        self.loop.close()

    def test_echo_round_trip_with_readline_and_eof(self):
        server = echo_listener(self.loop)

        async def main():
            s = await duplex.aio.open_connection(
                "127.0.0.1", server.port, loop=self.loop)
            for i in range(100):
                s.write(b"line %d\n" % i)
            await s.drain()
            s.write_eof()
            lines = []
            while line := await s.readline():
                lines.append(line)
            self.assertEqual(await s.read(), b"")  # EOF stays EOF
            self.assertIsNone(await s.wait_closed())  # both ways done
            return lines

        lines = asyncio.run(main())
        self.assertEqual(lines, [b"line %d\n" % i for i in range(100)])

    def test_refused_connect_raises(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

        async def main():
            await duplex.aio.open_connection("127.0.0.1", port,
                                             loop=self.loop)
        with self.assertRaises(ConnectionRefusedError) as cm:
            asyncio.run(main())
        self.assertEqual(cm.exception.name, "DUPLEX_ECONNREFUSED")
        s.close()

    def test_drain_waits_for_a_slow_peer_and_nothing_is_lost(self):
        a, b = socketpair(bufsize=16 << 10)
        chunk = bytes(range(256)) * 256  # 64 KiB
        count = 64  # 4 MiB: far past the conn's hard limit

        async def main():
            s = await duplex.aio.adopt(a, loop=self.loop,
                                       high_watermark=64 << 10,
                                       hard_limit=256 << 10)
            for i in range(count):
                s.write(chunk)  # never blocks: refused writes wait in order
            self.assertTrue(s._pending)  # the peer has not read a byte
            peer = Reader(b)
            peer.start()
            await s.drain()  # returns once the conn took everything
            self.assertFalse(s._pending)
            s.write_eof()
            data = await asyncio.get_running_loop().run_in_executor(
                None, peer.result)
            b.close()
            self.assertIsNone(await s.wait_closed())
            return data

        data = asyncio.run(main())
        self.assertEqual(len(data), len(chunk) * count)
        self.assertEqual(data, chunk * count)

    def test_a_refused_flush_marker_waits_for_on_writable(self):
        # The first write fills the queue to the hard limit exactly (its
        # payload plus WRITE_OVERHEAD), so the next write and the flush
        # marker armed for it (an empty write costs WRITE_OVERHEAD too) are
        # both refused: drain() must then be woken by on_writable.
        a, b = socketpair(bufsize=16 << 10)
        hard = 256 << 10
        first = b"f" * (hard - duplex.WRITE_OVERHEAD)

        async def main():
            s = await duplex.aio.adopt(a, loop=self.loop,
                                       high_watermark=64 << 10,
                                       hard_limit=hard)
            s.write(first)
            s.write(b"second")
            self.assertEqual(list(s._pending), [b"second"])
            self.assertFalse(s._marker)  # refused: nothing outstanding
            peer = Reader(b)
            peer.start()
            await s.drain()
            self.assertFalse(s._pending)
            s.write_eof()
            data = await asyncio.get_running_loop().run_in_executor(
                None, peer.result)
            b.close()
            self.assertIsNone(await s.wait_closed())
            return data

        self.assertEqual(asyncio.run(main()), first + b"second")

    def test_reading_pauses_past_the_limit_and_resumes(self):
        a, b = socketpair()
        payload = b"z" * (1 << 20)

        async def main():
            s = await duplex.aio.adopt(a, loop=self.loop, limit=4096)
            sender = asyncio.get_running_loop().run_in_executor(
                None, lambda: (b.sendall(payload), b.shutdown(1)))
            got = bytearray()
            async for chunk in s:  # the sender blocks while we are paused
                got += chunk
            await sender
            s.close()
            await s.wait_closed()
            return bytes(got)

        self.assertEqual(asyncio.run(main()), payload)
        b.close()

    def test_async_with_and_default_loop(self):
        server = echo_listener(self.loop)

        async def main():
            async with await duplex.aio.open_connection(
                    "127.0.0.1", server.port) as s:  # default duplex loop
                s.write(memoryview(b"abc"))
                self.assertEqual(await s.readexactly(3), b"abc")
            self.assertTrue(s.is_closing())

        asyncio.run(main())


if __name__ == "__main__":
    unittest.main()
