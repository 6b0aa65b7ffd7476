"""Ping-pong latency: duplex.aio streams against asyncio's own.

    DUPLEX_LIBRARY=build-py/core/libduplex.so PYTHONPATH=bindings/python \\
        python3 bindings/python/bench/pingpong.py [--count 2000] [--rounds 7]

One client sends 64 bytes and waits for the echo (readexactly(64)),
``count`` times, first with asyncio.open_connection(), then with
duplex.aio.open_connection(), alternating for ``rounds`` rounds against the
same echo server in another process: the C example echo_server (found
next to DUPLEX_LIBRARY's build, or --server PATH), else a small Python one.
Prints the median time of each and their ratio. Other load on the machine
moves the figures a lot; `chrt -f 10 python3 ...` (as root) keeps it out.
"""
import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import duplex.aio

PY_ECHO = r"""
import socket, sys, threading
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(16)
print(ls.getsockname()[1], flush=True)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while d := c.recv(65536):
        c.sendall(d)
    c.close()
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

MSG = b"p" * 63 + b"\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path):
    if path is None:
        lib = os.environ.get("DUPLEX_LIBRARY", "")
        guess = os.path.join(os.path.dirname(os.path.dirname(lib)),
                             "examples", "echo_server")
        path = guess if lib and os.access(guess, os.X_OK) else None
    if path:
        port = free_port()
        proc = subprocess.Popen([path, str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                return proc, port, os.path.basename(path) + " (C)"
            except OSError:
                time.sleep(0.01)
        proc.kill()
        raise SystemExit(f"{path} did not start")
    proc = subprocess.Popen([sys.executable, "-c", PY_ECHO],
                            stdout=subprocess.PIPE)
    return proc, int(proc.stdout.readline()), "Python threads"


async def pingpong(open_connection, port, count):
    r, w = await open_connection("127.0.0.1", port)
    for _ in range(50):  # warm up
        w.write(MSG)
        await r.readexactly(len(MSG))
    t = time.perf_counter()
    for _ in range(count):
        w.write(MSG)
        await r.readexactly(len(MSG))
    elapsed = time.perf_counter() - t
    w.close()
    await w.wait_closed()
    return elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--server", help="an echo server: PROGRAM PORT")
    args = ap.parse_args()
    proc, port, kind = start_server(args.server)
    times = {"asyncio": [], "duplex.aio": []}
    try:
        for _ in range(args.rounds):
            for name, fn in (("asyncio", asyncio.open_connection),
                             ("duplex.aio", duplex.aio.open_connection)):
                times[name].append(asyncio.run(pingpong(fn, port,
                                                        args.count)))
    finally:
        proc.terminate()
        proc.wait()
    a = statistics.median(times["asyncio"])
    d = statistics.median(times["duplex.aio"])
    print(f"{args.count} ping-pongs of {len(MSG)} bytes, echo server: "
          f"{kind}, median of {args.rounds} rounds")
    for name, t in (("asyncio", a), ("duplex.aio", d)):
        print(f"  {name:11} {t * 1000:8.1f} ms  "
              f"({t / args.count * 1e6:6.1f} us per round trip)")
    print(f"  ratio       {d / a:8.2f}x asyncio's time")


if __name__ == "__main__":
    main()
