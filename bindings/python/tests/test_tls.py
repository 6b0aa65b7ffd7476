"""TLS: duplex.TLSConfig, tls= on conns and listeners, Conn.start_tls(),
Conn.tls_info(), the TLS errors, and duplex.aio's ssl=. The peers are
Python's own ssl module (server and client) and duplex itself; the
certificates are made with the openssl command for this run."""
import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import unittest

import duplex
import duplex.aio
from duplex import errors

from helpers import GUARD, handle_count, wait

CERTS = None  # the directory of this run's certificates (setUpModule)

_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[v3_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args):
    subprocess.run(["openssl", *args], cwd=CERTS, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=GUARD)


def _make_ca(name, cn):
    _openssl("req", "-x509", "-config", "openssl.cnf", "-extensions",
             "v3_ca", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.pem", "-days", "3650", "-subj",
             f"/CN={cn}")


def _make_leaf(name, cn, ca, ext, serial):
    _openssl("req", "-new", "-config", "openssl.cnf", "-newkey", "ec",
             "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
             f"/CN={cn}")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
             "-CAkey", f"{ca}.key", "-set_serial", str(serial), "-out",
             f"{name}.pem", "-days", "3650", "-extfile", "openssl.cnf",
             "-extensions", ext)


def setUpModule():
    global CERTS
    if duplex.tls_backend() is None:
        raise unittest.SkipTest("libduplex was built without TLS")
    if shutil.which("openssl") is None:
        raise unittest.SkipTest("no openssl command to make certificates")
    CERTS = tempfile.mkdtemp(prefix="duplex-tls-test-")
    with open(os.path.join(CERTS, "openssl.cnf"), "w") as f:
        f.write(_CNF)
    _make_ca("ca", "duplex test CA")
    _make_ca("other-ca", "another CA")
    _make_leaf("server", "localhost", "ca", "v3_server", 2)
    _make_leaf("client", "duplex client", "ca", "v3_client", 3)


def tearDownModule():
    if CERTS:
        shutil.rmtree(CERTS, ignore_errors=True)


def cert(name):
    return os.path.join(CERTS, name)


def server_config(**kw):
    return duplex.TLSConfig("server", cert_file=cert("server.pem"),
                            key_file=cert("server.key"), **kw)


def client_config(**kw):
    kw.setdefault("ca_file", cert("ca.pem"))
    return duplex.TLSConfig("client", **kw)


def python_server_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert("server.pem"), cert("server.key"))
    return ctx


def python_client_context():
    return ssl.create_default_context(cafile=cert("ca.pem"))


class PythonTLSServer(threading.Thread):
    """A server on Python's ssl module, one connection, on its own thread:
    ``handler(ssl_socket)`` serves it. With ``starttls`` it first reads a
    plaintext "STARTTLS\\n" line, answers "GO\\n" and only then wraps the
    socket."""

    def __init__(self, handler, starttls=False, context=None):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handler = handler
        self.starttls = starttls
        self.context = context or python_server_context()
        self.error = None
        self.start()

    def run(self):
        try:
            self.listener.settimeout(GUARD)
            raw, _ = self.listener.accept()
            raw.settimeout(GUARD)
            if self.starttls:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = raw.recv(1)
                    if not chunk:
                        raise AssertionError("EOF before STARTTLS")
                    line += chunk
                if line != b"STARTTLS\n":
                    raise AssertionError(f"got {line!r}")
                raw.sendall(b"GO\n")
            with self.context.wrap_socket(raw, server_side=True) as s:
                self.handler(s)
        except BaseException as e:  # noqa: B036 - reported by result()
            self.error = e
        finally:
            self.listener.close()

    def result(self):
        self.join(GUARD)
        if self.is_alive():
            raise AssertionError("hang guard: the Python TLS server hung")
        if self.error is not None:
            raise self.error


def echo_until_close_notify(s):
    """Echo until the peer's close_notify (recv() gives b""), then send
    ours (unwrap) and close."""
    while True:
        data = s.recv(65536)
        if not data:
            break
        s.sendall(data)
    s.unwrap().close()


