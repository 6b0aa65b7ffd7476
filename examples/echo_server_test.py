#!/usr/bin/env python3
"""End to end: examples/echo_server, one loop and a loop group.

Usage: echo_server_test.py PATH-TO-ECHO_SERVER
For each mode (no -t, -t 3): start the server on port 0, connect clients
that each echo a few messages, stop it with SIGTERM (caught on a loop by
duplex_signal) and check it exits 0. With -t 3 the server prints how many
conns each loop accepted: every loop got its share (balanced: within one)
and the shares add up to the clients. Every wait has a hang guard.
"""
import os
import select
import signal
import socket
import subprocess
import sys
import time

TIMEOUT = 20
CLIENTS = 12


def read_line(proc, what):
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + TIMEOUT
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            sys.exit("echo_server printed no %s within %d s (got %r)"
                     % (what, TIMEOUT, buf))
        chunk = os.read(fd, 1)
        if not chunk:
            sys.exit("echo_server closed stdout before its %s (status %s)"
                     % (what, proc.poll()))
        buf += chunk
    return buf.decode().rstrip("\n")


def run(binary, args):
    server = subprocess.Popen([binary, "-q"] + args + ["0"],
                              stdout=subprocess.PIPE)
    try:
        banner = read_line(server, "banner")
        # "echoing on 127.0.0.1:PORT with N loop(s) (Ctrl-C to stop)"
        words = banner.split()
        if words[:2] != ["echoing", "on"]:
            sys.exit("unexpected banner %r" % banner)
        port = int(words[2].rsplit(":", 1)[1])
        loops = int(words[4])
        clients = [socket.create_connection(("127.0.0.1", port), TIMEOUT)
                   for _ in range(CLIENTS)]
        for rnd in range(3):
            for i, c in enumerate(clients):
                msg = ("client %d round %d\n" % (i, rnd)).encode()
                c.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = c.recv(len(msg) - len(got))
                    if not chunk:
                        sys.exit("client %d: EOF before its echo" % i)
                    got += chunk
                if got != msg:
                    sys.exit("client %d: echo %r != %r" % (i, got, msg))
        server.send_signal(signal.SIGTERM)
        shares = []
        if loops > 1:
            for i in range(loops):
                line = read_line(server, "share of loop %d" % i)
                prefix = "loop %d: accepted " % i
                if not line.startswith(prefix):
                    sys.exit("unexpected line %r" % line)
                shares.append(int(line[len(prefix):]))
        try:
            status = server.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            sys.exit("echo_server did not exit on SIGTERM")
        if status != 0:
            sys.exit("echo_server exited with %d" % status)
        for c in clients:
            c.close()
        if loops > 1:
            if sum(shares) != CLIENTS or max(shares) - min(shares) > 1:
                sys.exit("uneven or lost shares: %r" % shares)
        print("ok: %s, %d loop(s), shares %r" % (args or "one loop", loops,
                                                  shares))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def main():
    run(sys.argv[1], [])
    run(sys.argv[1], ["-t", "3"])


if __name__ == "__main__":
    main()
