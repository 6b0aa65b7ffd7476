#!/usr/bin/env python3
"""End-to-end tests for tools/duplexcat against plain Python socket peers.

Usage: duplexcat_test.py PATH-TO-DUPLEXCAT [unittest args]

Loopback and temporary directories only. Every wait has a hang guard
(TIMEOUT): a duplexcat that outlives it is killed and the test fails saying
what it was waiting for; no test asserts on wall-clock time. Peer threads
are daemons, so a stuck one cannot keep the process alive either.
The man page and docs/duplexcat.md are found next to this file
(../tools/duplexcat.1, ../docs/duplexcat.md).
"""
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

DUPLEXCAT = None
TIMEOUT = 60
MB = 1 << 20
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# Services with an unprivileged port in most /etc/services: one that is
# free on 127.0.0.1 stands in for "http" (port 80 needs root).
SERVICES = ["x11", "postgresql", "mysql", "svn", "git", "http-alt",
            "webcache", "amanda", "iprop", "nut", "zabbix-agent"]


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

    def __init__(self, handler, family=socket.AF_INET, path=None, sock=None):
        self.sock = sock or socket.socket(family, socket.SOCK_STREAM)
        if sock is not None:
            self.address = "127.0.0.1:%d" % sock.getsockname()[1]
        elif family == socket.AF_UNIX:
            self.sock.bind(path)
            self.address = "unix:" + path
        elif family == socket.AF_INET6:
            self.sock.bind(("::1", 0))
            self.address = "[::1]:%d" % self.sock.getsockname()[1]
        else:
            self.sock.bind(("127.0.0.1", 0))
            self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.port = None if family == socket.AF_UNIX else \
            self.sock.getsockname()[1]
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


def v6_peer(handler):
    """A Peer on [::1]:0, or None where this host has no IPv6 loopback."""
    if not socket.has_ipv6:
        return None
    try:
        return Peer(handler, socket.AF_INET6)
    except OSError:
        return None


def free_service():
    """(name, socket bound to its port on 127.0.0.1, not listening) for a
    service in /etc/services whose port is free here."""
    for name in SERVICES:
        try:
            port = socket.getservbyname(name, "tcp")
        except OSError:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return name, s
        except OSError:
            s.close()
    raise unittest.SkipTest("no free port of a known service (%s)"
                            % ", ".join(SERVICES))


def closed_port():
    """A TCP port on 127.0.0.1 that nobody listens on (probably)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def client_address(address):
    """(host, port) to connect to what duplexcat -l reports: a wildcard
    address is reached on loopback."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return host, int(port)


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
        self.both_ways(True, False)  # the stdin pump (file -> pipe) path

    def test_1mb_each_way_stdout_regular_file(self):
        self.both_ways(False, True)

    def test_1mb_each_way_both_regular_files(self):
        self.both_ways(True, True)

    def test_empty_stdin_from_dev_null(self):
        peer = Peer(exchange(b"only down\n"))
        with open(os.devnull, "rb") as null:
            rc, out, err = run([peer.address], null)
        self.assertEqual((rc, out, peer.result()), (0, b"only down\n", b""))

    def test_ipv6_loopback(self):
        peer = v6_peer(exchange(b"six\n"))
        if peer is None:
            self.skipTest("no ::1")
        rc, out, err = run([peer.address], b"v6\n")
        self.assertEqual((rc, out, peer.result()), (0, b"six\n", b"v6\n"))


class Positional(unittest.TestCase):
    """nc's argument forms: HOST PORT, service names, -U PATH."""

    def test_host_port_as_two_arguments(self):
        peer = Peer(exchange(b"down\n"))
        rc, out, err = run(["127.0.0.1", str(peer.port)], b"up\n")
        self.assertEqual((rc, err, out), (0, "", b"down\n"))
        self.assertEqual(peer.result(), b"up\n")

    def test_ipv6_host_port_with_and_without_brackets(self):
        for host in ("::1", "[::1]"):
            with self.subTest(host=host):
                peer = v6_peer(exchange(b"down\n"))
                if peer is None:
                    self.skipTest("no ::1")
                rc, out, err = run([host, str(peer.port)], b"up\n")
                self.assertEqual((rc, err, out), (0, "", b"down\n"))
                self.assertEqual(peer.result(), b"up\n")

    def test_service_name_as_port(self):
        for form in ("two arguments", "HOST:SERVICE"):
            with self.subTest(form=form):
                name, sock = free_service()
                peer = Peer(exchange(b"by name\n"), sock=sock)
                args = (["127.0.0.1", name] if form == "two arguments"
                        else ["127.0.0.1:" + name])
                rc, out, err = run(args, b"up\n")
                self.assertEqual((rc, err, out), (0, "", b"by name\n"))
                self.assertEqual(peer.result(), b"up\n")

    def test_unknown_service_is_a_usage_error(self):
        rc, out, err = run(["127.0.0.1", "no-such-service"])
        self.assertEqual(rc, 2)
        self.assertIn("duplexcat: unknown port or service name: "
                      "no-such-service (tcp)\n", err)

    def test_unix_flag_takes_a_path(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "peer.sock")
            peer = Peer(exchange(b"down\n"), socket.AF_UNIX, path)
            rc, out, err = run(["-U", path], b"up\n")
            self.assertEqual((rc, err, out), (0, "", b"down\n"))
            self.assertEqual(peer.result(), b"up\n")