class Collector:
    """on_read / on_eof / on_close of a duplex conn, collected."""

    def __init__(self):
        self.data = bytearray()
        self.lock = threading.Lock()
        self.eof = False
        self.opened = threading.Event()
        self.got = threading.Condition(self.lock)

    def kw(self):
        return dict(on_open=lambda c: self.opened.set(),
                    on_read=self.on_read, on_eof=self.on_eof)

    def on_read(self, conn, data):
        with self.lock:
            self.data += data
            self.got.notify_all()

    def on_eof(self, conn):
        self.eof = True

    def wait_for(self, n):
        with self.lock:
            if not self.got.wait_for(lambda: len(self.data) >= n, GUARD):
                raise AssertionError(f"hang guard: {len(self.data)} of {n} "
                                     "bytes")
            return bytes(self.data)


PAYLOAD = b"".join(b"line %d of the TLS echo\n" % i for i in range(2000))


class TLSConfigTest(unittest.TestCase):
    def test_backend_and_roles(self):
        self.assertIn("OpenSSL", duplex.tls_backend())
        with server_config(alpn=["h2", "http/1.1"]) as cfg:
            self.assertEqual(cfg.role, "server")
            self.assertTrue(cfg.server_side)
            self.assertEqual(cfg.alpn, ("h2", "http/1.1"))
            self.assertIn("server", repr(cfg))
        self.assertTrue(cfg.closed)
        cfg.close()  # idempotent
        client = client_config(verify="default", min_version="TLSv1.3",
                               session_cache=False, handshake_timeout=5)
        self.assertEqual(client.role, "client")
        client.close()

    def test_pem_in_memory(self):
        with open(cert("server.pem"), "rb") as f:
            chain = f.read()
        with open(cert("server.key")) as f:
            key = f.read()  # str works as well as bytes
        with open(cert("ca.pem"), "rb") as f:
            ca = f.read()
        duplex.TLSConfig("server", cert_pem=chain, key_pem=key).close()
        duplex.TLSConfig("client", ca_pem=ca, min_version=ssl.TLSVersion.
                         TLSv1_2).close()

    def test_errors(self):
        with self.assertRaises(errors.TLSConfigError) as cm:
            duplex.TLSConfig("server", cert_file=cert("missing.pem"),
                             key_file=cert("server.key"))
        e = cm.exception
        self.assertIsInstance(e, ssl.SSLError)
        self.assertEqual(e.name, "DUPLEX_ETLSCONFIG")
        self.assertTrue(e.detail, "the TLS library's reason is kept")
        self.assertIn(e.detail, str(e))
        with self.assertRaises(errors.TLSConfigError):  # key of another cert
            duplex.TLSConfig("server", cert_file=cert("server.pem"),
                             key_file=cert("client.key"))
        with self.assertRaises(duplex.DuplexError) as cm:
            duplex.TLSConfig("server")  # no certificate
        self.assertEqual(cm.exception.code, errors.EINVAL)
        with self.assertRaises(duplex.DuplexError) as cm:
            duplex.TLSConfig("client", verify="require")
        self.assertEqual(cm.exception.code, errors.EINVAL)
        with self.assertRaises(ValueError):
            duplex.TLSConfig("peer")
        with self.assertRaises(ValueError):
            duplex.TLSConfig("client", verify="sometimes")
        with self.assertRaises(ValueError):
            duplex.TLSConfig("client", min_version="SSLv3")
        with self.assertRaises(TypeError):
            duplex.TLSConfig("client", alpn="h2")  # a list, not a str

    def test_wrong_objects_and_roles(self):
        with duplex.Loop() as loop:
            with self.assertRaises(TypeError) as cm:
                duplex.connect_tcp(loop, "127.0.0.1", 1,
                                   tls=ssl.create_default_context())
            self.assertIn("TLSConfig", str(cm.exception))
            srv = server_config()
            with self.assertRaises(duplex.DuplexError):  # server role
                duplex.connect_tcp(loop, "127.0.0.1", 1, tls=srv)
            cli = client_config()
            with self.assertRaises(duplex.DuplexError):  # client role
                duplex.listen_tcp(loop, "127.0.0.1", 0, tls=cli)
            with self.assertRaises(ValueError):
                duplex.connect_tcp(loop, "127.0.0.1", 1,
                                   server_hostname="localhost")
            with self.assertRaises(duplex.DuplexError) as cm:
                # a verifying client needs a name on a UNIX socket
                duplex.connect_unix(loop, "/nonexistent", tls=cli)
            self.assertEqual(cm.exception.code, errors.EINVAL)
            cli.close()
            with self.assertRaises(duplex.DuplexError) as cm:
                duplex.connect_tcp(loop, "127.0.0.1", 1, tls=cli)
            self.assertEqual(cm.exception.code, errors.ECLOSED)
            srv.close()


