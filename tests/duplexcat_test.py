#!/usr/bin/env python3
"""End-to-end tests for tools/duplexcat against plain Python socket peers.

Usage: duplexcat_test.py PATH-TO-DUPLEXCAT [unittest args]

Loopback and temporary directories only. Every wait has a hang guard
(TIMEOUT): a duplexcat that outlives it is killed and the test fails saying
what it was waiting for; no test asserts on wall-clock time. Peer threads
are daemons, so a stuck one cannot keep the process alive either.
"""
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

DUPLEXCAT = None
TIMEOUT = 60
MB = 1 << 20


def sha(b):
    return hashlib.sha256(b).hexdigest()


def recv_all(conn):
    chunks = []
    while True:
        d = conn.recv(65536)
        if not d:
            return b"".join(chunks)
        chunks.append(d)


class Peer:
    """A listening socket (TCP on 127.0.0.1:0, or a UNIX path) whose single
    accepted connection is given to handler(conn) on a thread. The handler's
    return value (or exception) is kept for result()."""

    def __init__(self, handler, family=socket.AF_INET, path=None):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            self.sock.bind(path)
            self.address = "unix:" + path
        elif family == socket.AF_INET6:
            self.sock.bind(("::1", 0))
            self.address = "[::1]:%d" % self.sock.getsockname()[1]
        else:
            self.sock.bind(("127.0.0.1", 0))
            self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.sock.listen(1)
        self.sock.settimeout(TIMEOUT)
        self._result = self._error = None
        self._thread = threading.Thread(target=self._run, args=(handler,),
                                        daemon=True)
        self._thread.start()

    def _run(self, handler):
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(TIMEOUT)
            with conn:
                self._result = handler(conn)
        except BaseException as e:  # reported by result()
            self._error = e
        finally:
            self.sock.close()

    def result(self):
        self._thread.join(TIMEOUT)
        if self._thread.is_alive():
            raise AssertionError("hang guard: the peer on %s was still busy "
                                 "after %d s" % (self.address, TIMEOUT))
        if self._error is not None:
            raise self._error
        return self._result


def stop(p):
    """Kill a duplexcat that is still running and reap it (bounded)."""
    if p.poll() is None:
        p.kill()
    try:
        p.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