class Help(unittest.TestCase):
    def test_help_long_and_short(self):
        for flag in ("-h", "--help"):
            with self.subTest(flag=flag):
                rc, out, err = run([flag])
                self.assertEqual((rc, err), (0, ""))
                self.assertTrue(out.startswith(b"usage: duplexcat"))
                self.assertIn(b"Exit status", out)

    def test_version(self):
        rc, out, err = run(["--version"])
        self.assertEqual((rc, err), (0, ""))
        self.assertRegex(out.decode(),
                         r"^duplexcat \d+\.\d+\.\d+ \(libduplex \d+\.\d+\.\d+\)\n$")

    def help_options(self):
        rc, out, err = run(["--help"])
        opts = re.findall(r"(?m)^  (?:(-\w), )?\s*(--[\w-]+)", out.decode())
        self.assertGreater(len(opts), 10)
        return opts

    def test_man_page_and_docs_describe_every_option(self):
        with open(os.path.join(SOURCE, "tools", "duplexcat.1")) as f:
            man = f.read()
        # Plain text from the roff source: \- is a minus, \fB... fonts.
        man = re.sub(r"\\f[BIRP]", "", man.replace("\\-", "-"))
        with open(os.path.join(SOURCE, "docs", "duplexcat.md")) as f:
            md = f.read()
        def mentions(text, flag):
            return re.search(re.escape(flag) + r"(?![\w-])", text) is not None
        for short, long_ in self.help_options():
            for name, text in (("duplexcat.1", man), ("duplexcat.md", md)):
                for flag in filter(None, (short, long_)):
                    with self.subTest(option=flag, doc=name):
                        self.assertTrue(mentions(text, flag),
                                        "%s does not mention %s" % (name, flag))
        # Flags that nc (OpenBSD) reads differently are set side by side.
        for name, text in (("duplexcat.1", man), ("duplexcat.md", md)):
            with self.subTest(table=name):
                self.assertTrue("nc (OpenBSD)" in text,
                                "%s has no nc comparison table" % name)

    def test_man_page_renders_without_warnings(self):
        groff = shutil.which("groff")
        if groff is None:
            self.skipTest("no groff")
        r = subprocess.run([groff, "-t", "-man", "-Tutf8", "-ww",
                            os.path.join(SOURCE, "tools", "duplexcat.1")],
                           capture_output=True, timeout=TIMEOUT)
        self.assertEqual((r.returncode, r.stderr.decode()), (0, ""))
        text = re.sub(".\b", "", r.stdout.decode(errors="replace"))  # bold
        for section in ("NAME", "SYNOPSIS", "OPTIONS", "EXIT STATUS",
                        "SIGNALS"):
            self.assertIn(section, text)


class Errors(unittest.TestCase):
    """Every message names what failed; exit status 1 (runtime) or 2."""

    def test_connection_refused_names_host_and_port(self):
        port = closed_port()
        for args in (["127.0.0.1:%d" % port], ["127.0.0.1", str(port)]):
            with self.subTest(args=args):
                rc, out, err = run(args)
                self.assertEqual((rc, err), (1, "duplexcat: connect to 127.0.0.1 "
                                 "port %d (tcp): connection refused\n" % port))

    def test_unknown_host_names_the_host(self):
        # .invalid never resolves (RFC 6761); -w bounds a resolver that
        # does not answer, and the message names the host either way.
        rc, out, err = run(["-w", "20", "no-such-host.invalid", "7"])
        self.assertEqual(rc, 1)
        self.assertTrue(err.startswith("duplexcat: connect to "
                                       "no-such-host.invalid port 7 (tcp): "),
                        err)

    def test_quiet_prints_nothing(self):
        rc, out, err = run(["-q", "127.0.0.1:%d" % closed_port()])
        self.assertEqual((rc, err), (1, ""))

    def test_missing_unix_socket_names_the_path(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "none")
            rc, out, err = run(["unix:" + path])
        self.assertEqual((rc, err), (1, "duplexcat: connect to %s (unix): "
                                        "no such file or directory\n" % path))

    def test_reset_by_peer_names_the_connection(self):
        def handler(conn):
            got = conn.recv(100)  # duplexcat is connected
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return got  # closed with linger 0: RST
        peer = Peer(handler)
        p = subprocess.Popen([DUPLEXCAT, peer.address], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            p.stdin.write(b"hi\n")
            p.stdin.flush()  # stdin stays open: only the reset ends it
            _, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail("hang guard: duplexcat still running %d s after the "
                      "peer reset the connection (killed)" % TIMEOUT)
        finally:
            stop(p)
            for f in (p.stdin, p.stdout, p.stderr):
                f.close()
        self.assertEqual(peer.result(), b"hi\n")
        self.assertEqual((p.returncode, err.decode()),
                         (1, "duplexcat: connection to 127.0.0.1 port %d "
                             "(tcp): connection reset by peer\n" % peer.port))

    def test_broken_stdout_exits_1(self):
        def handler(conn):
            try:  # until duplexcat is gone (its stdout reader left)
                while True:
                    conn.sendall(b"x" * 65536)
            except OSError:
                return None
        peer = Peer(handler)
        with open(os.devnull, "rb") as null:
            p = subprocess.Popen([DUPLEXCAT, peer.address], stdin=null,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        try:
            p.stdout.read(1)
            p.stdout.close()  # the reader goes away
            _, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail("hang guard: duplexcat still running %d s after its "
                      "stdout reader left (killed)" % TIMEOUT)
        finally:
            stop(p)
            p.stderr.close()
        self.assertEqual((p.returncode, err.decode()),
                         (1, "duplexcat: stdout: broken pipe\n"))
        peer.result()

    def test_closed_stdout_discards_output(self):
        # With fd 1 closed, the next descriptor opened would be 1; duplexcat
        # parks /dev/null there so it never adopts its own descriptor.
        peer = Peer(exchange(b"into the void\n"))
        r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", DUPLEXCAT,
                            peer.address], input=b"up\n",
                           capture_output=True, timeout=TIMEOUT)
        self.assertEqual((r.returncode, r.stderr), (0, b""))
        self.assertEqual(peer.result(), b"up\n")

    def test_bad_usage_exits_2(self):
        for args in ([], ["-x", "127.0.0.1:1"], ["--bogus", "127.0.0.1:1"],
                     ["127.0.0.1"], ["127.0.0.1:0"], ["127.0.0.1:65536"],
                     ["127.0.0.1", "0"], ["127.0.0.1", "65536"], ["::1:80"],
                     ["127.0.0.1:no-such-service"], ["-i", "0", "127.0.0.1:1"],
                     ["-w", "abc", "127.0.0.1:1"], ["-w"], ["a:1", "b:2"],
                     ["a", "1", "2"], ["-p", "/tmp/x", "127.0.0.1:1"],
                     ["unix:"], ["unix:/tmp/x", "1"], ["-U", "a", "b"],
                     ["-l", "127.0.0.1:x"], ["-k", "127.0.0.1", "1"],
                     ["-4", "-6", "127.0.0.1", "1"], ["-6", "127.0.0.1", "1"],
                     ["-4", "::1", "1"], ["-4", "-U", "/tmp/x"],
                     # nc habits whose flags mean something else here:
                     ["-q", "1", "127.0.0.1", "1"],  # nc: quit after 1 s
                     ["-l", "-p", "8080"]):          # nc: listen on 8080
            with self.subTest(args=args):
                rc, out, err = run(args)
                self.assertEqual((rc, out), (2, b""))
                self.assertRegex(err, r"^duplexcat: .*\nusage: duplexcat ")
        rc, out, err = run(["-l", "-p", "8080"])
        self.assertIn("not nc's port", err)

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
        self.assertEqual(err, "duplexcat: connection to 127.0.0.1 port %d "
                              "(tcp): nothing sent or received for 0.2 s "
                              "(-i): timed out\n" % peer.port)
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
        self.assertEqual((rc, err), (1, "duplexcat: connect to 127.0.0.1 "
                                        "port %d (tcp): timed out\n" % port))


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
        self.assertEqual(err, "duplexcat: connection to 127.0.0.1 port %d "
                              "(tcp): protocol error\n" % peer.port)
        peer.result()