class TLSConnTest(unittest.TestCase):
    def setUp(self):
        self.handles = handle_count()
        self.loop = duplex.Loop()

    def tearDown(self):
        self.loop.close()
        self.assertEqual(handle_count(), self.handles)

    def test_echo_against_python_ssl_server(self):
        server = PythonTLSServer(echo_until_close_notify)
        got = Collector()
        with client_config() as cfg:
            conn = duplex.connect_tcp(self.loop, "localhost", server.port,
                                      tls=cfg, **got.kw())
        conn.sendall(PAYLOAD)  # queued before the handshake: sent after
        self.assertEqual(got.wait_for(len(PAYLOAD)), PAYLOAD)
        conn.shutdown()  # close_notify, then the peer's ends it
        self.assertIsNone(conn.wait_closed(GUARD))
        self.assertTrue(got.eof)
        server.result()
        info = conn.tls_info()  # kept: it answers after the close too
        self.assertIsInstance(info, duplex.TLSInfo)
        self.assertIn(info.version, ("TLSv1.2", "TLSv1.3"))
        self.assertIn(info.version_number, (0x0303, 0x0304))
        self.assertTrue(info.cipher)
        self.assertTrue(info.peer_cert)
        self.assertIn("CN=localhost", info.peer_subject)
        self.assertIsNone(info.alpn_protocol)
        self.assertIsNone(conn.tls_error)

    def test_echo_python_ssl_client_against_duplex_server(self):
        seen = {}

        def accept(conn):
            seen["info"] = conn.tls_info()
            conn.on_read = lambda c, data: c.write(data)
            conn.on_eof = lambda c: c.shutdown()
            conn.on_close = lambda c, err: seen.setdefault("close", err)
            seen["conn"] = conn

        with server_config(alpn=["http/1.1"]) as cfg:
            listener = duplex.listen_tcp(self.loop, "127.0.0.1", 0,
                                         on_accept=accept, tls=cfg)
        ctx = python_client_context()
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", listener.port),
                                      timeout=GUARD) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                self.assertEqual(s.selected_alpn_protocol(), "http/1.1")
                s.sendall(PAYLOAD)
                back = bytearray()
                while len(back) < len(PAYLOAD):
                    chunk = s.recv(65536)
                    self.assertTrue(chunk, "EOF before the echo")
                    back += chunk
                self.assertEqual(bytes(back), PAYLOAD)
                s.unwrap()  # our close_notify, then the server's
        self.assertIsNone(seen["conn"].wait_closed(GUARD))
        self.assertIsNone(seen["close"])
        info = seen["info"]
        self.assertEqual(info.server_name, "localhost")
        self.assertEqual(info.alpn_protocol, "http/1.1")
        self.assertFalse(info.peer_cert)
        self.assertIsNone(info.peer_subject)
        listener.close()

    def test_duplex_to_duplex_mutual_tls(self):
        seen = {}
        opened = threading.Event()

        def accept(conn):
            seen["info"] = conn.tls_info()
            conn.on_read = lambda c, data: c.write(data)
            conn.on_eof = lambda c: c.shutdown()
            opened.set()

        srv = server_config(verify="require", ca_file=cert("ca.pem"),
                            alpn=["x-duplex"])
        listener = duplex.listen_tcp(self.loop, "127.0.0.1", 0,
                                     on_accept=accept, tls=srv)
        cli = client_config(cert_file=cert("client.pem"),
                            key_file=cert("client.key"), alpn=["x-duplex"])
        got = Collector()
        conn = duplex.connect_tcp(self.loop, "127.0.0.1", listener.port,
                                  tls=cli, server_hostname="localhost",
                                  **got.kw())
        wait(got.opened, "on_open after the handshake")
        wait(opened, "on_accept after the handshake")
        conn.write(b"hello over mutual TLS")
        conn.shutdown()
        self.assertIsNone(conn.wait_closed(GUARD))
        self.assertEqual(bytes(got.data), b"hello over mutual TLS")
        self.assertIn("CN=duplex client", seen["info"].peer_subject)
        self.assertTrue(seen["info"].peer_cert)
        self.assertEqual(conn.tls_info().alpn_protocol, "x-duplex")
        # A client without a certificate is refused by this server.
        with client_config() as bare:
            refused = duplex.connect_tcp(self.loop, "127.0.0.1",
                                         listener.port, tls=bare,
                                         server_hostname="localhost")
            err = refused.wait_closed(GUARD)
        self.assertIsInstance(err, errors.TLSError)
        self.assertIsInstance(err, ssl.SSLError)
        self.assertTrue(err.detail)
        listener.close()
        srv.close()
        cli.close()

    def test_verification_failure(self):
        listener = duplex.listen_tcp(self.loop, "127.0.0.1", 0,
                                     tls=server_config())
        cases = [  # (client config, server_hostname)
            (client_config(ca_file=cert("other-ca.pem")), "localhost"),
            (client_config(), "wrong.example"),
        ]
        for cfg, name in cases:
            with self.subTest(name=name), cfg:
                opened = threading.Event()
                closed = []
                closed_cb = threading.Event()

                def on_close(c, e):
                    closed.append(e)
                    closed_cb.set()

                conn = duplex.connect_tcp(
                    self.loop, "127.0.0.1", listener.port, tls=cfg,
                    server_hostname=name, on_open=lambda c: opened.set(),
                    on_close=on_close)
                err = conn.wait_closed(GUARD)
                wait(closed_cb, "on_close")
                self.assertFalse(opened.is_set(), "on_open never runs")
                self.assertIsInstance(err, errors.TLSVerifyError)
                self.assertIsInstance(err, ssl.SSLCertVerificationError)
                self.assertEqual(err.code, errors.ETLSVERIFY)
                self.assertTrue(err.verify_message)
                self.assertEqual(err.verify_message, conn.tls_error)
                self.assertIn(err.detail, str(err))
                self.assertEqual(len(closed), 1)
                self.assertIsInstance(closed[0], errors.TLSVerifyError)
                self.assertEqual(closed[0].detail, err.detail)
        # verify="none" accepts the same server.
        with client_config(ca_file=cert("other-ca.pem"),
                           verify="none") as cfg:
            got = Collector()
            conn = duplex.connect_tcp(self.loop, "127.0.0.1", listener.port,
                                      tls=cfg, **got.kw())
            wait(got.opened, "on_open")
            conn.close()
            self.assertIsNone(conn.wait_closed(GUARD))
        listener.close()

    def test_python_client_refuses_unknown_duplex_server(self):
        listener = duplex.listen_tcp(self.loop, "127.0.0.1", 0,
                                     tls=server_config())
        ctx = ssl.create_default_context(cafile=cert("other-ca.pem"))
        with socket.create_connection(("127.0.0.1", listener.port),
                                      timeout=GUARD) as raw:
            with self.assertRaises(ssl.SSLCertVerificationError):
                ctx.wrap_socket(raw, server_hostname="localhost")
        listener.close()

    def test_truncation_is_not_eof(self):
        def cut(s):
            s.sendall(b"partial")
            # Closing the socket without unwrap(): no close_notify.
        server = PythonTLSServer(cut)
        got = Collector()
        with client_config() as cfg:
            conn = duplex.connect_tcp(self.loop, "localhost", server.port,
                                      tls=cfg, **got.kw())
        err = conn.wait_closed(GUARD)
        server.result()
        self.assertEqual(bytes(got.data), b"partial")
        self.assertFalse(got.eof, "a truncated stream is no EOF")
        self.assertIsInstance(err, errors.TLSTruncatedError)
        self.assertIsInstance(err, ssl.SSLEOFError)
        self.assertEqual(err.code, errors.ETLSTRUNC)

    def test_clean_close_notify_is_eof(self):
        def say_and_close(s):
            s.sendall(b"all of it")
            s.unwrap().close()  # close_notify first
        server = PythonTLSServer(say_and_close)
        got = Collector()
        with client_config() as cfg:
            conn = duplex.connect_tcp(self.loop, "localhost", server.port,
                                      tls=cfg, **got.kw())
        got.wait_for(9)
        conn.shutdown()  # the server's unwrap() waits for our close_notify
        self.assertIsNone(conn.wait_closed(GUARD))
        server.result()
        self.assertTrue(got.eof)
        self.assertEqual(bytes(got.data), b"all of it")

    def test_start_tls_against_python_server(self):
        server = PythonTLSServer(echo_until_close_notify, starttls=True)
        got = Collector()
        conn = duplex.connect_tcp(self.loop, "localhost", server.port,
                                  **got.kw())
        self.assertIsNone(conn.tls_info())  # plaintext so far
        conn.write(b"STARTTLS\n")
        self.assertEqual(got.wait_for(3), b"GO\n")
        with client_config() as cfg:
            future = conn.start_tls(cfg)
        conn.write(b"secret")  # encrypted, after the handshake
        self.assertIsNone(future.result(GUARD))
        self.assertEqual(got.wait_for(9), b"GO\nsecret")
        info = conn.tls_info()
        self.assertIn("CN=localhost", info.peer_subject)
        with self.assertRaises(duplex.DuplexError) as cm:
            conn.start_tls(client_config())
        self.assertEqual(cm.exception.code, errors.EBUSY)
        conn.shutdown()
        self.assertIsNone(conn.wait_closed(GUARD))
        server.result()

    def test_start_tls_between_duplex_conns(self):
        # Both ends upgrade: the server side after writing its "GO".
        srv_cfg = server_config()
        done = {}
        accepted = threading.Event()

        def accept(conn):
            def on_read(c, data):
                if data == b"STARTTLS\n" and "srv" not in done:
                    c.write(b"GO\n")
                    done["srv"] = c.start_tls(srv_cfg)
                    c.on_read = lambda c2, d: c2.write(d.upper())
            conn.on_read = on_read
            conn.on_eof = lambda c: c.shutdown()
            accepted.set()

        listener = duplex.listen_tcp(self.loop, "127.0.0.1", 0,
                                     on_accept=accept)
        got = Collector()
        conn = duplex.connect_tcp(self.loop, "127.0.0.1", listener.port,
                                  **got.kw())
        conn.write(b"STARTTLS\n")
        got.wait_for(3)
        results = []
        with client_config() as cfg:
            future = conn.start_tls(cfg, server_hostname="localhost",
                                    done=results.append)
        self.assertIsNone(future.result(GUARD))
        self.assertEqual(results, [None])
        self.assertIsNone(done["srv"].result(GUARD))
        conn.write(b"quiet")
        self.assertEqual(got.wait_for(8), b"GO\nQUIET")
        conn.shutdown()
        self.assertIsNone(conn.wait_closed(GUARD))
        listener.close()
        srv_cfg.close()

    def test_start_tls_verification_failure(self):
        server = PythonTLSServer(lambda s: None, starttls=True)
        got = Collector()
        conn = duplex.connect_tcp(self.loop, "localhost", server.port,
                                  **got.kw())
        conn.write(b"STARTTLS\n")
        got.wait_for(3)
        with client_config(ca_file=cert("other-ca.pem")) as cfg:
            future = conn.start_tls(cfg)
        with self.assertRaises(errors.TLSVerifyError) as cm:
            future.result(GUARD)
        self.assertTrue(cm.exception.verify_message)
        self.assertIsInstance(conn.wait_closed(GUARD), errors.TLSVerifyError)
        try:
            server.result()
        except (ssl.SSLError, OSError):
            pass  # the Python side sees our alert


