"""duplex.aio against asyncio's own streams.

Most tests here run one scenario twice, on asyncio's streams and on
duplex.aio, and compare what each observed: the bridge is meant to be a
drop-in, so the two must agree. The peers are plain blocking sockets on a
thread of their own, independent of both. Scenarios record only what does
not depend on timing (bytes, exception types and fields, states), never
how reads happened to be chunked."""
import asyncio
import errno
import hashlib
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
import unittest

import duplex
import duplex.aio

from helpers import GUARD, Reader, socketpair

MiB = 1 << 20


class Api:
    """The stream functions of one implementation. ``tuning`` keyword
    arguments go to duplex.aio only (conn options asyncio lacks)."""

    def __init__(self, name, mod, **extra):
        self.name, self.mod, self.extra = name, mod, extra

    def open_connection(self, *a, tuning=None, **kw):
        return self.mod.open_connection(*a, **self._kw(kw, tuning))

    def open_unix_connection(self, *a, tuning=None, **kw):
        return self.mod.open_unix_connection(*a, **self._kw(kw, tuning))

    def start_server(self, *a, tuning=None, **kw):
        return self.mod.start_server(*a, **self._kw(kw, tuning))

    def start_unix_server(self, *a, tuning=None, **kw):
        return self.mod.start_unix_server(*a, **self._kw(kw, tuning))

    def create_connection(self, factory, *a, **kw):
        if self.mod is asyncio:
            return asyncio.get_running_loop().create_connection(
                factory, *a, **kw)
        return duplex.aio.create_connection(factory, *a, **self._kw(kw))

    def _kw(self, kw, tuning=None):
        if self.mod is asyncio:
            return kw
        return {**kw, **self.extra, **(tuning or {})}


class Peer:
    """A plain-socket server on its own thread: runs ``script(sock)`` for
    the first connection and keeps what it returns."""

    def __init__(self, script, unix_path=None):
        if unix_path:
            self.lsock = socket.socket(socket.AF_UNIX)
            self.lsock.bind(unix_path)
        else:
            self.lsock = socket.socket()
            self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.address = self.lsock.getsockname()
        self.script = script
        self.client = None       # the client's address, as accepted
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            s, self.client = self.lsock.accept()
            with s:
                self.result = self.script(s)
        except BaseException as e:  # noqa: B036 - re-raised by join()
            self.error = e
        finally:
            self.lsock.close()

    def join(self):
        self.thread.join(GUARD)
        if self.thread.is_alive():
            raise AssertionError("hang guard: the peer never finished")
        if self.error is not None:
            raise self.error
        return self.result

    async def done(self):
        return await asyncio.get_running_loop().run_in_executor(
            None, self.join)


def recv_all(s):
    chunks = []
    while True:
        data = s.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def send_then_eof(payload, then_read=True):
    def script(s):
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        if then_read:
            return recv_all(s)  # until the client closes
    return script


def exc_info(e):
    """What to compare of an exception asyncio's classes raise."""
    return type(e).__name__, str(e)


class Compare(unittest.TestCase):
    """Runs each scenario on asyncio, then on duplex.aio, and compares."""

    def setUp(self):
        self.loop = duplex.Loop()
        self.asyncio = Api("asyncio", asyncio)
        self.duplex = Api("duplex", duplex.aio, duplex_loop=self.loop)

    def tearDown(self):
        self.loop.close()

    def run_on(self, api, scenario):
        async def guarded():
            return await asyncio.wait_for(scenario(api), GUARD)
        return asyncio.run(guarded())

    def compare(self, scenario, expected=None):
        want = self.run_on(self.asyncio, scenario)
        got = self.run_on(self.duplex, scenario)
        self.assertEqual(got, want)
        if expected is not None:
            self.assertEqual(want, expected)
        return got