class Shutdown(unittest.TestCase):
    """-N (half-close at the end of stdin) is the default; --no-shutdown
    keeps the sending side open as nc does without -N."""

    def test_half_close_peer_keeps_sending_after_our_eof(self):
        def handler(conn):
            got = recv_all(conn)  # our EOF arrives first ...
            for i in range(100):  # ... then the peer still talks
                conn.sendall(b"late %d\n" % i)
            return got
        for flags in ([], ["-N"], ["--shutdown"]):
            with self.subTest(flags=flags):
                peer = Peer(handler)
                rc, out, err = run(flags + [peer.address], b"bye\n")
                self.assertEqual((rc, err), (0, ""))
                self.assertEqual(peer.result(), b"bye\n")
                self.assertEqual(out, b"".join(b"late %d\n" % i
                                               for i in range(100)))

    def test_no_shutdown_leaves_the_sending_side_open(self):
        told = threading.Event()  # duplexcat has handled the end of stdin

        def handler(conn):
            got = b""
            while len(got) < 6:
                d = conn.recv(100)
                if not d:
                    break
                got += d
            if not told.wait(TIMEOUT):
                raise AssertionError("hang guard: no 'end of input' line")
            conn.setblocking(False)
            try:
                eof = conn.recv(100) == b""
            except BlockingIOError:
                eof = False  # nothing and no EOF: still open
            conn.setblocking(True)
            conn.sendall(b"reply\n")
            return got, eof  # the handler's close ends duplexcat
        peer = Peer(handler)
        p = subprocess.Popen([DUPLEXCAT, "-v", "--no-shutdown", peer.address],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        lines = []
        try:
            p.stdin.write(b"hello\n")
            p.stdin.close()
            guard = threading.Timer(TIMEOUT, p.kill)
            guard.start()
            for line in p.stderr:  # until duplexcat saw the end of stdin
                lines.append(line.decode())
                if "end of input" in line.decode():
                    told.set()
                    break
            out = p.stdout.read()
            lines += [l.decode() for l in p.stderr]
            rc = p.wait(TIMEOUT)
            guard.cancel()
        finally:
            stop(p)
            p.stdout.close()
            p.stderr.close()
        self.assertTrue(told.is_set(), "no 'end of input' on stderr: %r"
                        % lines)
        self.assertEqual(peer.result(), (b"hello\n", False))
        self.assertEqual((rc, out), (0, b"reply\n"))
        self.assertIn("duplexcat: end of input: the connection stays open "
                      "until the peer closes (--no-shutdown)\n", lines)


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
                address = wait_for_address(self, p, addr_file,
                                           lambda: t.join(TIMEOUT) or
                                           result.get("err", b""))
                sent, got = connect(address)
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
                address, sent, got

    def tcp_client(self, address):
        with socket.create_connection(client_address(address), TIMEOUT) as s:
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

    def test_listen_host_port_and_port_alone(self):
        for args, pattern in ((["127.0.0.1", "0"], r"^127\.0\.0\.1:\d+$"),
                              (["0"], r"^0\.0\.0\.0:\d+$"),
                              (["localhost", "0"], r"^127\.0\.0\.1:\d+$")):
            with self.subTest(args=args):
                rc, out, err, address, sent, got = self.serve(
                    args, self.tcp_client)
                self.assertRegex(address, pattern)
                self.assertEqual((rc, out, got),
                                 (0, sent, b"to client\n"))

    def test_listen_on_a_service_name(self):
        name, sock = free_service()
        port = sock.getsockname()[1]
        sock.close()
        rc, out, err, address, sent, got = self.serve(["127.0.0.1", name],
                                                      self.tcp_client)
        self.assertEqual(address, "127.0.0.1:%d" % port)
        self.assertEqual((rc, out, got), (0, sent, b"to client\n"))

    def unix_client(self, path):
        def client(address):
            self.assertEqual(address, path)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                s.sendall(b"over unix\n")
                s.shutdown(socket.SHUT_WR)
                return b"over unix\n", recv_all(s)
        return client

    def test_listen_unix(self):
        for form in ("unix:PATH", "-U PATH"):
            with self.subTest(form=form), tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "sock")
                args = ["unix:" + path] if form == "unix:PATH" \
                    else ["-U", path]
                rc, out, err, address, sent, got = self.serve(
                    args, self.unix_client(path))
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
        self.assertEqual(rc, 1)
        self.assertRegex(err, r"^duplexcat: accept on 127\.0\.0\.1 port "
                              r"[1-9][0-9]* \(tcp\): timed out\n$")

    def test_address_in_use_names_the_address(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with s:
            rc, out, err = run(["-l", "127.0.0.1:%d" % port])
        self.assertEqual((rc, err), (1, "duplexcat: listen on 127.0.0.1 port "
                                        "%d (tcp): address already in use\n"
                                        % port))

    def test_error_names_the_client(self):
        def client(address):
            with socket.create_connection(client_address(address),
                                          TIMEOUT) as s:
                got = s.recv(100)  # served: stdin arrived
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                             b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return s.getsockname()[1], got  # closed with RST
        rc, out, err, address, port, got = self.serve(["127.0.0.1:0"], client)
        self.assertEqual((rc, got), (1, b"to client\n"))
        self.assertIn("duplexcat: connection from 127.0.0.1:%d: " % port, err)


def wait_for_address(test, p, addr_file, stderr_of):
    """The address duplexcat -l -p wrote, once complete (a whole line)."""
    address = ""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            with open(addr_file) as f:
                address = f.read()
        except FileNotFoundError:
            pass
        if address.endswith("\n"):
            return address.strip()
        if p.poll() is not None:
            test.fail("duplexcat -l exited %s before writing its address; "
                      "stderr: %r" % (p.returncode, stderr_of()))
        if time.monotonic() > deadline:
            test.fail("hang guard: duplexcat -l wrote no address to %s "
                      "within %d s" % (addr_file, TIMEOUT))
        time.sleep(0.01)


class Server:
    """duplexcat -l -p FILE ARGS running in the background; stdout and
    stderr are collected by threads; stdin is a pipe (write(), eof()) or
    the given file."""

    def __init__(self, test, args, stdin=subprocess.PIPE, prefix=()):
        self.test = test
        self.dir = tempfile.TemporaryDirectory()
        test.addCleanup(self.dir.cleanup)
        addr_file = os.path.join(self.dir.name, "addr")
        self.p = subprocess.Popen(
            list(prefix) + [DUPLEXCAT, "-p", addr_file, "-l"] + args,
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        test.addCleanup(self.cleanup)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._drain, args=(f, buf),
                                         daemon=True)
                        for f, buf in ((self.p.stdout, self.out),
                                       (self.p.stderr, self.err))]
        for t in self.readers:
            t.start()
        self.address = wait_for_address(test, self.p, addr_file,
                                        lambda: bytes(self.err))

    @staticmethod
    def _drain(f, buf):
        for chunk in iter(lambda: f.read1(65536), b""):
            buf += chunk

    def write(self, data):
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def eof(self):
        self.p.stdin.close()

    def wait_stdout(self, expected):
        """Until stdout is exactly expected (hang guard)."""
        deadline = time.monotonic() + TIMEOUT
        while bytes(self.out) != expected:
            if not bytes(expected).startswith(bytes(self.out)):
                self.test.fail("stdout %r is not heading for %r"
                               % (bytes(self.out), expected))
            if time.monotonic() > deadline:
                self.test.fail("hang guard: stdout still %r, not %r, after "
                               "%d s" % (bytes(self.out), expected, TIMEOUT))
            time.sleep(0.01)

    def wait(self):
        """The exit status (negative: the signal that ended it)."""
        try:
            rc = self.p.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.test.fail("hang guard: duplexcat -l still running after %d "
                           "s (killed); stderr: %r" % (TIMEOUT,
                                                       bytes(self.err)))
        for t in self.readers:
            t.join(TIMEOUT)
        return rc

    def cleanup(self):
        stop(self.p)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()


