#!/usr/bin/env python3
"""End to end: examples/tls_fetch and examples/tls_echo_server.

Usage: tls_examples_test.py PATH-TO-TLS_ECHO_SERVER PATH-TO-TLS_FETCH

Certificates are made with the openssl command ($OPENSSL_PROG, else the one
on PATH) in a temporary directory (tests/tls_certs.py). Then:
- openssl s_server -www serves its status page; tls_fetch verifying with
  the CA prints it whole (the response ends with the server's
  close_notify) and exits 0; with a CA that did not sign the server's
  certificate it exits 1 saying the verification failed; with --insecure
  it fetches the page from a server nobody trusts.
- tls_echo_server, on one loop and on a loop group (-t 2), echoes what
  openssl s_client sends (verifying the server as localhost), reports the
  client's handshake and its close, reports a client whose handshake
  failed, and exits 0 on SIGTERM.
Every wait has a hang guard (TIMEOUT).
"""
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "tests"))
import tls_certs  # noqa: E402

TIMEOUT = 20


class Background:
    """A process whose stdout (and stderr) a thread collects."""

    def __init__(self, argv, cwd=None, stderr=subprocess.STDOUT):
        self.argv = argv
        self.p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=stderr)
        self.out = bytearray()
        self.t = threading.Thread(target=self._drain, daemon=True)
        self.t.start()

    def _drain(self):
        for chunk in iter(lambda: self.p.stdout.read1(65536), b""):
            self.out += chunk

    def wait_for(self, pattern, what):
        deadline = time.monotonic() + TIMEOUT
        while True:
            m = re.search(pattern, bytes(self.out))
            if m:
                return m
            if not self.t.is_alive():
                sys.exit("%s: %s ended (status %s) without %s; output %r"
                         % (what, self.argv[0], self.p.poll(), pattern,
                            bytes(self.out)))
            if time.monotonic() > deadline:
                sys.exit("%s: no %r within %d s; output %r"
                         % (what, pattern, TIMEOUT, bytes(self.out)))
            time.sleep(0.01)

    def wait(self, what):
        try:
            rc = self.p.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            sys.exit("%s: %s still running after %d s" % (what, self.argv[0],
                                                         TIMEOUT))
        self.t.join(TIMEOUT)
        return rc

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self.t.join(TIMEOUT)
        for f in (self.p.stdin, self.p.stdout):
            f.close()


def run(argv):
    try:
        r = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        sys.exit("%s still running after %d s" % (" ".join(argv), TIMEOUT))
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


def s_server_www(openssl, certs, cert):
    srv = Background([openssl, "s_server", "-www", "-accept", "127.0.0.1:0",
                      "-cert", certs[cert], "-key", certs[cert + "_key"]])
    port = int(srv.wait_for(rb"ACCEPT 127\.0\.0\.1:(\d+)",
                            "s_server").group(1))
    return srv, port


def check_fetch(fetch, openssl, certs):
    srv, port = s_server_www(openssl, certs, "server")
    try:
        rc, out, err = run([fetch, "--ca", certs["ca"], "localhost",
                            str(port)])
        if rc != 0 or err:
            sys.exit("tls_fetch --ca: status %d, stderr %r" % (rc, err))
        # The status page of s_server -www, complete: it ends the body.
        if not out.startswith(b"HTTP/1.0 200 ok\r\n") or \
                not out.rstrip().endswith(b"</BODY></HTML>"):
            sys.exit("tls_fetch printed %r ... %r" % (out[:60], out[-60:]))
        print("ok: tls_fetch --ca printed the page (%d bytes)" % len(out))

        rc, out, err = run([fetch, "-v", "--ca", certs["ca"], "localhost",
                            str(port), "/index"])
        if rc != 0 or not out.startswith(b"HTTP/1.0 200 ok\r\n") or \
                not re.search(r"^tls_fetch: TLSv1\.[23] \S+, server "
                              r"CN=localhost", err):
            sys.exit("tls_fetch -v PATH: status %d, stderr %r" % (rc, err))
        print("ok: tls_fetch -v with a path")

        rc, out, err = run([fetch, "--ca", certs["otherca"], "localhost",
                            str(port)])
        if rc != 1 or out or "TLS peer certificate verification failed" \
                not in err or "certificate verify failed" not in err:
            sys.exit("tls_fetch with the wrong CA: status %d, stdout %r, "
                     "stderr %r" % (rc, out[:80], err))
        print("ok: tls_fetch with the wrong CA: %s" % err.strip())

        rc, out, err = run([fetch, "--ca", certs["ca"], "--insecure",
                            "localhost", str(port)])
        if rc != 2:
            sys.exit("tls_fetch --ca --insecure: status %d (not 2)" % rc)
    finally:
        srv.stop()

    srv, port = s_server_www(openssl, certs, "untrusted")
    try:
        rc, out, err = run([fetch, "--insecure", "127.0.0.1", str(port)])
        if rc != 0 or not out.startswith(b"HTTP/1.0 200 ok\r\n"):
            sys.exit("tls_fetch --insecure: status %d, stderr %r" % (rc, err))
        print("ok: tls_fetch --insecure from an untrusted server")
    finally:
        srv.stop()