class ReadTest(Compare):
    def test_read_without_n_reads_to_eof(self):
        payload = b"a" * 1000 + b"b" * (3 * MiB)

        async def scenario(api):
            peer = Peer(send_then_eof(payload))
            r, w = await api.open_connection(*peer.address)
            before = r.at_eof()
            data = await r.read()
            after, again = r.at_eof(), await r.read()
            w.close()
            await w.wait_closed()
            await peer.done()
            return before, data == payload, after, again

        self.compare(scenario, (False, True, True, b""))

    def test_read_n_returns_at_most_n(self):
        payload = bytes(range(256)) * 40

        async def scenario(api):
            peer = Peer(send_then_eof(payload))
            r, w = await api.open_connection(*peer.address)
            chunks = []
            while chunk := await r.read(1000):
                chunks.append(chunk)
            zero = await r.read(0)
            w.close()
            await w.wait_closed()
            await peer.done()
            return (b"".join(chunks) == payload,
                    max(map(len, chunks)) <= 1000, zero, r.at_eof())

        self.compare(scenario, (True, True, b"", True))

    def test_readexactly_far_past_the_limit(self):
        # 3 MiB with the default 64 KiB limit: the reader pauses the
        # transport and must resume it as it consumes.
        payload = os.urandom(3 * MiB)

        async def scenario(api):
            peer = Peer(send_then_eof(payload))
            r, w = await api.open_connection(*peer.address)
            a = await r.readexactly(3 * MiB - 5)
            b = await r.readexactly(5)
            rest = await r.read()
            w.close()
            await w.wait_closed()
            await peer.done()
            return a + b == payload, rest

        self.compare(scenario, (True, b""))

    def test_readline_of_2_mib_within_a_large_limit(self):
        line = b"x" * (2 * MiB) + b"\n"

        async def scenario(api):
            peer = Peer(send_then_eof(line + b"tail"))
            r, w = await api.open_connection(*peer.address, limit=8 * MiB)
            got = [await r.readline() for _ in range(3)]
            w.close()
            await w.wait_closed()
            await peer.done()
            return got[0] == line, got[1:]

        self.compare(scenario, (True, [b"tail", b""]))

    def test_readline_past_the_limit_raises_then_reading_goes_on(self):
        async def scenario(api):
            peer = Peer(send_then_eof(b"x" * (2 * MiB) + b"\nnext\n"))
            r, w = await api.open_connection(*peer.address)
            try:
                await r.readline()
                first = None
            except ValueError as e:
                first = exc_info(e)
            seen = []
            while True:  # the rest of the long line, then "next"
                try:
                    line = await r.readline()
                except ValueError:
                    continue
                seen.append(line)
                if not line:
                    break
            w.close()
            await w.wait_closed()
            await peer.done()
            return first[0], seen[-2:]

        self.compare(scenario, ("ValueError", [b"next\n", b""]))

    def test_readuntil_raises_limit_overrun_and_keeps_the_bytes(self):
        payload = b"y" * 5000 + b"END"

        async def scenario(api):
            peer = Peer(send_then_eof(payload))
            r, w = await api.open_connection(*peer.address, limit=1024)
            try:
                await r.readuntil(b"END")
                what = None
            except asyncio.LimitOverrunError as e:
                what = (type(e).__name__, e.consumed > 0)
            data = await r.readexactly(len(payload))  # nothing was lost
            w.close()
            await w.wait_closed()
            await peer.done()
            return what, data == payload

        self.compare(scenario, (("LimitOverrunError", True), True))

    def test_readexactly_hits_eof_midway(self):
        async def scenario(api):
            peer = Peer(send_then_eof(b"0123456789"))
            r, w = await api.open_connection(*peer.address)
            try:
                await r.readexactly(20)
                got = None
            except asyncio.IncompleteReadError as e:
                got = (e.partial, e.expected, str(e))
            rest = (r.at_eof(), await r.read(), await r.readline())
            w.close()
            await w.wait_closed()
            await peer.done()
            return got, rest

        self.compare(scenario, ((b"0123456789", 20,
                                 "10 bytes read on a total of 20 expected "
                                 "bytes"), (True, b"", b"")))

    def test_readline_and_iteration_up_to_eof(self):
        async def scenario(api):
            peer = Peer(send_then_eof(b"one\ntwo\nrest"))
            r, w = await api.open_connection(*peer.address)
            first = await r.readline()
            others = [line async for line in r]
            w.close()
            await w.wait_closed()
            await peer.done()
            return first, others

        self.compare(scenario, (b"one\n", [b"two\n", b"rest"]))

    def test_readuntil_with_several_separators(self):
        async def scenario(api):
            peer = Peer(send_then_eof(b"a;b|c;;d"))
            r, w = await api.open_connection(*peer.address)
            got = [await r.readuntil(b";"), await r.readuntil(b"|")]
            try:
                await r.readuntil(b"#")
            except asyncio.IncompleteReadError as e:
                got.append(e.partial)
            w.close()
            await w.wait_closed()
            await peer.done()
            return got

        self.compare(scenario, [b"a;", b"b|", b"c;;d"])

    def test_reset_by_the_peer(self):
        # (No data before the reset: libuv reports a reset that comes in
        # the same poll as data as an EOF.)
        def script(s):
            s.recv(1)  # wait for the client's byte, then reset
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                         struct.pack("ii", 1, 0))

        async def scenario(api):
            peer = Peer(script)
            r, w = await api.open_connection(*peer.address)
            w.write(b"!")
            got = None
            try:
                while await r.read(1 << 16):
                    pass
                got = "eof"
            except ConnectionResetError:
                got = "ConnectionResetError"
            try:
                await w.wait_closed()
                closed = None
            except ConnectionResetError:
                closed = "ConnectionResetError"
            await peer.done()
            return got, closed, w.is_closing()

        self.compare(scenario, ("ConnectionResetError",
                                "ConnectionResetError", True))