def run(args, stdin=b"", stdout=subprocess.PIPE):
    """Run duplexcat; stdin is bytes (fed through a pipe) or an open file."""
    feed = isinstance(stdin, bytes)
    p = subprocess.Popen([DUPLEXCAT] + args,
                         stdin=subprocess.PIPE if feed else stdin,
                         stdout=stdout, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(stdin if feed else None, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(p)
        _, err = p.communicate(timeout=TIMEOUT)
        raise AssertionError(
            "hang guard: duplexcat %s still running after %d s (killed); "
            "stderr: %r" % (" ".join(args), TIMEOUT,
                            err.decode(errors="replace"))) from None
    finally:
        stop(p)
        if not feed:
            stdin.close()
    return p.returncode, out, err.decode(errors="replace")


def file_with(data):
    f = tempfile.TemporaryFile()
    f.write(data)
    f.seek(0)
    return f


def exchange(to_peer):
    """A peer handler: send to_peer while reading everything, then close."""
    def handler(conn):
        got = {}
        reader = threading.Thread(target=lambda: got.update(d=recv_all(conn)),
                                  daemon=True)
        reader.start()
        conn.sendall(to_peer)
        conn.shutdown(socket.SHUT_WR)
        reader.join(TIMEOUT)
        if "d" not in got:  # recv timed out (see stderr) or still running
            raise AssertionError("peer: no EOF from duplexcat within %d s"
                                 % TIMEOUT)
        return got["d"]
    return handler


class Bytes(unittest.TestCase):
    def both_ways(self, stdin_file, stdout_file):
        up, down = os.urandom(MB), os.urandom(MB)
        peer = Peer(exchange(down))
        stdin = file_with(up) if stdin_file else up
        out_f = tempfile.TemporaryFile() if stdout_file else subprocess.PIPE
        rc, out, err = run([peer.address], stdin, out_f)
        if stdout_file:
            out_f.seek(0)
            out = out_f.read()
            out_f.close()
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(sha(peer.result()), sha(up))
        self.assertEqual(sha(out), sha(down))

    def test_1mb_each_way_pipes(self):
        self.both_ways(False, False)

    def test_1mb_each_way_stdin_regular_file(self):
        self.both_ways(True, False)  # the reader-thread path

    def test_1mb_each_way_stdout_regular_file(self):
        self.both_ways(False, True)

    def test_1mb_each_way_both_regular_files(self):
        self.both_ways(True, True)

    def test_empty_stdin_from_dev_null(self):
        peer = Peer(exchange(b"only down\n"))
        with open(os.devnull, "rb") as null:
            rc, out, err = run([peer.address], null)
        self.assertEqual((rc, out, peer.result()), (0, b"only down\n", b""))

    def test_half_close_peer_keeps_sending_after_our_eof(self):
        def handler(conn):
            got = recv_all(conn)  # our EOF arrives first ...
            for i in range(100):  # ... then the peer still talks
                conn.sendall(b"late %d\n" % i)
            return got
        peer = Peer(handler)
        rc, out, err = run([peer.address], b"bye\n")
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(peer.result(), b"bye\n")
        self.assertEqual(out, b"".join(b"late %d\n" % i for i in range(100)))

    def test_ipv6_loopback(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        try:
            peer = Peer(exchange(b"six\n"), socket.AF_INET6)
        except OSError:
            self.skipTest("no ::1")
        rc, out, err = run([peer.address], b"v6\n")
        self.assertEqual((rc, out, peer.result()), (0, b"six\n", b"v6\n"))


class Errors(unittest.TestCase):
    def closed_port(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def test_connection_refused_exits_1(self):
        rc, out, err = run(["127.0.0.1:%d" % self.closed_port()])
        self.assertEqual(rc, 1)
        self.assertEqual(err, "duplexcat: connection refused\n")

    def test_quiet_prints_nothing(self):
        rc, out, err = run(["-q", "127.0.0.1:%d" % self.closed_port()])
        self.assertEqual((rc, err), (1, ""))

    def test_missing_unix_socket_exits_1(self):
        with tempfile.TemporaryDirectory() as d:
            rc, out, err = run(["unix:" + os.path.join(d, "none")])
        self.assertEqual(rc, 1)
        self.assertIn("no such file", err)

    def test_bad_usage_exits_2(self):
        for args in ([], ["-x", "127.0.0.1:1"], ["127.0.0.1"],
                     ["127.0.0.1:0"], ["127.0.0.1:65536"], ["::1:80"],
                     ["127.0.0.1:http"], ["-i", "0", "127.0.0.1:1"],
                     ["-w", "abc", "127.0.0.1:1"], ["a:1", "b:2"],
                     ["-p", "/tmp/x", "127.0.0.1:1"], ["unix:"],
                     ["-l", "127.0.0.1:x"]):
            with self.subTest(args=args):
                rc, out, err = run(args)
                self.assertEqual(rc, 2)
                self.assertIn("usage:", err)

    def test_help_exits_0(self):
        rc, out, err = run(["-h"])
        self.assertEqual(rc, 0)
        self.assertIn(b"usage:", out)

    def test_idle_timeout_exits_1(self):
        def handler(conn):  # accepts, never sends, waits for our close
            return recv_all(conn)
        peer = Peer(handler)
        # stdin stays open (a pipe nobody writes to) so only -i ends it.
        p = subprocess.Popen([DUPLEXCAT, "-i", "0.2", peer.address],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            rc = p.wait(timeout=TIMEOUT)
            err = p.stderr.read().decode()
        except subprocess.TimeoutExpired:
            self.fail("hang guard: duplexcat -i 0.2 still running after "
                      "%d s (killed)" % TIMEOUT)
        finally:
            stop(p)
            for f in (p.stdin, p.stdout, p.stderr):
                f.close()
        self.assertEqual(rc, 1)
        self.assertEqual(err, "duplexcat: timed out\n")
        peer.result()

    def test_connect_timeout_exits_1(self):
        # A listener whose accept queue is full drops new SYNs (Linux), so
        # the connect hangs until -w gives up. (-i is only a hang guard for
        # systems where the connect succeeds anyway.)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        port = s.getsockname()[1]
        fillers = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        rc, out, err = run(["-w", "0.3", "-i", "5", "127.0.0.1:%d" % port])
        for c in fillers + [s]:
            c.close()
        self.assertEqual((rc, err), (1, "duplexcat: timed out\n"))


class Lines(unittest.TestCase):
    def test_lines_both_ways(self):
        peer = Peer(exchange(b"x\n\nyy\n"))
        rc, out, err = run(["-L", peer.address], b"a\nbb\n\nlast")
        self.assertEqual((rc, err), (0, ""))
        # Each stdin line is one frame; the unterminated last one too.
        self.assertEqual(peer.result(), b"a\nbb\n\nlast\n")
        self.assertEqual(out, b"x\n\nyy\n")

    def test_lines_from_regular_file(self):
        lines = b"".join(b"line %d\n" % i for i in range(20000))
        peer = Peer(exchange(b""))
        rc, out, err = run(["-L", peer.address], file_with(lines + b"tail"))
        self.assertEqual((rc, out, err), (0, b"", ""))
        self.assertEqual(peer.result(), lines + b"tail\n")

    def test_unterminated_line_from_peer_is_a_protocol_error(self):
        peer = Peer(exchange(b"whole\npartial"))
        rc, out, err = run(["-L", peer.address], b"")
        self.assertEqual(rc, 1)
        self.assertEqual(out, b"whole\n")
        self.assertEqual(err, "duplexcat: protocol error\n")
        peer.result()


class Listen(unittest.TestCase):
    def serve(self, listen_args, connect, stdin=b"to client\n"):
        """Start duplexcat -l ... -p FILE, connect(address) -> (sent, got)."""
        with tempfile.TemporaryDirectory() as d:
            addr_file = os.path.join(d, "addr")
            p = subprocess.Popen(
                [DUPLEXCAT, "-v", "-p", addr_file, "-l"] + listen_args,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
            result = {}

            def communicate():
                try:
                    result["out"], result["err"] = p.communicate(
                        stdin, timeout=TIMEOUT)
                except BaseException as e:  # reported below
                    result["error"] = e
            t = threading.Thread(target=communicate, daemon=True)
            t.start()
            try:
                # The address file appears once duplexcat listens; a whole
                # line (newline-terminated) means it is complete.
                address = ""
                deadline = time.monotonic() + TIMEOUT
                while True:
                    try:
                        with open(addr_file) as f:
                            address = f.read()
                    except FileNotFoundError:
                        pass
                    if address.endswith("\n"):
                        break
                    if p.poll() is not None:
                        t.join(TIMEOUT)
                        err = result.get("err", b"").decode(errors="replace")
                        self.fail("duplexcat -l exited %s before writing its "
                                  "address; stderr: %r" % (p.returncode, err))
                    if time.monotonic() > deadline:
                        self.fail("hang guard: duplexcat -l wrote no address "
                                  "to %s within %d s" % (addr_file, TIMEOUT))
                    time.sleep(0.01)
                sent, got = connect(address.strip())
                t.join(TIMEOUT)
                error = result.get("error")
                if t.is_alive() or isinstance(error,
                                              subprocess.TimeoutExpired):
                    self.fail("hang guard: duplexcat -l still running %d s "
                              "after the client finished (killed)" % TIMEOUT)
                if error is not None:
                    raise error
            finally:
                stop(p)  # every way out: nothing outlives the test
                t.join(TIMEOUT)
            return p.returncode, result["out"], result["err"].decode(), \
                address.strip(), sent, got

    def tcp_client(self, address):
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), TIMEOUT) as s:
            s.sendall(b"to server\n")
            s.shutdown(socket.SHUT_WR)
            return b"to server\n", recv_all(s)

    def test_listen_tcp_port_0(self):
        rc, out, err, address, sent, got = self.serve(["127.0.0.1:0"],
                                                      self.tcp_client)
        self.assertEqual(rc, 0)
        self.assertRegex(address, r"^127\.0\.0\.1:[1-9][0-9]*$")
        self.assertIn("duplexcat: listening on " + address, err)
        self.assertIn("duplexcat: connection from 127.0.0.1:", err)
        self.assertEqual((out, got), (sent, b"to client\n"))

    def test_listen_unix(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sock")

            def client(address):
                self.assertEqual(address, path)
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                    s.sendall(b"over unix\n")
                    s.shutdown(socket.SHUT_WR)
                    return b"over unix\n", recv_all(s)
            rc, out, err, address, sent, got = self.serve(["unix:" + path],
                                                          client)
            self.assertEqual((rc, out, got), (0, sent, b"to client\n"))
            self.assertFalse(os.path.exists(path))  # removed on close

    def test_duplexcat_to_duplexcat_lines(self):
        def client(address):
            rc, out, err = run(["-L", address], b"one\ntwo\n")
            self.assertEqual((rc, err), (0, ""))
            return b"one\ntwo\n", out
        rc, out, err, address, sent, got = self.serve(
            ["-L", "127.0.0.1:0"], client, b"three\n")
        self.assertEqual((rc, out, got), (0, sent, b"three\n"))

    def test_accept_timeout_exits_1(self):
        rc, out, err = run(["-q", "-w", "0.2", "-l", "127.0.0.1:0"])
        self.assertEqual((rc, out, err), (1, b"", ""))
        rc, out, err = run(["-w", "0.2", "-l", "127.0.0.1:0"])
        self.assertEqual((rc, err), (1, "duplexcat: accept: timed out\n"))

    def test_address_in_use_exits_1(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with s:
            rc, out, err = run(["-l", "127.0.0.1:%d" % s.getsockname()[1]])
        self.assertEqual(rc, 1)
        self.assertIn("address already in use", err)


class Unix(unittest.TestCase):
    def test_connect_unix_both_ways(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "peer.sock")
            up, down = os.urandom(MB // 4), os.urandom(MB // 4)
            peer = Peer(exchange(down), socket.AF_UNIX, path)
            rc, out, err = run([peer.address], up)
            self.assertEqual((rc, err), (0, ""))
            self.assertEqual(sha(peer.result()), sha(up))
            self.assertEqual(sha(out), sha(down))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: duplexcat_test.py PATH-TO-DUPLEXCAT [unittest args]")
    DUPLEXCAT = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