def check_echo(echo, openssl, certs, args):
    server = Background([echo] + args + [certs["server"],
                                         certs["server_key"], "0"],
                        stderr=subprocess.DEVNULL)
    try:
        banner = server.wait_for(rb"echoing TLS on (\S+):(\d+) with (\d+) "
                                 rb"loops?", "tls_echo_server")
        address = "%s:%s" % (banner.group(1).decode(), banner.group(2).decode())
        loops = int(banner.group(3))
        for i in range(3):
            client = Background([openssl, "s_client", "-connect", address,
                                 "-CAfile", certs["ca"], "-servername",
                                 "localhost", "-verify_hostname",
                                 "localhost", "-verify_return_error"])
            try:
                line = b"hello tls %d\n" % i
                client.p.stdin.write(line)
                client.p.stdin.flush()
                client.wait_for(re.escape(line), "s_client %d" % i)
                client.p.stdin.close()  # s_client sends close_notify, ends
                if client.wait("s_client %d" % i) != 0:
                    sys.exit("s_client %d failed: %r" % (i, bytes(client.out)))
            finally:
                client.stop()
        server.wait_for(rb"(?m)^open   127\.0\.0\.1:\d+ TLSv1\.[23] \S+ SNI "
                        rb"localhost$", "open line")
        # Each client's close: its close_notify, answered with ours.
        deadline = time.monotonic() + TIMEOUT
        while len(re.findall(rb"(?m)^close  127\.0\.0\.1:\d+ \(ok\)$",
                             bytes(server.out))) < 3:
            if time.monotonic() > deadline:
                sys.exit("tls_echo_server did not report 3 clean closes: %r"
                         % bytes(server.out))
            time.sleep(0.01)

        # A client that does not trust the server: its handshake fails, and
        # the server says so.
        bad = Background([openssl, "s_client", "-connect", address,
                          "-CAfile", certs["otherca"],
                          "-verify_return_error"])
        try:
            bad.p.stdin.close()
            if bad.wait("untrusting s_client") == 0:
                sys.exit("s_client trusted the server with the wrong CA")
        finally:
            bad.stop()
        server.wait_for(rb"(?m)^failed .*\(TLS failed.*\)$", "failed line")

        server.p.send_signal(signal.SIGTERM)
        if server.wait("tls_echo_server") != 0:
            sys.exit("tls_echo_server exited with %d" % server.p.returncode)
        print("ok: tls_echo_server%s (%d loop%s) echoed 3 s_clients and "
              "reported a failed handshake"
              % ("".join(" " + a for a in args), loops,
                 "" if loops == 1 else "s"))
    finally:
        server.stop()


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: tls_examples_test.py TLS_ECHO_SERVER TLS_FETCH")
    echo, fetch = (os.path.abspath(a) for a in sys.argv[1:])
    openssl = tls_certs.openssl()
    if openssl is None:
        print("no openssl command: skipped")
        sys.exit(77)
    with tempfile.TemporaryDirectory() as d:
        certs = tls_certs.make(d)
        check_fetch(fetch, openssl, certs)
        check_echo(echo, openssl, certs, [])
        check_echo(echo, openssl, certs, ["-t", "2"])


if __name__ == "__main__":
    main()
