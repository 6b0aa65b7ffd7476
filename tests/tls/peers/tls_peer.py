#!/usr/bin/env python3
"""A TLS peer for tests/tls/conn_tls_test.cpp, on Python's ssl module.

The TLS side is an ssl.SSLObject over two memory BIOs, driven by hand on a
blocking socket, so the peer controls exactly what goes on the wire: a
close_notify without closing the socket (half-close), a TCP close without
close_notify (truncation), a TLS upgrade after a plaintext exchange
(STARTTLS). Nothing here is libduplex: it checks the library against an
independent TLS stack.

Usage: tls_peer.py MODE [options]. As a server (no --connect) it listens on
127.0.0.1:0 and prints "PORT <n>"; with --connect PORT it connects. It
prints "OPEN <version> <cipher> <alpn>" after the handshake and ends with
one "RESULT ..." line; an unexpected failure prints "RESULT fail <why>".

Modes:
  frames    read to the end; each message is a frame (see check_frames) and
            every thread's sequence must be complete and in order. RESULT ok
            frames=N bytes=B end=E
  sink      read to the end (E is clean, truncated or reset); then, on a
            clean end, send --reply-bytes of the pattern (seed 7) and a
            close_notify. RESULT bytes=N crc=X end=E
  firstclose  send --text, then a close_notify (our write side ends), then
            read to the end as sink does (no reply)
  truncate  send --text, then close the TCP connection without close_notify
            (after draining what the other side sends). RESULT sent
  starttls  client only: plaintext "STARTTLS\\r\\n", wait for "OK\\r\\n",
            then TLS: read "WELCOME\\r\\n", send --lines lines "ping <i>\\r\\n",
            read them echoed, close_notify, read to the end.
            RESULT ok lines=N end=E
Options: --cert/--key (server identity), --ca (trust; the client verifies
the server's name --host), --tls12/--tls13 (pin the version), --wait-go
(before reading, wait for a line "go" on stdin), --hold-tickets (a TLS 1.3
server sends its session tickets only after that "go"), --sleep-ms S (pause after
each read of --chunk bytes), --ack N (print "ACK" once N bytes were read).
"""
import argparse
import os
import socket
import ssl
import struct
import sys
import time
import zlib


def say(*parts):
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


