#!/usr/bin/env python3
"""End to end: examples/chat_server with three plain socket clients.

Usage: chat_server_test.py PATH-TO-CHAT_SERVER
Loopback only; every wait has a hang guard (TIMEOUT).
"""
import signal
import socket
import subprocess
import sys

TIMEOUT = 60


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


def main():
    server = subprocess.Popen([sys.argv[1], "0"], stdout=subprocess.PIPE)
    try:
        banner = server.stdout.readline().decode().split()
        assert banner[:2] == ["chat", "on"], banner
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
        rc = server.wait(TIMEOUT)
        if rc != 0:
            sys.exit("chat_server exited with %d" % rc)
        print("chat_server: ok")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()


if __name__ == "__main__":
    main()