def connect_unix(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    s.connect(path)
    return s


def recv_exactly(s, n):
    got = b""
    while len(got) < n:
        d = s.recv(n - len(got))
        if not d:
            break
        got += d
    return got


class UnixSocketFile(unittest.TestCase):
    """The socket file of -l -U goes at every exit: normal, error, and
    SIGINT / SIGTERM / SIGHUP (then duplexcat dies of the signal)."""

    def sock_path(self):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        return os.path.join(d.name, "listen.sock")

    def assert_socket(self, path):
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))

    def test_signal_while_waiting_removes_the_file(self):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with self.subTest(signal=sig.name):
                path = self.sock_path()
                srv = Server(self, ["-U", path])
                self.assert_socket(path)
                srv.p.send_signal(sig)
                self.assertEqual(srv.wait(), -sig)
                self.assertFalse(os.path.lexists(path))

    def test_sigint_with_keep_after_serving_removes_the_file(self):
        path = self.sock_path()
        srv = Server(self, ["-k", "-U", path])
        with connect_unix(path) as s:
            s.sendall(b"one\n")
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_all(s), b"")  # closed at its EOF (-k)
        srv.wait_stdout(b"one\n")
        self.assert_socket(path)  # still listening for the next
        srv.p.send_signal(signal.SIGINT)
        self.assertEqual(srv.wait(), -signal.SIGINT)
        self.assertFalse(os.path.lexists(path))

    def test_accept_timeout_removes_the_file(self):
        path = self.sock_path()
        srv = Server(self, ["-q", "-w", "0.2", "-U", path])
        self.assertEqual(srv.wait(), 1)
        self.assertFalse(os.path.lexists(path))

    def test_inherited_ignored_sigint_stays_ignored(self):
        # A background job of a shell starts with SIGINT ignored: duplexcat
        # keeps it so. The signal is dropped when sent, so once kill()
        # returned, serving a client shows that duplexcat lives on.
        path = self.sock_path()
        srv = Server(self, ["-U", path],
                     prefix=["sh", "-c", 'trap "" INT; exec "$@"', "sh"])
        srv.p.send_signal(signal.SIGINT)
        with connect_unix(path) as s:
            s.sendall(b"still here\n")
            s.shutdown(socket.SHUT_WR)
            srv.eof()
            self.assertEqual(recv_all(s), b"")
        self.assertEqual(srv.wait(), 0)
        self.assertEqual(bytes(srv.out), b"still here\n")
        self.assertFalse(os.path.lexists(path))