class Tls:
    """An SSLObject over memory BIOs on a blocking socket."""

    def __init__(self, sock, ctx, server_side, host=None):
        self.sock = sock
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=server_side,
                                server_hostname=host)
        self.sock_eof = False

    def flush(self):
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def fill(self):
        """One recv into the incoming BIO; False at the transport's end."""
        if self.sock_eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
            self.reset = True
        if not data:
            self.sock_eof = True
            self.inc.write_eof()
            return False
        self.inc.write(data)
        return True

    def handshake(self, hold=False):
        """With @hold, what the last step wrote (a TLS 1.3 server's session
        tickets) stays in the BIO until the next flush()."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.fill()
        if not hold:
            self.flush()

    def send(self, data):
        view = memoryview(data)
        while view:
            n = self.obj.write(view[:65536])
            view = view[n:]
            self.flush()

    def recv(self, n=65536):
        """Plaintext bytes; b"" on close_notify; raises at a truncation."""
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLWantReadError:
                self.flush()
                self.fill()  # at the end the BIO's EOF makes read raise

    def close_notify(self):
        """Send our close_notify; reading may go on."""
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        except ssl.SSLError:
            pass
        try:
            self.flush()
        except OSError:
            pass

    reset = False


def read_to_end(t, args, sink):
    """Read until the stream ends: 'clean', 'truncated' or 'reset'."""
    total = 0
    acked = False
    while True:
        try:
            data = t.recv(args.chunk)
        except ssl.SSLEOFError:
            return total, ("reset" if t.reset else "truncated")
        except ssl.SSLError as e:
            if e.reason == "UNEXPECTED_EOF_WHILE_READING":  # older Pythons
                return total, ("reset" if t.reset else "truncated")
            return total, "error:" + (e.reason or str(e))
        except ConnectionResetError:
            return total, "reset"
        if not data:
            return total, "clean"
        total += len(data)
        sink(data)
        if args.ack and not acked and total >= args.ack:
            acked = True
            say("ACK", total)
        if args.sleep_ms:
            time.sleep(args.sleep_ms / 1000.0)


def pattern(n, seed):
    """The byte stream of pattern_stream() in conn_tls_test.cpp."""
    block = bytes(((i * 31 + seed * 7 + (i >> 8)) & 0xFF) for i in range(65536))
    reps = n // len(block) + 1
    return (block * reps)[:n]


FRAME = struct.Struct("<IIIII")  # magic, tid, seq, len, crc32(payload)
MAGIC = 0x46585044


def check_frames(t, args):
    buf = bytearray()
    nxt = {}
    frames = 0
    state = {"err": None, "bytes": 0}

    def sink(data):
        nonlocal frames, buf
        state["bytes"] += len(data)
        if state["err"]:
            return
        buf += data
        pos = 0
        while len(buf) - pos >= FRAME.size:
            magic, tid, seq, flen, crc = FRAME.unpack_from(buf, pos)
            if magic != MAGIC or flen < FRAME.size or tid >= args.threads:
                state["err"] = "bad header at frame %d (split write?)" % frames
                return
            if len(buf) - pos < flen:
                break
            if seq != nxt.get(tid, 0):
                state["err"] = "thread %d: seq %d, expected %d" % (
                    tid, seq, nxt.get(tid, 0))
                return
            payload = memoryview(buf)[pos + FRAME.size:pos + flen]
            if zlib.crc32(payload) != crc:
                state["err"] = "thread %d seq %d: checksum" % (tid, seq)
                return
            payload.release()
            nxt[tid] = seq + 1
            frames += 1
            pos += flen
        del buf[:pos]

    total, end = read_to_end(t, args, sink)
    if state["err"]:
        say("RESULT fail", state["err"])
    elif buf:
        say("RESULT fail", len(buf), "dangling bytes at the end")
    else:
        say("RESULT ok frames=%d bytes=%d end=%s" % (frames, total, end))
    if end == "clean":
        t.close_notify()


def sink_mode(t, args):
    crc = 0

    def sink(data):
        nonlocal crc
        crc = zlib.crc32(data, crc)

    total, end = read_to_end(t, args, sink)
    say("RESULT bytes=%d crc=%08x end=%s" % (total, crc, end))
    return end


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--connect", type=int, default=0)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--ca")
    ap.add_argument("--host", default="localhost")
    ap.add_argument("--tls12", action="store_true")
    ap.add_argument("--tls13", action="store_true")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--sleep-ms", type=float, default=0)
    ap.add_argument("--wait-go", action="store_true")
    ap.add_argument("--hold-tickets", action="store_true")
    ap.add_argument("--ack", type=int, default=0)
    ap.add_argument("--reply-bytes", type=int, default=0)
    ap.add_argument("--text", default="")
    ap.add_argument("--lines", type=int, default=10)
    args = ap.parse_args()

    client = args.connect != 0
    if client:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(args.ca)
        sock = socket.create_connection(("127.0.0.1", args.connect))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
        say("PORT", ls.getsockname()[1])
        sock, _ = ls.accept()
        ls.close()
    # A transport EOF without close_notify must stay an error here (some
    # Python builds set OP_IGNORE_UNEXPECTED_EOF by default, which would
    # report a truncation as a clean end).
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if args.tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if args.tls13:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    if args.mode == "starttls":
        sock.sendall(b"STARTTLS\r\n")
        got = b""
        while not got.endswith(b"\r\n"):
            d = sock.recv(1)  # one byte at a time: nothing of the TLS part
            if not d:
                say("RESULT fail no OK")
                return
            got += d
        if got != b"OK\r\n":
            say("RESULT fail", repr(got))
            return

    t = Tls(sock, ctx, server_side=not client,
            host=args.host if client else None)
    try:
        t.handshake(hold=args.hold_tickets)
    except ssl.SSLError as e:
        say("RESULT fail handshake", e.reason or str(e))
        return
    say("OPEN", t.obj.version(), t.obj.cipher()[0],
        t.obj.selected_alpn_protocol() or "-")

    if args.wait_go:
        line = sys.stdin.readline()
        if line.strip() != "go":
            say("RESULT fail no go")
            return
    if args.hold_tickets:
        try:
            t.flush()
        except OSError:
            pass

    if args.mode == "frames":
        check_frames(t, args)
    elif args.mode == "sink":
        end = sink_mode(t, args)
        if end == "clean":
            try:
                if args.reply_bytes:
                    t.send(pattern(args.reply_bytes, 7))
                t.close_notify()
            except OSError:
                pass
    elif args.mode == "firstclose":
        t.send(args.text.encode())
        t.close_notify()
        sink_mode(t, args)
    elif args.mode == "truncate":
        t.send(args.text.encode())
        sock.shutdown(socket.SHUT_WR)  # FIN, no close_notify
        while sock.recv(65536):
            pass
        say("RESULT sent")
    elif args.mode == "starttls":
        want = b"WELCOME\r\n"
        got = b""
        while len(got) < len(want):
            d = t.recv()
            if not d:
                break
            got += d
        if got != want:
            say("RESULT fail welcome", repr(got))
            return
        lines = b"".join(b"ping %d\r\n" % i for i in range(args.lines))
        t.send(lines)
        echoed = b""
        while len(echoed) < len(lines):
            d = t.recv()
            if not d:
                break
            echoed += d
        if echoed != lines:
            say("RESULT fail echo", len(echoed), "of", len(lines))
            return
        t.close_notify()
        rest, end = read_to_end(t, args, lambda d: None)
        say("RESULT ok lines=%d end=%s" % (args.lines, end))
    else:
        say("RESULT fail unknown mode", args.mode)
    try:
        sock.close()
    except OSError:
        pass


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one RESULT line, whatever happened
        say("RESULT fail exception", type(e).__name__, e)
        raise
