#!/usr/bin/env python3
"""End to end: examples/chat_server with three plain socket clients.

Usage: chat_server_test.py PATH-TO-CHAT_SERVER
Loopback only; every wait has a hang guard (TIMEOUT), inside meson's default
30 s test timeout so that a stuck step fails with its own message. The
server is killed on every way out.
"""
import os
import select
import signal
import socket
import subprocess
import sys
import time

TIMEOUT = 20


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        self.name = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.lines = self.sock.makefile("rb")

    def say(self, text):
        self.sock.sendall(text.encode() + b"\n")

    def expect(self, text):
        got = self.lines.readline().decode().rstrip("\n")
        if got != text:
            sys.exit("%s: expected %r, got %r" % (self.name, text, got))


def first_line(proc):
    """The first line proc prints, read with a deadline (a plain readline()
    would wait for ever on a server that hangs before its banner)."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + TIMEOUT
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            sys.exit("chat_server printed no banner line within %d s "
                     "(got %r)" % (TIMEOUT, buf))
        chunk = os.read(fd, 4096)
        if not chunk:
            sys.exit("chat_server closed its stdout before its banner "
                     "(exit status %s; got %r)" % (proc.poll(), buf))
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def main():
    server = subprocess.Popen([sys.argv[1], "0"], stdout=subprocess.PIPE)
    try:
        banner = first_line(server).split()
        if banner[:2] != ["chat", "on"] or len(banner) < 3:
            sys.exit("chat_server: unexpected banner %r" % banner)
        port = int(banner[2].rsplit(":", 1)[1])

        a = Client(port)
        b = Client(port)
        a.expect("* %s joined" % b.name)
        c = Client(port)
        a.expect("* %s joined" % c.name)
        b.expect("* %s joined" % c.name)

        a.say("hello from a")
        b.expect("%s: hello from a" % a.name)
        c.expect("%s: hello from a" % a.name)
        c.say("")  # an empty line is a message too
        a.expect("%s: " % c.name)
        b.expect("%s: " % c.name)
        b.say("x" * 100)
        a.expect("%s: %s" % (b.name, "x" * 100))
        c.expect("%s: %s" % (b.name, "x" * 100))

        # a half-closes: the server finishes its side, a sees EOF.
        a.sock.shutdown(socket.SHUT_WR)
        if a.lines.read() != b"":
            sys.exit("a: expected EOF")
        b.expect("* %s left" % a.name)
        c.expect("* %s left" % a.name)

        # a client's line never comes back to itself.
        b.say("to c only")
        c.expect("%s: to c only" % b.name)
        c.say("ping")
        b.expect("%s: ping" % c.name)
        for cl in (a, b, c):
            cl.lines.close()
            cl.sock.close()

        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            sys.exit("chat_server still running %d s after SIGTERM" % TIMEOUT)
        if rc != 0:
            sys.exit("chat_server exited with %d" % rc)
        print("chat_server: ok")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(TIMEOUT)
        server.stdout.close()


if __name__ == "__main__":
    main()