class Keep(unittest.TestCase):
    """-k: clients are served one at a time, each until its EOF."""

    def test_clients_one_after_another(self):
        srv = Server(self, ["-k", "127.0.0.1", "0"])
        for i in range(3):
            with socket.create_connection(client_address(srv.address),
                                          TIMEOUT) as s:
                s.sendall(b"client %d\n" % i)
                s.shutdown(socket.SHUT_WR)
                self.assertEqual(recv_all(s), b"")
        srv.wait_stdout(b"client 0\nclient 1\nclient 2\n")
        srv.p.terminate()
        self.assertEqual(srv.wait(), -signal.SIGTERM)

    def test_second_client_waits_for_the_first(self):
        srv = Server(self, ["-k", "127.0.0.1:0"])
        addr = client_address(srv.address)
        a = socket.create_connection(addr, TIMEOUT)
        b = socket.create_connection(addr, TIMEOUT)
        with a, b:
            srv.write(b"for a\n")  # stdin goes to the client being served
            self.assertEqual(recv_exactly(a, 6), b"for a\n")
            b.sendall(b"from b\n")  # b waits: not read yet
            a.sendall(b"from a\n")
            a.shutdown(socket.SHUT_WR)  # a is done: b's turn
            self.assertEqual(recv_all(a), b"")
            srv.write(b"for b\n")
            self.assertEqual(recv_exactly(b, 6), b"for b\n")
            srv.wait_stdout(b"from a\nfrom b\n")
            srv.eof()  # end of stdin: b's sending side is shut down
            self.assertEqual(recv_all(b), b"")
        srv.p.terminate()
        self.assertEqual(srv.wait(), -signal.SIGTERM)

    def test_after_stdin_ends_each_client_gets_eof_at_once(self):
        with open(os.devnull, "rb") as null:
            srv = Server(self, ["-k", "127.0.0.1:0"], stdin=null)
        for i in range(2):
            with socket.create_connection(client_address(srv.address),
                                          TIMEOUT) as s:
                self.assertEqual(recv_all(s), b"")  # before we send
                s.sendall(b"late %d\n" % i)
                s.shutdown(socket.SHUT_WR)
        srv.wait_stdout(b"late 0\nlate 1\n")
        srv.p.terminate()
        self.assertEqual(srv.wait(), -signal.SIGTERM)


class Family(unittest.TestCase):
    """-4 / -6 restrict names to one address family."""

    def test_ipv4_by_name(self):
        for extra in ([], ["-w", "30"]):  # -w: the lookup has a deadline
            with self.subTest(extra=extra):
                peer = Peer(exchange(b"four\n"))
                rc, out, err = run(["-4"] + extra +
                                   ["localhost", str(peer.port)], b"up\n")
                self.assertEqual((rc, err, out), (0, "", b"four\n"))
                self.assertEqual(peer.result(), b"up\n")

    def test_ipv6_only_never_tries_ipv4(self):
        # Listening on 127.0.0.1 only; [::1] on the same port is bound but
        # not listening (refuses), if this host has ::1 at all.
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        reserve = None
        try:
            reserve = socket.socket(socket.AF_INET6)
            reserve.bind(("::1", port))
        except OSError:
            pass
        try:
            rc, out, err = run(["-6", "localhost", str(port)], b"up\n")
        finally:
            s.close()
            if reserve is not None:
                reserve.close()
        self.assertEqual(rc, 1)
        self.assertTrue(err.startswith("duplexcat: connect to localhost port "
                                       "%d (tcp): " % port), err)

    def test_ipv6_numeric(self):
        peer = v6_peer(exchange(b"six\n"))
        if peer is None:
            self.skipTest("no ::1")
        rc, out, err = run(["-6", "::1", str(peer.port)], b"up\n")
        self.assertEqual((rc, err, out), (0, "", b"six\n"))
        self.assertEqual(peer.result(), b"up\n")

    def test_listen_ipv4_and_ipv6(self):
        for flag, pattern in (("-4", r"^0\.0\.0\.0:\d+$"),
                              ("-6", r"^\[::\]:\d+$")):
            with self.subTest(flag=flag):
                if flag == "-6" and v6_peer(lambda c: None) is None:
                    self.skipTest("no ::1")
                srv = Server(self, [flag, "0"])
                self.assertRegex(srv.address, pattern)
                with socket.create_connection(client_address(srv.address),
                                              TIMEOUT) as s:
                    s.sendall(b"hi\n")
                    s.shutdown(socket.SHUT_WR)
                    srv.eof()
                    self.assertEqual(recv_all(s), b"")
                self.assertEqual(srv.wait(), 0)
                self.assertEqual(bytes(srv.out), b"hi\n")


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