class GroupTLSTest(unittest.TestCase):
    def test_group_listener_serves_tls_on_every_loop(self):
        handles = handle_count()
        loops_seen = set()
        lock = threading.Lock()

        def accept(conn):
            with lock:
                loops_seen.add(conn.loop)
            conn.on_read = lambda c, data: c.write(data)
            conn.on_eof = lambda c: c.shutdown()

        with duplex.LoopGroup(2) as group, server_config() as cfg:
            listener = group.listen_tcp("127.0.0.1", 0, on_accept=accept,
                                        tls=cfg)
            ctx = python_client_context()
            for i in range(4):
                with socket.create_connection(
                        ("127.0.0.1", listener.port), timeout=GUARD) as raw, \
                        ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(b"conn %d" % i)
                    self.assertEqual(s.recv(100), b"conn %d" % i)
                    s.unwrap()
            listener.close()
        self.assertEqual(loops_seen, set(group.loops))
        self.assertEqual(handle_count(), handles)


class AioTLSTest(unittest.TestCase):
    def setUp(self):
        self.handles = handle_count()
        self.loop = duplex.Loop()

    def tearDown(self):
        self.loop.close()
        self.assertEqual(handle_count(), self.handles)

    def test_echo(self):
        srv, cli = server_config(), client_config()

        async def handle(reader, writer):
            info = writer.get_extra_info("duplex_tls_info")
            writer.write(info.server_name.encode() + b"\n")
            while True:
                line = await reader.readline()
                if not line:
                    break
                writer.write(line)
                await writer.drain()
            writer.close()

        async def main():
            server = await duplex.aio.start_server(
                handle, "127.0.0.1", 0, ssl=srv, duplex_loop=self.loop)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await duplex.aio.open_connection(
                "127.0.0.1", port, ssl=cli, server_hostname="localhost",
                duplex_loop=self.loop)
            self.assertEqual(await reader.readline(), b"localhost\n")
            info = writer.get_extra_info("duplex_tls_info")
            self.assertIn("CN=localhost", info.peer_subject)
            self.assertIs(writer.get_extra_info("duplex_tls_config"), cli)
            self.assertIsNone(writer.get_extra_info("sslcontext"))
            self.assertEqual(writer.get_extra_info("cipher")[0], info.cipher)
            writer.write(PAYLOAD)
            await writer.drain()
            writer.write_eof()
            self.assertEqual(await reader.read(), PAYLOAD)
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()

        asyncio.run(asyncio.wait_for(main(), GUARD))
        srv.close()
        cli.close()

    def test_against_asyncio_ssl(self):
        # duplex.aio client -> asyncio's own TLS server, and asyncio's TLS
        # client -> duplex.aio server. (asyncio's TLS transports cannot
        # half-close, so a line each way, then the server closes.)
        async def echo_line(reader, writer):
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        async def main():
            py_server = await asyncio.start_server(
                echo_line, "127.0.0.1", 0, ssl=python_server_context())
            port = py_server.sockets[0].getsockname()[1]
            with client_config() as cfg:
                r, w = await duplex.aio.open_connection(
                    "localhost", port, ssl=cfg, duplex_loop=self.loop)
            w.write(b"to asyncio\n")
            self.assertEqual(await r.readline(), b"to asyncio\n")
            self.assertEqual(await r.read(), b"")  # its close_notify
            w.close()
            await w.wait_closed()
            py_server.close()
            await py_server.wait_closed()

            with server_config() as cfg:
                dx_server = await duplex.aio.start_server(
                    echo_line, "127.0.0.1", 0, ssl=cfg,
                    duplex_loop=self.loop)
            port = dx_server.sockets[0].getsockname()[1]
            r, w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=python_client_context(),
                server_hostname="localhost")
            self.assertIsNotNone(w.get_extra_info("ssl_object"))
            w.write(b"to duplex.aio\n")
            self.assertEqual(await r.readline(), b"to duplex.aio\n")
            self.assertEqual(await r.read(), b"")  # our close_notify
            w.close()
            await w.wait_closed()
            dx_server.close()
            await dx_server.wait_closed()

        asyncio.run(asyncio.wait_for(main(), GUARD))

    def test_verification_failure(self):
        async def main():
            with server_config() as cfg:
                server = await duplex.aio.start_server(
                    lambda r, w: w.close(), "127.0.0.1", 0, ssl=cfg,
                    duplex_loop=self.loop)
            port = server.sockets[0].getsockname()[1]
            with client_config(ca_file=cert("other-ca.pem")) as cfg:
                with self.assertRaises(ssl.SSLCertVerificationError) as cm:
                    await duplex.aio.open_connection(
                        "127.0.0.1", port, ssl=cfg,
                        server_hostname="localhost", duplex_loop=self.loop)
            self.assertIsInstance(cm.exception, errors.TLSVerifyError)
            self.assertTrue(cm.exception.verify_message)
            with self.assertRaises(TypeError):
                await duplex.aio.open_connection(
                    "127.0.0.1", port, ssl=ssl.create_default_context())
            with self.assertRaises(NotImplementedError):
                await duplex.aio.open_connection(
                    "127.0.0.1", port, ssl=True, ssl_handshake_timeout=1)
            server.close()
            await server.wait_closed()

        asyncio.run(asyncio.wait_for(main(), GUARD))

    def test_truncation_raises(self):
        def cut(s):
            s.sendall(b"partial")
        server = PythonTLSServer(cut)

        async def main():
            with client_config() as cfg:
                r, w = await duplex.aio.open_connection(
                    "localhost", server.port, ssl=cfg,
                    duplex_loop=self.loop)
            self.assertEqual(await r.readexactly(7), b"partial")
            with self.assertRaises(ssl.SSLEOFError):
                await r.read()
            w.close()

        asyncio.run(asyncio.wait_for(main(), GUARD))
        server.result()

    def test_start_tls(self):
        srv, cli = server_config(), client_config()

        async def handle(reader, writer):
            self.assertEqual(await reader.readline(), b"STARTTLS\n")
            writer.write(b"GO\n")
            await writer.drain()
            await duplex.aio.start_tls(writer, srv)
            line = await reader.readline()
            writer.write(line.upper())
            writer.write_eof()

        async def main():
            server = await duplex.aio.start_server(
                handle, "127.0.0.1", 0, duplex_loop=self.loop)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await duplex.aio.open_connection(
                "127.0.0.1", port, duplex_loop=self.loop)
            self.assertIsNone(writer.get_extra_info("duplex_tls_info"))
            writer.write(b"STARTTLS\n")
            self.assertEqual(await reader.readline(), b"GO\n")
            await duplex.aio.start_tls(writer, cli,
                                       server_hostname="localhost")
            info = writer.get_extra_info("duplex_tls_info")
            self.assertIn("CN=localhost", info.peer_subject)
            writer.write(b"whisper\n")
            self.assertEqual(await reader.read(), b"WHISPER\n")
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()

        asyncio.run(asyncio.wait_for(main(), GUARD))
        srv.close()
        cli.close()


if __name__ == "__main__":
    unittest.main()