class WriteTest(Compare):
    def test_write_writelines_drain_write_eof_close(self):
        def script(s):
            got = recv_all(s)
            s.sendall(b"ok")
            return got

        async def scenario(api):
            peer = Peer(script)
            r, w = await api.open_connection(*peer.address)
            w.write(b"one\n")
            w.write(bytearray(b"two\n"))
            w.write(memoryview(b"three\n"))
            w.writelines([b"four", bytearray(b"\n"), memoryview(b"five\n")])
            await w.drain()
            states = [w.can_write_eof(), w.is_closing()]
            try:
                w.write("text")
            except TypeError as e:
                states.append(exc_info(e))
            w.write_eof()
            try:
                w.write(b"late")
            except RuntimeError as e:
                states.append(exc_info(e))
            w.write_eof()  # a second one does nothing
            reply = await r.read()
            w.close()
            states.append(w.is_closing())
            await w.wait_closed()
            states.append(w.is_closing())
            return states, reply, await peer.done()

        self.compare(scenario, (
            [True, False,
             ("TypeError",
              "data argument must be a bytes-like object, not 'str'"),
             ("RuntimeError", "Cannot call write() after write_eof()"),
             True, True],
            b"ok", b"one\ntwo\nthree\nfour\nfive\n"))

    def test_drain_against_a_slow_reader(self):
        chunk = os.urandom(64 << 10)
        count = 128  # 8 MiB

        def script(s):
            h = hashlib.sha256()
            while data := s.recv(1 << 16):
                h.update(data)
                time.sleep(0.0005)
            return h.hexdigest()

        async def scenario(api):
            peer = Peer(script)
            # duplex.aio only: small limits, so that writes are refused
            r, w = await api.open_connection(
                *peer.address, tuning=dict(high_watermark=64 << 10,
                                           hard_limit=256 << 10))
            for _ in range(count):
                w.write(chunk)
                await w.drain()
            w.write_eof()
            digest = await peer.done()
            w.close()
            await w.wait_closed()
            return digest

        self.compare(scenario, hashlib.sha256(chunk * count).hexdigest())

    def test_extra_info_names(self):
        async def scenario(api):
            peer = Peer(send_then_eof(b""))
            r, w = await api.open_connection(*peer.address)
            sock = w.get_extra_info("socket")
            info = (w.get_extra_info("peername") == peer.address,
                    w.get_extra_info("sockname") == peer_client(peer),
                    sock.family, sock.type, sock.getsockname() ==
                    w.get_extra_info("sockname"),
                    sock.getpeername() == peer.address,
                    w.get_extra_info("nonesuch", 42))
            await r.read()
            w.close()
            await w.wait_closed()
            info += (w.get_extra_info("peername") == peer.address,)
            await peer.done()
            return info

        self.compare(scenario, (True, True, socket.AF_INET,
                                socket.SOCK_STREAM, True, True, 42, True))