# ---- TLS (--tls) -----------------------------------------------------------

# meson sets DUPLEX_HAVE_TLS=1 when the library speaks TLS, and
# OPENSSL_PROG to the openssl command that makes the certificates and plays
# the peer (s_server, s_client).
HAVE_TLS = os.environ.get("DUPLEX_HAVE_TLS") == "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tls_certs  # noqa: E402


class TlsUsage(unittest.TestCase):
    """The TLS options are checked before anything else happens (status 2),
    whether or not the library has TLS."""

    def usage(self, args, needle):
        rc, out, err = run(args)
        self.assertEqual(rc, 2, err)
        self.assertTrue(err.startswith("duplexcat: "), err)
        self.assertIn(needle, err)
        self.assertIn("usage: duplexcat", err)

    def test_each_tls_option_needs_tls(self):
        for opt in (["--cert", "c.pem"], ["--key", "k.pem"], ["--ca", "ca"],
                    ["--insecure"], ["--tls-host", "example.org"],
                    ["--alpn", "h2"]):
            with self.subTest(option=opt[0]):
                self.usage(opt + ["127.0.0.1", "1"], opt[0] + " needs --tls")

    def test_conflicting_tls_options(self):
        for args, needle in (
                (["-l", "--tls", "0"], "--tls with -l needs --cert"),
                (["--tls", "--cert", "c.pem", "localhost", "1"],
                 "--cert and --key go together"),
                (["--tls", "--insecure", "--ca", "ca", "localhost", "1"],
                 "--insecure and --ca exclude each other"),
                (["-l", "--tls", "--insecure", "--cert", "c", "--key", "k",
                  "0"], "--insecure is for clients"),
                (["-l", "--tls", "--tls-host", "h", "--cert", "c", "--key",
                  "k", "0"], "--tls-host is for clients"),
                (["--tls", "-U", "/tmp/nowhere.sock"],
                 "needs --tls-host NAME"),
                (["--tls", "--alpn", "h2,,x", "localhost", "1"],
                 "bad --alpn list"),
                (["--tls", "--alpn", "x" * 256, "localhost", "1"],
                 "bad --alpn list")):
            with self.subTest(args=args):
                self.usage(args, needle)


def tls_server_handler(context, body):
    """A Peer handler speaking TLS with Python's ssl module: body(tls)."""
    def handler(conn):
        with context.wrap_socket(conn, server_side=True,
                                 suppress_ragged_eofs=False) as tls:
            return body(tls)
    return handler