def peer_client(peer):
    # The client's address as the peer accepted it (set once accepted).
    for _ in range(int(GUARD * 100)):
        if peer.client is not None:
            return peer.client
        time.sleep(0.01)
    raise AssertionError("hang guard: never accepted")


class ConnectErrorTest(Compare):
    def test_refused(self):
        async def scenario(api):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            try:
                await api.open_connection(*s.getsockname())
            except OSError as e:
                return isinstance(e, ConnectionRefusedError), e.errno
            finally:
                s.close()

        self.compare(scenario, (True, errno.ECONNREFUSED))

    def test_unresolvable_host_raises_gaierror(self):
        async def scenario(api):
            try:
                await api.open_connection("no-such-host.invalid", 80)
            except OSError as e:
                return isinstance(e, socket.gaierror), \
                    e.errno in {socket.EAI_NONAME, socket.EAI_AGAIN,
                                getattr(socket, "EAI_NODATA", None)}

        self.compare(scenario, (True, True))


class ServerTest(Compare):
    def test_start_server_echo_and_close(self):
        async def scenario(api):
            seen = []

            async def handle(r, w):
                line = await r.readline()
                seen.append(w.get_extra_info("peername"))
                w.write(line.upper())
                await w.drain()
                w.close()
                await w.wait_closed()

            server = await api.start_server(handle, "127.0.0.1", 0)
            states = [server.is_serving(), len(server.sockets)]
            addr = server.sockets[0].getsockname()
            states.append((addr[0], len(addr), server.sockets[0].family))

            def client():
                with socket.create_connection(addr) as c:
                    c.sendall(b"hello\n")
                    return recv_all(c), c.getsockname()

            reply, me = await asyncio.get_running_loop().run_in_executor(
                None, client)
            server.close()
            states += [server.is_serving(), server.sockets]
            await server.wait_closed()
            return states, reply, seen == [me], \
                server.get_loop() is asyncio.get_running_loop()

        self.compare(scenario, ([True, 1, ("127.0.0.1", 2, socket.AF_INET),
                                 False, ()], b"HELLO\n", True, True))

    def test_start_serving_later(self):
        async def scenario(api):
            async def handle(r, w):
                w.write(await r.read())
                w.close()

            server = await api.start_server(handle, "127.0.0.1", 0,
                                            start_serving=False)
            before = (server.is_serving(), len(server.sockets))
            await server.start_serving()
            addr = server.sockets[0].getsockname()

            def client():
                with socket.create_connection(addr) as c:
                    c.sendall(b"later")
                    c.shutdown(socket.SHUT_WR)
                    return recv_all(c)

            reply = await asyncio.get_running_loop().run_in_executor(
                None, client)
            after = server.is_serving()
            server.close()
            await server.wait_closed()
            return before, after, reply

        self.compare(scenario, ((False, 1), True, b"later"))

    def test_serve_forever_until_cancelled(self):
        async def scenario(api):
            async def handle(r, w):
                w.write(await r.read())
                w.close()

            server = await api.start_server(handle, "127.0.0.1", 0,
                                            start_serving=False)
            task = asyncio.ensure_future(server.serve_forever())
            await asyncio.sleep(0)
            addr = server.sockets[0].getsockname()

            def client():
                with socket.create_connection(addr) as c:
                    c.sendall(b"echo")
                    c.shutdown(socket.SHUT_WR)
                    return recv_all(c)

            reply = await asyncio.get_running_loop().run_in_executor(
                None, client)
            serving = server.is_serving()
            try:
                await server.serve_forever()
                twice = None
            except RuntimeError as e:
                twice = type(e).__name__
            task.cancel()
            try:
                await task
                cancelled = False
            except asyncio.CancelledError:
                cancelled = True
            return reply, serving, twice, cancelled, server.is_serving(), \
                server.sockets

        self.compare(scenario, (b"echo", True, "RuntimeError", True, False,
                                ()))

    def test_async_with_closes_the_server(self):
        async def scenario(api):
            async def handle(r, w):
                w.close()

            async with await api.start_server(handle, "127.0.0.1",
                                              0) as server:
                serving = server.is_serving()
            return serving, server.is_serving(), server.sockets

        self.compare(scenario, (True, False, ()))

    def test_no_host_listens_on_every_interface(self):
        async def scenario(api):
            async def handle(r, w):
                w.close()

            server = await api.start_server(handle, None, 0)
            families = sorted(s.family for s in server.sockets)
            hosts = sorted(s.getsockname()[0] for s in server.sockets)
            server.close()
            await server.wait_closed()
            return families, hosts

        got = self.compare(scenario)
        self.assertIn("0.0.0.0", got[1])

    def test_unix_server_and_client_names(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s")

            async def scenario(api):
                names = []

                async def handle(r, w):
                    names.append(("server", w.get_extra_info("peername"),
                                  w.get_extra_info("sockname")))
                    w.write(await r.readexactly(3))
                    w.close()

                server = await api.start_unix_server(handle, path)
                r, w = await api.open_unix_connection(path)
                names.append(("client", w.get_extra_info("peername"),
                              w.get_extra_info("sockname"),
                              w.get_extra_info("socket").family))
                w.write(b"abc")
                reply = await r.read()
                w.close()
                await w.wait_closed()
                server.close()
                await server.wait_closed()
                return sorted(names, key=lambda n: n[0]), reply, \
                    server.sockets

            self.compare(scenario, (
                [("client", path, "", socket.AF_UNIX),
                 ("server", "", path)], b"abc", ()))

    def test_ipv6_names(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except OSError:
            self.skipTest("no ::1")

        async def scenario(api):
            async def handle(r, w):
                w.write(repr(w.get_extra_info("sockname")).encode())
                w.close()

            server = await api.start_server(handle, "::1", 0)
            port = server.sockets[0].getsockname()[1]
            r, w = await api.open_connection("::1", port)
            peer = w.get_extra_info("peername")
            said = await r.read()
            w.close()
            await w.wait_closed()
            server.close()
            await server.wait_closed()
            return (peer[0], peer[1] == port, peer[2:],
                    said == repr(peer).encode(),
                    w.get_extra_info("socket").family)

        self.compare(scenario, ("::1", True, (0, 0), True, socket.AF_INET6))


class ProtocolTest(Compare):
    def test_protocol_callbacks_in_order(self):
        class Recorder(asyncio.Protocol):
            def __init__(self):
                self.events = []
                self.lost = asyncio.get_running_loop().create_future()

            def connection_made(self, transport):
                self.events.append("made")
                transport.write(b"hi")

            def data_received(self, data):
                if self.events[-1] != "data":
                    self.events.append("data")

            def eof_received(self):
                self.events.append("eof")  # returns None: the transport closes

            def connection_lost(self, exc):
                self.events.append(("lost", exc))
                self.lost.set_result(None)

        async def scenario(api):
            def script(s):
                got = s.recv(2)
                s.sendall(b"x" * 100000)
                s.shutdown(socket.SHUT_WR)
                return got + recv_all(s)

            peer = Peer(script)
            transport, proto = await api.create_connection(Recorder,
                                                           *peer.address)
            await proto.lost
            return proto.events, transport.is_closing(), await peer.done()

        self.compare(scenario, (["made", "data", "eof", ("lost", None)],
                                True, b"hi"))

    def test_abort_ends_with_connection_lost_none(self):
        # (The peer sees a reset from duplex.aio, a FIN from asyncio.)
        async def scenario(api):
            peer = Peer(lambda s: recv_all(s))
            r, w = await api.open_connection(*peer.address)
            w.write(b"dropped?")
            w.transport.abort()
            await w.wait_closed()  # None: no exception
            try:
                await peer.done()
            except ConnectionResetError:
                pass
            w.write(b"after")  # dropped quietly
            return w.is_closing(), r.at_eof(), w.transport.is_reading()

        self.compare(scenario, (True, True, False))

    def test_pause_and_resume_reading(self):
        async def scenario(api):
            peer = Peer(send_then_eof(b"z" * MiB))
            r, w = await api.open_connection(*peer.address)
            t = w.transport
            t.pause_reading()
            paused = t.is_reading()
            t.pause_reading()  # idempotent
            t.resume_reading()
            data = await r.read()
            w.close()
            await w.wait_closed()
            await peer.done()
            return paused, len(data), t.is_reading()

        self.compare(scenario, (False, MiB, False))


class DuplexOnlyTest(unittest.TestCase):
    """What only the bridge has: its own options and internals."""

    def setUp(self):
        self.loop = duplex.Loop()

    def tearDown(self):
        self.loop.close()

    def test_refused_writes_are_kept_in_order_until_on_writable(self):
        # The first write fills the queue to the hard limit exactly (its
        # payload plus WRITE_OVERHEAD), so the next ones are refused and
        # kept; the third never fits above the low watermark (it waits for
        # an empty queue). on_writable wakes drain() each time.
        a, b = socketpair(bufsize=16 << 10)
        hard = 256 << 10
        first = b"f" * (hard - duplex.WRITE_OVERHEAD)
        third = b"t" * (hard - (16 << 10))

        async def main():
            r, w = await duplex.aio.open_connection(
                sock=a, duplex_loop=self.loop, high_watermark=64 << 10,
                low_watermark=32 << 10, hard_limit=hard)
            t = w.transport
            w.write(first)
            w.write(b"second")
            w.write(bytearray(third))
            self.assertEqual(list(t._pending), [b"second", third])
            self.assertEqual(t.get_write_buffer_size(),
                             len(first) + duplex.WRITE_OVERHEAD + 6 +
                             len(third))
            peer = Reader(b)
            peer.start()
            await w.drain()
            self.assertFalse(t._pending)
            w.write_eof()
            data = await asyncio.get_running_loop().run_in_executor(
                None, peer.result)
            b.close()
            w.close()
            await w.wait_closed()
            return data

        self.assertEqual(asyncio.run(main()), first + b"second" + third)

    def test_close_waits_for_kept_writes(self):
        a, b = socketpair(bufsize=16 << 10)
        chunk = bytes(range(256)) * 256

        async def main():
            r, w = await duplex.aio.open_connection(
                sock=a, duplex_loop=self.loop, high_watermark=64 << 10,
                hard_limit=256 << 10)
            for _ in range(64):
                w.write(chunk)  # never blocks: refused writes are kept
            self.assertTrue(w.transport._pending)
            w.close()  # after everything above is flushed
            peer = Reader(b)
            peer.start()
            await w.wait_closed()
            data = await asyncio.get_running_loop().run_in_executor(
                None, peer.result)
            b.close()
            return data

        self.assertEqual(asyncio.run(main()), chunk * 64)

    def test_extras_default_loop_and_options(self):
        a, b = socketpair()

        async def main():
            r, w = await duplex.aio.open_connection(sock=a)  # default loop
            conn = w.get_extra_info("duplex_conn")
            self.assertIsInstance(conn, duplex.Conn)
            self.assertIs(conn.loop, duplex.aio.default_loop())
            self.assertEqual(w.get_extra_info("peername"), "")
            self.assertIsInstance(w.transport, asyncio.Transport)
            self.assertEqual(w.transport.get_write_buffer_limits(),
                             (256 << 10, 1 << 20))
            with self.assertRaises(NotImplementedError):
                w.transport.set_write_buffer_limits(1000)
            w.close()
            await w.wait_closed()
            with self.assertRaises(NotImplementedError):
                await duplex.aio.open_connection("127.0.0.1", 1,
                                                 local_addr=("::", 0))
            with self.assertRaises(TypeError):  # TLS takes a TLSConfig
                await duplex.aio.open_connection(
                    "127.0.0.1", 1, ssl=ssl.create_default_context())
            with self.assertRaises(TypeError):
                await duplex.aio.open_connection("127.0.0.1", 1,
                                                 no_such_option=1)

        asyncio.run(main())
        b.close()

    def test_a_closed_asyncio_loop_aborts_its_conns(self):
        a, b = socketpair()

        async def main():
            r, w = await duplex.aio.open_connection(sock=a,
                                                    duplex_loop=self.loop)
            return w  # kept: 3.13's StreamWriter closes itself when collected

        w = asyncio.run(main())  # the loop closes with the conn open
        conn = w.get_extra_info("duplex_conn")
        b.sendall(b"anyone?")  # its on_read finds no asyncio loop
        conn.wait_closed(GUARD)
        b.settimeout(GUARD)
        try:
            self.assertEqual(b.recv(10), b"")
        except ConnectionResetError:
            pass
        b.close()

    def test_start_serving_later_holds_early_connections(self):
        # asyncio listens only from start_serving() on (earlier clients
        # are refused); a libduplex listener listens at once, so clients
        # that come before are accepted and wait, unread.
        async def main():
            calls = []

            async def handle(r, w):
                calls.append(await r.read())
                w.close()

            server = await duplex.aio.start_server(
                handle, "127.0.0.1", 0, start_serving=False,
                duplex_loop=self.loop)
            c = socket.create_connection(server.sockets[0].getsockname())
            c.sendall(b"early")
            c.shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.1)
            self.assertEqual(calls, [])
            await server.start_serving()
            loop = asyncio.get_running_loop()
            self.assertEqual(await loop.run_in_executor(None, recv_all, c),
                             b"")
            c.close()
            self.assertEqual(calls, [b"early"])
            server.close()
            await server.wait_closed()

        asyncio.run(main())

    def test_server_wait_closed_waits_for_its_connections(self):
        async def main():
            done, started = asyncio.Event(), asyncio.Event()

            async def handle(r, w):
                started.set()
                await r.read()
                w.close()
                done.set()

            server = await duplex.aio.start_server(
                handle, "127.0.0.1", 0, duplex_loop=self.loop)
            c = socket.create_connection(server.sockets[0].getsockname())
            c.sendall(b"x")
            await started.wait()
            server.close()
            waiting = asyncio.ensure_future(server.wait_closed())
            await asyncio.sleep(0.1)
            self.assertFalse(waiting.done())  # the client is still there
            c.shutdown(socket.SHUT_WR)
            await done.wait()
            await waiting
            c.close()

        asyncio.run(main())

    def test_abort_resets_a_tcp_peer(self):
        async def main():
            peer = Peer(lambda s: recv_all(s))
            r, w = await duplex.aio.open_connection(*peer.address,
                                                    duplex_loop=self.loop)
            w.transport.abort()
            self.assertIsNone(await w.wait_closed())
            with self.assertRaises(ConnectionResetError):
                await peer.done()

        asyncio.run(main())

    def test_cancelled_connect_aborts_the_conn(self):
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)

        async def main():
            task = asyncio.ensure_future(duplex.aio.open_connection(
                *lsock.getsockname(), duplex_loop=self.loop))
            await asyncio.sleep(0)
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        lsock.settimeout(0.5)
        try:
            s, _ = lsock.accept()
        except socket.timeout:
            pass  # cancelled before it connected
        else:
            s.settimeout(GUARD)
            try:
                self.assertEqual(s.recv(10), b"")  # the conn went away
            except ConnectionResetError:
                pass
            s.close()
        lsock.close()


if __name__ == "__main__":
    unittest.main()