class OpensslProc:
    """openssl s_server or s_client in the background: output collected by
    a thread (wait_output), stdin a pipe, killed at cleanup."""

    def __init__(self, test, args, cwd):
        self.p = subprocess.Popen([tls_certs.openssl()] + args, cwd=cwd,
                                  stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        test.addCleanup(self.cleanup)
        self.test = test
        self.out = bytearray()
        self.reader = threading.Thread(target=Server._drain,
                                       args=(self.p.stdout, self.out),
                                       daemon=True)
        self.reader.start()

    def wait_output(self, pattern):
        """The first match of the regex pattern in the output (hang guard)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            m = re.search(pattern, bytes(self.out))
            if m:
                return m
            if self.p.poll() is not None and not self.reader.is_alive() \
                    and not re.search(pattern, bytes(self.out)):
                self.test.fail("openssl exited %s without printing %r: %r"
                               % (self.p.returncode, pattern,
                                  bytes(self.out)))
            if time.monotonic() > deadline:
                self.test.fail("hang guard: openssl printed no %r in %d s: "
                               "%r" % (pattern, TIMEOUT, bytes(self.out)))
            time.sleep(0.01)

    def wait(self):
        try:
            rc = self.p.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.test.fail("hang guard: openssl still running after %d s: "
                           "%r" % (TIMEOUT, bytes(self.out)))
        self.reader.join(TIMEOUT)
        return rc

    def cleanup(self):
        stop(self.p)
        self.reader.join(TIMEOUT)
        for f in (self.p.stdin, self.p.stdout):
            f.close()


@unittest.skipUnless(HAVE_TLS and tls_certs.openssl(),
                     "the library has no TLS, or no openssl command")
class Tls(unittest.TestCase):
    """--tls against openssl s_server / s_client, Python's ssl module and
    duplexcat itself, with certificates made by the openssl command."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.certs = tls_certs.make(cls.dir.name)

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def input(self, data):
        """A regular file holding data, closed at cleanup."""
        f = file_with(data)
        self.addCleanup(f.close)
        return f

    def s_server(self, *args, cert="server"):
        """openssl s_server on 127.0.0.1 (one connection); its port."""
        c = self.certs
        srv = OpensslProc(self, ["s_server", "-accept", "127.0.0.1:0",
                                 "-naccept", "1", "-cert", c[cert],
                                 "-key", c[cert + "_key"]] + list(args),
                          self.dir.name)
        return srv, int(srv.wait_output(rb"ACCEPT 127\.0\.0\.1:(\d+)")
                        .group(1))

    def client_args(self, *extra):
        return ["--tls", "--ca", self.certs["ca"]] + list(extra)

    def server_args(self, *extra):
        return ["--tls", "--cert", self.certs["server"], "--key",
                self.certs["server_key"]] + list(extra)

    def test_client_against_openssl_s_server(self):
        # -rev: s_server sends each line back reversed; its close_notify
        # answers ours (sent at the end of stdin), which ends us cleanly.
        srv, port = self.s_server("-rev")
        rc, out, err = run(self.client_args("localhost", str(port)),
                           b"hello over tls\n")
        self.assertEqual((rc, err, out), (0, "", b"slt revo olleh\n"))
        srv.wait()

    def test_client_verbose_reports_the_handshake(self):
        srv, port = self.s_server("-rev")
        rc, out, err = run(["-v"] + self.client_args("localhost", str(port)),
                           b"abc\n")
        self.assertEqual((rc, out), (0, b"cba\n"), err)
        self.assertRegex(err, r"(?m)^duplexcat: TLS: \S")  # the library
        self.assertRegex(err, r"(?m)^duplexcat: TLS: TLSv1\.[23], \S+, "
                              r"peer CN=localhost$")

    def test_server_against_openssl_s_client(self):
        srv = Server(self, self.server_args("127.0.0.1:0"))
        port = srv.address.rsplit(":", 1)[1]
        cli = OpensslProc(self, ["s_client", "-connect", srv.address,
                                 "-CAfile", self.certs["ca"],
                                 "-servername", "localhost",
                                 "-verify_hostname", "localhost",
                                 "-verify_return_error", "-quiet"],
                          self.dir.name)
        cli.p.stdin.write(b"to server\n")
        cli.p.stdin.close()  # -quiet: s_client reads on after its stdin
        srv.wait_stdout(b"to server\n")
        srv.write(b"to client\n")
        srv.eof()  # our close_notify ends s_client, whose own ends us
        cli.wait_output(rb"to client\n")
        self.assertEqual(cli.wait(), 0)
        self.assertEqual(srv.wait(), 0, bytes(srv.err))
        self.assertNotIn(b"duplexcat:", bytes(srv.err))
        self.assertTrue(port.isdigit())

    def test_duplexcat_to_duplexcat_1mb_each_way(self):
        up, down = os.urandom(MB), os.urandom(MB)
        srv = Server(self, ["-v"] + self.server_args("127.0.0.1:0"),
                     stdin=self.input(down))
        rc, out, err = run(["-v"] + self.client_args(
            "--tls-host", "localhost", srv.address), up)
        self.assertEqual(rc, 0, err)
        self.assertEqual(sha(out), sha(down))
        self.assertEqual(srv.wait(), 0, bytes(srv.err))
        self.assertEqual(sha(bytes(srv.out)), sha(up))
        self.assertIn("SNI localhost", bytes(srv.err).decode())

    def test_lines_mode_over_tls(self):
        srv = Server(self, ["-L"] + self.server_args("127.0.0.1:0"),
                     stdin=self.input(b"three\n"))
        rc, out, err = run(["-L"] + self.client_args(
            "--tls-host", "localhost", srv.address), b"one\ntwo")
        self.assertEqual((rc, err, out), (0, "", b"three\n"))
        self.assertEqual(srv.wait(), 0, bytes(srv.err))
        self.assertEqual(bytes(srv.out), b"one\ntwo\n")

    def test_mutual_tls_and_alpn(self):
        c = self.certs
        srv = Server(self, ["-v"] + self.server_args(
            "--ca", c["ca"], "--alpn", "x-duplex,http/1.1", "127.0.0.1:0"),
            stdin=self.input(b"hi client\n"))
        rc, out, err = run(["-v"] + self.client_args(
            "--cert", c["client"], "--key", c["client_key"],
            "--alpn", "http/1.1,x-duplex", "--tls-host", "localhost",
            srv.address), b"hi server\n")
        self.assertEqual((rc, out), (0, b"hi client\n"), err)
        self.assertIn(", ALPN x-duplex, peer CN=localhost", err)
        self.assertEqual(srv.wait(), 0, bytes(srv.err))
        self.assertEqual(bytes(srv.out), b"hi server\n")
        self.assertIn(", ALPN x-duplex, peer CN=client", bytes(srv.err).decode())

    def test_mutual_tls_refuses_a_client_without_a_certificate(self):
        srv = Server(self, self.server_args("--ca", self.certs["ca"],
                                            "127.0.0.1:0"),
                     stdin=self.input(b"never\n"))
        rc, out, err = run(self.client_args("--tls-host", "localhost",
                                            srv.address), b"hello\n")
        self.assertEqual((rc, out), (1, b""), err)
        self.assertEqual(srv.wait(), 1)
        self.assertEqual(bytes(srv.out), b"")
        self.assertIn("TLS peer certificate verification failed",
                      bytes(srv.err).decode())

    def test_verification_failure_exits_1_and_says_why(self):
        for cert, extra, words in (
                ("untrusted", [], "unable to get local issuer certificate"),
                ("server", ["--tls-host", "wrong.example"], "")):
            with self.subTest(cert=cert, extra=extra):
                srv, port = self.s_server("-rev", cert=cert)
                rc, out, err = run(self.client_args(
                    *extra, "localhost", str(port)), b"x\n")
                self.assertEqual((rc, out), (1, b""))
                self.assertTrue(err.startswith(
                    "duplexcat: connect to localhost port %d (tcp): TLS peer "
                    "certificate verification failed: certificate verify "
                    "failed" % port), err)
                self.assertIn(words, err)
                srv.wait()

    def test_insecure_accepts_any_certificate(self):
        srv, port = self.s_server("-rev", cert="untrusted")
        rc, out, err = run(["--tls", "--insecure", "127.0.0.1", str(port)],
                           b"abc\n")
        self.assertEqual((rc, err, out), (0, "", b"cba\n"))
        srv.wait()

    def test_half_close_sends_close_notify_and_reads_on(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.certs["server"], self.certs["server_key"])

        def body(tls):
            got = b""
            while True:  # a ragged EOF would raise SSLEOFError here
                d = tls.recv(65536)
                if not d:
                    break  # close_notify
                got += d
            tls.sendall(b"after your close_notify\n")
            tls.unwrap()  # ours; the conn then ends
            return got
        peer = Peer(tls_server_handler(ctx, body))
        rc, out, err = run(self.client_args("--tls-host", "localhost",
                                            peer.address), b"bye\n")
        self.assertEqual((rc, err, out), (0, "", b"after your close_notify\n"))
        self.assertEqual(peer.result(), b"bye\n")

    def test_truncated_stream_is_an_error(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.certs["server"], self.certs["server_key"])

        def body(tls):
            tls.sendall(b"partial\n")
            tls.shutdown(socket.SHUT_RDWR)  # the socket's, no close_notify
        peer = Peer(tls_server_handler(ctx, body))
        rc, out, err = run(["--no-shutdown"] + self.client_args(
            "--tls-host", "localhost", peer.address))
        peer.result()
        self.assertEqual((rc, out), (1, b"partial\n"))
        self.assertTrue(err.startswith(
            "duplexcat: connection to 127.0.0.1 port %d (tcp): TLS stream "
            "truncated" % peer.port), err)

    def test_a_certificate_that_does_not_load_exits_1(self):
        missing = os.path.join(self.dir.name, "missing.pem")
        rc, out, err = run(["--tls", "--cert", missing, "--key",
                            self.certs["server_key"], "127.0.0.1", "1"])
        self.assertEqual(rc, 1)
        self.assertTrue(err.startswith(
            "duplexcat: TLS configuration: TLS certificate, key or CA could "
            "not be loaded: "), err)
        self.assertIn("missing.pem", err)
        rc, out, err = run(["-l"] + ["--tls", "--cert", self.certs["server"],
                                     "--key", self.certs["client_key"], "0"])
        self.assertEqual(rc, 1)
        self.assertIn("TLS configuration: ", err)

    def test_keep_open_holds_a_waiting_tls_client_unread(self):
        srv = Server(self, ["-k"] + self.server_args("127.0.0.1", "0"))
        args = [DUPLEXCAT] + self.client_args("--tls-host", "localhost",
                                              srv.address)
        first = subprocess.Popen(args, stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        self.addCleanup(stop, first)
        self.addCleanup(first.stderr.close)
        first.stdin.write(b"a1\n")
        first.stdin.flush()
        srv.wait_stdout(b"a1\n")
        second = {}
        t = threading.Thread(target=lambda: second.update(
            r=run(args[1:], b"b\n")), daemon=True)
        t.start()  # handshakes, then waits for its turn, unread
        time.sleep(0.2)  # (only to give it the chance to be misread)
        first.stdin.write(b"a2\n")
        first.stdin.close()
        self.assertEqual(first.wait(TIMEOUT), 0)
        srv.wait_stdout(b"a1\na2\nb\n")
        t.join(TIMEOUT)
        self.assertEqual(second.get("r", (None,))[0], 0)
        srv.p.send_signal(signal.SIGTERM)
        self.assertEqual(srv.wait(), -signal.SIGTERM)

    def test_keep_open_reports_a_failed_handshake_and_serves_the_next(self):
        srv = Server(self, ["-k"] + self.server_args("127.0.0.1", "0"))
        bad = ["--tls", "--ca", self.certs["otherca"], "--tls-host",
               "localhost", srv.address]
        rc, out, err = run(bad, b"refused\n")
        self.assertEqual(rc, 1)
        self.assertIn("verification failed", err)
        rc, out, err = run(self.client_args("--tls-host", "localhost",
                                            srv.address), b"served\n")
        self.assertEqual((rc, err), (0, ""))
        srv.wait_stdout(b"served\n")
        srv.p.send_signal(signal.SIGTERM)
        self.assertEqual(srv.wait(), -signal.SIGTERM)
        self.assertRegex(bytes(srv.err).decode(),
                         r"^duplexcat: connection (from|on) .*: TLS ")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: duplexcat_test.py PATH-TO-DUPLEXCAT [unittest args]")
    DUPLEXCAT = os.path.abspath(sys.argv.pop(1))
    # The signal tests need duplexcat to start with the default actions:
    # an ignored signal is inherited across exec (and duplexcat keeps it).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    unittest.main(verbosity=2)
